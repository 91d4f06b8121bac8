"""Evaluation on held-out contexts (docs/method.md sec. 6), written to eval.json.

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

from ..data.lm import LoadedModel, capture_hooks, run_capture, site_of, special_mask, splice_sae, zero_ablate


def _zero(layer: int, position: str) -> str:
    """The name of the zero-ablated variant of a site in ``collect_sites``'s results (``zero@L12R``)."""
    return f"zero@{site_of(layer, position).name}"


def _ce(logits: Tensor, input_ids: Tensor, special_ids: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """Sum and count of next-token CE over non-special targets (float64 sums), per target position
    ``1 .. T-1`` (summed over the batch)."""
    targets = input_ids[:, 1:]
    valid = ~special_mask(targets, special_ids)
    lp = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    lp = lp.reshape(targets.shape)
    return (lp.double() * valid).sum(0).cpu(), valid.sum(0).cpu()


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
    progress: bool = False,
) -> Dict[str, object]:
    """Run the held-out ``contexts`` once for every site (layer, position): the activations of the
    non-special tokens at each site's hook points (``"acts"``: hook name -> ``[N, d]``), and with
    ``lm_loss`` the cross-entropy ``ce_clean`` (one clean pass, shared), ``ce_zero@L{layer}{position}``
    (one zero-ablated pass per site) and ``ce_<name>`` for each SAE of ``saes[site]`` spliced in at its
    site (one pass each), over the first ``lm_loss_contexts`` contexts (default all). Those go through
    the whole LM; the others only up to the deepest site. Also ``"pos"``: each token's position in its
    context (the rows of every activation), and with ``lm_loss`` ``"ce_by_position"``: name -> (sum,
    count) of the CE of predicting the token at target position t = 1 .. T-1. ``progress``: a bar
    counted in context tokens."""
    model = lm.model
    saes = saes or {}
    hooks: List[str] = []
    for layer, position in sites:
        hooks += [h for h in site_of(layer, position).reads if h not in hooks]
    acts: Dict[str, List[Tensor]] = {h: [] for h in hooks}
    pos: List[Tensor] = []
    ce: Dict[str, List[float]] = {}
    ce_pos: Dict[str, List[Tensor]] = {}
    variants = [(_zero(layer, position), (layer, position), None) for layer, position in sites]
    variants += [(name, site, sae) for site in sites for name, sae in saes.get(site, {}).items()]
    n_lm = len(contexts) if lm_loss_contexts is None else min(lm_loss_contexts, len(contexts))
    starts = list(range(0, n_lm, batch_size)) + list(range(n_lm, len(contexts), batch_size))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=int(contexts.numel()), unit="tok", desc="evaluate", dynamic_ncols=True)
    for s in starts:
        with_lm = lm_loss and s < n_lm
        ids = contexts[s : min(s + batch_size, n_lm if s < n_lm else len(contexts))].to(lm.device)
        keep = ~special_mask(ids, special_ids)
        with capture_hooks(model, hooks, stop=not with_lm) as store:
            out = run_capture(model if with_lm else getattr(model, "model", model), ids, store)
            for h in hooks:
                acts[h].append(store[h][keep].float().cpu())
        pos.append(torch.arange(ids.shape[1], device=ids.device).expand_as(ids)[keep].cpu())
        if not with_lm:
            if bar is not None:
                bar.update(int(ids.numel()))
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
            acc[0] += float(sm.sum())
            acc[1] += int(n.sum())
            pacc = ce_pos.setdefault(name, [torch.zeros_like(sm), torch.zeros_like(n)])
            pacc[0] += sm
            pacc[1] += n
        if bar is not None:  # after the clean, zero-ablated and spliced forwards of these contexts
            bar.update(int(ids.numel()))
    if bar is not None:
        bar.close()
    res: Dict[str, object] = {"acts": {h: torch.cat(v) if v else torch.empty(0) for h, v in acts.items()},
                              "pos": torch.cat(pos) if pos else torch.empty(0, dtype=torch.int64)}
    for name, (sm, n) in ce.items():
        res[f"ce_{name}"] = sm / max(n, 1)
    if ce:
        res["ce_tokens"] = int(ce["clean"][1])
        res["ce_by_position"] = {name: (sm, n) for name, (sm, n) in ce_pos.items()}
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
    progress: bool = False,
) -> Dict[str, object]:
    """``collect_sites`` for one site: activations ``x`` (and TC targets ``y``) of non-special tokens,
    their positions ``pos``, and with ``lm_loss`` the cross-entropy ``ce_clean``, ``ce_zero`` and
    ``ce_<name>`` for each SAE of ``saes`` spliced in (and the same by target position,
    ``ce_by_position``), over the first ``lm_loss_contexts`` contexts (default all)."""
    site = (layer, position)
    got = collect_sites(lm, contexts, [site], special_ids=special_ids, batch_size=batch_size,
                        saes={site: saes or {}}, lm_loss=lm_loss, lm_loss_contexts=lm_loss_contexts,
                        progress=progress)
    hooks = site_of(layer, position).reads
    res = {k: v for k, v in got.items() if k != "acts"}
    zero = _zero(layer, position)
    if f"ce_{zero}" in res:
        res["ce_zero"] = res.pop(f"ce_{zero}")
        res["ce_by_position"]["zero"] = res["ce_by_position"].pop(zero)
    res["x"] = got["acts"][hooks[0]]
    res["y"] = got["acts"][hooks[1]] if len(hooks) > 1 else None
    return res


@torch.no_grad()
def sae_metrics(sae, x: Tensor, y: Optional[Tensor] = None, batch_size: int = 4096, *,
                positions: Optional[Tensor] = None, buckets: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """L0, both explained variances and held-out dead latents of ``sae`` on raw ``x`` (targets ``y``).

    With ``positions`` (each row's position in its context) and bucket ``edges``, also
    ``by_position``: the explained variance of each position bucket ``[edges[i], edges[i+1])``
    (ratio of sums within the bucket, ``mean(y)`` over all tokens) and its token count."""
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
    nb = len(buckets) - 1 if buckets is not None and positions is not None else 0
    b_err, b_var, b_n = (torch.zeros(max(nb, 0), dtype=torch.float64) for _ in range(3))
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
        if nb:
            b = position_bucket(positions[s : s + batch_size], buckets)
            ok = b >= 0
            b_err.index_add_(0, b[ok], err[ok])
            b_var.index_add_(0, b[ok], var[ok])
            b_n.index_add_(0, b[ok], torch.ones_like(err[ok]))
    extra = {"by_position": {"edges": list(buckets), "tokens": b_n.long().tolist(), "explained_variance": [
        (1 - float(e) / float(v)) if v > 0 else None for e, v in zip(b_err, b_var)]}} if nb else {}
    return {**extra,
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
    position_buckets: Optional[Sequence[int]] = None,
    progress: bool = False,
) -> Tuple[Dict[str, Dict[str, object]], Dict[str, Tensor]]:
    """Held-out metrics of every SAE of ``saes`` ({site: {name: module}}), sharing one pass over the
    data and one clean LM pass (a suite's members). Returns ``({name: metrics}, {hook: activations})``:
    the metrics, and the held-out activations (raw units) they were computed on. With
    ``position_buckets`` (bucket edges over token positions), each SAE's metrics also hold
    ``by_position`` (``sae_metrics``, plus CE and delta LM loss per bucket: ``ce_by_position``)."""
    got = collect_sites(lm, contexts, list(saes), special_ids=special_ids, batch_size=batch_size, saes=saes,
                        lm_loss=lm_loss, lm_loss_contexts=lm_loss_contexts, progress=progress)
    out: Dict[str, Dict[str, object]] = {}
    for (layer, position), named in saes.items():
        hooks = site_of(layer, position).reads
        x = got["acts"][hooks[0]]
        y = got["acts"][hooks[1]] if len(hooks) > 1 else None
        for name, sae in named.items():
            m: Dict[str, object] = sae_metrics(sae, x, y, positions=got["pos"], buckets=position_buckets)
            if position_buckets is not None and lm_loss:
                m["by_position"].update(ce_by_position(got["ce_by_position"], name, position_buckets,
                                                       zero=_zero(layer, position)))
            if lm_loss:
                clean, sae_ce, zero = got["ce_clean"], got[f"ce_{name}"], got[f"ce_{_zero(layer, position)}"]
                m.update({
                    "ce_clean": clean, "ce_sae": sae_ce, "ce_zero_ablation": zero,
                    "delta_lm_loss": sae_ce - clean,
                    "ce_score": (zero - sae_ce) / (zero - clean) if zero != clean else float("nan"),
                    "ce_tokens": got["ce_tokens"],
                })
            out[name] = m
    return out, got["acts"]


def position_bucket(positions: Tensor, edges: Sequence[int]) -> Tensor:
    """Index ``i`` of the bucket ``[edges[i], edges[i+1])`` holding each position; -1 outside them all."""
    e = torch.as_tensor(list(edges), dtype=torch.int64)
    b = torch.bucketize(positions.long(), e, right=True) - 1
    return torch.where((b >= 0) & (b < len(e) - 1), b, torch.full_like(b, -1))


def ce_by_position(ce_pos: Dict[str, Tuple[Tensor, Tensor]], name: str, edges: Sequence[int],
                   zero: str = "zero") -> Dict[str, list]:
    """Per position bucket (of target positions): CE clean / with ``name`` spliced in / zero-ablated
    (the entry ``zero``), delta LM loss and the target count, from ``collect_sites``'s ``ce_by_position``."""
    targets = torch.arange(1, ce_pos["clean"][0].numel() + 1)  # entry t-1 holds target position t
    b = position_bucket(targets, edges)
    ok = b >= 0
    nb = len(edges) - 1

    def per_bucket(v: Tensor) -> Tensor:
        return torch.zeros(nb, dtype=torch.float64).index_add_(0, b[ok], v[ok].double())

    n = per_bucket(ce_pos["clean"][1])
    mean = {k: per_bucket(ce_pos[k][0]) / n.clamp_min(1) for k in ("clean", name, zero)}
    has = (n > 0).tolist()

    def vals(t: Tensor) -> list:
        return [float(v) if h else None for v, h in zip(t, has)]

    return {"ce_tokens": n.long().tolist(), "ce_clean": vals(mean["clean"]), "ce_sae": vals(mean[name]),
            "ce_zero_ablation": vals(mean[zero]), "delta_lm_loss": vals(mean[name] - mean["clean"])}


EV_CONVENTION = (
    "explained_variance: 1 - sum_t ||y_t - y_hat_t||^2 / sum_t ||y_t - mean(y)||^2 (ratio of sums); "
    "explained_variance_per_token: mean_t (1 - ||y_t - y_hat_t||^2 / ||y_t - mean(y)||^2) (Llama Scope's); "
    "mean(y) over the held-out tokens; special tokens excluded"
)

