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


# ---------------------------------------------------------------------------------------------------------
# Where the tests ran (benchmarks/gpu_check.py): with SAE_KERNELS_TEST_REPORT naming a file, the session
# writes JSON there: whether Triton was interpreted, and per test module its ``DEVICE`` (the kernel test
# modules expose it) and its passed / failed / skipped counts; ``devices``: the DEVICEs of the modules
# where a test passed or failed. gpu_check fails its tests section on a device unless that is cuda only.

_outcomes: dict = {}
_collect_skips: dict = {}


def _module_of(nodeid: str) -> str:
    return nodeid.split("::")[0]


def pytest_collectreport(report):
    if report.outcome == "skipped" and report.nodeid:
        _collect_skips[_module_of(report.nodeid)] = str(report.longrepr)[-300:]


def pytest_runtest_logreport(report):
    counts = _outcomes.setdefault(_module_of(report.nodeid), {"passed": 0, "failed": 0, "skipped": 0})
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or (
            report.when == "teardown" and report.outcome == "failed"):
        counts[report.outcome] += 1


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("SAE_KERNELS_TEST_REPORT")
    if not path:
        return
    import json

    modules = {}
    for item in getattr(session, "items", []) or []:
        mod = _module_of(item.nodeid)
        if mod not in modules:
            device = getattr(getattr(item, "module", None), "DEVICE", None)
            modules[mod] = {"DEVICE": None if device is None else str(device),
                            **_outcomes.get(mod, {"passed": 0, "failed": 0, "skipped": 0})}
    for mod, why in _collect_skips.items():
        modules.setdefault(mod, {"DEVICE": None, "passed": 0, "failed": 0, "skipped": 0})["skipped_at_collection"] = why
    ran = sorted({m["DEVICE"] for m in modules.values() if m["DEVICE"] and (m["passed"] or m["failed"])})
    report = {"interpreted": os.environ.get("TRITON_INTERPRET") == "1",
              "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
              "cuda_available": torch.cuda.is_available(), "exitstatus": int(exitstatus), "devices": ran,
              "modules": modules}
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
