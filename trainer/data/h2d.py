"""Copies between a host activation buffer and the training GPU that never block the GPU.

With ``--buffer-device cpu`` on a GPU run the buffer's storage is pinned host memory. Two copies
would otherwise synchronise every step: ``index_select`` on the pinned storage returns pageable
memory, so the batch's host-to-device copy is synchronous; and the producer's LM chunks were
written to the host with blocking copies. ``PinnedStaging`` removes both:

* ``to_device(srcs, rows)``: the training thread gathers ``rows`` of each host source (the storage,
  or column blocks of it: one per hook point) into one pinned staging buffer, then copies it to the
  GPU with ``non_blocking=True`` on a copy stream; the training stream waits for the copy's event
  before it reads the batch, so the transfer overlaps the previous step's kernels instead of
  stalling them. The host reads of the storage are done when it returns, so the producer may then
  overwrite those storage rows.
* ``to_host(t, dtype)``: the producer thread copies an LM activation chunk from the GPU into a
  pinned staging buffer on the other copy stream and waits for that copy's event (the producer's
  thread waits, not the training stream), so the chunk can be written into the host storage.

Staging buffers are reused round-robin; before one is overwritten the host waits for the copy that
last read or wrote it (its event), normally long finished. Device outputs are allocated on the copy
stream and marked as used by the training stream (``record_stream``), so the caching allocator
cannot hand their memory to another tensor while the step still reads them.

``gather_rows(srcs, rows, device)`` is what the buffer and the row exchange call: the rows in batch
order, exactly ``src.index_select(0, rows)``, through the staging when the sources are on the host
and ``device`` is a GPU, and that plain expression otherwise (same rows, same order, any layout).
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor


class _Ring:
    """Pinned host staging buffers, each with the event of the last copy that used it."""

    def __init__(self, n: int) -> None:
        self.bufs: List[Optional[Tensor]] = [None] * n
        self.events: List[Optional[torch.cuda.Event]] = [None] * n
        self.i = 0

    def take(self, shape, dtype) -> "tuple[int, Tensor]":
        slot = self.i % len(self.bufs)
        self.i += 1
        ev = self.events[slot]
        if ev is not None:
            ev.synchronize()  # the previous copy through this buffer has finished
        numel = 1
        for s in shape:
            numel *= s
        buf = self.bufs[slot]
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = self.bufs[slot] = torch.empty(numel, dtype=dtype, pin_memory=True)
        return slot, buf[:numel].view(*shape)


class PinnedStaging:
    """Asynchronous host <-> device transfers for a host buffer (see the module docstring).

    ``device``: the training GPU. ``slots``: staging buffers per direction (4: one being filled, one
    in flight, spares for the row exchange's several copies per step)."""

    def __init__(self, device: torch.device, slots: int = 4) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"PinnedStaging: expected a CUDA device, got {self.device}")
        # one stream per direction: the H2D and D2H copy engines run concurrently
        self.h2d_stream = torch.cuda.Stream(device=self.device)
        self.d2h_stream = torch.cuda.Stream(device=self.device)
        self._h2d = _Ring(slots)
        self._d2h = _Ring(slots)

    def to_device(self, srcs: Sequence[Tensor], rows: Tensor) -> Tensor:
        """``torch.stack([src[rows] for src in srcs])`` on the device (``srcs`` 2-D host tensors of one
        dtype and width, ``rows`` int64 on the CPU): ``[len(srcs), len(rows), width]``, ordered before
        the current stream's later work, without blocking it."""
        width = srcs[0].shape[1]
        shape = (len(srcs), rows.numel(), width)
        slot, staged = self._h2d.take(shape, srcs[0].dtype)
        for i, src in enumerate(srcs):
            torch.index_select(src, 0, rows, out=staged[i])
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.h2d_stream):
            out = torch.empty(shape, dtype=staged.dtype, device=self.device)
            out.copy_(staged, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.h2d_stream)
        self._h2d.events[slot] = done
        consumer.wait_event(done)
        out.record_stream(consumer)
        return out

    def to_host(self, t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``t`` (on the device) as a host tensor of ``dtype``; waits (this thread only) for the copy.
        The result is a view of a staging buffer, valid until ``slots`` more ``to_host`` calls."""
        dtype = dtype or t.dtype
        src = t.to(dtype) if t.dtype != dtype else t
        slot, staged = self._d2h.take(tuple(src.shape), dtype)
        self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))  # t was written on that stream
        with torch.cuda.stream(self.d2h_stream):
            staged.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.d2h_stream)
        src.record_stream(self.d2h_stream)
        self._d2h.events[slot] = done
        done.synchronize()
        return staged


_STAGING: Dict[torch.device, PinnedStaging] = {}
_STAGING_LOCK = threading.Lock()


def staging(device: torch.device) -> PinnedStaging:
    """The process's ``PinnedStaging`` for ``device`` (made on first use): the buffer's producer uses
    its device-to-host side, the training thread its host-to-device side."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _STAGING_LOCK:
        st = _STAGING.get(device)
        if st is None:
            st = _STAGING[device] = PinnedStaging(device)
        return st


def gather_rows(srcs: Sequence[Tensor], rows: Tensor, device: torch.device) -> List[Tensor]:
    """``[src.index_select(0, rows).to(device) for src in srcs]`` (2-D sources of one device, dtype
    and width; ``rows`` int64): through one pinned staging copy on a copy stream when the sources are
    in host memory and ``device`` is a GPU, else that expression (non-blocking)."""
    device = torch.device(device)
    if not srcs:
        return []
    if srcs[0].device.type == "cpu" and device.type == "cuda":
        out = staging(device).to_device(srcs, rows.cpu())
        return list(out.unbind(0))
    idx = rows.to(srcs[0].device)
    return [src.index_select(0, idx).to(device, non_blocking=True) for src in srcs]
