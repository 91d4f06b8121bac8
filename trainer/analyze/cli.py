"""``python -m trainer.analyze RUN [RUN ...]``: what the SAEs learned, as data and a dashboard.

One LM pass over the corpus (default: the run's held-out contexts, then more of its data by the same
rule: ``corpus.analysis_contexts``) feeds every SAE given (a run folder, or a suite folder of them).
Per SAE it writes ``<member>/analysis/`` (JSON, see ``export.py``) and ``<member>/dashboard/index.html``
(opens from disk); a suite also gets ``<suite>/dashboard/index.html``. ``python -m trainer.analyze
compare RUN_A RUN_B`` compares two SAEs (see ``compare_cli.py``); ``python -m trainer.analyze probe RUN
"text"`` shows which latents fire on which tokens of a text (see ``probe.py``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


from ..cli.common import Parser, add_corpus_args, device_of, run_cli, show_defaults
from .compare import nearest_latents
from .corpus import DEFAULT_CONTEXTS, analysis_contexts
from .dashboard import member_links, write_data, write_member_page, write_suite_page
from .export import DOMINANT_SHARE, export_member
from .features import PassConfig, analysis_pass
from .logits import logit_effects, unembedding
from .runs import RunError, load_lm_for, resolve_run

EVAL_KEYS = ("explained_variance", "explained_variance_per_token", "l0", "delta_lm_loss", "ce_score",
             "dead_latents_eval", "n_tokens")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(  # no prefix matching; one-line errors, suggestions for typos
        prog="python -m trainer.analyze",
        description="Top-activating contexts, statistics and logit effects of every latent of the SAEs given, "
                    "from one pass of the LM over a corpus; writes <run>/analysis/*.json and a dashboard "
                    "<run>/dashboard/index.html that opens from disk. 'python -m trainer.analyze compare A B' "
                    "compares two SAEs (python -m trainer.analyze compare --help).")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folder (as python -m trainer.run writes it, or a released Llama Scope SAE folder) or a "
                        "suite folder of them; all share one LM pass")
    add_corpus_args(p)
    p.add_argument("--top", metavar="N", type=int, default=20, help="top-activating contexts kept per latent")
    p.add_argument("--samples", metavar="N", type=int, default=12,
                   help="active tokens sampled uniformly per latent (0: none), shown in quantile groups")
    p.add_argument("--quantile-groups", metavar="N", type=int, default=3, help="activation quantile bands of the samples")
    p.add_argument("--window-before", metavar="N", type=int, default=20, help="tokens shown before the peak")
    p.add_argument("--window-after", metavar="N", type=int, default=6, help="tokens shown after the peak")
    p.add_argument("--logit-tokens", metavar="N", type=int, default=10,
                   help="tokens in each direct logit effect table (0: no logit effects)")
    p.add_argument("--seed", metavar="N", type=int, default=0, help="seed of the sampling")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="write <DIR>/<name>/{analysis,dashboard} instead of into each run folder")
    p.add_argument("--held-out-only", action="store_true",
                   help="analyse only the run's held-out split (the contexts it never trained on, what eval.json "
                        "measured) instead of the default corpus")
    p.add_argument("--nearest", metavar="N", type=int, default=8,
                   help="nearest latents of the same SAE by decoder cosine listed per latent (0: none)")
    _tokens_help(p)
    p.description += (" 'python -m trainer.analyze probe RUN TEXT' shows which latents fire on which tokens of a text "
                      "(python -m trainer.analyze probe --help).")
    return show_defaults(p)


def _tokens_help(p: argparse.ArgumentParser) -> None:
    """The analysis reads a larger corpus than the run's held-out split by default: say so in --tokens."""
    for a in p._actions:
        if a.dest == "tokens":
            a.help = (f"corpus size in tokens (whole contexts): the run's held-out split first (never trained on), "
                      f"then every eval_every-th context of its data continued past the split, then the same rule at "
                      f"the other offsets; default: the larger of the run's eval_tokens and {DEFAULT_CONTEXTS} "
                      "contexts, as far as the data goes")


def _check(args) -> None:
    for name, low in (("top", 1), ("samples", 0), ("quantile_groups", 1), ("window_before", 0), ("window_after", 0),
                      ("logit_tokens", 0), ("batch_size", 1), ("tokens", 1), ("context_len", 2), ("nearest", 0)):
        v = getattr(args, name, None)
        if v is not None and v < low:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= {low}, got {v}")


def analyze(argv_args, log=print) -> Dict[str, Any]:
    args = argv_args
    _check(args)
    t0 = time.perf_counter()
    specs = [resolve_run(r) for r in args.runs]
    members = [m for s in specs for m in s.members]
    keys = [m.key for m in members]
    if len(set(keys)) != len(keys):
        raise RunError("RUN: the same SAE folder was given twice")
    device = device_of(args.device)
    log(f"loading the model for {len(members)} SAE(s) ...")
    lm, settings = load_lm_for(members, args.model, device)
    corpus = analysis_contexts(settings, lm, dataset=args.dataset, tokens=args.tokens, context_len=args.context_len,
                               dataset_config=args.dataset_config, split=args.split, text_column=args.text_column,
                               held_out_only=getattr(args, "held_out_only", False))
    log(f"corpus: {corpus.info['n_contexts']} contexts x {corpus.info['context_len']} tokens "
        f"({corpus.info['tokens']} non-special, {corpus.info['documents']} documents; {corpus.info['rule']})")
    cfg = PassConfig(top_n=args.top, samples=args.samples, before=args.window_before, after=args.window_after,
                     seed=args.seed)
    saes = {m.key: (m.load_sae(device=device), m.layer, m.position) for m in members}
    batch = args.batch_size or int(settings.get("lm_batch_size") or 4)
    t_pass = time.perf_counter()
    stats, secs = analysis_pass(lm, saes, corpus.contexts, corpus.special_ids, cfg, batch_size=batch,
                                progress=args.progress)
    t_done = time.perf_counter()
    log(f"pass over {secs['tokens']} tokens: {t_done - t_pass:.1f}s (LM forwards {secs['lm_s']:.1f}s, "
        f"SAE encoding and statistics {secs['sae_s']:.1f}s)")
    W_U, gamma = unembedding(lm.model) if args.logit_tokens else (None, None)
    out_root = Path(args.output) if args.output else None
    dirs = {}
    for m in members:
        base = (out_root / m.name) if out_root else m.folder
        dirs[m.key] = (base / "analysis", base / "dashboard")
    suite_specs = [s for s in specs if s.is_suite]
    page_members = [{"key": m.key, "name": m.name, "dashboard": dirs[m.key][1]} for m in members]
    results: Dict[str, Any] = {}
    for m in members:
        sae = saes[m.key][0]
        t_l = time.perf_counter()
        logits = logit_effects(sae.W_dec.detach(), W_U, gamma, top=args.logit_tokens) if W_U is not None else None
        t_l = time.perf_counter() - t_l
        n_near = getattr(args, "nearest", 0)
        t_n = time.perf_counter()
        nearest = nearest_latents(sae.W_dec.detach(), n_near, block=4096 if device.type == "cuda" else 1024) \
            if n_near and sae.cfg.d_sae > 1 else None
        t_n = time.perf_counter() - t_n
        a_dir, d_dir = dirs[m.key]
        meta = {
            "sae": {"name": m.name, "folder": str(m.folder), "layer": m.layer, "position": m.position,
                    "d_model": sae.cfg.d_model, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k,
                    "activation": sae.cfg.activation, "hook_point_in": m.hyper.get("hook_point_in"),
                    "hook_point_out": m.hyper.get("hook_point_out"),
                    "eval": {k: m.eval[k] for k in EVAL_KEYS if k in m.eval}},
            "model": lm.name, "corpus": corpus.info,
            "seconds": {"pass": round(t_done - t_pass, 3), "lm": round(secs["lm_s"], 3),
                        "sae": round(secs["sae_s"], 3), "logits": round(t_l, 3), "nearest": round(t_n, 3)},
        }
        summary = export_member(a_dir, stats[m.key], cfg, corpus.contexts, meta, logits, lm.tokenizer,
                                args.quantile_groups, args.logit_tokens,
                                on_chunk=lambda name, text, d=d_dir: write_data(d, name, text), docs=corpus.docs,
                                nearest=nearest)
        suite = next((s for s in suite_specs if m in s.members), None)
        links = member_links(d_dir, m.key, page_members,
                             (suite.path / "dashboard" / "index.html") if suite and not out_root else None)
        page = write_member_page(d_dir, m.name, links)
        results[m.key] = {"name": m.name, "layer": m.layer, "position": m.position, "d_sae": sae.cfg.d_sae,
                          "dead": summary["density"]["dead"], "live": summary["density"]["live"],
                          "eval": m.eval, "dashboard": d_dir, "page": page}
        log(f"{m.name}: {summary['density']['live']} live, {summary['density']['dead']} dead latents -> "
            f"{page.resolve().as_uri()}")
        for line in example_report(summary, args.top):
            log(f"{m.name}: {line}")
    for s in suite_specs:
        rows = [results[m.key] for m in s.members]
        idx = write_suite_page(s.path if not out_root else out_root, f"Suite {s.path.name}", rows)
        log(f"suite {s.path}: {idx.resolve().as_uri()}")
    return {"seconds": {"total": time.perf_counter() - t0, "pass": t_done - t_pass, **secs}, "members": results,
            "corpus": corpus.info}


def example_report(summary: Dict[str, Any], top: int) -> List[str]:
    """How many examples the live latents got, and the latents one document dominates (the log's lines)."""
    L = summary["latents"]
    live = [i for i, c in enumerate(L["count"]) if c]
    if not live:
        return []
    ex = sorted(L["examples"][i] for i in live)
    full = sum(1 for e in ex if e >= top)
    out = [f"top examples per live latent: median {ex[len(ex) // 2]}, minimum {ex[0]}; {full} of {len(live)} live "
           f"latents have all {top} (--top)"]
    dom = summary.get("dominated") or []
    if dom:
        out.append(f"warning: {len(dom)} latents have more than {DOMINANT_SHARE:.0%} of their top examples from one "
                   f"document (of {summary['corpus'].get('documents', '?')}; features.json 'dominated', marked on the "
                   "dashboard): their examples may show that document more than the latent")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from .compare_cli import main as compare_main

        return compare_main(argv[1:])
    if argv and argv[0] == "probe":
        from .probe import main as probe_main

        return probe_main(argv[1:])
    return run_cli(analyze, build_parser().parse_args(argv))
