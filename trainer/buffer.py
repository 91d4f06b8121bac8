"""The activation buffer (SPEC.md sec. 9): a producer thread fills it while SAE steps consume it.

Semantics (Llama Scope's, made deterministic so that ``--resume`` is exact):

* The buffer holds ``capacity`` token rows (inputs, and targets for transcoders) in one storage on
  the training device (or in pinned host memory). The producer first fills every slot, in order.
* A *round* starts with a fresh seeded permutation of all slots. The consumer takes batches in that
  order; after ``refill`` = half the capacity (rounded down to whole batches) it has consumed half
  the buffer, and the round ends once the producer has written ``refill`` new rows into exactly the
  slots consumed this round. Then the whole buffer is reshuffled (next round).
* The producer writes new row ``j`` of a round into the ``j``-th slot consumed in that round, as soon
  as the consumer has read it: refilling overlaps with training, yet which row lands where depends
  only on the seed and the data, never on timing. New rows become visible at the next round.
* Each produced row is consumed exactly once. When the source ends, the remaining rows are shuffled
  and served (the last batch may be short), then ``StopIteration``.
* Memory is bounded: the storage plus the one chunk (one LM batch) the producer holds.
* An exception in the producer is re-raised by ``next_batch`` in the training loop; ``close`` stops
  and joins the thread.
* On CUDA the producer runs on its own stream; events order its writes after the consumer's reads
  of the same slots and the consumer's reads of new rows after their writes.

The source is any iterable of ``Chunk``s with ``load_state_dict(chunk.cursor)`` to restart at a
chunk (see ``trainer.producer.ActivationSource``).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from .h2d import PinnedStaging


@dataclass
class Chunk:
    """Rows produced together (one LM batch): ``x [n, d_in]``, ``y [n, d_out]`` or None (y = x)."""

    x: Tensor
    y: Optional[Tensor] = None
    cursor: Dict[str, Any] = field(default_factory=dict)  # source state that regenerates this chunk


class ProducerError(RuntimeError):
    """The producer thread failed; the original exception is the ``__cause__``."""


class ActivationBuffer:
    """Shuffling producer-consumer buffer of activations (see the module docstring).

    Args:
        source: iterable of ``Chunk``; with ``load_state_dict`` when the buffer is resumed.
        capacity: rows held (Llama Scope: 500k tokens). batch_size: rows per ``next_batch``.
        d_in, d_out: row widths of inputs and targets (``d_out=None``: targets are the inputs).
        dtype, device: storage. pin_memory: pinned host storage (when ``device`` is the CPU and
            training runs on a GPU). seed: the permutations.
    """

    def __init__(
        self,
        source,
        capacity: int,
        batch_size: int,
        d_in: int,
        d_out: Optional[int] = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
        seed: int = 0,
        out_device: Optional[str | torch.device] = None,
    ) -> None:
        if batch_size < 1 or capacity < 2 * batch_size:
            raise ValueError(
                f"--buffer-tokens: expected at least 2 x batch size ({2 * batch_size}), got {capacity}"
            )
        self.source = source
        self.capacity, self.batch_size = capacity, batch_size
        self.refill = (capacity // 2) // batch_size * batch_size
        self.device = torch.device(device)
        self.out_device = torch.device(out_device) if out_device is not None else self.device
        pin = bool(pin_memory and self.device.type == "cpu" and torch.cuda.is_available())
        self.X = torch.empty(capacity, d_in, dtype=dtype, device=self.device, pin_memory=pin)
        self.Y = (
            torch.empty(capacity, d_out, dtype=dtype, device=self.device, pin_memory=pin)
            if d_out is not None else None
        )
        self.gen = torch.Generator().manual_seed(seed)
        # Round state (all guarded by self._cond). round -1 is the initial fill: slots in order.
        self.round = -1
        self.perm = torch.arange(capacity)  # generated on the CPU (seeded), mirrored on the device
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        # Pinned host storage feeding a GPU: async copies through pinned staging (trainer/h2d.py),
        # and the producer's LM on its own stream, never the training stream.
        self._staging = PinnedStaging(self.out_device) if pin and self.out_device.type == "cuda" else None
        if self._staging is not None:
            self._stream = torch.cuda.Stream(device=self.out_device)
        self._perm_event = torch.cuda.Event() if self._cuda else None
        self._set_perm_dev()
        self.ptr = capacity  # consumed in this round (the initial fill frees every slot)
        self.quota = capacity  # rows the producer writes this round
        self.written = 0  # rows written this round, into perm[:written]
        self.drain: Optional[Tensor] = None  # slots left to serve after the source ended
        self.drain_ptr = 0
        self.exhausted = False
        self.pending_cursor: Optional[Dict[str, Any]] = None  # chunk being written, and how far
        self.pending_offset = 0
        self._resume_offset = 0
        self.produced = 0  # rows ever written (statistics, tests)
        self._cond = threading.Condition()
        self._error: Optional[BaseException] = None
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._write_event = torch.cuda.Event() if self._cuda else None
        self._read_event = torch.cuda.Event() if self._cuda else None

    def _set_perm_dev(self) -> None:
        """Mirror ``perm`` on the device: one copy per round, no host-to-device copy per step."""
        self._perm_dev = self.perm.to(self.device)
        if self._cuda:  # the producer's stream reads it too
            self._perm_dev.record_stream(self._stream)
            self._perm_event.record(torch.cuda.current_stream(self.device))

    # ------------------------------------------------------------------ producer

    def start(self) -> "ActivationBuffer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="activation-producer", daemon=True)
            self._thread.start()
        return self

    def _free(self) -> int:
        return min(self.ptr, self.quota) - self.written

    def _run(self) -> None:
        try:
            if self._stream is not None:
                with torch.cuda.device(self._stream.device), torch.cuda.stream(self._stream):
                    self._produce()
            else:
                self._produce()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def _produce(self) -> None:
        if self.exhausted:
            return
        skip = self._resume_offset
        for chunk in self.source:
            n = chunk.x.shape[0]
            off = min(skip, n)
            skip = 0
            with self._cond:
                self.pending_cursor, self.pending_offset = dict(chunk.cursor), off
            while off < n:
                with self._cond:
                    while not self._stop and self._free() <= 0:
                        self._cond.wait()
                    if self._stop:
                        return
                    m = min(self._free(), n - off)
                    slots = self._perm_dev[self.written : self.written + m]
                    if self._cuda:
                        self._stream.wait_event(self._read_event)  # the consumer has read these slots
                        self._stream.wait_event(self._perm_event)  # and this round's permutation exists
                    self.X.index_copy_(0, slots, self._to_storage(chunk.x[off : off + m], self.X.dtype))
                    if self.Y is not None:
                        if chunk.y is None:
                            raise ValueError("source: the buffer has targets (d_out) but a chunk has y=None")
                        self.Y.index_copy_(0, slots, self._to_storage(chunk.y[off : off + m], self.Y.dtype))
                    if self._cuda:
                        self._write_event.record(self._stream)
                    self.written += m
                    self.produced += m
                    off += m
                    self.pending_offset = off
                    self._cond.notify_all()
            if self._stop:
                return
        with self._cond:
            self.exhausted = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ consumer

    def _check_error(self) -> None:
        if self._error is not None:
            raise ProducerError(f"activation producer failed: {type(self._error).__name__}: {self._error}") from self._error

    def _to_storage(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        if self._staging is not None and t.is_cuda:
            return self._staging.to_host(t, dtype)
        return t.to(self.device, dtype)

    def _gather(self, slots: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        if self._staging is not None:
            x = self._staging.to_device(self.X, slots)
            y = self._staging.to_device(self.Y, slots) if self.Y is not None else None
            return x, y
        x = self.X.index_select(0, slots)
        y = self.Y.index_select(0, slots) if self.Y is not None else None
        if self._cuda:
            self._read_event.record(torch.cuda.current_stream(self.device))
        if self.out_device != self.device:
            x = x.to(self.out_device, non_blocking=True)
            y = y.to(self.out_device, non_blocking=True) if y is not None else None
        return x, y

    def _new_round(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._write_event)
        self.round += 1
        self.perm = torch.randperm(self.capacity, generator=self.gen)
        self._set_perm_dev()
        self.ptr = 0
        self.quota = self.refill
        self.written = 0
        self._cond.notify_all()

    def _start_drain(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._write_event)
        consumed_end = min(self.ptr, self.quota)
        valid = torch.cat([self.perm[: self.written], self.perm[consumed_end:]]) if self.round >= 0 else self.perm[: self.written]
        self.drain = valid[torch.randperm(len(valid), generator=self.gen)].to(self.device)
        self.drain_ptr = 0

    def next_batch(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The next shuffled batch ``(x [B, d_in], y [B, d_out] or None)``; StopIteration at the end."""
        self.start()
        with self._cond:
            while True:
                self._check_error()
                if self.drain is not None:
                    if self.drain_ptr >= len(self.drain):
                        raise StopIteration
                    slots = self.drain[self.drain_ptr : self.drain_ptr + self.batch_size]
                    self.drain_ptr += len(slots)
                    return self._gather(slots)
                if self.round >= 0 and self.ptr + self.batch_size <= self.quota:
                    slots = self._perm_dev[self.ptr : self.ptr + self.batch_size]
                    break
                # end of a round: wait until the producer has refilled every consumed slot
                if self.written >= self.quota:
                    self._new_round()
                    continue
                if self.exhausted:
                    self._start_drain()
                    continue
                self._cond.wait()
        # Outside the lock: the producer never writes slots at or after ptr.
        out = self._gather(slots)
        with self._cond:
            self.ptr += self.batch_size
            self._cond.notify_all()
        return out

    def __iter__(self) -> Iterator[Tuple[Tensor, Optional[Tensor]]]:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def first_rows(self, n: int) -> Tuple[Tensor, Optional[Tensor]]:
        """The first ``n`` rows produced, in production order (waits for the initial fill).

        For the dataset-wise norm estimate before training; valid only before the first batch.
        """
        self.start()
        with self._cond:
            while self.round < 0 and self.drain is None and self.written < self.capacity:
                self._check_error()
                if self.exhausted:
                    break
                self._cond.wait()
            self._check_error()
            if self._cuda:
                torch.cuda.current_stream(self.device).wait_event(self._write_event)
            m = min(n, self.written if self.round < 0 else self.capacity)
            return self.X[:m], (self.Y[:m] if self.Y is not None else None)

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop the producer and join it (it finishes the LM batch it is computing)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> "ActivationBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> Dict[str, Any]:
        """A consistent snapshot (the producer is paused while it is taken)."""
        with self._cond:
            self._check_error()
            if self._cuda:
                torch.cuda.current_stream(self.device).wait_event(self._write_event)
            return {
                "round": self.round,
                "perm": self.perm.clone(),
                "ptr": self.ptr,
                "quota": self.quota,
                "written": self.written,
                "drain": None if self.drain is None else self.drain.cpu(),
                "drain_ptr": self.drain_ptr,
                "exhausted": self.exhausted,
                "pending_cursor": self.pending_cursor,
                "pending_offset": self.pending_offset,
                "produced": self.produced,
                "gen": self.gen.get_state(),
                "X": self.X.to("cpu", copy=True),
                "Y": None if self.Y is None else self.Y.to("cpu", copy=True),
            }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Restore a snapshot; call before the first ``next_batch``."""
        if self._thread is not None:
            raise RuntimeError("ActivationBuffer.load_state_dict: call it before the buffer starts")
        if tuple(sd["X"].shape) != tuple(self.X.shape) or (sd["Y"] is None) != (self.Y is None):
            raise ValueError(
                f"buffer state: expected storage of shape {list(self.X.shape)}, got {list(sd['X'].shape)} "
                "(was --buffer-tokens or --batch-size changed?)"
            )
        self.X.copy_(sd["X"])
        if self.Y is not None:
            self.Y.copy_(sd["Y"])
        self.round, self.perm, self.ptr = sd["round"], sd["perm"].clone(), sd["ptr"]
        self._set_perm_dev()
        self.quota, self.written = sd["quota"], sd["written"]
        self.drain = None if sd["drain"] is None else sd["drain"].to(self.device)
        self.drain_ptr, self.exhausted = sd["drain_ptr"], sd["exhausted"]
        self.produced = sd["produced"]
        self.gen.set_state(sd["gen"])
        self.pending_cursor, self.pending_offset = sd["pending_cursor"], sd["pending_offset"]
        if self.pending_cursor is not None:
            self.source.load_state_dict(self.pending_cursor)
            self._resume_offset = self.pending_offset
