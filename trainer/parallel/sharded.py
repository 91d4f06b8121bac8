"""The exact global (weighted) TopK over latents sharded across a model group (docs/method.md sec. 8).

Latents are sharded over the model group: rank ``r`` holds rows ``[r*n/tp, (r+1)*n/tp)`` of ``W_enc``,
``b_enc``, ``W_dec`` (``n % tp == 0``); ``b_dec`` is replicated. ``sharded_forward``: local
``encode_for_training`` on the shard -> ``k`` candidates per token (score, global index) -> all-gather
``[tp, N, k]`` candidates (never ``N x d_sae``) -> every rank selects the same global top-k (score
descending, ties to the smaller global index) -> each rank keeps its own winners in a fixed ``[N, k]`` slot
layout (losers get value 0, so autograd through the encode and the decode is unchanged) -> local decode ->
all-reduce (sum) of the partial reconstructions (backward: identity, the gradient of the reconstruction is
replicated) -> ``+ b_dec`` after the reduction. ``sharded_select_decode`` makes a second selection (AuxK's,
among dead latents) from the forward's kept pre-activations the same way. At ``tp == 1`` both are exactly
the single-process ops.

``ShardedTopKSAE`` is a rank's shard of a ``TopKSAE`` (the whole SAE at tp 1: ``adopt`` shares its
parameters); ``full_state_dict`` / ``to_full`` gather it, ``load_full_state_dict`` re-shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sae_kernels import SAEConfig, TopKSAE
from sae_kernels._validate import check_k, check_tensor
from sae_kernels.ops import (
    EncodeScores, RowGrads, decode_for_training, encode_for_training, select_dense, subset_decode,
)

from .mesh import ParallelContext, _all_gather_single, _mark_sharded


def select_global_topk(scores: Tensor, gidx: Tensor, k: int) -> Tensor:
    """Mark the ``k`` winners per row among candidates ``scores, gidx [N, C]``.

    Order: larger score first; equal scores go to the smaller global index (two stable sorts), so
    the result does not depend on how the latents are sharded. Returns a bool ``[N, C]`` mask with
    exactly ``k`` True per row (``k <= C``).
    """
    if k > scores.shape[1]:
        raise ValueError(f"k: expected at most {scores.shape[1]} (the candidates per row), got {k}")
    by_index = torch.argsort(gidx, dim=1, stable=True)
    s = scores.gather(1, by_index)
    by_score = torch.argsort(s, dim=1, descending=True, stable=True)
    top = by_index.gather(1, by_score[:, :k])
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, top, True)


def _pack_dtypes(dtype: torch.dtype) -> Tuple[torch.dtype, torch.dtype]:
    # Scores travel in fp32 (bf16/fp16/fp32 upcast exactly), indices as int32 bits in the same
    # buffer: one collective of 8 bytes per candidate. float64 SAEs keep float64 / int64.
    return (torch.float64, torch.int64) if dtype == torch.float64 else (torch.float32, torch.int32)


# Autograd-aware all-reduce: forward sums the partial reconstructions, backward is the identity.
class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank of the group computes the same loss from the same summed reconstruction, so
        # d loss / d partial_r = d loss / d x_hat, already present on rank r: no collective.
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    """Forward: identity on the replicated input. Backward: sum of the group's partial input
    gradients (each rank's encoder shard contributes its own ``W_enc`` rows to ``d x``)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _row_norms(W: Tensor) -> Tensor:
    """``||W[i]||`` accumulated in fp32 without an fp32 copy of ``W`` (8.6 GB at 128x, d=4096)."""
    return torch.linalg.vector_norm(W.detach(), dim=1, dtype=torch.float32).to(W.dtype)


def sharded_forward(
    ctx: ParallelContext,
    x_n: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Optional[Tensor],
    k: int,
    weighted: bool = True,
    d_sae: Optional[int] = None,
    *,
    dec_norm: Optional[Tensor] = None,
    compute: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    keep_pre: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> "ShardedTopK":
    """Exact global (weighted) TopK SAE forward in normalised space over row shards.

    ``x_n [N, d_model]`` must be the same on every rank of the model group; ``W_enc, b_enc, W_dec``
    are this rank's rows (the parameters that receive the gradients), ``b_dec`` the replicated bias
    (or None), ``k`` the global number of latents kept per token. See ``ShardedTopK`` for what comes
    back. In one process (tp 1) it is exactly the single-process forward: one encode, one decode.

    Args:
        weighted: weight the selection by the decoder row norms (``dec_norm``, or computed from the
            decoder the math reads).
        dec_norm: this shard's decoder row norms, when the caller keeps them (``SAEAdam``'s fp32 norms).
        compute: ``(W_enc, b_enc, W_dec)`` as the math reads them (bf16 copies of fp32 masters;
            default: the parameters themselves). x_n must have their dtype.
        keep_pre: keep the encode's pre-activations (``ShardedTopK.scores``) for a second selection
            (AuxK: ``sharded_select_decode``).
        out_dtype: the reconstruction's dtype (default: the compute dtype; with tp > 1 a half
            compute dtype gives fp32, so shard partials are summed unrounded).
    """
    W_c, b_c, Wd_c = compute if compute is not None else (W_enc, b_enc, W_dec)
    n_local = W_c.shape[0]
    n = n_local * ctx.tp if d_sae is None else d_sae
    k = check_k(k, n)
    if dec_norm is None and weighted:
        dec_norm = _row_norms(Wd_c)
    if out_dtype is None and ctx.tp > 1 and Wd_c.dtype in (torch.bfloat16, torch.float16):
        out_dtype = torch.float32
    if ctx.tp == 1:
        # Exactly TopKSAE.forward's ops (same kernels, b_dec inside sparse_decode).
        out = encode_for_training(x_n, W_enc, b_enc, k, dec_norm, compute=(W_c, b_c), keep_pre=keep_pre)
        values, idx = out[0], out[1]
        x_hat = decode_for_training(values, idx, W_dec, b_dec, compute=Wd_c, out_dtype=out_dtype)
        win = torch.ones_like(idx, dtype=torch.bool)
        return ShardedTopK(x_hat, values, idx, idx, win, k, out[2] if keep_pre else None)
    if x_n.requires_grad:  # only then: SAE training reads activations without gradient
        x_n = _CopyToGroup.apply(x_n, ctx.model_group)
    out = encode_for_training(x_n, W_enc, b_enc, min(k, n_local), dec_norm, compute=(W_c, b_c),
                              keep_pre=keep_pre)
    kept, own, x_hat = _merge_decode(ctx, out[0], out[1], dec_norm, W_dec, Wd_c, b_dec, k, n, out_dtype)
    offset = ctx.model_rank * n_local
    return ShardedTopK(x_hat, kept, out[1] + offset, out[1], own, k, out[2] if keep_pre else None)


def sharded_select_decode(
    ctx: ParallelContext,
    scores: "EncodeScores",
    allowed: Tensor,
    k: int,
    W_dec: Tensor,
    *,
    compute: Optional[Tensor] = None,
    d_sae: Optional[int] = None,
    out_dtype: Optional[torch.dtype] = None,
    candidates: Optional[Tensor] = None,
    row_grads: Optional[RowGrads] = None,
) -> Optional[Tensor]:
    """The reconstruction (no ``b_dec``) by the exact global top-``k`` of the weighted scores among
    the latents where ``allowed`` (this shard's bool ``[n_local]``) is True: AuxK's selection among
    dead latents. Not-allowed latents count as zero, so rows with fewer than ``k`` allowed positive
    latents add nothing more.

    One model shard (tp 1): dense over ``candidates`` (int64 ``[m]`` local ids that include every
    allowed latent; None: ``allowed.nonzero()``, a host sync) with ``allowed`` masking them
    (``select_dense`` / ``subset_decode``: work in proportion to ``m``, from the forward's kept
    pre-activations or one GEMM over the candidates), the ``W_enc`` / ``b_enc`` / ``W_dec`` gradients
    of the candidate rows to ``row_grads`` (a ``RowGrads`` over ``candidates``; the caller adds them
    after the backward) or full-size. None when there is no candidate: the caller adds nothing.
    Several shards: the masked top-k of ``EncodeScores.select`` on each shard, merged over the model
    group like the forward's selection (full-size gradients).
    """
    Wd_c = compute if compute is not None else W_dec
    n_local = Wd_c.shape[0]
    n = n_local * ctx.tp if d_sae is None else d_sae
    k = check_k(k, n)
    if ctx.tp == 1:
        ids = allowed.nonzero().squeeze(1) if candidates is None else candidates
        if ids.numel() == 0:
            return None
        if row_grads is not None and row_grads.ids is not ids:
            raise ValueError("row_grads: expected a RowGrads over the candidates tensor")
        acts = select_dense(scores, ids, k, allowed=None if candidates is None else allowed.index_select(0, ids),
                            row_grads=row_grads)
        return subset_decode(acts, W_dec, ids, compute=Wd_c, row_grads=row_grads, out_dtype=out_dtype)
    values, idx = scores.select(min(k, n_local), allowed=allowed)
    dec_norm = scores.dec_norm
    if out_dtype is None and Wd_c.dtype in (torch.bfloat16, torch.float16):
        out_dtype = torch.float32
    return _merge_decode(ctx, values, idx, dec_norm, W_dec, Wd_c, None, k, n, out_dtype)[2]


def _merge_decode(ctx: ParallelContext, values: Tensor, idx: Tensor, dec_norm: Optional[Tensor], W_dec: Tensor, Wd_c: Tensor,
                  b_dec: Optional[Tensor], k: int, n: int, out_dtype: Optional[torch.dtype]):
    """Each shard's local top-k candidates ``(values, local ids)`` -> the global top-k (winners the
    same on every rank) -> ``(kept values, own winners, x_hat)``: losers hold 0, the partial decodes
    summed over the model group (fp32 for half weights), ``+ b_dec`` after the sum."""
    offset = ctx.model_rank * Wd_c.shape[0]
    with torch.no_grad():
        v = values.detach()
        # rank as the encode ranks: the value times the fp32 norm, not rounded back to a half dtype
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        scores = v if dec_norm is None else v.to(acc) * dec_norm.to(acc)[idx]
        win_all = _global_winners(ctx, scores, idx + offset, k, n)
        own = win_all[:, ctx.model_rank]
    kept = torch.where(own, values, torch.zeros_like(values))
    partial = decode_for_training(kept, idx, W_dec, None, compute=Wd_c, out_dtype=out_dtype)
    if partial.dtype in (torch.bfloat16, torch.float16):
        partial = partial.float()
    x_hat = _AllReduceSum.apply(partial, ctx.model_group)
    if b_dec is not None:
        x_hat = x_hat + b_dec.to(x_hat.dtype)
    return kept, own, x_hat


def _global_winners(ctx: ParallelContext, scores: Tensor, gidx: Tensor, k: int, n: int) -> Tensor:
    """All-gather the candidates of the model group; bool ``[N, tp, k_local]`` winners (same on all ranks)."""
    N, kl = scores.shape
    sdt, idt = _pack_dtypes(scores.dtype)
    if idt == torch.int32 and n > torch.iinfo(torch.int32).max:
        sdt, idt = torch.float64, torch.int64
    packed = torch.cat([scores.to(sdt), gidx.to(idt).view(sdt)], dim=1).contiguous()
    out = torch.empty((ctx.tp * N, 2 * kl), dtype=sdt, device=packed.device)
    _all_gather_single(out, packed, group=ctx.model_group)
    out = out.view(ctx.tp, N, 2 * kl).transpose(0, 1)  # [N, tp, 2 kl]
    cand_s = out[..., :kl].reshape(N, ctx.tp * kl)
    cand_i = out[..., kl:].contiguous().view(idt).reshape(N, ctx.tp * kl)
    return select_global_topk(cand_s, cand_i, k).view(N, ctx.tp, kl)


@dataclass
class ShardedTopK:
    """The result of ``sharded_forward`` on one rank.

    Attributes:
        x_hat: ``[N, d_model]`` reconstruction in normalised space, the same on every rank of the group.
        values: ``[N, k_local]`` this rank's slots (differentiable); slots that lost the global
            selection hold 0. ``k_local = min(k, d_sae / tp)`` (``k`` when ``tp == 1``).
        indices: ``[N, k_local]`` global latent ids of the slots.
        local_indices: ``[N, k_local]`` the same ids relative to this shard (for per-shard statistics).
        winners: ``[N, k_local]`` bool, the slots in the global top-k (exactly ``k`` per row over the group).
        k: the global k.
        scores: the encode's kept pre-activations (``keep_pre=True``) for ``sharded_select_decode``, or None.
    """

    x_hat: Tensor
    values: Tensor
    indices: Tensor
    local_indices: Tensor
    winners: Tensor
    k: int
    scores: Optional[EncodeScores] = None

    def __iter__(self):  # (x_hat, values, indices), as in the single-process API
        return iter((self.x_hat, self.values, self.indices))


class ShardedTopKSAE(nn.Module):
    """This rank's shard of a ``TopKSAE``: rows of ``W_enc``, ``b_enc``, ``W_dec`` (and ``threshold``);
    ``b_dec`` replicated. Parameter names and order match ``TopKSAE`` (so an optimizer built on
    ``parameters()`` has the same state layout), ``cfg`` is the full model's config.

    ``forward`` / ``forward_normalised`` expect the same input on every rank of the model group (the
    trainer's ``RowExchange`` delivers the group's rows to each of its ranks).
    """

    def __init__(self, cfg: SAEConfig, ctx: ParallelContext, device=None) -> None:
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise ValueError(f"cfg: expected an SAEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.ctx = ctx
        self.n_local = ctx.check_width(cfg.d_sae)
        self.offset = ctx.model_rank * self.n_local
        device = ctx.device if device is None else device
        n, d, dt = self.n_local, cfg.d_model, cfg.torch_dtype
        self.W_enc = _mark_sharded(nn.Parameter(torch.zeros(n, d, dtype=dt, device=device)))
        self.b_enc = _mark_sharded(nn.Parameter(torch.zeros(n, dtype=dt, device=device)))
        self.W_dec = _mark_sharded(nn.Parameter(torch.zeros(n, d, dtype=dt, device=device)))
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dt, device=device))
        self.register_buffer("threshold", torch.zeros(n, dtype=torch.float32, device=device))

    @classmethod
    def from_full(cls, sae: TopKSAE, ctx: ParallelContext, device=None) -> "ShardedTopKSAE":
        """Shard a full ``TopKSAE`` (every rank builds it from the same seed, or loads it)."""
        out = cls(sae.cfg, ctx, device=device)
        out.load_full_state_dict(sae.state_dict())
        return out

    @classmethod
    def adopt(cls, sae: TopKSAE, ctx: ParallelContext) -> "ShardedTopKSAE":
        """The whole ``sae`` as the one shard of a model group of one (tp 1: one process, or data
        parallel): the same parameter tensors, not copies, so an optimizer built on ``sae`` updates it."""
        if ctx.tp != 1:
            raise ValueError(f"sae: a TopKSAE is the whole model, which one rank holds only at tp 1 (got tp {ctx.tp}); "
                             "shard it with ShardedTopKSAE.from_full(sae, ctx)")
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.cfg, out.ctx, out.n_local, out.offset = sae.cfg, ctx, sae.cfg.d_sae, 0
        for name in ("W_enc", "b_enc", "W_dec"):
            setattr(out, name, _mark_sharded(getattr(sae, name)))
        out.b_dec = sae.b_dec
        out.register_buffer("threshold", sae.threshold)
        return out

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def extra_repr(self) -> str:
        return f"d_sae={self.cfg.d_sae} ({self.n_local} here, rows [{self.offset}, {self.offset + self.n_local})), tp={self.ctx.tp}"

    # ------------------------------------------------------------------ forward

    def _k(self, k: Optional[int]) -> int:
        return self.cfg.k if k is None else check_k(k, self.cfg.d_sae)

    def forward_normalised(self, x_n: Tensor, k: Optional[int] = None) -> ShardedTopK:
        """``x_n [N, d_model]`` (normalised space, same on the whole model group) -> ``ShardedTopK``."""
        if self.cfg.activation != "topk":
            raise ValueError("ShardedTopKSAE: only activation='topk' trains sharded")
        check_tensor("x_n", x_n, ndim=2, device=self.W_enc.device)
        return sharded_forward(
            self.ctx, x_n.to(self.W_enc.dtype), self.W_enc, self.b_enc, self.W_dec, self.b_dec,
            self._k(k), self.cfg.weighted_topk, d_sae=self.cfg.d_sae,
        )

    def forward(self, x: Tensor, k: Optional[int] = None) -> Tensor:
        """Raw ``x [..., d_model]`` (same on the model group) -> raw reconstruction, like ``TopKSAE``."""
        lead = x.shape[:-1]
        x_n = x.reshape(-1, self.cfg.d_model).to(self.W_enc.dtype)
        if self.cfg.norm_in != 1.0:
            x_n = x_n * self.cfg.norm_in
        out = self.forward_normalised(x_n, k).x_hat
        out = out / self.cfg.norm_out if self.cfg.norm_out != 1.0 else out
        return out.reshape(*lead, self.cfg.d_model).to(x.dtype)

    # ------------------------------------------------------------------ state

    def full_state_dict(self) -> Optional[Dict[str, Tensor]]:
        """``TopKSAE.state_dict()`` of the whole model (CPU tensors) on global rank 0, None elsewhere.

        Collective over the model group of data rank 0 only (the other data groups hold the same values).
        """
        if self.ctx.data_rank != 0:
            return None
        out = {}
        for name, t in self.state_dict().items():
            if name in ("W_enc", "b_enc", "W_dec", "threshold"):
                out[name] = self.ctx.gather_rows(t)
            else:
                out[name] = t.detach().cpu().clone()
        return out if self.ctx.is_main else None

    def to_full(self) -> Optional[TopKSAE]:
        """The gathered ``TopKSAE`` (on CPU) on global rank 0, None elsewhere; save it with the
        single-process code (``to_llama_scope``, ``save``)."""
        sd = self.full_state_dict()
        if sd is None:
            return None
        sae = TopKSAE(self.cfg, init=False)
        sae.load_state_dict(sd)
        return sae

    @torch.no_grad()
    def load_full_state_dict(self, sd: Dict[str, Any]) -> None:
        """Load full-shape tensors (a ``TopKSAE`` state dict, possibly from a run with another tp)."""
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            if name not in sd:
                if name == "threshold":
                    continue
                raise ValueError(f"state dict: missing {name!r}")
            t = sd[name]
            dst = getattr(self, name)
            want = (self.cfg.d_sae,) + tuple(dst.shape[1:]) if name != "b_dec" else tuple(dst.shape)
            if tuple(t.shape) != want:
                raise ValueError(f"state dict: {name}: expected full shape {list(want)}, got {list(t.shape)}")
            src = self.ctx.shard_rows(t, device=dst.device) if name != "b_dec" else t
            dst.copy_(src.to(dst.dtype))
