"""SIGTERM and Ctrl-C in the training loop (trainer/train/stop.py, Trainer.fit; docs/training.md "Resume,
preemption"): a signal ends the run at the next step boundary with a checkpoint and the signal's exit
status; a second Ctrl-C more than a second after the first stops at once (KeyboardInterrupt), one within
a second is the same keypress delivered twice; a signal during the last step is not swallowed: it is
delivered again once the loop's handlers are gone (under ``python -m trainer.run``: exit status 143)."""
import contextlib
import os
import signal
import types
from pathlib import Path

import pytest
import torch

from sae_kernels import SAEConfig, TopKSAE
from trainer.train import Member, SAEStep, StepConfig, Trainer, make_optimizer
from trainer.train import stop as stop_mod
from trainer.train.stop import Interrupted, StopSignals


class Clock:
    """A fake ``time.monotonic`` for stop.py: ``now`` is what it answers."""

    def __init__(self, now=1000.0):
        self.now = now

    def monotonic(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(stop_mod, "time", types.SimpleNamespace(monotonic=c.monotonic))
    return c


@contextlib.contextmanager
def no_keyboard_interrupt(what):
    """A KeyboardInterrupt where none is due fails the test (instead of ending the whole pytest session)."""
    try:
        yield
    except KeyboardInterrupt:
        pytest.fail(f"{what}: KeyboardInterrupt (stopped at once, without a checkpoint)")


def presses(s, clock, times, signum=signal.SIGINT):
    """Deliver ``signum`` to ``s``'s handler at each of ``times`` (seconds after the clock's start)."""
    t0 = clock.now
    for t in times:
        clock.now = t0 + t
        with no_keyboard_interrupt(f"signal {int(signum)} at +{t}s"):
            s._handler(signum, None)


# ------------------------------------------------------------------ the handler's rule


def test_a_second_ctrl_c_within_a_second_is_the_same_keypress(clock):
    s = StopSignals()
    presses(s, clock, [0.0, 0.3, 0.99])  # a terminal and torchrun both forward one keypress
    assert s.signum == signal.SIGINT  # stop at the next step boundary, with a checkpoint


def test_a_second_ctrl_c_more_than_a_second_later_stops_at_once(clock):
    s = StopSignals()
    presses(s, clock, [0.0])
    clock.now += 1.01
    with pytest.raises(KeyboardInterrupt):
        s._handler(signal.SIGINT, None)
    # the second is measured from the first press, not from the last duplicate
    s = StopSignals()
    presses(s, clock, [0.0, 0.6])
    clock.now += 0.6  # 1.2 s after the first
    with pytest.raises(KeyboardInterrupt):
        s._handler(signal.SIGINT, None)


def test_a_repeated_sigterm_never_stops_without_a_checkpoint(clock):
    s = StopSignals()
    presses(s, clock, [0.0, 0.5, 5.0, 60.0], signum=signal.SIGTERM)
    assert s.signum == signal.SIGTERM


# ------------------------------------------------------------------ through the training loop


class Batches:
    """A deterministic batch source with the buffer's checkpoint interface; ``on_batch(i)`` runs while the
    batch of step ``i`` (0-based) is read (where a signal arrives)."""

    def __init__(self, on_batch=None, d=16, batch=32):
        self.i, self.d, self.batch, self.on_batch = 0, d, batch, on_batch

    def next_batch(self, exchange=None):
        if self.on_batch is not None:
            self.on_batch(self.i)
        g = torch.Generator().manual_seed(self.i)
        self.i += 1
        return {0: torch.randn(self.batch, self.d, generator=g)}

    def state_dict(self):
        return {"i": self.i}, {"slots": torch.zeros(0, dtype=torch.int64), "rows": torch.zeros(0, self.d)}

    def load_state_dict(self, meta, read_rows):
        self.i = int(meta["i"])


def make_trainer(out, total, checkpoint_every, on_batch):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(16, 32, k=4))
    opt = make_optimizer(sae, 1e-3, (0.9, 0.999))
    sc = StepConfig(k=4, k_start=4, total_steps=total, anneal_steps=0, warmup_steps=1, decay_fraction=0.2,
                    lr=1e-3, clip_grad_norm=1e-3)
    member = Member("m", Path(out) / "m", SAEStep(sae, opt, sc))
    return Trainer([member], Batches(on_batch), total_steps=total, batch_size=32, output=Path(out), log_every=1,
                   checkpoint_every=checkpoint_every, progress=False, log=lambda s: None)


def kill_at(step, *signums, clock=None, gap=0.0):
    """``on_batch``: send ``signums`` to this process while step ``step``'s batch is read, the fake clock
    moving ``gap`` seconds between them."""
    def on_batch(i):
        if i == step:
            for s in signums:
                os.kill(os.getpid(), s)
                if clock is not None:
                    clock.now += gap
    return on_batch


@pytest.fixture
def recorder():
    """SIGTERM's handler while the test runs: records what reaches it (the loop restores it after)."""
    got = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_double_ctrl_c_within_a_second_stops_at_the_step_boundary_with_a_checkpoint(tmp_path, clock):
    before = signal.getsignal(signal.SIGINT)
    tr = make_trainer(tmp_path, total=12, checkpoint_every=4,
                      on_batch=kill_at(5, signal.SIGINT, signal.SIGINT, clock=clock, gap=0.2))
    with pytest.raises(Interrupted) as e, no_keyboard_interrupt("two Ctrl-C 0.2 s apart"):
        tr.fit()
    assert e.value.exit_code == 130
    assert str(e.value).startswith("stopped by SIGINT (Ctrl-C) after step 6 of 12: checkpoint written")
    assert torch.load(tmp_path / Trainer.STATE_FILE, weights_only=True)["step"] == 6
    assert signal.getsignal(signal.SIGINT) is before


def test_a_second_ctrl_c_a_second_later_stops_at_once_without_a_checkpoint(tmp_path, clock):
    before = signal.getsignal(signal.SIGINT)
    tr = make_trainer(tmp_path, total=12, checkpoint_every=4,
                      on_batch=kill_at(5, signal.SIGINT, signal.SIGINT, clock=clock, gap=1.5))
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert tr.t == 5  # during step 6: it never finished
    assert torch.load(tmp_path / Trainer.STATE_FILE, weights_only=True)["step"] == 4  # the periodic one only
    assert sorted(p.name for p in (tmp_path / "m" / "resume").iterdir()) == ["step4.pt"]
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_mid_run_is_acted_on_once(tmp_path, recorder):
    tr = make_trainer(tmp_path, total=12, checkpoint_every=4, on_batch=kill_at(6, signal.SIGTERM))
    with pytest.raises(Interrupted) as e:
        tr.fit()
    assert e.value.signum == signal.SIGTERM and e.value.exit_code == 143
    assert str(e.value).startswith("stopped by SIGTERM after step 7 of 12: checkpoint written")
    assert recorder == []  # consumed: the checkpoint and Interrupted were the answer, it is not delivered again


def test_sigterm_during_the_last_step_is_delivered_after_the_loop(tmp_path, recorder, monkeypatch):
    """The last step finishes (there is no step boundary left to stop at) and the run's own handlers are
    put back; then the signal reaches the handler that was in place before the loop, once."""
    tr = make_trainer(tmp_path, total=6, checkpoint_every=4, on_batch=kill_at(5, signal.SIGTERM))
    seen_in_loop = []
    real_poll = StopSignals.poll

    def poll(self):
        seen_in_loop.append((tr.t, self.signum, list(recorder)))
        return real_poll(self)

    monkeypatch.setattr(StopSignals, "poll", poll)
    last = tr.fit()
    assert last["m"]["step"] == 6 and tr.t == 6  # the loop ran to its end
    assert seen_in_loop[-1] == (6, signal.SIGTERM, [])  # the loop's handler had caught it
    assert recorder == [signal.SIGTERM]  # ... and it was not swallowed


def test_sigterm_during_the_last_step_ends_the_cli_with_status_143(tmp_path):
    """Under ``python -m trainer.run`` (main() installs ``_terminated`` for SIGTERM), a SIGTERM in the last
    step still ends the run as a SIGTERM: Interrupted with exit status 143, not a finished run."""
    from trainer.run import _terminated

    old = signal.signal(signal.SIGTERM, _terminated)
    try:
        tr = make_trainer(tmp_path, total=6, checkpoint_every=4, on_batch=kill_at(5, signal.SIGTERM))
        with pytest.raises(Interrupted) as e:
            tr.fit()
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.exit_code == 143 and tr.t == 6


def test_ctrl_c_during_the_last_step_is_a_keyboard_interrupt(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    if before is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here (a background job)")
    tr = make_trainer(tmp_path, total=6, checkpoint_every=4, on_batch=kill_at(5, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert tr.t == 6 and signal.getsignal(signal.SIGINT) is before
