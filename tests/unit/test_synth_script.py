"""benchmarks/synth_vs_saelens.py end to end in its --quick setting (a tiny SynthSAEBench world, one seed, one
lr, all eight methods: ours and SAELens's, scored by SAELens's eval_sae_on_synthetic_data), and its flag errors.

The end-to-end test runs the script as a user does (a subprocess: its own imports, progress lines, JSON and
Markdown); about 15 s on two CPU cores. It skips only when SAELens is not installed.
"""
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "synth_vs_saelens.py"
METHODS = ["ours-topk", "ours-batchtopk", "ours-matryoshka_batchtopk", "ours-released",
           "saelens-topk", "saelens-batchtopk", "saelens-matryoshka_batchtopk", "saelens-jumprelu"]
METRICS = ["mcc", "f1", "precision", "recall", "accuracy", "explained_variance", "l0", "dead_latents",
           "shrinkage", "uniqueness", "true_l0"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_run_writes_every_method_with_finite_saelens_metrics(tmp_path):
    pytest.importorskip("sae_lens")
    out = tmp_path / "synth.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--output", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # a progress line per run, then the table
    lines = [ln for ln in proc.stdout.splitlines() if re.match(r"\[\d+/8\] ", ln)]
    assert len(lines) == 8, proc.stdout
    assert all(" MCC " in ln and " F1 " in ln for ln in lines)
    assert "| method | lr | seed | MCC | F1 | precision | recall | EV | L0 | dead |" in proc.stdout

    doc = json.loads(out.read_text())
    assert {"benchmark", "command", "settings", "versions", "device", "world", "runs", "best", "wall_seconds"} <= set(doc)
    s = doc["settings"]
    assert s["mode"] == "quick" and s["methods"] == METHODS and s["seeds"] == [42]
    for key in ("features", "d_in", "d_sae", "k", "samples", "batch_size", "steps", "eval_samples", "lrs",
                "dead_window_tokens", "saelens_dead_feature_window", "matryoshka_widths", "world_seed", "device"):
        assert key in s, key
    assert s["samples"] == s["steps"] * s["batch_size"]
    v = doc["versions"]
    assert v["torch"] and v["sae_lens"] and "git_commit" in v
    assert v["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", v["git_commit"])
    assert doc["device"]["type"] in ("cpu", "cuda")
    assert _finite(doc["world"]["true_l0"]) and doc["world"]["true_l0"] > 0

    runs = doc["runs"]
    assert [r["method"] for r in runs] == METHODS
    d_sae, k = s["d_sae"], s["k"]
    for r in runs:
        assert "error" not in r, r
        assert r["seed"] == 42 and r["lr"] == s["lrs"][r["method"]][0]
        m = r["metrics"]
        assert set(METRICS) <= set(m), r["method"]
        for key in METRICS:
            assert _finite(m[key]), (r["method"], key, m[key])
        for key in ("mcc", "f1", "precision", "recall", "accuracy", "uniqueness"):
            assert 0 <= m[key] <= 1, (r["method"], key, m[key])
        assert 0 < m["l0"] <= d_sae and 0 <= m["dead_latents"] <= d_sae and m["explained_variance"] <= 1
        for key in ("train_seconds", "eval_seconds"):
            assert _finite(r[key]) and r[key] >= 0
        assert r["recipe"]
    by = {r["method"]: r for r in runs}
    # TopK keeps at most K per sample; BatchTopK / Matryoshka run (and were scored) as JumpReLU
    for method in ("ours-topk", "ours-released", "saelens-topk"):
        assert by[method]["architecture_saved"] == "topk" and by[method]["metrics"]["l0"] <= k + 1e-9
    for method in ("ours-batchtopk", "ours-matryoshka_batchtopk", "saelens-batchtopk",
                   "saelens-matryoshka_batchtopk", "saelens-jumprelu"):
        assert by[method]["architecture_saved"] == "jumprelu", method
    # the two recipes of ours differ only in what keeps latents alive; SAELens's dead window is ours in steps
    assert by["ours-topk"]["recipe"]["auxk"] and not by["ours-released"]["recipe"]["auxk"]
    assert by["saelens-topk"]["recipe"]["dead_feature_window"] == s["saelens_dead_feature_window"]

    assert list(doc["best"]) == METHODS
    for method, b in doc["best"].items():
        assert b["lr"] == by[method]["lr"] and b["seeds"] == [42]
        assert all(_finite(b["mean"][key]) for key in METRICS)

    md = out.with_suffix(".md").read_text()
    assert "| method | lr | seed | MCC | F1 | precision | recall | EV | L0 | dead |" in md
    assert all(f"| {method} |" in md for method in METHODS)


def _script_module():
    spec = importlib.util.spec_from_file_location("synth_vs_saelens_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv, expected", [
    (["--seeds", "4x"], "--seeds: expected comma-separated integers"),
    (["--methods", "ours-topk,nope"], "--methods: expected comma-separated names from"),
    (["--lrs", "saelens=abc"], "--lrs: expected positive numbers"),
    (["--lrs", "theirs=1e-3"], "--lrs: expected NAME=LR with NAME a method"),
    (["--methods", "ours-topk,saelens-topk", "--lrs", "ours=1e-3"], "--lrs: no learning rate for saelens-topk"),
    (["--samples", "0"], "--samples: expected an integer >= 1"),
    (["--quick", "--samples", "100"], "--samples: expected at least one batch"),
    (["--output", "results.txt"], "--output: expected a path ending in .json"),
])
def test_bad_flags_name_the_flag_and_what_was_expected(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        _script_module().main(argv)
    assert e.value.code == 2
    assert expected in capsys.readouterr().err
