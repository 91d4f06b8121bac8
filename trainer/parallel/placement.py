"""Which ranks train which member of a suite, and which rows and columns each rank trains on.

``place_members`` puts each SAE of a suite on model groups (balanced by parameter count),
``member_contexts`` gives each member a context over its ranks, and ``RowNeed`` / ``row_needs`` say
what each global rank trains on: its share of every step's batch and the column blocks of the hook
points of its members (what ``RowExchange`` delivers).
"""
from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from .mesh import ParallelContext


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


def row_needs(ctx: ParallelContext, placement: Sequence[Sequence[int]],
              member_blocks: Sequence[Sequence[int]]) -> List[RowNeed]:
    """What every global rank trains on: for member ``i`` on model groups ``placement[i]`` reading the column
    blocks ``member_blocks[i]``, each of its ranks trains on its group's share of the rows and those
    columns (a rank's members all share its rows: ``place_members`` never mixes data-parallel widths)."""
    needs = [RowNeed() for _ in range(ctx.world_size)]
    for groups, blocks in zip(placement, member_blocks):
        for i, g in enumerate(groups):
            for mr in range(ctx.tp):
                q = g * ctx.tp + mr
                old = needs[q]
                if old.blocks and (old.replica, old.dp) != (i, len(groups)):
                    raise AssertionError("placement: members of one rank train on different rows")
                needs[q] = RowNeed(i, len(groups), tuple(sorted(set(old.blocks) | set(blocks))))
    return needs
