"""topk_encode and sparse_decode through autograd, on each backend, against a float64 dense reference.

The Triton backend runs through the interpreter on CPU (TRITON_INTERPRET=1, set in conftest.py).
The reference (`dense_topk_sae`) is evaluated in float64 on the dtype-rounded inputs, with the
selection fixed to the op's indices after those indices are checked to be a valid top-k: near-ties
may legitimately resolve differently across precisions, a wrong selection may not.
"""
import pytest
import torch

from helpers import BACKENDS, DEVICE, DTYPE_TOLS, assert_close
from sae_kernels import sparse_decode, topk_encode
from sae_kernels.reference import dense_topk_sae

# (N tokens, d_model, d_sae, k): odd sizes on purpose; k = 1, k = d_sae, k = d_model / 2 (K-annealing
# start, the large-k path), batch of 1, d_sae not a multiple of any block size.
SHAPES = [
    (1, 123, 300, 7),
    (33, 123, 300, 1),
    (17, 40, 50, 50),
    (12, 96, 260, 48),
    (70, 64, 129, 13),
]


def make_inputs(N, d, n, dtype, seed, few_positive_rows=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    W_enc = torch.randn(n, d, generator=g) / d**0.5
    b_enc = torch.randn(n, generator=g) * 0.5
    W_dec = torch.randn(n, d, generator=g) / d**0.5 * (0.5 + torch.rand(n, 1, generator=g))  # norms differ
    b_dec = torch.randn(d, generator=g)
    if few_positive_rows and N > 1:
        # Row 0 only sees the bias: make just 3 latents positive there, fewer than most k.
        x[0] = 0
        b_enc = -b_enc.abs() - 0.1
        b_enc[torch.randperm(n, generator=g)[:3]] = 1.0
    grad = torch.randn(N, d, generator=g)
    ts = [t.to(DEVICE, dtype) for t in (x, W_enc, b_enc, W_dec, b_dec)]
    return [t.requires_grad_() for t in ts], grad.to(DEVICE, dtype)


def check_selection(x, W_enc, b_enc, W_dec, k, weighted, values, indices, tol):
    """Indices distinct per row, and every selected score within tolerance of the k-th best."""
    x64, We, be, Wd = (t.detach().double().cpu() for t in (x, W_enc, b_enc, W_dec))
    z = torch.relu(x64 @ We.t() + be)
    score = z * Wd.norm(dim=1) if weighted else z
    idx = indices.cpu()
    assert idx.dtype == torch.int64
    assert idx.min() >= 0 and idx.max() < W_enc.shape[0], "index out of range"
    distinct = torch.sort(idx, dim=1).values.diff(dim=1).ne(0).all()
    assert k == 1 or distinct, "repeated latent within a row"
    kth = torch.topk(score, k, dim=1).values[:, -1:]
    chosen = score.gather(1, idx)
    slack = tol * (score.abs().max() + 1e-12)
    bad = chosen < kth - slack
    assert not bad.any(), f"{int(bad.sum())}/{bad.numel()} selected latents score below the k-th best"
    assert_close(values, z.gather(1, idx), tol, "values = relu(pre) at the selected latents")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype,tol", DTYPE_TOLS, ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,d,n,k", SHAPES)
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "plain"])
def test_encode_decode_forward_and_all_gradients(backend, dtype, tol, N, d, n, k, weighted):
    seed = hash((N, d, n, k, weighted, str(dtype))) % 2**31
    (x, W_enc, b_enc, W_dec, b_dec), grad = make_inputs(N, d, n, dtype, seed)
    dec_norm = W_dec.detach().float().norm(dim=1).to(dtype) if weighted else None

    values, indices = topk_encode(x, W_enc, b_enc, k, dec_norm)
    assert values.shape == (N, k) and indices.shape == (N, k) and values.dtype == dtype
    check_selection(x, W_enc, b_enc, W_dec, k, weighted, values, indices, tol)
    out = sparse_decode(values, indices, W_dec, b_dec)
    assert out.shape == (N, d) and out.dtype == dtype
    (out.float() * grad.float()).sum().backward()

    leaves64 = [t.detach().double().cpu().requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]
    x_hat, _, _ = dense_topk_sae(*leaves64, k=k, weighted=weighted, indices=indices.cpu())
    assert_close(out, x_hat, tol, "x_hat")
    (x_hat * grad.double().cpu()).sum().backward()
    for name, got, want in zip(("dx", "dW_enc", "db_enc", "dW_dec", "db_dec"), (x, W_enc, b_enc, W_dec, b_dec), leaves64):
        assert got.grad is not None, f"{name} missing"
        assert got.grad.dtype == dtype, f"{name} dtype {got.grad.dtype}"
        assert_close(got.grad, want.grad, tol, name)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_only_selected_latents_get_gradient(backend):
    (x, W_enc, b_enc, W_dec, b_dec), grad = make_inputs(9, 24, 77, torch.float32, 3, few_positive_rows=False)
    values, indices = topk_encode(x, W_enc, b_enc, 5, None)
    sparse_decode(values, indices, W_dec, b_dec).mul(grad).sum().backward()
    used = torch.zeros(77, dtype=torch.bool)
    used[indices.reshape(-1).cpu()] = True
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec)):
        g = t.grad.cpu().reshape(77, -1)
        assert g[~used].abs().max() == 0, f"{name}: gradient reached unselected latents"
        assert g[used].abs().sum() > 0, f"{name}: no gradient on selected latents"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_decode_repeated_indices_and_leading_dims(backend):
    g = torch.Generator().manual_seed(11)
    W = torch.randn(31, 19, generator=g, dtype=torch.float64).to(DEVICE).float().requires_grad_()
    b = torch.randn(19, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(2, 3, 4, generator=g).to(DEVICE).requires_grad_()
    idx = torch.tensor([[[1, 1, 5, 30]] * 3] * 2, device=DEVICE)
    out = sparse_decode(v, idx, W, b)
    assert out.shape == (2, 3, 19)
    dense = torch.zeros(2, 3, 31, dtype=torch.float64).scatter_add(-1, idx.cpu(), v.detach().double().cpu())
    assert_close(out, dense @ W.detach().double().cpu() + b.detach().double().cpu(), 1e-5, "x_hat")
    out.sum().backward()
    want_dW = dense.reshape(-1, 31).t() @ torch.ones(6, 19, dtype=torch.float64)
    assert_close(W.grad, want_dW, 1e-5, "dW_dec with repeated indices")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_encode_leading_dims_and_deterministic(backend):
    (x, W_enc, b_enc, _, _), _ = make_inputs(12, 20, 64, torch.float32, 5, few_positive_rows=False)
    xb = x.detach().reshape(3, 4, 20)
    v1, i1 = topk_encode(xb, W_enc.detach(), b_enc.detach(), 6)
    v2, i2 = topk_encode(xb, W_enc.detach(), b_enc.detach(), 6)
    assert v1.shape == (3, 4, 6) and i1.shape == (3, 4, 6)
    s1, s2 = torch.sort(i1, -1), torch.sort(i2, -1)
    assert torch.equal(s1.values, s2.values)
    assert torch.equal(v1.gather(-1, s1.indices), v2.gather(-1, s2.indices))


BAD_ENCODE = [
    (lambda x, W, b: (x[:, :-1], W, b, 3), "x: expected shape"),
    (lambda x, W, b: (x, W, b[:-1], 3), "b_enc: expected shape"),
    (lambda x, W, b: (x, W, b, 0), "k: expected 1 <= k"),
    (lambda x, W, b: (x, W, b, 65), "k: expected 1 <= k"),
    (lambda x, W, b: (x, W, b, 2.5), "k: expected an int"),
    (lambda x, W, b: (x.double(), W, b, 3), "x: expected dtype"),
    (lambda x, W, b: (x.long(), W, b, 3), "x: expected dtype in"),
    (lambda x, W, b: (x, W[None], b, 3), "W_enc: expected a 2-D"),
    (lambda x, W, b: ([[1.0]], W, b, 3), "x: expected a torch.Tensor"),
]


@pytest.mark.parametrize("make,msg", BAD_ENCODE)
def test_topk_encode_rejects_bad_input(make, msg):
    x, W, b = torch.randn(4, 20), torch.randn(64, 20), torch.randn(64)
    with pytest.raises(ValueError, match=msg):
        topk_encode(*make(x, W, b))


def test_topk_encode_rejects_nonfinite():
    x = torch.randn(4, 20)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="x: expected finite"):
        topk_encode(x, torch.randn(64, 20), torch.randn(64), 3)
    v, _ = topk_encode(x, torch.randn(64, 20), torch.randn(64), 3, check_finite_input=False)  # opt-out
    assert v.shape == (4, 3)


def test_sparse_decode_rejects_bad_input():
    W, b = torch.randn(64, 20), torch.randn(20)
    v, i = torch.randn(4, 3), torch.randint(0, 64, (4, 3))
    with pytest.raises(ValueError, match="indices: expected values in"):
        sparse_decode(v, i + 64, W, b)
    with pytest.raises(ValueError, match="indices: expected the shape"):
        sparse_decode(v, i[:, :2], W, b)
    with pytest.raises(ValueError, match="indices: expected dtype"):
        sparse_decode(v, i.float(), W, b)
    with pytest.raises(ValueError, match="b_dec: expected shape"):
        sparse_decode(v, i, W, b[:-1])


def test_forced_backend_errors(monkeypatch):
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="SAE_KERNELS_BACKEND must be one of"):
        topk_encode(torch.randn(2, 8), torch.randn(16, 8), torch.randn(16), 2)
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            topk_encode(torch.randn(2, 8), torch.randn(16, 8), torch.randn(16), 2)


def test_float64_takes_the_pytorch_path(monkeypatch):
    from sae_kernels.backend import choose_backend

    assert choose_backend(torch.device("cuda"), torch.float64) in ("torch",) or not torch.cuda.is_available()
    assert choose_backend(torch.device("cpu"), torch.float64) == "torch"
    monkeypatch.setenv("SAE_KERNELS_BACKEND", "triton")
    with pytest.raises(ValueError, match="got float64"):
        topk_encode(torch.randn(2, 8).double(), torch.randn(16, 8).double(), torch.randn(16).double(), 2)


# (N, d_model, d_sae, k, m aux latents, k_aux): k_aux < m, k_aux > m (all m kept), m = 1, m = d_sae.
AUX_SHAPES = [
    (21, 40, 97, 5, 31, 8),
    (9, 33, 64, 7, 5, 12),
    (13, 24, 50, 3, 1, 4),
    (6, 16, 40, 40, 40, 9),
]


# Every case on the PyTorch path; on the Triton path (the main selection by the kernels, the auxiliary
# columns by one GEMM over the aux rows; slow in the interpreter) one shape with k_aux < m, weighted, fp32.
AUX_CASES = [
    pytest.param("torch", dt, tol, *shape, w, id=f"torch-{name}-{'weighted' if w else 'plain'}-{shape}")
    for dt, tol, name in ((*DTYPE_TOLS[0], "fp32"), (*DTYPE_TOLS[1], "bf16"))
    for shape in AUX_SHAPES for w in (True, False)
] + [pytest.param(BACKENDS[1].values[0], *DTYPE_TOLS[0], *AUX_SHAPES[0], True, marks=BACKENDS[1].marks, id="triton-fp32")]


@pytest.mark.parametrize("backend,dtype,tol,N,d,n,k,m,k_aux,weighted", AUX_CASES, indirect=["backend"])
def test_topk_encode_aux_forward_and_all_gradients(backend, dtype, tol, N, d, n, k, m, k_aux, weighted):
    """The main selection is topk_encode's; the auxiliary one, dense over the m given latents, holds
    a valid per-row top-min(k_aux, m) of them (zeros elsewhere); gradients through both equal float64
    dense autograd on the same supports."""
    from sae_kernels.ops import subset_decode, topk_encode_aux

    seed = hash((N, d, n, k, m, k_aux, weighted, str(dtype))) % 2**31
    (x, W_enc, b_enc, W_dec, b_dec), grad = make_inputs(N, d, n, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    aux = torch.randperm(n, generator=g)[:m].to(DEVICE)
    grad_aux = torch.randn(N, d, generator=g).to(DEVICE, dtype)
    dec_norm = W_dec.detach().float().norm(dim=1).to(dtype) if weighted else None

    v, i, a = topk_encode_aux(x, W_enc, b_enc, k, dec_norm, aux_latents=aux, k_aux=k_aux)
    assert a.shape == (N, m) and a.dtype == dtype
    v0, i0 = topk_encode(x.detach(), W_enc.detach(), b_enc.detach(), k, dec_norm)
    assert torch.equal(i.sort(1).values, i0.sort(1).values), "main selection differs from topk_encode"
    check_selection(x, W_enc, b_enc, W_dec, k, weighted, v, i, tol)
    # the auxiliary selection: at most min(k_aux, m) non-zeros per row, each at a valid top-k_aux
    # position of the scores restricted to `aux`, holding relu(pre) there
    ka = min(k_aux, m)
    x64, We, be, Wd = (t.detach().double().cpu() for t in (x, W_enc, b_enc, W_dec))
    z_sub = torch.relu(x64 @ We[aux.cpu()].t() + be[aux.cpu()])
    score = z_sub * Wd[aux.cpu()].norm(dim=1) if weighted else z_sub
    nz = a.detach().cpu() != 0
    assert (nz.sum(1) <= ka).all()
    kth = torch.topk(score, ka, dim=1).values[:, -1:]
    slack = tol * (score.abs().max() + 1e-12)
    assert not (nz & (score < kth - slack)).any(), "an auxiliary latent outside the row's top k_aux"
    assert (nz | (score <= kth + slack) | (score == 0)).all(), "a top-k_aux auxiliary latent was dropped"
    assert_close(a[nz.to(DEVICE)], z_sub[nz], tol, "aux values = relu(pre)")

    out = sparse_decode(v, i, W_dec, b_dec)
    out_aux = subset_decode(a, W_dec, aux)
    ((out.float() * grad.float()).sum() + (out_aux.float() * grad_aux.float()).sum()).backward()

    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]
    x64, We, be, Wd, bd = leaves
    x_hat, _, _ = dense_topk_sae(x64, We, be, Wd, bd, k=k, weighted=weighted, indices=i.cpu())
    z_aux = torch.relu(x64 @ We[aux.cpu()].t() + be[aux.cpu()]) * nz
    x_aux = z_aux @ Wd[aux.cpu()]
    assert_close(out, x_hat, tol, "x_hat")
    assert_close(out_aux, x_aux, tol, "auxiliary reconstruction")
    ((x_hat * grad.double().cpu()).sum() + (x_aux * grad_aux.double().cpu()).sum()).backward()
    for name, got, want in zip(("dx", "dW_enc", "db_enc", "dW_dec", "db_dec"), (x, W_enc, b_enc, W_dec, b_dec), leaves):
        assert got.grad is not None and got.grad.dtype == dtype, name
        assert_close(got.grad, want.grad, tol, name)


@pytest.mark.parametrize("dtype,tol", DTYPE_TOLS, ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,d,n,m", [(17, 23, 61, 29), (5, 9, 7, 1), (3, 40, 12, 12)])
def test_subset_decode_forward_and_gradients(dtype, tol, N, d, n, m):
    """acts @ W_dec[ids] and both gradients (acts; W_dec, zero outside the rows ids) equal float64 autograd."""
    from sae_kernels.ops import subset_decode

    g = torch.Generator().manual_seed(N * 1000 + m)
    acts = torch.relu(torch.randn(N, m, generator=g)).to(DEVICE, dtype).requires_grad_()
    W = torch.randn(n, d, generator=g).to(DEVICE, dtype).requires_grad_()
    ids = torch.randperm(n, generator=g)[:m].to(DEVICE)
    grad = torch.randn(N, d, generator=g).to(DEVICE, dtype)
    out = subset_decode(acts, W, ids)
    (out.float() * grad.float()).sum().backward()
    a64, W64 = (t.detach().double().cpu().requires_grad_() for t in (acts, W))
    want = a64 @ W64[ids.cpu()]
    (want * grad.double().cpu()).sum().backward()
    assert out.dtype == dtype and acts.grad.dtype == dtype and W.grad.dtype == dtype
    assert_close(out, want, tol, "out")
    assert_close(acts.grad, a64.grad, tol, "d_acts")
    assert_close(W.grad, W64.grad, tol, "dW_dec")
    with pytest.raises(ValueError, match="ids: expected an int64"):
        subset_decode(acts, W, ids[:-1] if m > 1 else ids.float())


def test_topk_encode_aux_rejects_bad_input():
    from sae_kernels.ops import topk_encode_aux

    x, W, b = torch.randn(4, 20), torch.randn(64, 20), torch.randn(64)
    with pytest.raises(ValueError, match="aux_latents: expected at least one"):
        topk_encode_aux(x, W, b, 3, aux_latents=torch.empty(0, dtype=torch.int64), k_aux=2)
    with pytest.raises(ValueError, match=r"aux_latents: expected ids in \[0, 64\)"):
        topk_encode_aux(x, W, b, 3, aux_latents=torch.tensor([3, 64]), k_aux=2)
    with pytest.raises(ValueError, match="aux_latents: expected distinct ids"):
        topk_encode_aux(x, W, b, 3, aux_latents=torch.tensor([3, 3]), k_aux=2)
    with pytest.raises(ValueError, match="aux_latents: expected dtype"):
        topk_encode_aux(x, W, b, 3, aux_latents=torch.tensor([1.0]), k_aux=2)
    with pytest.raises(ValueError, match="k_aux: expected an int >= 1"):
        topk_encode_aux(x, W, b, 3, aux_latents=torch.tensor([1, 2]), k_aux=0)
