"""The training step (loss, clipping, K-annealing, AuxK, dead latents) and exact resume."""
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from sae_kernels import SAEConfig, TopKSAE
from trainer.config import TrainConfig
from trainer.train import (
    SAEStep, StepConfig, Trainer, estimate_norm, fvu_loss, llama_scope_loss, make_optimizer,
)

REPO = Path(__file__).resolve().parents[2]


def test_llama_scope_loss_matches_float64_formula():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(37, 13, generator=g, dtype=torch.float64) * 3 + 1
    x_hat = y + 0.3 * torch.randn(37, 13, generator=g, dtype=torch.float64)
    want = 0.0
    for t in range(37):
        den = max(float((y[t] - y.mean(0)).norm()), 1e-8)
        want += float(((x_hat[t] - y[t]) ** 2).sum()) / den
    want /= 37 * 13
    assert float(llama_scope_loss(x_hat, y)) == pytest.approx(want, rel=1e-12)
    fvu = float(((x_hat - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    assert float(fvu_loss(x_hat, y)) == pytest.approx(fvu, rel=1e-12)
    # the clamp: a constant batch has zero centred norm
    yc = torch.ones(4, 3, dtype=torch.float64)
    assert math.isfinite(float(llama_scope_loss(yc + 1, yc)))


def test_estimate_norm():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert estimate_norm(x) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        estimate_norm(torch.empty(0, 2))


def make_step(d=24, n=96, k=4, k_start=None, total=40, **kw):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d, n, k=k))
    sae.check_inputs = False
    opt = make_optimizer(sae, kw.pop("lr", 1e-3), (0.9, 0.9999))
    sc = StepConfig(k=k, k_start=k_start or k, total_steps=total, anneal_steps=int(0.1 * total) if k_start else 0,
                    warmup_steps=kw.pop("warmup", 2), decay_fraction=0.2, lr=opt.param_groups[0]["lr"],
                    clip_grad_norm=kw.pop("clip", 1e-3), **kw)
    return SAEStep(sae, opt, sc)


def test_step_clips_gradient_norm_and_uses_schedules():
    st = make_step(k_start=12, total=100, clip=1e-3)
    norms = []
    real_norm = st.ctx.grad_norm

    def record(params):
        n = real_norm(params)
        norms.append(float(n))
        return n

    st.ctx.grad_norm = record
    seen = {}
    orig = st.encode_decode

    def spy(x_n, k, **kw):
        seen["k"] = k
        return orig(x_n, k, **kw)

    st.encode_decode = spy
    before = st.sae.W_enc.detach().clone()
    x = torch.randn(64, 24)
    st(x, None, 0)
    assert seen["k"] == 12  # K-annealing starts at k_start
    assert st.opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 2)  # warmup 2 steps: (0+1)/2
    assert norms[0] > 1e-3  # the raw gradient is larger than the clip ...
    # ... so Adam's first update is lr * sign-ish regardless; check the clipped grads instead:
    st2 = make_step(clip=1e-3)
    x_n = x * st2.sae.cfg.norm_in
    v, i, xh = st2.encode_decode(x_n, 4)
    llama_scope_loss(xh, x).backward()
    raw = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in st2.params]))
    assert raw > 1e-3
    st(x, None, 10)
    assert seen["k"] == 4 and not torch.equal(before, st.sae.W_enc.detach())


def test_step_clip_really_bounds_the_update_direction():
    st = make_step(clip=1e-3)
    captured = {}
    real_step = st.opt.step

    def step_spy(*a, **k):
        # SAEAdam applies the clip factor inside the update (grad_scale), not to .grad beforehand
        scale = float(k["grad_scale"]) if k.get("grad_scale") is not None else 1.0
        captured["norm"] = scale * float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in st.params])))
        return real_step(*a, **k)

    st.opt.step = step_spy
    st(torch.randn(64, 24) * 10, None, 5)
    assert captured["norm"] == pytest.approx(1e-3, rel=1e-3)


def test_plain_and_weighted_selection_differ_only_by_decoder_norms():
    st = make_step()
    with torch.no_grad():
        st.sae.W_dec[:48] *= 4.0  # unequal decoder norms
    x = torch.randn(32, 24)
    v_w, i_w, _ = st.encode_decode(x, 4)
    st.sae.cfg = st.sae.cfg.replace(weighted_topk=False)
    v_p, i_p, _ = st.encode_decode(x, 4)
    z = torch.relu(x @ st.sae.W_enc.t() + st.sae.b_enc).detach()
    n = st.sae.W_dec.detach().norm(dim=1)
    assert torch.equal(i_w.sort(1).values, torch.topk(z * n, 4, dim=1).indices.sort(1).values)
    assert torch.equal(i_p.sort(1).values, torch.topk(z, 4, dim=1).indices.sort(1).values)
    assert not torch.equal(i_w.sort(1).values, i_p.sort(1).values)


def test_death_counter_counts_each_crossing_of_the_window():
    """``deaths`` counts the steps at which a latent's tokens-since-fired crosses the dead window:
    once for a latent that never fires, again each time a revived latent dies anew; a latent that
    fires within every window never counts. Checked against the same counts done by hand."""
    st = make_step(dead_window_tokens=20)
    g = torch.Generator().manual_seed(1)
    fires = torch.rand(30, 96, generator=g) < torch.linspace(0.0, 0.6, 96)  # latent 0 never fires
    since, deaths = torch.zeros(96, dtype=torch.int64), torch.zeros(96, dtype=torch.int64)
    for f in fires:
        st.advance_counters(st.since_fired, st.fire_count, st.deaths, f.long() * 2, 8)
        old, since = since, torch.where(f, 0, since + 8)
        deaths += ((since >= 20) & (old < 20)).long()
    assert torch.equal(st.deaths, deaths) and torch.equal(st.since_fired, since)
    assert torch.equal(st.fire_count, fires.long().sum(0) * 2)
    assert int(st.deaths[0]) == 1 and int(deaths.max()) >= 2  # never fired: one death; some died twice
    assert bool((st.deaths == 0).any())
    st2 = make_step(dead_window_tokens=20)
    st2.load_state_dict(st.state_dict())
    assert torch.equal(st2.deaths, st.deaths)


def test_dead_latent_tracking_and_auxk_gradients():
    st = make_step(auxk=True, dead_window_tokens=1, k_aux=8)
    x = torch.randn(8, 24)  # 8 tokens x k=4 fire at most 32 of the 96 latents
    m = st(x, None, 0)
    assert "auxk_loss" in m and float(m["dead_fraction"]) == 0.0  # nothing is dead before step 0
    fired = st.fire_count > 0
    assert (st.since_fired[fired] == 0).all() and (st.since_fired[~fired] == 8).all()
    # now most latents are dead: AuxK must train encoder rows the main TopK did not select
    v, i, _ = st.encode_decode(x * st.sae.cfg.norm_in, 4)
    selected = torch.zeros(96, dtype=torch.bool)
    selected[i.reshape(-1)] = True
    st.opt.zero_grad()
    captured = {}
    real = st.opt.step

    def spy(*a, **k):
        captured["g"] = st.sae.W_enc.grad.detach().clone()
        return real(*a, **k)

    st.opt.step = spy
    m = st(x, None, 1)
    assert float(m["auxk_loss"]) > 0 and float(m["dead_fraction"]) > 0.3
    g_rows = captured["g"].norm(dim=1)
    assert (g_rows[~selected] > 0).any()


def test_sae_learns_a_sparse_dictionary():
    """A short convergence run on synthetic sparse data: loss falls and EV climbs."""
    torch.manual_seed(1)
    d, n_true = 32, 64
    D = torch.nn.functional.normalize(torch.randn(n_true, d), dim=1)

    def batch(b=256):
        idx = torch.rand(b, n_true).topk(4, dim=1).indices
        coef = torch.rand(b, 4) * 2 + 0.5
        return torch.einsum("bk,bkd->bd", coef, D[idx])

    st = make_step(d=32, n=256, k=8, k_start=16, total=150, lr=5e-3, clip=0.0)
    st.sae.cfg = st.sae.cfg.replace(norm_in=math.sqrt(d) / estimate_norm(batch(2048)))
    st.sae.cfg = st.sae.cfg.replace(norm_out=st.sae.cfg.norm_in)
    evs = [float(st(batch(), None, t)["explained_variance"]) for t in range(150)]
    assert evs[-1] > 0.85 and evs[-1] > evs[0] + 0.3, (evs[0], evs[-1])


# ----------------------------------------------------------------------------------- tests that could fail


def test_clipping_leaves_a_gradient_below_the_clip_norm_alone():
    """Three steps whose gradient norms differ by ~1000x, all far below the clip: the parameters must
    equal those of unclipped steps. (Adam is nearly scale invariant for one gradient, so scaling every
    gradient up to the clip norm would pass a one-step test; it changes how the steps are weighted.)"""
    def train(clip):
        st = make_step(clip=clip, warmup=0)
        g = torch.Generator().manual_seed(3)
        for t, s in enumerate((1.0, 30.0, 0.03)):
            st(torch.randn(64, 24, generator=g) * s, None, t + 5)
        return st

    clipped, free = train(1e6), train(0.0)
    for p, q, name in zip(clipped.params, free.params, ("W_enc", "b_enc", "W_dec", "b_dec")):
        rel = float((p - q).detach().abs().max() / q.detach().abs().max())
        assert rel < 1e-6, f"{name}: a gradient below the clip norm was rescaled (relative change {rel:.3g})"


def test_k_annealing_ends_at_the_fraction_of_the_run_not_at_the_warmup():
    cfg = TrainConfig(model="x", tokens=256 * 400, batch_size=256, buffer_tokens=1024, k=20,
                      k_anneal_fraction=0.25).resolve(3, 64, "cpu")
    assert cfg.total_steps == 400 and cfg.warmup_steps == 20 and cfg.k_start == 32
    st = make_step(d=24, n=96, k=4)
    st.cfg = StepConfig.from_train_config(cfg)
    ks = [st.k_at(t) for t in range(400)]
    assert ks[0] == 32 and ks[cfg.warmup_steps] > 20  # still annealing after the warmup
    assert ks[99] == math.ceil(32 - 12 * 99 / 100) == 21 and ks[100] == 20 and set(ks[100:]) == {20}
    assert all(a >= b for a, b in zip(ks, ks[1:]))


class FakeBatches:
    """A deterministic batch source with the buffer's checkpoint interface (no rows to store)."""

    def __init__(self, d=24, batch=32, signal_at=None):
        self.i, self.d, self.batch, self.signal_at = 0, d, batch, signal_at

    def next_batch(self, exchange=None):
        if self.signal_at is not None and self.i == self.signal_at:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while this step's batch is being read
        g = torch.Generator().manual_seed(self.i)
        self.i += 1
        return {0: torch.randn(self.batch, self.d, generator=g)}

    def state_dict(self):
        return {"i": self.i}, {"slots": torch.zeros(0, dtype=torch.int64), "rows": torch.zeros(0, self.d)}

    def load_state_dict(self, meta, read_rows):
        self.i = int(meta["i"])


def fake_trainer(out, total=12, checkpoint_every=4, signal_at=None, **step_kw):
    from trainer.train import Member

    st = make_step(total=total, **step_kw)
    member = Member("m", Path(out) / "m", st)
    return Trainer([member], FakeBatches(signal_at=signal_at), total_steps=total, batch_size=32, output=Path(out),
                   log_every=2, checkpoint_every=checkpoint_every, progress=False, log=lambda s: None)


def test_load_checkpoint_restores_the_rng_states(tmp_path):
    import random

    tr = fake_trainer(tmp_path, total=12, checkpoint_every=0)
    tr.fit()
    torch.manual_seed(123)
    random.seed(456)
    want_torch, want_py = torch.get_rng_state(), random.getstate()
    tr.save_checkpoint()
    torch.rand(5)
    random.random()
    tr2 = fake_trainer(tmp_path, total=12, checkpoint_every=0)
    tr2.load_checkpoint()
    assert torch.equal(torch.get_rng_state(), want_torch) and random.getstate() == want_py
    assert tr2.t == 12 and tr2.batches.i == 12


def test_ctrl_c_writes_a_final_checkpoint_then_raises(tmp_path):
    from trainer.train.stop import Interrupted

    tr = fake_trainer(tmp_path, total=40, checkpoint_every=10, signal_at=6)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with pytest.raises(Interrupted) as e:
        tr.fit()
    assert e.value.signum == signal.SIGINT and e.value.exit_code == 130
    assert str(e.value).startswith("stopped by SIGINT (Ctrl-C) after step 7 of 40: checkpoint written")
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored
    state = torch.load(tmp_path / Trainer.STATE_FILE, weights_only=True)
    assert state["step"] == 7 and state["buffer"] == {"i": 7}
    assert sorted(p.name for p in (tmp_path / "m" / "resume").iterdir()) == ["step7.pt"]
    # checkpointing off: the same stop, and the message says that nothing can be resumed
    tr = fake_trainer(tmp_path / "off", total=40, checkpoint_every=0, signal_at=3)
    with pytest.raises(Interrupted, match="after step 4 of 40; checkpointing is off"):
        tr.fit()
    assert not (tmp_path / "off" / Trainer.STATE_FILE).exists()


def test_metrics_jsonl_logs_the_k_and_lr_of_the_steps_it_averages(tmp_path):
    """Each metrics.jsonl record (every 2 steps, and the last) averages steps step-2 .. step-1: its k and lr
    must be those the step used at its last step, step - 1 (K annealed 16 -> 4 over steps 0-4, lr warmed
    up over 2 steps and decayed over the last 8), not those of the next step."""
    import json

    from trainer.train.schedules import k_schedule, lr_factor

    tr = fake_trainer(tmp_path, total=41, checkpoint_every=0, k_start=16)
    st = tr.members[0].step
    used = {}
    real_encode, real_step = st.encode_decode, st.opt.step

    def encode_spy(x_n, k, **kw):
        used[len(used)] = {"k": k}
        return real_encode(x_n, k, **kw)

    def step_spy(*a, **kw):
        used[len(used) - 1]["lr"] = st.opt.param_groups[0]["lr"]
        return real_step(*a, **kw)

    st.encode_decode, st.opt.step = encode_spy, step_spy
    tr.fit()
    recs = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(2, 41, 2)) + [41] and len(used) == 41
    c = st.cfg
    assert c.anneal_steps == 4 and {used[t]["k"] for t in range(5)} == {16, 13, 10, 7, 4}
    for r in recs:
        t = r["step"] - 1
        assert (r["k"], r["lr"]) == (used[t]["k"], used[t]["lr"]), (  # the same float: JSON round-trips it
            f"record of step {r['step']}: k {r['k']}, lr {r['lr']:.6g}; step {t} used k {used[t]['k']}, "
            f"lr {used[t]['lr']:.6g}")
        assert r["k"] == k_schedule(t, c.k, c.k_start, c.anneal_steps)
        assert r["lr"] == c.lr * lr_factor(t, c.total_steps, c.warmup_steps, c.decay_fraction)
