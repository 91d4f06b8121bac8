"""The float64 reference of the SAE variants (docs/method.md sec. 11): BatchTopK's global selection
and its ties, Matryoshka's prefixes, the standard SAE's L1 penalty and warmup, and the member loss.
The trainer's paths for these architectures will be compared with this reference."""
import pytest
import torch

from sae_kernels import reference as R
from trainer.train import fvu_loss, llama_scope_loss

F64 = torch.float64


def brute_batch_topk(score: torch.Tensor, k: int) -> torch.Tensor:
    """Plain Python: sort (score, -index) pairs with NaN above every number, keep k * N."""
    N, n = score.shape
    flat = score.reshape(-1).tolist()

    def key(j):
        v = flat[j]
        return (1, 0.0, -j) if v != v else (0, v, -j)  # NaN first, then larger score, then smaller index

    order = sorted(range(N * n), key=key, reverse=True)[:min(k * N, N * n)]
    mask = torch.zeros(N * n, dtype=torch.bool)
    mask[order] = True
    return mask.view(N, n)


@pytest.mark.parametrize("N,n,k", [(1, 1, 1), (7, 13, 3), (5, 97, 11), (33, 64, 1), (4, 9, 9), (3, 5, 7)])
@pytest.mark.parametrize("kind", ["random", "ties", "nan"])
def test_batch_topk_mask_against_a_plain_sort(N, n, k, kind):
    g = torch.Generator().manual_seed(N * 1000 + n * 10 + k)
    score = torch.relu(torch.randn(N, n, generator=g, dtype=F64))
    if kind == "ties":  # few distinct values, many equal across tokens and latents, zeros included
        score = (score * 2).round() / 2
    if kind == "nan":
        score.view(-1)[torch.randperm(N * n, generator=g)[: max(1, N * n // 7)]] = float("nan")
    got = R.batch_topk_mask(score, k)
    want = brute_batch_topk(score, k)
    assert torch.equal(got, want)
    assert int(got.sum()) == min(k * N, N * n)  # mean L0 exactly k while k <= n
    if k <= n:
        assert got.sum(1).double().mean().item() == pytest.approx(k)


def test_batch_topk_threshold_and_per_token_l0():
    g = torch.Generator().manual_seed(3)
    score = torch.relu(torch.randn(64, 40, generator=g, dtype=F64))
    score[0] += 10.0  # one token holds the largest scores: the per-token L0 varies
    mask = R.batch_topk_mask(score, 5)
    th = R.batch_topk_threshold(score, mask)
    assert float(th) == float(score[mask].min())
    assert bool((score[~mask] <= th).all())
    l0 = mask.sum(1)
    assert int(l0[0]) == 40 and int(l0.min()) < 5 and int(l0.sum()) == 5 * 64
    assert R.batch_topk_threshold(score, torch.zeros_like(mask)).isnan()


def test_matryoshka_prefixes_are_checked():
    assert R.matryoshka_prefixes([8, 32, 64], 64) == (8, 32, 64)
    for bad in ([8, 32], [32, 8, 64], [8, 8, 64], [0, 64], []):
        with pytest.raises(ValueError, match="--matryoshka-widths"):
            R.matryoshka_prefixes(bad, 64)


def _weights(d=11, n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(n, d, generator=g, dtype=F64) * 0.3
    return (W_dec.clone().requires_grad_(), (0.1 * torch.randn(n, generator=g, dtype=F64)).requires_grad_(),
            W_dec.requires_grad_(), (0.1 * torch.randn(d, generator=g, dtype=F64)).requires_grad_())


def test_matryoshka_prefix_reconstructions_and_uniform_weights():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(19, 11, generator=g, dtype=F64)
    W_enc, b_enc, W_dec, b_dec = _weights()
    pre = (x @ W_enc.t() + b_enc).detach()
    x_hats, f, mask = R.dense_variant_sae(x, W_enc, b_enc, W_dec, b_dec, "matryoshka_batchtopk", k=4,
                                          prefixes=[5, 16, 37])
    assert torch.equal(mask, R.batch_topk_mask(torch.relu(pre) * W_dec.detach().norm(dim=1), 4))
    for m, xh in zip((5, 16, 37), x_hats):
        want = b_dec.detach().clone()
        want = want + sum(f.detach()[:, i:i + 1] * W_dec.detach()[i] for i in range(m))
        torch.testing.assert_close(xh.detach(), want, rtol=1e-12, atol=1e-12)
    # uniform weights: the loss is the mean of the prefixes' losses (Llama Scope loss: same denominator)
    y, mean = x, x.mean(0)
    total = R.variant_loss(x_hats, y, mean)
    each = [R.variant_loss([xh], y, mean).detach() for xh in x_hats]
    total = total.detach()
    assert total.item() == pytest.approx(sum(e.item() for e in each) / 3, rel=1e-12)
    # one prefix (the whole width): batchtopk
    bt, _, _ = R.dense_variant_sae(x, W_enc, b_enc, W_dec, b_dec, "batchtopk", k=4)
    one, _, _ = R.dense_variant_sae(x, W_enc, b_enc, W_dec, b_dec, "matryoshka_batchtopk", k=4, prefixes=[37])
    torch.testing.assert_close(one[0], bt[0], rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["llama_scope", "fvu"])
def test_variant_loss_is_the_trainers_loss_plus_the_l1_term(loss):
    g = torch.Generator().manual_seed(2)
    y = torch.randn(23, 11, generator=g, dtype=F64) * 2 + 0.5
    x_hat = y + 0.2 * torch.randn(23, 11, generator=g, dtype=F64)
    trainer_loss = llama_scope_loss if loss == "llama_scope" else fvu_loss
    assert float(R.variant_loss([x_hat], y, y.mean(0), loss=loss)) == pytest.approx(float(trainer_loss(x_hat, y)), rel=1e-12)
    # standard: per token ||x_hat - y||^2 + l1 sum_i f_i n_i, under the same normalisation
    f = torch.relu(torch.randn(23, 7, generator=g, dtype=F64))
    n = torch.rand(7, generator=g, dtype=F64) + 0.5
    l1 = 3.0
    den = (y - y.mean(0)).norm(dim=1)
    err = ((x_hat - y) ** 2).sum(1) + l1 * (f * n).sum(1)
    want = (err / den).sum() / (23 * 11) if loss == "llama_scope" else err.sum() / (den ** 2).sum()
    got = R.variant_loss([x_hat], y, y.mean(0), loss=loss, f=f, dec_norm=n, l1=l1)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    with pytest.raises(ValueError, match="l1 needs"):
        R.variant_loss([x_hat], y, y.mean(0), loss=loss, l1=1.0)


def test_standard_penalty_pulls_on_the_decoder_norm():
    """The decoder norm is inside the penalty, so shrinking f while growing W_dec does not escape it:
    the L1 term's gradient reaches W_dec (and equals l1 * sum_t f_ti * W_dec[i] / n_i / normaliser)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 11, generator=g, dtype=F64)
    W_enc, b_enc, W_dec, b_dec = _weights(seed=4)
    x_hats, f, mask = R.dense_variant_sae(x, W_enc, b_enc, W_dec, b_dec, "standard")
    assert bool(mask.all())
    n = W_dec.norm(dim=1)
    l1 = 2.0
    without = R.variant_loss(x_hats, x, x.mean(0), loss="fvu")
    with_l1 = R.variant_loss(x_hats, x, x.mean(0), loss="fvu", f=f, dec_norm=n, l1=l1)
    gw = torch.autograd.grad(with_l1 - without, W_dec, retain_graph=True)[0]
    den = ((x - x.mean(0)) ** 2).sum()
    want_dec = l1 * f.detach().sum(0)[:, None] * (W_dec.detach() / n.detach()[:, None]) / den
    torch.testing.assert_close(gw, want_dec, rtol=1e-10, atol=1e-12)


def test_l1_warmup_is_linear_then_flat():
    assert [R.l1_coefficient_at(t, 4.0, 4) for t in range(6)] == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    assert R.l1_coefficient_at(0, 4.0, 0) == 4.0


def test_unknown_architecture_and_missing_k_are_refused():
    x = torch.randn(3, 11, dtype=F64)
    W_enc, b_enc, W_dec, b_dec = _weights()
    with pytest.raises(ValueError, match="--architecture"):
        R.dense_variant_sae(x, W_enc, b_enc, W_dec, b_dec, "jumprelu", k=2)
    with pytest.raises(ValueError, match="--k"):
        R.dense_variant_sae(x, W_enc, b_enc, W_dec, b_dec, "batchtopk")


def test_topk_in_the_variant_reference_is_the_package_selection():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(17, 11, generator=g, dtype=F64)
    W_enc, b_enc, W_dec, b_dec = _weights(seed=5)
    x_hats, f, mask = R.dense_variant_sae(x, W_enc, b_enc, W_dec, b_dec, "topk", k=6)
    want_hat, want_f, idx = R.dense_topk_sae(x, W_enc, b_enc, W_dec, b_dec, 6)
    assert torch.equal(mask.sum(1), torch.full((17,), 6))
    torch.testing.assert_close(f, want_f, rtol=0, atol=0)
    torch.testing.assert_close(x_hats[0], want_hat, rtol=0, atol=0)
