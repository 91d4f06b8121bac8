"""A suite from one LM pass against one SAE and against separate runs (README, 'Suites').

    python benchmarks/bench_suite.py                 # the embedded default on the CPU (~30 minutes)
    python benchmarks/bench_suite.py --tokens 60000  # shorter; any other trainer.run flag passes through

Runs, each as a fresh ``python -m trainer.run`` process (what a user runs), with the same tokens:

1. one SAE: ``--hookpoints L12R``;
2. a suite of four: ``--hookpoints L3R,L6R,L9R,L12R``;
3. the same four as separate runs, one after another.

Reports the wall time of each and, from each run's ``suite.json``, the time of the LM forwards (the
producer thread; it overlaps the SAE steps, so shares can add up to more than 100%), of the SAE steps
and of the evaluation, as shares of the wall time. Targets (PERFORMANCE.md): the suite's LM forward
time equals one run's (the LM runs once), and the suite takes at most 0.6x the four separate runs.
Writes ``benchmarks/results/suite-<device>-<date>.json``. A benchmark, not a test: nothing asserts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = ["L3R", "L6R", "L9R", "L12R"]


def trainer_run(hookpoints, out, extra):
    cmd = [sys.executable, "-m", "trainer.run", "--hookpoints", hookpoints, "--output", str(out), "--no-progress",
           *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
    suite = json.loads((Path(out) / "suite.json").read_text())
    s = suite["seconds"]
    return {
        "hookpoints": hookpoints, "wall": round(wall, 1), "seconds": s,
        "lm_tokens": suite["lm_tokens"],
        "members": {m["name"]: {k: m[k] for k in ("explained_variance", "l0", "delta_lm_loss", "ce_score",
                                                 "dead_latents_eval", "d_sae")} for m in suite["members"]},
    }


def shares(r):
    s, w = r["seconds"], r["wall"]
    return {"lm_forward": s["lm_forward"] / w, "sae_steps": s["sae_steps"] / w, "eval": s["eval"] / w,
            "load_model": s["load_model"] / w}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/suite-<device>-<date>.json)")
    args, extra = ap.parse_known_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_suite_"))
    results = {}
    print(f"one SAE (L12R) ...", flush=True)
    results["one"] = trainer_run("L12R", tmp / "one", extra)
    print(f"  {results['one']['wall']:.0f} s", flush=True)
    print(f"suite of four ({','.join(SUITE)}) ...", flush=True)
    results["suite"] = trainer_run(",".join(SUITE), tmp / "suite", extra)
    print(f"  {results['suite']['wall']:.0f} s", flush=True)
    sep = []
    for h in SUITE:
        print(f"separate run {h} ...", flush=True)
        sep.append(trainer_run(h, tmp / f"sep-{h}", extra))
        print(f"  {sep[-1]['wall']:.0f} s", flush=True)
    results["separate"] = sep
    total_sep = sum(r["wall"] for r in sep)
    sep_seconds = {k: round(sum(r["seconds"][k] for r in sep), 2) for k in sep[0]["seconds"]}
    summary = {
        "suite_over_separate": results["suite"]["wall"] / total_sep,
        "suite_lm_forward_over_one": results["suite"]["seconds"]["lm_forward"] / results["one"]["seconds"]["lm_forward"],
        "suite_lm_tokens_over_one": results["suite"]["lm_tokens"] / results["one"]["lm_tokens"],
        "separate_wall": round(total_sep, 1), "separate_seconds": sep_seconds,
    }
    rows = [("one SAE (L12R)", results["one"]), ("suite of four", results["suite"]),
            ("four separate runs", {"wall": total_sep, "seconds": sep_seconds})]
    print("\n| run | wall s | LM forward s (share) | SAE steps s (share) | eval s (share) | model load s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows:
        sh = shares(r)
        s = r["seconds"]
        print(f"| {label} | {r['wall']:.0f} | {s['lm_forward']:.0f} ({sh['lm_forward']:.0%}) | "
              f"{s['sae_steps']:.0f} ({sh['sae_steps']:.0%}) | {s['eval']:.0f} ({sh['eval']:.0%}) | {s['load_model']:.0f} |")
    print(f"\nsuite / four separate runs: {summary['suite_over_separate']:.2f} (target <= 0.6); suite LM forward / one "
          f"SAE's: {summary['suite_lm_forward_over_one']:.2f} (LM tokens {summary['suite_lm_tokens_over_one']:.2f}x)")
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "extra_args": extra,
              "load_average": os.getloadavg(), "results": results, "summary": summary}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"suite-cpu-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
