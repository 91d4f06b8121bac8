"""A suite from one LM pass against one SAE and against separate runs (docs/suites.md).

    python benchmarks/bench_suite.py                 # the embedded default on the CPU (~30-60 minutes)
    python benchmarks/bench_suite.py --tokens 60000  # shorter; any other trainer.run flag passes through

Runs, each as a fresh ``python -m trainer.run`` process (what a user runs), with the same tokens:

1. one SAE: ``--hookpoints L12R``;
2. a suite of four: ``--hookpoints L3R,L6R,L9R,L12R``;
3. the same four as separate runs, one after another.

Reports for each the wall time, the CPU time (user + sys of the process and its threads: on a machine
shared with other jobs it moves much less than the wall time) and the 1-minute load average at its start
and end, and from each run's ``suite.json`` the time of the LM forwards (wall time of the producer
thread; it overlaps the SAE steps, so shares can add up to more than 100%), of the SAE steps and of
the evaluation, as shares of the wall time, plus the CPU time per phase (model load; data and first
buffer fill, which is LM forwards; training, the SAE steps and the LM forwards that overlap them;
export and evaluation). Targets: the LM runs once (the suite pushes the same tokens through it as one
SAE, in the same forward time), and the suite takes at most 0.6x the time of the four separate runs.
Writes ``benchmarks/results/suite-<device>-<date>.json``. A benchmark, not a test: nothing asserts.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
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
    load0 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
    suite = json.loads((Path(out) / "suite.json").read_text())
    s = suite["seconds"]
    return {
        "hookpoints": hookpoints, "wall": round(wall, 1), "cpu_seconds": round(cpu, 1),
        "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)], "seconds": s,
        "cpu_phases": suite.get("cpu_seconds"),
        "lm_tokens": suite["lm_tokens"],
        "shapes": {"model": suite.get("model"), "d_model": suite.get("d_model"), "hook_points": suite.get("hook_points"),
                   **{k: suite["settings"].get(k) for k in ("tokens", "batch_size", "k", "context_len", "lm_batch_size",
                                                             "buffer_tokens", "eval_tokens", "eval_lm_tokens", "dtype")
                      if k in suite["settings"]}},
        "members": {m["name"]: {k: m[k] for k in ("explained_variance", "l0", "delta_lm_loss", "ce_score",
                                                 "dead_latents_eval", "d_sae")} for m in suite["members"]},
    }


def _versions():
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "transformers", "safetensors", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _commit():
    """The code measured: HEAD, and whether the tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(REPO), capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=str(REPO),
                               capture_output=True, text=True).stdout.strip()
        return head + (" (modified)" if dirty else "")
    except OSError:
        return None


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
    print("one SAE (L12R) ...", flush=True)
    results["one"] = trainer_run("L12R", tmp / "one", extra)
    print(f"  {results['one']['wall']:.0f} s (CPU {results['one']['cpu_seconds']:.0f} s, load {results['one']['load_average_1min']})", flush=True)
    print(f"suite of four ({','.join(SUITE)}) ...", flush=True)
    results["suite"] = trainer_run(",".join(SUITE), tmp / "suite", extra)
    print(f"  {results['suite']['wall']:.0f} s (CPU {results['suite']['cpu_seconds']:.0f} s, load {results['suite']['load_average_1min']})", flush=True)
    sep = []
    for h in SUITE:
        print(f"separate run {h} ...", flush=True)
        sep.append(trainer_run(h, tmp / f"sep-{h}", extra))
        print(f"  {sep[-1]['wall']:.0f} s (CPU {sep[-1]['cpu_seconds']:.0f} s, load {sep[-1]['load_average_1min']})", flush=True)
    results["separate"] = sep
    total_sep = sum(r["wall"] for r in sep)
    sep_seconds = {k: round(sum(r["seconds"][k] for r in sep), 2) for k in sep[0]["seconds"]}
    summary = {
        "suite_over_separate": results["suite"]["wall"] / total_sep,
        "suite_lm_forward_over_one": results["suite"]["seconds"]["lm_forward"] / results["one"]["seconds"]["lm_forward"],
        "suite_lm_tokens_over_one": results["suite"]["lm_tokens"] / results["one"]["lm_tokens"],
        "separate_wall": round(total_sep, 1), "separate_seconds": sep_seconds,
        "separate_cpu_seconds": round(sum(r["cpu_seconds"] for r in sep), 1),
    }
    summary["suite_over_separate_cpu"] = results["suite"]["cpu_seconds"] / summary["separate_cpu_seconds"]
    summary["suite_first_fill_cpu_over_one"] = (results["suite"]["cpu_phases"]["data_and_first_fill"]
                                                / results["one"]["cpu_phases"]["data_and_first_fill"])
    sep_phases = {k: round(sum(r["cpu_phases"][k] for r in sep), 2) for k in sep[0]["cpu_phases"]}
    summary["separate_cpu_phases"] = sep_phases
    rows = [("one SAE (L12R)", results["one"]), ("suite of four", results["suite"]),
            ("four separate runs", {"wall": total_sep, "seconds": sep_seconds, "cpu_seconds": summary["separate_cpu_seconds"],
                                    "cpu_phases": sep_phases})]
    print("\n| run | wall s | CPU s | LM forward s (share) | SAE steps s (share) | eval s (share) | model load s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        sh = shares(r)
        s = r["seconds"]
        print(f"| {label} | {r['wall']:.0f} | {r['cpu_seconds']:.0f} | {s['lm_forward']:.0f} ({sh['lm_forward']:.0%}) | "
              f"{s['sae_steps']:.0f} ({sh['sae_steps']:.0%}) | {s['eval']:.0f} ({sh['eval']:.0%}) | {s['load_model']:.0f} |")
    print("\nCPU seconds (user + sys) by phase:\n")
    print("| run | CPU total | model load | data + first fill (LM) | training (SAE steps + overlapped LM) | export + eval |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows:
        c = r["cpu_phases"]
        print(f"| {label} | {r['cpu_seconds']:.0f} | {c['load_model']:.0f} | {c['data_and_first_fill']:.0f} | "
              f"{c['train']:.0f} | {c['eval_export']:.0f} |")
    print(f"\nsuite / four separate runs: {summary['suite_over_separate']:.2f} (target <= 0.6); suite LM forward / one "
          f"SAE's: {summary['suite_lm_forward_over_one']:.2f} (LM tokens {summary['suite_lm_tokens_over_one']:.2f}x); "
          f"CPU time (user+sys) suite / separate: {summary['suite_over_separate_cpu']:.2f}; CPU of the first fill "
          f"(LM forwards) suite / one SAE's: {summary['suite_first_fill_cpu_over_one']:.2f}")
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "versions": _versions(), "extra_args": extra,
              "load_average": os.getloadavg(), "commit": _commit(), "results": results, "summary": summary}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"suite-cpu-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
