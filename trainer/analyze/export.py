"""The analysis data: plain JSON, one summary per SAE and its latents in chunks.

``<member>/analysis/features.json`` (the summary)::

    format         "sae-kernels-analysis/1"
    sae            name, folder, layer, position, d_model, d_sae, k, activation, hook_point_in/out,
                   eval (the run's eval.json headline metrics, when present)
    model, corpus  what was run: the LM, and the contexts (dataset, n_contexts, context_len,
                   tokens = non-special tokens encoded, rule = how the contexts were chosen,
                   held_out = exactly the run's held-out split, held_out_contexts = how many of the
                   first contexts are that split (never trained on), documents = distinct documents)
    settings       top_n, samples, quantile_groups, window_before, window_after, logit_tokens, seed,
                   nearest
    conventions    one sentence per quantity (units, ties, what "dead" means)
    latents        columnar arrays over all d_sae latents: count, frequency, mean, max,
                   peak_tokens (token ids at the peaks of the first 5 top examples; for search),
                   logit_tokens, score and concentration (the default order, ``order.py``),
                   examples (top examples shown), docs (distinct documents among them), doc_max
                   (the most from one document)
    order          {"default": "score", "band", "definition"}: how the dashboard orders latents
    dead           ids of latents with no activation on the corpus
    dominated      ids of latents with at least 3 examples, more than half from one document
    density        histogram of log10(frequency) over the live latents: edges, counts
    hist_edges     the edges of every per-latent activation histogram (log-spaced)
    vocab          {token id: text} for every token id the files use
    chunks         {"size": 256, "files": ["latents/00000.json", ...]}
    seconds        pass, lm (its LM forwards), sae (encoding and statistics), logits

``<member>/analysis/density.svg``: the density histogram as a figure.

``<member>/analysis/latents/NNNNN.json`` (chunk of ``size`` latents from ``first``)::

    {"first": 0, "latents": [{"id", "top": [context...], "samples": [group...], "hist", "logits",
                              "nearest"}]}
    context   {"ctx", "pos", "value", "start", "tokens": [ids], "acts": [...], "doc"}: context ``ctx`` of
              the corpus, peak at token position ``pos`` with activation ``value``; ``tokens[j]`` and
              ``acts[j]`` are the token and this latent's activation at position ``start + j``; ``doc``
              the document of the peak token (index in the data's document order)
    group     {"quantile": [q0, q1], "range": [lo, hi], "items": [context...]}: samples whose activation
              lies in that quantile band of the latent's sampled activations (``pos`` = the sampled token)
    hist      {"first_bin", "counts"}: counts of active tokens in bins first_bin, first_bin+1, ...
    logits    {"top": [[id, effect]...], "bottom": [[id, effect]...]}: direct logit effect per unit
              of activation (largest first / smallest first)
    nearest   [[id, cosine]...]: the latents of the same SAE whose decoder directions are closest to
              this one's (largest cosine first; absent with --nearest 0)

Activations and effects are rounded to 4 significant digits. The dashboard's ``data/*.js`` files
hold these same JSON documents, wrapped in a function call so that a page opened from disk can
load them (browsers refuse ``fetch`` on ``file://``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sae_kernels.atomic import atomic_write_text

from .features import HIST_BINS, LatentStats, PassConfig, frequency, hist_edges, mean_activation, peak_context_maxima
from .order import BAND, SCORE_DEFINITION, interpretability
from .stream import StreamingTopN

FORMAT = "sae-kernels-analysis/1"
CHUNK = 256
PER_DOC = 4  # while other documents offer examples, at most ceil(top_n / PER_DOC) examples come from one
DOMINANT_SHARE = 0.5  # a latent with more than this share of its examples from one document is flagged ...
DOMINANT_MIN = 3  # ... when it has at least this many examples
DENSITY_EDGES = [-8 + 0.25 * i for i in range(33)]  # log10 frequency, 1e-8 .. 1

CONVENTIONS = {
    "activation": "latent values of the SAE as loaded by TopKSAE.from_llama_scope (folded norms: for a Llama "
                  "Scope SAE, the method's inference activation)",
    "frequency": "fraction of the corpus's non-special tokens on which the latent is active (> 0)",
    "mean": "mean activation over the tokens where the latent is active",
    "max": "largest activation on the corpus (the peak of the first top example)",
    "top": "the latent's top_n examples: peaks of non-overlapping windows (several per context possible), the "
           "largest first; from the 2 x top_n largest, at most ceil(top_n / 4) per document while other documents "
           "offer examples; ties: the earlier context, then the earlier position",
    "docs": "distinct documents among a latent's top examples; doc_max: the most examples from one document; "
            "dominated: latents with at least 3 examples, more than half of them from one document",
    "samples": "a uniform sample (seeded reservoir) of the active tokens, split into quantile_groups bands of "
               "the sampled activations",
    "dead": "no activation on any token of this corpus",
    "nearest": "the latents of the same SAE with the largest decoder cosine (directions, not norms)",
    "score": "the dashboard's default order: " + SCORE_DEFINITION,
    "logits": "direct logit effect per unit activation: W_U (gamma * d_i), d_i the latent's decoder direction "
              "in raw units, gamma the final norm's gain, W_U the unembedding (later layers and the norm's "
              "per-token scale ignored)",
    "special_tokens": "BOS, EOS and PAD are not encoded: they appear in windows with activation 0",
}


def r4(x: float) -> float:
    """4 significant digits (JSON-safe: non-finite values become 0)."""
    if x == 0 or not math.isfinite(x):
        return 0.0
    return float(f"{x:.4g}")


def _window(corpus: Tensor, ctx: int, pos: int, win: List[float], cfg: PassConfig) -> Dict[str, Any]:
    T = corpus.shape[1]
    start = max(0, pos - cfg.before)
    end = min(T, pos + cfg.after + 1)
    off = start - (pos - cfg.before)
    return {"ctx": ctx, "pos": pos, "start": start, "tokens": corpus[ctx, start:end].tolist(),
            "acts": [0.0 if a == 0 else r4(a) for a in win[off:off + end - start]]}


@torch.no_grad()
def select_examples(top: StreamingTopN, docs: Optional[Tensor], n: int, chunk: int = 4096) -> Dict[str, Tensor]:
    """Which of the pooled examples (``top``, best first) a latent shows: ``idx [d_sae, n]`` (pool slots,
    best first, -1 when empty) and ``doc [d_sae, n]`` (the document of each, -1 when empty or unknown).

    The ``n`` best examples taking at most ``ceil(n / PER_DOC)`` from any one document; when that leaves
    slots free (the latent's pool has examples from few documents), the best of the rest fill them.
    ``docs [n_contexts, T]`` is the corpus's document of every token (None: no preference)."""
    ctx, pos = top.ctx.cpu(), top.pos.long().cpu()
    d, P = ctx.shape
    n = min(n, P)
    valid = ctx >= 0
    doc = torch.where(valid, docs[ctx.clamp_min(0), pos].long(), torch.full_like(ctx, -1)) if docs is not None \
        else torch.full_like(ctx, -1)
    cap = max(1, math.ceil(n / PER_DOC)) if docs is not None else P
    j = torch.arange(P)
    idx = torch.full((d, n), -1, dtype=torch.int64)
    for s in range(0, d, chunk):
        D, V = doc[s:s + chunk], valid[s:s + chunk]
        same = (D[:, :, None] == D[:, None, :]) & (j[:, None] < j[None, :])  # [rows, earlier, later]
        rank = same.sum(1)  # earlier examples from the same document
        key = torch.where(V, torch.where(rank < cap, j, j + P), j + 2 * P)
        chosen = key.argsort(dim=1)[:, :n].sort(dim=1).values
        idx[s:s + chunk] = torch.where(V.gather(1, chosen), chosen, torch.full_like(chosen, -1))
    sdoc = torch.where(idx >= 0, doc.gather(1, idx.clamp_min(0)), torch.full_like(idx, -1))
    return {"idx": idx, "doc": sdoc if docs is not None else torch.full_like(idx, -1)}


def doc_spread(sel: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Per latent: ``examples`` shown, ``docs`` (distinct documents among them) and ``doc_max`` (the most
    from one document); zeros without document ids."""
    idx, doc = sel["idx"], sel["doc"]
    ok = (idx >= 0) & (doc >= 0)
    same = (doc[:, :, None] == doc[:, None, :]) & ok[:, :, None] & ok[:, None, :]
    per = same.sum(2)  # examples sharing each example's document
    first = ok & ~torch.tril(same, diagonal=-1).any(2)  # first example of its document
    return {"examples": (idx >= 0).sum(1), "docs": first.sum(1), "doc_max": per.max(1).values if per.numel() else
            torch.zeros(idx.shape[0], dtype=torch.int64)}


def latent_records(stats: LatentStats, corpus: Tensor, cfg: PassConfig, logits: Optional[Dict[str, Tensor]],
                   quantile_groups: int, lo: int, hi: int, sel: Optional[Dict[str, Tensor]] = None,
                   docs: Optional[Tensor] = None, nearest: Optional[Tuple[Tensor, Tensor]] = None
                   ) -> List[Dict[str, Any]]:
    """The per-latent records of latents ``lo .. hi-1`` (``sel``: ``select_examples``; default: the
    first ``top_n`` of the pool; ``nearest``: ``(ids, cos)`` of each latent's nearest latents)."""
    top, samp = stats.top, stats.samp
    if sel is None:
        sel = select_examples(top, docs, cfg.top_n)
    pick = sel["idx"][lo:hi]
    safe = pick.clamp_min(0).to(top.ctx.device)
    t_ctx = torch.where(pick >= 0, top.ctx[lo:hi].cpu().gather(1, pick.clamp_min(0)), torch.full_like(pick, -1)).tolist()
    t_pos = top.pos[lo:hi].gather(1, safe).tolist()
    t_val = top.value[lo:hi].gather(1, safe).tolist()
    t_win = top.window[lo:hi].gather(1, safe[:, :, None].expand(-1, -1, top.w)).tolist()
    t_doc = sel["doc"][lo:hi].tolist()
    nb = (nearest[0][lo:hi].tolist(), nearest[1][lo:hi].tolist()) if nearest is not None else None
    if samp is not None:
        s_ctx, s_pos, s_val = samp.ctx[lo:hi].tolist(), samp.pos[lo:hi].tolist(), samp.value[lo:hi].tolist()
        s_win = samp.window[lo:hi].tolist()
    hist = stats.hist.view(stats.d_sae, HIST_BINS)[lo:hi].tolist()
    lg = {k: v[lo:hi].tolist() for k, v in logits.items()} if logits else None
    out = []
    for r in range(hi - lo):
        i = lo + r
        rec: Dict[str, Any] = {"id": i, "top": []}
        for j, c in enumerate(t_ctx[r]):
            if c < 0:
                break
            w = _window(corpus, c, t_pos[r][j], t_win[r][j], cfg)
            w["value"] = r4(t_val[r][j])
            if t_doc[r][j] >= 0:
                w["doc"] = t_doc[r][j]
            rec["top"].append(w)
        groups = []
        if samp is not None:
            items = [(s_val[r][j], j) for j, c in enumerate(s_ctx[r]) if c >= 0]
            items.sort()
            G = max(1, min(quantile_groups, len(items)))
            for g in range(G if items else 0):
                a, b = (g * len(items)) // G, ((g + 1) * len(items)) // G
                part = items[a:b]
                if not part:
                    continue
                its = []
                for v, j in reversed(part):
                    w = _window(corpus, s_ctx[r][j], s_pos[r][j], s_win[r][j], cfg)
                    w["value"] = r4(v)
                    if docs is not None:
                        w["doc"] = int(docs[s_ctx[r][j], s_pos[r][j]])
                    its.append(w)
                groups.append({"quantile": [round(g / G, 4), round((g + 1) / G, 4)],
                               "range": [r4(part[0][0]), r4(part[-1][0])], "items": its})
        rec["samples"] = groups
        h = hist[r]
        nz = [b for b, c in enumerate(h) if c]
        rec["hist"] = {"first_bin": nz[0], "counts": h[nz[0]:nz[-1] + 1]} if nz else {"first_bin": 0, "counts": []}
        if lg is not None:
            rec["logits"] = {
                "top": [[int(t), r4(v)] for t, v in zip(lg["top_ids"][r], lg["top_values"][r])],
                "bottom": [[int(t), r4(v)] for t, v in zip(lg["bottom_ids"][r], lg["bottom_values"][r])],
            }
        if nb is not None:
            rec["nearest"] = [[int(k), r4(c)] for k, c in zip(nb[0][r], nb[1][r])]
        out.append(rec)
    return out


def density_figure(summary: Dict[str, Any]) -> str:
    """SVG histogram of log10 firing frequency over the live latents, the dead ones counted beside."""
    from .svg import PALETTE, Figure

    d = summary["density"]
    edges, counts = d["edges_log10"], d["counts"]
    nz = [i for i, c in enumerate(counts) if c] or [0]
    lo, hi = max(edges[0], edges[nz[0]] - 0.5), edges[-1]
    dead_x = (hi + 0.25, hi + 0.75)
    f = Figure(f"{summary['sae']['name']}: latent density on {summary['corpus']['tokens']} tokens",
               "log10 firing frequency (fraction of tokens)", "latents", (lo, dead_x[1] + 0.1),
               (0, max(counts + [d["dead"], 1]) * 1.1))
    f.bars(edges, counts, PALETTE[0], f"live ({d['live']})")
    f.bars(list(dead_x), [d["dead"]], "#c23b3b", f"dead ({d['dead']})")
    ticks = [(float(e), f"{e:g}") for e in range(math.ceil(lo), int(hi) + 1)] + [(sum(dead_x) / 2, "dead")]
    return f.svg(xticks=ticks)


def token_texts(tokenizer, ids: Sequence[int]) -> Dict[str, str]:
    out = {}
    for i in sorted(set(int(x) for x in ids)):
        try:
            out[str(i)] = tokenizer.decode([i])
        except Exception:  # noqa: BLE001 - a tokenizer that cannot decode one id alone
            out[str(i)] = f"<{i}>"
    return out


def latent_tokens(features: Path, ids, n: int) -> Optional[Dict[str, List[str]]]:
    """``{latent id: its top tokens}`` (the peak tokens of its top examples, distinct, at most ``n``) for
    latents ``ids`` (in that order) from an analysis summary (``features.json``); None when the SAE has no
    analysis or it cannot be read."""
    if not features.is_file():
        return None
    try:
        s = json.loads(features.read_text(encoding="utf-8"))
        peaks, vocab = s["latents"]["peak_tokens"], s["vocab"]
    except (OSError, ValueError, KeyError):
        return None
    out: Dict[str, List[str]] = {}
    for i in ids:
        if 0 <= i < len(peaks):
            seen: List[str] = []
            for t in peaks[i]:
                w = vocab.get(str(t), f"<{t}>")
                if w not in seen:
                    seen.append(w)
            out[str(i)] = seen[:n]
    return out


def write_json(path: Path, obj: Any) -> str:
    """Write compact JSON atomically; returns the text (the dashboard wraps the same text)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text)
    return text


def build_summary(stats: LatentStats, cfg: PassConfig, corpus_tokens: Tensor, meta: Dict[str, Any],
                  logits: Optional[Dict[str, Tensor]], quantile_groups: int, logit_tokens: int,
                  sel: Optional[Dict[str, Tensor]] = None, docs: Optional[Tensor] = None) -> Dict[str, Any]:
    freq = frequency(stats)
    mx = peak_context_maxima(stats)
    mean = mean_activation(stats)
    count = stats.count
    dead = (count == 0).nonzero().squeeze(1).tolist()
    if sel is None:
        sel = select_examples(stats.top, docs, cfg.top_n)
    spread = doc_spread(sel)
    order = interpretability(stats, sel)
    # tokens at the peaks of the first 5 top examples: what "search by token" looks for
    n_peak = min(5, cfg.top_n)
    slot = sel["idx"][:, :n_peak]
    valid = slot >= 0
    ctx = torch.where(valid, stats.top.ctx.cpu().gather(1, slot.clamp_min(0)), torch.zeros_like(slot))
    pos = stats.top.pos.long().cpu().gather(1, slot.clamp_min(0))
    peak_ids = torch.where(valid, corpus_tokens[ctx.clamp_min(0), pos], torch.full_like(ctx, -1))
    peak_tokens = [[t for t in row if t >= 0] for row in peak_ids.tolist()]
    live = freq[count > 0].clamp_min(1e-300).log10().cpu()
    edges = torch.tensor(DENSITY_EDGES, dtype=torch.float64)
    dens = torch.histc(live.clamp(DENSITY_EDGES[0], DENSITY_EDGES[-1] - 1e-9), bins=len(edges) - 1,
                       min=DENSITY_EDGES[0], max=DENSITY_EDGES[-1]).long().tolist() if live.numel() else \
        [0] * (len(edges) - 1)
    d_sae = stats.d_sae
    return dict(meta, **{
        "format": FORMAT,
        "settings": {"top_n": cfg.top_n, "samples": cfg.samples, "quantile_groups": quantile_groups,
                     "window_before": cfg.before, "window_after": cfg.after, "logit_tokens": logit_tokens,
                     "seed": cfg.seed},
        "conventions": CONVENTIONS,
        "latents": {
            "count": count.tolist(), "frequency": [r4(f) for f in freq.tolist()],
            "mean": [r4(v) for v in mean.tolist()], "max": [r4(v) for v in mx.tolist()],
            "peak_tokens": peak_tokens,
            "logit_tokens": logits["top_ids"][:, :3].tolist() if logits is not None else [],
            "score": [r4(v) for v in order["score"].tolist()],
            "concentration": [r4(v) for v in order["concentration"].tolist()],
            "examples": spread["examples"].tolist(),
            "docs": spread["docs"].tolist() if docs is not None else [],
            "doc_max": spread["doc_max"].tolist() if docs is not None else [],
        },
        "order": {"default": "score", "band": list(BAND), "definition": SCORE_DEFINITION},
        "dead": dead,
        "dominated": dominated(spread) if docs is not None else [],
        "density": {"edges_log10": DENSITY_EDGES, "counts": dens, "dead": len(dead), "live": d_sae - len(dead)},
        "hist_edges": [r4(e) for e in hist_edges()],
        "chunks": {"size": CHUNK, "files": [f"latents/{s:05d}.json" for s in range(0, d_sae, CHUNK)]},
        "has_logits": logits is not None,
    })


def dominated(spread: Dict[str, Tensor]) -> List[int]:
    """Latents with at least ``DOMINANT_MIN`` examples, more than ``DOMINANT_SHARE`` of them from one document."""
    ex, mx = spread["examples"], spread["doc_max"]
    return ((ex >= DOMINANT_MIN) & (mx > DOMINANT_SHARE * ex)).nonzero().squeeze(1).tolist()


def export_member(out_dir: Path, stats: LatentStats, cfg: PassConfig, corpus: Tensor, meta: Dict[str, Any],
                  logits: Optional[Dict[str, Tensor]], tokenizer, quantile_groups: int, logit_tokens: int,
                  on_chunk=None, docs: Optional[Tensor] = None,
                  nearest: Optional[Tuple[Tensor, Tensor]] = None) -> Dict[str, Any]:
    """Write ``out_dir/features.json`` and ``out_dir/latents/*.json``; ``on_chunk(name, text)`` sees
    every document written (the dashboard wraps them). ``docs [n_contexts, T]``: the document of every
    corpus token (examples are spread over documents; None: no document ids). ``nearest``: ``(ids,
    cos) [d_sae, m]``, each latent's nearest latents by decoder cosine. Returns the summary."""
    corpus = corpus.cpu()
    docs = docs.cpu() if docs is not None else None
    sel = select_examples(stats.top, docs, cfg.top_n)
    summary = build_summary(stats, cfg, corpus, meta, logits, quantile_groups, logit_tokens, sel=sel, docs=docs)
    summary["settings"]["nearest"] = int(nearest[0].shape[1]) if nearest is not None else 0
    if nearest is not None:
        nearest = (nearest[0].cpu(), nearest[1].cpu())
    used = set(t for row in summary["latents"]["peak_tokens"] for t in row)
    for s in range(0, stats.d_sae, CHUNK):
        recs = latent_records(stats, corpus, cfg, logits, quantile_groups, s, min(s + CHUNK, stats.d_sae),
                              sel=sel, docs=docs, nearest=nearest)
        for rec in recs:
            for c in rec["top"]:
                used.update(c["tokens"])
            for g in rec["samples"]:
                for c in g["items"]:
                    used.update(c["tokens"])
            for key in ("top", "bottom"):
                used.update(t for t, _ in rec.get("logits", {}).get(key, []))
        name = f"latents/{s:05d}.json"
        text = write_json(out_dir / name, {"first": s, "latents": recs})
        if on_chunk:
            on_chunk(name, text)
    summary["vocab"] = token_texts(tokenizer, used)
    text = write_json(out_dir / "features.json", summary)
    if on_chunk:
        on_chunk("features.json", text)
    atomic_write_text(out_dir / "density.svg", density_figure(summary))
    return summary
