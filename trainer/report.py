"""The end of a run: the suite's files and the lines a user reads.

``suite.json`` (every member's place, headline metrics, the settings, the layout, LM tokens and phase
times), ``suite.md`` / ``suite.csv`` (the table), ``suite.png`` (EV, delta LM loss, L0 and the dead
fraction against the layer, one line per position and width: Figure 10 of the Llama Scope paper; one
labelled bar per member when every member reads the same layer), and each member's ``training.png`` (its
``metrics.jsonl`` against tokens), each written atomically; ``summary`` and ``suite_table`` are what the
run prints.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from sae_kernels.atomic import atomic_path, atomic_write_json, atomic_write_text

from . import run_folder as names

TRAINING_PNG = "training.png"  # in each member folder: its metrics.jsonl against tokens
SUITE_COLUMNS = ("explained_variance", "l0", "delta_lm_loss", "ce_score", "dead_latents_eval", "dead_latents_train",
                 "d_sae")


def sweeps_k(members: List[Dict[str, Any]]) -> bool:
    """Whether the suite's members differ in architecture, K or L1 coefficient (a sweep: sweep.png)."""
    return len({variant(m) for m in members}) > 1


def variant(m: Dict[str, Any]) -> Tuple[str, Any, Any]:
    """``(architecture, K, L1 coefficient)`` of a member record (suite.json; older records: topk)."""
    return m.get("architecture") or "topk", m.get("k"), m.get("l1_coefficient")


def variant_label(m: Dict[str, Any]) -> str:
    """``k50`` or ``l1c4``: the value a sweep varies within an architecture."""
    arch, k, l1 = variant(m)
    return f"l1c{l1:g}" if arch == "standard" and l1 is not None else f"k{k}"


def suite_table(suite: Dict[str, Any]) -> str:
    """The suite's results as a Markdown table (also printed at the end of a run)."""
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    ms = suite["members"]
    archs = {variant(m)[0] for m in ms}
    show_arch = len(archs) > 1  # its architecture, K and L1 coefficient beside each member
    swept = sweeps_k(ms) and archs != {"standard"}
    show_l1 = "standard" in archs and (show_arch or len({variant(m)[2] for m in ms}) > 1)
    head = (" architecture |" if show_arch else "") + (" K |" if swept else "") + (" L1 |" if show_l1 else "")
    lines = ["| member |" + head + " EV | L0 | delta LM loss | CE score | dead (held-out) | dead (train) |",
             "|---|" + "---:|" * head.count("|") + "---:|---:|---:|---:|---:|---:|"]
    for m in ms:
        arch, k, l1 = variant(m)
        cells = ((f" {arch} |" if show_arch else "") + (f" {'' if k is None else k} |" if swept else "")
                 + (f" {'' if l1 is None else format(l1, 'g')} |" if show_l1 else ""))
        lines.append(f"| {m['name']} |" + cells + f" {f(m['explained_variance'], '.4f')} | {f(m['l0'], '.2f')} | "
                     f"{f(m['delta_lm_loss'], '.4f')} | {f(m['ce_score'], '.4f')} | "
                     f"{m['dead_latents_eval']} / {m['d_sae']} | {m['dead_latents_train']} / {m['d_sae']} |")
    return "\n".join(lines)


def write_suite_files(out: Path, suite: Dict[str, Any]) -> None:
    """``suite.json``, ``suite.md``, ``suite.csv`` and ``suite.png`` (EV, delta LM loss, L0 and the dead
    fraction against the layer, one line per position and width: Figure 10 of the Llama Scope paper; bars
    when every member reads one layer)."""
    atomic_write_json(out / names.SUITE_JSON, suite)
    atomic_write_text(out / names.SUITE_MD, suite_table(suite) + "\n")
    buf = io.StringIO()
    cols = ["name", "layer", "position", "expansion", "architecture", "k", "l1_coefficient", *SUITE_COLUMNS]
    w = csv.writer(buf)
    w.writerow(cols)
    for m in suite["members"]:
        w.writerow([m.get(c) for c in cols])
    atomic_write_text(out / names.SUITE_CSV, buf.getvalue())
    plot_suite(suite, out / names.SUITE_PNG)
    if sweeps_k(suite["members"]):
        plot_sweep(suite, out / names.SWEEP_PNG)


SWEEP_PANELS = (("explained_variance", "explained variance"), ("delta_lm_loss", "delta LM loss"))


def plot_sweep(suite: Dict[str, Any], path: Path) -> int:
    """``sweep.png`` for a suite that sweeps K: explained variance and delta LM loss against the measured
    L0, one row of panels per hook point, one line per architecture and width, each point labelled with its
    K or L1 coefficient (the Llama Scope paper's Figure 2 for the user's own model). Returns the number of
    hook points drawn."""
    plt = _pyplot()
    sites: Dict[Tuple[int, str], List[Dict[str, Any]]] = {}
    for m in suite["members"]:
        sites.setdefault((m["layer"], m["position"]), []).append(m)
    rows = list(sites.items())
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.4 * len(rows)), squeeze=False)
    try:
        for (site, ms), row in zip(rows, axes):
            for ax, (key, title) in zip(row, SWEEP_PANELS):
                lines: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
                for m in ms:
                    lines.setdefault((variant(m)[0], m["expansion"]), []).append(m)
                for (arch, exp), wm in lines.items():
                    pts = sorted((m["l0"], m[key], variant_label(m)) for m in wm
                                 if m.get("l0") is not None and m.get(key) is not None)
                    if not pts:
                        continue
                    (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{arch} {exp}x")
                    for x, y, lab in pts:
                        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                    color=line.get_color())
                if _lm_loss_not_measured(ax, key, ms):
                    ax.set_xticks([])
                    ax.set_yticks([])
                ax.margins(x=0.1, y=0.12)
                ax.set_xlabel("L0 (held-out)")
                ax.set_title(f"L{site[0]}{site[1]}: {title}")
                ax.grid(alpha=0.3)
            row[0].legend(fontsize=8)
        archs = sorted({variant(m)[0] for m in suite["members"]})
        fig.suptitle(f"{suite['model']}: " + (", ".join(archs) if len(archs) > 1 else "sweep over K"), fontsize=10)
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)
    return len(rows)


SUITE_PANELS = (("explained_variance", "explained variance"), ("delta_lm_loss", "delta LM loss"),
                ("l0", "L0"), ("dead_fraction", "dead latents (held-out fraction)"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _suite_value(m: Dict[str, Any], key: str):
    if key == "dead_fraction":
        return None if m.get("dead_latents_eval") is None else m["dead_latents_eval"] / m["d_sae"]
    return m.get(key)


def _lm_loss_not_measured(ax, key: str, members: List[Dict[str, Any]]) -> bool:
    """On the delta LM loss panel of a run that did not measure it, say so; whether it did."""
    if key != "delta_lm_loss" or any(m.get(key) is not None for m in members):
        return False
    ax.text(0.5, 0.5, "not measured\n(--no-eval-lm-loss)", ha="center", va="center", transform=ax.transAxes)
    return True


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def plot_suite(suite: Dict[str, Any], path: Path) -> str:
    """``suite.png``: each metric against the layer, one line per position and width (Figure 10 of the Llama
    Scope paper); when every member reads one layer (a single SAE, widths at one hook point) one bar per
    member with its value written on it. Returns the kind drawn: ``"lines"`` or ``"bars"``."""
    plt = _pyplot()
    members = suite["members"]
    kind = "bars" if len({m["layer"] for m in members}) == 1 else "lines"
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6 if kind == "lines" else 4.0))
    try:
        for ax, (key, title) in zip(axes, SUITE_PANELS):
            if kind == "bars":
                _suite_bars(ax, members, key)
            else:
                _suite_lines(ax, members, key)
            _lm_loss_not_measured(ax, key, members)
            ax.set_title(title)
            ax.grid(alpha=0.3, axis="y" if kind == "bars" else "both")
        if kind == "lines":
            axes[0].legend(fontsize=8)
        n = len(members)
        where = f", layer {members[0]['layer']}" if kind == "bars" else ""
        fig.suptitle(f"{suite['model']}: {n} SAE{'s' if n > 1 else ''}{where}", fontsize=10)
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)
    return kind


def _suite_lines(ax, members: List[Dict[str, Any]], key: str) -> None:
    lines: Dict[Tuple[str, int, Any], List[Dict[str, Any]]] = {}
    swept = sweeps_k(members)
    for m in members:
        lines.setdefault((m["position"], m["expansion"], variant(m) if swept else None), []).append(m)
    for (pos, exp, v), ms in lines.items():
        ms = sorted(ms, key=lambda m: m["layer"])
        pts = [(m["layer"], y) for m in ms for y in [_suite_value(m, key)] if y is not None]
        if pts:
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{pos} {exp}x" + (
                "" if v is None else (f" {v[0]}" if v[0] != "topk" else "")
                + (f" l1c{v[2]:g}" if v[2] is not None else f" k{v[1]}")))
            if len(pts) == 1:  # a lone point: its value written beside it
                ax.annotate(f"{pts[0][1]:.4g}", pts[0], textcoords="offset points", xytext=(5, 5), fontsize=8,
                            color=line.get_color())
    ax.set_xlabel("layer")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _suite_bars(ax, members: List[Dict[str, Any]], key: str) -> None:
    """One bar per member (its name under it, its value on it); n/a for a value not measured."""
    xs = list(range(len(members)))
    ys = [_suite_value(m, key) for m in members]
    ax.set_xticks(xs)
    ax.set_xticklabels([m["name"] for m in members], rotation=30 if len(members) > 3 else 0,
                       ha="right" if len(members) > 3 else "center", fontsize=8)
    ax.set_xlim(-0.6, len(members) - 0.4)
    if all(y is None for y in ys):
        ax.set_yticks([])
        return
    bars = ax.bar(xs, [0.0 if y is None else y for y in ys], color=[f"C{i % 10}" for i in xs], width=0.6)
    for b, y in zip(bars, ys):
        x = b.get_x() + b.get_width() / 2
        if y is None:
            ax.annotate("n/a", (x, 0), ha="center", va="bottom", textcoords="offset points", xytext=(0, 3), fontsize=9)
        else:
            ax.annotate(f"{y:.4g}", (x, y), ha="center", va="bottom" if y >= 0 else "top",
                        textcoords="offset points", xytext=(0, 3 if y >= 0 else -3), fontsize=9)
    ax.margins(y=0.15)
    if key in ("explained_variance", "dead_fraction") and all(y is None or 0 <= y <= 1 for y in ys):
        ax.set_ylim(0, 1.1)  # fractions on their full scale, room for the labels
    ax.axhline(0, color="black", linewidth=0.6)


TRAINING_PANELS = (("loss", "loss"), ("explained_variance", "explained variance"), ("l0", "L0 and K"),
                   ("dead_fraction", "dead fraction (training window)"), ("lr", "learning rate"))


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """A member's ``metrics.jsonl`` records (a line a kill cut short is skipped)."""
    recs = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "tokens" in rec:
            recs.append(rec)
    return recs


def plot_training(metrics_path: Path, png_path: Path, title: str) -> None:
    """``training.png`` of a member: its loss, explained variance, L0 with the K schedule, dead fraction
    and learning rate against the training tokens, from its ``metrics.jsonl``; written atomically."""
    recs = read_metrics(metrics_path) if Path(metrics_path).is_file() else []
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TRAINING_PANELS), figsize=(20, 3.6))
    try:
        tokens = [r["tokens"] for r in recs]
        for ax, (key, name) in zip(axes, TRAINING_PANELS):
            pts = [(t, r[key]) for t, r in zip(tokens, recs) if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None,
                        label=key if key != "l0" else "L0")
            if key == "l0":
                ks = [(t, r["k"]) for t, r in zip(tokens, recs) if isinstance(r.get("k"), (int, float))]
                if ks:  # K under L0 (TopK: L0 is K but for latents that tie at zero)
                    ax.plot([p[0] for p in ks], [p[1] for p in ks], linestyle="--", linewidth=2.5, color="C3",
                            label="K", zorder=1)
                    ax.legend(fontsize=8)
            aux = [(t, r["auxk_loss"]) for t, r in zip(tokens, recs) if isinstance(r.get("auxk_loss"), (int, float))]
            if key == "loss" and any(a[1] > 0 for a in aux):
                ax.plot([a[0] for a in aux], [a[1] for a in aux], color="C2", alpha=0.7, label="auxk loss")
                ax.legend(fontsize=8)
            ys = [p[1] for p in pts] + ([a[1] for a in aux] if key == "loss" else [])
            if key == "loss" and ys and min(ys) > 0 and max(ys) > 20 * min(ys):
                ax.set_yscale("log")  # a loss that falls by orders of magnitude
            if not recs:
                ax.text(0.5, 0.5, "no metrics lines", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(name)
            ax.set_xlabel("tokens")
            ax.grid(alpha=0.3)
        last = f"; last line: step {recs[-1].get('step')}, {recs[-1]['tokens']:,} tokens" if recs else ""
        fig.suptitle(f"{title}{last}", fontsize=10)
        fig.tight_layout()
        _save(fig, png_path)
    finally:
        plt.close(fig)


def summary(r: Dict[str, Any]) -> str:
    lines = [
        f"held-out ({r['n_tokens']} tokens): explained variance {r['explained_variance']:.4f} (ratio of sums), "
        f"{r['explained_variance_per_token']:.4f} (mean per token); L0 {r['l0']:.2f} ("
        + (f"{r['architecture']}, " if r.get("architecture", "topk") != "topk" else "")
        + (f"l1 coefficient {r['l1_coefficient']:g})" if r.get("k") is None and r.get("l1_coefficient") is not None
           else f"k={r['k']})"),
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
                         architecture=cfg.arch_of(m), k=cfg.k_of(m) if cfg.arch_of(m) != "standard" else None,
                         l1_coefficient=cfg.l1_of(m),
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
    """Write the suite's files and each member's ``training.png``, then print the members' summaries, the
    table and the phase times."""
    out = Path(suite["settings"]["output"])
    write_suite_files(out, suite)
    for m in suite["members"]:
        folder = out / m["name"]
        plot_training(folder / names.METRICS, folder / TRAINING_PNG, f"{suite['model']}: {m['name']}")
    names.finish_run(out, [out / m["name"] for m in suite["members"]])  # from here on the run is finished
    for name in list(results)[:8]:
        log(f"{name}: " + summary(results[name]).replace("\n", f"\n{name}: "))
    log(suite_table(suite))
    s, n = suite["seconds"], len(suite["members"])
    log(f"suite of {n} SAE{'s' if n > 1 else ''}: wall time {s['total']:.0f}s (model load {s['load_model']:.0f}s, "
        f"data and first buffer fill {s['data_and_first_fill']:.0f}s, training {s['train']:.0f}s, export+eval "
        f"{s['eval_export']:.0f}s) -> {out}/{names.SUITE_JSON}")
