"""``python -m trainer.analyze probe RUN "some text"``: which latents fire on which tokens of a text.

The text is tokenised with the run's LM (BOS first when the run used one), the LM runs once (up to the
deepest layer the SAEs read) and every SAE of RUN (a run folder or a suite folder) encodes each token.
Printed: per SAE and token, its ``--latents`` most active latents (id and activation). Written: a page,
``<member>/dashboard/probe.html`` for each SAE (or one page for all at ``--output``), showing the text
with the latents of each token; clicking a latent shades the text by its activation, and each latent
links into the SAE's dashboard (``index.html#latent=N``) when that dashboard exists (labelled with its
top tokens from the analysis). ``probe.json`` beside the page holds the same numbers::

    {"format": "sae-kernels-probe/1", "text", "model", "tokens": [id...], "texts": [str...],
     "saes": [{"name", "folder", "dashboard" (the page's relative link to it, or null),
               "codes": [[[latent, activation]...] per token, most active first; [] for special tokens],
               "labels": {latent: [top token texts]} (from the analysis, when present)}]}
"""
from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from sae_kernels.atomic import atomic_write_text

from ..cli.common import device_of, run_cli, show_defaults
from .dashboard import asset, page, rel
from .export import latent_tokens, r4
from .features import _encode, capture_points
from .runs import load_lm_for, resolve_run

try:  # the package's parser (no prefix matching, one-line errors), where this checkout has it
    from ..cli.common import Parser
except ImportError:  # pragma: no cover
    Parser = argparse.ArgumentParser

FORMAT = "sae-kernels-probe/1"
CODES_KEPT = 16  # latents per token kept in the page and probe.json (the page's shading and lists)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m trainer.analyze probe",
        description="Encode a text with every SAE of RUN: print the most active latents of each token and write a "
                    "page (<member>/dashboard/probe.html) showing them, linked into the SAE's dashboard.")
    p.add_argument("run", metavar="RUN", help="run folder or suite folder (as for python -m trainer.analyze)")
    p.add_argument("text", metavar="TEXT", nargs="?", default=None, help="the text ('-': read it from stdin)")
    p.add_argument("--file", metavar="PATH", default=None, help="read the text from this file instead")
    p.add_argument("--latents", metavar="N", type=int, default=5, help="latents printed per token")
    p.add_argument("--output", metavar="FILE", default=None,
                   help="write one page for all the SAEs here (probe.json beside it) instead of "
                        "<member>/dashboard/probe.html")
    p.add_argument("--model", metavar="M", default=None,
                   help="the LM (default: the run's own, from train_config.json / lm_config.json)")
    p.add_argument("--device", metavar="S", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'")
    return show_defaults(p)


def _text(args) -> str:
    if args.file is not None:
        if args.text is not None:
            raise ValueError("TEXT and --file: give one of them")
        try:
            return Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--file {args.file!r}: cannot read it as UTF-8 text ({e})") from None
    if args.text is None:
        raise ValueError("TEXT: expected the text to probe (or --file PATH, or '-' to read stdin)")
    return sys.stdin.read() if args.text == "-" else args.text


def _labels(dash: Path, ids: List[int], n: int = 3) -> Dict[str, List[str]]:
    """Top tokens (peak tokens of the top examples) of latents ``ids`` from the member's analysis."""
    return latent_tokens(dash.parent / "analysis" / "features.json", ids, n) or {}


@torch.no_grad()
def probe(args, log=print, out=None) -> Dict[str, Any]:
    out = out or sys.stdout
    if args.latents < 1:
        raise ValueError(f"--latents: expected an integer >= 1, got {args.latents}")
    text = _text(args)
    if not text.strip():
        raise ValueError("TEXT: the text is empty")
    page_path = Path(args.output) if args.output else None
    if page_path is not None and page_path.suffix.lower() == ".json":
        raise ValueError(f"--output {args.output!r}: expected the page's path (e.g. probe.html); its data go beside it")
    spec = resolve_run(args.run)
    members = spec.members
    device = device_of(args.device)
    lm, settings = load_lm_for(members, args.model, device)
    tok = lm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    use_bos = settings.get("use_bos", True)
    bos = getattr(tok, "bos_token_id", None)
    if use_bos and bos is not None:
        ids = [bos] + list(ids)
    max_pos = getattr(getattr(lm.model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and len(ids) > max_pos:
        raise ValueError(f"TEXT: {len(ids)} tokens, but the model takes at most {max_pos}")
    texts = []
    for t in ids:
        try:
            texts.append(tok.decode([t]))
        except Exception:  # noqa: BLE001 - a tokenizer that cannot decode one id alone
            texts.append(f"<{t}>")
    x = torch.tensor([ids], dtype=torch.int64, device=lm.device)
    from ..data.lm import run_capture, special_mask

    special = sorted(set(lm.special_ids) | ({bos} if bos is not None else set()))
    keep = ~special_mask(x, special)[0]
    points = sorted({(m.layer, m.position) for m in members})
    with capture_points(lm.model, points) as (store, hook):
        run_capture(getattr(lm.model, "model", lm.model), x, store)
        acts = {pt: store[h][0][keep] for pt, h in hook.items()}
    saes = []
    for m in members:
        sae = m.load_sae(device=device)
        v, i = _encode(sae, acts[(m.layer, m.position)])
        v, order = v.sort(dim=1, descending=True)
        i = i.gather(1, order)
        kpos = keep.nonzero().squeeze(1).tolist()
        codes: List[List[List[float]]] = [[] for _ in ids]
        for row, p in enumerate(kpos):
            codes[p] = [[int(a), r4(float(b))] for a, b in zip(i[row, :CODES_KEPT].tolist(), v[row, :CODES_KEPT].tolist())
                        if b > 0]
        dash = m.folder / "dashboard"
        where = page_path.parent if page_path else dash
        link = rel(dash / "index.html", where) if (dash / "index.html").is_file() else None
        used = sorted({c[0] for row in codes for c in row})
        saes.append({"name": m.name, "folder": str(m.folder), "dashboard": link, "codes": codes,
                     "labels": _labels(dash, used), "analysed": (m.folder / "analysis" / "features.json").is_file()})
        print(f"{m.name} (layer {m.layer} {m.position}, {sae.cfg.d_sae} latents): the {args.latents} most active latents "
              "per token, as id (activation)", file=out)
        for p, t in enumerate(ids):
            row = codes[p][:args.latents]
            lat = "  ".join(f"{a} ({b:.3g})" for a, b in row) if row else ("(special token: not encoded)"
                                                                           if not bool(keep[p]) else "(none)")
            print(f"{p:>5} {json.dumps(texts[p], ensure_ascii=False):<18} {lat}", file=out)
    doc = {"format": FORMAT, "text": text, "model": lm.name, "tokens": ids, "texts": texts, "saes": saes}
    pages = []
    if page_path:
        pages.append(write_probe_page(page_path, doc))
    else:
        for s in saes:
            m = next(mm for mm in members if str(mm.folder) == s["folder"])
            pages.append(write_probe_page(m.folder / "dashboard" / "probe.html", dict(doc, saes=[s])))
    for pg in pages:
        log(f"probe page: {pg.resolve().as_uri()}")
    if any(not s["analysed"] for s in saes):
        log("note: " + ", ".join(s["name"] for s in saes if not s["analysed"]) + " not analysed yet: the page lists "
            f"latent ids only (run python -m trainer.analyze {args.run} for their dashboards and top tokens)")
    return {"doc": doc, "pages": pages}


def write_probe_page(path: Path, doc: Dict[str, Any]) -> Path:
    """The probe page at ``path`` and ``probe.json`` beside it."""
    path = Path(path)
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    atomic_write_text(path.with_name(path.stem + ".json"), text)
    body = (f'<header id="head"><h1>Probe: {html.escape(", ".join(s["name"] for s in doc["saes"]))}</h1></header>\n'
            '<main id="probe" style="grid-template-columns:1fr"></main>')
    atomic_write_text(path, page(f"Probe - {', '.join(s['name'] for s in doc['saes'])}", body,
                                 [asset("probe.js"), f"SAEProbe.start({text});"], [], ""))
    return path


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(probe, build_parser().parse_args(argv))
