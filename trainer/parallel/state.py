"""A member's SAE and Adam state in single-process shapes, from any layout and back.

``gather_full_state`` gives the member's rank 0 the module and optimizer ``state_dict`` a single process
holds (full shapes, CPU), so one checkpoint format serves every layout; ``shard_state`` re-shards such a
state onto this rank's rows, so a run resumes with the same or a different ``--tp``. Per-row optimizer
state (SAEAdam's ``row_step0``) travels with its rows.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .mesh import ParallelContext, is_sharded
from .sharded import ShardedTopKSAE


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
