"""The activation buffer (docs/method.md sec. 9): a producer thread fills it while SAE steps consume it.

One global buffer, defined as a single process defines it, whatever the layout (docs/method.md sec. 8):

* The run's rows form one global stream (row ``j`` = the ``j``-th non-special token of the global
  sequence of LM batches, see ``trainer.producer``). The buffer has ``capacity`` global *slots*. The
  initial fill writes row ``j`` into slot ``j``.
* A *round* starts with a fresh seeded permutation of all slots. The consumer takes batches in that
  order; after ``refill`` = half the capacity (rounded down to whole batches) it has consumed half
  the buffer, and the round ends once the ``refill`` next rows of the stream have been written into
  exactly the slots consumed this round: the round's ``i``-th new row goes into its ``i``-th consumed
  slot, as soon as the consumer has read that slot. Then the whole buffer is reshuffled. New rows
  become visible at the next round, so which row a step reads depends only on the seed and the data,
  never on timing, the number of processes or ``--tp``.
* Each produced row is consumed exactly once. When the source ends, the remaining rows are shuffled
  and served (the last batch may be short), then ``StopIteration``.
* An exception in the producer is re-raised by ``next_batch`` in the training loop; ``close`` stops
  and joins the thread.

Storage: a row holds every hook point's activations side by side (``width`` columns). With several
processes each rank stores the rows it produced (the LM batches dealt to it, ``chunk.owner``), in a
local storage of about ``capacity / world`` rows, and every rank keeps the same table of which rank
holds each slot; a chunk of another rank's rows only updates that table (its row count is known from
the token ids). ``next_batch(exchange)`` hands the step's slots, their holders and this rank's local
rows to ``exchange``, which moves the rows to the ranks that train on them (``trainer.parallel.
RowExchange``; in one process a plain gather). Memory: the local storage, which grows in the rare
case that this rank's share of the buffer exceeds its allotment, plus the one chunk the producer
holds. On CUDA the producer runs on its own stream; events order its writes after the consumer's
reads of the same storage rows and the consumer's reads of new rows after their writes.

Resume: ``state_dict`` is the buffer at the start of the current round's production: the rows of
the slots not yet consumed (this rank's, with their global slots), the round's permutation and the
global stream position of the round's first new row. The rows produced since are recomputed on
resume. Any layout can load it (``load_state_dict``), re-dealing the stored rows among its ranks.

The source is any iterable of ``Chunk``s with ``load_state_dict(chunk.cursor)`` to restart at a
chunk (see ``trainer.producer.ActivationSource``).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .h2d import gather_rows, staging


@dataclass
class Chunk:
    """Rows produced together (one LM batch).

    ``x [n, width]`` the rows (None when another rank produced them); ``cursor`` the source state that
    regenerates this chunk; ``row0`` the global index of its first row (None: right after the previous
    chunk); ``n`` its row count (None: ``x.shape[0]``); ``owner`` the rank holding its rows.
    """

    x: Optional[Tensor]
    y: None = None  # unused: a row holds every column (kept so Chunk(x, None, cursor) reads as before)
    cursor: Dict[str, Any] = field(default_factory=dict)
    row0: Optional[int] = None
    n: Optional[int] = None
    owner: int = 0


class ProducerError(RuntimeError):
    """The producer thread failed; the original exception is the ``__cause__``."""


def local_gather(X: Tensor, owners: Tensor, lids: Tensor, out_device: Optional[torch.device] = None) -> Tensor:
    """The one-process exchange: every row is local; the batch ``[b, width]`` in batch order, on
    ``out_device`` (default X's device; from host storage to a GPU through pinned staging, trainer/h2d.py)."""
    return gather_rows([X], lids, X.device if out_device is None else out_device)[0]


class ActivationBuffer:
    """Shuffling producer-consumer buffer of activations (see the module docstring).

    Args:
        source: iterable of ``Chunk``; with ``load_state_dict`` when the buffer is resumed.
        capacity: global slots (Llama Scope: 500k tokens). batch_size: rows per ``next_batch``.
        width: columns of a row. dtype, device: storage. pin_memory: pinned host storage (when
            ``device`` is the CPU and training runs on a GPU). seed: the permutations.
        out_device: where ``local_gather`` puts batches. rank, world: this process in the layout.
    """

    def __init__(
        self,
        source,
        capacity: int,
        batch_size: int,
        width: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        pin_memory: bool = False,
        seed: int = 0,
        out_device: Optional[str | torch.device] = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if batch_size < 1 or capacity < 2 * batch_size:
            raise ValueError(
                f"--buffer-tokens: expected at least 2 x batch size ({2 * batch_size}), got {capacity}"
            )
        self.source = source
        self.capacity, self.batch_size, self.width = capacity, batch_size, width
        self.refill = (capacity // 2) // batch_size * batch_size
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self.out_device = torch.device(out_device) if out_device is not None else self.device
        self.dtype = dtype
        self._pin = bool(pin_memory and self.device.type == "cpu" and torch.cuda.is_available())
        local = capacity if world == 1 else -(-capacity // world) + 2 * batch_size
        self.X = self._empty(local)
        self._free = torch.arange(local - 1, -1, -1, dtype=torch.int64)  # a stack of free storage rows
        self._n_free = local
        # Global slot table, the same on every rank: who holds each slot's row, and where (here).
        self.owner = torch.full((capacity,), -1, dtype=torch.int32)
        self.lidx = torch.full((capacity,), -1, dtype=torch.int64)
        self.gen = torch.Generator().manual_seed(seed)
        # Round state (all guarded by self._cond). round -1 is the initial fill: slots in order.
        self.round = -1
        self.perm = torch.arange(capacity)
        self.ptr = capacity  # consumed in this round (the initial fill frees every slot)
        self.quota = capacity  # rows written this round
        self.written = 0  # rows of this round accounted so far (written here or held elsewhere)
        self.round_row0 = 0  # global index of the round's first new row
        self.next_row = 0  # global rows accounted so far
        self.round_pos: Optional[Dict[str, Any]] = None  # source position of round_row0 (resume)
        self._log: List[Tuple[int, int, Dict[str, Any]]] = []  # (row0, n, cursor) of chunks seen
        self._auto_row = 0
        self.drain: Optional[Tensor] = None  # slots left to serve after the source ended
        self.drain_ptr = 0
        self.exhausted = False
        self.produced = 0  # rows ever written into this rank's storage (statistics, tests)
        self._cond = threading.Condition()
        self._error: Optional[BaseException] = None
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        # Host storage feeding a GPU (--buffer-device cpu): the LM's chunks reach the storage through
        # pinned staging (trainer/h2d.py), and the producer runs the LM on its own stream there too,
        # never on the training stream. No events on the storage: its host reads and writes are done
        # when the copies are issued.
        self._staging = staging(self.out_device) if not self._cuda and self.out_device.type == "cuda" else None
        self._producer_stream = (self._stream if self._cuda else
                                 torch.cuda.Stream(device=self.out_device) if self._staging is not None else None)
        self._write_event = torch.cuda.Event() if self._cuda else None
        self._read_event = torch.cuda.Event() if self._cuda else None
        self._x_version = self._seen_version = 0

    def _empty(self, rows: int) -> Tensor:
        return torch.empty(rows, self.width, dtype=self.dtype, device=self.device, pin_memory=self._pin)

    # ------------------------------------------------------------------ storage rows

    def _alloc(self, m: int) -> Tensor:
        """``m`` free storage rows (grows the storage when this rank's share outgrew it)."""
        if self._n_free < m:
            old = self.X.shape[0]
            new = max(old + m - self._n_free, old + old // 4 + 1)
            X = self._empty(new)
            X[:old].copy_(self.X)
            if self._cuda:
                self.X.record_stream(self._stream)
                self._write_event.record(self._stream)
            self.X = X
            self._x_version += 1
            free = torch.empty(new, dtype=torch.int64)
            free[: self._n_free] = self._free[: self._n_free]
            free[self._n_free : self._n_free + new - old] = torch.arange(new - 1, old - 1, -1)
            self._free, self._n_free = free, self._n_free + new - old
        out = self._free[self._n_free - m : self._n_free].clone()
        self._n_free -= m
        return out

    def _release(self, rows: Tensor) -> None:
        k = rows.numel()
        if k:
            self._free[self._n_free : self._n_free + k] = rows
            self._n_free += k

    # ------------------------------------------------------------------ producer

    def start(self) -> "ActivationBuffer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="activation-producer", daemon=True)
            self._thread.start()
        return self

    def _free_slots(self) -> int:
        return min(self.ptr, self.quota) - self.written

    def _run(self) -> None:
        try:
            if self._producer_stream is not None:
                with torch.cuda.device(self._producer_stream.device), torch.cuda.stream(self._producer_stream):
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
        for chunk in self.source:
            row0 = self._auto_row if chunk.row0 is None else int(chunk.row0)
            n = int(chunk.x.shape[0]) if chunk.n is None else int(chunk.n)
            self._auto_row = row0 + n
            own = chunk.owner == self.rank
            if own and (chunk.x is None or chunk.x.shape[0] != n or chunk.x.shape[1] != self.width):
                shape = None if chunk.x is None else list(chunk.x.shape)
                raise ValueError(f"source: a chunk of this rank has x of shape {shape}, expected [{n}, {self.width}]")
            with self._cond:
                self._log.append((row0, n, dict(chunk.cursor)))
            j, end = max(row0, self.next_row), row0 + n  # rows below next_row are accounted (resume)
            while j < end:
                with self._cond:
                    while not self._stop and self._free_slots() <= 0:
                        self._cond.wait()
                    if self._stop:
                        return
                    m = min(self._free_slots(), end - j)
                    slots = self.perm[self.written : self.written + m]
                    if own:
                        rows = self._alloc(m)
                        if self._cuda:
                            self._stream.wait_event(self._read_event)  # the consumer has read those rows
                        dev_rows = rows.to(self.device, non_blocking=True)
                        self.X.index_copy_(0, dev_rows, self._to_storage(chunk.x[j - row0 : j - row0 + m]))
                        if self._cuda:
                            self._write_event.record(self._stream)
                        self.lidx[slots] = rows
                        self.produced += m
                    else:
                        self.lidx[slots] = -1
                    self.owner[slots] = int(chunk.owner)
                    self.written += m
                    self.next_row += m
                    j += m
                    self._cond.notify_all()
            if self._stop:
                return
        with self._cond:
            self.exhausted = True
            self._cond.notify_all()

    def _to_storage(self, t: Tensor) -> Tensor:
        """A chunk's rows on the storage's device and dtype (GPU to host: through pinned staging)."""
        if self._staging is not None and t.is_cuda:
            return self._staging.to_host(t, self.dtype)
        return t.to(self.device, self.dtype)

    # ------------------------------------------------------------------ consumer

    def _check_error(self) -> None:
        if self._error is not None:
            raise ProducerError(f"activation producer failed: {type(self._error).__name__}: {self._error}") from self._error

    def _sync_reads(self) -> None:
        """On CUDA, order the consumer's reads after the producer's writes (new rows, a grown storage)."""
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._write_event)
        self._seen_version = self._x_version

    def _new_round(self) -> None:
        self._sync_reads()
        self.round += 1
        self.round_row0 = self.next_row
        # The source position of the round's first new row: the chunk holding row round_row0 - 1,
        # with an offset (resume restarts production there and skips the rows before round_row0).
        last = self.round_row0 - 1
        while len(self._log) > 1 and self._log[0][0] + self._log[0][1] <= last:
            self._log.pop(0)
        row0, _, cursor = self._log[0]
        self.round_pos = {"cursor": cursor, "row0": row0}
        self.perm = torch.randperm(self.capacity, generator=self.gen)
        self.ptr = 0
        self.quota = self.refill
        self.written = 0
        self._cond.notify_all()

    def _start_drain(self) -> None:
        self._sync_reads()
        consumed_end = min(self.ptr, self.quota)
        valid = torch.cat([self.perm[: self.written], self.perm[consumed_end:]]) if self.round >= 0 else self.perm[: self.written]
        self.drain = valid[torch.randperm(len(valid), generator=self.gen)]
        self.drain_ptr = 0

    def next_batch(self, exchange: Callable[[Tensor, Tensor, Tensor], Any] = None):
        """The next shuffled batch; StopIteration at the end.

        ``exchange(X, owners, lids)`` gets this rank's storage, the holder of each of the batch's rows
        (``[b]``, batch order) and, where this rank holds it, the row's storage index (-1 elsewhere), and
        returns what the step trains on. Default (one process): the rows ``[b, width]`` on ``out_device``.
        """
        self.start()
        with self._cond:
            while True:
                self._check_error()
                if self.drain is not None:
                    if self.drain_ptr >= len(self.drain):
                        raise StopIteration
                    slots = self.drain[self.drain_ptr : self.drain_ptr + self.batch_size]
                    break
                if self.round >= 0 and self.ptr + self.batch_size <= self.quota:
                    slots = self.perm[self.ptr : self.ptr + self.batch_size]
                    break
                # end of a round: wait until every consumed slot has its new row
                if self.written >= self.quota:
                    self._new_round()
                    continue
                if self.exhausted:
                    self._start_drain()
                    continue
                self._cond.wait()
            owners, lids = self.owner[slots], self.lidx[slots]
            X = self.X
            if self._x_version != self._seen_version:
                self._sync_reads()
        # Outside the lock: the producer never writes storage rows that unconsumed slots hold.
        out = local_gather(X, owners, lids, self.out_device) if exchange is None else exchange(X, owners, lids)
        with self._cond:
            if self._cuda:
                self._read_event.record(torch.cuda.current_stream(self.device))
            if self.drain is not None:
                self.drain_ptr += len(slots)
            else:
                self.ptr += len(slots)
            self._release(lids[owners == self.rank])
            self._cond.notify_all()
        return out

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def first_rows(self, n: int, progress: bool = False) -> Tuple[Tensor, int]:
        """This rank's rows among the first ``n`` rows of the stream, and how many rows that prefix
        really holds (``n``, or fewer when the buffer or the data is smaller).

        Waits for the initial fill (``progress``: a bar counted in buffer rows while it fills); for the
        dataset-wise norm estimate, valid only before the first batch.
        """
        from tqdm.auto import tqdm

        self.start()
        bar = tqdm(total=self.capacity, unit="tok", unit_scale=True, dynamic_ncols=True, disable=not progress,
                   desc="first buffer fill", leave=False)
        with self._cond:
            while self.round < 0 and self.drain is None and self.written < self.capacity:
                self._check_error()
                if self.exhausted:
                    break
                self._cond.wait(timeout=0.5 if progress else None)
                bar.update(self.written - bar.n)
            bar.close()
            self._check_error()
            self._sync_reads()
            m = min(n, self.written if self.round < 0 else self.capacity)
            mine = self.owner[:m] == self.rank
            return self.X.index_select(0, self.lidx[:m][mine].to(self.device)), m

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

    def _pending(self) -> Tensor:
        """Slots whose rows are still to be served, in no particular order."""
        if self.drain is not None:
            return self.drain[self.drain_ptr :]
        if self.round < 0:
            raise RuntimeError("ActivationBuffer.state_dict: no batch was served yet")
        return self.perm[self.ptr :]

    def state_dict(self) -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
        """``(meta, rows)``: ``meta`` (the same on every rank: round, permutation, position, ...) and
        this rank's rows of the unconsumed slots, ``{"slots": [m] sorted global slots, "rows": [m, width]}``.
        Tensors, ints and dicts only (``torch.load(weights_only=True)`` reads them)."""
        with self._cond:
            self._check_error()
            self._sync_reads()
            pending = self._pending()
            mine = pending[self.owner[pending] == self.rank].sort().values
            rows = self.X.index_select(0, self.lidx[mine].to(self.device)).to("cpu")
            meta = {
                "capacity": self.capacity, "batch_size": self.batch_size, "width": self.width,
                "round": self.round, "perm": self.perm.clone(), "ptr": self.ptr, "quota": self.quota,
                "drain": None if self.drain is None else self.drain.clone(), "drain_ptr": self.drain_ptr,
                "round_row0": self.round_row0, "round_pos": self.round_pos, "gen": self.gen.get_state(),
                "pending": int(pending.numel()),
            }
            return meta, {"slots": mine.clone(), "rows": rows}

    @staticmethod
    def deal(pending_sorted: Tensor, rank: int, world: int) -> Tensor:
        """The stored rows this rank takes on resume: a contiguous share of the sorted pending slots."""
        v = pending_sorted.numel()
        return pending_sorted[rank * v // world : (rank + 1) * v // world]

    def load_state_dict(self, meta: Dict[str, Any], read_rows: Callable[[Tensor], Tensor]) -> None:
        """Restore a snapshot of any layout; call before the first ``next_batch``.

        ``read_rows(slots)`` returns the stored rows ``[len(slots), width]`` of the sorted global ``slots``.
        """
        if self._thread is not None:
            raise RuntimeError("ActivationBuffer.load_state_dict: call it before the buffer starts")
        for key, mine in (("capacity", self.capacity), ("batch_size", self.batch_size), ("width", self.width)):
            if int(meta[key]) != mine:
                raise ValueError(
                    f"buffer state: expected {key} {mine}, the checkpoint has {meta[key]} "
                    "(was --buffer-tokens, --batch-size or the set of hook points changed?)"
                )
        self.round, self.perm, self.ptr, self.quota = int(meta["round"]), meta["perm"].clone(), int(meta["ptr"]), int(meta["quota"])
        self.drain = None if meta["drain"] is None else meta["drain"].clone()
        self.drain_ptr = int(meta["drain_ptr"])
        self.gen.set_state(meta["gen"])
        self.round_row0 = self.next_row = int(meta["round_row0"])
        self.round_pos = meta["round_pos"]
        pending = self._pending().sort().values
        self.owner.fill_(-1)
        self.lidx.fill_(-1)
        for r in range(self.world):
            self.owner[self.deal(pending, r, self.world)] = r
        mine = self.deal(pending, self.rank, self.world)
        if mine.numel():
            rows = read_rows(mine)
            local = self._alloc(mine.numel())
            self.X.index_copy_(0, local.to(self.device), rows.to(self.device, self.dtype))
            self.lidx[mine] = local
        if self.drain is not None:
            self.exhausted = True  # the drain only starts once the source has ended
            self.written = self.quota
        else:
            # production restarts at the round's first new row (the rows made since are made again)
            self.written = 0
            pos = self.round_pos
            self.source.load_state_dict(dict(pos["cursor"], row=pos["row0"]))
            self._auto_row = int(pos["row0"])
            self._log = []
