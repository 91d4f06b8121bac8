"""Dead latents, explained variance, L0 and LM loss of the embedded default at layer 12, for R, A, M and
TC, with the default recipe and with ``--released-recipe``: real ``python -m trainer.run`` runs.

    python benchmarks/dead_latents.py                       # 8 runs, ~4-5 min each on 2 CPU cores
    python benchmarks/dead_latents.py --positions R,A --variants default
    python benchmarks/dead_latents.py --collect-only        # tabulate runs already in --output

Each run writes ``<output>/<variant>/L12{P}-8x/eval.json``; the script prints a Markdown table of the
held-out metrics (dead latents = never active on the 8174 held-out tokens) and writes them, with the
commands that produced them, to ``<output>/dead_latents.json``. Extra arguments after ``--`` go to
every ``trainer.run`` command.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"default": [], "released": ["--released-recipe"]}
FIELDS = ("dead_latents_eval", "dead_fraction_eval", "explained_variance", "explained_variance_per_token", "l0",
          "delta_lm_loss", "ce_score", "dead_latents_train", "latents_died_train", "death_events_train", "d_sae",
          "n_tokens")


def run_one(position: str, variant: str, out: Path, extra) -> dict:
    cmd = [sys.executable, "-m", "trainer.run", "--position", position, "--output", str(out / variant),
           "--no-progress", "--overwrite", *VARIANTS[variant], *extra]
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return {"command": " ".join(["python", *cmd[1:]]), "wall_s": round(time.time() - t0, 1)}


def collect(out: Path, position: str, variant: str) -> dict:
    path = out / variant / f"L12{position}-8x" / "eval.json"
    if not path.is_file():
        return {}
    ev = json.loads(path.read_text())
    row = {k: ev.get(k) for k in FIELDS}
    tf = ev.get("train_final", {})
    row["train_tokens_per_s"] = tf.get("tokens_per_s")
    row["train_s"] = ev.get("seconds", {}).get("train")
    return row


def table(rows: dict) -> str:
    head = ("| SAE | recipe | dead on held-out | held-out EV (ratio of sums) | EV per token | L0 | delta LM loss "
            "| CE score | dead in training |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for (pos, var), r in rows.items():
        if not r:
            continue
        lines.append(f"| L12{pos}-8x | {var} | {r['dead_latents_eval']} / {r['d_sae']} ({100 * r['dead_fraction_eval']:.1f}%) "
                     f"| {r['explained_variance']:.4f} | {r['explained_variance_per_token']:.4f} | {r['l0']:.2f} "
                     f"| {r['delta_lm_loss']:.4f} | {r['ce_score']:.4f} | {r['dead_latents_train']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="runs/dead_latents", help="root of the run folders (default: %(default)s)")
    ap.add_argument("--positions", default="R,A,M,TC", help="comma-separated positions (default: %(default)s)")
    ap.add_argument("--variants", default="default,released", help="default and/or released (default: %(default)s)")
    ap.add_argument("--collect-only", action="store_true", help="do not train; tabulate the runs in --output")
    a = ap.parse_args(argv)
    out = Path(a.output)
    positions = [p.strip() for p in a.positions.split(",") if p.strip()]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"--variants: expected names from {', '.join(VARIANTS)}, got {v!r}")
    results_path = out / "dead_latents.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    rows = {}
    for pos in positions:
        for var in variants:
            key = f"L12{pos}-8x/{var}"
            if not a.collect_only:
                results.setdefault(key, {}).update(run_one(pos, var, out, extra))
            row = collect(out, pos, var)
            if row:
                results.setdefault(key, {}).update(row)
            rows[(pos, var)] = row
    out.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
