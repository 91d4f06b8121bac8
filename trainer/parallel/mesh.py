"""The (data, model) mesh of a job and the collectives every layout calls (docs/method.md sec. 8).

A 2-D ``DeviceMesh`` with dimensions ``("data", "model")``: ``tp`` = size of "model", ``dp = world // tp``.
Global rank ``g`` sits at ``(data_rank, model_rank) = (g // tp, g % tp)``, so the ranks of a model group
are consecutive (one node, NVLink) and the data groups stride across.

``ParallelContext`` is where a process sits in that mesh and what it does with its peers: all-reduces
over the model group, the data groups or the context's world; the row shards of a full tensor and the
gather back; the gradient average (sharded parameters over "data", replicated ones over the world) and
the global gradient norm. A world of one process at ``tp == 1`` (``ParallelContext()``) is the no-op
context: every collective returns its input, so one process runs exactly the ops each rank of a larger
layout runs. ``init_parallel`` joins the job torchrun started and builds the mesh.

Failures: every process group gets ``timeout_s``; a dead peer makes gloo raise at once ("connection
closed by peer"), a hung one after ``timeout_s``.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

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
        the root of its shards' squared norms summed over the model group. fp32 scalar tensor (fp64 for
        fp64 gradients), no host sync; in one process exactly ``vector_norm`` of the per-parameter norms.
        """
        params = [p for p in params if p.grad is not None]
        if not params:
            return torch.zeros((), dtype=torch.float32, device=self.device)
        norms = [torch.linalg.vector_norm(p.grad, dtype=torch.promote_types(p.grad.dtype, torch.float32))
                 for p in params]
        sharded = [i for i, p in enumerate(params) if is_sharded(p)]
        if self.tp > 1 and sharded:
            sq = self.model_all_reduce(torch.stack([norms[i] for i in sharded]).square())
            for j, i in enumerate(sharded):
                norms[i] = sq[j].sqrt()
        return torch.linalg.vector_norm(torch.stack(norms))

    def shutdown(self) -> None:
        """Destroy the process group this context created (a clean end of a run)."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


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
