"""The end of training: each member's SAE in the released Llama Scope layout, reloaded as a user loads it.

Every rank of a member takes part in gathering its SAE to single-process shapes; the member's rank 0
writes ``<member>/`` (``hyperparams.json``, ``lm_config.json``, ``checkpoints/final.safetensors`` in
``--export-dtype``), reloads it with ``TopKSAE.from_llama_scope`` (what evaluation then measures), and with
``--jumprelu`` post-processes it into Llama Scope's JumpReLU (docs/method.md sec. 5) in ``<member>/jumprelu/``
from training tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from sae_kernels import TopKSAE

from . import run_folder as names
from .config import MemberSpec, TrainConfig
from .data.source import ActivationSource
from .train import Member


@dataclass
class Exported:
    """A member as exported by its rank 0: the reloaded SAE (and JumpReLU), its hyperparameters and the
    training's dead-latent counts."""

    member: Member
    spec: MemberSpec
    sae: TopKSAE
    hyperparams: Dict[str, Any]
    dead: Dict[str, int]
    jumprelu: Optional[TopKSAE] = None


def dead_counts(member: Member) -> Dict[str, int]:
    """The training's dead-latent figures: dead in the last window, ever dead, and death events."""
    step = member.step
    return {"dead_latents_train": int((step.since_fired >= step.cfg.dead_window_tokens).sum()),
            "latents_died_train": int((step.deaths > 0).sum()), "death_events_train": int(step.deaths.sum())}


def hyperparams(cfg: TrainConfig, spec: MemberSpec, member: Member, tp: int) -> Dict[str, Any]:
    """``hyperparams.json``'s training keys beside those the format writes (Llama Scope's names where it has them)."""
    sc = member.step.cfg
    return {
        "k_warmup_steps": sc.anneal_steps, "seed": cfg.seed, "lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2],
        "train_batch_size": cfg.batch_size, "total_training_tokens": cfg.total_steps * cfg.batch_size,
        "context_size": cfg.context_len, "dataset": cfg.dataset, "layer": spec.layer, "position": spec.position,
        "loss": cfg.loss, "clip_grad_norm": cfg.clip_grad_norm, "lr_warm_up_steps": cfg.warmup_steps,
        "auxk": cfg.auxk, "k_aux": sc.k_aux, "auxk_coef": cfg.auxk_coef, "dead_window_tokens": sc.dead_window_tokens,
        "data_init": cfg.data_init, "b_dec_init_fraction": cfg.b_dec_init_fraction, "recentre_dead": cfg.recentre_dead,
        "hold_dead": cfg.hold_dead, "reset_dead_moments": cfg.reset_dead_moments,
        "released_recipe": cfg.released_recipe, "dtype": f"torch.{cfg.export_dtype}", "tp_size": tp,
        "ddp_size": member.ctx.dp, "architecture": cfg.arch_of(spec), "l1_coefficient": cfg.l1_of(spec),
        **({"matryoshka_widths": list(member.step.prefixes)} if cfg.arch_of(spec) == "matryoshka_batchtopk" else {}),
        **({"threshold_estimator": "EMA 0.99 of each step's BatchTopK threshold after K-annealing, bias-corrected",
            "threshold_steps": int(member.step.thr_steps)} if member.step.batch else {}),
    }


def training_rows(source: ActivationSource, n: int) -> torch.Tensor:
    """The first ``n`` non-special training rows of ``source`` from its start (every column)."""
    rows, got = [], 0
    for chunk in source:
        rows.append(chunk.x)
        got += chunk.x.shape[0]
        if got >= n:
            break
    return torch.cat(rows)[:n]


def export_members(cfg: TrainConfig, members: Sequence[Member], specs: Sequence[MemberSpec], *, lm_config: Dict[str, Any],
                   tp: int, device: torch.device, d_model: int,
                   calibration: Optional[Callable[[], ActivationSource]] = None,
                   log: Callable[[str], None] = print) -> List[Exported]:
    """Export the members this rank trains; returns those it is rank 0 of (every rank must call it).
    ``calibration``: a fresh source of the training stream, for the JumpReLU thresholds (``--jumprelu``)."""
    spec_of = {m.name: m for m in specs}
    mine: List[Exported] = []
    for member in members:
        full = member.step.full_sae()  # collective over the member's ranks
        dead = dead_counts(member)
        if not member.ctx.is_main:
            continue
        spec = spec_of[member.name]
        hyper = hyperparams(cfg, spec, member, tp)
        full.to(device).to_llama_scope(member.run_dir, hyperparams=hyper, lm_config=lm_config, dtype=cfg.export_dtype)
        mine.append(Exported(member, spec, TopKSAE.from_llama_scope(member.run_dir, device=device), hyper, dead))
    mine_topk = [e for e in mine if cfg.arch_of(e.spec) == "topk"]
    if cfg.jumprelu and len(mine_topk) < len(mine):
        log("--jumprelu: only topk members are post-processed (batchtopk members are JumpReLU already, standard "
            "members ReLU)")
    mine_all, mine = mine, mine_topk
    if cfg.jumprelu and mine:
        log(f"JumpReLU thresholds from {cfg.jumprelu_tokens} training tokens ...")
        rows = training_rows(calibration(), cfg.jumprelu_tokens)
        for e in mine:
            b = e.member.block_in
            acts = rows[:, b * d_model:(b + 1) * d_model].to(device)
            folder = e.member.run_dir / names.JUMPRELU
            e.sae.to_jumprelu(acts, k=cfg.k_of(e.spec)).to_llama_scope(
                folder, hyperparams=dict(e.hyperparams, jumprelu_tokens=int(acts.shape[0])), lm_config=lm_config,
                dtype=cfg.export_dtype)
            e.jumprelu = TopKSAE.from_llama_scope(folder, device=device)
    return mine_all
