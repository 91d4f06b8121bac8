"""``python -m trainer.run``: train Llama Scope SAEs end to end, then export, evaluate and report them.

A run trains a suite of SAEs from one LM pass; a single SAE is a suite of one, and one process is a
layout of 1 x 1. With no arguments: SmolLM2-135M-Instruct (embedded GGUF) on CPython's docs, layer 12,
residual stream, 8x, K=50, on the CPU in a few minutes. The real jobs, on GPUs::

    python -m trainer.run --model meta-llama/Llama-3.1-8B --dataset <hf dataset> \\
        --layer 15 --position R --expansion 8 --tokens 800000000
    python -m trainer.run --hookpoints L3R,L6R,L9M,L12TC ...          # four SAEs, one LM pass
    torchrun --nproc_per_node 8 -m trainer.run --layers 0-31:4 --positions R,M --expansion 8,32 ...

``run(cfg)`` reads top to bottom, one stage per owning module:

1. ``setup``: the layout (``trainer.parallel``), the configuration resolved against the model, the run
   folders (``trainer.run_folder``), the memory checks (``trainer.preflight``), the data, the LM and the
   activation buffer its producer thread fills (``trainer.data``), and each step's rows' way to the ranks
   that train on them.
2. ``members``: the dataset norms, then each member's SAE, Adam and step on its ranks (``trainer.members``).
3. ``fit``: the training loop (``trainer.train``), from a checkpoint with ``--resume``.
4. ``export``: each SAE in the released layout, reloaded as a user loads it (``trainer.export``).
5. ``evaluate``: ``eval.json`` per member on the held-out contexts (``trainer.evaluate``).
6. ``report``: ``suite.json``, ``suite.md``, ``suite.csv``, ``suite.png`` and the lines printed
   (``trainer.report``).

Outputs: each member in ``<output>/L{layer}{position}-{expansion}x/`` exactly as a run alone writes it,
the suite's files in ``<output>/``, ``<output>/resume/`` while training (docs/training.md).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from . import run_folder as names
from .cli.common import device_of
from .cli.train import build_parser
from .config import MemberSpec, TrainConfig
from .data.buffer import ActivationBuffer, ProducerError
from .data.lm import LoadedModel, load_model, model_facts
from .data.source import ActivationSource
from .data.text import ContextData, load_documents
from .evaluate.results import evaluate_members
from .export import export_members
from .members import Columns, build_members, dataset_norms
from .parallel import ParallelContext, RowExchange, init_parallel, member_contexts, place_members, row_needs
from .preflight import (
    check_buffer_memory, check_context_len, check_sae_memory, model_weight_bytes, offline_if_unreachable,
)
from .report import finish, suite_record
from .run_folder import RunFinished, check_run_dirs, create_run_dirs, locked_run_folders
from .track import Trackers, check_trackers, open_trackers
from .train import CheckpointWriteError, Diverged, Interrupted, Member, StopTraining, Trainer
from .train.checkpoint import describe_os_error, load_state


def run(cfg: TrainConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The whole pipeline for a suite of one or many SAEs; returns the suite's results
    (``{"members": {name: eval.json contents}, "suite": ...}``) on rank 0, ``{"rank": r}`` on the others,
    or ``{"stopped": step}`` (``--stop-after-steps``). Holds the run folders' locks for the whole run."""
    clock = Clock()
    with contextlib.ExitStack() as stack:
        try:
            job = setup(cfg, log, stack, clock)
        except RunFinished as done:  # --resume of a run killed after it finished: only stale files are left
            return finished(done, log)
        members, norms, resume_state = make_members(job)
        trainer = fit(job, members, norms, resume_state, clock)
        if trainer.t < job.cfg.total_steps:
            return {"stopped": trainer.t}
        exported = export_members(job.cfg, members, job.specs, lm_config=job.lm.lm_config(), tp=job.ctx.tp,
                                  device=job.device, d_model=job.d_model, calibration=job.calibration, log=job.log)
        job.ctx.barrier()
        job.source.cache = None  # the replayed activations: not needed any more
        results = evaluate_members(job.cfg, exported, job.lm, job.data.eval, job.source.special_ids,
                                   d_model=job.d_model, lm_tokens=job.source.lm_tokens, suite_members=len(job.specs),
                                   seconds=lambda e: clock.member_seconds(trainer, e.member), log=job.log,
                                   progress=job.cfg.progress and job.ctx.is_main)
        return report(job, trainer, members, results, clock)


@dataclass
class Job:
    """What the stages share: the resolved configuration and layout, the data's way, the folders."""

    cfg: TrainConfig
    ctx: ParallelContext
    device: torch.device
    specs: List[MemberSpec]
    d_model: int
    out: Path
    log: Callable[[str], None]
    lm: LoadedModel
    data: ContextData
    columns: Columns
    source: ActivationSource
    buffer: ActivationBuffer
    placement: List[List[int]]
    exchange: RowExchange
    buffer_bytes: int
    trackers: Trackers

    def calibration(self) -> ActivationSource:
        """A fresh pass over the training stream in fp32 (the JumpReLU thresholds), replaying the run's
        cached activations when it kept them."""
        calib = ActivationSource(self.lm, self.data, self.columns.hooks, store_dtype=torch.float32, epochs=1)
        if self.source.cache is not None:
            calib.cache = self.source.cache
        return calib


def setup(cfg: TrainConfig, log: Callable[[str], None], stack: contextlib.ExitStack, clock: "Clock") -> Job:
    """Everything before the first step: the inputs are checked before the model loads."""
    ctx = init_parallel(cfg.tp, timeout_s=cfg.dist_timeout, device=None if cfg.device == "auto" else device_of(cfg.device))
    device = ctx.device if ctx.distributed else device_of(cfg.device)
    if not ctx.is_main:
        log = lambda s: None  # noqa: E731 -- rank 0 logs for the job
    if ctx.distributed:
        log(f"torch.distributed: {ctx.world_size} ranks = {ctx.dp} data-parallel x {ctx.tp} tensor-parallel, "
            f"{ctx.backend}")
    stack.callback(offline_if_unreachable(cfg.model, cfg.dataset, log))  # a Hub name fails fast offline
    n_layers, d = model_facts(cfg.model)  # every flag that names layers is checked against the model's config
    cfg = cfg.resolve(n_layers, d, device.type)
    check_context_len(cfg)
    check_trackers(cfg)  # --wandb / --tensorboard: the packages import, before the model loads
    specs = cfg.members()
    for m in specs:
        ctx.check_width(m.expansion * d)
    out = Path(cfg.output)
    stack.enter_context(locked_run_folders(out, [out / m.name for m in specs], ctx, log))  # one run at a time
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    docs = load_documents(cfg.dataset, split=cfg.split, text_column=cfg.text_column,
                          dataset_config=cfg.dataset_config, streaming=cfg.streaming)
    columns = Columns([m.site for m in specs])
    bf16 = cfg.precision == "bf16"
    store_dtype = torch.bfloat16 if bf16 else torch.float32
    buf_device = torch.device("cpu") if cfg.buffer_device == "cpu" else device
    buffer_bytes = check_buffer_memory(cfg, len(columns), d, store_dtype.itemsize, ctx.world_size, buf_device)
    check_sae_memory(expansions=[m.expansion for m in specs], d_model=d, rank=ctx.rank, tp=ctx.tp, dp=ctx.dp,
                     batch_size=cfg.batch_size, bf16=bf16, device=device,
                     model_bytes=model_weight_bytes(cfg.model, 2 if bf16 else 4), buffer_bytes=buffer_bytes,
                     buffer_device=buf_device, sharing=int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    moved_from = check_run_dirs(cfg, specs)  # after the inputs' checks; read-only: every rank checks, rank 0 creates

    log(f"loading model {cfg.model!r} ...")
    lm = load_model(cfg.model, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    if (lm.n_layers, lm.d_model) != (n_layers, d):
        raise ValueError(f"--model {cfg.model!r}: the loaded model has {lm.n_layers} layers of width {lm.d_model}, "
                         f"its configuration said {n_layers} x {d}")
    clock.mark("loaded")
    ctx.barrier()
    shown = ", ".join(m.name for m in specs[:8]) + (f", ... ({len(specs)} SAEs)" if len(specs) > 8 else "")
    log(f"{lm.name}, d_model {d}: {shown}; k {','.join(map(str, cfg.ks))}, {cfg.tokens:,} tokens in {cfg.total_steps} steps of "
        f"{cfg.batch_size}; the LM runs once up to layer {max(m.layer for m in specs)}, reading {len(columns)} "
        f"hook point{'s' if len(columns) > 1 else ''} -> {out}")

    data = ContextData(docs, lm.tokenizer, cfg.context_len, cfg.lm_batch_size, eval_every=cfg.eval_every,
                       eval_contexts=max(1, math.ceil(cfg.eval_tokens / cfg.context_len)), seed=cfg.seed,
                       use_bos=cfg.use_bos)
    trackers = Trackers()
    if ctx.is_main:
        create_run_dirs(cfg, specs, d, moved_from, log)
        trackers = open_trackers(cfg, out, [m.name for m in specs], log)
        stack.callback(trackers.close)
    ctx.barrier()
    source = ActivationSource(lm, data, columns.hooks, store_dtype=store_dtype,
                              cache_max_bytes=int(cfg.cache_activations_gb * 2**30), rank=ctx.rank, world=ctx.world_size)
    buffer = ActivationBuffer(source, cfg.buffer_tokens, cfg.batch_size, len(columns) * d, dtype=store_dtype,
                              device=buf_device, pin_memory=device.type == "cuda", seed=cfg.seed,
                              out_device=device, rank=ctx.rank, world=ctx.world_size)
    stack.callback(buffer.close)
    placement = place_members([m.expansion for m in specs], ctx.dp, cfg.batch_size)
    exchange = RowExchange(ctx, d, row_needs(ctx, placement, [columns.blocks(m.site) for m in specs]), out_device=device)
    if ctx.distributed:
        idle = ctx.dp - len({g for groups in placement for g in groups})
        log(f"placement over {ctx.dp} model group{'s' if ctx.dp > 1 else ''} of {ctx.tp}: " + "; ".join(
            f"{m.name} on group{'s' if len(g) > 1 else ''} {','.join(map(str, g))}" for m, g in zip(specs[:8], placement))
            + (" ..." if len(specs) > 8 else "") + (f"; {idle} group(s) only produce activations" if idle else ""))
    return Job(cfg, ctx, device, specs, d, out, log, lm, data, columns, source, buffer, placement, exchange,
               buffer_bytes, trackers)


def make_members(job: Job):
    """``(members this rank trains, every member's dataset norms, the checkpoint to resume or None)``."""
    cfg, log = job.cfg, job.log
    state = None
    if cfg.resume:
        state = load_state(job.out / names.STATE)
        norms = state["extra"]["norms"]
        log(f"resuming at step {state['step']} (checkpoint of {state['world_size']} rank(s), tp {state['tp']})")
    else:
        norms, mu, n = dataset_norms(job.buffer, job.ctx, job.columns, job.specs, cfg.norm_tokens, job.d_model,
                                     progress=cfg.progress)
        log(f"dataset-wise norms over {n} tokens: " + ", ".join(
            f"{h} {mu[h]:.4g}" for h in job.columns.hooks[:6]) + (" ..." if len(job.columns) > 6 else ""))
    members = build_members(cfg, job.specs, member_contexts(job.ctx, job.placement), job.columns, norms,
                            d_model=job.d_model, model_name=job.lm.name, device=job.device, out=job.out)
    return members, norms, state


def fit(job: Job, members: List[Member], norms, state, clock: "Clock") -> Trainer:
    """The training loop to the last step (or ``--stop-after-steps``); the producer stops after it."""
    cfg = job.cfg
    trainer = Trainer(members, job.buffer, total_steps=cfg.total_steps, batch_size=cfg.batch_size, output=job.out,
                      exchange=job.exchange, ctx=job.ctx, member_dirs={m.name: job.out / m.name for m in job.specs},
                      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                      stop_after_steps=cfg.stop_after_steps, progress=cfg.progress,
                      extra_state={"norms": norms}, log=job.log, on_log=Estimate(job, clock).wrap(job.trackers.log))
    if state is not None:
        trainer.load_checkpoint(state)
    clock.mark("fit", step=trainer.t)
    try:
        trainer.fit()
    except StopTraining as e:
        job.log(str(e))
    finally:
        job.buffer.close()
    clock.mark("trained")
    return trainer


def finished(done: RunFinished, log: Callable[[str], None]) -> Dict[str, Any]:
    """A finished run: say so, remove the checkpoint files a kill during its clean-up left (rank 0, holding
    the folders' locks), return its members' ``eval.json``."""
    log(str(done))
    if int(os.environ.get("RANK", "0") or 0) == 0:  # rank 0 of the job (the context was not built)
        names.finish_run(done.root, done.folders)
    return {"finished": True,
            "members": {f.name: json.loads((f / names.EVAL).read_text()) for f in done.folders}}


def report(job: Job, trainer: Trainer, members: List[Member], results: Dict[str, Dict[str, Any]],
           clock: "Clock") -> Dict[str, Any]:
    """Rank 0 gathers every rank's results and statistics and writes the suite's files."""
    ctx = job.ctx
    clock.mark("done")
    stats = {"lm_seconds": job.source.lm_seconds, "lm_tokens": job.source.lm_tokens,
             "eval_seconds": clock.wall("trained", "done"), "wait_seconds": trainer.wait_seconds,
             "rows_received_bytes": job.exchange.bytes_received,
             "sae_step_seconds": {m.name: m.step_seconds for m in members}}
    gathered = ctx.gather_object((results, stats))
    if ctx.distributed:
        ctx.barrier()
        ctx.shutdown()
    if not ctx.is_main:
        return {"rank": ctx.rank}
    everyone: Dict[str, Dict[str, Any]] = {}
    for res, _ in gathered:
        everyone.update(res)
    ordered = {m.name: everyone[m.name] for m in job.specs}
    suite = suite_record(cfg=job.cfg, specs=job.specs, placement=job.placement, tp=ctx.tp, dp=ctx.dp,
                         world_size=ctx.world_size, results=ordered, stats=[st for _, st in gathered],
                         hooks=job.columns.hooks, d_model=job.d_model, model=job.lm.name,
                         buffer_bytes=job.buffer_bytes, seconds=clock.phases(trainer, "wall"),
                         cpu_seconds=clock.phases(trainer, "cpu"))
    finish(suite, ordered, job.log)
    job.trackers.summary(ordered)
    for name, res in ordered.items():
        for warning in res.get("warnings", []):
            job.log(f"warning: {name}: {warning}")
    return {"members": ordered, "suite": suite}


class Estimate:
    """Once, after the first ~5% of the steps, one line with the whole job's expected time: the training's
    rest at the speed measured so far, and the evaluation's LM passes at the LM's measured speed."""

    def __init__(self, job: Job, clock: "Clock") -> None:
        self.job, self.clock, self.done = job, clock, False

    def wrap(self, on_log: Callable[[int, Dict[str, Dict[str, Any]]], None]):
        def logged(step: int, records: Dict[str, Dict[str, Any]]) -> None:
            on_log(step, records)
            cfg = self.job.cfg
            if not self.done and step >= max(1, cfg.total_steps // 20) and step < cfg.total_steps:
                self.done = True
                self.job.log(self.line(step))
        return logged

    def line(self, step: int) -> str:
        job, cfg = self.job, self.job.cfg
        spent = self.clock.wall("fit")
        started = self.clock.marks["fit"][2]  # the step training started from (a resumed run's checkpoint)
        train_left = spent / max(1, step - started) * (cfg.total_steps - step)
        lm_speed = job.source.lm_tokens / max(job.source.lm_seconds, 1e-9)  # up to the deepest member's layer
        deepest = max(m.layer for m in job.specs) + 1
        whole = job.lm.n_layers / deepest  # a full pass (CE with and without the SAEs) runs every layer
        lm_tokens = len(job.data.eval) * cfg.context_len * (whole if cfg.eval_lm_loss else 1.0)
        if cfg.eval_lm_loss:
            passes = 1 + len({m.site for m in job.specs}) + len(job.specs)  # clean, zero-ablated, spliced
            lm_tokens += passes * min(cfg.eval_lm_tokens, len(job.data.eval) * cfg.context_len) * whole
        if cfg.jumprelu:
            lm_tokens += cfg.jumprelu_tokens
        eval_s = lm_tokens / max(lm_speed, 1e-9) if job.source.lm_tokens else 0.0
        end = time.strftime("%H:%M", time.localtime(time.time() + train_left + eval_s))
        return (f"estimate after step {step}: training {_duration(train_left)} more, evaluation and export about "
                f"{_duration(eval_s)}: the run ends around {end}")


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Clock:
    """Wall and CPU (this process) time at the marks of a run: start, loaded, fit, trained, done."""

    def __init__(self) -> None:
        self.marks: Dict[str, tuple] = {}
        self.mark("start")

    def mark(self, name: str, step: int = 0) -> None:
        self.marks[name] = (time.perf_counter(), time.process_time(), step)

    def wall(self, a: str, b: Optional[str] = None) -> float:
        end = self.marks[b][0] if b else time.perf_counter()
        return end - self.marks[a][0]

    def phases(self, trainer: Trainer, kind: str) -> Dict[str, float]:
        """Seconds per phase: model load, data and first buffer fill, training, export + evaluation, total
        (wall: training as the loop measured it, which resume adds up; CPU: this process's, between marks)."""
        i = 0 if kind == "wall" else 1
        t = {k: v[i] for k, v in self.marks.items()}
        train = trainer.elapsed if kind == "wall" else t["trained"] - t["fit"]
        return {"load_model": round(t["loaded"] - t["start"], 2), "data_and_first_fill": round(t["fit"] - t["loaded"], 2),
                "train": round(train, 2), "eval_export": round(t["done"] - t["trained"], 2),
                "total": round(t["done"] - t["start"], 2)}

    def member_seconds(self, trainer: Trainer, member: Member) -> Dict[str, float]:
        """A member's ``eval.json`` times (wall), taken when its evaluation ends."""
        t = {k: v[0] for k, v in self.marks.items()}
        now = time.perf_counter()
        return {"load_model": round(t["loaded"] - t["start"], 2), "data_and_first_fill": round(t["fit"] - t["loaded"], 2),
                "train": round(trainer.elapsed, 2), "sae_steps": round(member.step_seconds, 2),
                "eval_export": round(now - t["trained"], 2), "total": round(now - t["start"], 2)}


# ----------------------------------------------------------------------------------- the command


def _terminated(signum, frame):
    raise Interrupted("stopped by SIGTERM outside the training loop (loading, evaluation or export); run the "
                      "command again, with --resume if the run wrote a checkpoint", signum)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m trainer.run``: exit 0 when the run finished (or stopped as asked), 2 on bad input, 1 when
    the producer or a checkpoint write failed, 143 / 130 on SIGTERM / Ctrl-C."""
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _terminated) if main_thread else None  # the loop handles its own
    try:
        cfg = TrainConfig(**vars(args))
        result = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    except ProducerError as e:
        cause = e.__cause__
        print(f"error: {cause if isinstance(cause, ValueError) else e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointWriteError, Diverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a permission, a link outside a checkpoint write: one line
        print(f"error: could not write {describe_os_error(e)}; the files written before are intact", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_term)
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
