"""The folds (docs/method.md sec. 3 and 5), as functions on a config and its tensors.

An SAE's state here is ``(cfg, tensors)``: an ``SAEConfig`` and a dict of latent-major tensors with the
module's names and shapes, ``W_enc [d_sae, d_model]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_model]``,
``b_dec [d_model]`` and optionally ``threshold [d_sae]`` (the JumpReLU thresholds); other keys pass
through untouched. Every function returns a new ``(cfg, tensors)`` and leaves its arguments alone; each
tensor is computed in float64 and cast back to its own dtype.

* ``fold_dataset_norm``: ``norm_in`` / ``norm_out`` into the weights (then both are 1);
* ``fold_decoder_norm``: the decoder row norms into the encoder (``weighted_topk`` turns off);
* ``folded``: both, the state whose latents are Llama Scope's inference activations.

``TopKSAE.fold_dataset_norm`` / ``fold_decoder_norm`` / ``folded`` apply them to the module; the
checkpoint formats apply them to what they read and write.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from .config import SAEConfig

Tensors = Dict[str, Tensor]


def score_scale(cfg: SAEConfig) -> float:
    """The factor the dataset-norm fold divides the JumpReLU thresholds by.

    The gate compares a score with the threshold: ``relu(pre) * ||W_dec[i]||`` when ``weighted_topk``,
    else ``relu(pre)``. Folding divides the latents by ``s_in`` and the decoder rows' norms by
    ``s_out / s_in``, so the score (and its threshold) scales by ``1 / s_out`` weighted, ``1 / s_in``
    otherwise (docs/method.md sec. 3).
    """
    return cfg.norm_out if cfg.weighted_topk else cfg.norm_in


def _cast(value: Tensor, like: Tensor) -> Tensor:
    return value.to(like.dtype)


def fold_dataset_norm(cfg: SAEConfig, tensors: Tensors) -> Tuple[SAEConfig, Tensors]:
    """Fold ``s_in = norm_in`` and ``s_out = norm_out`` into the tensors (then both are 1).

    ``b_enc /= s_in``, ``b_dec /= s_out``, ``W_dec *= s_in / s_out``, ``threshold /= score_scale(cfg)``.
    With both factors already 1 the state comes back unchanged.
    """
    s_in, s_out = cfg.norm_in, cfg.norm_out
    out = dict(tensors)
    if s_in == 1.0 and s_out == 1.0:
        return cfg, out
    t = tensors
    out["b_enc"] = _cast(t["b_enc"].double() / s_in, t["b_enc"])
    out["b_dec"] = _cast(t["b_dec"].double() / s_out, t["b_dec"])
    out["W_dec"] = _cast(t["W_dec"].double() * (s_in / s_out), t["W_dec"])
    if t.get("threshold") is not None:
        out["threshold"] = _cast(t["threshold"].double() / score_scale(cfg), t["threshold"])
    return cfg.replace(norm_in=1.0, norm_out=1.0), out


def fold_decoder_norm(cfg: SAEConfig, tensors: Tensors) -> Tuple[SAEConfig, Tensors]:
    """Move the decoder row norms into the encoder (docs/method.md sec. 5 step 1).

    ``W_enc[i] *= n_i``, ``b_enc[i] *= n_i``, ``W_dec[i] /= n_i`` (rows of norm 0 are left alone): the
    latent value becomes the weighted score, so selection and gate, thresholds included, are unchanged
    while ``weighted_topk`` turns off. Needs ``weighted_topk``: on a plain TopK SAE the fold would
    change which latents win.
    """
    if not cfg.weighted_topk:
        raise ValueError(
            "fold_decoder_norm: expected an SAE with weighted_topk=True; on a plain TopK SAE moving "
            "decoder norms into the encoder would change the selection"
        )
    t = tensors
    n = t["W_dec"].double().norm(dim=1)
    safe = torch.where(n > 0, n, torch.ones_like(n))
    out = dict(tensors)
    out["W_enc"] = _cast(t["W_enc"].double() * safe[:, None], t["W_enc"])
    out["b_enc"] = _cast(t["b_enc"].double() * safe, t["b_enc"])
    out["W_dec"] = _cast(t["W_dec"].double() / safe[:, None], t["W_dec"])
    return cfg.replace(weighted_topk=False), out


def folded(cfg: SAEConfig, tensors: Tensors) -> Tuple[SAEConfig, Tensors]:
    """Dataset norms folded, then (if weighted) decoder norms: the state takes raw activations, has
    unit-norm decoder rows and latents equal to the Llama Scope inference activations."""
    cfg, tensors = fold_dataset_norm(cfg, tensors)
    if cfg.weighted_topk:
        cfg, tensors = fold_decoder_norm(cfg, tensors)
    return cfg, tensors
