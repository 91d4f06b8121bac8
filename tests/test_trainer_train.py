"""The training step (loss, clipping, K-annealing, AuxK, dead latents) and exact resume."""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_kernels import SAEConfig, TopKSAE
from trainer.config import TrainConfig
from trainer.run import run
from trainer.testing import tiny_llama_folder
from trainer.train import (
    SAEStep, StepConfig, Trainer, estimate_norm, fvu_loss, llama_scope_loss, make_optimizer,
)

REPO = Path(__file__).resolve().parents[1]


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

    def spy(x_n, k):
        seen["k"] = k
        return orig(x_n, k)

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


# ----------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = tiny_llama_folder(str(root / "model"), layers=3)
    data = root / "docs.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(data, "w") as f:
        for i in range(40):
            text = " ".join(words[(i * j) % len(words)] for j in range(25 + i % 7))
            f.write(json.dumps({"text": text}) + "\n")
    return model, str(data), root


def tiny_cfg(tiny, out, **kw):
    model, data, _ = tiny
    base = dict(model=model, dataset=data, layer=1, context_len=64, lm_batch_size=4, tokens=10240, batch_size=256,
                buffer_tokens=1024, eval_tokens=256, eval_every=5, checkpoint_every=7, log_every=5,
                export_dtype="float32", progress=False, eval_lm_loss=False, cache_activations_gb=1.0,
                output=str(out))
    base.update(kw)
    return TrainConfig(**base)


def weights(run_dir):
    return load_file(str(Path(run_dir) / "checkpoints" / "final.safetensors"))


@pytest.mark.parametrize("position,stop,cache", [("R", 23, 1.0), ("TC", 10, 0.0)])
def test_resume_gives_the_same_weights(tiny, position, stop, cache):
    root = tiny[2]
    quiet = lambda s: None
    name = f"L1{position}-8x"
    full = run(tiny_cfg(tiny, root / f"full{position}", position=position, cache_activations_gb=cache), log=quiet)
    full = full["members"][name]
    stopped = run(tiny_cfg(tiny, root / f"cut{position}", position=position, cache_activations_gb=cache,
                           stop_after_steps=stop), log=quiet)
    assert stopped == {"stopped": stop}
    run_dir = root / f"cut{position}" / name
    state = root / f"cut{position}" / Trainer.STATE_FILE
    assert state.is_file() and not (run_dir / "hyperparams.json").exists()
    # the resume state loads without unpickling code (tensors, numbers, strings, lists, dicts)
    meta = torch.load(state, weights_only=True)
    torch.load(run_dir / "resume" / f"step{meta['step']}.pt", weights_only=True)
    resumed = run(tiny_cfg(tiny, root / f"cut{position}", position=position, cache_activations_gb=cache,
                           resume=True), log=quiet)["members"][name]
    a, b = weights(full["checkpoint"]), weights(resumed["checkpoint"])
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: max diff {(a[key] - b[key]).abs().max()}"
    assert full["explained_variance"] == resumed["explained_variance"]
    lines = lambda p: [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}
                       for ln in (Path(p) / "metrics.jsonl").read_text().splitlines()]
    assert lines(full["checkpoint"]) == lines(resumed["checkpoint"])
    assert not state.exists() and not (run_dir / "resume").exists()  # removed once the run completed


def cli_flags(cfg):
    flags = []
    for k, v in cfg.to_dict().items():
        if v is None or k in ("progress",):
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + flag[2:])
        else:
            flags += [flag, str(v)]
    return [sys.executable, "-m", "trainer.run", "--no-progress", *flags]


@pytest.fixture(scope="module")
def long_ref(tiny):
    """The uninterrupted 160-step run that the killed and preempted runs must end at."""
    root = tiny[2]
    res = run(tiny_cfg(tiny, root / "killed_ref", tokens=40960, checkpoint_every=20), log=lambda s: None)
    return weights(res["members"]["L1R-8x"]["checkpoint"])


def start_and_wait(cmd, until):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (until.exists() and until.stat().st_size) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return proc


def test_resume_after_sigkill(tiny, long_ref):
    """A real kill -9 of `python -m trainer.run` mid-training, then --resume."""
    root = tiny[2]
    cfg = tiny_cfg(tiny, root / "killed", tokens=40960, checkpoint_every=20)
    state = root / "killed" / Trainer.STATE_FILE
    proc = start_and_wait(cli_flags(cfg), state)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not state.exists():
        pytest.fail(f"no checkpoint before the kill: {proc.stderr.read().decode()[-2000:]}")
    assert not (root / "killed" / "L1R-8x" / "hyperparams.json").exists(), "the run finished before the kill"
    resumed = run(tiny_cfg(tiny, root / "killed", tokens=40960, checkpoint_every=20, resume=True),
                  log=lambda s: None)["members"]["L1R-8x"]
    b = weights(resumed["checkpoint"])
    for key in long_ref:
        assert torch.equal(long_ref[key], b[key]), key


def test_sigterm_writes_a_final_checkpoint_and_exits_non_zero(tiny, long_ref, monkeypatch, capsys):
    """What a scheduler does: SIGTERM to `python -m trainer.run` mid-training (here delivered to this process
    while the buffer hands out the batch of step 6, the CLI's main() running in it). The run checkpoints the
    step it is at (the first periodic one would be at step 20), says so in one line, returns exit status 143;
    --resume ends exactly at the uninterrupted run."""
    from trainer.data.buffer import ActivationBuffer
    from trainer.run import main

    root = tiny[2]
    cfg = tiny_cfg(tiny, root / "term", tokens=40960, checkpoint_every=20)
    real, calls = ActivationBuffer.next_batch, []

    def next_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    monkeypatch.setattr(ActivationBuffer, "next_batch", next_batch)
    before = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    assert main(cli_flags(cfg)[3:]) == 143
    lines = capsys.readouterr().err.strip().splitlines()
    state = root / "term" / Trainer.STATE_FILE
    assert lines[-1] == (f"stopped by SIGTERM after step 6 of 160: checkpoint written ({state}); continue with "
                         "the same command and --resume"), lines[-5:]
    assert not any("Traceback" in ln for ln in lines)
    assert signal.getsignal(signal.SIGTERM) == before  # main() put the handler back
    assert torch.load(state, weights_only=True)["step"] == 6
    assert sorted(p.name for p in (root / "term" / "L1R-8x" / "resume").iterdir()) == ["step6.pt"]
    monkeypatch.setattr(ActivationBuffer, "next_batch", real)
    resumed = run(tiny_cfg(tiny, root / "term", tokens=40960, checkpoint_every=20, resume=True),
                  log=lambda s: None)["members"]["L1R-8x"]
    b = weights(resumed["checkpoint"])
    for key in long_ref:
        assert torch.equal(long_ref[key], b[key]), key


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


def fake_trainer(out, total=12, checkpoint_every=4, signal_at=None):
    from trainer.train import Member

    st = make_step(total=total)
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


AGREE_WORKER = r"""
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import torch
import torch.distributed as dist
from sae_kernels import SAEConfig, TopKSAE
from trainer.parallel import init_parallel
from trainer.train.stop import Interrupted
from trainer.train import Member, SAEStep, StepConfig, Trainer, make_optimizer

out = Path(sys.argv[1])
dist.init_process_group("gloo")
ctx = init_parallel(1, timeout_s=60)

class Batches:
    i = 0
    def next_batch(self, exchange=None):
        if ctx.rank == 1 and self.i == 5:  # only rank 1 is preempted, while it reads the batch of step 6
            os.kill(os.getpid(), signal.SIGTERM)
        self.i += 1
        return {0: torch.randn(32, 24, generator=torch.Generator().manual_seed(self.i))}
    def state_dict(self):
        return {"i": self.i}, {"slots": torch.zeros(0, dtype=torch.int64), "rows": torch.zeros(0, 24)}

torch.manual_seed(0)
sae = TopKSAE(SAEConfig(24, 96, k=4))
step = SAEStep(sae, make_optimizer(sae, 1e-3, (0.9, 0.9999)), StepConfig(k=4, k_start=4, total_steps=40, anneal_steps=0,
               warmup_steps=2, decay_fraction=0.2, lr=1e-3, clip_grad_norm=1e-3))
batches = Batches()
member = Member(f"m{ctx.rank}", out / f"m{ctx.rank}", step)
tr = Trainer([member], batches, total_steps=40, batch_size=32, output=out, ctx=ctx, checkpoint_every=25,
             member_dirs={"m0": out / "m0", "m1": out / "m1"}, progress=False, log=lambda s: None)
try:
    tr.fit()
    res = {"stopped": None}
except Interrupted as e:
    res = {"stopped": tr.t, "signum": e.signum, "message": str(e)}
(out / f"rank{ctx.rank}.json").write_text(json.dumps(res))
dist.destroy_process_group()
"""


def test_under_torchrun_every_rank_stops_at_the_same_step(tmp_path):
    """SIGTERM reaches one rank only (or the ranks at different steps): the job still stops at one step,
    with one checkpoint of every rank's part."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", AGREE_WORKER, str(tmp_path), str(REPO)], env=env,
                                      stderr=subprocess.PIPE))
    errs = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert res[0]["stopped"] == res[1]["stopped"] == 7, res  # flag posted after step 6, read after step 7
    assert res[0]["signum"] == res[1]["signum"] == signal.SIGTERM
    state = torch.load(tmp_path / Trainer.STATE_FILE, weights_only=True)
    assert state["step"] == 7 and state["world_size"] == 2
    assert (tmp_path / "m0" / "resume" / "step7.pt").is_file() and (tmp_path / "m1" / "resume" / "step7.pt").is_file()
