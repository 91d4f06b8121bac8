"""TopKSAE: initialisation, the forward pieces against float64 formulas, folding, JumpReLU, errors."""
import math

import pytest
import torch

from helpers import BACKENDS, assert_close
from sae_kernels import SAEConfig, TopKSAE


def random_sae(d=37, n=100, k=5, weighted=True, norm_in=1.7, norm_out=0.6, seed=0, dtype="float64"):
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_model=d, d_sae=n, k=k, weighted_topk=weighted, norm_in=norm_in,
                            norm_out=norm_out, dtype=dtype))
    with torch.no_grad():  # away from the init: biases, decoder rows of different norms
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()
        sae.W_dec.mul_(torch.rand(n, 1, dtype=sae.W_dec.dtype) * 2 + 0.2)
        sae.W_enc.add_(torch.randn_like(sae.W_enc) * 0.1)
    return sae


def formula(sae, x, k=None):
    """SPEC sec. 2 written out in float64: returns (f dense, x_hat raw)."""
    c = sae.cfg
    k = c.k if k is None else k
    W_enc, b_enc, W_dec, b_dec = (t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    z = torch.relu(c.norm_in * x.double() @ W_enc.t() + b_enc)
    score = z * W_dec.norm(dim=1) if c.weighted_topk else z
    if c.activation == "topk":
        keep = torch.zeros_like(z, dtype=torch.bool).scatter(-1, score.topk(k, dim=-1).indices, True)
    else:
        keep = score > sae.threshold.double()
    f = z * keep
    return f, (f @ W_dec + b_dec) / c.norm_out


def test_init_follows_llama_scope():
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(d_model=48, d_sae=200, k=8))
    norms = sae.W_dec.detach().norm(dim=1)
    assert_close(norms, torch.full_like(norms, 0.5), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert sae.b_enc.abs().sum() == 0 and sae.b_dec.abs().sum() == 0
    torch.manual_seed(1)
    tc = TopKSAE(SAEConfig(d_model=48, d_sae=200, k=8), transcoder=True)
    assert not torch.equal(tc.W_enc, tc.W_dec)
    assert_close(tc.W_enc.detach().norm(dim=1), torch.full((200,), 0.5), atol=1e-6)
    assert sae.W_dec.shape == (200, 48)  # latent-major


@pytest.mark.parametrize("weighted", [True, False])
def test_forward_pieces_match_formula(weighted):
    sae = random_sae(weighted=weighted)
    x = torch.randn(3, 4, 37, dtype=torch.float64)
    f, x_hat = formula(sae, x)
    assert_close(sae.encode(x), f, 1e-10, "encode")
    values, indices = sae.encode_sparse(x)
    assert values.shape == (3, 4, 5) and indices.shape == (3, 4, 5)
    assert_close(torch.zeros_like(f).scatter(-1, indices, values), f, 1e-10, "encode_sparse")
    assert_close(sae.decode_sparse(values, indices), x_hat, 1e-10, "decode_sparse")
    assert_close(sae.decode(f), x_hat, 1e-10, "decode")
    assert_close(sae(x), x_hat, 1e-10, "forward")
    f3, x_hat3 = formula(sae, x, k=11)
    assert_close(sae(x, k=11), x_hat3, 1e-10, "forward with k override")
    assert (sae.encode(x, k=11) > 0).sum(-1).max() <= 11


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_decode_sparse_validates_indices_whatever_check_indices_says(backend):
    """Issue 14.13 where a user meets it: ``TopKSAE.decode_sparse(..., check_indices=False)`` with ids
    out of range (-1, d_sae, 2^40, which once crashed the process on the Triton path) is a ValueError
    naming the indices; the module's own forward (indices straight from its encode) still works."""
    sae = random_sae(dtype="float32")
    x = torch.randn(4, 37, generator=torch.Generator().manual_seed(3))
    values, indices = sae.encode_sparse(x)
    want = sae.decode_sparse(values, indices)
    for bad_id in (-1, 100, 2 ** 40):
        bad = indices.clone()
        bad[2, 1] = bad_id
        for flag in (True, False):
            with pytest.raises(ValueError, match=r"indices: expected values in \[0, 100\)"):
                sae.decode_sparse(values, bad, check_indices=flag)
    assert_close(sae(x), want, 1e-6, "forward after the rejected calls")
    assert_close(sae.decode_sparse(values, indices.clone(), check_indices=False), want, 1e-6, "checked copy")


def test_weighting_changes_selection():
    """The test data must be able to tell weighted from plain TopK, or the tests above prove little."""
    sae = random_sae(weighted=True)
    x = torch.randn(64, 37, dtype=torch.float64)
    plain = random_sae(weighted=False)
    assert not torch.equal(sae.encode(x) > 0, plain.encode(x) > 0)


def test_fold_dataset_norm_and_decoder_norm_preserve_outputs():
    sae = random_sae()
    x = torch.randn(50, 37, dtype=torch.float64)
    want_f, want = formula(sae, x)
    folded = sae.folded()
    assert folded.cfg.norm_in == 1.0 and folded.cfg.norm_out == 1.0 and not folded.cfg.weighted_topk
    assert_close(folded.W_dec.detach().norm(dim=1), torch.ones(100, dtype=torch.float64), 1e-12, "unit rows")
    assert_close(folded(x), want, 1e-10, "folded forward")
    # folded latents are the Llama Scope inference activations h' = z * n / s_out
    n = sae.W_dec.detach().norm(dim=1)
    assert_close(folded.encode(x), want_f * n / sae.cfg.norm_out, 1e-10, "folded latents")
    with pytest.raises(ValueError, match="weighted_topk=True"):
        random_sae(weighted=False).fold_decoder_norm()


@pytest.mark.parametrize("weighted", [True, False])
def test_jumprelu_gate_uses_the_weighted_score(weighted):
    sae = random_sae(weighted=weighted)
    sae.cfg = sae.cfg.replace(activation="jumprelu")
    sae.threshold.copy_(torch.rand(100) * 0.5)
    x = torch.randn(40, 37, dtype=torch.float64)
    f, x_hat = formula(sae, x)
    assert_close(sae.encode(x), f, 1e-10, "jumprelu encode")
    assert_close(sae(x), x_hat, 1e-10, "jumprelu forward")
    values, indices = sae.encode_sparse(x)
    assert_close(torch.zeros_like(f).scatter(-1, indices, values), f, 1e-10, "jumprelu encode_sparse")
    # Folding keeps the gate exactly where the method puts it.
    assert_close(sae.folded()(x), x_hat, 1e-10, "folded jumprelu")


@pytest.mark.parametrize("weighted", [True, False])
def test_to_jumprelu(weighted):
    sae = random_sae(weighted=weighted)
    acts = torch.randn(300, 37, dtype=torch.float64)
    k = 6
    jr = sae.to_jumprelu(acts, k=k, batch_size=70)
    assert jr.cfg.activation == "jumprelu" and jr.cfg.k == k
    assert jr.cfg.norm_in == 1.0 and jr.cfg.norm_out == 1.0
    # theta is the (N*k)-th largest folded pre-activation, computed here by a full sort
    folded = sae.folded()
    h = torch.relu(acts @ folded.W_enc.detach().t() + folded.b_enc.detach()).reshape(-1)
    theta = torch.sort(h, descending=True).values[300 * k - 1]
    assert torch.all(jr.threshold == jr.threshold[0])
    assert abs(float(jr.threshold[0]) - float(theta)) <= 1e-6 * float(theta)
    l0 = (jr.encode(acts) > 0).sum(-1).double().mean()
    assert abs(float(l0) - k) <= 1.0 / 300 + 1e-12, f"mean L0 {float(l0)} on the calibration batch, want {k}"
    assert sae.cfg.activation == "topk", "to_jumprelu must not modify the source SAE"


def test_bf16_module_matches_formula_on_rounded_weights():
    sae = random_sae(dtype="bfloat16")
    x = torch.randn(64, 37).bfloat16()
    out = sae(x)
    assert out.dtype == torch.bfloat16
    values, indices = sae.encode_sparse(x)
    f, want = formula(sae, x)  # float64 on the bf16 weights; selection may differ only at near-ties
    chosen = torch.zeros_like(f, dtype=torch.bool).scatter(-1, indices, True)
    rows = (chosen == (f > 0)).all(-1) | ((f > 0).sum(-1) < sae.cfg.k)
    assert rows.float().mean() > 0.8, "bf16 selection differs from float64 on most rows"
    assert_close(out[rows], want[rows], 3e-2, "bf16 forward")


@pytest.mark.parametrize("kwargs,msg", [
    (dict(d_model=0, d_sae=8), "d_model: expected a positive int"),
    (dict(d_model=8, d_sae=8, k=9), "k: expected 1 <= k <= d_sae"),
    (dict(d_model=8, d_sae=8, k=2, activation="relu"), "activation: expected one of"),
    (dict(d_model=8, d_sae=8, k=2, dtype="int8"), "dtype: expected one of"),
    (dict(d_model=8, d_sae=8, k=2, norm_in=-1.0), "norm_in: expected a finite positive"),
    (dict(d_model=8, d_sae=8, k=2, norm_out=math.inf), "norm_out: expected a finite positive"),
    (dict(d_model=8, d_sae=8, k=2, position="X"), "position: expected one of"),
    (dict(d_model=8, d_sae=8, k=2, layer=-2), "layer: expected a non-negative int"),
])
def test_config_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SAEConfig(**kwargs)


def test_module_rejects_bad_input():
    sae = random_sae(dtype="float32")
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 37\]"):
        sae(torch.randn(4, 36))
    with pytest.raises(ValueError, match="k: expected 1 <= k <= d_sae=100"):
        sae(torch.randn(4, 37), k=101)
    with pytest.raises(ValueError, match="k: expected 1 <= k"):
        sae.encode_sparse(torch.randn(4, 37), k=0)
    with pytest.raises(ValueError, match=r"f: expected shape \[\.\.\., 100\]"):
        sae.decode(torch.randn(4, 99))
    with pytest.raises(ValueError, match="activations: expected shape"):
        sae.to_jumprelu(torch.randn(10, 36), k=3)
    with pytest.raises(ValueError, match="x: expected a torch.Tensor"):
        sae([1.0] * 37)
    with pytest.raises(ValueError, match="x: expected finite values"):
        sae(torch.full((2, 37), float("inf")))
    with pytest.raises(ValueError, match="cfg: expected an SAEConfig"):
        TopKSAE({"d_model": 4, "d_sae": 8})


def test_k_may_be_any_integer_type():
    """Issue 14.12: numpy and torch integers are integers; floats and bools are not."""
    np = pytest.importorskip("numpy")
    sae = random_sae(k=np.int64(5))
    assert sae.cfg.k == 5 and type(sae.cfg.k) is int
    assert SAEConfig(d_model=np.int32(8), d_sae=torch.tensor(16), k=torch.tensor(3, dtype=torch.int16)).k == 3
    assert SAEConfig(d_model=8, d_sae=16, k=4, layer=np.int64(2)).layer == 2
    x = torch.randn(6, 37, dtype=torch.float64)
    _, want = formula(sae, x, k=3)
    for k in (np.int64(3), np.int8(3), torch.tensor(3), torch.tensor([3])):
        assert_close(sae(x, k=k), want, 1e-10, f"k={k!r}")
    for bad in (3.0, True, np.float64(3.0), torch.tensor(3.0), "3"):
        with pytest.raises(ValueError, match="k: expected an int"):
            sae(x, k=bad)
    with pytest.raises(ValueError, match="k: expected a positive int"):
        SAEConfig(d_model=8, d_sae=16, k=2.0)


def test_to_jumprelu_refuses_nan_activations():
    sae = random_sae()
    acts = torch.randn(50, 37, dtype=torch.float64)
    acts[7, 3] = float("nan")
    with pytest.raises(ValueError, match="activations: expected finite values"):
        sae.to_jumprelu(acts, k=4)


def test_device_and_dtype_properties():
    sae = random_sae(dtype="float32")
    assert sae.device == torch.device("cpu") and sae.dtype == torch.float32
    sae.to(torch.float64)
    assert sae.dtype == torch.float64 and sae.threshold.dtype == torch.float64


@pytest.mark.parametrize("weighted,activation", [(True, "topk"), (False, "topk"), (True, "jumprelu"), (False, "jumprelu")])
def test_to_saebench_contract(monkeypatch, weighted, activation):
    """Issue 14.3, without sae_bench installed (its fields are checked against the real class in
    test_interop.py): W_enc [d_in, d_sae], unit-norm decoder rows, device/dtype attributes, cfg
    fields; encode/decode equal the folded SAE (for a plain SAE with non-unit decoder rows: latents
    scaled by the row norms, same selection, same reconstruction)."""
    import importlib.util

    from sae_kernels import saebench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sae_bench" else real(name, *a))
    sae = random_sae(weighted=weighted)
    if activation == "jumprelu":
        sae.cfg = sae.cfg.replace(activation="jumprelu")
        sae.threshold.copy_(torch.rand(100, dtype=torch.float64) * 0.5)
    sae.cfg = sae.cfg.replace(model_name="gpt2", hook_point_in="blocks.5.hook_resid_post",
                              hook_point_out="blocks.5.hook_resid_post")
    a = sae.to_saebench()
    assert isinstance(a.cfg, saebench.SAEBenchConfig)
    c = a.cfg
    assert (c.model_name, c.d_in, c.d_sae, c.hook_layer, c.hook_name) == ("gpt2", 37, 100, 5, "blocks.5.hook_resid_post")
    assert c.architecture == activation and c.dtype == "float64" and c.device == "cpu"
    assert c.apply_b_dec_to_input is False and c.normalize_activations == "none"
    assert isinstance(a.W_enc, torch.nn.Parameter) and a.W_enc.shape == (37, 100) and a.W_dec.shape == (100, 37)
    assert a.b_enc.shape == (100,) and a.b_dec.shape == (37,)
    assert a.check_decoder_norms()
    assert a.device == torch.device("cpu") and a.dtype == torch.float64
    x = torch.randn(2, 30, 37, dtype=torch.float64)  # SAEBench passes [B, L, d_in] too
    folded = sae.folded()
    want_f = folded.encode(x)
    if not weighted:  # the plain SAE's rows are not unit-norm: SAEBench sees latents * row norm
        want_f = want_f * folded.W_dec.detach().norm(dim=1)
    assert_close(a.encode(x), want_f, 1e-10, "encode")
    assert_close(a.decode(want_f), folded(x), 1e-10, "decode")
    assert_close(a(x), sae(x), 1e-10, "forward")
    a.to(dtype=torch.float32)
    assert a.dtype == torch.float32 and a.cfg.dtype == "float32" and a.W_enc.dtype == torch.float32
    with pytest.raises(ValueError, match="model_name: SAEBench needs"):
        random_sae().to_saebench(hook_layer=3)
    with pytest.raises(ValueError, match="hook_layer: SAEBench needs"):
        random_sae().to_saebench(model_name="gpt2")
    assert random_sae().to_saebench("gpt2", hook_layer=3).cfg.hook_name == "blocks.3.hook_resid_post"
