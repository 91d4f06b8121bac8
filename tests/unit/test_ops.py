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


# --------------------------------------------------------------------------------------------------
# One NaN semantics, validated inputs, trusted indices, and the trainer's route (both backends).
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_nan_semantics_are_the_same_on_both_backends(backend):
    """With the finite check off, NaN propagates: a NaN input row gives k NaN values at distinct
    in-range latents and a NaN reconstruction row; the other rows are untouched. (The Triton path
    used to return zero codes for such a row, the PyTorch path NaN.)"""
    (x, W_enc, b_enc, W_dec, b_dec), _ = make_inputs(6, 24, 90, torch.float32, 8, few_positive_rows=False)
    x = x.detach().clone()
    x[2, 7] = float("nan")
    values, indices = topk_encode(x, W_enc.detach(), b_enc.detach(), 5, W_dec.detach().norm(dim=1),
                                  check_finite_input=False)
    v, idx = values.cpu(), indices.cpu()
    assert bool(v[2].isnan().all()), f"NaN row gave values {v[2].tolist()}"
    assert not bool(v[[0, 1, 3, 4, 5]].isnan().any())
    assert int(((idx < 0) | (idx >= 90)).sum()) == 0 and all(torch.unique(r).numel() == 5 for r in idx)
    out = sparse_decode(values, indices, W_dec.detach(), b_dec.detach()).cpu()
    assert bool(out[2].isnan().all()) and bool(torch.isfinite(out[[0, 1, 3, 4, 5]]).all())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_negative_decoder_norms_are_rejected_or_safe(backend):
    (x, W_enc, b_enc, _, _), _ = make_inputs(5, 24, 90, torch.float32, 9, few_positive_rows=False)
    x, W_enc, b_enc = x.detach(), W_enc.detach(), b_enc.detach()
    norm = torch.rand(90, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    norm[7] = -0.5
    with pytest.raises(ValueError, match="dec_norm: expected finite values >= 0"):
        topk_encode(x, W_enc, b_enc, 5, norm)
    norm[:] = float("-inf")
    _, idx = topk_encode(x, W_enc, b_enc, 5, norm, check_finite_input=False)
    assert int(((idx < 0) | (idx >= 90)).sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_sparse_decode_has_no_unchecked_path(backend):
    """check_indices=False no longer skips the range check for indices of unknown origin (an id of
    2^40 crashed the process on the Triton path); indices straight from topk_encode are trusted
    (``_trusted``: what ``decode_for_training`` takes) and lose that trust once modified in place;
    the public ``sparse_decode`` range-checks them either way (see the test below)."""
    g = torch.Generator().manual_seed(2)
    W, b = torch.randn(64, 20, generator=g).to(DEVICE), torch.randn(20, generator=g).to(DEVICE)
    v = torch.randn(4, 3, generator=g).to(DEVICE)
    bad = torch.randint(0, 64, (4, 3), generator=g).to(DEVICE)
    bad[1, 2] = 2 ** 40
    for flag in (True, False):
        with pytest.raises(ValueError, match=r"indices: expected values in \[0, 64\)"):
            sparse_decode(v, bad, W, b, check_indices=flag)
    x = torch.randn(4, 20, generator=g).to(DEVICE)
    values, idx = topk_encode(x, W, b.new_zeros(64), 3)
    from sae_kernels.ops import _trusted

    assert _trusted(idx, 64) and not _trusted(idx, 63) and not _trusted(idx.clone(), 64)
    sparse_decode(values, idx, W, b)
    idx[0, 0] = 64  # in place: the version counter moves, the tensor is checked again
    assert not _trusted(idx, 64)
    with pytest.raises(ValueError, match="indices: expected values in"):
        sparse_decode(values, idx, W, b)


def _edit_data(idx, i, value):
    idx.data[0, i] = value


def _edit_numpy(idx, i, value):
    idx.numpy()[0, i] = value


def _edit_from_numpy(idx, i, value):
    torch.from_numpy(idx.numpy())[0, i] = value


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("edit", [_edit_data, _edit_numpy, _edit_from_numpy], ids=["data", "numpy", "from_numpy"])
def test_sparse_decode_checks_encoded_indices_edited_past_the_version_counter(backend, edit):
    """Writes through ``.data``, a ``.numpy()`` view or a ``torch.from_numpy`` round trip change the
    indices ``topk_encode`` returned without moving their version counter: such tensors still look
    trusted, but the public ``sparse_decode`` range-checks them anyway and raises its ValueError on
    both backends (the Triton path silently dropped the id; the PyTorch path must not fail in
    embedding_bag with another error)."""
    g = torch.Generator().manual_seed(21)
    W, b = torch.randn(64, 20, generator=g).to(DEVICE), torch.randn(20, generator=g).to(DEVICE)
    x = torch.randn(4, 20, generator=g).to(DEVICE)
    if edit is not _edit_data and DEVICE != "cpu":
        pytest.skip("numpy views are of CPU tensors")
    for i, bad in ((0, 10 ** 6), (2, 64), (1, -1)):
        values, idx = topk_encode(x, W, b.new_zeros(64), 3)
        want = sparse_decode(values, idx, W, b)  # trusted, in range: decodes
        version = idx._version
        edit(idx, i, bad)
        assert int(idx[0, i]) == bad and idx._version == version  # the counter did not see the write
        with pytest.raises(ValueError, match=r"indices: expected values in \[0, 64\)"):
            sparse_decode(values, idx, W, b)
        edit(idx, i, 5)  # in range again: decodes, with latent 5 at that slot
        fixed = torch.zeros(4, 64, dtype=torch.float64).scatter_add(1, idx.cpu(), values.detach().double().cpu())
        out = sparse_decode(values, idx, W, b)
        assert_close(out, fixed @ W.double().cpu() + b.double().cpu(), 1e-5, "x_hat after an in-range edit")
        assert want.shape == out.shape


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_decode_for_training_takes_only_encoded_indices(backend):
    from sae_kernels.ops import decode_for_training, encode_for_training

    (x, W_enc, b_enc, W_dec, b_dec), _ = make_inputs(4, 24, 90, torch.float32, 10, few_positive_rows=False)
    values, idx = encode_for_training(x.detach(), W_enc, b_enc, 3, None)
    decode_for_training(values, idx, W_dec, b_dec)
    with pytest.raises(ValueError, match="only indices returned by an encode"):
        decode_for_training(values, idx.clone(), W_dec, b_dec)
    with pytest.raises(ValueError, match="only indices returned by an encode"):
        decode_for_training(values, torch.zeros_like(idx), W_dec, b_dec)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("N,d,n,k", [(13, 40, 130, 7), (5, 33, 64, 64)])
def test_training_route_bf16_copies_give_fp32_master_gradients(backend, N, d, n, k):
    """The trainer's route with bf16 compute copies of fp32 masters: the math reads the copies, the
    gradients arrive in fp32 on the masters. With bf16 upstream gradients every product is exact
    in fp32, so they match float64 at fp32 precision (the old differentiable casts produced bf16
    gradients, 2^-9 relative error, then cast them to fp32)."""
    from sae_kernels.ops import decode_for_training, encode_for_training

    (x, W_enc, b_enc, W_dec, b_dec), _ = make_inputs(N, d, n, torch.float32, 11 + k)
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(k)
    We, be, Wd = (t.detach().to(bf) for t in (W_enc, b_enc, W_dec))
    x_n = x.detach().to(bf)
    norm = W_dec.detach().norm(dim=1)
    values, idx = encode_for_training(x_n, W_enc, b_enc, k, norm, compute=(We, be))
    check_selection(x_n.float(), We.float(), be.float(), W_dec, k, True, values.float(), idx, 3e-2)
    gv = torch.randn(N, k, generator=g).to(DEVICE, bf)
    (values.float() * gv.float()).sum().backward()
    out = decode_for_training(values.detach(), idx, W_dec, b_dec, compute=Wd)
    go = torch.randn(N, d, generator=g).to(DEVICE, bf)
    out.backward(go)
    for t in (W_enc, b_enc, W_dec, b_dec):
        assert t.grad is not None and t.grad.dtype == torch.float32
    # float64 from the same bf16 operands
    coef = torch.zeros(N, n, dtype=torch.float64).scatter_(1, idx.cpu(), gv.double().cpu() * (values.cpu() > 0))
    assert_close(W_enc.grad, coef.T @ x_n.double().cpu(), 2e-5, "dW_enc")
    assert_close(b_enc.grad, coef.sum(0), 2e-5, "db_enc")
    f = torch.zeros(N, n, dtype=torch.float64).scatter_(1, idx.cpu(), values.double().cpu())
    assert_close(W_dec.grad, f.T @ go.double().cpu(), 2e-5, "dW_dec")
    assert_close(b_dec.grad, go.double().cpu().sum(0), 2e-5, "db_dec")
    ref = f @ Wd.double().cpu() + b_dec.detach().double().cpu()
    assert_close(out, ref, 3e-2, "x_hat")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_encode_scores_select_equals_a_masked_encode(backend):
    """AuxK from the forward's kept pre-activations (no second GEMM) selects, values and gradients
    as an encode whose disallowed latents are pushed to zero by a -1e30 bias."""
    from sae_kernels.ops import encode_for_training

    (x, W_enc, b_enc, W_dec, _), grad = make_inputs(11, 24, 90, torch.float32, 12, few_positive_rows=False)
    x = x.detach()
    norm = W_dec.detach().norm(dim=1)
    allowed = (torch.rand(90, generator=torch.Generator().manual_seed(3)) < 0.4).to(DEVICE)
    _, _, scores = encode_for_training(x, W_enc, b_enc, 4, norm, keep_pre=True)
    v1, i1 = scores.select(9, allowed)
    g1 = torch.autograd.grad((v1 * grad[:, :9]).sum(), (W_enc, b_enc))
    bias = b_enc + torch.where(allowed, 0.0, -1e30)
    v2, i2 = topk_encode(x, W_enc, bias, 9, norm)
    g2 = torch.autograd.grad((v2 * grad[:, :9]).sum(), (W_enc, b_enc))
    for r in range(11):  # the latents with a positive value agree; zero-valued slots may differ
        a, b_ = i1[r][v1[r] > 0].sort().values, i2[r][v2[r] > 0].sort().values
        assert torch.equal(a, b_), (r, a.tolist(), b_.tolist())
    assert bool(allowed[i1[v1 > 0]].all()), "a disallowed latent has a positive value"
    assert_close(torch.sort(v1, 1).values, torch.sort(v2, 1).values, 1e-5, "values")
    for a, b_ in zip(g1, g2):
        assert_close(a, b_, 1e-5, "gradient")
