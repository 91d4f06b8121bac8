"""The end of a run: the suite's files and the lines a user reads.

``suite.json`` (every member's place, headline metrics, the settings, the layout, LM tokens and phase
times), ``suite.md`` / ``suite.csv`` (the table), ``suite.png`` (EV, delta LM loss, L0 and the dead
fraction against the layer, one line per position and width: Figure 10 of the Llama Scope paper), each
written atomically; ``summary`` and ``suite_table`` are what the run prints.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, List, Tuple

from sae_kernels.atomic import atomic_path, atomic_write_json, atomic_write_text

from . import run_folder as names

SUITE_COLUMNS = ("explained_variance", "l0", "delta_lm_loss", "ce_score", "dead_latents_eval", "dead_latents_train",
                 "d_sae")


def suite_table(suite: Dict[str, Any]) -> str:
    """The suite's results as a Markdown table (also printed at the end of a run)."""
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = ["| member | EV | L0 | delta LM loss | CE score | dead (held-out) | dead (train) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in suite["members"]:
        lines.append(f"| {m['name']} | {f(m['explained_variance'], '.4f')} | {f(m['l0'], '.2f')} | "
                     f"{f(m['delta_lm_loss'], '.4f')} | {f(m['ce_score'], '.4f')} | "
                     f"{m['dead_latents_eval']} / {m['d_sae']} | {m['dead_latents_train']} / {m['d_sae']} |")
    return "\n".join(lines)


def write_suite_files(out: Path, suite: Dict[str, Any]) -> None:
    """``suite.json``, ``suite.md``, ``suite.csv`` and ``suite.png`` (EV, delta LM loss, L0 and the dead
    fraction against the layer, one line per position and width: Figure 10 of the Llama Scope paper)."""
    atomic_write_json(out / names.SUITE_JSON, suite)
    atomic_write_text(out / names.SUITE_MD, suite_table(suite) + "\n")
    buf = io.StringIO()
    cols = ["name", "layer", "position", "expansion", *SUITE_COLUMNS]
    w = csv.writer(buf)
    w.writerow(cols)
    for m in suite["members"]:
        w.writerow([m.get(c) for c in cols])
    atomic_write_text(out / names.SUITE_CSV, buf.getvalue())
    plot_suite(suite, out / names.SUITE_PNG)


def plot_suite(suite: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("explained_variance", "explained variance"), ("delta_lm_loss", "delta LM loss"),
              ("l0", "L0"), ("dead_fraction", "dead latents (held-out fraction)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    lines: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    for m in suite["members"]:
        lines.setdefault((m["position"], m["expansion"]), []).append(m)
    for ax, (key, title) in zip(axes, panels):
        for (pos, exp), ms in lines.items():
            ms = sorted(ms, key=lambda m: m["layer"])
            ys = [(m["dead_latents_eval"] / m["d_sae"]) if key == "dead_fraction" else m.get(key) for m in ms]
            pts = [(m["layer"], y) for m, y in zip(ms, ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{pos} {exp}x")
        if key == "delta_lm_loss" and all(m.get(key) is None for m in suite["members"]):
            ax.text(0.5, 0.5, "not measured\n(--no-eval-lm-loss)", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{suite['model']}: {len(suite['members'])} SAEs", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def summary(r: Dict[str, Any]) -> str:
    lines = [
        f"held-out ({r['n_tokens']} tokens): explained variance {r['explained_variance']:.4f} (ratio of sums), "
        f"{r['explained_variance_per_token']:.4f} (mean per token); L0 {r['l0']:.2f} (k={r['k']})",
    ]
    if "delta_lm_loss" in r:
        lines.append(f"CE clean {r['ce_clean']:.4f}, with SAE {r['ce_sae']:.4f} (delta LM loss {r['delta_lm_loss']:.4f}), "
                     f"zero-ablated {r['ce_zero_ablation']:.4f}, CE score {r['ce_score']:.4f}")
    lines.append(f"dead latents: {r['dead_latents_eval']} on held-out, {r['dead_latents_train']} in the last "
                 f"{r['dead_window_tokens']} training tokens")
    if "jumprelu" in r:
        j = r["jumprelu"]
        lines.append(f"JumpReLU (threshold {j['threshold']:.4g}): EV {j['explained_variance']:.4f}, L0 {j['l0']:.2f}")
    s = r["seconds"]
    lines.append(f"wall time {s['total']:.0f}s (model load {s['load_model']:.0f}s, data and first buffer fill "
                 f"{s['data_and_first_fill']:.0f}s, training {s['train']:.0f}s, export+eval {s['eval_export']:.0f}s) "
                 f"-> {r['checkpoint']}")
    return "\n".join(lines)


def suite_record(*, cfg, specs, placement: List[List[int]], tp: int, dp: int, world_size: int,
                 results: Dict[str, Dict[str, Any]], stats: List[Dict[str, Any]], hooks: List[str], d_model: int,
                 model: str, buffer_bytes: int, seconds: Dict[str, float], cpu_seconds: Dict[str, float]) -> Dict[str, Any]:
    """``suite.json``: each member's place (folder, ranks) and headline metrics, in member order; the run's
    settings and layout; LM tokens and bytes moved (summed over ranks); phase times (wall: rank 0's, but
    the LM, SAE step, evaluation and waiting times over ranks; CPU: rank 0's process)."""
    out = Path(cfg.output)
    return {
        "members": [dict(name=m.name, layer=m.layer, position=m.position, expansion=m.expansion,
                         folder=str(out / m.name), ranks=[g * tp + r for g in groups for r in range(tp)],
                         **{k: results[m.name].get(k) for k in SUITE_COLUMNS})
                    for m, groups in zip(specs, placement)],
        "settings": {k: v for k, v in cfg.to_dict().items() if k not in ("layer", "position", "expansion")},
        "expansions": cfg.expansions, "hook_points": hooks, "d_model": d_model, "model": model,
        "layout": {"world_size": world_size, "tp": tp, "dp": dp},
        "lm_tokens": sum(st["lm_tokens"] for st in stats),
        "buffer_bytes_per_rank": buffer_bytes, "rows_received_bytes": sum(st["rows_received_bytes"] for st in stats),
        "seconds": dict(seconds,
                        lm_forward=round(sum(st["lm_seconds"] for st in stats), 2),
                        sae_steps=round(sum(v for st in stats for v in st["sae_step_seconds"].values()), 2),
                        eval=round(max(st["eval_seconds"] for st in stats), 2),
                        waiting_for_rows=round(max(st["wait_seconds"] for st in stats), 2)),
        # CPU time of rank 0's process (all its threads) per phase: less sensitive than wall time to other
        # jobs on the machine; "train" holds the SAE steps and the LM forwards that overlap them
        "cpu_seconds": cpu_seconds,
    }


def finish(suite: Dict[str, Any], results: Dict[str, Dict[str, Any]], log) -> None:
    """Write the suite's files and print the members' summaries, the table and the phase times."""
    out = Path(suite["settings"]["output"])
    write_suite_files(out, suite)
    names.finish_run(out, [out / m["name"] for m in suite["members"]])  # from here on the run is finished
    for name in list(results)[:8]:
        log(f"{name}: " + summary(results[name]).replace("\n", f"\n{name}: "))
    log(suite_table(suite))
    s, n = suite["seconds"], len(suite["members"])
    log(f"suite of {n} SAE{'s' if n > 1 else ''}: wall time {s['total']:.0f}s (model load {s['load_model']:.0f}s, "
        f"data and first buffer fill {s['data_and_first_fill']:.0f}s, training {s['train']:.0f}s, export+eval "
        f"{s['eval_export']:.0f}s) -> {out}/{names.SUITE_JSON}")
