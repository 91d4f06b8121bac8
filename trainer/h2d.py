"""Copies between a pinned host activation buffer and the training GPU that never block the GPU.

``PinnedStaging`` serves an ``ActivationBuffer`` whose storage is in host memory (``--buffer-device
cpu``) while training runs on a GPU:

* ``to_device(src, rows)``: the training thread gathers the batch's rows of the pinned storage into
  a pinned staging buffer (``index_select`` into pageable memory would make the copy synchronous),
  then copies it to the GPU with ``non_blocking=True`` on a copy stream (one per direction); the training stream waits
  for the copy's event before it reads the batch, so the transfer overlaps the previous step's
  kernels instead of stalling them.
* ``to_host(t, dtype)``: the producer thread copies an LM activation chunk from the GPU into a
  pinned staging buffer on the copy stream and waits for that copy's event (the producer's thread
  waits, not the training stream), so the chunk can be written into the host storage.

Staging buffers are reused round-robin; before one is overwritten the host waits for the copy that
last read or wrote it (its event), normally long finished. Device outputs are allocated on the copy
stream and marked as used by the training stream (``record_stream``), so the caching allocator
cannot hand their memory to another tensor while the step still reads them.
"""
from __future__ import annotations

from typing import List, Optional

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
    """Asynchronous host <-> device transfers for a pinned host buffer (see the module docstring).

    ``device``: the training GPU. ``slots``: staging buffers per direction (3: one being filled, one
    in flight, one spare)."""

    def __init__(self, device: torch.device, slots: int = 3) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"PinnedStaging: expected a CUDA device, got {self.device}")
        # one stream per direction: the H2D and D2H copy engines run concurrently
        self.h2d_stream = torch.cuda.Stream(device=self.device)
        self.d2h_stream = torch.cuda.Stream(device=self.device)
        self._h2d = _Ring(slots)
        self._d2h = _Ring(slots)

    def to_device(self, src: Tensor, rows: Tensor) -> Tensor:
        """``src[rows]`` (``src`` a host tensor, ``rows`` int64 on the CPU) on the device, ordered
        before the current stream's later work, without blocking it."""
        shape = (rows.numel(),) + tuple(src.shape[1:])
        slot, staged = self._h2d.take(shape, src.dtype)
        torch.index_select(src, 0, rows, out=staged)
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.h2d_stream):
            out = torch.empty(shape, dtype=src.dtype, device=self.device)
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
