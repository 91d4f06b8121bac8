"""Each step's rows, moved from the ranks that made them to the ranks that train on them.

The LM producers are data-parallel over every rank: LM batch ``b`` of the run's one global sequence runs
on rank ``b % world``, into one global activation buffer whose rows stay on the rank that made them
(``trainer.data.buffer``). ``RowExchange`` moves each step's rows, row for row the single-process
batch, to the ranks that train on them: a model group gets its ``batch_size / dp`` share, the same on
every rank of the group, with only the columns of the hook points it trains (docs/method.md sec. 8,
layout independence).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..data.h2d import gather_rows
from .mesh import ParallelContext
from .placement import RowNeed


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
