"""Evaluation on held-out contexts (SPEC.md sec. 6), written to eval.json.

Metrics (conventions are named in the output):

* ``l0``: mean over tokens of the number of non-zero latents.
* ``explained_variance``: ``1 - sum_t ||y_t - y_hat_t||^2 / sum_t ||y_t - mean(y)||^2`` (ratio of
  sums over all held-out tokens).
* ``explained_variance_per_token``: Llama Scope's convention, the mean over tokens of
  ``1 - ||y_t - y_hat_t||^2 / ||y_t - mean(y)||^2`` (``mean(y)`` over the held-out tokens).
* ``ce_clean``, ``ce_sae``, ``ce_zero_ablation``: mean next-token cross-entropy over targets that
  are not special tokens, with the activation left alone, replaced by the SAE reconstruction
  (``splice_sae``; special positions keep their original activation), or replaced by zeros.
  ``delta_lm_loss = ce_sae - ce_clean``; ``ce_score = (ce_zero - ce_sae) / (ce_zero - ce_clean)``.
* ``dead_latents_eval``: latents that never fire on the held-out tokens (window = ``n_tokens``).
  Training-time dead latents (not fired in the last ``dead_window_tokens`` training tokens) are
  added by the CLI from the trainer's counters.

Special tokens (BOS, EOS, PAD) are excluded everywhere.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import LoadedModel, capture_hooks, position_hooks, run_capture, special_mask, splice_sae, zero_ablate


def _ce(logits: Tensor, input_ids: Tensor, special_ids: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """Sum and count of next-token CE over non-special targets (float64 sum)."""
    targets = input_ids[:, 1:]
    valid = ~special_mask(targets, special_ids)
    lp = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    lp = lp.reshape(targets.shape)
    return (lp.double() * valid).sum(), valid.sum()


Site = Tuple[int, str]  # (layer, position)


@torch.no_grad()
def collect_sites(
    lm: LoadedModel,
    contexts: Tensor,
    sites: Sequence[Site],
    *,
    special_ids: Sequence[int],
    batch_size: int = 2,
    saes: Optional[Dict[Site, Dict[str, object]]] = None,
    lm_loss: bool = True,
    lm_loss_contexts: Optional[int] = None,
) -> Dict[str, object]:
    """Run the held-out ``contexts`` once for every site (layer, position): the activations of the
    non-special tokens at each site's hook points (``"acts"``: hook name -> ``[N, d]``), and with
    ``lm_loss`` the cross-entropy ``ce_clean`` (one clean pass, shared), ``ce_zero@L{layer}{position}``
    (one zero-ablated pass per site) and ``ce_<name>`` for each SAE of ``saes[site]`` spliced in at its
    site (one pass each), over the first ``lm_loss_contexts`` contexts (default all). Those go through
    the whole LM; the others only up to the deepest site."""
    model = lm.model
    saes = saes or {}
    hooks: List[str] = []
    for layer, position in sites:
        hooks += [h for h in position_hooks(layer, position) if h not in hooks]
    acts: Dict[str, List[Tensor]] = {h: [] for h in hooks}
    ce: Dict[str, List[float]] = {}
    variants = [(f"zero@L{layer}{position}", (layer, position), None) for layer, position in sites]
    variants += [(name, site, sae) for site in sites for name, sae in saes.get(site, {}).items()]
    n_lm = len(contexts) if lm_loss_contexts is None else min(lm_loss_contexts, len(contexts))
    starts = list(range(0, n_lm, batch_size)) + list(range(n_lm, len(contexts), batch_size))
    for s in starts:
        with_lm = lm_loss and s < n_lm
        ids = contexts[s : min(s + batch_size, n_lm if s < n_lm else len(contexts))].to(lm.device)
        keep = ~special_mask(ids, special_ids)
        with capture_hooks(model, hooks, stop=not with_lm) as store:
            out = run_capture(model if with_lm else getattr(model, "model", model), ids, store)
            for h in hooks:
                acts[h].append(store[h][keep].float().cpu())
        if not with_lm:
            continue
        results = {"clean": _ce(out.logits, ids, special_ids)}
        del out
        for name, (layer, position), sae in variants:
            cm = zero_ablate(model, layer, position, special_ids) if sae is None else splice_sae(
                model, sae, layer, position, special_ids)
            with cm:
                logits = model(input_ids=ids, use_cache=False).logits
            results[name] = _ce(logits, ids, special_ids)
            del logits
        for name, (sm, n) in results.items():
            acc = ce.setdefault(name, [0.0, 0])
            acc[0] += float(sm)
            acc[1] += int(n)
    res: Dict[str, object] = {"acts": {h: torch.cat(v) if v else torch.empty(0) for h, v in acts.items()}}
    for name, (sm, n) in ce.items():
        res[f"ce_{name}"] = sm / max(n, 1)
    if ce:
        res["ce_tokens"] = int(ce["clean"][1])
    return res


@torch.no_grad()
def collect(
    lm: LoadedModel,
    contexts: Tensor,
    layer: int,
    position: str,
    *,
    special_ids: Sequence[int],
    batch_size: int = 2,
    saes: Optional[Dict[str, object]] = None,
    lm_loss: bool = True,
    lm_loss_contexts: Optional[int] = None,
) -> Dict[str, object]:
    """``collect_sites`` for one site: activations ``x`` (and TC targets ``y``) of non-special tokens,
    and with ``lm_loss`` the cross-entropy ``ce_clean``, ``ce_zero`` and ``ce_<name>`` for each SAE
    of ``saes`` spliced in, over the first ``lm_loss_contexts`` contexts (default all)."""
    site = (layer, position)
    got = collect_sites(lm, contexts, [site], special_ids=special_ids, batch_size=batch_size,
                        saes={site: saes or {}}, lm_loss=lm_loss, lm_loss_contexts=lm_loss_contexts)
    hooks = position_hooks(layer, position)
    res = {k: v for k, v in got.items() if k != "acts"}
    if f"ce_zero@L{layer}{position}" in res:
        res["ce_zero"] = res.pop(f"ce_zero@L{layer}{position}")
    res["x"] = got["acts"][hooks[0]]
    res["y"] = got["acts"][hooks[1]] if len(hooks) > 1 else None
    return res


@torch.no_grad()
def sae_metrics(sae, x: Tensor, y: Optional[Tensor] = None, batch_size: int = 4096) -> Dict[str, float]:
    """L0, both explained variances and held-out dead latents of ``sae`` on raw ``x`` (targets ``y``)."""
    y = x if y is None else y
    p = next(sae.parameters())
    n = x.shape[0]
    if n == 0:
        raise ValueError("sae_metrics: no tokens")
    mean = y.double().mean(0)
    total_var = 0.0
    err_sum = 0.0
    per_token = 0.0
    l0_sum = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for s in range(0, n, batch_size):
        xb = x[s : s + batch_size].to(device=p.device, dtype=p.dtype)
        yb = y[s : s + batch_size].double()
        values, idx = sae.encode_sparse(xb)
        y_hat = sae.decode_sparse(values, idx).double().cpu()
        nz = (values > 0).cpu()
        l0_sum += float(nz.sum())
        fired[idx.cpu()[nz]] = True
        err = (yb - y_hat).pow(2).sum(-1)
        var = (yb - mean).pow(2).sum(-1)
        err_sum += float(err.sum())
        total_var += float(var.sum())
        per_token += float((1 - err / var.clamp_min(1e-12)).sum())
    return {
        "l0": l0_sum / n,
        "explained_variance": 1 - err_sum / max(total_var, 1e-30),
        "explained_variance_per_token": per_token / n,
        "mse": err_sum / n,
        "dead_latents_eval": int((~fired).sum()),
        "dead_fraction_eval": float((~fired).float().mean()),
        "n_tokens": n,
    }


def evaluate_sites(
    lm: LoadedModel,
    saes: Dict[Site, Dict[str, object]],
    contexts: Tensor,
    *,
    special_ids: Sequence[int],
    batch_size: int = 2,
    lm_loss: bool = True,
    lm_loss_contexts: Optional[int] = None,
) -> Tuple[Dict[str, Dict[str, object]], Dict[str, Tensor]]:
    """Held-out metrics of every SAE of ``saes`` ({site: {name: module}}), sharing one pass over the
    data and one clean LM pass (a suite's members). Returns ``({name: metrics}, {hook: activations})``:
    the metrics, and the held-out activations (raw units) they were computed on."""
    got = collect_sites(lm, contexts, list(saes), special_ids=special_ids, batch_size=batch_size, saes=saes,
                        lm_loss=lm_loss, lm_loss_contexts=lm_loss_contexts)
    out: Dict[str, Dict[str, object]] = {}
    for (layer, position), named in saes.items():
        hooks = position_hooks(layer, position)
        x = got["acts"][hooks[0]]
        y = got["acts"][hooks[1]] if len(hooks) > 1 else None
        for name, sae in named.items():
            m: Dict[str, object] = sae_metrics(sae, x, y)
            if lm_loss:
                clean, sae_ce, zero = got["ce_clean"], got[f"ce_{name}"], got[f"ce_zero@L{layer}{position}"]
                m.update({
                    "ce_clean": clean, "ce_sae": sae_ce, "ce_zero_ablation": zero,
                    "delta_lm_loss": sae_ce - clean,
                    "ce_score": (zero - sae_ce) / (zero - clean) if zero != clean else float("nan"),
                    "ce_tokens": got["ce_tokens"],
                })
            out[name] = m
    return out, got["acts"]


def evaluate(
    lm: LoadedModel,
    saes: Dict[str, object],
    contexts: Tensor,
    layer: int,
    position: str,
    *,
    special_ids: Sequence[int],
    batch_size: int = 2,
    lm_loss: bool = True,
    lm_loss_contexts: Optional[int] = None,
) -> Tuple[Dict[str, Dict[str, object]], Tuple[Tensor, Optional[Tensor]]]:
    """``evaluate_sites`` at one site: the metrics of each SAE in ``saes`` (name -> module), and the
    held-out activations ``(x, y)`` they were computed on (``y`` is None unless TC)."""
    metrics, acts = evaluate_sites(lm, {(layer, position): saes}, contexts, special_ids=special_ids,
                                   batch_size=batch_size, lm_loss=lm_loss, lm_loss_contexts=lm_loss_contexts)
    hooks = position_hooks(layer, position)
    return metrics, (acts[hooks[0]], acts[hooks[1]] if len(hooks) > 1 else None)


EV_CONVENTION = (
    "explained_variance: 1 - sum_t ||y_t - y_hat_t||^2 / sum_t ||y_t - mean(y)||^2 (ratio of sums); "
    "explained_variance_per_token: mean_t (1 - ||y_t - y_hat_t||^2 / ||y_t - mean(y)||^2) (Llama Scope's); "
    "mean(y) over the held-out tokens; special tokens excluded"
)
