"""Mixed data x tensor parallelism on torch.distributed: exact global TopK over sharded latents.

SPEC.md section 8. A 2-D ``DeviceMesh`` with dimensions ``("data", "model")``: ``tp`` = size of
"model", ``dp = world // tp``. Global rank ``g`` sits at ``(data_rank, model_rank) = (g // tp, g % tp)``,
so the ranks of a model group are consecutive (one node, NVLink) and the data groups stride across.

What each part does:

* **Producers** (the LM) are data-parallel over every rank: LM batch ``b`` of the run's one global
  sequence runs on rank ``b % world`` (``trainer.producer``), into one global activation buffer whose
  rows stay on the rank that made them (``trainer.buffer``). ``RowExchange`` moves each step's rows,
  row for row the single-process batch, to the ranks that train on them: a model group gets its
  ``batch_size / dp`` share, the same on every rank of the group (SPEC.md sec. 8, layout independence).
* **Suites**: ``place_members`` puts each SAE of a suite on model groups (balanced by parameter
  count) and ``member_contexts`` gives each member a context over its ranks; ``RowExchange`` sends a
  rank only the columns of the hook points it trains.
* **Latents** are sharded over the model group: rank ``r`` holds rows ``[r*n/tp, (r+1)*n/tp)`` of
  ``W_enc``, ``b_enc``, ``W_dec`` (``n % tp == 0``); ``b_dec`` is replicated.
* **Exact global weighted TopK** (``ParallelContext.sharded_forward``): local ``topk_encode`` on the shard ->
  ``k`` candidates per token (score, global index) -> all-gather ``[tp, N, k]`` candidates (never
  ``N x d_sae``) -> every rank selects the same global top-k (score descending, ties to the smaller
  global index) -> each rank keeps its own winners in a fixed ``[N, k]`` slot layout (losers get value
  0, so autograd through ``topk_encode`` / ``sparse_decode`` is unchanged) -> local ``sparse_decode``
  -> all-reduce (sum) of the partial reconstructions (backward: identity, the gradient of the
  reconstruction is replicated) -> ``+ b_dec`` on every rank after the reduction.
* **Gradients**: sharded parameters are averaged over the "data" dimension; replicated ones
  (``b_dec``) over the whole world. ``b_dec``'s gradient is the same on every rank of a model group
  (each rank computes it from the same replicated reconstruction gradient), so averaging it over the
  world equals the data average and keeps ``b_dec`` bit-identical on all ranks.
* **Clipping** uses the global norm (shard norms summed over the model group), so ``clip_grad_norm_``
  and then Adam on a shard are exactly single-process Adam on those rows.
* **Checkpoints**: ``gather_full_state`` (``ShardedTopKSAE.full_state_dict`` / ``to_full`` and
  ``gather_optimizer_state_dict``) gives global rank 0 the module and optimizer ``state_dict`` that a
  single-process run holds (full shapes), so the single-process checkpoint code writes them;
  ``shard_state`` re-shards on load, so a run resumes with the same or a different ``--tp``.
  ``save_checkpoint`` / ``load_checkpoint`` do it in the Llama Scope folder layout for code that
  does not use ``trainer.train.Trainer``.
* **Failures**: every process group gets ``timeout_s``; a dead peer makes gloo raise at once
  ("connection closed by peer"), a hung one after ``timeout_s``. ``ctx.guard()`` turns any
  exception into ``os._exit(1)`` so a rank never hangs in teardown. torchrun then stops the rest.

``trainer.train.SAEStep`` runs on a context: the one step of every layout.

A world of one process with ``tp == 1`` is a no-op context: every helper returns its input and
``ShardedTopKSAE`` computes exactly ``TopKSAE``'s forward, so the trainer can always use this path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sae_kernels import SAEConfig, TopKSAE
from sae_kernels._validate import check_k, check_tensor
from sae_kernels.ops import EncodeScores, decode_for_training, encode_for_training, select_dense, subset_decode

from .h2d import gather_rows

DIM_NAMES = ("data", "model")
# all_gather_into_tensor was renamed all_gather_single (torch 2.13 deprecates the old name).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
DEFAULT_TIMEOUT_S = 1800.0
# Checkpoint gathers move at most this many bytes per rank per collective, so gathering a 128x
# SAE (8.6 GB per fp32 matrix at d=4096) needs one chunk of headroom on rank 0, not a full copy.
_GATHER_CHUNK_BYTES = 256 << 20


def is_sharded(p: Tensor) -> bool:
    """True for a parameter whose rows are split over the model group (set by ``ShardedTopKSAE``)."""
    return bool(getattr(p, "tp_sharded", False))


def _mark_sharded(p: Tensor) -> Tensor:
    p.tp_sharded = True
    return p


# --------------------------------------------------------------------------------------------------
# Global selection: a pure function, testable without a process group.
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Autograd-aware all-reduce: forward sums the partial reconstructions, backward is the identity.
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The context
# --------------------------------------------------------------------------------------------------


@dataclass
class ParallelContext:
    """Where this process sits in the (data, model) mesh, its groups, and the collectives it uses.

    Build it with ``init_parallel``. Attributes: ``rank`` / ``world_size`` (global), ``local_rank``,
    ``tp`` / ``model_rank`` (position in the model group), ``dp`` / ``data_rank``, ``device``,
    ``backend`` ("gloo", "nccl" or None when not distributed), ``mesh`` (the ``DeviceMesh`` or None).
    """

    tp: int = 1
    dp: int = 1
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    model_rank: int = 0
    data_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    mesh: Any = None
    model_group: Any = None
    data_group: Any = None
    owns_process_group: bool = False
    # The ranks this context spans ("world" below): None = every rank of the job. A member of a suite
    # trained by some of the ranks gets a context over those (``member_contexts``).
    world_group: Any = None

    # ------------------------------------------------------------------ facts

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: logs, writes checkpoints."""
        return self.rank == 0

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size} (data {self.data_rank}/{self.dp}, model {self.model_rank}/{self.tp}) "
            f"backend={self.backend} device={self.device}"
        )

    def check_width(self, d_sae: int) -> int:
        """Latents per rank; a clear error when ``d_sae`` does not split evenly."""
        if d_sae % self.tp:
            raise ValueError(
                f"d_sae={d_sae} is not divisible by tp={self.tp}: the latents are split into tp equal "
                f"row shards; choose a width (expansion x d_model) that is a multiple of tp"
            )
        return d_sae // self.tp

    def shard_range(self, n: int) -> Tuple[int, int]:
        """Rows ``[lo, hi)`` of an ``n``-row tensor that this rank holds."""
        m = self.check_width(n)
        return self.model_rank * m, (self.model_rank + 1) * m

    def shard_rows(self, t, device=None) -> Tensor:
        """This rank's rows of a full tensor (or of a lazily sliced safetensors slice) as a new tensor."""
        n = t.shape[0] if isinstance(t, Tensor) else t.get_shape()[0]
        lo, hi = self.shard_range(n)
        out = t[lo:hi]  # a safetensors slice reads only these rows from disk
        return out.to(device=device if device is not None else self.device, copy=True).contiguous()

    # ------------------------------------------------------------------ collectives (no-ops when alone)

    def _reduce(self, t: Tensor, group, size: int, op: str) -> Tensor:
        if size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
        return t / size if op == "mean" else t

    def model_all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """Sum / mean / max over the model group (out of place)."""
        return self._reduce(t, self.model_group, self.tp, op)

    def data_all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """Sum / mean / max over the data dimension (ranks holding the same shard)."""
        return self._reduce(t, self.data_group, self.dp, op)

    def world_all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """Sum / mean / max over every rank (e.g. the dataset-norm estimate: ``op="mean"``)."""
        return self._reduce(t, self.world_group, self.world_size, op)

    def data_mean(self, t: Tensor) -> Tensor:
        """Mean over the data-parallel groups (identity with one): a value of the whole step's batch
        from each group's share (an FVU denominator, a logged metric)."""
        return self.data_all_reduce(t, "mean")

    def batch_mean(self, y: Tensor) -> Tensor:
        """Mean over the tokens of the whole step's batch (every data group's share), ``[1, d]``."""
        return self.data_all_reduce(y.mean(0, keepdim=True), "mean")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.world_group)

    def gather_object(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj`` (in rank order) on rank 0 of this context, None elsewhere."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dst = 0 if self.world_group is None else dist.get_global_rank(self.world_group, 0)
        dist.gather_object(obj, out, dst=dst, group=self.world_group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Global rank ``src``'s Python object on every rank (config checks, resume step)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_batch(self, x: Tensor, equal_sizes: bool = True) -> Tensor:
        """Concatenate the model group's batches along dim 0, in model-rank order.

        With ``equal_sizes`` (the training batches) one collective; otherwise ranks may hold
        different numbers of rows (see ``all_gather_rows``). With ``tp == 1`` returns ``x`` itself.
        """
        if self.tp == 1:
            return x
        if not equal_sizes:
            return self.all_gather_rows(x)[0]
        x = x.contiguous()
        out = torch.empty((self.tp * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x, group=self.model_group)
        return out

    def all_gather_rows(self, x: Tensor) -> Tuple[Tensor, List[int]]:
        """``all_gather_batch`` for ranks holding different numbers of rows; also returns the counts
        (one extra tiny collective for the sizes)."""
        if self.tp == 1:
            return x, [x.shape[0]]
        x = x.contiguous()
        sizes = torch.tensor([x.shape[0]], dtype=torch.int64, device=self.device)
        all_sizes = torch.empty(self.tp, dtype=torch.int64, device=self.device)
        _all_gather_single(all_sizes, sizes, group=self.model_group)
        counts = all_sizes.tolist()
        m = max(counts)
        if m != x.shape[0]:
            pad = torch.zeros((m - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            x = torch.cat([x, pad])
        out = torch.empty((self.tp * m,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x, group=self.model_group)
        if all(c == m for c in counts):
            return out, counts
        return torch.cat([out[r * m: r * m + c] for r, c in enumerate(counts)]), counts

    def own_rows(self, full: Tensor, counts: Sequence[int]) -> Tensor:
        """Inverse of ``all_gather_batch``: this rank's rows of a group-concatenated tensor."""
        lo = sum(counts[: self.model_rank])
        return full[lo: lo + counts[self.model_rank]]

    def gather_rows(self, t: Tensor, to_cpu: bool = True) -> Optional[Tensor]:
        """The full tensor from the model group's row shards, on model rank 0 (None elsewhere).

        Collective over the model group only; gathered in chunks of at most ``_GATHER_CHUNK_BYTES``
        per rank so the peak extra memory is ``tp`` chunks, not a second full copy on the device.
        """
        if self.tp == 1:
            return t.detach().cpu().clone() if to_cpu else t.detach().clone()
        t = t.detach().contiguous()
        rows = t.shape[0]
        row_bytes = max(1, t[:1].numel() * t.element_size())
        step = max(1, min(rows, _GATHER_CHUNK_BYTES // row_bytes)) if rows else 1
        main = self.model_rank == 0
        out = None
        if main:
            out = torch.empty((rows * self.tp,) + tuple(t.shape[1:]), dtype=t.dtype,
                              device="cpu" if to_cpu else t.device)
        src_rank = dist.get_global_rank(self.model_group, 0)
        for s in range(0, rows, step):
            e = min(rows, s + step)
            chunk = t[s:e].contiguous()
            bufs = [torch.empty_like(chunk) for _ in range(self.tp)] if main else None
            dist.gather(chunk, gather_list=bufs, dst=src_rank, group=self.model_group)
            if main:
                for r, b in enumerate(bufs):
                    out[r * rows + s: r * rows + e].copy_(b)
        return out

    # ------------------------------------------------------------------ the sharded forward

    def sharded_forward(
        self,
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
        n = n_local * self.tp if d_sae is None else d_sae
        k = check_k(k, n)
        if dec_norm is None and weighted:
            dec_norm = _row_norms(Wd_c)
        if out_dtype is None and self.tp > 1 and Wd_c.dtype in (torch.bfloat16, torch.float16):
            out_dtype = torch.float32
        if self.tp == 1:
            # Exactly TopKSAE.forward's ops (same kernels, b_dec inside sparse_decode).
            out = encode_for_training(x_n, W_enc, b_enc, k, dec_norm, compute=(W_c, b_c), keep_pre=keep_pre)
            values, idx = out[0], out[1]
            x_hat = decode_for_training(values, idx, W_dec, b_dec, compute=Wd_c, out_dtype=out_dtype)
            win = torch.ones_like(idx, dtype=torch.bool)
            return ShardedTopK(x_hat, values, idx, idx, win, k, out[2] if keep_pre else None)
        if x_n.requires_grad:  # only then: SAE training reads activations without gradient
            x_n = _CopyToGroup.apply(x_n, self.model_group)
        out = encode_for_training(x_n, W_enc, b_enc, min(k, n_local), dec_norm, compute=(W_c, b_c),
                                  keep_pre=keep_pre)
        kept, own, x_hat = self._merge_decode(out[0], out[1], dec_norm, W_dec, Wd_c, b_dec, k, n, out_dtype)
        offset = self.model_rank * n_local
        return ShardedTopK(x_hat, kept, out[1] + offset, out[1], own, k, out[2] if keep_pre else None)

    def sharded_select_decode(
        self,
        scores: "EncodeScores",
        allowed: Tensor,
        k: int,
        W_dec: Tensor,
        *,
        compute: Optional[Tensor] = None,
        d_sae: Optional[int] = None,
        out_dtype: Optional[torch.dtype] = None,
    ) -> Optional[Tensor]:
        """The reconstruction (no ``b_dec``) by the exact global top-``k`` of the weighted scores among
        the latents where ``allowed`` (this shard's bool ``[n_local]``) is True, from the pre-activations
        ``sharded_forward(..., keep_pre=True)`` kept: AuxK's selection among dead latents, with no second
        encoder GEMM where they were kept. Not-allowed latents count as zero, so rows with fewer than
        ``k`` allowed positive latents add nothing more. Returns None when no latent is allowed and the
        route knows it without a collective (one process on the CPU); the caller adds nothing then.

        One process on the CPU (a host sync is free): dense over the allowed latents only
        (``select_dense`` / ``subset_decode``: work in proportion to their number). Elsewhere: the
        masked top-k of ``EncodeScores.select`` on each shard, merged over the model group like the
        forward's selection.
        """
        Wd_c = compute if compute is not None else W_dec
        n_local = Wd_c.shape[0]
        n = n_local * self.tp if d_sae is None else d_sae
        k = check_k(k, n)
        if self.tp == 1 and scores.pre is not None and scores.pre.device.type == "cpu":
            ids = allowed.nonzero().squeeze(1)
            if ids.numel() == 0:
                return None
            return subset_decode(select_dense(scores, ids, k), W_dec, ids, compute=Wd_c)
        values, idx = scores.select(min(k, n_local), allowed=allowed)
        if self.tp == 1:
            return decode_for_training(values, idx, W_dec, None, compute=Wd_c, out_dtype=out_dtype)
        dec_norm = scores.dec_norm
        if out_dtype is None and Wd_c.dtype in (torch.bfloat16, torch.float16):
            out_dtype = torch.float32
        return self._merge_decode(values, idx, dec_norm, W_dec, Wd_c, None, k, n, out_dtype)[2]

    def _merge_decode(self, values: Tensor, idx: Tensor, dec_norm: Optional[Tensor], W_dec: Tensor, Wd_c: Tensor,
                      b_dec: Optional[Tensor], k: int, n: int, out_dtype: Optional[torch.dtype]):
        """Each shard's local top-k candidates ``(values, local ids)`` -> the global top-k (winners the
        same on every rank) -> ``(kept values, own winners, x_hat)``: losers hold 0, the partial decodes
        summed over the model group (fp32 for half weights), ``+ b_dec`` after the sum."""
        offset = self.model_rank * Wd_c.shape[0]
        with torch.no_grad():
            v = values.detach()
            # rank as the encode ranks: the value times the fp32 norm, not rounded back to a half dtype
            acc = torch.float64 if v.dtype == torch.float64 else torch.float32
            scores = v if dec_norm is None else v.to(acc) * dec_norm.to(acc)[idx]
            win_all = self._global_winners(scores, idx + offset, k, n)
            own = win_all[:, self.model_rank]
        kept = torch.where(own, values, torch.zeros_like(values))
        partial = decode_for_training(kept, idx, W_dec, None, compute=Wd_c, out_dtype=out_dtype)
        if partial.dtype in (torch.bfloat16, torch.float16):
            partial = partial.float()
        x_hat = _AllReduceSum.apply(partial, self.model_group)
        if b_dec is not None:
            x_hat = x_hat + b_dec.to(x_hat.dtype)
        return kept, own, x_hat

    def _global_winners(self, scores: Tensor, gidx: Tensor, k: int, n: int) -> Tensor:
        """All-gather the candidates of the model group; bool ``[N, tp, k_local]`` winners (same on all ranks)."""
        N, kl = scores.shape
        sdt, idt = _pack_dtypes(scores.dtype)
        if idt == torch.int32 and n > torch.iinfo(torch.int32).max:
            sdt, idt = torch.float64, torch.int64
        packed = torch.cat([scores.to(sdt), gidx.to(idt).view(sdt)], dim=1).contiguous()
        out = torch.empty((self.tp * N, 2 * kl), dtype=sdt, device=packed.device)
        _all_gather_single(out, packed, group=self.model_group)
        out = out.view(self.tp, N, 2 * kl).transpose(0, 1)  # [N, tp, 2 kl]
        cand_s = out[..., :kl].reshape(N, self.tp * kl)
        cand_i = out[..., kl:].contiguous().view(idt).reshape(N, self.tp * kl)
        return select_global_topk(cand_s, cand_i, k).view(N, self.tp, kl)

    def gather_selection(self, out: "ShardedTopK") -> Tuple[Tensor, Tensor]:
        """The global selection ``(values, indices) [N, k]`` (no autograd; tests and logging only).

        Within a row the winners come in model-rank order, then in ``topk_encode``'s slot order.
        """
        v, i, w = out.values.detach(), out.indices, out.winners
        if self.tp > 1:
            N, kl = v.shape
            sdt, idt = _pack_dtypes(v.dtype)
            packed = torch.cat([v.to(sdt), i.to(idt).view(sdt), w.to(sdt)], dim=1).contiguous()
            g = torch.empty((self.tp * N, 3 * kl), dtype=sdt, device=v.device)
            _all_gather_single(g, packed, group=self.model_group)
            g = g.view(self.tp, N, 3 * kl).transpose(0, 1)
            v = g[..., :kl].reshape(N, -1).to(out.values.dtype)
            i = g[..., kl: 2 * kl].contiguous().view(idt).reshape(N, -1).long()
            w = g[..., 2 * kl:].reshape(N, -1) > 0
        order = torch.argsort((~w).to(torch.int8), dim=1, stable=True)[:, : out.k]
        return v.gather(1, order), i.gather(1, order)

    # ------------------------------------------------------------------ gradients

    def sync_grads(self, params: Iterable[Tensor]) -> None:
        """Average gradients: sharded parameters over "data", replicated ones over the world.

        A parameter without a gradient is treated as zero gradient (and gets one), so every rank
        issues the same collectives.
        """
        if not self.distributed:
            return
        params = list(params)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        sharded = [p.grad for p in params if is_sharded(p)]
        replicated = [p.grad for p in params if not is_sharded(p)]
        if sharded and self.dp > 1:
            _all_reduce_mean_(sharded, self.data_group, self.dp)
        if replicated:
            _all_reduce_mean_(replicated, self.world_group, self.world_size)

    def grad_norm(self, params: Iterable[Tensor]) -> Tensor:
        """Global L2 norm of the gradients of the whole (unsharded) model, the same on every rank.

        Call after ``sync_grads``. The norm of the parameters' norms; a sharded parameter's norm is
        the root of its shards' squared norms summed over the model group. fp32 scalar tensor, no host
        sync; in one process exactly ``vector_norm`` of the per-parameter norms.
        """
        params = [p for p in params if p.grad is not None]
        if not params:
            return torch.zeros((), dtype=torch.float32, device=self.device)
        norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params]
        sharded = [i for i, p in enumerate(params) if is_sharded(p)]
        if self.tp > 1 and sharded:
            sq = self.model_all_reduce(torch.stack([norms[i] for i in sharded]).square())
            for j, i in enumerate(sharded):
                norms[i] = sq[j].sqrt()
        return torch.linalg.vector_norm(torch.stack(norms))

    def clip_grad_norm_(self, params: Iterable[Tensor], max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` with the global norm (``grad_norm``); returns the norm."""
        params = [p for p in params if p.grad is not None]
        total = self.grad_norm(params)
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
        return total

    # ------------------------------------------------------------------ failure handling

    @contextlib.contextmanager
    def guard(self) -> Iterator["ParallelContext"]:
        """Run a rank's work; on any exception print it and ``os._exit(1)`` at once.

        Skips interpreter teardown (joining communication threads of a broken group can block), so
        the process ends non-zero within the collective timeout of a peer's death.
        """
        try:
            yield self
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 -- any failure of a rank ends the job
            if isinstance(e, SystemExit) and e.code in (0, None):
                raise
            sys.stderr.write(f"[rank {self.rank}] fatal: {type(e).__name__}: {e}\n")
            traceback.print_exc()
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)

    def shutdown(self) -> None:
        """Destroy the process group this context created (a clean end of a run)."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def _row_norms(W: Tensor) -> Tensor:
    """``||W[i]||`` accumulated in fp32 without an fp32 copy of ``W`` (8.6 GB at 128x, d=4096)."""
    return torch.linalg.vector_norm(W.detach(), dim=1, dtype=torch.float32).to(W.dtype)


# Gradients at least this large are all-reduced in place, one collective each (W_enc / W_dec
# shards: no flat copy of gigabytes); smaller ones share one flat buffer per dtype.
_BUCKET_NUMEL = 1 << 22


def _all_reduce_mean_(tensors: List[Tensor], group, size: int) -> None:
    """In-place mean over ``group`` of a list of tensors."""
    by_dtype: Dict[torch.dtype, List[Tensor]] = {}
    for t in tensors:
        if t.numel() >= _BUCKET_NUMEL and t.is_contiguous():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            t.div_(size)
        else:
            by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(size)
        o = 0
        for t in ts:
            t.copy_(flat[o: o + t.numel()].view_as(t))
            o += t.numel()


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

    def fired_local(self, n_local: int) -> Tensor:
        """Bool ``[n_local]``: latents of this shard with a positive value in this batch."""
        idx = self.local_indices[self.values.detach() > 0]
        out = torch.zeros(n_local, dtype=torch.bool, device=idx.device)
        return out.index_fill_(0, idx, True)

    def l0_sum(self) -> Tensor:
        """Number of positive latent values in this rank's slots (sum over the model group = total L0 * N)."""
        return (self.values.detach() > 0).sum()


# --------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an int, got {v!r}") from None


def init_parallel(
    tp: int = 1,
    backend: Optional[str] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: Optional[Union[str, torch.device]] = None,
) -> ParallelContext:
    """Join the job that torchrun started (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``) and build the (data, model) mesh with ``tp`` model ranks per group.

    Args:
        tp: tensor-parallel size (ranks sharing one SAE's latents). ``world_size % tp == 0``.
        backend: "nccl" or "gloo"; default NCCL when CUDA is available, else gloo.
        timeout_s: collective timeout of every group: a peer that dies or hangs makes the others
            raise within this many seconds (a dead peer on gloo: at once).
        device: override the device (default ``cuda:LOCAL_RANK`` when CUDA is available, else the
            CPU; "cuda" without an index means ``cuda:LOCAL_RANK``; a CPU device selects gloo).

    Without torchrun variables (or ``WORLD_SIZE=1``) and ``tp == 1`` returns the no-op context.
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp: expected a positive int, got {tp!r}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s!r}")
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE")
    if world % tp:
        raise ValueError(
            f"--tp {tp} does not divide the world size {world}: the world splits into world/tp "
            f"data-parallel groups of tp model ranks; launch a multiple of {tp} processes"
        )
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and world > 1:
            device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if backend is None:
        use_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        backend = "nccl" if use_cuda else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend: expected 'nccl' or 'gloo', got {backend!r}")
    if device is None:
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if backend == "nccl" else torch.device("cpu")
    if world == 1:
        return ParallelContext(device=device, timeout_s=float(timeout_s))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    td = datetime.timedelta(seconds=float(timeout_s))
    owns = False
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=td, **kwargs)
        owns = True
    dp = world // tp
    # Sub-groups do not inherit the default group's timeout: pass it through backend options.
    # (one options object per dimension: process-group construction writes group fields into it)
    opts = {name: _backend_options(backend, td) for name in DIM_NAMES}
    override = {name: (backend, o) for name, o in opts.items()} if None not in opts.values() else None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        device.type, (dp, tp), mesh_dim_names=DIM_NAMES, backend_override=override
    )
    coord = mesh.get_coordinate()
    data_rank, model_rank = (coord[0], coord[1]) if coord is not None else (rank // tp, rank % tp)
    return ParallelContext(
        tp=tp, dp=dp, rank=rank, world_size=world, local_rank=local_rank,
        model_rank=model_rank, data_rank=data_rank, device=device, backend=backend,
        timeout_s=float(timeout_s), mesh=mesh, model_group=mesh.get_group("model"),
        data_group=mesh.get_group("data"), owns_process_group=owns,
    )


def shutdown_parallel() -> None:
    """Destroy the default process group (and with it every mesh group), if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _backend_options(backend: str, td: datetime.timedelta):
    try:
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
        else:
            opts = dist.ProcessGroupNCCL.Options()
    except AttributeError:  # a build without this backend's options: default timeout (30 min)
        return None
    opts._timeout = td
    return opts


# --------------------------------------------------------------------------------------------------
# Suites: members placed on model groups, and the rows each step moves to the ranks that train on them
# --------------------------------------------------------------------------------------------------


def place_members(sizes: Sequence[int], n_groups: int, batch_size: int) -> List[List[int]]:
    """The model groups (data ranks of the mesh) that train each member, given its parameter count.

    At least as many members as groups: each member goes to one group, the largest first onto the
    least loaded group (ties: the earlier member, the lower group), so the groups hold about the same
    number of parameters. Fewer members than groups: each member gets ``dp`` groups of its own and is
    data-parallel over them, ``dp`` the largest divisor of ``batch_size`` up to ``n_groups // members``
    (one SAE on every group: plain data parallelism). A pure function: every rank computes the same.
    """
    m = len(sizes)
    if m == 0:
        return []
    if m >= n_groups:
        load = [0] * n_groups
        out: List[List[int]] = [[] for _ in range(m)]
        for i in sorted(range(m), key=lambda i: (-sizes[i], i)):
            g = min(range(n_groups), key=lambda g: (load[g], g))
            load[g] += sizes[i]
            out[i] = [g]
        return out
    dp = max(d for d in range(1, n_groups // m + 1) if batch_size % d == 0)
    return [list(range(i * dp, (i + 1) * dp)) for i in range(m)]


def member_contexts(ctx: ParallelContext, placement: Sequence[Sequence[int]]) -> List[Optional[ParallelContext]]:
    """For each member, the context over the ranks that train it (None on the other ranks).

    A member on ``dp_m`` model groups is a (dp_m, tp) mesh of its own: the model group is the mesh's,
    the data dimension runs over its groups, and "world" means its ``dp_m * tp`` ranks; a member on
    every group gets the job's context as is. Collective: every rank must call it with the same
    placement (sub-groups are created in the same order everywhere).
    """
    out: List[Optional[ParallelContext]] = []
    made: Dict[Tuple[int, ...], Any] = {}
    td = datetime.timedelta(seconds=ctx.timeout_s)

    def group(ranks: Sequence[int]):
        key = tuple(ranks)
        if key not in made:
            made[key] = dist.new_group(list(ranks), timeout=td)
        return made[key]

    for groups in placement:
        groups = list(groups)
        if len(groups) == ctx.dp:
            out.append(ctx if ctx.data_rank in groups else None)
            continue
        dp_m = len(groups)
        data_group = world_group = None
        if ctx.distributed:  # create the member's groups on every rank, in the same order
            if dp_m > 1:
                for mr in range(ctx.tp):
                    g = group([d * ctx.tp + mr for d in groups])
                    if mr == ctx.model_rank:
                        data_group = g
            world_group = ctx.model_group if dp_m == 1 else group([d * ctx.tp + mr for d in groups for mr in range(ctx.tp)])
        if ctx.data_rank not in groups:
            out.append(None)
            continue
        i = groups.index(ctx.data_rank)
        out.append(dataclasses.replace(
            ctx, dp=dp_m, data_rank=i, rank=i * ctx.tp + ctx.model_rank, world_size=dp_m * ctx.tp,
            data_group=data_group, world_group=world_group, mesh=None, owns_process_group=False,
        ))
    return out


@dataclass
class RowNeed:
    """What one rank trains on: rows ``[i * b // dp, (i + 1) * b // dp)`` of each step's ``b`` rows
    (replica ``i`` of ``dp``), columns of the hook-point blocks ``blocks``."""

    replica: int = 0
    dp: int = 1
    blocks: Tuple[int, ...] = ()

    def rows(self, b: int) -> Tuple[int, int]:
        return self.replica * b // self.dp, (self.replica + 1) * b // self.dp


class RowExchange:
    """Moves each step's rows from the ranks that hold them to the ranks that train on them.

    Called by ``ActivationBuffer.next_batch`` with this rank's storage ``X [L, n_blocks * d]``, the
    holder of each of the step's ``b`` rows and this rank's storage index of the rows it holds. Every
    rank knows every holder (the global slot table), so the counts need no communication: one
    ``all_to_all`` per step (skipped in one process) sends each rank, from every other rank, exactly
    the rows of its share of the batch and the columns of its hook points, as raw bytes (gloo and NCCL
    alike). Rows this rank holds itself are copied locally. Returns ``{block: [rows, d]}`` on
    ``out_device``, the rows in batch order: row for row the single-process batch.
    """

    def __init__(self, ctx: ParallelContext, block_width: int, needs: Sequence[RowNeed],
                 out_device: Optional[torch.device] = None) -> None:
        if len(needs) != ctx.world_size:
            raise ValueError(f"needs: expected one per rank ({ctx.world_size}), got {len(needs)}")
        self.ctx, self.d, self.needs = ctx, block_width, list(needs)
        self.out_device = torch.device(out_device) if out_device is not None else ctx.device
        self.bytes_received = 0  # statistics: bytes this rank received from other ranks

    def _block(self, X: Tensor, c: int) -> Tensor:
        return X[:, c * self.d : (c + 1) * self.d]

    def __call__(self, X: Tensor, owners: Tensor, lids: Tensor) -> Dict[int, Tensor]:
        me, world, b = self.ctx.rank, self.ctx.world_size, owners.numel()
        need = self.needs[me]
        lo, hi = need.rows(b)
        mine_owner = owners[lo:hi]
        out: Dict[int, Tensor] = {}
        # rows this rank holds itself
        pos = (mine_owner == me).nonzero().squeeze(1)
        local = lids[lo:hi][pos]
        whole = pos.numel() == hi - lo
        # host storage to a GPU: one asynchronous copy from pinned staging (trainer/h2d.py)
        got = gather_rows([self._block(X, c) for c in need.blocks], local, self.out_device)
        for c, rows in zip(need.blocks, got):
            if whole:
                out[c] = rows
            else:
                full = torch.empty((hi - lo, self.d), dtype=X.dtype, device=self.out_device)
                out[c] = full.index_copy_(0, pos.to(self.out_device), rows)
        if world == 1:
            return out
        # everything else in one all_to_all of raw bytes
        elem = X.element_size()
        dev = self.ctx.device
        parts, send_sizes = [], []
        for q in range(world):
            nq = self.needs[q]
            qlo, qhi = nq.rows(b)
            if q == me or not nq.blocks or qhi <= qlo:
                send_sizes.append(0)
                continue
            sel = lids[qlo:qhi][owners[qlo:qhi] == me]
            parts += [p.reshape(-1) for p in gather_rows([self._block(X, c) for c in nq.blocks], sel, dev)]
            send_sizes.append(sel.numel() * len(nq.blocks) * self.d * elem)
        recv_pos, recv_sizes = [], []
        for p in range(world):
            pp = (mine_owner == p).nonzero().squeeze(1) if p != me and need.blocks else pos[:0]
            recv_pos.append(pp)
            recv_sizes.append(pp.numel() * len(need.blocks) * self.d * elem)
        send = torch.cat(parts).view(torch.uint8) if parts else torch.empty(0, dtype=torch.uint8, device=dev)
        recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=dev)
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes)
        self.bytes_received += int(recv.numel())
        off = 0
        for p in range(world):
            if not recv_sizes[p]:
                continue
            n_p = recv_pos[p].numel()
            got = recv[off : off + recv_sizes[p]].view(X.dtype).view(len(need.blocks), n_p, self.d)
            off += recv_sizes[p]
            at = recv_pos[p].to(self.out_device)
            for k, c in enumerate(need.blocks):
                out[c].index_copy_(0, at, got[k].to(self.out_device))
        return out


# --------------------------------------------------------------------------------------------------
# The sharded module
# --------------------------------------------------------------------------------------------------


class ShardedTopKSAE(nn.Module):
    """This rank's shard of a ``TopKSAE``: rows of ``W_enc``, ``b_enc``, ``W_dec`` (and ``threshold``);
    ``b_dec`` replicated. Parameter names and order match ``TopKSAE`` (so an optimizer built on
    ``parameters()`` has the same state layout), ``cfg`` is the full model's config.

    ``forward`` / ``forward_normalised`` expect the same input on every rank of the model group
    (gather it with ``ctx.all_gather_batch``); ``forward_local`` takes each rank's own rows.
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
        return self.ctx.sharded_forward(
            x_n.to(self.W_enc.dtype), self.W_enc, self.b_enc, self.W_dec, self.b_dec,
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

    def forward_local(self, x: Tensor, k: Optional[int] = None) -> Tensor:
        """Data-parallel use (evaluation, LM splicing): each rank passes its own ``x [..., d_model]``
        and gets its own reconstruction; the model group gathers the rows, runs the sharded forward
        and keeps each rank's slice. Every rank of the group must call it the same number of times.
        """
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cfg.d_model)
        if self.ctx.tp == 1:
            return self.forward(x, k)
        full, counts = self.ctx.all_gather_rows(x2)
        rec = self.forward(full, k)
        return self.ctx.own_rows(rec, counts).reshape(*lead, self.cfg.d_model)

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


# --------------------------------------------------------------------------------------------------
# Optimizer state: gather to full shapes / re-shard
# --------------------------------------------------------------------------------------------------


def _param_list(optimizer: torch.optim.Optimizer) -> List[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def gather_optimizer_state_dict(ctx: ParallelContext, optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
    """``optimizer.state_dict()`` with every per-parameter tensor of a sharded parameter gathered to
    full rows (CPU), on global rank 0 (None elsewhere): what single-process Adam would hold.

    Collective over the model group of data rank 0; every rank must call it (the others return at once).
    """
    if ctx.data_rank != 0:
        return None
    sd = optimizer.state_dict()
    params = _param_list(optimizer)
    state = {}
    for i, p in enumerate(params):
        st = sd["state"].get(i)
        if st is None:
            continue
        new = {}
        for key in sorted(st):
            v = st[key]
            # the moments (the parameter's shape) and per-row state (SAEAdam's row_step0: [rows])
            if isinstance(v, Tensor) and is_sharded(p) and v.dim() >= 1 and (v.shape == p.shape
                                                                              or tuple(v.shape) == (p.shape[0],)):
                new[key] = ctx.gather_rows(v)
            else:
                new[key] = v.detach().cpu().clone() if isinstance(v, Tensor) else v
        state[i] = new
    return {"state": state, "param_groups": sd["param_groups"]} if ctx.is_main else None


def shard_optimizer_state_dict(
    ctx: ParallelContext, optimizer: torch.optim.Optimizer, full: Dict[str, Any]
) -> None:
    """Load a full-shape optimizer state dict (from ``gather_optimizer_state_dict`` or a single-process
    run) into ``optimizer`` over sharded parameters: each rank keeps its rows."""
    params = _param_list(optimizer)
    state = {}
    for i, p in enumerate(params):
        st = full["state"].get(i, full["state"].get(str(i)))
        if st is None:
            continue
        new = {}
        for key, v in st.items():
            if isinstance(v, Tensor) and is_sharded(p) and v.dim() >= 1 and v.shape[0] == p.shape[0] * ctx.tp \
                    and (tuple(v.shape[1:]) == tuple(p.shape[1:]) or v.dim() == 1):
                new[key] = ctx.shard_rows(v, device=p.device)
            elif isinstance(v, Tensor) and v.dim() >= 1:
                new[key] = v.to(p.device)
            else:
                new[key] = v
        state[i] = new
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def gather_full_state(
    ctx: ParallelContext, sae: ShardedTopKSAE, optimizer: Optional[torch.optim.Optimizer] = None
) -> Tuple[Optional[Dict[str, Tensor]], Optional[Dict[str, Any]]]:
    """``(TopKSAE state dict, optimizer state dict)`` in single-process shapes on global rank 0
    (``(None, None)`` elsewhere). Every rank must call it."""
    sd = sae.full_state_dict()
    opt = gather_optimizer_state_dict(ctx, optimizer) if optimizer is not None else None
    return sd, opt


def shard_state(
    ctx: ParallelContext, sae: ShardedTopKSAE, optimizer: Optional[torch.optim.Optimizer],
    sae_sd: Dict[str, Any], opt_sd: Optional[Dict[str, Any]] = None,
) -> None:
    """Load single-process-shaped state (from any tp, e.g. a memory-mapped ``torch.load``) into this
    rank's shard and optimizer."""
    sae.load_full_state_dict(sae_sd)
    if optimizer is not None and opt_sd is not None:
        shard_optimizer_state_dict(ctx, optimizer, opt_sd)


# --------------------------------------------------------------------------------------------------
# Checkpoints: the single-process folder layout, written by global rank 0
# --------------------------------------------------------------------------------------------------

OPTIMIZER_FILE = "checkpoints/optimizer.safetensors"
TRAINER_STATE_FILE = "checkpoints/trainer_state.json"


def optimizer_state_to_tensors(sd: Dict[str, Any]) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Split an optimizer state dict into safetensors-able tensors (``state.{i}.{key}``) and JSON."""
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"state.{i}.{key}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"state.{i}.{key}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for name, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        _, i, key = name.split(".", 2)
        state.setdefault(int(i), {})[key] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    ctx: ParallelContext,
    folder,
    sae: Union[ShardedTopKSAE, TopKSAE],
    optimizer: Optional[torch.optim.Optimizer] = None,
    trainer_state: Optional[Dict[str, Any]] = None,
    hyperparams: Optional[Dict[str, Any]] = None,
    lm_config: Optional[Dict[str, Any]] = None,
    model_name: Optional[str] = None,
) -> None:
    """Write the single-process folder from any (tp, dp): ``to_llama_scope`` (weights in the module's
    dtype), ``checkpoints/optimizer.safetensors`` (full-shape state) and ``checkpoints/trainer_state.json``
    (step, k, ... plus the optimizer's param groups). Every rank calls it; global rank 0 writes, each
    file atomically, ``trainer_state.json`` last; a barrier ends it so no rank runs ahead of the files.
    ``lm_config.json`` names the model: ``lm_config["model_name"]``, else ``model_name``, else the SAE's
    ``cfg.model_name``; with none of them it is a ValueError on every rank, before anything is written.
    """
    from sae_kernels.formats import atomic_save_safetensors, atomic_write_json
    from pathlib import Path

    name = (lm_config or {}).get("model_name") or model_name or sae.cfg.model_name
    if not isinstance(name, str) or not name:
        raise ValueError("save_checkpoint: no model name for lm_config.json (the release code's reader needs "
                         "one): pass model_name=..., lm_config={'model_name': ...} or set the SAE's cfg.model_name")
    lm_config = dict(lm_config or {}, model_name=name)
    full = sae.to_full() if isinstance(sae, ShardedTopKSAE) else (sae if ctx.is_main else None)
    opt_sd = None
    if optimizer is not None:
        opt_sd = gather_optimizer_state_dict(ctx, optimizer) if ctx.tp > 1 or isinstance(sae, ShardedTopKSAE) \
            else (optimizer.state_dict() if ctx.is_main else None)
    if ctx.is_main:
        folder = Path(folder)
        hp = {"tp_size": ctx.tp, "ddp_size": ctx.dp}
        hp.update(hyperparams or {})
        full.to_llama_scope(folder, hyperparams=hp, lm_config=lm_config)
        meta: Dict[str, Any] = {"trainer_state": trainer_state or {}, "tp": ctx.tp, "dp": ctx.dp}
        if opt_sd is not None:
            tensors, opt_meta = optimizer_state_to_tensors(opt_sd)
            atomic_save_safetensors(folder / OPTIMIZER_FILE, tensors)
            meta["optimizer"] = opt_meta
        atomic_write_json(folder / TRAINER_STATE_FILE, meta)
    ctx.barrier()


def load_checkpoint(
    ctx: ParallelContext,
    folder,
    sae: Union[ShardedTopKSAE, TopKSAE],
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> Dict[str, Any]:
    """Load a folder written by ``save_checkpoint`` (any tp) into ``sae`` and ``optimizer`` on every
    rank, re-sharding to this run's tp; returns the saved ``trainer_state``. Each rank reads only its
    rows of the large tensors (safetensors slices)."""
    import json
    from pathlib import Path
    from safetensors import safe_open
    from sae_kernels.formats import LLAMA_SCOPE_WEIGHTS

    folder = Path(folder)
    state_file = folder / TRAINER_STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"checkpoint: expected {state_file} (written last by save_checkpoint), it does not exist")
    meta = json.loads(state_file.read_text())
    sharded = isinstance(sae, ShardedTopKSAE)
    with safe_open(str(folder / LLAMA_SCOPE_WEIGHTS), framework="pt", device="cpu") as f:
        W_enc = ctx.shard_rows(f.get_slice("encoder.weight")) if sharded else f.get_tensor("encoder.weight")
        b_enc = ctx.shard_rows(f.get_slice("encoder.bias")) if sharded else f.get_tensor("encoder.bias")
        # decoder.weight is stored [d_model, d_sae]: this rank's latents are columns.
        dec = f.get_slice("decoder.weight")
        if sharded:
            lo, hi = ctx.shard_range(dec.get_shape()[1])
            W_dec = dec[:, lo:hi].t()
        else:
            W_dec = f.get_tensor("decoder.weight").t()
        b_dec = f.get_tensor("decoder.bias")
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            dst = getattr(sae, name)
            if tuple(t.shape) != tuple(dst.shape):
                raise ValueError(
                    f"checkpoint {folder}: {name}: expected {list(dst.shape)} on this rank, got {list(t.shape)} "
                    "(a different d_model / d_sae?)"
                )
            dst.copy_(t.to(device=dst.device, dtype=dst.dtype))
    if optimizer is not None:
        if "optimizer" not in meta:
            raise ValueError(f"checkpoint {folder}: no optimizer state saved")
        tensors = {}
        params = _param_list(optimizer)
        with safe_open(str(folder / OPTIMIZER_FILE), framework="pt", device="cpu") as f:
            for name in f.keys():
                i = int(name.split(".")[1])
                sl = f.get_slice(name)
                shape = sl.get_shape()
                p = params[i]
                if sharded and is_sharded(p) and len(shape) >= 1 and shape[0] == p.shape[0] * ctx.tp:
                    tensors[name] = ctx.shard_rows(sl, device=p.device)
                else:
                    t = f.get_tensor(name)
                    # Scalars (Adam's step) stay on the CPU, where the optimizer keeps them.
                    tensors[name] = t.to(p.device) if t.dim() >= 1 else t
        optimizer.load_state_dict(optimizer_state_from_tensors(tensors, meta["optimizer"]))
    return meta.get("trainer_state", {})
