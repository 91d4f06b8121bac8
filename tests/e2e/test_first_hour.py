"""The first hour of a user (issue 30): a run says when a member looks under-trained and what to change, it
estimates the whole job's time early, it checks the inputs before refusing an existing run folder, and a
refused run suggests another --output."""
import json

import pytest

from trainer.evaluate.results import DEAD_FRACTION_WARN, undertrained
from trainer.run import _duration, main


def argv(model, out, *extra):
    return ["--model", model, "--dataset", "pydoc", "--layer", "1", "--expansion", "4", "--k", "8",
            "--context-len", "64", "--lm-batch-size", "4", "--tokens", "4096", "--batch-size", "256",
            "--buffer-tokens", "1024", "--eval-tokens", "256", "--no-progress", "--no-eval-lm-loss",
            "--export-dtype", "float32", "--log-every", "1", "--output", str(out), *extra]


def test_the_default_runs_figures_raise_no_warning_and_short_runs_do():
    default = dict(d_sae=4608, train_tokens=299008, dead_latents_train=1, dead_latents_eval=6,
                   explained_variance=0.8767)
    assert undertrained(default) == []
    short = dict(d_sae=4608, train_tokens=59392, dead_latents_train=2400, dead_latents_eval=2500,
                 explained_variance=0.71)
    (w,) = undertrained(short)
    assert w.startswith("54% of its latents are dead") and "13 tokens per latent" in w
    assert "--tokens" in w and "--expansion" in w
    low = dict(d_sae=4608, train_tokens=20480, dead_latents_train=0, dead_latents_eval=0, explained_variance=0.53)
    (w,) = undertrained(low)
    assert w.startswith("it explains 53% of the held-out variance") and "4 tokens per latent" in w
    edge = dict(default, dead_latents_train=int(DEAD_FRACTION_WARN * 4608))  # at the threshold: no warning
    assert undertrained(edge) == []


def test_durations_read_as_a_person_writes_them():
    assert [_duration(s) for s in (7.4, 61, 3599, 3600, 7384)] == ["7s", "1m01s", "59m59s", "1h00m", "2h03m"]


def test_a_short_run_warns_and_estimates(tiny_llama, tmp_path, capsys):
    """A 16-step run of a tiny model leaves most latents dead: eval.json and the last lines say so and what to
    change; after the first ~5% of the steps one line estimates when the run ends."""
    out = tmp_path / "short"
    assert main(argv(tiny_llama, out)) == 0
    err = capsys.readouterr().err
    ev = json.loads((out / "L1R-4x" / "eval.json").read_text())
    assert ev["warnings"] and all("--tokens" in w for w in ev["warnings"])
    assert f"warning: L1R-4x: {ev['warnings'][0]}" in err
    est = [ln for ln in err.splitlines() if ln.startswith("estimate after step ")]
    assert len(est) == 1 and "training " in est[0] and "the run ends around " in est[0], est


def test_inputs_are_checked_before_an_existing_run_is_refused(tiny_llama, tmp_path, capsys):
    out = tmp_path / "done"
    assert main(argv(tiny_llama, out)) == 0
    capsys.readouterr()
    typo = argv(tiny_llama, out)
    typo[typo.index("--dataset") + 1] = str(tmp_path / "no-such-file.jsonl")
    assert main(typo) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --dataset ") and "no such file" in err, err  # the typo, not the run folder
    assert main(argv(tiny_llama, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "already holds a run" in err and "another --output" in err and "--overwrite" in err, err
