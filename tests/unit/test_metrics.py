"""The evaluation metrics (docs/method.md sec. 6) against their formulas, in float64."""

import pytest
import torch

from sae_kernels import SAEConfig, TopKSAE
from helpers import assert_close
from trainer.evaluate import ce_by_position, sae_metrics


def test_sae_metrics_match_the_formulas():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(16, 64, k=5))
    x = torch.randn(300, 16) * 2 + 0.5
    m = sae_metrics(sae, x, batch_size=77)
    with torch.no_grad():
        v, i = sae.encode_sparse(x)
        xh = sae.decode_sparse(v, i).double()
    xd = x.double()
    err = (xd - xh).pow(2).sum(-1)
    var = (xd - xd.mean(0)).pow(2).sum(-1)
    assert m["explained_variance"] == pytest.approx(float(1 - err.sum() / var.sum()), abs=1e-9)
    assert m["explained_variance_per_token"] == pytest.approx(float((1 - err / var).mean()), abs=1e-9)
    assert m["l0"] == pytest.approx(float((v > 0).sum(-1).double().mean()))
    fired = torch.zeros(64, dtype=torch.bool)
    fired[i[v > 0]] = True
    assert m["dead_latents_eval"] == int((~fired).sum()) and m["n_tokens"] == 300


def _dense_reference(sae, x, y):
    """float64 reconstruction error, variance around mean(y) (the target's mean), per token."""
    with torch.no_grad():
        v, i = sae.encode_sparse(x)
        yh = sae.decode_sparse(v, i).double()
    yd = y.double()
    return (yd - yh).pow(2).sum(-1), (yd - yd.mean(0)).pow(2).sum(-1)


def test_transcoder_explained_variance_is_centred_on_the_targets_mean():
    """A transcoder reads x (ln2 output) and predicts y (MLP output): EV's denominator is the variance of
    y around mean(y), never around mean(x). Here the inputs and targets have very different means and the
    transcoder predicts little more than mean(y) (b_dec): its EV is near 0, where centring on mean(x)
    would report it near 1."""
    torch.manual_seed(0)
    d, n = 16, 300
    sae = TopKSAE(SAEConfig(d, 64, k=5, dtype="float64", position="TC", hook_point_in="blocks.1.ln2.hook_normalized",
                            hook_point_out="blocks.1.hook_mlp_out"))
    x = torch.randn(n, d, dtype=torch.float64) + 4.0  # input mean +4
    y = 0.5 * x @ torch.randn(d, d, dtype=torch.float64) / d ** 0.5 - 7.0 + torch.randn(n, d, dtype=torch.float64)
    assert (x.mean(0) - y.mean(0)).norm() > 10 * y.std(0).mean()  # the two means are far apart
    with torch.no_grad():
        sae.W_dec.mul_(0.05)
        sae.b_dec.copy_(y.mean(0))  # predicts about mean(y)
    positions = torch.arange(n) % 40
    edges = [0, 4, 16, 32]  # positions 32..39 fall in no bucket
    m = sae_metrics(sae, x, y, batch_size=77, positions=positions, buckets=edges)
    err, var = _dense_reference(sae, x, y)
    ev = 1 - err.sum() / var.sum()
    assert -0.5 < float(ev) < 0.5, float(ev)  # a mean predictor: EV about 0
    for key, want in (("explained_variance", ev), ("explained_variance_per_token", (1 - err / var).mean()),
                      ("mse", err.mean())):
        assert_close(torch.tensor(m[key], dtype=torch.float64), want, rtol=1e-9, atol=1e-12, what=key)
    bp = m["by_position"]
    assert bp["edges"] == edges
    want_ev, want_n = [], []
    for lo, hi in zip(edges, edges[1:]):
        inb = (positions >= lo) & (positions < hi)
        want_n.append(int(inb.sum()))
        want_ev.append(float(1 - err[inb].sum() / var[inb].sum()))  # mean(y) over all tokens, not the bucket's
    assert bp["tokens"] == want_n and sum(want_n) == int((positions < 32).sum())
    assert_close(torch.tensor(bp["explained_variance"], dtype=torch.float64), torch.tensor(want_ev, dtype=torch.float64), rtol=1e-9,
                 atol=1e-12, what="by_position explained_variance")


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_zero_valued_picks_do_not_fire(activation):
    """A TopK SAE returns k picks per token even when fewer than k latents are positive (the rest are
    zero-valued picks of arbitrary latents); a JumpReLU SAE pads its rows with zero values. Neither is a
    firing: L0, dead latents and the dead fraction match a brute-force count on the dense pre-activations."""
    torch.manual_seed(1)
    d, d_sae, k, n = 16, 64, 8, 200
    sae = TopKSAE(SAEConfig(d, d_sae, k=k, dtype="float64", activation=activation))
    with torch.no_grad():
        sae.W_enc[:-3] = 0.0
        sae.b_enc.fill_(-1.0)  # latents 0 .. d_sae-4 never fire
        sae.b_enc[-3:] = 0.0  # the last 3 fire on about half the tokens each
        sae.threshold.fill_(0.3 if activation == "jumprelu" else 0.0)
    x = torch.randn(n, d, dtype=torch.float64)
    m = sae_metrics(sae, x, batch_size=37)
    with torch.no_grad():
        pre = x @ sae.W_enc.t() + sae.b_enc
        on = pre > 0 if activation == "topk" else torch.relu(pre) * sae.dec_norm() > 0.3  # weighted gate
    assert int(on.sum(-1).max()) < k  # every positive latent is kept: the dense count is the truth
    with torch.no_grad():
        v, i = sae.encode_sparse(x[:37])
    zero_picks = i[v == 0]
    assert zero_picks.numel() and bool((~on.any(0))[zero_picks].any())  # some zero picks land on dead latents
    alive = on.any(0)
    assert_close(torch.tensor(m["l0"], dtype=torch.float64), on.sum(-1).double().mean(), atol=1e-12, what="l0")
    assert m["dead_latents_eval"] == int((~alive).sum()) == d_sae - 3
    assert_close(torch.tensor(m["dead_fraction_eval"], dtype=torch.float64), (~alive).double().mean(), atol=1e-12,
                 what="dead_fraction_eval")


def test_ce_by_position_buckets_target_positions():
    """``ce_by_position``: entry t-1 of collect_sites' sums is the CE of predicting the token at position t;
    each bucket [e_i, e_i+1) of target positions averages its sums (clean, SAE, zero-ablated) by its
    counts, delta LM loss = SAE - clean per bucket, and an empty bucket reports None."""
    g = torch.Generator().manual_seed(0)
    T = 12  # target positions 1..11
    counts = torch.randint(1, 5, (T - 1,), generator=g)
    counts[8:] = 0  # no targets at positions 9..11
    sums = {k: torch.rand(T - 1, generator=g, dtype=torch.float64) * counts for k in ("clean", "s", "zero")}
    ce_pos = {k: (v, counts) for k, v in sums.items()}
    edges = [0, 2, 5, 9, 12]
    got = ce_by_position(ce_pos, "s", edges)
    t = torch.arange(1, T)
    want = {"ce_tokens": [], "ce_clean": [], "ce_sae": [], "ce_zero_ablation": [], "delta_lm_loss": []}
    for lo, hi in zip(edges, edges[1:]):
        inb = (t >= lo) & (t < hi)
        c = int(counts[inb].sum())
        want["ce_tokens"].append(c)
        mean = {k: float(v[inb].sum()) / c if c else None for k, v in sums.items()}
        want["ce_clean"].append(mean["clean"])
        want["ce_sae"].append(mean["s"])
        want["ce_zero_ablation"].append(mean["zero"])
        want["delta_lm_loss"].append(mean["s"] - mean["clean"] if c else None)
    assert want["ce_tokens"][-1] == 0 and want["ce_tokens"][0] == int(counts[0])  # only target position 1
    assert got["ce_tokens"] == want["ce_tokens"]
    for key in ("ce_clean", "ce_sae", "ce_zero_ablation", "delta_lm_loss"):
        assert got[key][-1] is None, key
        assert_close(torch.tensor(got[key][:-1], dtype=torch.float64), torch.tensor(want[key][:-1], dtype=torch.float64), rtol=1e-12, atol=1e-15, what=key)
