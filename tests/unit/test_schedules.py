"""K-annealing and the learning-rate factor of the released recipe (docs/method.md sec. 4)."""
import math

import pytest

from trainer.train.schedules import default_warmup, k_schedule, lr_factor


def test_k_annealing_matches_formula():
    K, d, T = 50, 4096, 100_000
    Tk = int(0.1 * T)
    for t in (0, 1, 17, Tk // 2, Tk - 1, Tk, Tk + 1, T - 1):
        want = math.ceil(max(K, d / 2 + (K - d / 2) * t / Tk))
        assert k_schedule(t, K, d // 2, Tk) == want
    assert k_schedule(0, K, d // 2, Tk) == 2048
    assert k_schedule(Tk, K, d // 2, Tk) == K
    ks = [k_schedule(t, K, 288, 30) for t in range(60)]
    assert ks == sorted(ks, reverse=True) and ks[0] == 288 and ks[-1] == K


def test_k_annealing_disabled():
    assert k_schedule(0, 50, 50, 10) == 50
    assert k_schedule(0, 50, 288, 0) == 50


def test_lr_factor_matches_formula():
    T, W = 1000, 50
    for t in range(T):
        want = min(1, (t + 1) / W, 0.01 + 0.99 * max(T - t, 1) / (0.2 * T))
        assert lr_factor(t, T, W) == pytest.approx(want, rel=1e-12)
    assert lr_factor(0, T, W) == pytest.approx(1 / W)
    assert lr_factor(500, T, W) == 1.0
    assert lr_factor(T - 1, T, W) == pytest.approx(0.01 + 0.99 / 200)


def test_default_warmup_scales_for_short_runs():
    assert default_warmup(390_625) == 5000  # 800M tokens / 2048: the released 5000 steps
    assert default_warmup(585) == 29  # 5% of a short run
    assert default_warmup(3) == 1
