"""``python -m trainer.evaluate RUN``: evaluate trained SAEs on another model, other data or longer contexts.

The paper's generalisation study: an SAE trained on one model and 1024-token contexts, evaluated on
the instruct twin (``--model``), other text (``--dataset``) or longer contexts (``--context-len``).
With no flags it repeats the run's own evaluation (same model, data, held-out contexts and settings:
the metrics equal the run's ``eval.json``). Reports what ``eval.json`` reports (EV in both
conventions, L0, delta LM loss, CE score, dead latents) plus the same per token-position bucket
(the long-context curve), as ``<run>/evaluations/<model>_<dataset>_ctx<L>.json`` and an SVG figure.
"""
from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from sae_kernels.atomic import atomic_write_text

from ..analyze.corpus import held_out_contexts
from ..analyze.export import write_json
from ..analyze.runs import RunError, resolve_run, settings_of
from ..analyze.svg import PALETTE, Figure
from ..cli.common import Parser, add_corpus_args, device_of, run_cli, show_defaults
from ..data.lm import load_model
from .metrics import EV_CONVENTION, evaluate_sites

DEFAULT_EDGES = (0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
METRIC_KEYS = ("explained_variance", "explained_variance_per_token", "l0", "mse", "dead_latents_eval",
               "dead_fraction_eval", "n_tokens", "ce_clean", "ce_sae", "ce_zero_ablation", "delta_lm_loss",
               "ce_score", "ce_tokens")
CONVENTIONS = {
    "explained_variance": EV_CONVENTION,
    "delta_lm_loss": "CE with the reconstruction spliced in minus clean CE, over non-special target tokens; "
                     "special positions keep their original activation; ce_score = (CE_zero - CE_sae) / "
                     "(CE_zero - CE_clean)",
    "dead_latents_eval": "latents with no activation on any evaluated token (window = n_tokens)",
    "by_position": "buckets [edges[i], edges[i+1]) of the token position in its context (0 = first token, BOS); "
                   "explained variance of the tokens at those positions (mean(y) over all tokens); CE of "
                   "predicting the tokens at those positions (delta LM loss = its SAE minus clean)",
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(  # no prefix matching; one-line errors, suggestions for typos
        prog="python -m trainer.evaluate",
        description="Evaluate trained SAEs (a run folder, or a suite folder of them) on another model, other data or "
                    "other context lengths: explained variance (both conventions), L0, delta LM loss, CE score, dead "
                    "latents, and EV and delta LM loss per token-position bucket. Without flags: the run's own "
                    "evaluation (reproduces its eval.json). Writes <run>/evaluations/<model>_<dataset>_ctx<L>.json "
                    "and .svg.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder or suite folder")
    add_corpus_args(
        p,
        model="LM to evaluate on: Hub name, local folder or .gguf, 'embedded' (default: the run's)",
        dataset="'pydoc', a local txt/json/jsonl/parquet/csv file or folder, or a Hub dataset (default: the run's)",
        context_len="tokens per context, BOS included (default: the run's; the embedded model supports 8192)",
        tokens="evaluated tokens, whole contexts chosen by the run's held-out rule (every eval_every-th "
               "context; default: the run's eval_tokens, at least one context)",
        batch_size="contexts per LM forward (default: as the run's evaluation, min(lm_batch_size, 2))",
        progress="show a progress bar (counted in context tokens)")
    p.add_argument("--lm-tokens", metavar="N", type=int, default=None,
                   help="tokens (whole contexts, a prefix of the evaluated ones) for delta LM loss and CE score "
                        "(default: the run's eval_lm_tokens)")
    p.add_argument("--lm-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="measure delta LM loss and CE score (runs the whole LM 3x; default: as the run did)")
    p.add_argument("--position-buckets", metavar="E", default=None,
                   help="comma-separated bucket edges over token positions (default: 0,64,128,256,...,context_len)")
    p.add_argument("--training-contexts", action=argparse.BooleanOptionalAction, default=False,
                   help="evaluate on contexts the run trained on instead of its held-out ones: the context just "
                        "before each held-out one, as many (the run's own data and context length only; trained on when the "
                        "run made a pass over in-memory data, or streamed past them). The EV "
                        "there minus the held-out EV is how much the SAE fits its training text only; the output "
                        "file's name ends in _trained")
    p.add_argument("--output", metavar="PATH", default=None,
                   help="JSON file to write (the figure goes beside it as .svg); one RUN with one SAE only")
    return show_defaults(p)


def _slug(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(s).strip("/")).strip("-.")
    return s[-60:] or "x"


def bucket_edges(spec: Optional[str], T: int) -> List[int]:
    if spec is None:
        edges = [e for e in DEFAULT_EDGES if e < T] + [T]
    else:
        try:
            edges = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--position-buckets: expected comma-separated integers, got {spec!r}") from None
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0:
            raise ValueError(f"--position-buckets: expected at least two increasing non-negative edges, got {spec!r}")
    return edges


def figure(doc: Dict[str, Any]) -> str:
    bp = doc["by_position"]
    edges = bp["edges"]
    mids = [math.sqrt(max(a, 1) * b) for a, b in zip(edges, edges[1:])]
    ev = bp["explained_variance"]
    title = f"{doc['sae']} on {doc['model_short']}, {doc['dataset']}, context {doc['context_len']}"
    xl = (max(edges[0], 1) * 0.8, edges[-1] * 1.25)
    xt = [(float(max(e, 1)), str(e)) for e in edges]  # position 0 drawn at 1 on the log axis
    vals = [v for v in ev if v is not None] or [0.0]
    lo = min(vals)
    f1 = Figure(title, "token position in the context (bucket edges; points at bucket centres)", "explained variance",
                xl, (lo - 0.05 if lo < 0 else max(0.0, lo - 0.05), 1.0), xlog=True, height=260)
    f1.line(mids, ev, PALETTE[0], "EV (ratio of sums)")
    parts = [f1.svg(xticks=xt)]
    if "delta_lm_loss" in bp:
        d = [v for v in bp["delta_lm_loss"] if v is not None] or [0.0]
        span = max(max(d) - min(min(d), 0.0), 1e-6)
        f2 = Figure("delta LM loss by position", "token position in the context (bucket edges)", "delta LM loss (nats)",
                    xl, (min(min(d), 0.0) - 0.08 * span, max(max(d), 0.0) + 0.35 * span), xlog=True, height=260)  # headroom: the legend
        f2.line(mids, bp["delta_lm_loss"], PALETTE[1], "CE(SAE) - CE(clean)")
        f2.hline(0.0)
        parts.append(f2.svg(xticks=xt))
    h = 260 * len(parts)
    inner = "".join(f'<svg x="0" y="{260 * i}" width="560" height="260">' + p.split(">", 1)[1].rsplit("</svg>", 1)[0]
                    + "</svg>" for i, p in enumerate(parts))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="560" height="{h}" viewBox="0 0 560 {h}" '
            f'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11">{inner}</svg>\n')


def run_evaluation(args, log=print) -> List[Dict[str, Any]]:
    specs = [resolve_run(r) for r in args.runs]
    members = [m for s in specs for m in s.members]
    if args.output and len(members) != 1:
        raise ValueError(f"--output: expected one SAE, got {len(members)} (leave --output out to write into each run)")
    for name in ("tokens", "lm_tokens", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v}")
    device = device_of(args.device)
    settings = settings_of(members)
    model = args.model or settings.get("model") or members[0].model or "embedded"
    t0 = time.perf_counter()
    log(f"loading model {model!r} ...")
    bf16 = settings.get("precision") == "bf16" and args.model is None and device.type == "cuda"
    lm = load_model(model, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    for m in members:
        if int(m.hyper.get("d_model", 0)) != lm.d_model:
            raise RunError(f"{m.folder}: d_model {m.hyper.get('d_model')} does not match the model's {lm.d_model} ({lm.name})")
        if m.layer >= lm.n_layers:
            raise RunError(f"{m.folder}: layer {m.layer}, but the model has {lm.n_layers} layers")
    corpus = held_out_contexts(settings, lm, dataset=args.dataset, tokens=args.tokens, context_len=args.context_len,
                               dataset_config=args.dataset_config, split=args.split, text_column=args.text_column,
                               trained=args.training_contexts)
    T = corpus.info["context_len"]
    edges = bucket_edges(args.position_buckets, T)
    lm_loss = args.lm_loss if args.lm_loss is not None else bool(settings.get("eval_lm_loss", True))
    lm_tokens = args.lm_tokens or settings.get("eval_lm_tokens") or corpus.info["n_contexts"] * T
    lm_contexts = max(1, math.ceil(int(lm_tokens) / T))
    batch = args.batch_size or max(1, min(int(settings.get("lm_batch_size") or 2), 2))  # trainer.run's eval batch
    log(f"evaluating on {corpus.info['n_contexts']} contexts x {T} tokens ({corpus.info['rule']}); delta LM loss "
        f"on {min(lm_contexts, corpus.info['n_contexts']) if lm_loss else 0} of them")
    # every member in one pass over the data and one clean LM pass, as trainer.run evaluates a suite
    saes: Dict[tuple, Dict[str, Any]] = {}
    for m in members:
        saes.setdefault((m.layer, m.position), {})[m.key] = m.load_sae(device=device)
    t1 = time.perf_counter()
    metrics, _ = evaluate_sites(lm, saes, corpus.contexts, special_ids=corpus.special_ids, batch_size=batch,
                                lm_loss=lm_loss, lm_loss_contexts=lm_contexts, position_buckets=edges,
                                progress=getattr(args, "progress", False))
    secs = time.perf_counter() - t1  # the whole pass, shared by every member
    out = []
    for m in members:
        r = metrics[m.key]
        doc = {
            "format": "sae-kernels-evaluation/1",
            "sae": m.name, "run": str(m.folder), "layer": m.layer, "position": m.position,
            "model": lm.name, "model_short": args.model or settings.get("model") or lm.name,
            "trained_on": {"model": settings.get("model"), "dataset": settings.get("dataset"),
                           "context_len": settings.get("context_len")},
            "dataset": corpus.info["dataset"], "context_len": T, "corpus": corpus.info,
            "lm_loss_contexts": min(lm_contexts, corpus.info["n_contexts"]) if lm_loss else 0,
            "batch_size": batch,
            **{k: r[k] for k in METRIC_KEYS if k in r},
            "by_position": r["by_position"],
            "conventions": CONVENTIONS,
            "seconds": {"load_and_data": round(t1 - t0, 2), "evaluate": round(secs, 2)},
        }
        if args.output:
            path = Path(args.output)
        else:
            tail = "_trained" if args.training_contexts else ""
            path = m.folder / "evaluations" / f"{_slug(doc['model_short'])}_{_slug(doc['dataset'])}_ctx{T}{tail}.json"
        write_json(path, doc)
        atomic_write_text(path.with_suffix(".svg"), figure(doc))
        line = (f"{m.name}: EV {r['explained_variance']:.4f} (per token {r['explained_variance_per_token']:.4f}), "
                f"L0 {r['l0']:.2f}, dead {r['dead_latents_eval']}")
        if lm_loss:
            line += f", delta LM loss {r['delta_lm_loss']:.4f}, CE score {r['ce_score']:.4f}"
        log(line + f" -> {path}")
        out.append({"path": path, "doc": doc})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(run_evaluation, build_parser().parse_args(argv))
