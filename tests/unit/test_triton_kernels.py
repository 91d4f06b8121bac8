"""Triton launchers (sae_kernels.triton_ops) against float64 dense references computed here.

Runs compiled on CUDA when a GPU is present, else on CPU under TRITON_INTERPRET=1 (the default follows
``torch.cuda.is_available()``, as tests/conftest.py sets it, before triton is imported; an explicit
TRITON_INTERPRET wins). ``DEVICE`` names where the tests ran (the device check's test report reads it).
Shapes are small and deliberately odd (d=123, n=1000, k=1, k=7, k=n, k=d/2, N=1): the interpreter
executes every program in Python.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from helpers import assert_close, triton_test_device  # noqa: E402
from sae_kernels import triton_ops  # noqa: E402

DEVICE = triton_test_device()  # read by the device check's test report

# (dtype, atol, rtol) for values that pass through the dtype on output.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
# Selection tolerance relative to the row's score scale. The two-pass encode ranks the pre-activations
# as cuBLAS writes them (in the weights' dtype: one rounding, 2^-9 relative in bf16, as the PyTorch
# path does); the fused kernel ranks fp32 scores. Exactness over the materialised pre-activations
# is checked separately (test_row_select_is_exact), without any tolerance.
SCORE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def _assert_close(actual, expected, dtype, what):
    """Against a float64 reference, with the dtype's per-entry tolerance (``helpers.assert_close``)."""
    atol, rtol = TOL[dtype]
    assert_close(actual, expected, atol=atol, rtol=rtol, what=what)


def _with_sentinel(t, value):
    """``t`` as a view of a larger buffer whose next row (element, for 1-D) holds ``value``: a kernel
    that reads one row past the end of W / b / norm (a mask off by one) picks it up."""
    buf = torch.empty((t.shape[0] + 1,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    buf[:-1] = t
    buf[-1] = value
    view = buf[:-1]
    assert view.is_contiguous() and view.data_ptr() == buf.data_ptr()
    return view


def _encode_inputs(seed, n_tokens, d_model, d_sae, dtype, with_norm, bias_shift=0.0, lead=None):
    g = _gen(seed)
    x = _randn(n_tokens, d_model, g=g, dtype=dtype)
    W = _randn(d_sae, d_model, g=g, dtype=dtype, scale=d_model ** -0.5)
    b = _randn(d_sae, g=g, dtype=dtype, scale=0.1)
    if bias_shift:
        b = (b.float() + bias_shift).to(dtype)
    norm = (torch.rand(d_sae, generator=g) + 0.25).to(DEVICE) if with_norm else None
    # Sentinel latent d_sae: the best score of every row, were it ever read (an index d_sae, or a
    # selection that misses a real winner, fails _check_selection).
    W = _with_sentinel(W, 1.0)
    b = _with_sentinel(b, 1e3)
    norm = _with_sentinel(norm, 1e3) if norm is not None else None
    x = _with_sentinel(x, 1.0)
    if lead is not None:
        x = x.reshape(*lead, d_model)
    return x, W, b, norm


def _check_selection(x, W, b, norm, k, values, indices):
    """Distinct indices, selected scores reach the reference k-th largest, values = relu(pre)."""
    dtype = x.dtype
    d_model = W.shape[1]
    lead = x.shape[:-1]
    assert values.shape == (*lead, k) and indices.shape == (*lead, k), (values.shape, indices.shape)
    assert values.dtype == dtype and indices.dtype == torch.int64
    x2 = x.reshape(-1, d_model).double().cpu()
    pre = x2 @ W.double().cpu().T + b.double().cpu()
    z = pre.clamp_min(0)
    s = z * norm.double().cpu() if norm is not None else z
    idx = indices.reshape(-1, k).cpu()
    vals = values.reshape(-1, k).cpu()
    n_rows, d_sae = s.shape

    out_of_range = int(((idx < 0) | (idx >= d_sae)).sum())
    assert out_of_range == 0, f"{out_of_range} indices outside [0, {d_sae})"
    dup_rows = sum(int(torch.unique(r).numel() != k) for r in idx)
    assert dup_rows == 0, f"{dup_rows}/{n_rows} rows have repeated indices"

    kth = torch.topk(s, k, dim=1).values[:, -1]
    sel = s.gather(1, idx)
    scale = s.abs().amax(dim=1).clamp_min(1e-6)
    rtol = SCORE_RTOL[dtype]
    short = sel.amin(dim=1) < kth - rtol * scale
    assert int(short.sum()) == 0, (
        f"{int(short.sum())}/{n_rows} rows select a score below the reference k-th largest; "
        f"worst gap {(kth - sel.amin(dim=1)).max().item():.3e}"
    )
    # Same total: no selected score is replaced by a smaller one beyond rounding.
    total_gap = (torch.topk(s, k, dim=1).values.sum(1) - sel.sum(1)).abs()
    assert bool((total_gap <= k * rtol * scale).all()), f"max total-score gap {total_gap.max():.3e}"
    _assert_close(vals, z.gather(1, idx), dtype, "values vs relu(pre) at the selected indices")
    assert bool((vals >= 0).all()), "negative values"


ENCODE_CASES = [
    # (n_tokens, d_model, d_sae, k, dtype, with_norm, bias_shift)
    pytest.param(37, 123, 1000, 7, torch.float32, True, 0.0, id="d123-n1000-k7-fp32"),
    pytest.param(37, 123, 1000, 7, torch.bfloat16, True, 0.0, id="d123-n1000-k7-bf16"),
    pytest.param(1, 123, 1000, 1, torch.float32, False, 0.0, id="N1-k1-nonorm"),
    pytest.param(19, 48, 300, 50, torch.bfloat16, True, 0.0, id="k50-bf16"),
    pytest.param(11, 33, 200, 64, torch.float16, False, 0.0, id="k64-fp16"),
    pytest.param(9, 123, 40, 40, torch.float32, True, 0.0, id="k=n"),
    pytest.param(23, 123, 1000, 7, torch.float32, True, -3.0, id="few-positive"),
    pytest.param(7, 128, 300, 64, torch.bfloat16, False, -3.0, id="few-positive-k64-bf16"),
    pytest.param(6, 130, 260, 65, torch.float32, True, 0.0, id="k=d/2-fp32"),
    pytest.param(6, 256, 300, 128, torch.bfloat16, True, 0.0, id="k=d/2-bf16"),
    pytest.param(5, 123, 100, 100, torch.float32, True, 0.0, id="k=n-100"),
    pytest.param(8, 64, 150, 90, torch.bfloat16, False, -3.0, id="few-positive-nonorm-k90"),
]


@pytest.mark.parametrize("encode_path", ["two_pass", "fused"])
@pytest.mark.parametrize("n_tokens,d_model,d_sae,k,dtype,with_norm,bias_shift", ENCODE_CASES)
def test_encode_select(n_tokens, d_model, d_sae, k, dtype, with_norm, bias_shift, encode_path, monkeypatch):
    """Both encode paths (the launcher picks two-pass at every shape here; the fused kernel is forced)
    against float64, with a sentinel latent past d_sae that would win every row if it were read."""
    if encode_path == "fused" and k > triton_ops.FUSED_MAX_K:
        pytest.skip(f"the fused encode takes k <= {triton_ops.FUSED_MAX_K}")
    monkeypatch.setattr(triton_ops, "ENCODE_METHOD", encode_path)
    x, W, b, norm = _encode_inputs(1000 + k, n_tokens, d_model, d_sae, dtype, with_norm, bias_shift)
    if bias_shift:
        # Make sure the case is what it claims: some rows have fewer than k positive pre-activations.
        pre = x.double() @ W.double().T + b.double()
        assert int(((pre > 0).sum(1) < k).sum()) > 0
    values, indices = triton_ops.encode_select(x, W, b, k, norm)
    _check_selection(x, W, b, norm, k, values, indices)


@pytest.mark.parametrize("n_chunks", [1, 3, 16])
def test_encode_select_fused_chunking(n_chunks):
    """Explicit chunk counts (fp32: 16 latent tiles of 64): 1 = running merge over all 16 tiles,
    16 = one tile per chunk and 16 x K' candidates for the exact second stage."""
    k = 20
    x, W, b, norm = _encode_inputs(7 + n_chunks, 29, 123, 1000, torch.float32, True)
    values, indices = triton_ops._encode_select_fused(x, W, b, k, norm, n_chunks=n_chunks)
    _check_selection(x, W, b, norm, k, values, indices)


def test_encode_select_leading_dims_and_zero_rows():
    """[B, T, d] input; an all-zero token row gives pre = b_enc only."""
    x, W, b, norm = _encode_inputs(5, 6, 123, 500, torch.float32, True, lead=(2, 3))
    x[1, 2].zero_()
    values, indices = triton_ops.encode_select(x, W, b, 7, norm)
    _check_selection(x, W, b, norm, 7, values, indices)


@pytest.mark.parametrize("k", [7, 70], ids=["k7", "k70"])
def test_encode_select_nan_row_stays_in_range(k):
    """A NaN token row must not produce out-of-range or repeated indices (later gathers would fault)."""
    x, W, b, norm = _encode_inputs(17, 3, 40, 200, torch.float32, True)
    x[1, 5] = float("nan")
    values, indices = triton_ops.encode_select(x, W, b, k, norm)
    idx = indices.cpu()
    assert int(((idx < 0) | (idx >= 200)).sum()) == 0, f"out-of-range indices {idx[1].tolist()}"
    assert all(torch.unique(r).numel() == k for r in idx), "repeated indices"
    keep = torch.tensor([0, 2])
    _check_selection(x[keep], W, b, norm, k, values[keep], indices[keep])


def _sparse_inputs(seed, n_tokens, k, d_sae, d_model, dtype, repeat=False, val_dtype=None):
    g = _gen(seed)
    idx = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(n_tokens)])
    if repeat:
        # Repeated latents within a row (e.g. sloppy callers, AuxK merges): must add up.
        idx[:, k // 2:] = idx[:, : k - k // 2]
    vals = _randn(n_tokens, k, g=g, dtype=val_dtype or dtype)
    W = _randn(d_sae, d_model, g=g, dtype=dtype)
    # NaN past the last row of W: any read past d_sae (or past d_model in the last row) poisons the
    # output even when multiplied by a zero coefficient.
    return _with_sentinel(vals, float("nan")), idx.to(DEVICE), _with_sentinel(W, float("nan"))


SPARSE_CASES = [
    # (n_tokens, k, d_sae, d_model, dtype, repeat)
    pytest.param(37, 7, 1000, 123, torch.float32, False, id="N37-k7-d123-fp32"),
    pytest.param(37, 7, 1000, 123, torch.bfloat16, False, id="N37-k7-d123-bf16"),
    pytest.param(1, 1, 10, 123, torch.float32, False, id="N1-k1"),
    pytest.param(5, 300, 400, 260, torch.float32, True, id="k300-d260-repeat"),
    pytest.param(13, 40, 64, 77, torch.bfloat16, True, id="repeat-bf16"),
]


def _dense_coeffs(vals, idx, d_sae):
    """[N, d_sae] float64 matrix with the (summed) coefficients: the dense equivalent of the sparse ops."""
    dense = torch.zeros(idx.shape[0], d_sae, dtype=torch.float64)
    return dense.scatter_add_(1, idx.cpu(), vals.double().cpu())


@pytest.mark.parametrize("n_tokens,k,d_sae,d_model,dtype,repeat", SPARSE_CASES)
def test_gather_rows(n_tokens, k, d_sae, d_model, dtype, repeat):
    vals, idx, W = _sparse_inputs(11, n_tokens, k, d_sae, d_model, dtype, repeat)
    out = triton_ops.gather_rows(vals, idx, W)
    assert out.dtype == W.dtype
    ref = _dense_coeffs(vals, idx, d_sae) @ W.double().cpu()
    _assert_close(out, ref, dtype, "gather_rows")


def test_gather_rows_mixed_dtypes():
    """fp32 coefficients (e.g. a gradient) against a bf16 matrix: output in W.dtype."""
    vals, idx, W = _sparse_inputs(12, 9, 11, 300, 123, torch.bfloat16, val_dtype=torch.float32)
    out = triton_ops.gather_rows(vals, idx, W)
    assert out.dtype == torch.bfloat16
    _assert_close(out, _dense_coeffs(vals, idx, 300) @ W.double().cpu(), torch.bfloat16, "gather_rows mixed")


@pytest.mark.parametrize("n_tokens,k,d_sae,d_model,dtype,repeat", SPARSE_CASES)
def test_gather_dot(n_tokens, k, d_sae, d_model, dtype, repeat):
    g_out, idx, W = _sparse_inputs(21, n_tokens, k, d_sae, d_model, dtype, repeat)
    grad_out = _randn(n_tokens, d_model, g=_gen(22), dtype=dtype)
    out = triton_ops.gather_dot(grad_out, idx, W)
    assert out.dtype == grad_out.dtype and out.shape == (n_tokens, k)
    ref = (grad_out.double().cpu() @ W.double().cpu().T).gather(1, idx.cpu())
    _assert_close(out, ref, dtype, "gather_dot")


SCATTER_CASES = [
    # (n_tokens, k, n_rows, d_model, dtype, repeat)
    pytest.param(37, 7, 257, 123, torch.float32, False, id="sparse-hits-fp32"),   # ~37% of latents empty
    pytest.param(37, 7, 257, 123, torch.bfloat16, True, id="sparse-hits-bf16-repeat"),
    pytest.param(50, 4, 5, 130, torch.bfloat16, True, id="long-runs-bf16"),     # ~40 entries per latent
    pytest.param(1, 1, 3, 123, torch.float32, False, id="N1-k1"),
]


@pytest.mark.parametrize("with_sum", [True, False])
@pytest.mark.parametrize("n_tokens,k,n_rows,d_model,dtype,repeat", SCATTER_CASES)
def test_scatter_outer(n_tokens, k, n_rows, d_model, dtype, repeat, with_sum):
    g = _gen(31 + n_rows)
    idx = torch.stack([torch.randperm(n_rows, generator=g)[:k] for _ in range(n_tokens)])
    if repeat:
        idx[:, 0] = idx[:, -1]
    idx = idx.to(DEVICE)
    vals = _with_sentinel(_randn(n_tokens, k, g=g, dtype=dtype), float("nan"))
    Y = _with_sentinel(_randn(n_tokens, d_model, g=g, dtype=dtype), float("nan"))
    dW, dsum = triton_ops.scatter_outer(vals, idx, Y, n_rows, with_sum)
    coeffs = _dense_coeffs(vals, idx, n_rows)                         # [N, n_rows]
    assert dW.dtype == Y.dtype and dW.shape == (n_rows, d_model)
    _assert_close(dW, coeffs.T @ Y.double().cpu(), dtype, "scatter_outer dW")
    if with_sum:
        assert dsum is not None and dsum.dtype == vals.dtype and dsum.shape == (n_rows,)
        _assert_close(dsum, coeffs.sum(0), dtype, "scatter_outer dsum")
    else:
        assert dsum is None
    # Deterministic: a second call is bitwise identical.
    dW2, dsum2 = triton_ops.scatter_outer(vals, idx, Y, n_rows, with_sum)
    assert torch.equal(dW, dW2), f"{int((dW != dW2).sum())} elements differ between two runs"
    if with_sum:
        assert torch.equal(dsum, dsum2)


def test_composed_sae_step_matches_dense_autograd():
    """The four launchers compose the TopK SAE forward and every gradient (as the autograd glue will)."""
    g = _gen(99)
    n_tokens, d_model, d_sae, k = 10, 123, 150, 7
    x = _randn(n_tokens, d_model, g=g)
    W_enc = _randn(d_sae, d_model, g=g, scale=d_model ** -0.5)
    W_dec = _randn(d_sae, d_model, g=g, scale=d_model ** -0.5)
    b_enc = _randn(d_sae, g=g, scale=0.1)
    b_dec = _randn(d_model, g=g, scale=0.1)
    dout = _randn(n_tokens, d_model, g=g)
    norm = W_dec.norm(dim=1)

    values, idx = triton_ops.encode_select(x, W_enc, b_enc, k, norm)
    recon = triton_ops.gather_rows(values, idx, W_dec) + b_dec
    dvalues = triton_ops.gather_dot(dout, idx, W_dec)
    dW_dec, _ = triton_ops.scatter_outer(values, idx, dout, d_sae, False)
    gpre = dvalues * (values > 0)
    dx = triton_ops.gather_rows(gpre, idx, W_enc)
    dW_enc, db_enc = triton_ops.scatter_outer(gpre, idx, x, d_sae, True)

    # Dense float64 autograd with the same (discrete) selection.
    p = {name: t.double().cpu().requires_grad_() for name, t in
         dict(x=x, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec).items()}
    z = (p["x"] @ p["W_enc"].T + p["b_enc"]).relu()
    mask = torch.zeros_like(z).scatter_(1, idx.cpu(), 1.0)
    ref = (z * mask) @ p["W_dec"] + b_dec.double().cpu()
    ref.backward(dout.double().cpu())
    _assert_close(recon, ref.detach(), torch.float32, "reconstruction")
    _assert_close(dx, p["x"].grad, torch.float32, "dx")
    _assert_close(dW_enc, p["W_enc"].grad, torch.float32, "dW_enc")
    _assert_close(db_enc, p["b_enc"].grad, torch.float32, "db_enc")
    _assert_close(dW_dec, p["W_dec"].grad, torch.float32, "dW_dec")


def test_launchers_reject_mixed_devices_and_bad_k():
    x, W, b, norm = _encode_inputs(3, 4, 16, 32, torch.float32, False)
    with pytest.raises(ValueError):
        triton_ops.encode_select(x, W, b, 0, norm)
    with pytest.raises(ValueError):
        triton_ops.encode_select(x, W, b, 33, norm)
    if DEVICE == "cuda":
        with pytest.raises(ValueError):
            triton_ops.gather_rows(x[:, :2].cpu(), torch.zeros(4, 2, dtype=torch.long), W)


# --------------------------------------------------------------------------------------------------
# The two-pass encode's row select, the fused kernel's fixes, device guard, dense switch, Adam.
# --------------------------------------------------------------------------------------------------

METHODS = ["two_pass", "fused"]


@pytest.fixture
def method(request, monkeypatch):
    monkeypatch.setattr(triton_ops, "ENCODE_METHOD", request.param)
    return request.param


def _ref_select(pre, k, norm):
    """Exact reference of the row select: fp32 scores as the kernel forms them, NaN first, ties to
    the smaller id; returns the sorted ids per row (float64 ranking of the fp32 values)."""
    h = pre.float().cpu()
    z = torch.where((h > 0) | h.isnan(), h, torch.zeros_like(h))
    s = z if norm is None else z * norm.float().cpu()
    s = s.double().nan_to_num(nan=float("inf"), posinf=float("inf"))
    s = torch.where(s == 0, torch.zeros_like(s), s)
    n = s.shape[1]
    # rank by (score desc, id asc): a stable sort on the score, descending, keeps ids ascending in ties
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values, z


ROW_SELECT_CASES = [
    # (n_rows, d_sae, k, dtype, with_norm, kind)
    pytest.param(9, 1000, 7, torch.float32, True, "randn", id="fp32-n1000-k7-norm"),
    pytest.param(6, 300, 50, torch.bfloat16, False, "ties", id="bf16-ties-k50"),
    pytest.param(5, 129, 129, torch.float16, True, "randn", id="fp16-k=n"),
    pytest.param(7, 40, 1, torch.bfloat16, True, "negative-norm", id="bf16-k1-negative-norms"),
    pytest.param(4, 257, 20, torch.float32, True, "nan", id="fp32-nan-entries"),
    pytest.param(6, 300, 40, torch.float32, True, "signed-zeros", id="fp32-k-th-in-a-run-of-+0-and--0"),
    pytest.param(3, 2500, 300, torch.bfloat16, False, "ties", id="bf16-two-blocks-ties"),  # d_sae > BLOCK
]


@pytest.mark.parametrize("n_rows,d_sae,k,dtype,with_norm,kind", ROW_SELECT_CASES)
def test_row_select_is_exact(n_rows, d_sae, k, dtype, with_norm, kind):
    """The second pass of the two-pass encode over given pre-activations: exactly the top-k of the
    fp32 scores relu(h) * norm (ties to the smaller id, NaN first), values bitwise relu(h). The
    pre-activations are a view with a NaN sentinel column: reading past d_sae would select it."""
    g = _gen(7 + d_sae + k)
    pre = torch.randn(n_rows, d_sae, generator=g)
    if kind == "ties":
        pre = (pre * 2).round() / 2  # a handful of distinct values: long runs of exact ties
    norm = (torch.rand(d_sae, generator=g) + 0.25) if with_norm else None
    if kind == "negative-norm":
        norm = norm - 1.0
        norm[::5] = float("-inf")
    if kind == "signed-zeros":  # ~15 positive scores per row: the k-th lies among z = 0 times norms of
        norm = norm - 1.15          # either sign, +0.0 and -0.0, which must tie (to the smaller id)
    if kind == "nan":
        pre[1, 3] = pre[1, 100] = float("nan")
        pre[2] = float("nan")
    buf = torch.full((n_rows, d_sae + 1), float("nan"), dtype=dtype)
    buf[:, :d_sae] = pre.to(dtype)
    pre = buf[:, :d_sae].to(DEVICE)
    norm = norm.to(DEVICE) if norm is not None else None
    values = torch.full((n_rows, k), -7.0, dtype=dtype, device=DEVICE)
    indices = torch.full((n_rows, k), -7, dtype=torch.int64, device=DEVICE)
    triton_ops._row_select(pre, k, norm, None, values, indices)
    want, z = _ref_select(pre, k, norm)
    got = indices.cpu()
    wrong = int((got != want).any(1).sum())
    assert wrong == 0, f"{wrong}/{n_rows} rows select other latents; first: {got[(got != want).any(1)][0].tolist()}"
    want_v = z.gather(1, want).to(dtype)
    same = (values.cpu() == want_v) | (values.cpu().isnan() & want_v.isnan())
    assert bool(same.all()), f"{int((~same).sum())} values differ from relu(pre)"


@pytest.mark.parametrize("method", METHODS, indirect=True)
def test_encode_nan_semantics(method):
    """NaN propagates and ranks first (both encode paths, like the PyTorch path): a NaN input row gives
    k NaN values at distinct in-range latents; a latent with a NaN weight row is selected in every
    row with the value NaN. (The old kernels turned NaN into zero codes.)"""
    k, n = 7, 200
    x, W, b, norm = _encode_inputs(17, 4, 40, n, torch.float32, True)
    x[1, 5] = float("nan")
    W[33, 0] = float("nan")
    values, indices = triton_ops.encode_select(x, W, b, k, norm)
    v, idx = values.cpu(), indices.cpu()
    assert int(((idx < 0) | (idx >= n)).sum()) == 0 and all(torch.unique(r).numel() == k for r in idx)
    assert bool(v[1].isnan().all()), f"NaN row gave {v[1].tolist()}"
    for r in (0, 2, 3):
        assert 33 in idx[r].tolist() and bool(v[r][idx[r] == 33].isnan().all()), f"row {r}: {idx[r].tolist()}"
        assert int(v[r].isnan().sum()) == 1


@pytest.mark.parametrize("method", METHODS, indirect=True)
def test_encode_negative_and_infinite_norms_stay_in_range(method):
    """Norms are >= 0 for real SAEs, but any float must give real, distinct latents ranked right:
    with -inf norms every score is -inf or NaN (0 * -inf), which once made the fused kernel return
    index -1 (read out of bounds by the decode)."""
    k, n = 7, 200
    x, W, b, _ = _encode_inputs(5, 3, 40, n, torch.float32, False, bias_shift=5.0)  # every z > 0
    for norm in (torch.full((n,), float("-inf")), -torch.rand(n, generator=_gen(3))):
        norm = _with_sentinel(norm.to(DEVICE), 1e3)
        values, indices = triton_ops.encode_select(x, W, b, k, norm)
        idx = indices.cpu()
        assert int(((idx < 0) | (idx >= n)).sum()) == 0, f"out-of-range ids {idx.tolist()}"
        assert all(torch.unique(r).numel() == k for r in idx), "repeated ids"
        pre = x.double().cpu() @ W.double().cpu().T + b.double().cpu()
        s = pre.clamp_min(0) * norm.double().cpu()
        kth = torch.topk(s, k, dim=1).values[:, -1:]
        assert bool((s.gather(1, idx) >= kth - 1e-5 * kth.abs()).all()), "a selected score is below the k-th"


def _record_launches(monkeypatch, record):
    """Call ``record(kernel name, positional args, keyword args)`` at every Triton launch: the
    interpreter's grid executor under TRITON_INTERPRET=1, ``JITFunction.run`` on a GPU."""
    if DEVICE == "cpu":
        from triton.runtime.interpreter import GridExecutor as launcher

        real = launcher.__call__
        attr = "__call__"
    else:
        from triton.runtime.jit import JITFunction as launcher

        real = launcher.run
        attr = "run"

    def launch(self, *a, **k):
        record(self.fn.__name__, a, k)
        return real(self, *a, **k)

    monkeypatch.setattr(launcher, attr, launch)


def test_every_launch_runs_under_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device unless told otherwise: every launcher must enter its
    tensors' device (torch.cuda.device) around its kernels. Recorded on CPU tensors in the interpreter
    (the guard is a no-op there, but each launch must happen inside it); on a GPU the current device at
    each launch must also be the tensors' device."""
    entered, inside, outside, wrong = [], [0], [], []
    real_guard = triton_ops._on_device

    class Guard:
        def __init__(self, device):
            entered.append(device)
            self.inner = real_guard(device)

        def __enter__(self):
            inside[0] += 1
            return self.inner.__enter__()

        def __exit__(self, *a):
            inside[0] -= 1
            return self.inner.__exit__(*a)

    def record(name, args, kwargs):
        if inside[0] == 0:
            outside.append(name)
        dev = next((t.device for t in args if isinstance(t, torch.Tensor)), None)
        if dev is not None and dev.type == "cuda" and torch.cuda.current_device() != dev.index:
            wrong.append(name)

    monkeypatch.setattr(triton_ops, "_on_device", Guard)
    _record_launches(monkeypatch, record)
    x, W, b, norm = _encode_inputs(3, 5, 16, 64, torch.float32, True)
    v, i = triton_ops.encode_select(x, W, b, 3, norm)
    monkeypatch.setattr(triton_ops, "ENCODE_METHOD", "fused")
    triton_ops.encode_select(x, W, b, 3, norm)
    v2, i2, pre = triton_ops.encode_select(x, W, b, 3, norm, return_pre=True)
    monkeypatch.setattr(triton_ops, "ENCODE_METHOD", "auto")
    _, _, pre = triton_ops.encode_select(x, W, b, 3, norm, return_pre=True)
    triton_ops.select_from_pre(pre, 3, norm, torch.ones(64, dtype=torch.bool, device=DEVICE))
    triton_ops.gather_rows(v, i, W)
    triton_ops.gather_dot(x, i, W)
    triton_ops.scatter_outer(v, i, x, 64, True)
    p = torch.randn(7, 5).to(DEVICE)
    z = torch.zeros(7, 5, device=DEVICE)
    triton_ops.adam_step(p, torch.randn(7, 5).to(DEVICE), z, z.clone(), beta1=0.9, beta2=0.99,
                         eps=1e-8, step_size=1e-3, bc2_sqrt=0.1)
    assert len(entered) >= 9 and all(d == x.device for d in entered), entered
    assert not outside, f"kernels launched outside the device guard: {outside}"
    assert not wrong, f"kernels launched with another current device: {wrong}"


@pytest.mark.parametrize("method", METHODS, indirect=True)
def test_mixed_dtypes_compute_in_exact_fp32(method, monkeypatch):
    """bf16 x with fp32 W: the kernels get fp32 operands and an IEEE dot (on the GPU the default
    would be TF32, in the interpreter exact fp32: the two disagreed), so the result equals the fp32
    encode of x.float(). Checked on the arguments the kernels are launched with."""
    seen = []
    _record_launches(monkeypatch, lambda name, a, k: seen.append(
        (name, [t.dtype for t in a if isinstance(t, torch.Tensor)], k)))
    x, W, b, norm = _encode_inputs(11, 6, 48, 300, torch.float32, True)
    xb = x.to(torch.bfloat16)
    values, indices = triton_ops.encode_select(xb, W, b, 7, norm)
    assert values.dtype == torch.bfloat16
    for name, dtypes, k in seen:
        assert torch.bfloat16 not in dtypes, f"{name} got a bf16 operand: {dtypes}"
        if "IEEE" in k:
            assert k["IEEE"], f"{name} launched without the IEEE (exact fp32) dot"
    assert seen, "no launch recorded"
    v32, i32 = triton_ops.encode_select(xb.float(), W, b, 7, norm)
    assert torch.equal(indices, i32) and torch.equal(values, v32.to(torch.bfloat16))
    _check_selection(xb.float(), W, b, norm, 7, v32, i32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_select_from_pre_matches_a_masked_encode(dtype):
    """AuxK's second selection from the kept pre-activations equals an encode whose disallowed
    latents are pushed to zero, without a second GEMM (float64 reference; bf16 pre-activations
    are rounded once, as cuBLAS writes them)."""
    x, W, b, norm = _encode_inputs(23, 9, 40, 300, dtype, True)
    allowed = torch.rand(300, generator=_gen(1)) < 0.3
    _, _, pre = triton_ops.encode_select(x, W, b, 5, norm, return_pre=True)
    assert pre is not None and pre.shape == (9, 300) and pre.dtype == dtype
    v, i = triton_ops.select_from_pre(pre, 12, norm, allowed.to(DEVICE))
    assert v.dtype == dtype and int(((i < 0) | (i >= 300)).sum()) == 0
    assert all(torch.unique(r).numel() == 12 for r in i.cpu()), "repeated ids"
    z = (x.double().cpu() @ W.double().cpu().T + b.double().cpu()).clamp_min(0) * allowed
    s = z * norm.double().cpu()
    kth = torch.topk(s, 12, dim=1).values[:, -1:]
    assert bool((s.gather(1, i.cpu()) >= kth - SCORE_RTOL[dtype] * s.amax(1, keepdim=True)).all())
    _assert_close(v, z.gather(1, i.cpu()), dtype, "values")
    assert bool((v.cpu()[~allowed[i.cpu()]] == 0).all()), "a disallowed latent kept a value"


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_two_pass_encode_in_several_slabs_keeps_all_or_no_pre_activations(backend, monkeypatch):
    """The two-pass encode in row slabs (TWO_PASS_MAX_BYTES made small: 11 rows in slabs of 4, 4, 3)
    returns the same selection as in one slab, and with ``return_pre`` either None or the
    pre-activations of every row (never the last slab's alone); in one slab, all of them. AuxK's
    second selection from what ``encode_for_training(..., keep_pre=True)`` kept then equals a fresh
    encode whose disallowed latents are pushed to zero, values and gradients."""
    from sae_kernels.ops import encode_for_training

    n_tokens, d_model, d_sae = 11, 24, 90
    x, W, b, norm = _encode_inputs(71, n_tokens, d_model, d_sae, torch.float32, True)
    monkeypatch.setattr(triton_ops, "ENCODE_METHOD", "two_pass")
    pre64 = x.double().cpu() @ W.double().cpu().T + b.double().cpu()
    v1, i1, pre1 = triton_ops.encode_select(x, W, b, 5, norm, return_pre=True)  # one slab
    assert pre1 is not None and pre1.shape == (n_tokens, d_sae), "one slab: the pre-activations of every row"
    _assert_close(pre1, pre64, torch.float32, "pre-activations, one slab")
    monkeypatch.setattr(triton_ops, "TWO_PASS_MAX_BYTES", 4 * d_sae * 4)  # 4 fp32 rows per slab
    v3, i3, pre3 = triton_ops.encode_select(x, W, b, 5, norm, return_pre=True)
    assert torch.equal(i3, i1) and torch.equal(v3, v1), "the slabs select as one slab does"
    if pre3 is not None:
        assert pre3.shape == (n_tokens, d_sae), f"pre-activations of {list(pre3.shape)}, expected every row"
        _assert_close(pre3, pre64, torch.float32, "pre-activations, several slabs")
    # AuxK's route: the kept scores (whatever the slabs kept), then a second selection among allowed latents
    Wg, bg = W.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    allowed = (torch.rand(d_sae, generator=_gen(72)) < 0.4).to(DEVICE)
    _, _, scores = encode_for_training(x, Wg, bg, 5, norm, keep_pre=True)
    assert scores.pre is None or scores.pre.shape == (n_tokens, d_sae), "EncodeScores kept part of the rows"
    va, ia = scores.select(9, allowed)
    assert va.shape == ia.shape == (n_tokens, 9)
    grad = _randn(n_tokens, 9, g=_gen(73))
    ga = torch.autograd.grad((va * grad).sum(), (Wg, bg))
    vb, ib = triton_ops.encode_select(x, W, b + torch.where(allowed, 0.0, -1e30), 9, norm)
    for r in range(n_tokens):  # the latents with a positive value agree; zero-valued slots may differ
        a, b_ = ia[r][va[r] > 0].sort().values, ib[r][vb[r] > 0].sort().values
        assert torch.equal(a, b_), (r, a.tolist(), b_.tolist())
    assert bool(allowed[ia[va > 0]].all()), "a disallowed latent has a positive value"
    _assert_close(torch.sort(va.detach(), 1).values, torch.sort(vb, 1).values.double(), torch.float32, "AuxK values")
    # gradients of the selected (positive) values: relu(pre) at (row, latent) has d/dW = x_row, d/db = 1
    coef = torch.zeros(n_tokens, d_sae, dtype=torch.float64)
    coef.scatter_add_(1, ia.cpu(), torch.where(va.detach().cpu() > 0, grad.double().cpu(), 0.0))
    _assert_close(ga[0], coef.T @ x.double().cpu(), torch.float32, "AuxK dW_enc")
    _assert_close(ga[1], coef.sum(0), torch.float32, "AuxK db_enc")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_switch_matches_float64(dtype, monkeypatch):
    """Above the crossover k the decode, d(values) and the backward reductions are dense GEMMs on a
    scattered coefficient matrix: same results as the sparse kernels, against float64 (repeated ids
    add up: in fp32 only, a bf16 coefficient matrix rounds their sum once; an encode's ids are
    distinct; fp32 output from bf16 operands)."""
    monkeypatch.setattr(triton_ops, "DENSE_K_MIN", 1)
    monkeypatch.setattr(triton_ops, "DENSE_K_FRACTION", 0.0)
    vals, idx, W = _sparse_inputs(41, 13, 40, 64, 77, dtype, repeat=dtype == torch.float32)
    grad_out = _randn(13, 77, g=_gen(42), dtype=dtype)
    coeffs = _dense_coeffs(vals, idx, 64)
    _assert_close(triton_ops.gather_rows(vals, idx, W), coeffs @ W.double().cpu(), dtype, "dense gather_rows")
    ref = (grad_out.double().cpu() @ W.double().cpu().T).gather(1, idx.cpu())
    _assert_close(triton_ops.gather_dot(grad_out, idx, W), ref, dtype, "dense gather_dot")
    dW, dsum = triton_ops.scatter_outer(vals, idx, grad_out, 64, True, out_dtype=torch.float32)
    assert dW.dtype == torch.float32 and dsum.dtype == torch.float32
    _assert_close(dW, coeffs.T @ grad_out.double().cpu(), torch.float32, "dense scatter_outer (fp32 out)")
    _assert_close(dsum, coeffs.sum(0), torch.float32, "dense dsum")


def test_scatter_writes_fp32_master_gradients_from_bf16():
    """out_dtype=fp32: the products of bf16 operands are exact in fp32, so dW matches float64 at fp32
    tolerance (a bf16 result then cast would be off by up to 2^-9 relative)."""
    g = _gen(5)
    idx = torch.stack([torch.randperm(97, generator=g)[:9] for _ in range(41)]).to(DEVICE)
    vals = _randn(41, 9, g=g, dtype=torch.bfloat16)
    Y = _randn(41, 130, g=g, dtype=torch.bfloat16)
    dW, dsum = triton_ops.scatter_outer(vals, idx, Y, 97, True, out_dtype=torch.float32)
    coeffs = _dense_coeffs(vals, idx, 97)
    assert dW.dtype == torch.float32
    _assert_close(dW, coeffs.T @ Y.double().cpu(), torch.float32, "fp32 dW from bf16")
    _assert_close(dsum, coeffs.sum(0), torch.float32, "fp32 dsum from bf16")


def test_out_of_range_ids_read_nothing():
    """The public ops reject out-of-range ids; the kernels themselves never read outside W for them
    (masked loads: ids -1, d_sae, 2^40 contribute nothing), so no id can fault a GPU."""
    vals, idx, W = _sparse_inputs(61, 5, 6, 50, 33, torch.float32)
    idx[0, 0], idx[1, 2], idx[3, 5] = -1, 50, 2 ** 40
    ok = (idx >= 0) & (idx < 50)
    out = triton_ops.gather_rows(vals, idx, W)
    assert bool(torch.isfinite(out).all())
    safe = torch.where(ok, idx, torch.zeros_like(idx))
    coeffs = _dense_coeffs(torch.where(ok, vals, torch.zeros_like(vals)), safe, 50)
    _assert_close(out, coeffs @ W.double().cpu(), torch.float32, "gather_rows with bad ids")
    dots = triton_ops.gather_dot(_randn(5, 33, g=_gen(2)), idx, W)
    assert bool(torch.isfinite(dots).all()) and bool((dots[~ok] == 0).all())


@pytest.mark.parametrize("restart", [False, True], ids=["no-flags", "flags-row-bc"])
@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16], ids=["fp32-moments", "bf16-moments"])
@pytest.mark.parametrize("shape", [(11, 123), (1000,), (5,)], ids=["2d", "1d", "tiny"])
def test_adam_kernel_matches_float64(shape, moments, restart):
    """Three fused Adam steps with a gradient factor against torch's Adam formulas in float64; the
    bf16 compute copy equals the new fp32 parameter rounded; the row sums of squares are exact.
    ``flags-row-bc``: with what the trainer's default recipe passes on every step, row flags (HOLD,
    RESET: FLAGS 1 per row of a 2-D parameter, 2 per element of a 1-D one) and per-row bias
    corrections counted from each row's reset (ROW_BC), and eps = 0.1, large against
    sqrt(v) / sqrt(1 - beta2**n): the order of that correction and eps changes the update severalfold."""
    g = _gen(len(shape) * 10 + shape[0])
    p = torch.randn(*shape, generator=g).to(DEVICE)
    m = torch.zeros(*shape, dtype=moments, device=DEVICE)
    v = torch.zeros(*shape, dtype=moments, device=DEVICE)
    copy = torch.empty(*shape, dtype=torch.bfloat16, device=DEVICE)
    rows = shape[0] if len(shape) == 2 else -(-shape[0] // triton_ops._ADAM_CHUNK)
    sumsq = torch.empty(rows, device=DEVICE)
    p64, m64, v64 = p.double().cpu(), torch.zeros(*shape, dtype=torch.float64), torch.zeros(*shape, dtype=torch.float64)
    lr, b1, b2, eps = 1e-2, 0.9, 0.9999, 1e-8
    if restart:
        b2, eps = 0.999, 0.1
    lead = (-1,) + (1,) * (len(shape) - 1)  # a flag / correction per row (2-D) or per element (1-D)
    step0 = torch.zeros(shape[0], dtype=torch.float64)  # the step count at each row's last reset
    for t in range(1, 4):
        grad = torch.randn(*shape, generator=g).to(DEVICE)
        scale = torch.tensor(0.37 if t != 2 else 1.0, device=DEVICE)
        kw = {}
        reset = hold = torch.zeros(shape[0], dtype=torch.bool)
        n = torch.full((shape[0],), float(t), dtype=torch.float64)
        if restart:
            if t > 1:
                reset = torch.rand(shape[0], generator=g) < 0.4
                hold = torch.rand(shape[0], generator=g) < 0.3
                reset[0], hold[0] = True, False  # at least one restarted row that steps
            flags = reset.to(torch.uint8) * 2 | hold.to(torch.uint8) * 1
            step0 = torch.where(reset, float(t - 1), step0)
            n = t - step0
            kw = dict(flags=flags.to(DEVICE), row_step_size=(lr / (1 - b1 ** n)).float().to(DEVICE),
                      row_bc2_sqrt=(1 - b2 ** n).sqrt().float().to(DEVICE))
        triton_ops.adam_step(p, grad, m, v, beta1=b1, beta2=b2, eps=eps, step_size=lr / (1 - b1 ** t),
                             bc2_sqrt=(1 - b2 ** t) ** 0.5, scale=scale, copy=copy, row_sumsq=sumsq, **kw)
        g64 = grad.double().cpu() * float(scale)
        m64 = torch.where(reset.view(lead), 0.0, m64)
        v64 = torch.where(reset.view(lead), 0.0, v64)
        m64 = b1 * m64 + (1 - b1) * g64
        v64 = b2 * v64 + (1 - b2) * g64 * g64
        nb = n.view(lead)
        upd = lr / (1 - b1 ** nb) * m64 / (v64.sqrt() / (1 - b2 ** nb) ** 0.5 + eps)
        p64 = torch.where(hold.view(lead), p64, p64 - upd)
        if moments == torch.bfloat16:  # the reference rounds its moments as the kernel stores them
            m64, v64 = m64.to(torch.bfloat16).double(), v64.to(torch.bfloat16).double()
    tol = torch.float32 if moments == torch.float32 else torch.bfloat16
    _assert_close(p, p64, torch.float32 if moments == torch.float32 else torch.bfloat16, "parameter")
    _assert_close(m, m64, tol, "exp_avg")
    _assert_close(v, v64, tol, "exp_avg_sq")
    if DEVICE == "cuda":
        assert torch.equal(copy.cpu(), p.cpu().to(torch.bfloat16)), "compute copy is not the rounded parameter"
    else:  # the interpreter's fp32 -> bf16 conversion truncates (the GPU rounds to nearest even)
        err = (copy.cpu().double() - p.cpu().double()).abs()
        assert bool((err <= 2.0 ** -7 * p.cpu().double().abs()).all()), f"copy off by {err.max():.3g}"
    if len(shape) == 2:
        _assert_close(sumsq, p.double().cpu().pow(2).sum(1), torch.float32, "row sums of squares")
