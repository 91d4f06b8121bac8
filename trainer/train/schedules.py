"""The released recipe's schedules (docs/method.md sec. 4): K-annealing and the learning-rate factor."""
from __future__ import annotations

import math


def k_schedule(step: int, k: int, k_start: int, anneal_steps: int) -> int:
    """``k(t) = ceil(max(K, k_start + (K - k_start) * t / T_k))``: linear from ``k_start``
    (``d_model / 2`` in the recipe) down to ``K`` over ``T_k = anneal_steps``, then ``K``."""
    if anneal_steps <= 0 or k_start <= k:
        return k
    return int(math.ceil(max(k, k_start + (k - k_start) * step / anneal_steps)))


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_fraction: float = 0.2, final: float = 0.01) -> float:
    """``min(1, (t+1)/warmup, final + (1-final) * max(T-t, 1) / (decay_fraction*T))``: linear warmup,
    flat, then linear decay over the last ``decay_fraction`` of ``T = total_steps`` to ``final``."""
    warm = 1.0 if warmup_steps <= 0 else (step + 1) / warmup_steps
    if decay_fraction > 0:
        decay = final + (1.0 - final) * max(total_steps - step, 1) / (decay_fraction * total_steps)
    else:
        decay = 1.0
    return min(1.0, warm, decay)


def default_warmup(total_steps: int, released: int = 5000, fraction: float = 0.05) -> int:
    """The released 5000-step warmup, shortened to ``fraction`` of the run for short runs."""
    return max(1, min(released, int(fraction * total_steps)))
