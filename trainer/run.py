"""``python -m trainer.run``: train Llama Scope SAEs end to end, then evaluate and export them.

A run trains a suite of SAEs from one LM pass; a single SAE is a suite of one. With no arguments:
SmolLM2-135M-Instruct (embedded GGUF) on CPython's docs, layer 12, residual stream, 8x, K=50, on the
CPU in a few minutes. The real jobs, on GPUs::

    python -m trainer.run --model meta-llama/Llama-3.1-8B --dataset <hf dataset> \\
        --layer 15 --position R --expansion 8 --tokens 800000000
    python -m trainer.run --hookpoints L3R,L6R,L9M,L12TC ...          # four SAEs, one LM pass
    torchrun --nproc_per_node 8 -m trainer.run --layers 0-31:4 --positions R,M --expansion 8,32 ...

Outputs: each member in ``<output>/L{layer}{position}-{expansion}x/`` exactly as a run alone writes
it (the released Llama Scope layout: ``hyperparams.json``, ``lm_config.json``,
``checkpoints/final.safetensors``; ``metrics.jsonl``, ``eval.json``, ``train_config.json``, with
``--jumprelu`` a ``jumprelu/`` folder), and ``<output>/suite.json``, ``suite.md``, ``suite.csv``,
``suite.png``; ``<output>/resume/`` while training.

The pipeline: the LM runs once per context up to the deepest member's layer, capturing every hook
point; one activation buffer holds each token's row of all hook points (one permutation serves every
member); each member has its own norms, initialisation (seeded by the seed and its name), Adam,
schedules, counters and metrics. Under torchrun the producers are data-parallel over all ranks, the
members are placed on model groups (balanced by parameter count, sharded over ``--tp``), and each
step's rows are moved to the ranks that train on them: the same SAEs on any layout (README,
'Training on several GPUs').
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from sae_kernels import SAEConfig, TopKSAE

from .buffer import ActivationBuffer, ProducerError
from .checkpoint import CheckpointWriteError, load_state
from .config import EMBEDDED_DEFAULTS, RECIPE_DEFAULTS, MemberSpec, TrainConfig
from .data import ContextData, load_documents
from .evaluate import EV_CONVENTION, evaluate_sites
from .model import hook_point_names, load_model, model_facts, position_hooks
from .parallel import RowExchange, RowNeed, ShardedTopKSAE, init_parallel, member_contexts, place_members
from .preflight import available_bytes, check_sae_memory, model_weight_bytes, offline_if_unreachable
from .producer import ActivationSource
from .run_folder import (
    clear_run_files, describe_removed, locked_run_folders, remove_resume_files, remove_stale_temps, same_path,
)
from .stop import Interrupted
from .train import Member, SAEStep, StepConfig, StopTraining, Trainer, make_optimizer


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def check_run_dirs(cfg: TrainConfig, specs: List[MemberSpec]) -> Optional[str]:
    """Refuses to replace a finished or resumable run unless ``--overwrite``; with ``--resume`` the
    output folder must hold a checkpoint of a run with the same flags (paths compared resolved; the
    folder itself may have moved: returns where it was). Read-only (every rank checks)."""
    out = Path(cfg.output)
    state = out / Trainer.STATE_FILE
    if cfg.resume:
        if not state.is_file():
            raise ValueError(f"--resume: no checkpoint {state} to resume from")
        from sae_kernels.formats import _read_json

        saved = _read_json(out / RESUME_CONFIG, "--resume")
        diff = [
            f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}"
            for k, v in cfg.to_dict().items()
            if k not in TrainConfig.RUNTIME_FIELDS + ("output",) and not same_path(saved.get(k), v)
        ]
        if diff:
            raise ValueError("--resume: the flags differ from the run being resumed: " + "; ".join(diff))
        was = saved.get("output")
        return was if isinstance(was, str) and not same_path(was, str(out)) else None
    if state.exists() and not cfg.overwrite:
        raise ValueError(f"--output: {out} holds an unfinished run ({state}); pass --resume to continue it "
                         "or --overwrite to replace it")
    for m in specs:
        run_dir = out / m.name
        precious = [f for f in ("hyperparams.json", "eval.json") if (run_dir / f).exists()]
        if precious and not cfg.overwrite:
            raise ValueError(f"--output: the run folder {run_dir} already holds a run ({', '.join(precious)}); "
                             "pass --overwrite to replace it")
    return None


RESUME_CONFIG = "resume/train_config.json"


def create_run_dirs(cfg: TrainConfig, specs: List[MemberSpec], d_model: int, moved_from: Optional[str] = None,
                    log: Callable[[str], None] = print) -> None:
    """Every member's folder with its train_config.json (exactly a run alone's), and ``resume/``. Removes
    the temporary files of a killed run, and (a new run) the files of an earlier run of this trainer
    that check_run_dirs allowed to replace; never anything else. Rank 0, holding the folders' locks."""
    out = Path(cfg.output)
    member_dirs = [out / m.name for m in specs]
    gone, size = remove_stale_temps(out, member_dirs)
    if gone:
        log(describe_removed(gone, size))
    if cfg.resume:
        if moved_from is not None:  # a moved run folder: its configs name where it is now
            log(f"--resume: the run folder moved from {moved_from} to {out}")
            (out / RESUME_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            for m in specs:
                (out / m.name / "train_config.json").write_text(
                    json.dumps(cfg.solo(m, d_model).to_dict(), indent=2) + "\n")
        return
    clear_run_files(out, member_dirs)  # --overwrite, or leftovers of a failed start (checked by check_run_dirs)
    for folder in [out / "resume"] + member_dirs:
        folder.mkdir(parents=True, exist_ok=True)
    (out / RESUME_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    for m in specs:
        (out / m.name / "train_config.json").write_text(json.dumps(cfg.solo(m, d_model).to_dict(), indent=2) + "\n")


def _sources_rows(source: ActivationSource, n: int) -> torch.Tensor:
    """The first ``n`` non-special training rows of ``source`` from its start (every column)."""
    rows, got = [], 0
    for chunk in source:
        rows.append(chunk.x)
        got += chunk.x.shape[0]
        if got >= n:
            break
    return torch.cat(rows)[:n]


def member_seed(seed: int, name: str) -> int:
    """The seed of a member's initialisation: a function of the run's seed and the member's name only,
    so adding or removing members changes no other member."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:7], "little")


def suite_hooks(specs: List[MemberSpec]) -> List[str]:
    """The distinct hook points a suite reads, in member order: the buffer's column blocks."""
    hooks: List[str] = []
    for m in specs:
        hooks += [h for h in position_hooks(m.layer, m.position) if h not in hooks]
    return hooks


def check_buffer_memory(cfg: TrainConfig, n_hooks: int, d_model: int, elem: int, world: int,
                        device: torch.device) -> int:
    """Bytes of this rank's activation buffer; refuses (naming --buffer-tokens) what does not fit."""
    rows = cfg.buffer_tokens if world == 1 else -(-cfg.buffer_tokens // world) + 2 * cfg.batch_size
    need = rows * n_hooks * d_model * elem
    free = available_bytes(device)
    # host memory is shared by the ranks of a node
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) if device.type == "cpu" else 1
    if free is not None and need * sharing > 0.9 * free:
        per = f" / {world} ranks" if world > 1 else ""
        on = f"{device}" + (f" (shared by {sharing} ranks)" if sharing > 1 else "")
        raise ValueError(
            f"--buffer-tokens: the activation buffer needs {need / 2**30:.2f} GiB on this rank "
            f"({cfg.buffer_tokens:,} tokens{per} x {n_hooks} hook point column blocks x d_model {d_model} x "
            f"{elem} bytes), more than the {free / 2**30:.2f} GiB free on {on}; lower --buffer-tokens "
            "or train fewer hook points per run"
        )
    return need


def _layout(specs: List[MemberSpec], placement: List[List[int]], ctx, d_model: int,
            block: Dict[str, int]) -> List[RowNeed]:
    """What every global rank trains on (its share of each batch and its columns)."""
    needs = [RowNeed() for _ in range(ctx.world_size)]
    for m, groups in zip(specs, placement):
        blocks = [block[h] for h in position_hooks(m.layer, m.position)]
        for i, g in enumerate(groups):
            for mr in range(ctx.tp):
                q = g * ctx.tp + mr
                old = needs[q]
                if old.blocks and (old.replica, old.dp) != (i, len(groups)):
                    raise AssertionError("placement: members of one rank train on different rows")
                needs[q] = RowNeed(i, len(groups), tuple(sorted(set(old.blocks) | set(blocks))))
    return needs


def run(cfg: TrainConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The whole pipeline for a suite of one or many SAEs; returns the suite's results
    (``{"members": {name: eval.json contents}, ...}``) on rank 0, or ``{"stopped": step}``. Holds the
    run folders' locks (rank 0) for the whole run."""
    with contextlib.ExitStack() as stack:
        return _run(cfg, log, stack)


def _run(cfg: TrainConfig, log: Callable[[str], None], stack: contextlib.ExitStack) -> Dict[str, Any]:
    t_start, c_start = time.perf_counter(), time.process_time()
    ctx = init_parallel(cfg.tp, timeout_s=cfg.dist_timeout,
                        device=None if cfg.device == "auto" else _device(cfg.device))
    device = ctx.device if ctx.distributed else _device(cfg.device)
    if not ctx.is_main:
        log = lambda s: None  # noqa: E731 -- rank 0 logs for the job
    if ctx.distributed:
        log(f"torch.distributed: {ctx.world_size} ranks = {ctx.dp} data-parallel x {ctx.tp} tensor-parallel, "
            f"{ctx.backend}")
    stack.callback(offline_if_unreachable(cfg.model, cfg.dataset, log))  # a Hub name fails fast offline
    # every flag that names layers is checked against the model's configuration before the model loads
    n_layers, d = model_facts(cfg.model)
    cfg = cfg.resolve(n_layers, d, device.type)
    specs = cfg.members()
    for m in specs:
        ctx.check_width(m.expansion * d)
    out = Path(cfg.output)
    stack.enter_context(locked_run_folders(out, [out / m.name for m in specs], ctx, log))  # one run at a time
    moved_from = check_run_dirs(cfg, specs)  # read-only: every rank checks, then rank 0 creates
    bf16 = cfg.precision == "bf16"
    lm_dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    # the data and the memory are checked before the model loads
    docs = load_documents(cfg.dataset, split=cfg.split, text_column=cfg.text_column,
                          dataset_config=cfg.dataset_config, streaming=cfg.streaming)
    hooks = suite_hooks(specs)
    block = {h: i for i, h in enumerate(hooks)}
    store_dtype = torch.bfloat16 if bf16 else torch.float32
    buf_device = torch.device("cpu") if cfg.buffer_device == "cpu" else device
    elem = torch.empty((), dtype=store_dtype).element_size()
    buffer_bytes = check_buffer_memory(cfg, len(hooks), d, elem, ctx.world_size, buf_device)
    check_sae_memory(expansions=[m.expansion for m in specs], d_model=d, rank=ctx.rank, tp=ctx.tp, dp=ctx.dp,
                     batch_size=cfg.batch_size, bf16=bf16, device=device,
                     model_bytes=model_weight_bytes(cfg.model, 2 if bf16 else 4), buffer_bytes=buffer_bytes,
                     buffer_device=buf_device, sharing=int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))

    log(f"loading model {cfg.model!r} ...")
    lm = load_model(cfg.model, device=device, dtype=lm_dtype)
    if (lm.n_layers, lm.d_model) != (n_layers, d):
        raise ValueError(f"--model {cfg.model!r}: the loaded model has {lm.n_layers} layers of width {lm.d_model}, "
                         f"its configuration said {n_layers} x {d}")
    t_loaded, c_loaded = time.perf_counter(), time.process_time()
    ctx.barrier()
    names = ", ".join(m.name for m in specs[:8]) + (f", ... ({len(specs)} SAEs)" if len(specs) > 8 else "")
    log(f"{lm.name}, d_model {d}: {names}; k {cfg.k}, {cfg.tokens:,} tokens in {cfg.total_steps} steps of "
        f"{cfg.batch_size}; the LM runs once up to layer {max(m.layer for m in specs)}, reading {len(hooks)} "
        f"hook point{'s' if len(hooks) > 1 else ''} -> {out}")

    data = ContextData(docs, lm.tokenizer, cfg.context_len, cfg.lm_batch_size, eval_every=cfg.eval_every,
                       eval_contexts=max(1, math.ceil(cfg.eval_tokens / cfg.context_len)), seed=cfg.seed,
                       use_bos=cfg.use_bos)
    if ctx.is_main:
        create_run_dirs(cfg, specs, d, moved_from, log)
    ctx.barrier()
    source = ActivationSource(lm, data, hooks, store_dtype=store_dtype,
                              cache_max_bytes=int(cfg.cache_activations_gb * 2**30),
                              rank=ctx.rank, world=ctx.world_size)
    special_ids = source.special_ids
    buffer = ActivationBuffer(source, cfg.buffer_tokens, cfg.batch_size, len(hooks) * d, dtype=store_dtype,
                              device=buf_device, pin_memory=device.type == "cuda", seed=cfg.seed,
                              out_device=device, rank=ctx.rank, world=ctx.world_size)
    placement = place_members([m.expansion for m in specs], ctx.dp, cfg.batch_size)
    mctx = member_contexts(ctx, placement)
    exchange = RowExchange(ctx, d, _layout(specs, placement, ctx, d, block), out_device=device)
    if ctx.distributed:
        idle = ctx.dp - len({g for groups in placement for g in groups})
        log(f"placement over {ctx.dp} model group{'s' if ctx.dp > 1 else ''} of {ctx.tp}: " + "; ".join(
            f"{m.name} on group{'s' if len(g) > 1 else ''} {','.join(map(str, g))}" for m, g in zip(specs[:8], placement))
            + (" ..." if len(specs) > 8 else "") + (f"; {idle} group(s) only produce activations" if idle else ""))

    state = None
    if cfg.resume:
        state = load_state(out / Trainer.STATE_FILE)
        norms = state["extra"]["norms"]
        log(f"resuming at step {state['step']} (checkpoint of {state['world_size']} rank(s), tp {state['tp']})")
    else:
        try:
            rows, n_norm = buffer.first_rows(cfg.norm_tokens)
        except ProducerError:
            buffer.close()
            raise
        sums = torch.stack([rows[:, i * d:(i + 1) * d].double().norm(dim=-1).sum() for i in range(len(hooks))])
        sums = ctx.world_all_reduce(sums.to(ctx.device)).cpu()  # the same tokens as one process: the first n_norm
        if n_norm == 0:
            buffer.close()
            raise ValueError("estimate_norm: no tokens (every token was special?)")
        mu = {h: float(sums[i]) / n_norm for i, h in enumerate(hooks)}
        norms = {}
        for m in specs:
            hp_in, hp_out = hook_point_names(m.layer, m.position)
            norms[m.name] = {"in": mu[hp_in], "out": mu[hp_out], "tokens": n_norm}
        log(f"dataset-wise norms over {n_norm} tokens: " + ", ".join(
            f"{h} {mu[h]:.4g}" for h in hooks[:6]) + (" ..." if len(hooks) > 6 else ""))

    compute_dtype = torch.bfloat16 if bf16 else None
    members: List[Member] = []
    for m, mc in zip(specs, mctx):
        if mc is None:
            continue  # trained on other ranks
        scfg = cfg.solo(m, d)
        hp_in, hp_out = hook_point_names(m.layer, m.position)
        sae_cfg = SAEConfig(d_model=d, d_sae=m.expansion * d, k=cfg.k, weighted_topk=not cfg.plain_topk,
                            dtype="float32", hook_point_in=hp_in, hook_point_out=hp_out, model_name=lm.name,
                            layer=m.layer, position=m.position)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(member_seed(cfg.seed, m.name))
            sae = TopKSAE(sae_cfg, transcoder=m.position == "TC", device=device)
        sae.check_inputs = False
        nm = norms[m.name]
        sae.cfg = sae.cfg.replace(norm_in=math.sqrt(d) / nm["in"], norm_out=math.sqrt(d) / nm["out"])
        step_cfg = StepConfig.from_train_config(scfg, compute_dtype)
        # every rank of the member built the same full SAE; each keeps its rows (all of them at tp 1)
        sae = ShardedTopKSAE.from_full(sae, mc) if mc.tp > 1 else ShardedTopKSAE.adopt(sae, mc)
        step = SAEStep(sae, make_optimizer(sae, cfg.lr, (cfg.beta1, cfg.beta2)), step_cfg, mc)
        members.append(Member(m.name, out / m.name, step, block[hp_in], None if hp_out == hp_in else block[hp_out],
                              extra_state={"norms": nm}))
    trainer = Trainer(members, buffer, total_steps=cfg.total_steps, batch_size=cfg.batch_size, output=out,
                      exchange=exchange, ctx=ctx, member_dirs={m.name: out / m.name for m in specs},
                      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                      stop_after_steps=cfg.stop_after_steps, progress=cfg.progress,
                      extra_state={"norms": norms}, log=log)
    if state is not None:
        trainer.load_checkpoint(state)
        del state
    t_fit, c_fit = time.perf_counter(), time.process_time()
    try:
        trainer.fit()
    except StopTraining as e:
        log(str(e))
        return {"stopped": trainer.t}
    finally:
        buffer.close()
    t_trained, c_trained = time.perf_counter(), time.process_time()

    # ---- each member's main rank gathers its SAE, exports it in the released layout, evaluates what a
    # user reloads; its members share one pass over the held-out contexts (one clean LM pass)
    mine: Dict[str, Tuple[Member, TopKSAE, Dict[str, int]]] = {}
    for mem in members:
        full = mem.step.full_sae()
        deaths = mem.step.deaths
        dead = {"dead_latents_train": int((mem.step.since_fired >= mem.step.cfg.dead_window_tokens).sum()),
                "latents_died_train": int((deaths > 0).sum()), "death_events_train": int(deaths.sum())}
        if mem.ctx.is_main:
            mine[mem.name] = (mem, full.to(device), dead)
    ctx.barrier()
    spec_of = {m.name: m for m in specs}
    results: Dict[str, Dict[str, Any]] = {}
    t_eval0 = time.perf_counter()
    if mine:
        saes: Dict[Tuple[int, str], Dict[str, TopKSAE]] = {}
        exported: Dict[str, Dict[str, Any]] = {}
        for name, (mem, sae, dead) in mine.items():
            m = spec_of[name]
            hyper = {
                "k_warmup_steps": mem.step.cfg.anneal_steps, "seed": cfg.seed, "lr": cfg.lr,
                "betas": [cfg.beta1, cfg.beta2], "train_batch_size": cfg.batch_size,
                "total_training_tokens": cfg.total_steps * cfg.batch_size, "context_size": cfg.context_len,
                "dataset": cfg.dataset, "layer": m.layer, "position": m.position, "loss": cfg.loss,
                "clip_grad_norm": cfg.clip_grad_norm, "lr_warm_up_steps": cfg.warmup_steps, "auxk": cfg.auxk,
                "k_aux": mem.step.cfg.k_aux, "auxk_coef": cfg.auxk_coef, "dead_window_tokens": mem.step.cfg.dead_window_tokens,
                "data_init": cfg.data_init, "b_dec_init_fraction": cfg.b_dec_init_fraction,
                "recentre_dead": cfg.recentre_dead, "hold_dead": cfg.hold_dead, "reset_dead_moments": cfg.reset_dead_moments,
                "released_recipe": cfg.released_recipe,
                "dtype": f"torch.{cfg.export_dtype}", "tp_size": ctx.tp, "ddp_size": mem.ctx.dp,
            }
            sae.to_llama_scope(mem.run_dir, hyperparams=hyper, lm_config=lm.lm_config(), dtype=cfg.export_dtype)
            saes.setdefault((m.layer, m.position), {})[name] = TopKSAE.from_llama_scope(mem.run_dir, device=device)
            exported[name] = hyper
        if cfg.jumprelu:
            log(f"JumpReLU thresholds from {cfg.jumprelu_tokens} training tokens ...")
            calib = ActivationSource(lm, data, hooks, store_dtype=torch.float32, epochs=1)
            if source.cache is not None:
                calib.cache = source.cache  # same batches: replay what the training run computed
            rows = _sources_rows(calib, cfg.jumprelu_tokens)
            for name, (mem, _, _) in mine.items():
                m = spec_of[name]
                site = (m.layer, m.position)
                acts = rows[:, mem.block_in * d:(mem.block_in + 1) * d].to(device)
                jr = saes[site][name].to_jumprelu(acts, k=cfg.k)
                jr.to_llama_scope(mem.run_dir / "jumprelu", hyperparams=dict(exported[name], jumprelu_tokens=int(acts.shape[0])),
                                  lm_config=lm.lm_config(), dtype=cfg.export_dtype)
                saes[site][name + "/jumprelu"] = TopKSAE.from_llama_scope(mem.run_dir / "jumprelu", device=device)
        source.cache = None
        log(f"evaluating on {len(data.eval)} held-out contexts ...")
        metrics, _ = evaluate_sites(lm, saes, data.eval, special_ids=special_ids,
                                    batch_size=max(1, min(cfg.lm_batch_size, 2)), lm_loss=cfg.eval_lm_loss,
                                    lm_loss_contexts=max(1, math.ceil(cfg.eval_lm_tokens / cfg.context_len)))
        t_done = time.perf_counter()
        for name, (mem, sae, dead) in mine.items():
            m = spec_of[name]
            result: Dict[str, Any] = dict(metrics[name])
            result.update({
                "k": cfg.k, "d_sae": sae.d_sae, "d_model": d, "layer": m.layer, "position": m.position,
                "expansion": m.expansion, "model": lm.name, "dataset": cfg.dataset,
                **dead, "dead_window_tokens": cfg.dead_window_tokens,
                "dead_latents_convention": "dead_latents_eval: no activation on any held-out token; dead_latents_train: "
                                           "no activation in the last dead_window_tokens training tokens; "
                                           "latents_died_train: latents that were dead (by that window) at some "
                                           "step; death_events_train: how often a latent became dead, summed",
                "explained_variance_convention": EV_CONVENTION,
                "checkpoint": str(mem.run_dir), "checkpoint_dtype": cfg.export_dtype,
                "evaluated": "the exported checkpoint as reloaded by TopKSAE.from_llama_scope",
                "train_final": mem.last, "train_steps": cfg.total_steps, "train_tokens": cfg.total_steps * cfg.batch_size,
                "lm_tokens": source.lm_tokens, "suite_members": len(specs),
                "seconds": {"load_model": round(t_loaded - t_start, 2), "data_and_first_fill": round(t_fit - t_loaded, 2),
                            "train": round(trainer.elapsed, 2), "sae_steps": round(mem.step_seconds, 2),
                            "eval_export": round(t_done - t_trained, 2), "total": round(t_done - t_start, 2)},
            })
            if name + "/jumprelu" in metrics:
                jsae = saes[(m.layer, m.position)][name + "/jumprelu"]
                result["jumprelu"] = dict(metrics[name + "/jumprelu"], checkpoint=str(mem.run_dir / "jumprelu"),
                                          threshold=float(jsae.threshold[0]))
            (mem.run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            remove_resume_files(mem.run_dir / "resume")  # the run is complete; the final weights are in checkpoints/
            results[name] = result
    t_done, c_done = time.perf_counter(), time.process_time()
    stats = {"lm_seconds": source.lm_seconds, "lm_tokens": source.lm_tokens, "eval_seconds": t_done - t_eval0,
             "wait_seconds": trainer.wait_seconds, "rows_received_bytes": exchange.bytes_received,
             "sae_step_seconds": {m.name: m.step_seconds for m in members}}
    gathered = ctx.gather_object((results, stats))
    if ctx.distributed:
        ctx.barrier()
        ctx.shutdown()
    if not ctx.is_main:
        return {"rank": ctx.rank}
    all_results: Dict[str, Dict[str, Any]] = {}
    for res, _ in gathered:
        all_results.update(res)
    ordered = {m.name: all_results[m.name] for m in specs}
    seconds = {"load_model": round(t_loaded - t_start, 2), "data_and_first_fill": round(t_fit - t_loaded, 2),
               "train": round(trainer.elapsed, 2), "eval_export": round(t_done - t_trained, 2),
               "total": round(t_done - t_start, 2),
               "lm_forward": round(sum(st["lm_seconds"] for _, st in gathered), 2),
               "sae_steps": round(sum(v for _, st in gathered for v in st["sae_step_seconds"].values()), 2),
               "eval": round(max(st["eval_seconds"] for _, st in gathered), 2),
               "waiting_for_rows": round(max(st["wait_seconds"] for _, st in gathered), 2)}
    suite = {
        "members": [dict(name=m.name, layer=m.layer, position=m.position, expansion=m.expansion,
                         folder=str(out / m.name), ranks=[g * ctx.tp + r for g in groups for r in range(ctx.tp)],
                         **{k: ordered[m.name].get(k) for k in SUITE_COLUMNS})
                    for m, groups in zip(specs, placement)],
        "settings": {k: v for k, v in cfg.to_dict().items() if k not in ("layer", "position", "expansion")},
        "expansions": cfg.expansions, "hook_points": hooks, "d_model": d, "model": lm.name,
        "layout": {"world_size": ctx.world_size, "tp": ctx.tp, "dp": ctx.dp},
        "lm_tokens": sum(st["lm_tokens"] for _, st in gathered),
        "buffer_bytes_per_rank": buffer_bytes, "rows_received_bytes": sum(st["rows_received_bytes"] for _, st in gathered),
        "seconds": seconds,
        # CPU time of rank 0's process (all its threads) per phase: less sensitive than wall time to other
        # jobs on the machine; "train" holds the SAE steps and the LM forwards that overlap them
        "cpu_seconds": {"load_model": round(c_loaded - c_start, 2), "data_and_first_fill": round(c_fit - c_loaded, 2),
                        "train": round(c_trained - c_fit, 2), "eval_export": round(c_done - c_trained, 2),
                        "total": round(c_done - c_start, 2)},
    }
    write_suite_files(out, suite)
    remove_resume_files(out / "resume")
    for name in list(ordered)[:8]:
        log(f"{name}: " + summary(ordered[name]).replace("\n", f"\n{name}: "))
    log(suite_table(suite))
    log(f"suite of {len(specs)} SAE{'s' if len(specs) > 1 else ''}: wall time {seconds['total']:.0f}s (model load "
        f"{seconds['load_model']:.0f}s, data and first buffer fill {seconds['data_and_first_fill']:.0f}s, training "
        f"{seconds['train']:.0f}s, export+eval {seconds['eval_export']:.0f}s) -> {out}/suite.json")
    return {"members": ordered, "suite": suite}


SUITE_COLUMNS = ("explained_variance", "l0", "delta_lm_loss", "ce_score", "dead_latents_eval", "dead_latents_train",
                 "d_sae")


def suite_table(suite: Dict[str, Any]) -> str:
    """The suite's results as a Markdown table (also printed at the end of a run)."""
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = ["| member | EV | L0 | delta LM loss | CE score | dead (held-out) | dead (train) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in suite["members"]:
        lines.append(f"| {m['name']} | {f(m['explained_variance'], '.4f')} | {f(m['l0'], '.2f')} | "
                     f"{f(m['delta_lm_loss'], '.4f')} | {f(m['ce_score'], '.4f')} | "
                     f"{m['dead_latents_eval']} / {m['d_sae']} | {m['dead_latents_train']} / {m['d_sae']} |")
    return "\n".join(lines)


def write_suite_files(out: Path, suite: Dict[str, Any]) -> None:
    """``suite.json``, ``suite.md``, ``suite.csv`` and ``suite.png`` (EV, delta LM loss, L0 and the dead
    fraction against the layer, one line per position and width: Figure 10 of the Llama Scope paper)."""
    import csv
    import io

    from sae_kernels.formats import atomic_write_json

    atomic_write_json(out / "suite.json", suite)
    (out / "suite.md").write_text(suite_table(suite) + "\n")
    buf = io.StringIO()
    cols = ["name", "layer", "position", "expansion", *SUITE_COLUMNS]
    w = csv.writer(buf)
    w.writerow(cols)
    for m in suite["members"]:
        w.writerow([m.get(c) for c in cols])
    (out / "suite.csv").write_text(buf.getvalue())
    plot_suite(suite, out / "suite.png")


def plot_suite(suite: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("explained_variance", "explained variance"), ("delta_lm_loss", "delta LM loss"),
              ("l0", "L0"), ("dead_fraction", "dead latents (held-out fraction)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    lines: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    for m in suite["members"]:
        lines.setdefault((m["position"], m["expansion"]), []).append(m)
    for ax, (key, title) in zip(axes, panels):
        for (pos, exp), ms in lines.items():
            ms = sorted(ms, key=lambda m: m["layer"])
            ys = [(m["dead_latents_eval"] / m["d_sae"]) if key == "dead_fraction" else m.get(key) for m in ms]
            pts = [(m["layer"], y) for m, y in zip(ms, ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{pos} {exp}x")
        if key == "delta_lm_loss" and all(m.get(key) is None for m in suite["members"]):
            ax.text(0.5, 0.5, "not measured\n(--no-eval-lm-loss)", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{suite['model']}: {len(suite['members'])} SAEs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(r: Dict[str, Any]) -> str:
    lines = [
        f"held-out ({r['n_tokens']} tokens): explained variance {r['explained_variance']:.4f} (ratio of sums), "
        f"{r['explained_variance_per_token']:.4f} (mean per token); L0 {r['l0']:.2f} (k={r['k']})",
    ]
    if "delta_lm_loss" in r:
        lines.append(f"CE clean {r['ce_clean']:.4f}, with SAE {r['ce_sae']:.4f} (delta LM loss {r['delta_lm_loss']:.4f}), "
                     f"zero-ablated {r['ce_zero_ablation']:.4f}, CE score {r['ce_score']:.4f}")
    lines.append(f"dead latents: {r['dead_latents_eval']} on held-out, {r['dead_latents_train']} in the last "
                 f"{r['dead_window_tokens']} training tokens")
    if "jumprelu" in r:
        j = r["jumprelu"]
        lines.append(f"JumpReLU (threshold {j['threshold']:.4g}): EV {j['explained_variance']:.4f}, L0 {j['l0']:.2f}")
    s = r["seconds"]
    lines.append(f"wall time {s['total']:.0f}s (model load {s['load_model']:.0f}s, data and first buffer fill "
                 f"{s['data_and_first_fill']:.0f}s, training {s['train']:.0f}s, export+eval {s['eval_export']:.0f}s) "
                 f"-> {r['checkpoint']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.run",
        description="Train Llama Scope TopK SAEs (or transcoders) on a causal LM, evaluate them and export "
                    "them in the released layout: one SAE (--layer, --position, --expansion) or a suite from one "
                    "LM pass (--hookpoints, or --layers / --positions / a list of --expansion). With no "
                    "arguments: SmolLM2-135M on CPython's docs, a few minutes on a CPU.",
        epilog="The README explains each part: 'Training an SAE' (outputs, the real GPU job, resume and "
               "preemption), 'Suites: many SAEs from one LM pass', 'Training on several GPUs' (--tp, torchrun) and "
               "'What is loaded, and what is never unpickled' (the security model, the run-folder lock).",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        base = f.metadata.get("cli_type") or _base_type(hint)
        text = f.metadata.get("help", "") + _default_text(f, flag, base)
        kw: Dict[str, Any] = {"help": text, "default": f.default, "dest": f.name}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = base
            kw["metavar"] = {int: "N", float: "X", str: "S"}[base]
        p.add_argument(flag, **kw)
    return p


_RECIPE_AUTO = {"layer": "n_layers // 2", "eval_lm_tokens": "all of --eval-tokens"}


def _default_text(f, flag: str, base: type) -> str:
    """`` (default: ...)`` for the help of ``f``: both families for the settings that depend on the model
    (the embedded default and the Llama Scope recipe), the flag itself for booleans."""
    def show(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    if f.name in EMBEDDED_DEFAULTS or f.name in RECIPE_DEFAULTS:
        emb = EMBEDDED_DEFAULTS.get(f.name)
        rec = RECIPE_DEFAULTS.get(f.name)
        emb_text = show(emb) if emb is not None else "as other models"
        rec_text = show(rec) if rec is not None else _RECIPE_AUTO[f.name]
        return f" (default: {emb_text} with the embedded model; {rec_text} for other models, the Llama Scope recipe)"
    if base is bool:
        on = f.default is True
        return f" (default: {flag if on else '--no-' + flag[2:]})" if f.default is not None else ""
    if f.default is not None:
        return " (default: %(default)s)"  # None defaults are explained in the text (auto per model)
    return ""


def _base_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _terminated(signum, frame):
    raise Interrupted("stopped by SIGTERM outside the training loop (loading, evaluation or export); run the "
                      "command again, with --resume if the run wrote a checkpoint", signum)


def main(argv: Optional[List[str]] = None) -> int:
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
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
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
