"""The trainer's paths of the SAE variants (docs/method.md sec. 11) against their float64 reference:
BatchTopK's exact batch selection (radix threshold, ties, saturated candidates), and every gradient of
``batchtopk``, ``matryoshka_batchtopk`` and ``standard`` through ``SAEStep`` on odd shapes."""
import pytest
import torch

from sae_kernels import SAEConfig, TopKSAE
from sae_kernels import reference as R
from trainer.parallel import ParallelContext
from trainer.parallel.batch_select import bits_to_float, batch_select, batch_threshold, score_bits
from trainer.train import SAEStep, StepConfig

F64 = torch.float64


def _scores(N, n, kind, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    s = torch.relu(torch.randn(N, n, generator=g, dtype=dtype))
    if kind == "ties":
        s = (s * 2).round() / 2
    if kind == "nan":
        s.view(-1)[torch.randperm(N * n, generator=g)[: max(1, N * n // 7)]] = float("nan")
    if kind == "zeros":
        s[:, : n // 2] = 0.0
    return s


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("N,n,k", [(1, 1, 1), (7, 13, 3), (5, 97, 11), (33, 64, 1), (4, 9, 9)])
@pytest.mark.parametrize("kind", ["random", "ties", "nan", "zeros"])
def test_batch_select_over_every_latent_is_the_reference(N, n, k, kind, dtype):
    s = _scores(N, n, kind, N * 100 + n + k, dtype)
    ctx = ParallelContext()
    row = torch.arange(N).repeat_interleave(n)
    keep, T = batch_select(ctx, score_bits(s).reshape(-1), row, torch.arange(n).repeat(N), N, k * N)
    want = R.batch_topk_mask(s, k)
    assert torch.equal(keep.view(N, n), want)
    kept = s[want]
    th = kept[~kept.isnan()].min() if bool((~kept.isnan()).any()) else kept.min()  # NaN ranks above numbers
    got = bits_to_float(T, dtype)
    assert (got.isnan() and th.isnan()) or float(got) == float(th)


def test_radix_threshold_counts_ties():
    s = torch.tensor([[3.0, 1.0, 2.0, 2.0], [2.0, 0.0, 5.0, 2.0]])
    T, need = batch_threshold(ParallelContext(), score_bits(s), 4)  # 5, 3, then two of the four 2.0
    assert float(T.to(torch.int32).reshape(1).view(torch.float32)) == 2.0 and int(need) == 2


def make_step(arch, d=7, n=37, k=3, dtype=F64, **kw):
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(d, n, k=k, dtype="float64" if dtype == F64 else "float32"))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.2)
        sae.W_dec.mul_(torch.rand(n, 1, dtype=dtype) + 0.5)  # unequal decoder norms: the weighting matters

    grads = {}

    class Capture(torch.optim.SGD):  # records the step's gradients, changes nothing
        def step(self, closure=None):
            for name, p in zip(("W_enc", "b_enc", "W_dec", "b_dec"), self.param_groups[0]["params"]):
                grads[name] = p.grad.detach().clone()

    opt = Capture([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], lr=1e-3)
    sc = StepConfig(k=k, k_start=k, total_steps=50, anneal_steps=0, warmup_steps=0, decay_fraction=0.2, lr=1e-3,
                    clip_grad_norm=0.0, architecture=arch, **kw)
    return SAEStep(sae, opt, sc), sae, grads


@pytest.mark.parametrize("loss", ["llama_scope", "fvu"])
@pytest.mark.parametrize("arch,kw", [
    ("topk", {}),
    ("batchtopk", {}),
    ("matryoshka_batchtopk", {"matryoshka_widths": (5, 16, 37)}),
    ("standard", {"l1_coefficient": 0.3, "l1_warmup_steps": 8}),
])
def test_every_gradient_of_every_architecture_against_float64(arch, kw, loss):
    step, sae, grads = make_step(arch, loss=loss, **kw)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(29, 7, generator=g) * 1.5 + 0.3).double()  # fp32 values: the step reads targets in fp32
    params = [p.detach().clone().requires_grad_(True) for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    t = 3
    out = step(x, None, t)
    W_enc, b_enc, W_dec, b_dec = params
    x_hats, f, mask = R.dense_variant_sae(x, W_enc, b_enc, W_dec, b_dec, arch, k=3, prefixes=kw.get("matryoshka_widths"))
    l1 = R.l1_coefficient_at(t, kw.get("l1_coefficient", 0.0), kw.get("l1_warmup_steps", 0))
    ref = R.variant_loss(x_hats, x, x.mean(0, keepdim=True), loss=loss, f=f,
                         dec_norm=W_dec.norm(dim=1), l1=l1 if arch == "standard" else 0.0)
    ref.backward()
    assert float(out["loss"]) == pytest.approx(float(ref.detach()), rel=1e-10)
    for name, p in zip(("W_enc", "b_enc", "W_dec", "b_dec"), params):
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=f"{arch} {name}")
    assert float(out["l0"]) == pytest.approx(float(mask.sum(1).double().mean() if arch != "standard"
                                                   else (f > 0).sum(1).double().mean()))
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        with torch.no_grad():
            score = torch.relu(x @ W_enc.t() + b_enc) * W_dec.norm(dim=1)
        assert int(mask.sum()) == 3 * 29 and float(out["threshold"]) == pytest.approx(
            float(R.batch_topk_threshold(score, mask)))


def test_batchtopk_candidates_grow_when_a_token_holds_many_latents():
    """The encode's K candidates per token do not hold a token that keeps more: its candidates double
    (twice here) until the threshold is below its smallest; the selection stays the reference's."""
    step, sae, grads = make_step("batchtopk", n=37, k=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(17, 7, generator=g, dtype=F64)
    x[4] *= 40.0  # one token's scores dwarf the rest: it keeps far more than 2 x K latents
    params = [p.detach().clone().requires_grad_(True) for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    _, _, mask = R.dense_variant_sae(x, *params, "batchtopk", k=2)
    assert int(mask[4].sum()) > 4
    step(x, None, 0)
    assert step.slots == int(mask.sum(1).max())
    counts = torch.zeros(37, dtype=torch.int64)
    counts += mask.sum(0)
    assert torch.equal(step.fire_count, counts)


def test_batchtopk_threshold_estimate_is_the_bias_corrected_ema_after_annealing():
    """The inference threshold: an EMA (decay 0.99) of the steps' thresholds from the end of K-annealing
    on, bias-corrected; the exported SAE is JumpReLU at it, and fires about K latents per token."""
    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(16, 64, k=4))
    from trainer.train import make_optimizer

    opt = make_optimizer(sae, 1e-3, (0.9, 0.9999))
    sc = StepConfig(k=4, k_start=12, total_steps=40, anneal_steps=10, warmup_steps=2, decay_fraction=0.2, lr=1e-3,
                    clip_grad_norm=1e-3, architecture="batchtopk")
    step = SAEStep(sae, opt, sc)
    g = torch.Generator().manual_seed(0)
    seen = []
    for t in range(25):
        out = step(torch.randn(64, 16, generator=g), None, t)
        seen.append((t, float(out["threshold"])))
    ema, n = 0.0, 0
    for t, th in seen:
        if t >= 10:
            ema, n = 0.99 * ema + 0.01 * th, n + 1
    assert step.threshold() == pytest.approx(ema / (1 - 0.99 ** n), rel=1e-9)
    assert step.threshold() == pytest.approx(sum(th for t, th in seen if t >= 10) / 15, rel=0.05)
    full = step.full_sae()
    assert full.cfg.activation == "jumprelu" and float(full.threshold[0]) == pytest.approx(step.threshold(), rel=1e-6)
    x = torch.randn(512, 16, generator=g)
    l0 = float((full.encode(x) > 0).sum(1).double().mean())
    assert 2 < l0 < 8, l0


@pytest.mark.parametrize("kept", [True, False])
def test_take_and_row_scores_with_and_without_kept_pre_activations(kept):
    """``EncodeScores.take``: relu(pre) at given entries with the encode's gradients (from the kept
    pre-activations, or a dot product per entry when none were kept, as the fused GPU encode);
    ``row_scores``: a token's every weighted score. Against float64 autograd on odd shapes."""
    from sae_kernels.ops import encode_for_training

    g = torch.Generator().manual_seed(5)
    N, d, n = 11, 7, 29
    x = torch.randn(N, d, generator=g, dtype=F64)
    W = torch.randn(n, d, generator=g, dtype=F64).requires_grad_(True)
    b = torch.randn(n, generator=g, dtype=F64).requires_grad_(True)
    norm = torch.rand(n, generator=g, dtype=F64) + 0.5
    enc = encode_for_training(x, W, b, 3, norm, keep_pre=True)[2]
    if not kept:  # as the fused GPU encode, which materialises no pre-activations
        enc.pre = None
    rows = torch.tensor([7, 0, 3])
    idx = torch.tensor([[1, 28, 5, 5], [0, 2, 3, 4], [27, 9, 11, 0]])
    vals, out_idx = enc.take(rows, idx)
    pre = x @ W.t() + b
    want = pre.relu()[rows[:, None], idx]
    torch.testing.assert_close(vals, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(enc.row_scores(rows), pre.detach().relu()[rows] * norm, rtol=1e-12, atol=1e-12)
    w = torch.randn(vals.shape, generator=g, dtype=F64)
    gW, gb = torch.autograd.grad((vals * w).sum(), (W, b))
    rW, rb = torch.autograd.grad((want * w).sum(), (W, b))
    torch.testing.assert_close(gW, rW, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, rb, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="indices"):
        enc.take(rows, torch.full((3, 1), n))
