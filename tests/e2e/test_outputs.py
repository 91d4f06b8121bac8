"""What a run writes, checked where a user reads it (``python -m trainer.run``'s files), on a suite of five
hook points given out of order with distinct lr warmup and K-annealing lengths, stopped at step 6 and
resumed: the members' order (layer, then R, A, M, TC) in suite.json / suite.csv / suite.md, the schedules'
lengths in hyperparams.json (and as metrics.jsonl shows them), only the latest checkpoint on disk; and a
SIGTERM during the last step still ends the command with status 143."""
import csv
import json
import os
import signal
from pathlib import Path

import pytest

from trainer.run import main

ORDER = ["L1R-2x", "L1A-2x", "L1M-2x", "L1TC-2x", "L2R-2x"]
STEPS, K, K_START, ANNEAL_FRACTION, WARMUP, LR = 16, 8, 32, 0.5, 3, 4e-3


def flags(model, out, *extra):
    return ["--model", model, "--hookpoints", "L2R,L1TC,L1M,L1A,L1R", "--expansion", "2", "--k", str(K),
            "--k-start", str(K_START), "--k-anneal-fraction", str(ANNEAL_FRACTION), "--warmup-steps", str(WARMUP),
            "--lr", str(LR), "--context-len", "64", "--lm-batch-size", "4", "--tokens", str(STEPS * 128),
            "--batch-size", "128", "--buffer-tokens", "512", "--eval-tokens", "256", "--no-eval-lm-loss",
            "--log-every", "1", "--checkpoint-every", "3", "--export-dtype", "float32", "--no-progress",
            "--output", str(out), *extra]


def listing(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None


@pytest.fixture(scope="module")
def suite(tiny_llama, tmp_path_factory):
    """The suite stopped at step 6 (checkpoints at 3 and 6), the resume folders' listings then, then
    resumed to the end."""
    out = tmp_path_factory.mktemp("outputs") / "suite"
    assert main(flags(tiny_llama, out, "--stop-after-steps", "6")) == 0
    stopped = {"root": listing(out / "resume"), **{n: listing(out / n / "resume") for n in ORDER}}
    assert main(flags(tiny_llama, out, "--resume")) == 0
    return out, stopped


def test_a_stopped_run_keeps_only_its_latest_checkpoint(suite):
    _, stopped = suite
    for name in ORDER:
        assert stopped[name] == ["step6.pt"], (name, stopped[name])  # step3.pt removed by the checkpoint of step 6
    assert "state.pt" in stopped["root"]
    assert [f for f in stopped["root"] if f.startswith("buffer-")] == ["buffer-step6-rank0-of1.safetensors"]


def test_members_are_ordered_by_layer_then_r_a_m_tc(suite):
    out, _ = suite
    data = json.loads((out / "suite.json").read_text())
    assert [m["name"] for m in data["members"]] == ORDER
    assert [r["name"] for r in csv.DictReader((out / "suite.csv").read_text().splitlines())] == ORDER
    table = (out / "suite.md").read_text()
    assert sorted(ORDER, key=table.index) == ORDER


def test_hyperparams_hold_the_k_annealing_and_the_lr_warmup(suite):
    out, _ = suite
    anneal = int(ANNEAL_FRACTION * STEPS)  # 8, not the lr warmup's 3
    for name in ORDER:
        hp = json.loads((out / name / "hyperparams.json").read_text())
        assert (hp["k_warmup_steps"], hp["lr_warm_up_steps"]) == (anneal, WARMUP), name
        assert hp["top_k"] == K
        # ... as the run's own metrics show them: k above K for the annealing steps, lr below --lr while warming up
        recs = [json.loads(ln) for ln in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), name
        assert recs[0]["k"] == K_START and sum(r["k"] > K for r in recs) == hp["k_warmup_steps"], name
        warming = [r["step"] for r in recs[: STEPS // 2] if r["lr"] < LR * (1 - 1e-9)]
        assert warming == list(range(1, hp["lr_warm_up_steps"])), (name, warming)
        assert not (out / name / "resume").exists()
    assert not (out / "resume").exists()


def test_sigterm_during_the_last_step_ends_the_command_with_143(tiny_llama, tmp_path, monkeypatch, capsys):
    """The last step has no step boundary after it: the run finishes it, then the signal is delivered as
    if never caught (docs/training.md: SIGTERM ends the run with status 143), not swallowed."""
    from trainer.data.buffer import ActivationBuffer

    real, calls = ActivationBuffer.next_batch, []

    def next_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == STEPS:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    monkeypatch.setattr(ActivationBuffer, "next_batch", next_batch)
    before = signal.getsignal(signal.SIGTERM)
    argv = flags(tiny_llama, tmp_path / "term")
    argv[argv.index("--hookpoints") + 1] = "L1R"
    assert main(argv) == 143
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == STEPS and lines[-1].startswith("stopped by SIGTERM"), lines[-3:]
    assert signal.getsignal(signal.SIGTERM) == before
