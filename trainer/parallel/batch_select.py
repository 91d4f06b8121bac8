"""BatchTopK's selection, exact over the whole step batch on any layout (docs/method.md sec. 11).

The single process keeps the ``K * B`` largest weighted scores ``relu(pre_ti) * n_i`` of its batch of
``B`` tokens, equal scores to the smaller (token position, latent id). Under data parallelism a rank
holds ``B / dp`` of the tokens, under tensor parallelism ``d_sae / tp`` of the latents; the selection
here is still the single process's:

1. Candidates: each rank's per-token top-``c`` of its latents (the training encode, ``c`` a multiple of
   K). Every kept score is among them unless a row's ``c``-th candidate reaches the threshold (the row
   is *saturated*); then every rank retries with twice the candidates. The multiple a run needs is
   remembered, so retries are rare, and they change the work, never the result.
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
from typing import Optional, Tuple

import torch
from torch import Tensor

from sae_kernels.ops import decode_for_training, encode_for_training, gather_slots

from .mesh import ParallelContext


def score_bits(scores: Tensor) -> Tensor:
    """Non-negative float scores as integers in the same order: fp32 -> int32, fp64 -> int64. NaN
    becomes the canonical positive NaN (above +inf), -0.0 becomes 0."""
    s = torch.where(torch.isnan(scores), torch.full_like(scores, float("nan")).abs(), scores)
    bits = s.contiguous().view(torch.int64 if s.dtype == torch.float64 else torch.int32)
    return bits.clamp_min(0)


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


@dataclass
class BatchSelection:
    """A rank's part of the batch selection: ``keep [B, c]`` marks its kept candidates, ``threshold``
    the smallest kept score (0-d, in score units, the same on every rank), ``saturated`` (0-d bool, the
    same on every rank) that some row of the mesh may hold more kept latents than its candidates."""

    keep: Tensor
    threshold: Tensor
    saturated: Tensor


def batch_select(ctx: ParallelContext, scores: Tensor, gidx: Tensor, keep_total: int, complete: bool) -> BatchSelection:
    """The ``keep_total`` largest of the mesh's candidate ``scores [B, c]`` (global latent ids ``gidx``),
    ties to the smaller (data rank, token, latent id). ``complete``: the candidates are every latent of
    this rank (no row can be saturated)."""
    bits = score_bits(scores)
    T, R = batch_threshold(ctx, bits, keep_total)
    above = bits > T
    tie = bits == T
    counts = tie.sum(1)  # [B] ties per token on this rank
    B = bits.shape[0]
    table = torch.zeros((ctx.dp, B, ctx.tp), dtype=torch.int64, device=bits.device)
    table[ctx.data_rank, :, ctx.model_rank] = counts
    table = ctx.world_all_reduce(table)
    before = (table.reshape(-1).cumsum(0) - table.reshape(-1)).view(ctx.dp, B, ctx.tp)[ctx.data_rank, :, ctx.model_rank]
    allowed = (R - before).clamp(min=0).minimum(counts)  # [B] ties this rank keeps per token
    keep = above | (tie & (allowed[:, None] >= counts[:, None]))  # rows keeping all their ties
    partial = (allowed > 0) & (allowed < counts)
    if bool(partial.any()):  # some row keeps only its first `allowed` ties, in latent order (host sync)
        big = torch.iinfo(torch.int64).max
        key = torch.where(tie, gidx.long(), torch.full(gidx.shape, big, dtype=torch.int64, device=gidx.device))
        order = key.argsort(dim=1, stable=True)
        pos = torch.arange(order.shape[1], device=order.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(1, order, pos)
        keep = keep | (tie & partial[:, None] & (rank < allowed[:, None]))
    if complete:
        sat = torch.zeros((), dtype=torch.bool, device=bits.device)
    else:  # the row's smallest candidate reaches T: a latent outside the candidates may belong
        sat = (bits.min(dim=1).values >= T).any()
    sat = ctx.world_all_reduce(sat.long(), op="max") > 0
    return BatchSelection(keep, _bits_to_float(T, scores.dtype), sat)


def _bits_to_float(T: Tensor, dtype: torch.dtype) -> Tensor:
    it = torch.int64 if dtype == torch.float64 else torch.int32
    return T.to(it).reshape(1).view(dtype).reshape(())


def decode_slots(ctx: ParallelContext, values: Tensor, local_idx: Tensor, W_dec: Tensor, Wd_c: Tensor,
                 b_dec: Optional[Tensor], out_dtype: Optional[torch.dtype]) -> Tensor:
    """The reconstruction from this rank's slots (``local_idx`` trusted): one decode in one model shard;
    with several, the partial decodes summed over the model group (fp32 for half weights), then ``+ b_dec``."""
    from .sharded import _AllReduceSum

    if ctx.tp == 1:
        return decode_for_training(values, local_idx, W_dec, b_dec, compute=Wd_c, out_dtype=out_dtype)
    partial = decode_for_training(values, local_idx, W_dec, None, compute=Wd_c, out_dtype=out_dtype)
    x_hat = _AllReduceSum.apply(partial.float() if partial.dtype in (torch.bfloat16, torch.float16) else partial,
                                ctx.model_group)
    return x_hat if b_dec is None else x_hat + b_dec.to(x_hat.dtype)


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


def batch_topk_forward(ctx: ParallelContext, x_n: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor,
                       b_dec: Optional[Tensor], k: int, weighted: bool, d_sae: int, *, dec_norm: Optional[Tensor],
                       compute: Tuple[Tensor, Tensor, Tensor], keep_pre: bool, out_dtype: Optional[torch.dtype],
                       factor: int = 2):
    """BatchTopK forward in normalised space on this rank: ``(ShardedTopK, threshold, factor)``.

    The ``ShardedTopK``'s slots are this rank's kept latents, the kept first in each row, as many slots
    as its fullest row keeps (one host sync), the rest value 0; ``threshold`` the step's smallest kept
    score (0-d); ``factor`` the candidates per row in multiples of K this step needed (pass it to the
    next step). Every rank of the mesh must call it with its share of the batch (``x_n``, the same on a
    model group) and its rows of the SAE, as ``sharded_forward``."""
    from .sharded import ShardedTopK, _CopyToGroup, _row_norms

    W_c, b_c, Wd_c = compute
    n_local = W_c.shape[0]
    offset = ctx.model_rank * n_local
    if dec_norm is None and weighted:
        dec_norm = _row_norms(Wd_c)
    if out_dtype is None and ctx.tp > 1 and Wd_c.dtype in (torch.bfloat16, torch.float16):
        out_dtype = torch.float32
    x_in = _CopyToGroup.apply(x_n, ctx.model_group) if ctx.tp > 1 and x_n.requires_grad else x_n
    keep_total = k * x_n.shape[0] * ctx.dp
    while True:
        c = min(factor * k, n_local)
        out = encode_for_training(x_in, W_enc, b_enc, c, dec_norm if weighted else None, compute=(W_c, b_c),
                                  keep_pre=keep_pre)
        values, lidx = out[0], out[1]
        with torch.no_grad():
            v = values.detach()
            acc = torch.float64 if v.dtype == torch.float64 else torch.float32
            scores = v.to(acc) * dec_norm.to(acc)[lidx] if weighted else v.to(acc)
            sel = batch_select(ctx, scores, lidx + offset, keep_total, complete=c == n_local)
        if not bool(sel.saturated):
            break
        factor *= 2
    with torch.no_grad():
        per_row = sel.keep.sum(1)
        m = max(1, int(per_row.max()))
        order = (~sel.keep).to(torch.uint8).argsort(dim=1, stable=True)[:, :m]  # the kept first
    kept = torch.where(sel.keep, values, torch.zeros_like(values))
    vals, idx = gather_slots(kept, lidx, order)
    x_hat = decode_slots(ctx, vals, idx, W_dec, Wd_c, b_dec, out_dtype)
    winners = torch.arange(m, device=per_row.device)[None, :] < per_row[:, None]
    fwd = ShardedTopK(x_hat, vals, idx + offset, idx, winners, k, out[2] if keep_pre else None)
    return fwd, sel.threshold, factor
