"""Preemption: SIGTERM (what schedulers send) and Ctrl-C end the training loop at a step boundary.

``StopSignals`` installs handlers for SIGTERM and SIGINT while the loop runs (main thread only) and
records the signal; the loop asks ``poll()`` after every step and, when it answers a signal, writes a
final checkpoint and raises ``Interrupted``. A second Ctrl-C more than a second after the first stops
at once (``KeyboardInterrupt``); one within a second is taken as the same keypress delivered twice (a
terminal signals every process of the job, and torchrun forwards it as well).

Under torchrun the ranks must stop at the same step (the checkpoint is collective): every step each rank
posts its flag in an asynchronous all-reduce (MAX) on a gloo group, and reads the result posted one step
earlier, so every rank sees the same answer at the same step and nothing waits on the device.
"""
from __future__ import annotations

import datetime
import signal
import threading
import time
from typing import Any, Optional

import torch

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}


class Interrupted(Exception):
    """The run stopped on a signal (after writing a checkpoint when checkpointing is on)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)  # the shell's convention for a process ended by a signal


class StopSignals:
    """Context manager: ``poll()`` returns the signal number the job agreed to stop on, or None."""

    def __init__(self, ctx: Any = None) -> None:
        self.ctx = ctx
        self.signum: Optional[int] = None
        self._first_sigint = 0.0
        self._old: dict = {}
        self._group = None
        self._work = None
        self._buf: Optional[torch.Tensor] = None
        self.distributed = bool(ctx is not None and getattr(ctx, "distributed", False))

    def _handler(self, signum, frame) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT and self.signum is not None:
            if now - self._first_sigint > 1.0:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
            return
        if self.signum is None:
            self.signum = signum
            self._first_sigint = now

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        if self.distributed:  # a CPU group of its own, off the training collectives' queues; every rank
            import torch.distributed as dist  # creates it here, in the same order (all ranks enter the loop)

            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=float(self.ctx.timeout_s)))
        return self

    def poll(self) -> Optional[int]:
        """Called once per step on every rank. Single process: the signal received so far. Distributed:
        the largest signal any rank had received when it posted its flag one step earlier."""
        if not self.distributed:
            return self.signum
        import torch.distributed as dist

        agreed = None
        if self._work is not None:
            self._work.wait()
            agreed = int(self._buf.item()) or None
        if agreed is None:
            self._buf = torch.tensor([self.signum or 0], dtype=torch.int64)
            self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        else:
            self._work = None
        return agreed

    def consume(self) -> None:
        """The loop acted on the signal (checkpoint, Interrupted): do not deliver it again on exit."""
        self.signum = None

    def __exit__(self, exc_type, *exc) -> None:
        if self._work is not None:
            try:
                self._work.wait()  # every rank posted the same number of flags: this completes
            except Exception:  # a peer died: the job is failing anyway
                pass
            self._work = None
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
        if self.signum is not None and exc_type is None:
            signal.raise_signal(self.signum)  # it came during the last step: deliver it as if not caught
