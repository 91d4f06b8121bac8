"""``load_model`` on CUDA where accelerate is not installed (the GPU device image): transformers needs
accelerate for a ``device_map``, so the trainer must load without one and move the model. Simulated on
the CPU: accelerate made unimportable (as benchmarks/absent_modules.py does) and ``Module.to`` of a CUDA
device recorded instead of run."""
import sys

import pytest
import torch


@pytest.fixture
def no_accelerate(monkeypatch):
    from transformers.utils import import_utils

    monkeypatch.setitem(sys.modules, "accelerate", None)  # import fails, find_spec says absent
    import_utils.is_accelerate_available.cache_clear()  # transformers caches the probe
    yield
    monkeypatch.undo()
    import_utils.is_accelerate_available.cache_clear()


def test_cuda_load_without_accelerate(tiny_llama, no_accelerate, monkeypatch):
    from transformers.utils import is_accelerate_available

    from trainer.data.lm import load_model

    assert not is_accelerate_available()
    moved = []
    to = torch.nn.Module.to

    def fake_to(self, *args, **kwargs):
        dev = args[0] if args else kwargs.get("device")
        if isinstance(dev, (str, torch.device)) and torch.device(dev).type == "cuda":
            moved.append(str(dev))
            return self
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", fake_to)
    lm = load_model(tiny_llama, device="cuda", dtype=torch.float32)
    assert moved == ["cuda"], moved  # loaded into host memory, then moved once
    assert lm.n_layers == 3 and lm.d_model == 32
