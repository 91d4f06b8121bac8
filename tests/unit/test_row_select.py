"""The row select (``triton_ops._row_select``: ``csrc_triton/topk_select.py``) against an exact reference.

Exactly the top k of the fp32 scores ``relu(h) * norm`` of every row (ties to the smaller latent id,
+0.0 and -0.0 equal, NaN above every number and NaNs tied, any float norm), the ids in increasing order
and in range, the values bitwise ``relu(h)`` in the pre-activations' dtype. Rows are drawn fresh (odd
widths around the kernel's block, k from 1 to d_sae, fp32 / bf16 / fp16, with and without norms and an
extra bias, heavy ties, NaN, infinities), and each case also runs with a tiny scratch and a tiny sample
so that every fallback of the kernel (H0 over the rest of the row, H1 / H2 over the row, W) is taken.

Compiled on CUDA when a GPU is present, else in the interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py): small shapes.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import triton_test_device  # noqa: E402
from sae_kernels import triton_ops  # noqa: E402

# 0 * inf in the interpreter's numpy products (a NaN score, as intended)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DEVICE = triton_test_device()  # read by the device check's test report


def reference(pre: torch.Tensor, k: int, norm, bias):
    """Ids (sorted) and values of the exact top k per row: fp32 scores formed as the kernel forms them
    (z = relu(h) keeping NaN, s = z * norm, both IEEE fp32), ranked in float64 by (NaN first, score
    descending with -0.0 == +0.0, latent id ascending)."""
    h = pre.float().cpu()
    if bias is not None:
        h = h + bias.float().cpu()
    z = torch.where(h <= 0, torch.zeros_like(h), h)    # NaN <= 0 is False: NaN kept
    s = z if norm is None else z * norm.float().cpu()
    s = s.double()
    nan = s.isnan()
    s = torch.where(nan, torch.zeros_like(s), s) + 0.0  # -0.0 + 0.0 = +0.0
    # stable sorts: by score descending, then NaN first (ties keep the id order)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(nan.gather(1, order).to(torch.int8), dim=1, descending=True,
                                       stable=True).indices)
    ids = torch.sort(order[:, :k], dim=1).values
    # sanity of the reference itself: its k-th score is torch.topk's (numbers only)
    finite_rows = ~nan.any(1)
    if bool(finite_rows.any()):
        kth = torch.topk(s[finite_rows], k, dim=1).values[:, -1]
        assert torch.equal(s[finite_rows].gather(1, ids[finite_rows]).min(1).values, kth)
    return ids, z.gather(1, ids)


def make_rows(kind: str, n_rows: int, d_sae: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(n_rows, d_sae, generator=g)
    if kind == "ties":        # a handful of distinct values: long runs of exact ties
        pre = (pre * 2).round() / 2
    elif kind == "zeros":     # mostly h <= 0: the k-th score among the zeros
        pre = pre - 2.0
    elif kind == "equal":     # every entry of a row equal (rows of positives, zeros, negatives)
        pre = torch.tensor([1.5, 0.0, -1.0, 3.0])[torch.arange(n_rows) % 4, None].expand(n_rows, d_sae).clone()
    elif kind == "nan":       # NaN entries of both signs, a NaN row, infinities
        pre[0, 3] = float("nan")
        pre[0, d_sae - 1] = -float("nan")
        pre[0, d_sae // 2] = float("inf")
        if n_rows > 1:
            pre[1] = float("nan")
        if n_rows > 2:
            pre[2, ::7] = float("-inf")
            pre[2, 1::11] = float("inf")
    elif kind == "ties+":     # positive runs of exact ties at 4.0, 5.0, 6.0, 7.0: the bins' lowest keys
        pre = (pre * 2).round() / 2 + 5.0
    elif kind == "tiny":      # mostly negative, a few positive scores below 2^-126 (in +0.0's bin)
        pre = pre - 1.0
        pre[:, ::9] = torch.tensor([1e-39, 2e-39, 3e-45, 1e-40])[torch.arange(n_rows) % 4, None]
    elif kind == "scaled":    # rows of very different scales, and tiny values (subnormal products)
        pre = pre * torch.logspace(-30, 30, n_rows)[:, None]
    return pre.to(dtype)


def make_norm(kind: str, d_sae: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "none":
        return None
    norm = torch.rand(d_sae, generator=g) + 0.25
    if kind == "signed":      # negative, zero and infinite norms: -0.0 scores, NaN = 0 * inf
        norm = norm - 0.9
        norm[::5] = float("-inf")
        norm[1::7] = 0.0
        norm[2::13] = float("inf")
    return norm


def make_bias(kind: str, d_sae: int, seed: int):
    g = torch.Generator().manual_seed(seed + 2)
    if kind == "none":
        return None
    if kind == "mask":        # AuxK's: the allowed latents keep h, the others go to -1e30
        return torch.where(torch.rand(d_sae, generator=g) < 0.2, 0.0, -1e30)
    return torch.randn(d_sae, generator=g) * 0.5


def run_select(pre, k, norm, bias, capacity=None, sample=None):
    """The kernel over ``pre`` as a view with a NaN sentinel column after each row (a read past d_sae
    would select it), norm / bias / outputs on the device; returns (ids, values) on the CPU."""
    n_rows, d_sae = pre.shape
    buf = torch.full((n_rows, d_sae + 1), float("nan"), dtype=pre.dtype)
    buf[:, :d_sae] = pre
    view = buf.to(DEVICE)[:, :d_sae]
    values = torch.full((n_rows, k), -7.0, dtype=pre.dtype, device=DEVICE)
    indices = torch.full((n_rows, k), -7, dtype=torch.int64, device=DEVICE)
    triton_ops._row_select(view, k, None if norm is None else norm.to(DEVICE),
                           None if bias is None else bias.to(DEVICE), values, indices, capacity=capacity,
                           sample=sample)
    return indices.cpu(), values.cpu()


def check(pre, k, norm, bias, **kw):
    ids, vals = run_select(pre, k, norm, bias, **kw)
    d_sae = pre.shape[1]
    assert int(((ids < 0) | (ids >= d_sae)).sum()) == 0, f"ids out of range: {ids.tolist()}"
    assert bool((ids[:, 1:] > ids[:, :-1]).all()), "ids not strictly increasing in a row"
    want_ids, want_vals = reference(pre, k, norm, bias)
    bad = (ids != want_ids).any(1)
    assert not bool(bad.any()), (f"{int(bad.sum())}/{len(ids)} rows select other latents ({kw}); first row "
                                 f"{int(bad.nonzero()[0])}: got {ids[bad][0].tolist()[:20]}, "
                                 f"want {want_ids[bad][0].tolist()[:20]}")
    same = (vals == want_vals.to(pre.dtype)) | (vals.isnan() & want_vals.isnan())
    if DEVICE == "cpu" and pre.dtype == torch.bfloat16:
        # the interpreter casts fp32 to bf16 by truncation (a GPU rounds to nearest even): relu(h) is
        # rounded only when a bias made it inexact in bf16
        same |= vals == (want_vals.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    assert bool(same.all()), f"{int((~same).sum())} values differ from relu(h) ({kw})"


# (n_rows, d_sae, k, dtype, rows, norm, bias); the kernel's block is 2048 latents
CASES = [
    pytest.param(1, 1000, 1, torch.float32, "randn", "pos", "none", id="N1-k1-fp32"),
    pytest.param(5, 1000, 7, torch.bfloat16, "randn", "pos", "none", id="k7-bf16"),
    pytest.param(6, 2500, 300, torch.float16, "randn", "none", "none", id="two-blocks-fp16-no-norm"),
    pytest.param(3, 129, 129, torch.float32, "randn", "pos", "none", id="k=d_sae"),
    pytest.param(3, 4099, 2050, torch.bfloat16, "randn", "pos", "none", id="k-near-half-three-blocks"),
    pytest.param(5, 777, 50, torch.bfloat16, "ties", "none", "none", id="quantised-ties"),
    pytest.param(4, 640, 100, torch.float32, "ties", "pos", "none", id="quantised-ties-norm"),
    pytest.param(5, 900, 40, torch.float16, "zeros", "pos", "none", id="kth-among-zeros"),
    pytest.param(4, 300, 17, torch.float32, "equal", "pos", "none", id="all-equal-rows"),
    pytest.param(4, 500, 20, torch.float32, "nan", "pos", "none", id="nan-and-inf-fp32"),
    pytest.param(3, 500, 20, torch.bfloat16, "nan", "signed", "none", id="nan-and-inf-signed-norms"),
    pytest.param(5, 300, 17, torch.float32, "randn", "signed", "none", id="negative-zero-inf-norms"),
    pytest.param(6, 600, 25, torch.float32, "scaled", "pos", "none", id="row-scales-1e-30-to-1e30"),
    pytest.param(4, 1100, 64, torch.bfloat16, "randn", "pos", "mask", id="auxk-mask-bias"),
    pytest.param(3, 700, 600, torch.float32, "randn", "pos", "mask", id="auxk-mask-k-above-allowed"),
    pytest.param(4, 1500, 33, torch.float16, "randn", "signed", "float", id="float-bias-signed-norms"),
    pytest.param(3, 8500, 9, torch.bfloat16, "randn", "pos", "float", id="sampled-rows"),
    pytest.param(3, 9000, 600, torch.float32, "randn", "none", "none", id="sampled-rows-large-k"),
]


@pytest.mark.parametrize("n_rows,d_sae,k,dtype,rows,norm,bias", CASES)
def test_row_select_matches_the_exact_reference(n_rows, d_sae, k, dtype, rows, norm, bias):
    seed = d_sae * 7 + k
    pre = make_rows(rows, n_rows, d_sae, dtype, seed)
    check(pre, k, make_norm(norm, d_sae, seed), make_bias(bias, d_sae, seed))


# Every fallback: a sample that misjudges the rows, a scratch that holds fewer candidates than k or than
# the k-th key's bin (H0 over the rest, H1 / H2 over the row, the row write W), on the same rows.
FALLBACKS = [
    pytest.param(dict(sample=100), id="sample-100"),
    pytest.param(dict(sample=7), id="sample-7"),
    pytest.param(dict(capacity=1), id="capacity-1"),
    pytest.param(dict(capacity=64, sample=300), id="capacity-64-sample-300"),
]
FALLBACK_CASES = [
    pytest.param(5, 1000, 7, torch.bfloat16, "randn", "pos", "none", id="k7"),
    pytest.param(4, 2100, 70, torch.float32, "ties", "none", "none", id="ties-two-blocks"),
    pytest.param(4, 500, 20, torch.float32, "nan", "signed", "none", id="nan-signed-norms"),
    pytest.param(3, 700, 600, torch.float16, "zeros", "pos", "mask", id="zeros-mask-large-k"),
    pytest.param(3, 300, 300, torch.float32, "equal", "pos", "none", id="equal-k=d_sae"),
]


@pytest.mark.parametrize("fallback", FALLBACKS)
@pytest.mark.parametrize("n_rows,d_sae,k,dtype,rows,norm,bias", FALLBACK_CASES)
def test_row_select_fallbacks_are_exact(n_rows, d_sae, k, dtype, rows, norm, bias, fallback):
    seed = d_sae * 3 + k
    pre = make_rows(rows, n_rows, d_sae, dtype, seed)
    check(pre, k, make_norm(norm, d_sae, seed), make_bias(bias, d_sae, seed), **fallback)


def test_nan_row_gives_k_nan_values_at_the_first_ids():
    """A NaN row: all scores tie above every number, so the k smallest ids, each with the value NaN."""
    pre = torch.full((2, 300), float("nan"))
    pre[1, ::2] = 1.0
    ids, vals = run_select(pre, 10, torch.rand(300) + 0.5, None)
    assert ids[0].tolist() == list(range(10)) and bool(vals[0].isnan().all())
    assert ids[1].tolist() == list(range(1, 20, 2)) and bool(vals[1].isnan().all())


def test_launcher_options_cover_the_kernel_configurations():
    """Both candidate step sizes appear in launch_configs (the sm_90 compile test compiles each); the
    sample and capacity helpers stay within the row."""
    names = [c[0] for c in triton_ops.launch_configs() if c[0].startswith("row_topk")]
    assert sum("small_k=1" in n for n in names) == sum("small_k=0" in n for n in names) == 12
    for d_sae, k in [(1, 1), (129, 129), (32768, 50), (131072, 2048), (40000, 39999)]:
        n_s, k_s = triton_ops._select_sample(d_sae, k)
        assert 1 <= k_s <= n_s <= d_sae and (n_s < d_sae or k_s == k)
        assert 1 <= triton_ops._select_capacity(d_sae, k) <= -(-d_sae // 16) * 16
        assert triton_ops._select_capacity(d_sae, k) % 16 == 0


# Dense rows (k / d_sae from 0.3 to 0.95, AuxK's k_aux 2048 of ~3277): D, the candidates compacted by
# block prefix sums, and the K-th key at the threshold itself (no S pass) when the candidates above it
# are fewer than k (the K-th entry among the zeros or among exact ties at a bin's lowest key).
DENSE_CASES = [
    pytest.param(4, 97, 60, torch.float32, "randn", "pos", "none", id="d97-k60"),
    pytest.param(3, 97, 92, torch.bfloat16, "nan", "signed", "none", id="d97-k92-nan-signed-norms"),
    pytest.param(3, 1001, 300, torch.float32, "ties", "none", "none", id="d1001-k300-ties"),
    pytest.param(3, 1001, 950, torch.bfloat16, "randn", "pos", "none", id="d1001-k950"),
    pytest.param(3, 1001, 700, torch.bfloat16, "zeros", "signed", "none", id="d1001-k700-zero-negative-norms"),
    pytest.param(4, 1001, 500, torch.float32, "ties+", "none", "none", id="d1001-k500-ties-at-bin-floor"),
    pytest.param(4, 300, 200, torch.float32, "equal", "pos", "none", id="d300-k200-equal-rows"),
    pytest.param(3, 500, 400, torch.float32, "nan", "pos", "none", id="d500-k400-nan-inf"),
    pytest.param(2, 3277, 2048, torch.bfloat16, "randn", "pos", "none", id="auxk-3277-2048"),
    pytest.param(2, 3277, 2048, torch.bfloat16, "randn", "pos", "mask", id="auxk-3277-2048-mask"),
    pytest.param(2, 3281, 1200, torch.float32, "ties", "signed", "none", id="d3281-k1200-ties-signed"),
    pytest.param(2, 4096, 2048, torch.bfloat16, "randn", "pos", "none", id="d4096-k2048-s-passes"),
    pytest.param(4, 1001, 600, torch.float32, "tiny", "none", "none", id="d1001-k600-subnormals-in-zero-bin"),
    pytest.param(4, 2100, 1500, torch.float32, "tiny", "signed", "none", id="d2100-k1500-subnormals-signed-norms"),
    pytest.param(4, 1500, 1000, torch.float32, "tiny", "pos", "none", id="d1500-k1000-subnormals-norm"),
    pytest.param(4, 700, 650, torch.float32, "zeros", "none", "float", id="d700-k650-zeros-float-bias"),
    pytest.param(2, 9000, 6000, torch.bfloat16, "randn", "pos", "none", id="sampled-d9000-k6000"),
]


@pytest.mark.parametrize("n_rows,d_sae,k,dtype,rows,norm,bias", DENSE_CASES)
def test_row_select_dense_rows_match_the_exact_reference(n_rows, d_sae, k, dtype, rows, norm, bias):
    seed = d_sae * 5 + k
    pre = make_rows(rows, n_rows, d_sae, dtype, seed)
    check(pre, k, make_norm(norm, d_sae, seed), make_bias(bias, d_sae, seed))


@pytest.mark.parametrize("fallback", [pytest.param(dict(sample=50), id="sample-50"),
                                      pytest.param(dict(capacity=512), id="capacity-512")])
@pytest.mark.parametrize("n_rows,d_sae,k,dtype,rows,norm,bias", [
    pytest.param(3, 1001, 700, torch.bfloat16, "randn", "pos", "none", id="d1001-k700"),
    pytest.param(3, 777, 400, torch.float32, "ties+", "none", "none", id="d777-k400-ties-at-bin-floor"),
])
def test_row_select_dense_fallbacks_are_exact(n_rows, d_sae, k, dtype, rows, norm, bias, fallback):
    seed = d_sae * 11 + k
    pre = make_rows(rows, n_rows, d_sae, dtype, seed)
    check(pre, k, make_norm(norm, d_sae, seed), make_bias(bias, d_sae, seed), **fallback)


def test_unaligned_rows_are_copied_to_an_aligned_stride():
    """Rows whose stride is not a multiple of 16 elements go to the kernel (on a GPU) as a copy with
    an aligned stride, the same values."""
    pre = torch.randn(3, 3277).to(torch.bfloat16)
    assert triton_ops._select_row_stride(3277, 3277) == 3280
    assert triton_ops._select_row_stride(3277, 4096) == 4096
    out = triton_ops._select_aligned_rows(pre)
    assert out.stride(0) == 3280 and out.shape == pre.shape and torch.equal(out, pre)
