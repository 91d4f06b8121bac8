"""The PyTorch path (``sae_kernels.reference``) against float64 dense math.

The four primitives one by one, then the whole SAE (``topk_encode`` + ``sparse_decode`` forced onto the
torch backend) against ``dense_topk_sae`` in float64 on the dtype-rounded inputs, selection fixed to
the path's indices after they are checked to be a valid top-k. Also: the per-thread caches the CPU
path keeps (encode scratch, latent CSR) never return stale results, and scatter_outer is bitwise
deterministic, across calls and thread counts.
"""
import pytest
import torch

from helpers import DTYPE_TOLS, assert_close
from sae_kernels import sparse_decode, topk_encode
from sae_kernels import reference as R
from sae_kernels.reference import dense_topk_sae

DTYPES = DTYPE_TOLS + [(torch.float64, 1e-10)]

# (N tokens, d_model, d_sae, k): one token; k = 1; k = 7; k = d_sae; k = d_model / 2 (K-annealing).
SHAPES = [(1, 123, 1000, 7), (64, 123, 1000, 1), (37, 123, 1000, 7), (9, 40, 50, 50), (96, 123, 1000, 61)]


def make(N, d, n, dtype, seed=0, few_positive=True):
    """Inputs in ``dtype``; with ``few_positive`` row 0 has only 3 positive pre-activations (< most k)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    W_enc = torch.randn(n, d, generator=g) / d**0.5
    b_enc = torch.randn(n, generator=g) * 0.3
    W_dec = torch.randn(n, d, generator=g) / d**0.5 * (0.5 + torch.rand(n, 1, generator=g))  # norms differ
    b_dec = torch.randn(d, generator=g)
    if few_positive:
        x[0] = 0
        b_enc = -b_enc.abs() - 0.1
        b_enc[torch.randperm(n, generator=g)[:3]] = 1.0
    return [t.to(dtype) for t in (x, W_enc, b_enc, W_dec, b_dec)]


def check_selection(x, W_enc, b_enc, dec_norm, k, values, indices, tol):
    """Distinct in-range indices per row, each selected score within tol of the k-th best score, and
    values equal to relu(pre) at the selection (checked in float64)."""
    N, n = x.shape[0], W_enc.shape[0]
    assert indices.shape == values.shape == (N, k) and indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) < n, "index out of range"
    dup = int((indices.sort(1).values.diff(dim=1) == 0).sum())
    assert dup == 0, f"{dup} repeated indices within rows"
    z = torch.relu(x.double() @ W_enc.double().t() + b_enc.double())
    score = z if dec_norm is None else z * dec_norm.double()
    kth = score.topk(k, dim=1).values[:, -1:]
    scale = score.abs().max().clamp_min(1e-30)
    bad = int((score.gather(1, indices) < kth - tol * scale).sum())
    assert bad == 0, f"{bad}/{indices.numel()} selected latents score below the k-th best (tol {tol:g})"
    assert_close(values, z.gather(1, indices), tol, "values vs relu(pre) at the selection")


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("N,d,n,k", SHAPES)
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "plain"])
def test_sae_forward_backward_vs_dense_float64(monkeypatch, N, d, n, k, dtype, tol, weighted):
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "torch")
    x, W_enc, b_enc, W_dec, b_dec = (t.requires_grad_() for t in make(N, d, n, dtype))
    grad = torch.randn(N, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    dec_norm = W_dec.detach().double().norm(dim=1).to(dtype) if weighted else None

    values, indices = topk_encode(x, W_enc, b_enc, k, dec_norm)
    check_selection(x.detach(), W_enc.detach(), b_enc.detach(), dec_norm, k, values.detach(), indices, tol)
    n_pos = int((values[0] > 0).sum())
    assert n_pos == min(3, k), f"row 0 has 3 positive pre-activations: expected {min(3, k)} kept, got {n_pos}"
    x_hat = sparse_decode(values, indices, W_dec, b_dec)
    x_hat.backward(grad)

    ref = [t.detach().double().requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]
    want, _, _ = dense_topk_sae(*ref, k, weighted=weighted, indices=indices)
    want.backward(grad.double())
    assert_close(x_hat, want, tol, "x_hat")
    for name, got, w in zip(("x", "W_enc", "b_enc", "W_dec", "b_dec"), (x, W_enc, b_enc, W_dec, b_dec), ref):
        assert_close(got.grad, w.grad, tol, f"grad {name}")


def _rand_sel(N, n, k, seed, dup=False):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(N)])
    if dup and k > 1:
        idx[:, 1] = idx[:, 0]  # the same latent twice in a row: contributions add up
    vals = torch.rand(N, k, generator=g) + 0.1
    return vals, idx


@pytest.mark.parametrize("dtype,tol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("N,d,n,k", [(1, 123, 1000, 7), (50, 123, 1000, 1), (33, 123, 300, 300), (40, 64, 129, 13)])
@pytest.mark.parametrize("dup", [False, True], ids=["distinct", "repeated"])
def test_primitives_vs_float64(N, d, n, k, dtype, tol, dup):
    vals, idx = _rand_sel(N, n, k, seed=N + k, dup=dup)
    g = torch.Generator().manual_seed(7)
    W = (torch.randn(n, d, generator=g) / d**0.5).to(dtype)
    Y = torch.randn(N, d, generator=g).to(dtype)
    v = vals.to(dtype)
    W64, Y64, v64 = W.double(), Y.double(), v.double()

    got = R.gather_rows(v, idx, W)
    assert got.dtype == dtype
    assert_close(got, torch.einsum("tj,tjd->td", v64, W64[idx]), tol, "gather_rows")

    got = R.gather_dot(Y, idx, W)
    assert got.dtype == dtype
    assert_close(got, torch.einsum("td,tjd->tj", Y64, W64[idx]), tol, "gather_dot")

    dW, dsum = R.scatter_outer(v, idx, Y, n, with_sum=True)
    outer = (v64[:, :, None] * Y64[:, None]).reshape(-1, d)  # fine at these sizes: the float64 ground truth
    want = torch.zeros(n, d, dtype=torch.float64).index_add_(0, idx.reshape(-1), outer)
    want_sum = torch.zeros(n, dtype=torch.float64).index_add_(0, idx.reshape(-1), v64.reshape(-1))
    assert dW.dtype == dtype and dsum.dtype == dtype
    assert_close(dW, want, tol, "scatter_outer dW")
    assert_close(dsum, want_sum, tol, "scatter_outer sums")
    assert R.scatter_outer(v, idx, Y, n, with_sum=False)[1] is None


def test_encode_select_rows_with_few_positives_and_k_equal_n():
    x, W_enc, b_enc, W_dec, _ = make(5, 40, 50, torch.float32)
    dec_norm = W_dec.norm(dim=1)
    values, indices = R.encode_select(x, W_enc, b_enc, 50, dec_norm)  # k = d_sae: every latent
    assert torch.equal(indices.sort(1).values, torch.arange(50).expand(5, 50))
    values, indices = R.encode_select(x, W_enc, b_enc, 7, dec_norm)
    check_selection(x, W_enc, b_enc, dec_norm, 7, values, indices, 1e-4)
    assert int((values[0] > 0).sum()) == 3, "row 0: exactly its 3 positive latents keep a value"


def test_encode_scratch_reuse_across_shapes_and_dtypes():
    # The CPU scratch is reused by smaller calls and replaced by larger or other-dtype ones: results
    # must not depend on what an earlier call left in it.
    R.release_scratch()
    for N, n, dtype in [(64, 300, torch.float32), (8, 100, torch.float32), (70, 310, torch.float32),
                        (16, 200, torch.bfloat16), (64, 300, torch.float32)]:
        x, W_enc, b_enc, W_dec, _ = make(N, 32, n, dtype, seed=N, few_positive=False)
        dec_norm = W_dec.float().norm(dim=1).to(dtype)
        values, indices = R.encode_select(x, W_enc, b_enc, 5, dec_norm)
        check_selection(x, W_enc, b_enc, dec_norm, 5, values, indices, dict(DTYPE_TOLS)[dtype])
    R.release_scratch()


def test_latent_csr_cache_is_never_stale():
    vals, idx = _rand_sel(40, 60, 6, seed=3)
    Y = torch.randn(40, 16)
    first, _ = R.scatter_outer(vals, idx, Y, 60, False)
    idx[:, 0] = (idx[:, 0] + 1) % 60  # in place: a cached map of the old indices must not be used
    second, _ = R.scatter_outer(vals, idx, Y, 60, False)
    R.release_scratch()
    fresh, _ = R.scatter_outer(vals, idx, Y, 60, False)
    assert not torch.equal(first, second)
    assert torch.equal(second, fresh), "scatter_outer after an in-place index update used a stale CSR map"
    view = idx.view(-1).view(40, 6)  # another tensor object over the same memory: same map, same bits
    assert torch.equal(R.scatter_outer(vals, view, Y, 60, False)[0], fresh)


def test_scatter_outer_is_deterministic():
    # Large enough that every latent collects ~400 entries and the work is split over threads.
    vals, idx = _rand_sel(4096, 256, 24, seed=11)
    Y = torch.randn(4096, 96, generator=torch.Generator().manual_seed(12))
    runs = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (threads, 1, threads):
            torch.set_num_threads(n_threads)
            R.release_scratch()  # rebuild the latent map each time
            runs.append(R.scatter_outer(vals, idx.clone(), Y, 256, True))
    finally:
        torch.set_num_threads(threads)
    for i, (dW, dsum) in enumerate(runs[1:], 1):
        ndiff = int((dW != runs[0][0]).sum()) + int((dsum != runs[0][1]).sum())
        assert ndiff == 0, f"run {i}: {ndiff} entries differ bitwise from run 0"


def test_latent_csr_contract():
    # Entries of latent i are order[crow[i]:crow[i+1]], in increasing position (the summation order).
    R.release_scratch()
    _, idx = _rand_sel(300, 40, 9, seed=5, dup=True)
    crow, order, token = R.latent_csr(idx, 45)  # 5 latents never selected: empty rows
    flat = idx.reshape(-1)
    assert crow.shape == (46,) and int(crow[0]) == 0 and int(crow[-1]) == flat.numel()
    assert torch.equal(crow.diff(), torch.bincount(flat, minlength=45))
    key = flat[order] * flat.numel() + order
    assert bool((key.diff() > 0).all()), "entries not grouped by latent in increasing position"
    assert torch.equal(token, order // 9)


@pytest.mark.parametrize("n_rows", [1, 45, 4608, 65534, 65535, 70001])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_latent_csr_against_a_plain_loop(n_rows, dtype):
    """The CPU's radix route (NumPy, up to 65534 latents) and the sort route above it give the map a
    plain loop gives, ids out of range (which the public ops refuse) left out of every latent."""
    g = torch.Generator().manual_seed(n_rows)
    N, k = 37, 7
    idx = torch.randint(0, n_rows, (N, k), generator=g)
    idx[3, 2], idx[5, 0], idx[8, 6] = -1, n_rows, n_rows + 70000  # out of range, in every form
    idx[9] = idx[10]  # duplicate rows: the same latents at several tokens
    idx = idx.to(dtype)
    R.release_scratch()
    crow, order, token = R.latent_csr(idx, n_rows)
    flat = idx.reshape(-1).tolist()
    assert crow.shape == (n_rows + 1,)
    rows = {}
    for pos, i in enumerate(flat):
        if 0 <= i < n_rows:
            rows.setdefault(i, []).append(pos)
    for i in set(rows) | {0, n_rows - 1}:
        got = order[int(crow[i]):int(crow[i + 1])].tolist()
        assert got == rows.get(i, []), f"latent {i}"
    assert int(crow[-1]) - int(crow[0]) == sum(len(v) for v in rows.values())
    assert torch.equal(token, order // k)
