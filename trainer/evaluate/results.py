"""What a run writes to each member's ``eval.json``: the exported SAE, as a user reloads it, measured on the
run's held-out contexts (``metrics.evaluate_sites``: one clean LM pass for all the members of a rank), with
the training's own figures and each number's convention.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Dict, Sequence, Tuple

from sae_kernels.atomic import atomic_write_text

from .. import run_folder as names
from ..config import TrainConfig
from ..export import Exported
from .metrics import EV_CONVENTION, evaluate_sites

DEAD_LATENTS_CONVENTION = (
    "dead_latents_eval: no activation on any held-out token; dead_latents_train: no activation in the last "
    "dead_window_tokens training tokens; latents_died_train: latents that were dead (by that window) at some "
    "step; death_events_train: how often a latent became dead, summed"
)


def evaluate_members(cfg: TrainConfig, exported: Sequence[Exported], lm, contexts, special_ids: Sequence[int], *,
                     d_model: int, lm_tokens: int, suite_members: int,
                     seconds: Callable[[Exported], Dict[str, float]],
                     log: Callable[[str], None] = print, progress: bool = False) -> Dict[str, Dict[str, Any]]:
    """Evaluate the exported members on ``contexts``; write each one's ``eval.json``; returns them by name.
    ``seconds(e)``: the phase times recorded in a member's result."""
    if not exported:
        return {}
    saes: Dict[Tuple[int, str], Dict[str, Any]] = {}
    for e in exported:
        site = (e.spec.layer, e.spec.position)
        saes.setdefault(site, {})[e.member.name] = e.sae
        if e.jumprelu is not None:
            saes[site][e.member.name + "/" + names.JUMPRELU] = e.jumprelu
    log(f"evaluating on {len(contexts)} held-out contexts ...")
    metrics, _ = evaluate_sites(lm, saes, contexts, special_ids=special_ids,
                                batch_size=max(1, min(cfg.lm_batch_size, 2)), lm_loss=cfg.eval_lm_loss,
                                lm_loss_contexts=max(1, math.ceil(cfg.eval_lm_tokens / cfg.context_len)),
                                progress=progress)
    results: Dict[str, Dict[str, Any]] = {}
    for e in exported:
        m, name = e.spec, e.member.name
        result: Dict[str, Any] = dict(metrics[name])
        result.update({
            "architecture": cfg.arch_of(m), "k": cfg.k_of(m) if cfg.arch_of(m) != "standard" else None,
            "l1_coefficient": cfg.l1_of(m),
            "inference": ("topk" if e.sae.cfg.activation == "topk" else
                          f"jumprelu at threshold {float(e.sae.threshold[0]):.6g} (folded units)"
                          if float(e.sae.threshold[0]) else "relu"),
            "d_sae": e.sae.d_sae, "d_model": d_model, "layer": m.layer, "position": m.position,
            "expansion": m.expansion, "model": lm.name, "dataset": cfg.dataset,
            **e.dead, "dead_window_tokens": cfg.dead_window_tokens,
            "dead_latents_convention": DEAD_LATENTS_CONVENTION,
            "explained_variance_convention": EV_CONVENTION,
            "checkpoint": str(e.member.run_dir), "checkpoint_dtype": cfg.export_dtype,
            "evaluated": "the exported checkpoint as reloaded by TopKSAE.from_llama_scope",
            "train_final": e.member.last, "train_steps": cfg.total_steps,
            "train_tokens": cfg.total_steps * cfg.batch_size, "lm_tokens": lm_tokens, "suite_members": suite_members,
            "seconds": seconds(e),
        })
        result["warnings"] = undertrained(result)
        if e.jumprelu is not None:
            result["jumprelu"] = dict(metrics[name + "/" + names.JUMPRELU],
                                      checkpoint=str(e.member.run_dir / names.JUMPRELU),
                                      threshold=float(e.jumprelu.threshold[0]))
        atomic_write_text(e.member.run_dir / names.EVAL, json.dumps(result, indent=2) + "\n")
        results[name] = result
    return results


# What a member's own figures say about its training, checked at the end of every run (eval.json
# "warnings", printed). Measured on the embedded default (docs/training.md): its default run (65 training
# tokens per latent) leaves 0.1% of the latents dead at EV 0.88; 13 tokens per latent (--tokens 60000) left
# about half dead, 4 per latent (20k tokens) 60% dead at EV 0.53. Llama Scope trained ~24k tokens per latent.
DEAD_FRACTION_WARN = 0.10  # dead in the last training window, or never firing on the held-out tokens x 2.5
EV_WARN = 0.6  # the default run: R 0.88, A 0.81, M 0.76, TC 0.70 (docs/method.md sec. 13)


def undertrained(result: Dict[str, Any]) -> list:
    """Warnings (each one line, saying what to change) when a member looks under-trained by its own figures:
    many dead latents, a low explained variance, few training tokens per latent."""
    d_sae = result["d_sae"]
    per_latent = result["train_tokens"] / d_sae
    dead_train = result.get("dead_latents_train", 0) / d_sae
    dead_eval = result.get("dead_latents_eval", 0) / d_sae
    out = []
    advice = (f"it trained on {per_latent:,.0f} tokens per latent: train on more tokens (--tokens) or a narrower "
              "SAE (--expansion)")
    if dead_train > DEAD_FRACTION_WARN or dead_eval > 2.5 * DEAD_FRACTION_WARN:
        out.append(f"{max(dead_train, dead_eval):.0%} of its latents are dead ({result.get('dead_latents_train')} in "
                   f"the last training window, {result.get('dead_latents_eval')} never fired on held-out text); "
                   + advice)
    ev = result.get("explained_variance")
    if ev is not None and ev < EV_WARN:
        out.append(f"it explains {ev:.0%} of the held-out variance (EV {ev:.3f}); " + advice)
    return out
