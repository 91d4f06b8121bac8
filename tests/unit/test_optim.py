"""SAEAdam (sae_kernels.optim) and the training step built on it, on both backends.

The Triton path (fused Adam kernel, two-pass encode, latent-block backward) runs in the interpreter on
CPU; the PyTorch path is torch's foreach Adam. Shapes are small and odd.
"""
import pytest
import torch

from helpers import BACKENDS, DEVICE, assert_close
from sae_kernels import SAEConfig, TopKSAE
from sae_kernels.optim import HOLD, RESET, SAEAdam
from trainer.train import SAEStep, StepConfig, make_optimizer


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(13, 37, generator=g).to(DEVICE).requires_grad_(),
            torch.randn(1000, generator=g).to(DEVICE).requires_grad_()]


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_saeadam_equals_torch_adam_with_scaled_gradients(backend):
    """grad_scale multiplies the gradients inside the update: the same as torch's Adam on gradients
    multiplied beforehand (bitwise on the PyTorch path, fp32 rounding on the fused kernel)."""
    a, b = _params(), _params()
    opt_a = SAEAdam(a, lr=1e-2, betas=(0.9, 0.9999))
    opt_b = torch.optim.Adam(b, lr=1e-2, betas=(0.9, 0.9999), foreach=True)
    for t in range(3):
        _grads(a, t)
        _grads(b, t)
        scale = torch.tensor(0.3 if t else 1.0, device=DEVICE)
        for p in b:
            p.grad.mul_(scale)
        opt_a.step(grad_scale=scale)
        opt_b.step()
    tol = 0.0 if backend == "torch" else 2e-6
    for pa, pb in zip(a, b):
        assert (pa.detach() - pb.detach()).abs().max() <= tol
    for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
        assert float(sa["step"]) == float(sb["step"]) == 3.0
        assert (sa["exp_avg"] - sb["exp_avg"]).abs().max() <= tol
    # the state layout is torch's: each optimizer loads the other's state dict
    opt_b.load_state_dict(opt_a.state_dict())
    opt_a.load_state_dict(opt_b.state_dict())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_row_flags_hold_values_and_reset_moments_against_float64(backend):
    """``row_flags``: a HOLD row keeps its values while its moments take the step; a RESET row restarts
    its Adam: moments from zero and bias corrections counting the steps since its reset (a fresh Adam
    on that row); HOLD | RESET both. Rows of a 2-D weight and elements of a bias (13 x 37 and 1000: odd,
    several kernel blocks), against Adam in float64, over enough steps that the restarted rows'
    corrections differ from the run's."""
    params = _params(3)
    W, b = params
    opt = SAEAdam(params, lr=1e-2, betas=(0.9, 0.999))
    ref = [p.detach().double().cpu().clone() for p in params]
    m = [torch.zeros_like(r) for r in ref]
    v = [torch.zeros_like(r) for r in ref]
    t0 = [torch.zeros(p.shape[0], dtype=torch.float64) for p in params]  # step count at each row's last reset
    g = torch.Generator().manual_seed(9)
    for t in range(1, 9):
        _grads(params, 20 + t)
        flags = [torch.randint(0, 4, (p.shape[0],), generator=g, dtype=torch.uint8) for p in params]
        if t > 4:  # rarer resets later: rows that go on stepping long after theirs
            flags = [f & torch.where(torch.rand(f.shape, generator=g) < 0.2, 3, 1).to(torch.uint8) for f in flags]
        if t == 1:
            flags = [torch.zeros_like(f) for f in flags]  # the first step creates the state
        for p, f in zip(params, flags):  # held rows see no gradient, as an SAE's unselected latents
            f = f.to(DEVICE)
            shape = (-1,) + (1,) * (p.dim() - 1)
            p.grad.mul_(((f & HOLD) == 0).to(p.grad.dtype).view(shape))
        opt.step(row_flags={p: f.to(DEVICE) for p, f in zip(params, flags)})
        for j, p in enumerate(params):
            gr, f = p.grad.double().cpu(), flags[j].long()
            shape = (-1,) + (1,) * (p.dim() - 1)
            reset = ((f & RESET) != 0).view(shape)
            hold = ((f & HOLD) != 0).view(shape)
            m[j] = torch.where(reset, 0.0, m[j]) * 0.9 + 0.1 * gr
            v[j] = torch.where(reset, 0.0, v[j]) * 0.999 + 0.001 * gr * gr
            t0[j] = torch.where(reset.view(-1), float(t - 1), t0[j])
            n = (t - t0[j]).view(shape)  # steps since the row's reset (t when never reset)
            upd = 1e-2 / (1 - 0.9 ** n) * m[j] / (v[j].sqrt() / (1 - 0.999 ** n) ** 0.5 + 1e-8)
            ref[j] = torch.where(hold, ref[j], ref[j] - upd)
    for j, p in enumerate(params):
        st = opt.state[p]
        assert_close(p.detach().double().cpu(), ref[j], rtol=1e-5, atol=1e-6, what=f"param {j}")
        assert_close(st["exp_avg"].double().cpu(), m[j], rtol=1e-5, atol=1e-7, what=f"exp_avg {j}")  # fp32 ulps
        assert_close(st["exp_avg_sq"].double().cpu(), v[j], rtol=1e-5, atol=1e-12, what=f"exp_avg_sq {j}")
        assert torch.equal(st["row_step0"].double().cpu(), t0[j]), f"row_step0 {j}"
    # restarted rows step differently from the run's corrections: this test would see the difference
    assert any(bool((r > 0).any()) for r in t0)
    with pytest.raises(ValueError, match="row_flags: expected uint8"):
        opt.step(row_flags={W: torch.zeros(W.shape[0], dtype=torch.bool, device=DEVICE)})


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_restarted_rows_step_as_a_fresh_torch_adam(backend):
    """The default recipe's flags (HOLD / RESET with a gradient factor, as SAEStep passes them every
    step) against an independent reference: torch's own Adam in float64 with one parameter per row
    (per element of the bias), whose state is dropped when the row is reset, so a restarted row steps
    as a fresh Adam from there. eps = 0.1 is large against sqrt(v) / bias corrections (gradients of
    order 1, beta2 0.999: sqrt(1 - beta2**n) ~ 0.03-0.06 over these steps), so the order of the per-row
    second-moment correction and eps (``sqrt(v) / bc2 + eps``, not ``(sqrt(v) + eps) / bc2``) changes
    the update by a factor of ~2-4, far above fp32 rounding; four steps."""
    lr, betas, eps = 1e-2, (0.9, 0.999), 0.1
    params = _params(7)
    opt = SAEAdam(params, lr=lr, betas=betas, eps=eps)
    # the reference: every row (element of a 1-D bias) its own float64 leaf in one torch Adam
    rows = [[r.clone().requires_grad_() for r in p.detach().double().cpu()] for p in params]
    ref = torch.optim.Adam([r for rs in rows for r in rs], lr=lr, betas=betas, eps=eps, foreach=False)
    g = torch.Generator().manual_seed(17)
    restarted_steps = 0
    for t in range(1, 5):
        _grads(params, 40 + t)
        flags = [torch.zeros(p.shape[0], dtype=torch.uint8) for p in params]
        if t > 1:  # the first step creates the state; then RESET ~30%, HOLD ~20% of rows, some both
            flags = [(torch.rand(f.shape, generator=g) < 0.3).to(torch.uint8) * RESET
                     | (torch.rand(f.shape, generator=g) < 0.2).to(torch.uint8) * HOLD for f in flags]
        scale = torch.tensor(0.6 if t % 2 else 1.0, device=DEVICE)
        for p, f, rs in zip(params, flags, rows):
            shape = (-1,) + (1,) * (p.dim() - 1)
            p.grad.mul_(((f.to(DEVICE) & HOLD) == 0).to(p.grad.dtype).view(shape))  # held rows: no gradient
            for i, r in enumerate(rs):
                r.grad = p.grad[i].double().cpu() * float(scale)
                if f[i] & RESET:
                    ref.state.pop(r, None)  # a fresh Adam for this row from this step on
        held = [(r, r.detach().clone()) for f, rs in zip(flags, rows) for i, r in enumerate(rs) if f[i] & HOLD]
        opt.step(grad_scale=scale, row_flags={p: f.to(DEVICE) for p, f in zip(params, flags)})
        ref.step()
        with torch.no_grad():
            for r, value in held:  # HOLD keeps the values; the moments took the step
                r.copy_(value)
        restarted_steps += sum(int(((f & RESET) != 0).sum()) for f in flags)
    assert restarted_steps > 0
    for j, (p, rs) in enumerate(zip(params, rows)):
        want = torch.stack([r.detach() for r in rs])
        st = opt.state[p]
        assert_close(p.detach().double().cpu(), want, rtol=1e-5, atol=1e-6, what=f"param {j} vs fresh Adam per row")
        m = torch.stack([ref.state[r]["exp_avg"] for r in rs])
        v = torch.stack([ref.state[r]["exp_avg_sq"] for r in rs])
        assert_close(st["exp_avg"].double().cpu(), m, rtol=1e-5, atol=1e-7, what=f"exp_avg {j}")
        assert_close(st["exp_avg_sq"].double().cpu(), v, rtol=1e-5, atol=1e-12, what=f"exp_avg_sq {j}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_tracked_copies_and_norms_follow_the_parameter(backend):
    """The bf16 copy and the row norms are rewritten by the step, and recomputed when the parameter
    changes outside it (version counter): never stale."""
    W, b = _params(1)
    opt = SAEAdam([W, b], lr=1e-2, betas=(0.9, 0.9999))
    opt.track(W, copy_dtype=torch.bfloat16, row_norms=True)

    def check():
        copy, norms = opt.compute_copy(W), opt.row_norms(W)
        assert copy.dtype == torch.bfloat16
        err = (copy.double() - W.detach().double()).abs()
        assert bool((err <= 2.0 ** -7 * W.detach().double().abs() + 1e-30).all())
        want = W.detach().double().norm(dim=1)
        assert bool(((norms.double() - want).abs() <= 1e-6 * want).all())

    check()
    _grads([W, b], 5)
    opt.step(grad_scale=torch.tensor(0.5, device=DEVICE))
    check()
    with torch.no_grad():
        W.mul_(3.0)  # outside the optimizer
    check()
    with pytest.raises(ValueError, match="not one this optimizer updates"):
        opt.track(torch.zeros(3, requires_grad=True))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_tracked_copies_and_norms_follow_a_replaced_storage(backend):
    """Copies and norms are refreshed when a parameter's storage is replaced, which moves no version
    counter: ``param.data = t``, and ``Module.to(dtype)`` round trips (they set ``.data`` the same way).
    SAEAdam watches the storage's address as well as the version: with the version alone the copies
    and norms of the old storage would be served. ``load_state_dict`` copies into the same storage
    (the version moves, the address does not). The trainer's optimizer over a TopKSAE, tracked as
    SAEStep tracks it (bf16 copies, decoder norms); each check against the values now in place."""
    torch.manual_seed(5)
    sae = TopKSAE(SAEConfig(40, 130, k=5), device=DEVICE)
    opt = make_optimizer(sae, 1e-2, (0.9, 0.9999))
    for p in (sae.W_enc, sae.W_dec):
        opt.track(p, copy_dtype=torch.bfloat16, row_norms=p is sae.W_dec)

    def check(what):
        for name in ("W_enc", "W_dec"):
            p = getattr(sae, name)
            copy = opt.compute_copy(p)
            assert copy.dtype == torch.bfloat16 and copy.shape == p.shape, what
            assert_close(copy, p.detach().double(), rtol=2.0 ** -7, what=f"{what}: {name} copy")
        assert_close(opt.row_norms(sae.W_dec), sae.W_dec.detach().double().norm(dim=1), rtol=1e-6,
                     what=f"{what}: W_dec row norms")

    check("initial")
    g = torch.Generator().manual_seed(6)
    for p in (sae.W_enc, sae.W_dec):  # a new storage, the version counter as it was
        version, ptr = p._version, p.data_ptr()
        p.data = (torch.randn(p.shape, generator=g) * 2 + 0.5).to(DEVICE)
        assert p._version == version and p.data_ptr() != ptr
    check("after param.data = new tensor")
    for p in sae.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
    opt.step(grad_scale=torch.tensor(0.5, device=DEVICE))
    check("after a step on the new storage")
    ptr = sae.W_dec.data_ptr()
    other = TopKSAE(SAEConfig(40, 130, k=5), device=DEVICE)  # other random weights
    sae.load_state_dict(other.state_dict())
    assert sae.W_dec.data_ptr() == ptr and torch.equal(sae.W_dec.detach(), other.W_dec.detach())
    check("after load_state_dict")
    # Values rounded to fp16, in a new storage, version kept. The old storage is kept alive: once freed,
    # the fp32 allocation of the way back may reuse its address, which the address check cannot tell
    # from the old storage (a known limit of SAEAdam's (version, address) key).
    old = sae.W_dec.data
    version, ptr = sae.W_dec._version, sae.W_dec.data_ptr()
    sae.to(torch.float16).to(torch.float32)
    assert sae.W_dec._version == version and sae.W_dec.data_ptr() != ptr
    check("after a round trip through fp16")
    del old


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bf16_moments_option(backend):
    a = _params(2)
    opt = SAEAdam(a, lr=1e-2, betas=(0.9, 0.9999), moments_dtype=torch.bfloat16)
    ref = _params(2)
    opt_ref = torch.optim.Adam(ref, lr=1e-2, betas=(0.9, 0.9999))
    for t in range(3):
        _grads(a, t)
        _grads(ref, t)
        opt.step()
        opt_ref.step()
    st = opt.state[a[0]]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
    for p, q in zip(a, ref):  # bf16 moments: the update direction agrees to bf16 precision
        assert (p.detach() - q.detach()).abs().max() <= 3e-2 * 1e-2 * 3
    sd = opt_ref.state_dict()  # an fp32 checkpoint: moments come back in bf16
    opt.load_state_dict(sd)
    _grads(a, 9)
    opt.step()
    assert opt.state[a[0]]["exp_avg"].dtype == torch.bfloat16


def _step(compute_dtype=None, auxk=False, seed=0, flags=False):
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(40, 130, k=5), device=DEVICE)
    opt = make_optimizer(sae, 1e-3, (0.9, 0.9999))
    sc = StepConfig(k=5, k_start=9, total_steps=20, anneal_steps=2, warmup_steps=2, decay_fraction=0.2,
                    lr=1e-3, clip_grad_norm=1e-3, auxk=auxk, k_aux=16, dead_window_tokens=1,
                    compute_dtype=compute_dtype, hold_dead=flags, reset_dead_moments=flags)
    return SAEStep(sae, opt, sc)


@pytest.mark.parametrize("flags", [False, True], ids=["no-flags", "recipe-flags"])
def test_training_step_on_triton_equals_the_pytorch_path(monkeypatch, flags):
    """Three steps of the trainer's SAEStep (K-annealing, clipping folded into the fused Adam, AuxK
    from the kept pre-activations) on the Triton path in the interpreter end where the PyTorch path
    does, in fp32. ``recipe-flags``: with the default recipe's dead-latent row flags (hold_dead,
    reset_dead_moments: HOLD / RESET on every step, latents that die at step 1 restart their Adam),
    so the fused kernel runs its per-row bias corrections (ROW_BC) against torch's arithmetic."""
    import os

    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter on CPU")
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(23, 40, generator=g).to(DEVICE) for _ in range(3)]
    out = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SAE_KERNELS_BACKEND", backend)
        st = _step(auxk=True, flags=flags)
        metrics = [st(x, None, t) for t, x in enumerate(xs)]
        out[backend] = (st, metrics)
        if flags:  # the flags restarted rows that then stepped (not all held): the ROW_BC path ran
            r0 = st.opt.state[st.sae.W_enc]["row_step0"]
            assert bool((r0 > 0).any()) and bool(st.was_reset.any()), backend
    (a, ma), (b, mb) = out["torch"], out["triton"]
    for key in ("loss", "l0", "auxk_loss"):
        for t in range(3):
            assert abs(float(ma[t][key]) - float(mb[t][key])) <= 1e-5 * max(1.0, abs(float(ma[t][key]))), (key, t)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        d = (getattr(a.sae, name) - getattr(b.sae, name)).abs().max()
        assert d <= 1e-6, f"{name}: {d:.3g}"  # lr 1e-3: a wrong update would differ by ~1e-3
    assert torch.equal(a.since_fired, b.since_fired)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bf16_step_reads_copies_that_the_optimizer_keeps(backend):
    """With bf16 compute the step reads SAEAdam's copies (no cast per step) and fp32 decoder norms of
    the masters; the masters' gradients are fp32; after the step the copies match the new masters."""
    st = _step(compute_dtype=torch.bfloat16)
    x = torch.randn(17, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    st(x, None, 0)
    (We, be, Wd, bd), norms = st.compute_weights()
    assert We.dtype == torch.bfloat16 and We is st.opt.compute_copy(st.sae.W_enc)
    err = (We.double() - st.sae.W_enc.detach().double()).abs()
    assert bool((err <= 2.0 ** -7 * st.sae.W_enc.detach().double().abs() + 1e-30).all())
    want = st.sae.W_dec.detach().double().norm(dim=1)
    assert norms.dtype == torch.float32 and bool(((norms.double() - want).abs() <= 1e-6 * want).all())
    seen = {}
    real = st.opt.step

    def spy(*a, **k):
        seen["dtypes"] = {p.grad.dtype for p in st.params}
        return real(*a, **k)

    st.opt.step = spy
    st(x, None, 1)
    assert seen["dtypes"] == {torch.float32}
