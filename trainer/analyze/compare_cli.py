"""``python -m trainer.analyze compare RUN_A RUN_B``: feature geometry across two SAEs (see ``compare.py``).

Writes ``RUN_A/analysis/compare-<B>.json`` (format below), two figures beside it
(``compare-<B>-similarity.svg``, ``compare-<B>-map.svg``) and ``RUN_A/dashboard/compare-<B>.html``,
linked from RUN_A's dashboard (and to RUN_B's latents when RUN_B has a dashboard).

``compare-<B>.json``::

    format              "sae-kernels-compare/1"
    a, b                name, folder, d_sae, layer, position of each SAE
    parent              "a" or "b": the narrower SAE, whose latents head the families
    threshold, family_max, corpus (co-firing counts were taken on it; null with --no-cofire)
    a_best, b_best      {"ids", "cos"}: each latent's most similar decoder direction in the other SAE
    hist                {"edges", "a_to_b", "b_to_a"}: histograms of those best cosines; with co-firing also
                        "a_to_b_live", "b_to_a_live": over the latents active on the corpus only
    median_best_cos     medians of the same (all latents, and "_live")
    same_index_best     latents i of A whose best match in B is latent i (many: the SAEs share an initialisation)
    families_of         "latents active on the corpus" (with co-firing: dead parents and children left out)
                        or "all latents" (--no-cofire)
    families            [{"parent", "parent_count", "any_child_rate", "capped",
                          "children": [[id, cos, cofire, p_child_given_parent, p_parent_given_child]]}]
                        parents with at least one child of cosine >= threshold, largest families first
    links               {"a", "b"}: the page's relative link to each SAE's dashboard, null where it has none
    tokens              {"a", "b"}: {latent id: top tokens} for the latents of the families the page lists, from
                        each SAE's analysis (features.json peak tokens); null for an SAE not analysed
    analysed            {"a", "b"}: whether each SAE had an analysis; analyse_hint: the command that makes one
    map                 {"method": "pca" | "umap", "explained": [..] (pca), "a": [[x, y]], "b": [[x, y]],
                         "fitted_on", "dead_a", "dead_b" (ids never active on the corpus; null without it)}
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from sae_kernels.atomic import atomic_write_text

from ..cli.common import Parser, add_corpus_args, device_of, run_cli, show_defaults
from .compare import blocked_matches, cofire_counts, families, pca_2d, umap_2d, unit_rows
from .corpus import analysis_contexts
from .dashboard import asset, page, rel, write_data
from .export import latent_tokens, r4, write_json
from .features import _encode, capture_points
from .runs import RunError, load_lm_for, resolve_run
from .svg import PALETTE, Figure

FORMAT = "sae-kernels-compare/1"
FAMILIES_SHOWN = 500  # families the page lists (the JSON keeps all)
HIST_EDGES = [round(-0.2 + 0.025 * i, 3) for i in range(49)]  # cosine -0.2 .. 1.0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(  # no prefix matching; one-line errors, suggestions for typos
        prog="python -m trainer.analyze compare",
        description="Compare the decoder directions of two SAEs (e.g. L12R-8x and L12R-32x): best cosine matches "
                    "both ways and their histograms, feature-splitting families (a latent of the narrower SAE and the "
                    "wider SAE's latents above --threshold) with how often they co-fire on a corpus, and a 2-D map. "
                    "Writes RUN_A/analysis/compare-<B>.json, two SVG figures and RUN_A/dashboard/compare-<B>.html.")
    p.add_argument("run_a", metavar="RUN_A", help="the first SAE's run folder (outputs go here)")
    p.add_argument("run_b", metavar="RUN_B", help="the second SAE's run folder")
    p.add_argument("--threshold", metavar="X", type=float, default=0.6,
                   help="cosine at or above which a wide latent joins a narrow latent's family")
    p.add_argument("--family-max", metavar="N", type=int, default=16,
                   help="most similar wide latents searched per narrow latent (a full family says 'capped')")
    p.add_argument("--map", choices=("auto", "pca", "umap"), default="auto",
                   help="2-D map of the decoder directions: PCA, or UMAP (needs umap-learn); auto: UMAP when installed")
    p.add_argument("--map-points", metavar="N", type=int, default=2000,
                   help="points per SAE drawn in the SVG map figure (the dashboard shows all)")
    p.add_argument("--cofire", action=argparse.BooleanOptionalAction, default=True,
                   help="count co-firing on the corpus (one LM pass; --no-cofire skips the LM)")
    p.add_argument("--block", metavar="N", type=int, default=None,
                   help="latents of A per block of cosines (default 4096 on GPU, 1024 on CPU)")
    p.add_argument("--held-out-only", action="store_true",
                   help="count co-firing on the run's held-out split only (default: the corpus python -m "
                        "trainer.analyze reads by default, so that both agree on which latents are dead)")
    p.add_argument("--family-tokens", metavar="N", type=int, default=3,
                   help="top tokens shown per latent in the families (from each SAE's analysis, when it has one)")
    add_corpus_args(p)
    return show_defaults(p)


def _one(path: str, flag: str):
    spec = resolve_run(path, flag)
    if len(spec.members) != 1:
        raise RunError(f"{flag} {path!r}: expected one SAE folder, got a suite of {len(spec.members)}; "
                       f"name a member, e.g. {spec.members[0].folder}")
    return spec.members[0]


def _slug(m, other) -> str:
    return m.name if m.name != other.name else f"{m.folder.parent.name}-{m.name}"


@torch.no_grad()
def compare(args, log=print) -> Dict[str, Any]:
    t0 = time.perf_counter()
    if not 0 < args.threshold <= 1:
        raise ValueError(f"--threshold: expected a cosine in (0, 1], got {args.threshold}")
    if args.family_max < 1 or args.map_points < 1:
        raise ValueError("--family-max and --map-points: expected integers >= 1")
    if getattr(args, "family_tokens", 3) < 0:
        raise ValueError(f"--family-tokens: expected an integer >= 0, got {args.family_tokens}")
    ma, mb = _one(args.run_a, "RUN_A"), _one(args.run_b, "RUN_B")
    if ma.folder.resolve() == mb.folder.resolve():
        raise RunError("RUN_A and RUN_B: expected two different SAE folders")
    device = device_of(args.device)
    sa, sb = ma.load_sae(device=device), mb.load_sae(device=device)
    if sa.cfg.d_model != sb.cfg.d_model:
        raise RunError(f"RUN_A, RUN_B: d_model {sa.cfg.d_model} and {sb.cfg.d_model} differ: no shared directions")
    Da, Db = unit_rows(sa.W_dec), unit_rows(sb.W_dec)
    parent = "a" if sa.cfg.d_sae <= sb.cfg.d_sae else "b"
    P, C = (Da, Db) if parent == "a" else (Db, Da)
    block = args.block or (4096 if device.type == "cuda" else 1024)
    m = blocked_matches(P, C, top=args.family_max, block_a=block, block_b=4 * block)
    t_match = time.perf_counter() - t0
    p_best = (m["a_top_ids"][:, 0], m["a_top_cos"][:, 0])
    c_best = (m["b_best_id"], m["b_best_cos"])
    a_best, b_best = (p_best, c_best) if parent == "a" else (c_best, p_best)
    fam = families(m["a_top_ids"], m["a_top_cos"], args.threshold)
    log(f"matches: {sa.cfg.d_sae} x {sb.cfg.d_sae} cosines in blocks of {block} x {4 * block} ({t_match:.1f}s)")
    # SAEs initialised from one random stream (the same seed, one width a prefix of the other's rows) share
    # their first rows' initial directions: latents that barely move keep a same-index twin
    n_min = min(sa.cfg.d_sae, sb.cfg.d_sae)
    same_index = int((a_best[0][:n_min] == torch.arange(n_min, device=a_best[0].device)).sum())
    if same_index > max(10, 0.01 * n_min):
        log(f"note: {same_index} of the first {n_min} latents of {ma.name} have their best match at the same index in "
            f"{mb.name}: the two SAEs probably started from the same initial directions (the same --seed); "
            "those pairs reflect the initialisation as much as what was learned")

    corpus_info = None
    cof = torch.zeros(fam["parent"].numel(), dtype=torch.int64, device=device)
    any_hit = torch.zeros(P.shape[0], dtype=torch.int64, device=device)
    n_par = torch.zeros(P.shape[0], dtype=torch.int64, device=device)
    n_chi = torch.zeros(C.shape[0], dtype=torch.int64, device=device)
    if args.cofire:
        lm, settings = load_lm_for([ma, mb], args.model, device)
        corpus = analysis_contexts(settings, lm, dataset=args.dataset, tokens=args.tokens,
                                   context_len=args.context_len, dataset_config=args.dataset_config,
                                   split=args.split, text_column=args.text_column,
                                   held_out_only=getattr(args, "held_out_only", False))
        corpus_info = corpus.info
        pts = [(ma.layer, ma.position), (mb.layer, mb.position)]
        sp, sc = (sa, sb) if parent == "a" else (sb, sa)
        pp, pc = (pts[0], pts[1]) if parent == "a" else (pts[1], pts[0])
        base = getattr(lm.model, "model", lm.model)
        from ..data.lm import run_capture, special_mask

        bs = args.batch_size or int(settings.get("lm_batch_size") or 4)
        with capture_points(lm.model, pts) as (store, hook):
            for s in range(0, len(corpus.contexts), bs):
                ids = corpus.contexts[s:s + bs].to(lm.device)
                run_capture(base, ids, store)
                keep = ~special_mask(ids, corpus.special_ids)
                cp = _encode(sp, store[hook[pp]][keep])
                cc = _encode(sc, store[hook[pc]][keep])
                counts, anyc = cofire_counts(cp, cc, fam["parent"], fam["child"], n_parent=P.shape[0])
                cof += counts
                any_hit += anyc
                n_par += torch.bincount(cp[1][cp[0] > 0], minlength=P.shape[0])
                n_chi += torch.bincount(cc[1][cc[0] > 0], minlength=C.shape[0])
        log(f"co-firing on {corpus.info['tokens']} tokens ({time.perf_counter() - t0:.1f}s so far)")

    # families, largest first
    off = fam["offsets"].tolist()
    child, cos, capped = fam["child"].tolist(), fam["cos"].tolist(), fam["capped"].tolist()
    cof_l, n_par_l, n_chi_l, any_l = cof.tolist(), n_par.tolist(), n_chi.tolist(), any_hit.tolist()
    fams = []
    for i in range(P.shape[0]):
        a, b = off[i], off[i + 1]
        if a == b or (args.cofire and not n_par_l[i]):  # with co-firing measured: live parents ...
            continue
        kids = []
        for j in range(a, b):
            if args.cofire and not n_chi_l[child[j]]:  # ... and live children only
                continue
            pc_ = cof_l[j] / n_par_l[i] if args.cofire and n_par_l[i] else None
            cp_ = cof_l[j] / n_chi_l[child[j]] if args.cofire and n_chi_l[child[j]] else None
            kids.append([child[j], r4(cos[j]), cof_l[j] if args.cofire else None,
                         None if pc_ is None else r4(pc_), None if cp_ is None else r4(cp_)])
        fams.append({"parent": i, "parent_count": n_par_l[i] if args.cofire else None,
                     "any_child_rate": r4(any_l[i] / n_par_l[i]) if args.cofire and n_par_l[i] else None,
                     "capped": bool(capped[i]), "children": kids})
        if not kids:
            fams.pop()
    fams.sort(key=lambda f: (-len(f["children"]), -sum(k[1] for k in f["children"]), f["parent"]))

    # map
    method = args.map
    X = torch.cat([Da, Db])
    coords = None
    if method in ("auto", "umap"):
        coords = umap_2d(X)
        if coords is None and method == "umap":
            raise ValueError("--map umap: the umap-learn package is not installed (pip install umap-learn)")
        method = "umap" if coords is not None else "pca"
    live_a = live_b = None
    if args.cofire:  # liveness on the corpus: dead latents keep their initial directions, which the map fits around
        live_p, live_c = n_par > 0, n_chi > 0
        live_a, live_b = (live_p, live_c) if parent == "a" else (live_c, live_p)
    explained = None
    if coords is None:
        fit = torch.cat([live_a, live_b]) if live_a is not None and int(live_a.sum() + live_b.sum()) >= 3 else None
        coords, explained = pca_2d(X, fit=fit)
    coords = coords.cpu()
    ca, cb = coords[:Da.shape[0]], coords[Da.shape[0]:]

    def hist(v):
        return torch.histc(v.float().cpu().clamp(HIST_EDGES[0], HIST_EDGES[-1] - 1e-6), bins=len(HIST_EDGES) - 1,
                           min=HIST_EDGES[0], max=HIST_EDGES[-1]).long().tolist()

    def med(v):
        return r4(float(v.float().median())) if v.numel() else None

    slug = _slug(mb, ma)
    doc = {
        "format": FORMAT,
        "a": {"name": ma.name, "folder": str(ma.folder), "d_sae": sa.cfg.d_sae, "layer": ma.layer, "position": ma.position},
        "b": {"name": mb.name, "folder": str(mb.folder), "d_sae": sb.cfg.d_sae, "layer": mb.layer, "position": mb.position},
        "parent": parent, "threshold": args.threshold, "family_max": args.family_max, "corpus": corpus_info,
        "a_best": {"ids": a_best[0].tolist(), "cos": [r4(c) for c in a_best[1].tolist()]},
        "b_best": {"ids": b_best[0].tolist(), "cos": [r4(c) for c in b_best[1].tolist()]},
        "hist": {"edges": HIST_EDGES, "a_to_b": hist(a_best[1]), "b_to_a": hist(b_best[1]),
                 **({"a_to_b_live": hist(a_best[1][live_a]), "b_to_a_live": hist(b_best[1][live_b])}
                    if live_a is not None else {})},
        "median_best_cos": {"a_to_b": med(a_best[1]), "b_to_a": med(b_best[1]),
                            **({"a_to_b_live": med(a_best[1][live_a]), "b_to_a_live": med(b_best[1][live_b])}
                               if live_a is not None else {})},
        "same_index_best": same_index,
        "families_of": "latents active on the corpus" if args.cofire else "all latents",
        "families": fams,
        "map": {"method": method, "explained": None if explained is None else [r4(e) for e in explained.tolist()],
                "a": [[round(x, 3), round(y, 3)] for x, y in ca.tolist()],
                "b": [[round(x, 3), round(y, 3)] for x, y in cb.tolist()],
                "fitted_on": "live latents (active on the corpus)" if live_a is not None and method == "pca" else "all latents",
                "dead_a": None if live_a is None else (~live_a).nonzero().squeeze(1).tolist(),
                "dead_b": None if live_b is None else (~live_b).nonzero().squeeze(1).tolist()},
        "links": {},
        "seconds": {"matches": round(t_match, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    a_dir = Path(args.output) if getattr(args, "output", None) else ma.folder
    an, dash = a_dir / "analysis", a_dir / "dashboard"
    b_dash = mb.folder / "dashboard" / "index.html"
    # link a dashboard only where one exists (the page says how to make the others)
    doc["links"] = {"a": "index.html" if (dash / "index.html").is_file() else None,
                    "b": rel(b_dash, dash) if b_dash.is_file() else None}
    shown = fams[:FAMILIES_SHOWN]
    want = {parent: {f["parent"] for f in shown},
            ("b" if parent == "a" else "a"): {k[0] for f in shown for k in f["children"]}}
    doc["tokens"], doc["analysed"] = {}, {}
    for w, mm in (("a", ma), ("b", mb)):
        doc["tokens"][w] = latent_tokens(mm.folder / "analysis" / "features.json", sorted(want[w]),
                                         getattr(args, "family_tokens", 3))
        doc["analysed"][w] = doc["tokens"][w] is not None
    doc["analyse_hint"] = {w: f"python -m trainer.analyze {mm.folder}" for w, mm in (("a", ma), ("b", mb))}
    text = write_json(an / f"compare-{slug}.json", doc)
    write_data(dash, f"compare-{slug}", text)
    figs = write_figures(an, slug, doc, args.map_points)
    html_path = dash / f"compare-{slug}.html"
    body = '<header id="head"></header>\n<main style="grid-template-columns:1fr 1fr" id="cmp"></main>'
    atomic_write_text(html_path, page(f"{ma.name} vs {mb.name}", body, [asset("compare.js")],
                                      [f"data/compare-{slug}.js"], f"SAECompare.start({json.dumps('compare-' + slug)});"))
    _register(dash, {"name": mb.name, "href": html_path.name})
    mc = doc["median_best_cos"]
    live = (f" (live latents: {mc['a_to_b_live']:.3f}, {mc['b_to_a_live']:.3f})"
            if "a_to_b_live" in mc and mc["a_to_b_live"] is not None and mc["b_to_a_live"] is not None else "")
    log(f"{ma.name} vs {mb.name}: median best cosine A->B {mc['a_to_b']:.3f}, B->A {mc['b_to_a']:.3f}{live}; "
        f"{len(fams)} families at cosine >= {args.threshold} among {doc['families_of']} -> {html_path.resolve().as_uri()}")
    return {"doc": doc, "json": an / f"compare-{slug}.json", "page": html_path, "figures": figs}


def _register(dash: Path, entry: Dict[str, str]) -> None:
    """Add the comparison to ``dash/data/compares.js`` (the member page's list of comparisons)."""
    f = dash / "data" / "compares.js"
    items: List[Dict[str, str]] = []
    if f.is_file():
        t = f.read_text(encoding="utf-8")
        try:
            items = json.loads(t[t.index(",") + 1:t.rindex(")")])
        except ValueError:
            items = []
    items = [i for i in items if i.get("href") != entry["href"]] + [entry]
    write_data(dash, "compares", json.dumps(items))


def write_figures(an: Path, slug: str, doc: Dict[str, Any], max_points: int) -> List[Path]:
    a, b = doc["a"]["name"], doc["b"]["name"]
    h = doc["hist"]
    live = "_live" if "a_to_b_live" in h else ""  # latents dead on the corpus keep their initial directions
    top = max(max(h["a_to_b" + live]), max(h["b_to_a" + live]), 1)
    f = Figure(f"Best decoder-cosine match: {a} vs {b}", "cosine similarity of the best match", "latents",
               (h["edges"][0], h["edges"][-1]), (0, top * 1.08))
    f.bars(h["edges"], h["a_to_b" + live], PALETTE[0], f"{a}{' live' if live else ''} -> best in {b}", opacity=0.6)
    f.bars(h["edges"], h["b_to_a" + live], PALETTE[1], f"{b}{' live' if live else ''} -> best in {a}", opacity=0.6)
    out1 = an / f"compare-{slug}-similarity.svg"
    atomic_write_text(out1, f.svg())
    pa, pb = doc["map"]["a"], doc["map"]["b"]
    g = torch.Generator().manual_seed(0)

    def pick(pts):
        if len(pts) <= max_points:
            return pts
        idx = torch.randperm(len(pts), generator=g)[:max_points].sort().values.tolist()
        return [pts[i] for i in idx]

    dead = set(("a", i) for i in doc["map"].get("dead_a") or []) | set(("b", i) for i in doc["map"].get("dead_b") or [])
    grey = [p for w, pts in (("a", pa), ("b", pb)) for i, p in enumerate(pts) if (w, i) in dead]
    sa = pick([p for i, p in enumerate(pa) if ("a", i) not in dead])
    sb = pick([p for i, p in enumerate(pb) if ("b", i) not in dead])
    sg = pick(grey)
    shown = sa + sb or pa + pb
    xs = [p[0] for p in shown] or [0.0]
    ys = [p[1] for p in shown] or [0.0]
    pad_x, pad_y = (max(xs) - min(xs)) * 0.04 + 1e-6, (max(ys) - min(ys)) * 0.04 + 1e-6
    method = doc["map"]["method"].upper()
    ex = doc["map"].get("explained")
    lab = (f" ({ex[0] * 100:.1f}% / {ex[1] * 100:.1f}% of variance)" if ex else "")
    f2 = Figure(f"Decoder directions, {method}{lab}", f"{method} 1" + (" (fitted on live latents)" if dead and ex else ""),
                f"{method} 2",
                (min(xs) - pad_x, max(xs) + pad_x), (min(ys) - pad_y, max(ys) + pad_y), width=560, height=460)
    n_da, n_db = len(doc["map"].get("dead_a") or []), len(doc["map"].get("dead_b") or [])
    if sg:
        f2.points([p[0] for p in sg], [p[1] for p in sg], "#b9bec5", f"dead ({n_da + n_db})", r=1.0, opacity=0.35)
    f2.points([p[0] for p in sb], [p[1] for p in sb], PALETTE[1], f"{b} ({len(pb) - n_db} live)" if dead else f"{b} ({len(pb)})",
              r=1.3, opacity=0.45)
    f2.points([p[0] for p in sa], [p[1] for p in sa], PALETTE[0], f"{a} ({len(pa) - n_da} live)" if dead else f"{a} ({len(pa)})",
              r=1.5, opacity=0.6)
    out2 = an / f"compare-{slug}-map.svg"
    atomic_write_text(out2, f2.svg())
    return [out1, out2]


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.output = None
    return run_cli(compare, args)
