"""Triton launchers (sae_kernels.triton_ops) against float64 dense references computed here.

Runs on CPU under TRITON_INTERPRET=1 (set below before triton is imported), or on CUDA when a GPU
is present and the interpreter is off. Shapes are small and deliberately odd (d=123, n=1000, k=1,
k=7, k=n, k=d/2, N=1): the interpreter executes every program in Python.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from sae_kernels import triton_ops  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

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
    """Compare against a float64 reference; report the number and worst of the mismatches."""
    atol, rtol = TOL[dtype]
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    n_bad = int(bad.sum())
    assert n_bad == 0, (
        f"{what}: {n_bad}/{bad.numel()} mismatches (atol={atol}, rtol={rtol}), "
        f"max abs err {err.max().item():.3e}, first at {tuple(bad.nonzero()[0].tolist())}"
    )


def _encode_inputs(seed, n_tokens, d_model, d_sae, dtype, with_norm, bias_shift=0.0, lead=None):
    g = _gen(seed)
    x = _randn(n_tokens, d_model, g=g, dtype=dtype)
    W = _randn(d_sae, d_model, g=g, dtype=dtype, scale=d_model ** -0.5)
    b = _randn(d_sae, g=g, dtype=dtype, scale=0.1)
    if bias_shift:
        b = (b.float() + bias_shift).to(dtype)
    norm = (torch.rand(d_sae, generator=g) + 0.25).to(DEVICE) if with_norm else None
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
    pytest.param(37, 123, 1000, 7, torch.float32, True, 0.0, id="fused-d123-n1000-k7-fp32"),
    pytest.param(37, 123, 1000, 7, torch.bfloat16, True, 0.0, id="fused-d123-n1000-k7-bf16"),
    pytest.param(1, 123, 1000, 1, torch.float32, False, 0.0, id="fused-N1-k1-nonorm"),
    pytest.param(19, 48, 300, 50, torch.bfloat16, True, 0.0, id="fused-k50-bf16"),
    pytest.param(11, 33, 200, 64, torch.float16, False, 0.0, id="fused-k64-fp16"),
    pytest.param(9, 123, 40, 40, torch.float32, True, 0.0, id="fused-k=n"),
    pytest.param(23, 123, 1000, 7, torch.float32, True, -3.0, id="fused-few-positive"),
    pytest.param(7, 128, 300, 64, torch.bfloat16, False, -3.0, id="fused-few-positive-k64-bf16"),
    pytest.param(6, 130, 260, 65, torch.float32, True, 0.0, id="dense-k=d/2-fp32"),
    pytest.param(6, 256, 300, 128, torch.bfloat16, True, 0.0, id="dense-k=d/2-bf16"),
    pytest.param(5, 123, 100, 100, torch.float32, True, 0.0, id="dense-k=n"),
    pytest.param(8, 64, 150, 90, torch.bfloat16, False, -3.0, id="dense-few-positive-nonorm"),
]


@pytest.mark.parametrize("n_tokens,d_model,d_sae,k,dtype,with_norm,bias_shift", ENCODE_CASES)
def test_encode_select(n_tokens, d_model, d_sae, k, dtype, with_norm, bias_shift):
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


@pytest.mark.parametrize("k", [7, 70], ids=["fused", "dense"])
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
    return vals, idx.to(DEVICE), W


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
    vals = _randn(n_tokens, k, g=g, dtype=dtype)
    Y = _randn(n_tokens, d_model, g=g, dtype=dtype)
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
