"""Ties in the selection go to the smaller latent id on every encode path (README: "ties go to the
smaller latent id"): the fused kernel (running top-K' per chunk, then a top-k over the candidates),
the two-pass select and the PyTorch path return the same latents on inputs whose scores are exact in
every dtype (small integers times powers of two), so that every tie is a true tie in fp32 and bf16.

Under TRITON_INTERPRET=1 on the CPU (tests/conftest.py), compiled on a GPU.
"""
import contextlib

import pytest
import torch

from helpers import DEVICE

pytest.importorskip("triton")

from sae_kernels import reference  # noqa: E402
from sae_kernels import triton_ops as T  # noqa: E402


@contextlib.contextmanager
def _method(name):
    old = T.ENCODE_METHOD
    T.ENCODE_METHOD = name
    try:
        yield
    finally:
        T.ENCODE_METHOD = old


def _tied_inputs(seed, N, d, n, dtype, weighted):
    """x in {-1, 0, 1}, W in {-1, 0, 1} / 4, b in multiples of 1/4, norms powers of two: every score is
    exact in bf16 and fp32 and most rows have many latents with equal scores; latents 64 and 128 (and
    every latent of a few more groups) are copies of one another, so exact ties straddle chunk and tile
    boundaries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, 2, (N, d), generator=g).float()
    W = torch.randint(-1, 2, (n, d), generator=g).float() / 4
    b = torch.randint(-2, 3, (n,), generator=g).float() / 4
    for group in ([64, 128], [3, 200, n - 1], [70, 71, 190]):
        group = [i for i in group if i < n]
        W[group] = W[group[0]].clone()
        b[group] = b[group[0]].clone()
    norm = 2.0 ** torch.randint(-1, 2, (n,), generator=g).float() if weighted else None
    return x.to(DEVICE, dtype), W.to(DEVICE, dtype), b.to(DEVICE, dtype), None if norm is None else norm.to(DEVICE)


def _want(x, W, b, norm, k):
    """Row-wise top-k by (score descending, latent id ascending), in float64: the specified tie rule."""
    z = torch.relu(x.double() @ W.double().t() + b.double())
    s = z if norm is None else z * norm.double()
    n = s.shape[1]
    # a stable sort by score descending keeps increasing ids among equal scores
    order = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    assert n == W.shape[0]
    return order.sort(dim=1).values


F32, BF16 = torch.float32, torch.bfloat16


# k in each K' class of the fused kernel (16, 32, 64), fp32 and bf16, weighted and plain
@pytest.mark.parametrize("N,d,n,k,dtype,weighted", [
    (37, 16, 257, 5, F32, True), (37, 16, 257, 5, BF16, False), (9, 12, 300, 33, BF16, True),
    (64, 8, 130, 17, F32, False), (64, 8, 130, 17, BF16, True), (5, 16, 211, 64, F32, True)])
def test_every_encode_path_breaks_ties_toward_the_smaller_latent(N, d, n, k, dtype, weighted):
    x, W, b, norm = _tied_inputs(N * 7 + k, N, d, n, dtype, weighted)
    want = _want(x, W, b, norm, k)
    got = {}
    with _method("two_pass"):
        got["two_pass"] = T.encode_select(x, W, b, k, norm)[1]
    with _method("fused"):
        got["fused"] = T.encode_select(x, W, b, k, norm)[1]
    for chunks in (1, 3):  # several chunks: ties across the candidate lists of different chunks
        cdt = T._compute_dtype(x.dtype, W.dtype)
        got[f"fused/{chunks} chunks"] = T._encode_select_fused(x.to(cdt), W.to(cdt), b.to(cdt), k, norm,
                                                               n_chunks=chunks)[1]
    got["torch"] = reference.encode_select(x, W, b, k, norm)[1]
    for name, idx in got.items():
        idx = idx.cpu().sort(dim=1).values
        bad = (idx != want.cpu()).any(1)
        assert not bad.any(), (f"{name}: {int(bad.sum())}/{N} rows differ from the tie rule; first row "
                               f"{int(bad.nonzero()[0])}: got {idx[bad][0].tolist()}, want {want.cpu()[bad][0].tolist()}")


def _rule(score, k):
    """The selection rule by definition: a stable descending sort (NaN first, equal scores by index)."""
    return torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]


@pytest.mark.parametrize("seed", range(6))
def test_topk_indices_follow_the_rule(seed):
    """The PyTorch path's selection (``reference.topk_indices``: ``torch.topk``, one compare pass, the rows
    with a tie at the k-th score re-selected) against the rule's definition on rows full of ties:
    quantised scores, runs of zeros, NaN (fewer and more than k per row), +-inf."""
    g = torch.Generator().manual_seed(seed)
    N, n = 40, 67
    s = torch.randint(-3, 6, (N, n), generator=g).float() / 2
    s[torch.rand(N, n, generator=g) < 0.3] = 0.0
    s[3] = torch.randn(n, generator=g)  # no ties
    s[4, ::5] = float("nan")  # 14 NaNs
    s[5, 7] = float("nan")
    s[6, 2:9] = float("inf")
    s[7, 1:4] = float("-inf")
    s[8] = 1.0  # all equal
    s[9, 10] = float("nan")
    s[9, 20] = float("inf")
    for k in (1, 3, 7, 14, 15, 40, 66, 67):
        want = torch.zeros(N, n, dtype=torch.bool).scatter_(1, _rule(s, k), True)
        idx = reference.topk_indices(s.clone(), k)
        got = torch.zeros(N, n, dtype=torch.bool).scatter_(1, idx, True)
        assert (idx.sort(1).values.diff(dim=1) > 0).all(), "repeated indices"
        bad = (got != want).any(1)
        assert not bad.any(), (k, bad.nonzero().squeeze(1).tolist())


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "plain"])
def test_torch_path_ranks_before_the_relu_only_where_that_is_the_same(weighted):
    """The PyTorch path's top-k runs on the scores before the ReLU (one pass less): rows with fewer than
    k positive scores (the rest tie at zero: the smallest ids), NaN rows and a -inf pre-activation on a
    zero norm must still follow the rule over relu(pre) * norm, and the values are relu(pre)."""
    g = torch.Generator().manual_seed(11)
    N, d, n, k = 30, 12, 90, 9
    x = torch.randn(N, d, generator=g)
    W = torch.randn(n, d, generator=g) / d ** 0.5
    b = torch.randn(n, generator=g) * 0.3 - 1.2  # about 10% of the latents positive per row
    b[:3] = -50.0  # rows 0-3: no positive latent at all
    x[:4] *= 0.01
    norm = (torch.rand(n, generator=g) + 0.5) if weighted else None
    if weighted:
        norm[5] = 0.0
    x[6, 0] = float("nan")
    W[5, 0] = float("-inf") if weighted else W[5, 0]
    x[7, 0] = 1.0
    values, idx = reference.encode_select(x, W, b, k, norm)
    pre = x.double() @ W.double().t() + b.double()
    z = torch.relu(pre)
    s = z if norm is None else z * norm.double()
    s = torch.where(pre.isnan(), float("nan"), s)
    want = _rule(s, k).sort(1).values
    positives = (s > 0).sum(1)
    assert (positives < k).sum() >= 5, "the case should have rows with fewer than k positive scores"
    got = idx.sort(1).values
    bad = (got != want).any(1)
    assert not bad.any(), (bad.nonzero().squeeze(1).tolist(), got[bad][0].tolist(), want[bad][0].tolist())
    z_sel = torch.relu(pre.gather(1, idx))
    assert torch.equal(values.isnan(), z_sel.isnan())
    assert float((values.double() - z_sel).abs().nan_to_num(0.0).max()) <= 1e-5 * (1 + float(z_sel.nan_to_num(0).abs().max()))
