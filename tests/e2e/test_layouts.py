"""The same SAEs whatever the layout: full ``trainer.run`` jobs on 2 and 4 gloo processes end at the
single-process checkpoint (relative 1e-5 per tensor), and a run stopped under one layout resumes
under another (docs/method.md sec. 8, layout independence; sec. 10, suites under torchrun).

Every job trains the suite ``L1R, L2TC`` (an R and a TC member; a suite member is bitwise the SAE
trained alone, see test_trainer_suite.py) or one of its members, on a tiny random Llama. One launch
per world size runs several jobs on one process group (process start-up is the expensive part):

==========  =====  ====================================================================
world       --tp   what it shows
==========  =====  ====================================================================
2           1      members placed on ranks: each rank trains one member, gets its columns
2           2      tp=2 for R and TC (both members sharded over the one model group), launched
                   as the user does: ``torchrun --nproc_per_node 2 -m trainer.run ... --tp 2``
4           1      data=2 for R and TC (each member data-parallel over two groups)
4           2      tp=2 x data=2, R alone and TC alone
2 -> 4      1 -> 2 stopped after 7 steps on 2 ranks (tp 1), resumed on 4 (tp 2)
4 -> 1      2 -> 1 stopped after 7 steps on 4 ranks (tp 2), resumed by one process with the
                   user's command ``python -m trainer.run ... --resume``
==========  =====  ====================================================================

BatchTopK selects over the whole step batch, so its layouts are checked too (docs/method.md sec. 11): the
suite ``L1R`` x ``batchtopk, matryoshka_batchtopk`` at tp 2 (2 ranks) and data 2 (4 ranks), ``batchtopk``
alone at tp 2 x data 2, and the suite stopped on 4 ranks (tp 2) and resumed by one process.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SUITE = "L1R,L2TC"
MEMBERS = ("L1R-8x", "L2TC-8x")
BATCH = dict(hookpoints="L1R", architecture="batchtopk,matryoshka_batchtopk")
BATCH_MEMBERS = ("L1R-8x-batchtopk", "L1R-8x-matryoshka_batchtopk")
STOP = 7
RTOL = 1e-5
MEASURED = {}


def base_cfg(model, data, out, **kw):
    cfg = dict(model=model, dataset=data, k=8, context_len=64, lm_batch_size=4, tokens=4096, batch_size=256,
               buffer_tokens=1024, eval_tokens=128, eval_every=5, progress=False, eval_lm_loss=False,
               export_dtype="float32", device="cpu", dist_timeout=60.0, log_every=4, output=str(out))
    cfg.update(kw)
    return cfg


def worker_main(argv):
    """One rank: join the process group once, then run each job (a TrainConfig dict) in turn."""
    import torch.distributed as dist

    from trainer.config import TrainConfig
    from trainer.run import run

    torch.set_num_threads(1)
    jobs = json.loads(Path(argv[0]).read_text())
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        for job in jobs:
            run(TrainConfig(**job), log=lambda s: None)
        dist.barrier()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # never hang in the teardown of a broken group
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, jobs, tmp, timeout=400.0):
    spec = Path(tmp) / f"jobs-{world}.json"
    spec.write_text(json.dumps(jobs))
    port = _free_port()
    procs, logs = [], []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = tempfile.TemporaryFile(mode="w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(spec)], env=env, cwd=str(REPO),
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if any(c != 0 for c in codes):
        tails = []
        for r, log in enumerate(logs):
            log.seek(0)
            tails.append(f"--- rank {r} (exit {codes[r]}):\n{log.read()[-3000:]}")
        pytest.fail(f"ranks failed: {codes}\n" + "\n".join(tails))
    for log in logs:
        log.close()


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "checkpoints" / "final.safetensors"))


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """The single-process reference and every layout's runs (three launches)."""
    from trainer.config import TrainConfig
    from trainer.run import run

    root = tmp_path_factory.mktemp("layouts")
    model = tiny_llama
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(root / "docs.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": " ".join(words[(i * j + i) % len(words)] for j in range(20 + i % 9))}) + "\n")
    data = str(root / "docs.jsonl")
    cfg = lambda name, **kw: base_cfg(model, data, root / name, **kw)  # noqa: E731
    quiet = lambda s: None  # noqa: E731
    single = cfg("single", hookpoints=SUITE, checkpoint_every=STOP)
    run(TrainConfig(**single), log=quiet)
    run(TrainConfig(**cfg("single_b", **BATCH, checkpoint_every=STOP)), log=quiet)
    run(TrainConfig(**cfg("single_bt", hookpoints="L1R", architecture="batchtopk")), log=quiet)
    launch(2, [cfg("w2_tp1", hookpoints=SUITE, tp=1), cfg("cut_w2", hookpoints=SUITE, tp=1, stop_after_steps=STOP),
               cfg("bt_w2_tp2", **BATCH, tp=2)], root)
    # the user's command: torchrun ... -m trainer.run --tp 2 on two gloo ranks
    _command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(_free_port()), "-m", "trainer.run", *_cli(dict(single, output=str(root / "w2_tp2"),
                                                                                   tp=2))])
    launch(4, [cfg("w4_tp1", hookpoints=SUITE, tp=1), cfg("w4_tp2_R", hookpoints="L1R", tp=2),
               cfg("w4_tp2_TC", hookpoints="L2TC", tp=2), cfg("cut_w2", hookpoints=SUITE, tp=2, resume=True),
               cfg("cut_w4", hookpoints=SUITE, tp=2, stop_after_steps=STOP),
               cfg("bt_w4_tp1", **BATCH, tp=1), cfg("bt_w4_tp2", hookpoints="L1R", architecture="batchtopk", tp=2),
               cfg("bt_cut_w4", **BATCH, tp=2, stop_after_steps=STOP)], root)
    state = torch.load(root / "cut_w4" / "resume" / "state.pt", weights_only=True)
    assert (state["step"], state["world_size"], state["tp"]) == (STOP, 4, 2)
    assert not (root / "cut_w4" / MEMBERS[0] / "checkpoints" / "final.safetensors").exists()
    # the user's command: python -m trainer.run --resume, one process continuing the 4-rank run
    _command([sys.executable, "-m", "trainer.run", *_cli(cfg("cut_w4", hookpoints=SUITE, resume=True))])
    run(TrainConfig(**cfg("bt_cut_w4", **BATCH, resume=True)), log=quiet)
    return root


def _initial_encoder(name):
    """The member's initial W_enc, as trainer.run draws it (seeded by the run's seed and the name)."""
    from sae_kernels import SAEConfig, TopKSAE
    from trainer.members import member_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(member_seed(42, name))
        return TopKSAE(SAEConfig(d_model=32, d_sae=256, k=8), transcoder="TC" in name).W_enc.detach()


def _compare(root, got, members=MEMBERS, label=None, single="single"):
    for name in members:
        a, b = weights(root / got / name), weights(root / single / name)
        w0 = _initial_encoder(name)
        moved = float((b["encoder.weight"].double() - w0.double()).norm() / w0.double().norm())
        assert moved > 1000 * RTOL, f"{name} barely moved from its init ({moved:.3g}): the comparison proves nothing"
        for key in b:
            rel = float((a[key].double() - b[key].double()).norm() / b[key].double().norm())
            MEASURED[f"{label or got} {name} {key}"] = rel
            assert rel <= RTOL, f"{got} {name} {key}: relative difference {rel:.3g}"
        ev_a = json.loads((root / got / name / "eval.json").read_text())["explained_variance"]
        ev_b = json.loads((root / single / name / "eval.json").read_text())["explained_variance"]
        assert abs(ev_a - ev_b) < 1e-4, (got, name, ev_a, ev_b)
        lines = (root / got / name / "metrics.jsonl").read_text().splitlines()
        want = (root / single / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(ln)["step"] for ln in lines] == [json.loads(ln)["step"] for ln in want]
        for la, lb in zip(lines, want):
            ra, rb = json.loads(la), json.loads(lb)
            assert abs(ra["loss"] - rb["loss"]) <= 1e-4 * abs(rb["loss"]), (got, name, ra, rb)


def test_members_placed_on_two_ranks(runs):
    _compare(runs, "w2_tp1", label="2 ranks, tp 1 (placement)")
    suite = json.loads((runs / "w2_tp1" / "suite.json").read_text())
    assert [m["ranks"] for m in suite["members"]] == [[0], [1]]  # one member per rank
    assert suite["layout"] == {"world_size": 2, "tp": 1, "dp": 2}


def test_tp2_for_r_and_tc(runs):
    _compare(runs, "w2_tp2", label="torchrun 2 ranks --tp 2 (CLI)")
    suite = json.loads((runs / "w2_tp2" / "suite.json").read_text())
    assert suite["layout"] == {"world_size": 2, "tp": 2, "dp": 1}


def test_data2_for_r_and_tc(runs):
    _compare(runs, "w4_tp1", label="4 ranks, tp 1 (data 2 per member)")
    suite = json.loads((runs / "w4_tp1" / "suite.json").read_text())
    assert [m["ranks"] for m in suite["members"]] == [[0, 1], [2, 3]]


def test_tp2_x_data2(runs):
    _compare(runs, "w4_tp2_R", members=("L1R-8x",), label="4 ranks, tp 2 x data 2")
    _compare(runs, "w4_tp2_TC", members=("L2TC-8x",), label="4 ranks, tp 2 x data 2")


def test_stopped_on_two_ranks_resumed_on_four(runs):
    _compare(runs, "cut_w2", label="stopped 2 ranks tp 1, resumed 4 ranks tp 2")
    assert not (runs / "cut_w2" / "resume").exists()


def test_stopped_on_four_ranks_resumed_by_one_process(runs):
    _compare(runs, "cut_w4", label="stopped 4 ranks tp 2, resumed by python -m trainer.run --resume (CLI)")


def test_batchtopk_at_tp2(runs):
    _compare(runs, "bt_w2_tp2", members=BATCH_MEMBERS, label="batchtopk, matryoshka: 2 ranks, tp 2", single="single_b")


def test_batchtopk_at_data2(runs):
    _compare(runs, "bt_w4_tp1", members=BATCH_MEMBERS, label="batchtopk, matryoshka: 4 ranks, data 2 per member", single="single_b")
    suite = json.loads((runs / "bt_w4_tp1" / "suite.json").read_text())
    assert [m["ranks"] for m in suite["members"]] == [[0, 1], [2, 3]]


def test_batchtopk_at_tp2_x_data2(runs):
    _compare(runs, "bt_w4_tp2", members=("L1R-8x",), label="batchtopk: 4 ranks, tp 2 x data 2", single="single_bt")
    th = [json.loads(ln)["threshold"] for ln in (runs / "bt_w4_tp2" / "L1R-8x" / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(ln)["threshold"] for ln in (runs / "single_bt" / "L1R-8x" / "metrics.jsonl").read_text().splitlines()]
    assert th == pytest.approx(want, rel=1e-4)


def test_batchtopk_stopped_on_four_ranks_resumed_by_one_process(runs):
    _compare(runs, "bt_cut_w4", members=BATCH_MEMBERS, label="batchtopk: stopped 4 ranks tp 2, resumed by one process", single="single_b")


def _cli(cfg):
    """The command-line flags of a job dict (what a user types)."""
    argv = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            argv += [flag, str(v)]
    return argv


def _command(cmd, timeout=300):
    """Run a user's command line (a fresh process; ranks on gloo under torchrun); fail with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


def test_zz_report_measured_differences(capsys):
    with capsys.disabled():
        print("\nrelative differences to the single-process checkpoint (norm of difference / norm):")
        worst = {}
        for k, v in MEASURED.items():
            label = k.rsplit(" ", 2)[0]
            worst[label] = max(worst.get(label, 0.0), v)
        for k, v in worst.items():
            print(f"  {k}: worst tensor {v:.3g}")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker_main(sys.argv[2:])
