"""Shared test setup.

Without a GPU the Triton kernels run through the interpreter: TRITON_INTERPRET must be set before
any ``@triton.jit`` function is defined, so it is set here, before the package is imported.
"""
import os

# Set before torch starts OpenMP: the trainer's producer thread and the training thread each run an
# OpenMP team, and spinning waits on 2 cores slow small ops 5-15x (see trainer/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import interp_speedup  # noqa: E402

interp_speedup.install()  # nested @jit calls in the interpreter: see tests/interp_speedup.py


@pytest.fixture
def backend(request, monkeypatch):
    """Forces the backend named by the test's parameter (see helpers.BACKENDS)."""
    monkeypatch.setenv("SAE_KERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """The tests' one LM: a random 3-layer Llama (d_model 32, GQA) with a byte-level tokenizer, as a local
    Hugging Face folder (``trainer.testing.tiny_llama_folder``). Read-only: tests write elsewhere."""
    from trainer.testing import tiny_llama_folder

    return tiny_llama_folder(str(tmp_path_factory.mktemp("tiny_llama")), layers=3)


@pytest.fixture(scope="session")
def tiny_suite(tiny_llama, tmp_path_factory):
    """A tiny random Llama and a suite of two SAEs on its layer 1 (L1R-8x, L1R-32x, k=8) trained from one
    LM pass, as ``python -m trainer.run --expansion 8,32`` writes it: member folders and suite.json
    (tests/test_analyze*.py)."""
    from trainer.config import TrainConfig
    from trainer.run import run

    root = tmp_path_factory.mktemp("suite")
    model = tiny_llama
    out = root / "suite"
    run(TrainConfig(model=model, layer=1, context_len=64, lm_batch_size=4, tokens=4096, batch_size=256,
                    buffer_tokens=1024, eval_tokens=512, eval_every=5, expansion="8,32", k=8, lr=4e-3,
                    progress=False, output=str(out)), log=lambda s: None)
    assert (out / "suite.json").is_file() and (out / "L1R-8x").is_dir() and (out / "L1R-32x").is_dir()
    return model, out


@pytest.fixture(scope="session")
def analyzed(tiny_suite):
    """``tiny_suite`` after ``python -m trainer.analyze <suite>`` (data and dashboards written)."""
    from trainer.analyze.cli import main

    model, suite = tiny_suite
    assert main([str(suite), "--no-progress", "--top", "6", "--samples", "6", "--logit-tokens", "5"]) == 0
    return model, suite
