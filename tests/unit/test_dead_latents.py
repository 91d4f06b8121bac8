"""Why latents die and what keeps them alive (README, 'Dead latents'): AuxK in the main loss's units,
the Adam row flags, the optional data-dependent biases at step 0 (``--data-init``), and the mechanism
on a small case, released recipe against the default."""
import math

import pytest
import torch

from helpers import BACKENDS, DEVICE, assert_close
from sae_kernels import SAEConfig, TopKSAE
from sae_kernels.optim import HOLD, RESET
from trainer.config import TrainConfig
from trainer.train import SAEStep, StepConfig, estimate_norm, make_optimizer


def _step(d=24, n=96, k=4, transcoder=False, dtype=torch.float32, device="cpu", **kw):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d, n, k=k, dtype="float64" if dtype == torch.float64 else "float32"),
                  transcoder=transcoder, device=device)
    sae.check_inputs = False
    opt = make_optimizer(sae, 1e-3, (0.9, 0.9999))
    sc = StepConfig(k=k, k_start=k, total_steps=40, anneal_steps=0, warmup_steps=2, decay_fraction=0.2, lr=1e-3,
                    clip_grad_norm=1e-3, **kw)
    return SAEStep(sae, opt, sc)


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
def test_data_init_centres_every_latent_on_the_data(transcoder):
    """b_dec = mean of the targets, b_enc = -W_enc @ mean(inputs): each latent's pre-activation has
    mean 0 over the batch (none starts negative on nearly every token), applied once, at step 0."""
    st = _step(transcoder=transcoder, data_init=True)
    g = torch.Generator().manual_seed(1)
    offset = torch.randn(24, generator=g) * 4  # inputs far from the origin, like a residual stream
    x = torch.randn(64, 24, generator=g) + offset
    y = torch.randn(64, 24, generator=g) * 0.5 + 1.0 if transcoder else None
    y_n = (x if y is None else y) * st.sae.cfg.norm_out
    pre0 = x @ st.sae.W_enc.detach().t()
    assert (pre0.mean(0).abs() > 2 * pre0.std(0)).float().mean() > 0.1, "the offset should bias many latents"
    st.init_from_data(x * st.sae.cfg.norm_in, y_n)
    pre = x @ st.sae.W_enc.detach().t() + st.sae.b_enc.detach()
    assert pre.mean(0).abs().max() <= 1e-5 * pre.std(0).max()
    assert_close(st.sae.b_dec.detach(), y_n.mean(0), rtol=0, atol=1e-6)

    # through the step: at t = 0 (before its update; Adam then moves b_dec by at most ~lr) and never again
    st = _step(transcoder=transcoder, data_init=True)
    calls = []
    real = st.init_from_data
    st.init_from_data = lambda *a: (calls.append(1), real(*a))
    st(x, y, 0)
    assert len(calls) == 1
    assert (st.sae.b_dec.detach() - y_n.mean(0)).abs().max() <= 1.5e-3
    st(x, y, 1)
    assert len(calls) == 1
    released = _step(transcoder=transcoder)  # data_init off: biases start at zero
    released(x, y, 0)
    assert released.sae.b_dec.detach().abs().max() <= 1.5e-3


@pytest.mark.parametrize("loss", ["llama_scope", "fvu"])
def test_auxk_loss_is_measured_like_the_main_loss(loss):
    """float64 weights: the top-k_aux dead latents (by the weighted score) reconstruct the residual, and the
    error is divided by the *target's* statistics, as the main loss is (not by the residual's own
    variance, which made AuxK outweigh a Llama Scope main loss by ~two orders of magnitude)."""
    st = _step(dtype=torch.float64, loss=loss, auxk=True, k_aux=6, dead_window_tokens=1)
    sae = st.sae
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1, generator=g, dtype=torch.float64) + 0.5)  # unequal decoder norms
    x = torch.randn(33, 24, generator=g, dtype=torch.float64) + 1
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96, generator=g)[:40]] = True
    values, indices, x_hat = st.encode_decode(x, 4)
    mean = x.mean(0, keepdim=True)
    residual = (x - x_hat).detach()
    got = st.auxk_loss(x, x, x_hat, dead, st.loss_denominator(x, mean))

    W_enc, b_enc, W_dec = (t.detach() for t in (sae.W_enc, sae.b_enc, sae.W_dec))
    z = torch.relu(x @ W_enc.t() + b_enc)
    score = torch.where(dead, z * W_dec.norm(dim=1), torch.full_like(z, -1.0))
    idx = score.topk(6, dim=1).indices
    e_hat = (z.gather(1, idx)[..., None] * W_dec[idx]).sum(1)
    if loss == "llama_scope":
        want = ((e_hat - residual) ** 2 / (x - mean).norm(dim=1, keepdim=True)).mean()
    else:
        want = ((e_hat - residual) ** 2).sum() / ((x - mean) ** 2).sum()
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-6)  # the step's losses are fp32


def _synthetic(seed=1, d=64, n_true=2048, mean_scale=3.0):
    """Sparse sums of 4 of n_true unit features (Zipf frequencies) on top of a common offset (|mean| about
    0.7 x the median norm, as the residual stream of the embedded model at layer 12)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    mu = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * mean_scale
    p = 1.0 / torch.arange(1, n_true + 1).float()

    def batch(b):
        idx = torch.multinomial(p.expand(b, -1), 4, replacement=False, generator=g)
        return torch.einsum("bk,bkd->bd", torch.rand(b, 4, generator=g) * 2 + 0.5, D[idx]) + mu

    return batch


def _train_and_count_dead(steps=200, batch=256, d=64, n=512, k=8, k_start=32, **flags):
    """Train through the trainer's own configuration (TrainConfig -> StepConfig) with the default recipe,
    changed by ``flags`` (e.g. released_recipe=True); return (dead latents on held-out samples, held-out EV)."""
    data = _synthetic(d=d)
    cfg = TrainConfig(tokens=steps * batch, batch_size=batch, lr=5e-3, k=k, expansion=n // d, k_start=k_start,
                      **flags).resolve(30, d, "cpu")
    torch.manual_seed(cfg.seed)
    sae = TopKSAE(SAEConfig(d, n, k=k))
    sae.check_inputs = False
    s = math.sqrt(d) / estimate_norm(data(2048))
    sae.cfg = sae.cfg.replace(norm_in=s, norm_out=s)
    step = SAEStep(sae, make_optimizer(sae, cfg.lr, (cfg.beta1, cfg.beta2)), StepConfig.from_train_config(cfg))
    for t in range(cfg.total_steps):
        step(data(batch), None, t)
    with torch.no_grad():
        xe = data(4096)
        v, i = sae.encode_sparse(xe)
        fired = torch.zeros(n, dtype=torch.bool)
        fired[i[v > 0]] = True
        ev = 1 - float(((sae(xe) - xe) ** 2).sum() / ((xe - xe.mean(0)) ** 2).sum())
    return int((~fired).sum()), ev


def test_latents_that_die_under_the_released_recipe_stay_alive_by_default():
    """The mechanism on a small case (d 64, 512 latents, K 8 annealed from 32, 200 steps; inputs with a
    common offset). Under the released recipe (zero biases, no AuxK) the latents carry the offset and
    compete for it as K anneals; the losers stop firing, get no gradient and stay dead: 284 of 512 never
    fire on held-out samples (268 and 288 with the data seeds 2 and 3). The default keeps the zero
    biases and adds AuxK (with the Adam row flags): AuxK trains the dead latents on the residual until
    they win TopK slots again, and 52 stay dead (51, 86), with more held-out EV (0.719 against 0.702).
    The same without AuxK leaves 229 dead (214, 240): AuxK is what revives them. (Measured when written;
    the row flags alone account for 94 -> 52. With K = 4, as many slots as each input has features, one
    of them taken by the offset's carriers, the dead latents' best score stays ~0.4 of the K-th winner's
    and AuxK revives none within such a run: there only the data init, ``data_init=True``, keeps them
    alive; on the embedded model's activations it costs held-out EV at A, README, 'Dead latents'.)"""
    dead_released, ev_released = _train_and_count_dead(released_recipe=True)
    dead_default, ev_default = _train_and_count_dead()
    dead_no_auxk, _ = _train_and_count_dead(auxk=False)
    assert dead_released >= 0.4 * 512, dead_released
    assert dead_default <= dead_released // 3, (dead_default, dead_released)
    assert dead_no_auxk >= 3 * dead_default, (dead_no_auxk, dead_default)
    assert ev_default > ev_released + 0.01, (ev_default, ev_released)


def test_released_recipe_flag_restores_the_released_defaults():
    c = TrainConfig().resolve(30, 576, "cpu")
    r = TrainConfig(released_recipe=True).resolve(30, 576, "cpu")
    assert (c.data_init, c.auxk, c.hold_dead, c.reset_dead_moments) == (False, True, True, True)
    assert (r.data_init, r.auxk, r.hold_dead, r.reset_dead_moments) == (False, False, False, False)
    sc, sr = StepConfig.from_train_config(c), StepConfig.from_train_config(r)
    assert (sc.data_init, sc.auxk, sc.hold_dead, sc.reset_dead_moments) == (False, True, True, True)
    assert (sr.data_init, sr.auxk, sr.hold_dead, sr.reset_dead_moments) == (False, False, False, False)
    # an explicit flag still wins over either default
    assert TrainConfig(released_recipe=True, auxk=True).resolve(30, 576, "cpu").auxk is True
    assert TrainConfig(released_recipe=True, data_init=True).resolve(30, 576, "cpu").data_init is True


def test_recentre_unreachable_resets_only_dead_latents_out_of_auxks_reach():
    """Latents dead for two windows with pre <= 0 on every token get b_enc = -W_enc @ mean(x); a dead
    latent AuxK can still train (positive somewhere), a latent dead for one window, and any latent
    between window boundaries keep their bias."""
    st = _step(recentre_dead=True, dead_window_tokens=64)
    sae = st.sae
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 24, generator=g) + 2
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # every latent unreachable ...
        sae.b_enc[7] = 1e3  # ... but latent 7
    b0 = sae.b_enc.detach().clone()
    st.since_fired[:] = 64 * 3  # dead for three windows, at a window boundary (192 % 64 < 32)
    st.since_fired[5] = 64  # dead for one window only
    st.recentre_unreachable(x)
    want = -(sae.W_enc.detach() @ x.mean(0))
    reset = torch.ones(96, dtype=torch.bool)
    reset[[5, 7]] = False
    assert_close(sae.b_enc.detach()[reset], want[reset], rtol=1e-5, atol=1e-5)
    assert torch.equal(sae.b_enc.detach()[~reset], b0[~reset])
    with torch.no_grad():
        sae.b_enc.copy_(b0)
    st.since_fired[:] = 64 * 3 + 32  # between boundaries: nothing is due
    st.recentre_unreachable(x)
    assert torch.equal(sae.b_enc.detach(), b0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("hold", [True, False], ids=["hold", "no-hold"])
@pytest.mark.parametrize("reset", [True, False], ids=["reset", "no-reset"])
def test_row_flags_of_the_step_hold_dead_latents_and_reset_newly_dead_ones(backend, hold, reset):
    """Through SAEStep on both backends (AuxK off: dead latents get no gradient). After a first step,
    latents 0-47 are pushed far down (no gradient); 0-23 are dead from the second step on (window 64
    tokens), 24-47 are not dead yet. Under reset_dead_moments latents 0-23 start the second step with
    zeroed moments (so, without a gradient, they do not move); under hold_dead a dead latent without a
    gradient keeps its rows, now and later, and so does one revived after a reset (young moments).
    Latents that never died are never held: Adam's momentum moves 24-47, and the selected latents move."""
    st = _step(auxk=False, dead_window_tokens=64, hold_dead=hold, reset_dead_moments=reset, device=DEVICE)
    sae = st.sae
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(32, 24, generator=g) + 0.5).to(DEVICE)
    st.since_fired[:] = 0
    with torch.no_grad():
        sae.b_enc.fill_(0)
    st(x, None, 5)  # latents selected here have moments now
    ids = torch.arange(96, device=DEVICE)
    idle, newly = ids < 48, ids < 24
    with torch.no_grad():
        sae.b_enc[idle] = -1e4  # never selected: no gradient
    st.since_fired[:] = 0
    st.since_fired[:24] = 72  # dead from this step on (72 >= 64), just now (72 - 32 < 64)
    m_before = st.opt.state[sae.W_enc]["exp_avg"].clone()
    had = m_before.abs().sum(1) > 0  # latents with momentum from step 5
    assert bool(had[newly].any()) and bool(had[idle & ~newly].any())

    def moved_by(t):
        before = [p.detach().clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec)]
        st(x, None, t)
        return [(b != p.detach()).reshape(96, -1).any(1) for b, p in zip(before, (sae.W_enc, sae.b_enc, sae.W_dec))]

    moved = moved_by(6)
    fired = st.since_fired == 0
    assert 0 < int(fired.sum()) and not bool(fired[idle].any())
    m = st.opt.state[sae.W_enc]["exp_avg"]
    for mv in moved:
        assert bool(mv[fired].all()), "selected latents move"
        assert bool(mv[idle & ~newly & had].all()), "latents that are not dead move by their momentum"
        assert bool(mv[newly & had].any()) == (not hold and not reset), "dead latents without a gradient"
    assert_close(m[newly], torch.zeros_like(m[newly]) if reset else 0.9 * m_before[newly], rtol=1.3e-6, atol=1e-5)
    assert_close(m[idle & ~newly], 0.9 * m_before[idle & ~newly], rtol=1.3e-6, atol=1e-5)  # zero gradient: decay only
    st.since_fired[:24] = 72 + 32  # dead for longer: not reset again
    m_before = m.clone()
    moved = moved_by(7)
    assert_close(m[newly], 0.9 * m_before[newly], rtol=1.3e-6, atol=1e-5)
    for mv in moved:
        assert bool(mv[newly & had].any()) == (not hold and not reset)
    # revived (alive again) after a reset: its moments are young, so it is still held when idle
    assert torch.equal(st.was_reset, newly if reset else torch.zeros_like(newly))
    st.since_fired[:] = 0
    sae.b_enc.grad = torch.zeros_like(sae.b_enc)
    sae.b_enc.grad[~idle] = 1.0
    flags = st.row_flags(st.since_fired >= 64, x)
    assert (flags is None) == (not hold and not reset)
    if flags is not None:
        held = (flags[sae.W_enc] & HOLD) != 0
        assert torch.equal(held, newly if (hold and reset) else torch.zeros_like(newly))
    restored = _step(auxk=False, dead_window_tokens=64, hold_dead=hold, reset_dead_moments=reset, device=DEVICE)
    restored.load_state_dict(st.state_dict())
    assert torch.equal(restored.was_reset, st.was_reset)
    sae.b_enc.grad = None


# (N, d_model, d_sae, k, m dead latents, k_aux, encoder bias shift): k_aux < m, k_aux > m (all m kept),
# m = 1, and k_aux < m with at most k_aux positive per row (dead latents as in training runs: the top-k
# is the identity and is skipped)
DENSE_SHAPES = [(21, 40, 97, 5, 31, 8, 0.0), (9, 33, 64, 7, 5, 12, 0.0), (13, 24, 50, 3, 1, 4, 0.0),
                (17, 30, 80, 4, 40, 12, -1.6)]


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "plain"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,d,n,k,m,k_aux,shift", DENSE_SHAPES)
def test_select_dense_and_subset_decode_against_float64(N, d, n, k, m, k_aux, shift, dtype, tol, weighted):
    """AuxK's CPU route: select_dense keeps, per row, a valid top-min(k_aux, m) of the given latents
    (relu(pre) there, zeros elsewhere); subset_decode decodes it; every gradient (x, W_enc, b_enc,
    W_dec) equals float64 autograd on the same support."""
    from sae_kernels.ops import encode_for_training, select_dense, subset_decode

    g = torch.Generator().manual_seed(N * 100 + m)
    x = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
    W_enc = (torch.randn(n, d, generator=g) / d ** 0.5).to(dtype).requires_grad_()
    b_enc = (torch.randn(n, generator=g) * 0.1).to(dtype).requires_grad_()
    W_dec = (torch.randn(n, d, generator=g) * (torch.rand(n, 1, generator=g) + 0.5)).to(dtype).requires_grad_()
    ids = torch.randperm(n, generator=g)[:m]
    with torch.no_grad():
        b_enc[ids] += shift
    grad = torch.randn(N, d, generator=g).to(dtype)
    dec_norm = W_dec.detach().float().norm(dim=1) if weighted else None
    _, _, scores = encode_for_training(x, W_enc, b_enc, k, dec_norm, keep_pre=True)
    a = select_dense(scores, ids, k_aux)
    assert a.shape == (N, m) and a.dtype == dtype
    x64, We, be, Wd = (t.detach().double() for t in (x, W_enc, b_enc, W_dec))
    z = torch.relu(x64 @ We[ids].t() + be[ids])
    score = z * Wd[ids].norm(dim=1) if weighted else z
    nz = a.detach() != 0
    ka = min(k_aux, m)
    positive = (z > 0).sum(1)
    if shift < 0:  # the case meant to take the identity route: every row has at most k_aux positive, some many
        assert int(positive.max()) <= k_aux and int(positive.max()) >= 2
    else:
        assert k_aux >= m or int(positive.max()) > k_aux
    assert (nz.sum(1) <= ka).all()
    kth = torch.topk(score, ka, dim=1).values[:, -1:]
    slack = tol * (score.abs().max() + 1e-12)
    assert not (nz & (score < kth - slack)).any(), "a latent outside the row's top k_aux"
    assert (nz | (score <= kth + slack) | (score == 0)).all(), "a top-k_aux latent was dropped"
    out = subset_decode(a, W_dec, ids)
    (out.float() * grad.float()).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (x, W_enc, b_enc, W_dec)]
    x64, We, be, Wd = leaves
    want = (torch.relu(x64 @ We[ids].t() + be[ids]) * nz) @ Wd[ids]
    (want * grad.double()).sum().backward()
    assert_close(out.double(), want.detach(), rtol=tol, atol=tol * float(want.detach().abs().max()))
    for name, got, ref in zip(("dx", "dW_enc", "db_enc", "dW_dec"), (x, W_enc, b_enc, W_dec), leaves):
        assert got.grad is not None and got.grad.dtype == dtype, name
        scale = float(ref.grad.abs().max()) + 1e-12
        assert_close(got.grad.double(), ref.grad, rtol=tol, atol=tol * scale, what=name)
    with pytest.raises(ValueError, match="ids: expected an int64"):
        subset_decode(a, W_dec, ids.float())


# ----------------------------------------------------------------------------------- tests that could fail (issue 29)


@pytest.mark.parametrize("loss", ["llama_scope", "fvu"])
def test_transcoder_steps_auxk_is_divided_by_the_targets_statistics(loss):
    """Through the step of a transcoder (targets y != inputs x, on another scale): the reported AuxK loss
    equals a float64 computation from the (fp32) weights before the step, with the residual y_n - x_hat_n and
    the denominator of the *target's* batch (||y_t - mean(y)|| per token, or sum (y - mean(y))^2). The
    normalised inputs spread ~1.8x as far as the targets here: their statistics give ~0.56x (Llama Scope)
    or ~0.3x (FVU) the loss."""
    st = _step(transcoder=True, loss=loss, auxk=True, k_aux=6, dead_window_tokens=1)
    sae = st.sae
    sae.cfg = sae.cfg.replace(norm_in=0.7, norm_out=1.9)  # the normalisation is the target's too
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1, generator=g) + 0.5)  # unequal decoder norms
    x = torch.randn(40, 24, generator=g) * 2.5 + 1
    y = torch.randn(40, 24, generator=g) * 0.5 - 2
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96, generator=g)[:40]] = True
    st.since_fired[dead] = 1  # dead (window 1 token) before this step
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))

    m = st(x, y, 5)

    x_n, y_n = x.double() * 0.7, y.double() * 1.9
    z = torch.relu(x_n @ W_enc.t() + b_enc)
    score = z * W_dec.norm(dim=1)
    top = score.topk(4, dim=1).indices
    f = torch.zeros_like(z).scatter(1, top, z.gather(1, top))
    x_hat = f @ W_dec + b_dec
    residual = y_n - x_hat
    idx = torch.where(dead, score, torch.full_like(score, -1.0)).topk(6, dim=1).indices
    e_hat = (z.gather(1, idx)[..., None] * W_dec[idx]).sum(1)
    centred = y_n - y_n.mean(0, keepdim=True)
    if loss == "llama_scope":
        main = ((x_hat - y_n) ** 2 / centred.norm(dim=1, keepdim=True)).mean()
        want = ((e_hat - residual) ** 2 / centred.norm(dim=1, keepdim=True)).mean()
    else:
        main = ((x_hat - y_n) ** 2).sum() / (centred ** 2).sum()
        want = ((e_hat - residual) ** 2).sum() / (centred ** 2).sum()
    assert_close(m["loss"], main, rtol=1e-4, what="main loss (the reference's x_hat)")
    assert_close(m["auxk_loss"], want, rtol=1e-4, what=f"AuxK loss ({loss}) of a transcoder step")


@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
def test_b_dec_init_fraction_reaches_the_data_init(transcoder):
    """``--data-init --b-dec-init-fraction 0.6`` through TrainConfig -> StepConfig -> the step: at step 0
    b_dec = 0.6 x the mean of the batch's normalised targets (neither the whole mean nor the default 0.25 of
    it; b_enc is centred on the whole input mean whatever the fraction), and Adam's first update moves it by
    about lr only."""
    cfg = TrainConfig(data_init=True, b_dec_init_fraction=0.6, k=4, expansion=4).resolve(30, 24, "cpu")
    sc = StepConfig.from_train_config(cfg)
    assert sc.data_init
    assert sc.b_dec_init == 0.6, f"--b-dec-init-fraction 0.6 reached the step as {sc.b_dec_init}"
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(24, 96, k=4), transcoder=transcoder)
    sae.check_inputs = False
    sae.cfg = sae.cfg.replace(norm_in=0.8, norm_out=1.7 if transcoder else 0.8)
    st = SAEStep(sae, make_optimizer(sae, cfg.lr, (cfg.beta1, cfg.beta2)), sc)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 24, generator=g) + torch.randn(24, generator=g) * 4
    y = torch.randn(64, 24, generator=g) * 0.5 + torch.randn(24, generator=g) * 3 if transcoder else None
    y_n = (x if y is None else y) * sae.cfg.norm_out
    after_init = {}
    real = st.init_from_data

    def spy(x_n, yn):
        real(x_n, yn)
        after_init.update((k, p.detach().clone()) for k, p in (("b_dec", sae.b_dec), ("b_enc", sae.b_enc),
                                                                ("W_enc", sae.W_enc)))

    st.init_from_data = spy
    st(x, y, 0)
    assert_close(after_init["b_dec"], 0.6 * y_n.mean(0), rtol=1e-5, atol=1e-6, what="b_dec after the data init")
    assert_close(after_init["b_enc"], -(after_init["W_enc"] @ (x * 0.8).mean(0)), 1e-5, what="b_enc after the data init")
    drift = float((sae.b_dec.detach() - 0.6 * y_n.mean(0)).abs().max())
    assert drift <= 1.5 * cfg.lr, f"b_dec after step 0 is {drift:.3g} from 0.6 x the target mean"


def test_each_death_restarts_adam_once_when_the_window_is_whole_batches():
    """The default dead window is a whole number of batches (16384 = 16 x 1024 on the embedded default), so a
    latent that stops firing reaches the window exactly at a step boundary. Over a run with the trainer's
    defaults (TrainConfig -> StepConfig: AuxK, reset_dead_moments and hold_dead on; window 16 batches),
    every RESET row flag the step hands SAEAdam must match one death (the ``deaths`` counter): latents that
    never fire die once, latents forced to fire again die twice, and none is reset on two steps of the
    same death."""
    B, steps = 8, 60
    cfg = TrainConfig(tokens=B * steps, batch_size=B, buffer_tokens=1024, k=4, expansion=4).resolve(30, 24, "cpu")
    assert cfg.dead_window_tokens == 16 * B and cfg.reset_dead_moments and cfg.auxk
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(24, 96, k=4))
    sae.check_inputs = False
    st = SAEStep(sae, make_optimizer(sae, cfg.lr, (cfg.beta1, cfg.beta2)), StepConfig.from_train_config(cfg))
    resets = torch.zeros(96, dtype=torch.int64)
    real = st.opt.step

    def spy(*a, **kw):
        flags = kw["row_flags"][sae.W_enc]
        resets.add_(((flags & RESET) != 0).long())
        return real(*a, **kw)

    st.opt.step = spy
    never, revived = torch.arange(0, 16), torch.arange(16, 20)
    fire_at = {0, 30}  # revived: fire at these steps only (dead over steps 17-30, and again from step 47)
    g = torch.Generator().manual_seed(7)
    deaths_before_last = None
    for t in range(steps):
        with torch.no_grad():
            sae.b_enc[never] = -1e4  # no positive pre-activation: never selected, out of AuxK's reach
            sae.b_enc[revived] = 1e3 if t in fire_at else -1e4  # the top 4 of every token at those steps
        deaths_before_last = st.deaths.clone()
        st(torch.randn(B, 24, generator=g), None, t)
    # a RESET at step s answers the death counted at the end of step s - 1: compare up to the last step
    assert torch.equal(deaths_before_last[never], torch.ones(16, dtype=torch.int64))
    assert torch.equal(deaths_before_last[revived], torch.full((4,), 2, dtype=torch.int64))
    bad = (resets != deaths_before_last).nonzero().squeeze(1).tolist()
    assert not bad, (f"latents {bad[:8]}: RESET flags {resets[bad[:8]].tolist()} against deaths "
                     f"{deaths_before_last[bad[:8]].tolist()} (a death restarted Adam more or less than once)")


# ---------------------------------------------- AuxK over candidate latents (issue 32): the GPU route on the CPU


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("kept_pre", [True, False], ids=["kept-pre", "gemm"])
@pytest.mark.parametrize("sync_free", [True, False], ids=["cpu-route", "gpu-route"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,d,n,k,m,k_aux", [(21, 40, 97, 5, 31, 8), (13, 24, 50, 3, 1, 4), (9, 33, 64, 7, 40, 40)])
def test_select_dense_over_candidates_with_row_grads(N, d, n, k, m, k_aux, dtype, tol, sync_free, kept_pre, backend,
                                                     monkeypatch):
    """The step's AuxK route: candidates ``ids`` (a superset of the dead) with ``allowed`` marking the
    dead among them, from the kept pre-activations or one GEMM over the candidates (a fused encode
    keeps none), the selection (each backend's row select) always made (the GPU route, no host sync)
    or skipped when it is the identity (the CPU route); the W_enc / b_enc / W_dec gradients of the candidate rows go to
    ``RowGrads`` sinks and are added to the full gradients after the backward. Everything against
    float64 autograd on the same support; rows outside the candidates get exactly zero."""
    from sae_kernels import ops
    from sae_kernels.ops import EncodeScores, RowGrads, encode_for_training, select_dense, subset_decode

    monkeypatch.setattr(ops, "_host_sync_free", lambda t: sync_free)
    g = torch.Generator().manual_seed(N * 1000 + m + k_aux)
    x = torch.randn(N, d, generator=g).to(dtype)
    W_enc = (torch.randn(n, d, generator=g) / d ** 0.5).to(dtype).requires_grad_()
    b_enc = (torch.randn(n, generator=g) * 0.1).to(dtype).requires_grad_()
    W_dec = (torch.randn(n, d, generator=g) * (torch.rand(n, 1, generator=g) + 0.5)).to(dtype).requires_grad_()
    ids = torch.randperm(n, generator=g)[:m]
    allowed = torch.rand(m, generator=g) < 0.6
    allowed[0] = True
    grad = torch.randn(N, d, generator=g).to(dtype)
    dec_norm = W_dec.detach().float().norm(dim=1)
    _, _, scores = encode_for_training(x, W_enc, b_enc, k, dec_norm, keep_pre=True)
    if not kept_pre:
        scores = EncodeScores(*scores._args, None)
    rg = RowGrads(ids)
    a = select_dense(scores, ids, k_aux, allowed=allowed, row_grads=rg)
    out = subset_decode(a, W_dec, ids, row_grads=rg, out_dtype=torch.float32)
    assert a.shape == (N, m) and a.dtype == dtype and out.dtype == torch.float32
    nz = a.detach() != 0
    assert not nz[:, ~allowed].any(), "a candidate that is not allowed was selected"
    x64, We, be, Wd = (t.detach().double() for t in (x, W_enc, b_enc, W_dec))
    z = torch.relu(x64 @ We[ids].t() + be[ids]) * allowed
    score = z * Wd[ids].norm(dim=1)
    ka = min(k_aux, int(allowed.sum()))
    kth = torch.topk(score, ka, dim=1).values[:, -1:]
    slack = tol * (score.abs().max() + 1e-12)
    assert (nz.sum(1) <= ka).all()
    assert not (nz & (score < kth - slack)).any(), "a latent outside the row's top k_aux"
    assert (nz | (score <= kth + slack) | (score == 0)).all(), "a top-k_aux latent was dropped"
    (out * grad.float()).sum().backward()
    assert W_enc.grad is None and b_enc.grad is None and W_dec.grad is None, "full-size gradients were built"
    rg.add_to()
    leaves = [t.detach().double().requires_grad_() for t in (W_enc, b_enc, W_dec)]
    We, be, Wd = leaves
    want = (torch.relu(x64 @ We[ids].t() + be[ids]) * nz) @ Wd[ids]
    (want * grad.double()).sum().backward()
    assert_close(out.double(), want.detach(), rtol=tol, atol=tol * float(want.detach().abs().max()))
    outside = torch.ones(n, dtype=torch.bool)
    outside[ids] = False
    for name, got, ref in zip(("dW_enc", "db_enc", "dW_dec"), (W_enc, b_enc, W_dec), leaves):
        assert got.grad is not None and got.grad.dtype == dtype, name
        assert not got.grad[outside].any(), f"{name}: rows outside the candidates"
        scale = float(ref.grad.abs().max()) + 1e-12
        assert_close(got.grad.double(), ref.grad, rtol=tol, atol=tol * scale, what=name)
    with pytest.raises(ValueError, match="row_grads"):
        select_dense(scores, ids.clone(), k_aux, row_grads=RowGrads(ids))


def _aux_run(steps, refresh, seed=5, state=None, start=0):
    """An AuxK step (dead window of 5 steps, so latents die and revive during the run) trained for
    ``steps`` steps from ``start``; returns (step, per-step metrics, every step's (dead, candidates))."""
    st = _step(auxk=True, k_aux=6, dead_window_tokens=5 * 40, aux_refresh_steps=refresh, hold_dead=True,
               reset_dead_moments=True)
    if state is not None:
        st.sae.load_state_dict(state[0])
        st.load_full_state(state[0], state[1])
        st.load_state_dict(state[2])
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(40, 24, generator=g) * 2 + 1 for _ in range(start + steps)]
    seen, metrics = [], []
    real = st.aux_candidates

    def spy(t, x_n):
        c = real(t, x_n)
        seen.append((st.since_fired >= st.cfg.dead_window_tokens, c.clone()))
        return c

    st.aux_candidates = spy
    for t in range(start, start + steps):
        metrics.append({k_: float(v) for k_, v in st(xs[t], None, t).items()})
    return st, metrics, seen


def test_auxk_candidates_refreshed_every_few_steps_change_cost_not_result():
    """The GPU's refresh interval (a host sync every R steps) against every step (the CPU's): every dead
    latent is among the candidates at every step, the losses, the counters and the weights agree, and
    the candidates grow only where latents can die before the next refresh."""
    ref, ref_m, ref_seen = _aux_run(16, 1)
    assert sum(m["dead_fraction"] > 0 for m in ref_m) >= 8 and any(m["auxk_loss"] > 0 for m in ref_m)
    for R in (2, 3, 5):
        st, mets, seen = _aux_run(16, R)
        for t, (dead, cands) in enumerate(seen):
            mask = torch.zeros_like(dead)
            mask[cands] = True
            assert not (dead & ~mask).any(), f"R={R} step {t}: a dead latent outside the candidates"
            assert torch.equal(ref_seen[t][0], dead)
        assert sum(c.numel() for _, c in seen) > sum(c.numel() for _, c in ref_seen)  # supersets on some steps
        assert all(c.numel() < 96 for _, c in seen[5:])  # yet not every latent
        for t, (a, b) in enumerate(zip(ref_m, mets)):
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (R, t, key)
        for name in ("since_fired", "fire_count", "deaths", "was_reset"):
            assert torch.equal(getattr(st, name), getattr(ref, name)), name
        for p, q in zip(st.params, ref.params):
            assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_auxk_costs_nothing_until_a_latent_can_die(monkeypatch):
    """Early in training no latent can be dead before the next refresh: no AuxK selection runs, the
    encode keeps no pre-activations (so the fused encode stays open), and the metric reads 0."""
    import trainer.parallel.sharded as sharded

    calls = []
    monkeypatch.setattr(sharded, "select_dense", lambda *a, **k: calls.append(1))
    st = _step(auxk=True, k_aux=6, dead_window_tokens=10 ** 6, aux_refresh_steps=8)
    kept = []
    real = st.encode_decode
    st.encode_decode = lambda x_n, k, keep_pre=None: (kept.append(keep_pre), real(x_n, k, keep_pre=keep_pre))[1]
    x = torch.randn(40, 24)
    for t in range(10):
        m = st(x, None, t)
        assert float(m["auxk_loss"]) == 0.0
    assert calls == [] and kept == [False] * 10 and st._aux_ids.numel() == 0 and st._aux_next == 16


def test_auxk_candidates_resume_exactly():
    """A run stopped between two refreshes resumes with the candidates it was using (they are in the
    step's state; on a GPU another candidate set means other GEMM shapes, so other roundings): the
    same candidates and the same weights, bitwise, as the run that was not stopped."""
    full, full_m, full_seen = _aux_run(12, 3)
    head, _, _ = _aux_run(7, 3)
    sae_sd, opt_sd = head.full_state()
    state = (sae_sd, opt_sd, head.state_dict())
    assert "aux_ids" in state[2] and int(state[2]["aux_next"]) == 9
    tail, tail_m, tail_seen = _aux_run(5, 3, state=state, start=7)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(tail_seen, full_seen[7:]))
    assert tail_m == full_m[7:]
    for p, q in zip(tail.params, full.params):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("loss", ["llama_scope", "fvu"])
def test_step_gradients_with_auxk_over_candidates_against_float64(loss):
    """The whole step's gradients (main loss + coef x AuxK, AuxK over candidates with the dead masked and
    its candidate-row gradients added after the backward) against float64 autograd of the formulas."""
    w, B, k, k_aux, coef = 400, 33, 4, 6, 0.25
    st = _step(dtype=torch.float64, loss=loss, auxk=True, k_aux=k_aux, auxk_coef=coef, dead_window_tokens=w,
               aux_refresh_steps=3)
    sae = st.sae
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1, generator=g, dtype=torch.float64) + 0.5)
        sae.b_enc.add_(0.3)
    # 30 dead latents, 20 more among the candidates (dead within 3 steps), the rest alive
    since = torch.zeros(96, dtype=torch.int64)
    perm = torch.randperm(96, generator=g)
    since[perm[:30]] = w + 5
    since[perm[30:50]] = w - B
    st.since_fired = since
    x = torch.randn(B, 24, generator=g, dtype=torch.float64) + 1
    captured = {}
    real = st.opt.step

    def spy(*a, **kw):
        captured.update({i: p.grad.detach().clone() for i, p in enumerate(st.params)})
        return real(*a, **kw)

    st.opt.step = spy
    params = [p.detach().clone() for p in st.params]
    st(x, None, 1)
    assert st._aux_ids.numel() == 50
    We, be, Wd, bd = (p.double().requires_grad_() for p in params)
    xn = x * sae.cfg.norm_in
    z = torch.relu(xn @ We.t() + be)
    norm = Wd.detach().norm(dim=1)
    top = (z.detach() * norm).topk(k, dim=1).indices
    keep = torch.zeros_like(z, dtype=torch.bool).scatter_(1, top, True)
    x_hat = (z * keep) @ Wd + bd
    y = x * sae.cfg.norm_out
    mean = y.mean(0, keepdim=True)
    dead = since >= w
    aux_score = torch.where(dead, z.detach() * norm, torch.full_like(z, -1.0))
    aux_keep = torch.zeros_like(keep).scatter_(1, aux_score.topk(k_aux, dim=1).indices, True) & dead
    e_hat = (z * aux_keep) @ Wd
    residual = (y - x_hat).detach()
    if loss == "llama_scope":
        den = (y - mean).norm(dim=1, keepdim=True)
        total = ((x_hat - y) ** 2 / den).mean() + coef * ((e_hat - residual) ** 2 / den).mean()
    else:
        den = ((y - mean) ** 2).sum()
        total = ((x_hat - y) ** 2).sum() / den + coef * ((e_hat - residual) ** 2).sum() / den
    total.backward()
    for i, ref in enumerate((We, be, Wd, bd)):
        scale = float(ref.grad.abs().max())
        assert_close(captured[i], ref.grad, rtol=1e-5, atol=1e-5 * scale, what=f"grad {i}")
