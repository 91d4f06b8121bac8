"""``python -m trainer.evaluate RUN``: reproduces the run's eval.json with the run's settings, and
evaluates at other context lengths with per-position buckets."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_close
from trainer.evaluate.cli import main

KEYS = ("explained_variance", "explained_variance_per_token", "l0", "mse", "dead_latents_eval", "n_tokens",
        "ce_clean", "ce_sae", "ce_zero_ablation", "delta_lm_loss", "ce_score", "ce_tokens")


def test_reproduces_the_runs_eval_json(tiny_suite):
    _, suite = tiny_suite
    assert main([str(suite), "--position-buckets", "0,8,32,64"]) == 0
    for name in ("L1R-8x", "L1R-32x"):
        run = suite / name
        saved = json.loads((run / "eval.json").read_text())
        files = sorted((run / "evaluations").glob("*_pydoc_ctx64.json"))
        assert len(files) == 1 and files[0].with_suffix(".svg").read_text().startswith("<svg")
        got = json.loads(files[0].read_text())
        for k in KEYS:
            assert got[k] == pytest.approx(saved[k], rel=1e-9, abs=1e-12), (name, k, got[k], saved[k])
        bp = got["by_position"]
        assert bp["edges"] == [0, 8, 32, 64] and sum(bp["tokens"]) == got["n_tokens"]
        assert sum(bp["ce_tokens"]) == got["ce_tokens"]
        ce = sum(c * n for c, n in zip(bp["ce_sae"], bp["ce_tokens"])) / got["ce_tokens"]
        assert ce == pytest.approx(got["ce_sae"], rel=1e-9)


def test_reproduces_eval_json_whose_lm_loss_covers_a_prefix(tiny_llama, tmp_path):
    """A run whose delta LM loss covers only a prefix of the held-out set (eval_lm_tokens 100 of eval_tokens
    512: ceil(100 / 64) = 2 of the 8 contexts): ``python -m trainer.evaluate RUN`` takes the same prefix and
    reproduces eval.json, and the CE counts exactly the non-special targets of those two contexts."""
    from trainer.analyze.corpus import held_out_contexts
    from trainer.analyze.runs import resolve_run
    from trainer.config import TrainConfig
    from trainer.data.lm import load_model
    from trainer.run import run

    out = tmp_path / "runs"
    run(TrainConfig(model=tiny_llama, layer=1, context_len=64, lm_batch_size=4, tokens=2048, batch_size=256,
                    buffer_tokens=1024, eval_tokens=512, eval_lm_tokens=100, eval_every=5, k=8, lr=4e-3,
                    progress=False, output=str(out)), log=lambda s: None)
    run_dir = out / "L1R-8x"
    saved = json.loads((run_dir / "eval.json").read_text())
    assert main([str(run_dir), "--no-progress"]) == 0
    files = sorted((run_dir / "evaluations").glob("*_ctx64.json"))
    assert len(files) == 1
    got = json.loads(files[0].read_text())
    f64 = torch.float64
    for k in KEYS:
        assert_close(torch.tensor(got[k], dtype=f64), torch.tensor(saved[k], dtype=f64), rtol=1e-9, atol=1e-12, what=k)
    assert got["corpus"]["n_contexts"] == 8 and got["corpus"]["held_out"] and got["lm_loss_contexts"] == 2
    held = held_out_contexts(resolve_run(run_dir).members[0].train_config, load_model(tiny_llama))
    targets = held.contexts[:2, 1:]
    assert saved["ce_tokens"] == int((~torch.isin(targets, torch.tensor(held.special_ids))).sum()) > 64
    assert saved["n_tokens"] == held.info["tokens"] >= 3 * saved["ce_tokens"]  # EV: all 8 contexts


def test_longer_contexts_and_the_module_entry_point(tiny_suite, tmp_path):
    _, suite = tiny_suite
    out = tmp_path / "e.json"
    # the user's command: python -m trainer.evaluate (trainer/evaluate.py's __main__ entry)
    r = subprocess.run([sys.executable, "-m", "trainer.evaluate", str(suite / "L1R-8x"), "--context-len", "256",
                        "--tokens", "1024", "--output", str(out)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["context_len"] == 256 and got["corpus"]["n_contexts"] == 4
    bp = got["by_position"]
    assert bp["edges"] == [0, 64, 128, 256] and all(n > 0 for n in bp["tokens"])
    assert all(math.isfinite(v) for v in bp["explained_variance"] + bp["delta_lm_loss"])
    assert got["trained_on"]["context_len"] == 64 and got["l0"] == pytest.approx(8.0)


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--dataset", "--context-len", "--tokens", "--lm-tokens", "--position-buckets", "--output"):
        assert flag in text


def test_bad_context_len_names_the_flag(tiny_suite, capsys):
    _, suite = tiny_suite
    assert main([str(suite / "L1R-8x"), "--context-len", "4096"]) == 2  # the tiny model has 512 positions
    assert "--context-len" in capsys.readouterr().err
    assert main([str(suite / "L1R-8x"), "--position-buckets", "5,3"]) == 2
    assert "--position-buckets" in capsys.readouterr().err


def test_training_contexts_are_contexts_the_run_trained_on(tiny_suite, capsys):
    from trainer.analyze.corpus import held_out_contexts
    from trainer.analyze.runs import resolve_run
    from trainer.data import ContextData, load_documents
    from trainer.data.lm import load_model

    model, suite = tiny_suite
    run = suite / "L1R-8x"
    m = resolve_run(run).members[0]
    lm = load_model(model)
    held = held_out_contexts(m.train_config, lm)
    got = held_out_contexts(m.train_config, lm, trained=True)
    assert got.info["training_contexts"] and not got.info["held_out"] and not held.info["training_contexts"]
    assert got.contexts.shape == held.contexts.shape
    s = m.train_config
    data = ContextData(load_documents(), lm.tokenizer, s["context_len"], s["lm_batch_size"],
                       eval_every=s["eval_every"], eval_contexts=len(held.contexts), seed=s["seed"])
    train = {tuple(r.tolist()) for r in data.train_tokens()}
    assert all(tuple(r.tolist()) in train for r in got.contexts)  # every one was trained on
    assert not {tuple(r.tolist()) for r in got.contexts} & {tuple(r.tolist()) for r in held.contexts}

    # the user's command writes beside the held-out evaluation, not over it
    assert main([str(run), "--training-contexts", "--no-lm-loss", "--no-progress"]) == 0
    files = sorted((run / "evaluations").glob("*_ctx64_trained.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["corpus"]["training_contexts"] and math.isfinite(doc["explained_variance"])
    assert main([str(run), "--training-contexts", "--context-len", "128"]) == 2
    assert "--training-contexts" in capsys.readouterr().err
