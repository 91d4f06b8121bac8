"""The parallel API only the tests use: gathers of a model group's batch and selection, clipping in place,
a rank guard, and a checkpoint folder in the single-process layout written from any layout. The trainer
itself moves rows with ``RowExchange``, clips inside ``SAEAdam`` and checkpoints through ``Trainer``."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from sae_kernels import TopKSAE
from sae_kernels.atomic import atomic_save_safetensors, atomic_write_json
from trainer.parallel import ParallelContext, ShardedTopK, ShardedTopKSAE, gather_optimizer_state_dict, is_sharded
from trainer.parallel.mesh import _all_gather_single
from trainer.parallel.sharded import _pack_dtypes
from trainer.parallel.state import _param_list


def all_gather_batch(ctx: ParallelContext, x: Tensor, equal_sizes: bool = True) -> Tensor:
    """Concatenate the model group's batches along dim 0, in model-rank order.

    With ``equal_sizes`` (the training batches) one collective; otherwise ranks may hold
    different numbers of rows (see ``all_gather_rows``). With ``tp == 1`` returns ``x`` itctx.
    """
    if ctx.tp == 1:
        return x
    if not equal_sizes:
        return all_gather_rows(ctx, x)[0]
    x = x.contiguous()
    out = torch.empty((ctx.tp * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=ctx.model_group)
    return out


def all_gather_rows(ctx: ParallelContext, x: Tensor) -> Tuple[Tensor, List[int]]:
    """``all_gather_batch`` for ranks holding different numbers of rows; also returns the counts
    (one extra tiny collective for the sizes)."""
    if ctx.tp == 1:
        return x, [x.shape[0]]
    x = x.contiguous()
    sizes = torch.tensor([x.shape[0]], dtype=torch.int64, device=ctx.device)
    all_sizes = torch.empty(ctx.tp, dtype=torch.int64, device=ctx.device)
    _all_gather_single(all_sizes, sizes, group=ctx.model_group)
    counts = all_sizes.tolist()
    m = max(counts)
    if m != x.shape[0]:
        pad = torch.zeros((m - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        x = torch.cat([x, pad])
    out = torch.empty((ctx.tp * m,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=ctx.model_group)
    if all(c == m for c in counts):
        return out, counts
    return torch.cat([out[r * m: r * m + c] for r, c in enumerate(counts)]), counts


def own_rows(ctx: ParallelContext, full: Tensor, counts: Sequence[int]) -> Tensor:
    """Inverse of ``all_gather_batch``: this rank's rows of a group-concatenated tensor."""
    lo = sum(counts[: ctx.model_rank])
    return full[lo: lo + counts[ctx.model_rank]]


def gather_selection(ctx: ParallelContext, out: "ShardedTopK") -> Tuple[Tensor, Tensor]:
    """The global selection ``(values, indices) [N, k]`` (no autograd; tests and logging only).

    Within a row the winners come in model-rank order, then in ``topk_encode``'s slot order.
    """
    v, i, w = out.values.detach(), out.indices, out.winners
    if ctx.tp > 1:
        N, kl = v.shape
        sdt, idt = _pack_dtypes(v.dtype)
        packed = torch.cat([v.to(sdt), i.to(idt).view(sdt), w.to(sdt)], dim=1).contiguous()
        g = torch.empty((ctx.tp * N, 3 * kl), dtype=sdt, device=v.device)
        _all_gather_single(g, packed, group=ctx.model_group)
        g = g.view(ctx.tp, N, 3 * kl).transpose(0, 1)
        v = g[..., :kl].reshape(N, -1).to(out.values.dtype)
        i = g[..., kl: 2 * kl].contiguous().view(idt).reshape(N, -1).long()
        w = g[..., 2 * kl:].reshape(N, -1) > 0
    order = torch.argsort((~w).to(torch.int8), dim=1, stable=True)[:, : out.k]
    return v.gather(1, order), i.gather(1, order)


def clip_grad_norm_(ctx: ParallelContext, params: Iterable[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with the global norm (``grad_norm``); returns the norm."""
    params = [p for p in params if p.grad is not None]
    total = ctx.grad_norm(params)
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return total


@contextlib.contextmanager
def guard(ctx: ParallelContext) -> Iterator["ParallelContext"]:
    """Run a rank's work; on any exception print it and ``os._exit(1)`` at once.

    Skips interpreter teardown (joining communication threads of a broken group can block), so
    the process ends non-zero within the collective timeout of a peer's death.
    """
    try:
        yield ctx
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 -- any failure of a rank ends the job
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        sys.stderr.write(f"[rank {ctx.rank}] fatal: {type(e).__name__}: {e}\n")
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)


def forward_local(sae: ShardedTopKSAE, x: Tensor, k: Optional[int] = None) -> Tensor:
    """Data-parallel use (evaluation, LM splicing): each rank passes its own ``x [..., d_model]``
    and gets its own reconstruction; the model group gathers the rows, runs the sharded forward
    and keeps each rank's slice. Every rank of the group must call it the same number of times.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, sae.cfg.d_model)
    if sae.ctx.tp == 1:
        return sae.forward(x, k)
    full, counts = all_gather_rows(sae.ctx, x2)
    rec = sae.forward(full, k)
    return own_rows(sae.ctx, rec, counts).reshape(*lead, sae.cfg.d_model)


def l0_sum(out: ShardedTopK) -> Tensor:
    """Number of positive latent values in this rank's slots (sum over the model group = total L0 * N)."""
    return (out.values.detach() > 0).sum()


def shutdown_parallel() -> None:
    """Destroy the default process group (and with it every mesh group), if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
