"""``python -m trainer.run``: train a Llama Scope SAE end to end, then evaluate and export it.

With no arguments: SmolLM2-135M-Instruct (embedded GGUF) on CPython's docs, layer 12, residual
stream, 8x, K=50, on the CPU in a few minutes. The real job, on a GPU::

    python -m trainer.run --model meta-llama/Llama-3.1-8B --dataset <hf dataset> \\
        --layer 15 --position R --expansion 8 --tokens 800000000

Outputs in ``<output>/L{layer}{position}-{expansion}x/``: the released Llama Scope layout
(``hyperparams.json``, ``lm_config.json``, ``checkpoints/final.safetensors``), ``metrics.jsonl``,
``eval.json``, ``train_config.json``, ``resume/state.pt`` (while training), and with ``--jumprelu``
a ``jumprelu/`` folder in the same layout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from sae_kernels import SAEConfig, TopKSAE

from .buffer import ActivationBuffer, ProducerError
from .config import TrainConfig
from .data import ContextData, load_documents
from .evaluate import EV_CONVENTION, evaluate
from .model import hook_point_names, load_model
from .parallel import ShardedTopKSAE, init_parallel
from .parallel_step import ParallelSAEStep
from .producer import ActivationSource
from .train import SAEStep, StepConfig, StopTraining, Trainer, estimate_norm, make_optimizer


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


def check_run_dir(cfg: TrainConfig) -> Path:
    """The run folder. Refuses to replace a finished or resumable run unless ``--overwrite``;
    with ``--resume`` it must hold a checkpoint of a run with the same flags."""
    run_dir = Path(cfg.output) / cfg.run_name()
    if cfg.resume:
        if not (run_dir / Trainer.STATE_FILE).is_file():
            raise ValueError(f"--resume: no checkpoint {run_dir / Trainer.STATE_FILE} to resume from")
        saved = json.loads((run_dir / "train_config.json").read_text())
        diff = [
            f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}"
            for k, v in cfg.to_dict().items()
            if k not in TrainConfig.RUNTIME_FIELDS and saved.get(k) != v
        ]
        if diff:
            raise ValueError("--resume: the flags differ from the run being resumed: " + "; ".join(diff))
        return run_dir
    precious = [f for f in ("hyperparams.json", "eval.json", Trainer.STATE_FILE) if (run_dir / f).exists()]
    if precious and not cfg.overwrite:
        raise ValueError(
            f"--output: the run folder {run_dir} already holds a run ({', '.join(precious)}); pass --overwrite "
            "to replace it" + (" or --resume to continue it" if Trainer.STATE_FILE in precious else "")
        )
    return run_dir


def create_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    if cfg.resume:
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)  # checked by check_run_dir: --overwrite, or only leftovers of a failed start
    run_dir.mkdir(parents=True)
    (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def _sources_rows(source: ActivationSource, n: int) -> torch.Tensor:
    """The first ``n`` non-special training rows (inputs) of ``source`` from its start."""
    rows, got = [], 0
    for chunk in source:
        rows.append(chunk.x)
        got += chunk.x.shape[0]
        if got >= n:
            break
    return torch.cat(rows)[:n]


def run(cfg: TrainConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """The whole pipeline; returns the eval.json contents (or ``{"stopped": step}``)."""
    t_start = time.perf_counter()
    ctx = init_parallel(cfg.tp, timeout_s=cfg.dist_timeout,
                        device=None if cfg.device == "auto" else _device(cfg.device))
    device = ctx.device if ctx.distributed else _device(cfg.device)
    if not ctx.is_main:
        log = lambda s: None  # noqa: E731 -- rank 0 logs for the job
    if ctx.distributed:
        log(f"torch.distributed: {ctx.world_size} ranks = {ctx.dp} data-parallel x {ctx.tp} tensor-parallel, "
            f"{ctx.backend}")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    lm_dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    log(f"loading model {cfg.model!r} ...")
    lm = load_model(cfg.model, device=device, dtype=lm_dtype)
    cfg = cfg.resolve(lm.n_layers, lm.d_model, device.type)
    ctx.check_width(cfg.expansion * lm.d_model)
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size}: expected a multiple of the {ctx.world_size} ranks "
                         "(each rank produces batch_size / world tokens per step)")
    t_loaded = time.perf_counter()
    run_dir = check_run_dir(cfg)  # read-only: every rank checks, then rank 0 creates
    ctx.barrier()
    log(f"run {run_dir}: {lm.name}, layer {cfg.layer} {cfg.position}, d_model {lm.d_model}, "
        f"{cfg.expansion}x, k {cfg.k}, {cfg.tokens:,} tokens in {cfg.total_steps} steps of {cfg.batch_size}")

    docs = load_documents(cfg.dataset, split=cfg.split, text_column=cfg.text_column,
                          dataset_config=cfg.dataset_config, streaming=cfg.streaming)
    data = ContextData(docs, lm.tokenizer, cfg.context_len, cfg.lm_batch_size, eval_every=cfg.eval_every,
                       eval_contexts=max(1, math.ceil(cfg.eval_tokens / cfg.context_len)), seed=cfg.seed,
                       use_bos=cfg.use_bos)
    if ctx.is_main:
        create_run_dir(cfg, run_dir)
    ctx.barrier()
    store_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    source = ActivationSource(lm, data, cfg.layer, cfg.position, store_dtype=store_dtype,
                              cache_max_bytes=int(cfg.cache_activations_gb * 2**30), shard=ctx.data_shard())
    special_ids = source.special_ids
    d = lm.d_model
    tc = cfg.position == "TC"
    buf_device = torch.device("cpu") if cfg.buffer_device == "cpu" else device
    world = ctx.world_size  # each rank buffers and serves its share of every step's batch
    buffer = ActivationBuffer(source, cfg.buffer_tokens // world, cfg.batch_size // world, d, d if tc else None,
                              dtype=store_dtype, device=buf_device, pin_memory=device.type == "cuda",
                              seed=cfg.seed + ctx.rank, out_device=device)

    hp_in, hp_out = hook_point_names(cfg.layer, cfg.position)
    sae_cfg = SAEConfig(d_model=d, d_sae=cfg.expansion * d, k=cfg.k, weighted_topk=not cfg.plain_topk,
                        dtype="float32", hook_point_in=hp_in, hook_point_out=hp_out, model_name=lm.name,
                        layer=cfg.layer, position=cfg.position)
    torch.manual_seed(cfg.seed)
    sae = TopKSAE(sae_cfg, transcoder=tc, device=device)
    sae.check_inputs = False

    state = None
    if cfg.resume:
        # mmap: each rank reads only the rows of its shard from the (full-shape) state
        state = torch.load(run_dir / Trainer.STATE_FILE, map_location="cpu", weights_only=False, mmap=True)
        norms = state["extra"]["norms"]
        log(f"resuming at step {state['step']}")
    else:
        try:
            xs, ys = buffer.first_rows(-(-cfg.norm_tokens // world))
        except ProducerError:
            buffer.close()
            raise
        mu_in = estimate_norm(xs)
        mu_out = estimate_norm(ys) if ys is not None else estimate_norm(xs)
        if ctx.distributed:  # the mean of every rank's estimate (equal token counts)
            mu = ctx.world_all_reduce(torch.tensor([mu_in, mu_out], dtype=torch.float64, device=device), "mean")
            mu_in, mu_out = float(mu[0]), float(mu[1])
        norms = {"in": mu_in, "out": mu_out, "tokens": int(xs.shape[0]) * world}
        log(f"dataset-wise norms over {norms['tokens']} tokens: in {mu_in:.4g}, out {mu_out:.4g}")
    sae.cfg = sae.cfg.replace(norm_in=math.sqrt(d) / norms["in"], norm_out=math.sqrt(d) / norms["out"])

    step_cfg = StepConfig.from_train_config(cfg, torch.bfloat16 if cfg.precision == "bf16" else None)
    if ctx.distributed:  # every rank built the same full SAE from the seed; keep this rank's rows
        sae = ShardedTopKSAE.from_full(sae, ctx)
        opt = make_optimizer(sae, cfg.lr, (cfg.beta1, cfg.beta2))
        step = ParallelSAEStep(sae, opt, step_cfg, ctx)
    else:
        opt = make_optimizer(sae, cfg.lr, (cfg.beta1, cfg.beta2))
        step = SAEStep(sae, opt, step_cfg)
    trainer = Trainer(step, buffer, total_steps=cfg.total_steps, batch_size=cfg.batch_size, run_dir=run_dir,
                      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                      stop_after_steps=cfg.stop_after_steps, progress=cfg.progress,
                      extra_state={"norms": norms}, log=log)
    if state is not None:
        trainer.load_checkpoint(state)
        del state
    t_fit = time.perf_counter()
    try:
        last = trainer.fit()
    except StopTraining as e:
        log(str(e))
        return {"stopped": trainer.t}
    finally:
        buffer.close()
    t_trained = time.perf_counter()
    dead_train = int((step.since_fired >= cfg.dead_window_tokens).sum())
    if ctx.distributed:
        sae = step.full_sae()  # gathered on rank 0 (on the CPU); rank 0 alone exports and evaluates
        ctx.barrier()
        ctx.shutdown()
        if not ctx.is_main:
            return {"rank": ctx.rank}
        sae = sae.to(device)

    # ---- export in the released layout, then evaluate what a user reloads
    hyper = {
        "k_warmup_steps": step.cfg.anneal_steps, "seed": cfg.seed, "lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2],
        "train_batch_size": cfg.batch_size, "total_training_tokens": cfg.total_steps * cfg.batch_size,
        "context_size": cfg.context_len, "dataset": cfg.dataset, "layer": cfg.layer, "position": cfg.position,
        "loss": cfg.loss, "clip_grad_norm": cfg.clip_grad_norm, "lr_warm_up_steps": cfg.warmup_steps,
        "auxk": cfg.auxk, "k_aux": cfg.k_aux, "dead_window_tokens": cfg.dead_window_tokens,
        "data_init": cfg.data_init, "b_dec_init_fraction": cfg.b_dec_init_fraction,
        "recentre_dead": cfg.recentre_dead, "auxk_coef": cfg.auxk_coef, "released_recipe": cfg.released_recipe, "dtype": f"torch.{cfg.export_dtype}", "tp_size": ctx.tp, "ddp_size": ctx.dp,
    }
    sae.to_llama_scope(run_dir, hyperparams=hyper, lm_config=lm.lm_config(), dtype=cfg.export_dtype)
    reloaded = TopKSAE.from_llama_scope(run_dir, device=device)
    saes: Dict[str, TopKSAE] = {"sae": reloaded}
    if cfg.jumprelu:
        log(f"JumpReLU threshold from {cfg.jumprelu_tokens} training tokens ...")
        calib = ActivationSource(lm, data, cfg.layer, cfg.position, store_dtype=torch.float32, epochs=1)
        if source.cache is not None:
            calib.cache = source.cache  # same batches: replay what the training run computed
        acts = _sources_rows(calib, cfg.jumprelu_tokens).to(device)
        jr = reloaded.to_jumprelu(acts, k=cfg.k)
        jr.to_llama_scope(run_dir / "jumprelu", hyperparams=dict(hyper, jumprelu_tokens=int(acts.shape[0])),
                          lm_config=lm.lm_config(), dtype=cfg.export_dtype)
        saes["jumprelu"] = TopKSAE.from_llama_scope(run_dir / "jumprelu", device=device)
    source.cache = None
    log(f"evaluating on {len(data.eval)} held-out contexts ...")
    metrics, _ = evaluate(lm, saes, data.eval, cfg.layer, cfg.position, special_ids=special_ids,
                          batch_size=max(1, min(cfg.lm_batch_size, 2)), lm_loss=cfg.eval_lm_loss,
                          lm_loss_contexts=max(1, math.ceil(cfg.eval_lm_tokens / cfg.context_len)))
    t_done = time.perf_counter()

    result: Dict[str, Any] = dict(metrics["sae"])
    result.update({
        "k": cfg.k, "d_sae": sae.d_sae, "d_model": d, "layer": cfg.layer, "position": cfg.position,
        "model": lm.name, "dataset": cfg.dataset,
        "dead_latents_train": dead_train, "dead_window_tokens": cfg.dead_window_tokens,
        "dead_latents_convention": "dead_latents_eval: no activation on any held-out token; dead_latents_train: "
                                   "no activation in the last dead_window_tokens training tokens",
        "explained_variance_convention": EV_CONVENTION,
        "checkpoint": str(run_dir), "checkpoint_dtype": cfg.export_dtype,
        "evaluated": "the exported checkpoint as reloaded by TopKSAE.from_llama_scope",
        "train_final": last, "train_steps": cfg.total_steps, "train_tokens": cfg.total_steps * cfg.batch_size,
        "lm_tokens": source.lm_tokens,
        "seconds": {"load_model": round(t_loaded - t_start, 2), "data_and_first_fill": round(t_fit - t_loaded, 2),
                    "train": round(trainer.elapsed, 2),
                    "eval_export": round(t_done - t_trained, 2), "total": round(t_done - t_start, 2)},
    })
    if "jumprelu" in metrics:
        result["jumprelu"] = dict(metrics["jumprelu"], checkpoint=str(run_dir / "jumprelu"),
                                  threshold=float(saes["jumprelu"].threshold[0]))
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    state_file = run_dir / Trainer.STATE_FILE
    if state_file.exists():
        state_file.unlink()  # the run is complete; the final weights are in checkpoints/
    if state_file.parent.is_dir() and not any(state_file.parent.iterdir()):
        state_file.parent.rmdir()
    log(summary(result))
    return result


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
        description="Train a Llama Scope TopK SAE (or transcoder) on one layer of a causal LM, evaluate it "
                    "and export it in the released layout. With no arguments: SmolLM2-135M on CPython's docs, "
                    "a few minutes on a CPU.",
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        base = _base_type(hint)
        text = f.metadata.get("help", "")
        if f.default is not None and not isinstance(f.default, bool):
            text += " (default: %(default)s)"  # None defaults are explained in the text (auto per model)
        kw: Dict[str, Any] = {"help": text, "default": f.default, "dest": f.name}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = base
            kw["metavar"] = {int: "N", float: "X", str: "S"}[base]
        p.add_argument(flag, **kw)
    return p


def _base_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
