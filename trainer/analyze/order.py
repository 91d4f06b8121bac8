"""The dashboard's default order: latents likely to be interpretable first.

``score = band(frequency) x concentration x support`` for a live latent (-1 for a dead one):

* ``band``: 1 for a firing frequency within ``BAND`` (1e-4 .. 1e-2 of the tokens), ``10**-d`` at ``d``
  decades outside it (1e-1 or 1e-5: 0.1; 0.9: 0.01). Latents that fire on a large share of the tokens
  (a dense direction, a bias, a broad "in code" feature) or that were seen a handful of times are
  rarely readable from their examples; between 1e-2 and 1e-1 the preference is a gentle one.
* ``concentration``: ``1 - q50 / q90`` of the latent's activations over the tokens where it is active
  (its median against its 90th percentile, read off its exact log-spaced activation histogram,
  interpolated within a bin). Near 0: it fires at one strength everywhere (typical of dense, noisy
  latents); near 1: its strong activations stand far above its typical ones (a selective latent). A
  quantile ratio, not the max or a moment: a few outliers (e.g. the anomalous first token after BOS,
  where residual streams are large) do not move it.
* ``support``: ``min(1, examples / top_n)``: a latent with fewer top examples than ``--top`` cannot
  show a pattern as well.

What it gives on the embedded default is measured in ``docs/analysis.md``.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor

from .features import HIST_BINS, HIST_MIN_EXP, HIST_PER_OCTAVE, frequency

BAND = (1e-4, 1e-2)
SCORE_DEFINITION = ("band(frequency) x concentration x support: band = 1 for a frequency in [1e-4, 1e-2], "
                    "10^-d at d decades outside; concentration = 1 - q50/q90 of the latent's active activations "
                    "(from its log-spaced histogram); support = min(1, top examples / top_n); dead latents -1")


def band(freq: Tensor) -> Tensor:
    """1 inside ``BAND``, ``10**-d`` at ``d`` decades outside it (float64)."""
    lf = freq.double().clamp_min(1e-300).log10()
    d = (math.log10(BAND[0]) - lf).clamp_min(0) + (lf - math.log10(BAND[1])).clamp_min(0)
    return torch.pow(10.0, -d)


def hist_quantile_log2(hist: Tensor, q: float) -> Tensor:
    """log2 of the ``q``-quantile of each row's activations, from histograms ``hist [d, HIST_BINS]``
    (log-spaced bins, ``features.hist_edges``), interpolated linearly in log2 within the bin; rows
    without counts give ``HIST_MIN_EXP``."""
    h = hist.double()
    c = h.cumsum(1)
    target = q * c[:, -1:]
    b = (c < target).sum(1, keepdim=True).clamp(max=HIST_BINS - 1)
    below = torch.where(b > 0, c.gather(1, (b - 1).clamp_min(0)), torch.zeros_like(target))
    frac = ((target - below) / h.gather(1, b).clamp_min(1)).clamp(0, 1)
    return (HIST_MIN_EXP + (b.double() + frac) / HIST_PER_OCTAVE).squeeze(1)


def concentration(hist: Tensor) -> Tensor:
    """``1 - q50 / q90`` of each row's activations (see the module docstring)."""
    return 1 - torch.pow(2.0, -(hist_quantile_log2(hist, 0.9) - hist_quantile_log2(hist, 0.5)))


def interpretability(stats, sel: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``score`` and ``concentration`` [d_sae] of one SAE's latents (``stats``: ``features.LatentStats``;
    ``sel``: ``export.select_examples``)."""
    count = stats.count.cpu()
    conc = concentration(stats.hist.view(stats.d_sae, HIST_BINS).cpu())
    support = ((sel["idx"] >= 0).sum(1).double() / max(stats.cfg.top_n, 1)).clamp(max=1)
    live = count > 0
    score = torch.where(live, band(frequency(stats).cpu()) * conc * support, torch.full_like(conc, -1.0))
    return {"score": score, "concentration": torch.where(live, conc, torch.zeros_like(conc))}
