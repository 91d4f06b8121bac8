"""Direct logit effects of SAE latents: each decoder direction through the final norm and unembedding.

A latent that writes ``a * d_i`` into the residual stream (every position trained here does: R is
the residual stream, A / M / TC write the attention or MLP output, which is added to it) changes the
logits, ignoring every later layer and the final norm's per-token scale, by
``a * W_U (gamma * d_i)``: ``gamma`` is the final RMSNorm's gain, ``W_U`` the unembedding. The
effect per unit of activation is ``W_U (gamma * d_i)``; its largest and smallest entries are the
tokens the latent promotes and suppresses. Computed in blocks of latents (never d_sae x vocab).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn


def unembedding(model: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
    """``(W_U [vocab, d], gamma [d] or None)`` of a Hugging Face causal LM (Llama-like: ``model.norm``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError("logit effects: the model has no output embedding (LM head)")
    inner = getattr(model, "model", model)
    norm = next((m for m in (getattr(inner, a, None) for a in ("norm", "final_layernorm", "ln_f")) if m is not None), None)
    gamma = getattr(norm, "weight", None)
    return head.weight.detach(), (gamma.detach() if isinstance(gamma, Tensor) else None)


@torch.no_grad()
def logit_effects(decoder: Tensor, W_U: Tensor, gamma: Optional[Tensor], top: int = 10,
                  block: int = 512) -> Dict[str, Tensor]:
    """Top and bottom ``top`` tokens of ``W_U (gamma * decoder[i])`` for every row ``i``.

    ``decoder [d_sae, d]`` in the residual stream's raw units (a folded SAE's ``W_dec``). Returns
    ``top_ids, top_values, bottom_ids, bottom_values`` (``[d_sae, top]``, bottom ascending); fp32
    products on the decoder's device, ``block`` latents at a time.
    """
    dev = decoder.device
    W = W_U.to(device=dev, dtype=torch.float32)
    g = None if gamma is None else gamma.to(device=dev, dtype=torch.float32)
    n, top = decoder.shape[0], min(top, W.shape[0])
    out = {k: torch.empty((n, top), dtype=dt, device=dev) for k, dt in
           (("top_ids", torch.int64), ("top_values", torch.float32),
            ("bottom_ids", torch.int64), ("bottom_values", torch.float32))}
    for s in range(0, n, block):
        d = decoder[s:s + block].to(torch.float32)
        if g is not None:
            d = d * g
        eff = d @ W.t()  # [block, vocab]
        hi = eff.topk(top, dim=1)
        lo = eff.topk(top, dim=1, largest=False)
        out["top_values"][s:s + block], out["top_ids"][s:s + block] = hi.values, hi.indices
        out["bottom_values"][s:s + block], out["bottom_ids"][s:s + block] = lo.values, lo.indices
    return out
