"""The training loop around the members' steps (a run trains a suite of one or many SAEs).

* ``Member``: one SAE of a run: its name, folder, step and the buffer columns it reads.
* ``Trainer``: one global batch per step shared by every member of this rank, each member's
  metrics.jsonl every ``log_every`` steps, tqdm counted in tokens, resumable checkpoints (the buffer once;
  each member's SAE, Adam and counters) every ``checkpoint_every`` steps, SIGTERM / Ctrl-C at a step
  boundary.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from sae_kernels.atomic import atomic_save_safetensors

from .. import run_folder as names
from ..run_folder import truncate_metrics
from ..parallel import ParallelContext
from .checkpoint import (
    CheckpointWriteError, check_identity, check_shards, describe_os_error, load_state, rng_state, save_state,
    set_rng_state, shard_reader,
)
from .step import SAEStep
from .stop import NAMES as SIGNAL_NAMES, Interrupted, StopSignals


class StopTraining(Exception):
    """Raised by ``Trainer.fit`` when ``stop_after_steps`` is reached (the run is resumable)."""


class Diverged(RuntimeError):
    """The loss or the weights stopped being finite: the run ends without exporting (the last checkpoint
    holds finite weights)."""


@dataclass
class Member:
    """One SAE of a run (a suite of one or many): its name, output folder, step and the columns of the
    buffer it reads (``block_in``; ``block_out`` for targets, None when the targets are the inputs).
    ``extra_state``: JSON-able facts stored in its checkpoints (the dataset norms). ``identity``: what a
    checkpoint of it must match to be loaded into it (its name, shapes, K and hook points; more by the caller)."""

    name: str
    run_dir: Path
    step: SAEStep
    block_in: int = 0
    block_out: Optional[int] = None
    extra_state: Dict[str, Any] = field(default_factory=dict)
    identity: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        c = self.step.sae.cfg
        self.identity = {"name": self.name, "d_model": c.d_model, "d_sae": c.d_sae, "k": c.k, "layer": c.layer,
                         "position": c.position, "hook_point_in": c.hook_point_in, "hook_point_out": c.hook_point_out,
                         **self.identity}
        self.sums: Dict[str, Tensor] = {}  # metrics summed since the last log line
        self.n_acc = 0
        self.last: Dict[str, Any] = {}  # the last metrics.jsonl record
        self.step_seconds = 0.0  # time in this member's steps (without device syncs: launch time on GPUs)

    @property
    def ctx(self) -> ParallelContext:
        """The member's context: the ranks that train it."""
        return self.step.ctx

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / names.METRICS

    def state_path(self, step: int) -> Path:
        return names.member_state(self.run_dir, step)


class Trainer:
    """Runs the members' steps over one batch source, with logging, progress and resumable checkpoints.

    Every step takes the next global batch (``batches.next_batch(exchange)``: ``{block: rows}`` of this
    rank's share) and steps each member of this rank on its columns, in a fixed order. Each member
    logs its own ``metrics.jsonl``; a checkpoint holds the buffer once and every member's state.

    Args:
        members: the members trained on this rank (a rank may train none: it still produces rows).
        batches: ``ActivationBuffer`` (``next_batch``, ``state_dict``, ``load_state_dict``).
        total_steps, batch_size: the run's length (global tokens per step). output: the run's output
            folder (``resume/`` goes there). exchange: moves a step's rows to the ranks that train on
            them (``trainer.parallel.RowExchange``). ctx: the job's ``ParallelContext`` (default: one
            process). member_dirs: every member's folder, on every rank (checkpoint clean-up).
            extra_state: JSON-able facts stored in ``resume/state.pt`` (the members' dataset norms).
    """

    STATE_FILE = names.STATE  # under the output folder: the step, the buffer, the members

    def __init__(
        self,
        members: List[Member],
        batches,
        *,
        total_steps: int,
        batch_size: int,
        output: Path,
        exchange: Optional[Callable] = None,
        ctx=None,
        member_dirs: Optional[Dict[str, Path]] = None,
        log_every: int = 100,
        checkpoint_every: int = 0,
        stop_after_steps: Optional[int] = None,
        progress: bool = True,
        extra_state: Optional[Dict[str, Any]] = None,
        log: Callable[[str], None] = print,
        on_log: Optional[Callable[[int, Dict[str, Dict[str, Any]]], None]] = None,
    ) -> None:
        self.members, self.batches, self.exchange = list(members), batches, exchange
        self.ctx = ctx if ctx is not None else ParallelContext()
        self.total_steps, self.batch_size = total_steps, batch_size
        self.output = Path(output)
        self.member_dirs = dict(member_dirs) if member_dirs is not None else {m.name: m.run_dir for m in members}
        self.log_every, self.checkpoint_every = max(1, log_every), checkpoint_every
        self.stop_after_steps = stop_after_steps
        self.progress = progress and self.ctx.is_main
        self.extra_state = dict(extra_state or {})
        self.log = log
        self.on_log = on_log  # called on global rank 0 at each metrics line: (step, {member: its record})
        self.t = 0  # steps done
        self.elapsed = 0.0  # training seconds before this process (resume)
        self.wait_seconds = 0.0  # time in next_batch: waiting for rows (LM) and moving them
        self.last_checkpoint: Optional[int] = None  # the step of the last complete checkpoint

    @property
    def state_path(self) -> Path:
        return self.output / self.STATE_FILE

    # -- checkpoints
    def save_checkpoint(self) -> None:
        """``resume/state.pt`` (the step, the buffer's global state), one buffer shard per rank and each
        member's ``<member>/resume/step{t}.pt``; state.pt is replaced last, so a kill at any moment
        leaves the previous checkpoint complete. A write that fails (disk full, quota, I/O error) on any
        rank removes this step's files and ends the run on every rank with ``CheckpointWriteError``: one
        line naming the file and the errno; the previous checkpoint is left as it was."""
        ctx, t = self.ctx, self.t
        self._check_finite_weights()  # the last checkpoint is always one with finite weights
        failed: List[OSError] = []
        written: List[Path] = []

        def write(fn, path: Path) -> None:
            if failed:
                return  # keep taking part in the collectives, write nothing more
            try:
                fn(path)
                written.append(path)
            except OSError as e:
                failed.append(e)

        meta, shard = self.batches.state_dict()
        shard_name = names.buffer_shard(t, ctx.rank, ctx.world_size)
        write(lambda p: atomic_save_safetensors(p, shard), self.output / "resume" / shard_name)
        for m in self.members:
            sae_sd, opt_sd = m.step.full_state()
            sums = {k: m.ctx.data_mean(v).detach().cpu() for k, v in m.sums.items()}  # global means
            if m.ctx.is_main:
                write(lambda p: save_state({
                    "version": 2, "step": t, "name": m.name, "identity": m.identity, "sae_cfg": m.step.sae.cfg.to_dict(), "sae": sae_sd,
                    "optimizer": opt_sd, "step_state": m.step.state_dict(), "metric_sums": [sums, m.n_acc],
                    "extra": m.extra_state,
                }, p), m.state_path(t))
        self._agree_written(failed, written)  # (the barrier before state.pt)
        if ctx.is_main:
            shards = [names.buffer_shard(t, r, ctx.world_size) for r in range(ctx.world_size)]
            write(lambda p: save_state({
                "version": 2, "step": t, "elapsed": self.elapsed + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0),
                "members": sorted(self.member_dirs), "buffer": meta, "shards": shards,
                "world_size": ctx.world_size, "tp": ctx.tp, "rng": rng_state(), "extra": self.extra_state,
            }, p), self.state_path)
        if ctx.is_main and not failed:
            for f in self.state_path.parent.glob("buffer-*.safetensors"):
                if f.name not in shards:
                    f.unlink()
            for d in self.member_dirs.values():
                keep = names.member_state(d, t)
                for f in keep.parent.glob("step*.pt"):
                    if f.name != keep.name:
                        f.unlink()
        self._agree_written(failed, written)  # (the barrier after)
        self.last_checkpoint = t

    # -- what leaves the loop: metrics lines, and nothing that is not finite
    def _open_metrics(self, m: "Member") -> int:
        """``metrics.jsonl`` for appending, unbuffered and never through a symbolic link."""
        try:
            return os.open(m.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as e:
            e.filename = e.filename or str(m.metrics_path)
            raise CheckpointWriteError(f"could not open {describe_os_error(e)}", e.errno) from None

    def _write_line(self, fd: int, m: "Member", rec: Dict[str, Any]) -> None:
        data = (json.dumps(rec) + "\n").encode()
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as e:  # disk full: one line, not a traceback
            e.filename = e.filename or str(m.metrics_path)
            raise CheckpointWriteError(f"step {self.t}: could not write {describe_os_error(e)}; "
                                       f"{self._intact()}", e.errno) from None

    def _report_lines(self) -> None:
        """Every member's last record to global rank 0's ``on_log`` (one object gather under torchrun)."""
        recs = {m.name: m.last for m in self.members if m.ctx.is_main}
        if self.ctx.distributed:
            gathered = self.ctx.gather_object(recs)
            recs = {k: v for part in (gathered or []) for k, v in part.items()}
        if self.ctx.is_main and self.on_log is not None:
            self.on_log(self.t, {name: recs[name] for name in self.member_dirs if name in recs})

    def _check_finite_metrics(self) -> None:
        """At each metrics line (the host sync is already paid): a loss that is not finite ends the run."""
        for m in self.members:
            loss = m.last.get("loss")
            if loss is not None and not math.isfinite(loss):
                self._diverged(m, f"its loss is {loss}")

    def _check_finite_weights(self) -> None:
        """Before a checkpoint and before the export: every member's weights finite on every rank (one
        all-reduce of a flag), else ``Diverged``; the previous checkpoint stays the last one."""
        bad = [m for m in self.members if not all(bool(torch.isfinite(p).all()) for p in m.step.params)]
        flag = torch.tensor([1 if bad else 0], dtype=torch.int64, device=self.ctx.device)
        if self.ctx.distributed:
            flag = self.ctx.world_all_reduce(flag, op="max")
        if int(flag.item()):
            self._diverged(bad[0] if bad else None, "its weights are no longer finite")

    def _diverged(self, m: Optional["Member"], what: str) -> None:
        who = f"{m.name}: {what}" if m is not None else f"a member on another rank: {what}"
        lr = f" (--lr {m.step.cfg.lr:g})" if m is not None else ""
        raise Diverged(f"step {self.t}: {who}: the training diverged, most likely a learning rate too high{lr}; "
                       f"nothing was exported; {self._intact()}. Lower --lr and start again with --overwrite")

    def _agree_written(self, failed: List[OSError], written: List[Path]) -> None:
        """All ranks learn whether any rank failed to write its part; if one did, each removes what it
        wrote of this step and raises (the failing rank with its error, the others naming that rank)."""
        ctx = self.ctx
        flag = torch.tensor([ctx.rank + 1 if failed else 0], dtype=torch.int64, device=ctx.device)
        bad = int(ctx.world_all_reduce(flag, op="max").item()) if ctx.distributed else int(flag.item())
        if not bad:
            return
        for p in written:
            if p != self.state_path:
                p.unlink(missing_ok=True)
        what = f"could not write {describe_os_error(failed[0])}" if failed else f"rank {bad - 1} could not write its part"
        err = failed[0].errno if failed else None
        raise CheckpointWriteError(f"checkpoint at step {self.t}: {what}; {self._intact()}", err)

    def _intact(self) -> str:
        prev = self.last_checkpoint
        if prev is None:
            return "there is no earlier checkpoint of this run"
        return (f"the previous checkpoint (step {prev}, {self.state_path}) is intact: free space and continue with "
                "--resume")

    def load_checkpoint(self, state: Optional[Dict[str, Any]] = None) -> None:
        """Restore everything from ``resume/state.pt`` (written by any layout) before ``fit``."""
        if state is None:
            state = load_state(self.state_path)
        t = int(state["step"])
        if sorted(state["members"]) != sorted(self.member_dirs):
            raise ValueError(f"--resume: the checkpoint trains {state['members']}, this run {sorted(self.member_dirs)}")
        check_shards(self.state_path.parent, state["shards"])
        for m in self.members:
            ms = load_state(m.state_path(t))
            check_identity(ms, m, m.state_path(t))
            m.step.load_full_state(ms["sae"], ms["optimizer"])
            m.step.load_state_dict(ms["step_state"])
            sums, n_acc = ms["metric_sums"]
            dev = m.step.sae.W_enc.device
            m.sums, m.n_acc = {k: v.to(dev) for k, v in sums.items()}, int(n_acc)
            # metrics.jsonl: keep the lines up to the checkpoint, drop what the killed run wrote after it
            if m.ctx.is_main:
                m.last = truncate_metrics(m.metrics_path, t) or {}
        self.batches.load_state_dict(state["buffer"], shard_reader(self.state_path.parent, state["shards"]))
        set_rng_state(state["rng"])
        self.t = t
        self.last_checkpoint = t
        self.elapsed = float(state.get("elapsed", 0.0))

    # -- the loop
    def fit(self) -> Dict[str, Dict[str, Any]]:
        """Train to ``total_steps``; returns each member's last metrics record."""
        from tqdm.auto import tqdm

        total_tokens = self.total_steps * self.batch_size
        bar = tqdm(total=total_tokens, initial=self.t * self.batch_size, unit="tok", unit_scale=True,
                   dynamic_ncols=True, disable=not self.progress, desc="train", smoothing=0.1)
        self._t0 = time.perf_counter()
        t_log, steps_log = self._t0, 0
        files = {}
        stop = StopSignals(self.ctx).__enter__()  # SIGTERM / Ctrl-C: checkpoint, then Interrupted
        try:
            for m in self.members:
                if m.ctx.is_main:
                    m.run_dir.mkdir(parents=True, exist_ok=True)
                    files[m.name] = self._open_metrics(m)
            while self.t < self.total_steps:
                t_wait = time.perf_counter()
                rows = self.batches.next_batch(self.exchange)
                self.wait_seconds += time.perf_counter() - t_wait
                for m in self.members:
                    x = rows[m.block_in]
                    y = rows[m.block_out] if m.block_out is not None else None
                    t_step = time.perf_counter()
                    out = m.step(x, y, self.t)
                    m.step_seconds += time.perf_counter() - t_step
                    for key, v in out.items():
                        m.sums[key] = m.sums[key] + v if key in m.sums else v.clone()
                    m.n_acc += 1
                self.t += 1
                steps_log += 1
                bar.update(self.batch_size)
                if self.t % self.log_every == 0 or self.t == self.total_steps:
                    now = time.perf_counter()
                    for m in self.members:
                        vals = {key: float(m.ctx.data_mean(v / m.n_acc)) for key, v in m.sums.items()}  # host sync
                        rec = {"step": self.t, "tokens": self.t * self.batch_size, **vals,
                               **m.step.schedule_at(self.t - 1), "lr": m.step.lr_at(self.t - 1),
                               "tokens_per_s": steps_log * self.batch_size / max(now - t_log, 1e-9)}
                        m.last = rec
                        if m.name in files:
                            self._write_line(files[m.name], m, rec)
                        m.sums, m.n_acc = {}, 0
                    self._check_finite_metrics()
                    if self.on_log is not None or self.ctx.distributed:
                        self._report_lines()
                    if self.members:
                        rec = self.members[0].last
                        bar.set_postfix(loss=f"{rec['loss']:.4g}", ev=f"{rec['explained_variance']:.3f}",
                                        l0=f"{rec['l0']:.1f}", k=rec.get("k", "-"), tok_s=f"{rec['tokens_per_s']:.0f}")
                    t_log, steps_log = now, 0
                if self.checkpoint_every and self.t % self.checkpoint_every == 0 and self.t < self.total_steps:
                    self.save_checkpoint()
                if self.stop_after_steps is not None and self.t >= self.stop_after_steps and self.t < self.total_steps:
                    if not (self.checkpoint_every and self.t % self.checkpoint_every == 0):
                        self.save_checkpoint()
                    raise StopTraining(f"stopped after {self.t} steps (--stop-after-steps); continue with --resume")
                signum = stop.poll()  # every step on every rank (under torchrun: the job's agreed answer)
                if signum is not None and self.t < self.total_steps:
                    self._interrupt(signum, stop)
            # the end of training is a checkpoint too: a run killed in its export, evaluation or report
            # resumes there and finishes what is left (and nothing non-finite is exported)
            self._check_finite_weights()
            if self.checkpoint_every and self.last_checkpoint != self.t:
                self.save_checkpoint()
        finally:
            bar.close()
            for fd in files.values():
                os.close(fd)  # unbuffered: nothing left to flush, so closing cannot fail on a full disk
            stop.__exit__(*sys.exc_info())
        self.elapsed += time.perf_counter() - self._t0
        return {m.name: m.last for m in self.members}


    def _interrupt(self, signum: int, stop: StopSignals) -> None:
        """A final checkpoint (when checkpointing is on and this step has none yet), then ``Interrupted``."""
        stop.consume()
        name = SIGNAL_NAMES.get(signum, f"signal {signum}")
        where = f"stopped by {name} after step {self.t} of {self.total_steps}"
        if not self.checkpoint_every:
            raise Interrupted(f"{where}; checkpointing is off (--checkpoint-every 0), so the run cannot be "
                              "resumed", signum)
        if self.last_checkpoint != self.t:
            self.save_checkpoint()
        raise Interrupted(f"{where}: checkpoint written ({self.state_path}); continue with the same command "
                          "and --resume", signum)
