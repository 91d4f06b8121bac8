"""BatchTopK's selection, exact over the whole step batch on any layout (docs/method.md sec. 11).

The single process keeps the ``K * B`` largest weighted scores ``relu(pre_ti) * n_i`` of its batch of
``B`` tokens, equal scores to the smaller (token position, latent id). Under data parallelism a rank
holds ``B / dp`` of the tokens, under tensor parallelism ``d_sae / tp`` of the latents; the selection
here is still the single process's:

1. Candidates: each rank's per-token top-``2K`` of its latents (the training encode). Every kept score is
   among them unless a token's smallest candidate reaches the threshold (the token is *saturated*); the
   saturated tokens' candidates then become all their scores at or above that threshold, and the
   threshold is taken again: more candidates can only raise it, so once is enough. This changes the
   work, never the result.
2. The threshold ``T``, the ``K * B``-th largest candidate score of the whole mesh: the scores are
   non-negative floats, so their bit patterns order like their values; a radix select over the bytes,
   most significant first, with each byte's 256-bin histogram all-reduced over the mesh (4 all-reduces
   of 256 ints for fp32 scores, and no host sync).
3. Ties at ``T``: the remaining ``R`` slots go to the ties in global order (data rank, token, model rank,
   latent id): each rank's per-token tie counts, summed into one ``[dp, B/dp, tp]`` table over the mesh,
   say how many come before its own.

NaN scores rank above every number (as in ``topk``): their canonical bit pattern is above +inf.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sae_kernels.ops import decode_for_training, encode_for_training

from .mesh import ParallelContext


def score_bits(scores: Tensor) -> Tensor:
    """Non-negative float scores as integers in the same order: fp32 -> int32, fp64 -> int64. NaN
    becomes the canonical positive NaN (above +inf), -0.0 becomes 0."""
    s = torch.where(torch.isnan(scores), torch.full_like(scores, float("nan")).abs(), scores)
    bits = s.contiguous().view(torch.int64 if s.dtype == torch.float64 else torch.int32)
    return bits.clamp_min(0)


def bits_to_float(T: Tensor, dtype: torch.dtype) -> Tensor:
    """The float (0-d, ``dtype``: fp32 or fp64) whose ``score_bits`` are ``T``."""
    it = torch.int64 if dtype == torch.float64 else torch.int32
    return T.to(it).reshape(1).view(dtype).reshape(())


def batch_threshold(ctx: ParallelContext, bits: Tensor, keep: int) -> Tuple[Tensor, Tensor]:
    """``(T, R)``: the ``keep``-th largest of the mesh's ``bits`` (every rank's), and how many of the
    values equal to ``T`` the ``keep`` largest include (``keep - count(bits > T)``). 0-d int64 tensors
    on ``bits``' device, the same on every rank; one all-reduce of 256 counts per byte, no host sync.
    ``keep`` must be at most the mesh's number of values."""
    width = bits.element_size() * 8
    flat = bits.reshape(-1).long()
    prefix = torch.zeros((), dtype=torch.int64, device=bits.device)
    need = torch.full((), keep, dtype=torch.int64, device=bits.device)
    for shift in range(width - 8, -1, -8):
        byte = (flat >> shift) & 255
        if shift + 8 < width:  # only the values whose higher bytes are T's so far
            byte = byte + 256 * ((flat >> (shift + 8)) != (prefix >> (shift + 8))).long()
        hist = torch.bincount(byte, minlength=512)[:256]
        hist = ctx.world_all_reduce(hist)
        at_or_above = hist.flip(0).cumsum(0)  # [j]: values in bins >= 255 - j
        j = torch.searchsorted(at_or_above, need.reshape(1)).squeeze(0).clamp_max(255)
        b = 255 - j
        need = need - (at_or_above[j] - hist[b])
        prefix = prefix | (b << shift)
    return prefix, need


def batch_select(ctx: ParallelContext, bits: Tensor, row: Tensor, gidx: Tensor, n_rows: int, keep_total: int,
                 T: Optional[Tensor] = None, R: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(keep, T)``: the ``keep_total`` largest of the mesh's candidate entries (``bits``: ``score_bits`` of
    their scores; ``row``: this rank's token of each, in ``[0, n_rows)``; ``gidx``: global latent ids),
    ties to the smaller (data rank, token, latent id); ``keep`` a bool mask over the entries, ``T`` the
    threshold's bits. ``T, R`` from ``batch_threshold`` when already computed."""
    if T is None:
        T, R = batch_threshold(ctx, bits, keep_total)
    above = bits > T
    tie = bits == T
    counts = torch.zeros(n_rows, dtype=torch.int64, device=bits.device).index_add_(0, row, tie.long())
    table = torch.zeros((ctx.dp, n_rows, ctx.tp), dtype=torch.int64, device=bits.device)
    table[ctx.data_rank, :, ctx.model_rank] = counts
    table = ctx.world_all_reduce(table).reshape(-1)
    before = (table.cumsum(0) - table).view(ctx.dp, n_rows, ctx.tp)[ctx.data_rank, :, ctx.model_rank]
    allowed = (R - before).clamp(min=0).minimum(counts)  # ties this rank keeps, per token
    keep = above | (tie & (allowed >= counts)[row])  # tokens keeping all their ties
    partial = (allowed > 0) & (allowed < counts)
    if bool(partial.any()):  # some token keeps only its first `allowed` ties, in latent order (host sync)
        e = (tie & partial[row]).nonzero().squeeze(1)
        key = row[e] * (int(gidx.max()) + 1) + gidx[e]  # (token, latent id)
        e = e[key.argsort(stable=True)]
        r = row[e]
        first = torch.ones_like(r, dtype=torch.bool)
        first[1:] = r[1:] != r[:-1]
        start = torch.arange(e.numel(), device=e.device)[first]
        rank = torch.arange(e.numel(), device=e.device) - start[first.long().cumsum(0) - 1]
        keep[e[rank < allowed[r]]] = True
    return keep, T


def dense_forward(ctx: ParallelContext, x_n: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                  out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """The ``standard`` (ReLU) SAE forward on this rank's rows: ``(x_hat, f, l1_t)``: ``f = relu(W_enc x +
    b_enc)`` (``[B, n_local]``), the reconstruction (partials summed over the model group, ``+ b_dec``)
    and the per-token penalty ``sum_i f_ti ||W_dec[i]||`` over every shard (fp32, float64 for float64
    weights). Plain autograd on the given parameters (cast to ``x_n``'s dtype): two GEMMs each way."""
    from .sharded import _AllReduceSum

    dt = x_n.dtype
    f = torch.relu(torch.addmm(b_enc.to(dt), x_n, W_enc.to(dt).t()))
    partial = f @ W_dec.to(dt)
    acc = torch.promote_types(W_dec.dtype, torch.float32)
    l1_t = (f.to(acc) * torch.linalg.vector_norm(W_dec.to(acc), dim=1)).sum(1)
    if ctx.tp > 1:
        partial = _AllReduceSum.apply(partial.float(), ctx.model_group)
        l1_t = _AllReduceSum.apply(l1_t, ctx.model_group)
    return partial.to(out_dtype) + b_dec.to(out_dtype), f, l1_t


# Rows grouped by how many latents they keep, each group decoded with its own slot width: the slots of
# a step are then about K per token (zeros pad each group to its fullest token), not the fullest token's
# count for every token. Group boundaries at these quantiles of the sorted per-token counts.
GROUP_QUANTILES = (0.5, 0.8, 0.95, 0.99, 1.0)
# Candidates per token, in multiples of K: with K per token the threshold would be the smallest candidate
# of the batch and every token saturated; with 2K only the tokens that keep many latents are.
CANDIDATES = 2


@dataclass
class BatchTopK:
    """This rank's part of a BatchTopK forward.

    Attributes:
        x_hat: ``[B, d_model]`` the reconstruction (the same on the model group).
        values / indices: ``[E]`` this rank's kept entries (values differentiable, global latent ids) in
            token order, for the counters and L0 (``E`` about ``K * B / tp``).
        groups: ``(rows, values [R, w], local ids [R, w])`` per group of tokens decoded together (zeros pad
            a token's slots to its group's width ``w``).
        threshold: 0-d, the step's smallest kept score (the same on every rank).
        scores: the encode's ``EncodeScores`` (AuxK's second selection).
        n_rows: ``B``.
        prefix_x_hats: Matryoshka: the reconstruction of each nested prefix of latents (the last is
            ``x_hat``); ``[x_hat]`` otherwise.
    """

    x_hat: Tensor
    values: Tensor
    indices: Tensor
    groups: List[Tuple[Tensor, Tensor, Tensor]]
    threshold: Tensor
    scores: object
    n_rows: int
    prefix_x_hats: List[Tensor]


def batch_topk_forward(ctx: ParallelContext, x_n: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
                       b_dec: Optional[Tensor], k: int, weighted: bool, d_sae: int, *, dec_norm: Optional[Tensor],
                       compute: Tuple[Tensor, Tensor, Tensor], out_dtype: Optional[torch.dtype],
                       prefixes: Sequence[int] = ()) -> BatchTopK:
    """BatchTopK forward in normalised space on this rank (docs/method.md sec. 11). Every rank of the mesh
    calls it with its share of the batch (``x_n``, the same on a model group) and its rows of the SAE, as
    ``sharded_forward``.

    1. The encode's per-token top-``2K`` (of this rank's latents) are the candidates.
    2. ``T`` = the ``K * B``-th largest candidate score of the mesh (``batch_threshold``). A token whose
       smallest candidate reaches ``T`` may keep more: its candidates become all its scores ``>= T`` (from
       its row of scores), and ``T`` is taken again, once (one host sync to decide).
    3. The kept entries (``batch_select``), grouped by count and decoded; their values are ``relu(pre)``
       there (``EncodeScores.take``), differentiable like the encode, so its backward reads only them.
    The encode always keeps its pre-activations (``BatchTopK.scores``, also AuxK's).
    ``prefixes``: Matryoshka's nested widths (global latent ids, the last d_sae): the kept latents are
    decoded band by band (``[m_{j-1}, m_j)``), and the prefixes' reconstructions are sums of bands, so
    all of them cost one decode."""
    from .sharded import _CopyToGroup, _row_norms

    W_c, b_c, Wd_c = compute
    n_local = W_c.shape[0]
    offset = ctx.model_rank * n_local
    if dec_norm is None and weighted:
        dec_norm = _row_norms(Wd_c)
    if out_dtype is None and ctx.tp > 1 and Wd_c.dtype in (torch.bfloat16, torch.float16):
        out_dtype = torch.float32
    x_in = _CopyToGroup.apply(x_n, ctx.model_group) if ctx.tp > 1 and x_n.requires_grad else x_n
    B = x_n.shape[0]
    keep_total = k * B * ctx.dp
    c = min(CANDIDATES * k, n_local)
    with torch.no_grad():  # the selection only: the kept values are taken below, with their gradient
        values, lidx, enc = encode_for_training(x_in, W_enc, b_enc, c, dec_norm if weighted else None,
                                                compute=(W_c, b_c), keep_pre=True)
    dev = lidx.device
    with torch.no_grad():
        v = values.detach()
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        score = v.to(acc) * dec_norm.to(acc)[lidx] if weighted else v.to(acc)
        bits2d = score_bits(score)
        bits = bits2d.reshape(-1)
        row = torch.arange(B, device=dev).repeat_interleave(c)
        ids = lidx.reshape(-1)
        T, R = batch_threshold(ctx, bits, keep_total)
        # Adding candidates can only raise T, so a saturated token's kept latents are among its scores
        # >= T now: with those added, no token can be saturated at the new T (one more round at most).
        sat = (bits2d.min(1).values >= T) if c < n_local else torch.zeros(B, dtype=torch.bool, device=dev)
        if bool(ctx.world_all_reduce(sat.any().long(), op="max")):
            rows = sat.nonzero().squeeze(1)
            b2 = score_bits(enc.row_scores(rows))
            r2, i2 = (b2 >= T).nonzero(as_tuple=True)
            others = ~sat[row]
            bits = torch.cat([bits[others], b2[r2, i2]])
            ids = torch.cat([ids[others], i2])
            row = torch.cat([row[others], rows[r2]])
            T, R = batch_threshold(ctx, bits, keep_total)
        keep, T = batch_select(ctx, bits, row, ids + offset, B, keep_total, T, R)
        sel = keep.nonzero().squeeze(1)
        krow, kid = row.index_select(0, sel), ids.index_select(0, sel)
        P = len(prefixes) if len(prefixes) > 1 else 1
        vrow = krow
        if P > 1:  # Matryoshka: each (token, band of latents [m_{j-1}, m_j)) is a row of its own
            band = torch.bucketize(kid + offset, torch.tensor(prefixes[:-1], device=dev), right=True)
            vrow = krow * P + band
    part, groups, kval, kid = _grouped_decode(vrow, kid, B * P, P, enc, W_dec, Wd_c, out_dtype)
    part = part.view(B, P, -1)
    if ctx.tp > 1:  # the bands' partial decodes summed over the model group at once
        from .sharded import _AllReduceSum

        part = _AllReduceSum.apply(part.float() if part.dtype in (torch.bfloat16, torch.float16) else part,
                                   ctx.model_group)
    # the prefixes' reconstructions: b_dec + the bands below each
    bands = part.unbind(1)  # (one stack in the backward, not a zero-filled copy per band)
    x_hats = [bands[0]]
    for j in range(1, P):
        x_hats.append(x_hats[-1] + bands[j])
    if b_dec is not None:
        x_hats = [xh + b_dec.to(xh.dtype) for xh in x_hats]
    return BatchTopK(x_hats[-1], kval, kid + offset, groups, bits_to_float(T, acc), enc, B, x_hats)


def _grouped_decode(krow: Tensor, kid: Tensor, B: int, P: int, enc, W_dec: Tensor, Wd_c: Tensor,
                    out_dtype: Optional[torch.dtype]):
    """Decode the entries ``(krow, kid)`` (rows in ``[0, B)``, row ``r`` reading token ``r // P``; this rank's
    latent ids) with the rows grouped by how many entries they hold: ``(partial [B, d] without b_dec,
    groups, kept values, their ids)``."""
    dev = krow.device
    with torch.no_grad():
        # the entries ordered by their token's place among the tokens sorted by count (so each group is a
        # contiguous run), within a token in candidate order
        counts = torch.bincount(krow, minlength=B)
        by_count = counts.argsort(stable=True)
        place = torch.empty_like(by_count)
        place[by_count] = torch.arange(B, device=dev)
        o = place[krow].argsort(stable=True)
        krow, kid = krow[o], kid[o]
        sorted_counts = counts[by_count]
        ends = sorted_counts.cumsum(0)
        kplace = place[krow]
        pos = torch.arange(krow.numel(), device=dev) - (ends - sorted_counts)[kplace]
        cuts = sorted({max(1, int(q * B)) for q in GROUP_QUANTILES})
        counts_h, ends_h = sorted_counts.tolist(), ends.tolist()
    groups, parts, kvals = [], [], []
    lo = 0
    for hi in cuts:
        if hi <= lo:
            continue
        rows = by_count[lo:hi]
        w = max(1, counts_h[hi - 1])
        e_lo, e_hi = (ends_h[lo - 1] if lo else 0), ends_h[hi - 1]
        slot, p = kplace[e_lo:e_hi] - lo, pos[e_lo:e_hi]
        with torch.no_grad():
            idx = torch.zeros((rows.numel(), w), dtype=torch.int64, device=dev)
            valid = torch.zeros((rows.numel(), w), dtype=torch.bool, device=dev)
            idx[slot, p] = kid[e_lo:e_hi]
            valid[slot, p] = True
        vals, idx = enc.take(rows // P if P > 1 else rows, idx)  # relu(pre) there, differentiable like the encode
        vals = torch.where(valid, vals, torch.zeros_like(vals))
        groups.append((rows, vals, idx))
        kvals.append(vals[slot, p])
        parts.append(decode_for_training(vals, idx, W_dec, None, compute=Wd_c, out_dtype=out_dtype))
        lo = hi
    rows_all = torch.cat([g[0] for g in groups])
    part = torch.cat(parts)
    out = torch.zeros((B, part.shape[1]), dtype=part.dtype, device=dev).index_copy(0, rows_all, part)
    return out, groups, torch.cat(kvals), kid
