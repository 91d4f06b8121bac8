"""Resume and preemption end to end: a run stopped at any step, killed with SIGKILL, stopped by SIGTERM or
Ctrl-C, or stopped under torchrun, continues to bitwise the weights of the uninterrupted run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig
from trainer.run import run
from trainer.train import Trainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = tiny_llama
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
