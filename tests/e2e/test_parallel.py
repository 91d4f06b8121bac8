"""trainer.parallel: exact global TopK over sharded latents, data x tensor parallel training.

Multi-process tests launch this file as a script once per rank with torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), gloo on CPU. One launch
per world layout runs several scenarios (process start-up is most of the cost on 2 cores); rank 0
writes what it measured under an output folder and the tests compare that with single-process
runs done here, in the pytest process, from the same seed and the same global batches.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
for _p in (REPO, REPO / "tests"):  # run as a script by each rank: the package and the tests' helpers
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from sae_kernels import SAEConfig, TopKSAE, sparse_decode, topk_encode  # noqa: E402
from sae_kernels.reference import dense_topk_sae  # noqa: E402
from trainer import parallel as P  # noqa: E402
from trainer.parallel import mesh  # noqa: E402

import parallel_helpers as H  # noqa: E402  (the parallel API only tests use)

# ----------------------------------------------------------------------------------------------
# The problem every run shares: a tiny SAE on synthetic activations (not an LM), so it is fast.
# ----------------------------------------------------------------------------------------------

D, N_LAT = 24, 96            # d_model, d_sae (96 / 4 = 24 latents per rank at tp=4)
BATCH = 32                   # global tokens per step: world=4 ranks produce 8 each
K_SCHEDULE = [11, 9, 7, 7, 5, 5]   # odd k, annealed (k changes between steps)
STEPS = len(K_SCHEDULE)
SAVE_AT = 3                  # checkpoint after this many steps (resume tests)
LR, BETAS, MAX_NORM = 1e-2, (0.9, 0.9999), 0.5
SEED = 42
MODEL_NAME = "test/tiny-llama"  # what the checkpoints' lm_config.json must name
# float32 tolerance of the weight comparison; the measured differences are ~1e-7 (see the report).
ATOL = 2e-5

# TopK equality configs: (d, n, N tokens, k, weighted). Odd k, k > n/tp (every local candidate
# needed), k = 1, and n large enough that most rows have many positive latents.
TOPK_CASES = [
    (24, 96, 64, 7, True),
    (24, 96, 64, 7, False),
    (16, 128, 50, 1, True),
    (16, 128, 50, 33, True),     # 33 > 128/4: a shard can contribute all its latents
    (32, 64, 40, 5, False),
]


def make_batch(step: int) -> torch.Tensor:
    """Global batch of step ``step`` ``[BATCH, D]``: anisotropic, with a mean (centering matters)."""
    g = torch.Generator().manual_seed(1000 + step)
    scale = torch.linspace(0.5, 2.0, D)
    return torch.randn(BATCH, D, generator=g) * scale + 0.7


def make_sae(distinct_norms: bool = False) -> TopKSAE:
    torch.manual_seed(SEED)
    sae = TopKSAE(SAEConfig(d_model=D, d_sae=N_LAT, k=K_SCHEDULE[-1]))
    if distinct_norms:
        # Every decoder row starts at norm 0.5, so in bf16 many weighted scores tie exactly at step 0;
        # exact ties at the k-th place are broken by the smaller index by the kernels and the merge of
        # shards but as torch.topk does by the CPU path. Distinct norms keep this problem tie-free.
        with torch.no_grad():
            sae.W_dec.mul_(torch.linspace(0.8, 1.2, N_LAT)[:, None])
    return sae


def llama_scope_loss(x_hat: torch.Tensor, y: torch.Tensor, y_mean: torch.Tensor) -> torch.Tensor:
    """docs/method.md sec. 2: per element (x_hat - y)^2 / ||y - mean_batch(y)||, averaged over elements.
    ``y_mean`` is the mean over the *global* batch (all data-parallel groups)."""
    denom = (y - y_mean).norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return ((x_hat - y) ** 2 / denom).mean()


def make_topk_problem(case, seed):
    d, n, N, k, weighted = case
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(n, d, generator=g) / math.sqrt(d)
    b_enc = torch.randn(n, generator=g) * 0.1 + 0.2   # mostly positive pre-activations
    W_dec = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g)  # varied row norms
    b_dec = torch.randn(d, generator=g)
    x = torch.randn(N, d, generator=g)
    return x, W_enc, b_enc, W_dec, b_dec


def make_tie_problem(k, d=16, n=96, N=20):
    g = torch.Generator().manual_seed(7)
    W_enc = torch.randn(n, d, generator=g) * 0.01
    b_enc = torch.full((n,), -5.0)                 # every other latent inactive
    W_dec = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    big = list(range(n - 2, n - 1 - k, -1))        # k-1 winners, at the end of the last shard
    b_enc[big] = 20.0
    W_enc[n - 1], b_enc[3], b_enc[n - 1], W_dec[n - 1] = W_enc[3], 10.0, 10.0, W_dec[3]
    return torch.randn(N, d, generator=g), W_enc, b_enc, W_dec


# ----------------------------------------------------------------------------------------------
# Single-process reference: TopKSAE + torch Adam + torch.nn.utils.clip_grad_norm_ (no parallel code)
# ----------------------------------------------------------------------------------------------


def reference_run(start_state=None, start_step=0, save_at=None):
    """Train STEPS steps single-process; returns (final state, opt state, log, state at save_at)."""
    sae = make_sae()
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=BETAS)
    if start_state is not None:
        sae.load_state_dict(start_state[0])
        opt.load_state_dict(start_state[1])
    log, saved = [], None
    for t in range(start_step, STEPS):
        x = make_batch(t)
        opt.zero_grad(set_to_none=True)
        x_hat = sae(x, k=K_SCHEDULE[t])
        loss = llama_scope_loss(x_hat, x, x.mean(0))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), MAX_NORM)
        opt.step()
        log.append({"step": t, "loss": loss.item(), "grad_norm": norm.item()})
        if save_at is not None and t + 1 == save_at:
            saved = (_clone_sd(sae.state_dict()), _clone_opt(opt.state_dict()))
    return sae.state_dict(), opt.state_dict(), log, saved


def _clone_sd(sd):
    return {k: v.detach().clone() for k, v in sd.items()}


def _clone_opt(sd):
    return {
        "state": {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for i, st in sd["state"].items()},
        "param_groups": [dict(g) for g in sd["param_groups"]],
    }


# ----------------------------------------------------------------------------------------------
# The parallel training loop (what the trainer's step does with a ParallelContext)
# ----------------------------------------------------------------------------------------------


def parallel_train(ctx, start_step=0, resume_from=None, save_dir=None, log_path=None, kill_after=None):
    full = make_sae()
    sae = P.ShardedTopKSAE.from_full(full, ctx)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=BETAS)
    if resume_from is not None:
        state = H.load_checkpoint(ctx, resume_from, sae, opt)
        start_step = state["step"]
    b = BATCH // ctx.world_size
    log = []
    for t in range(start_step, STEPS):
        if kill_after is not None and t == abs(kill_after) and ctx.rank == 1:
            if kill_after >= 0:
                os._exit(17)  # a rank dies mid-run, without any goodbye to its peers
            Path(log_path).parent.parent.joinpath("hung_at").write_text(repr(time.time()))
            time.sleep(3600)  # a rank hangs (a stuck data loader, a deadlock) outside any collective
        # The producers are data-parallel over every rank: global rank g makes rows [g*b, (g+1)*b).
        x_local = make_batch(t)[ctx.rank * b:(ctx.rank + 1) * b]
        x = H.all_gather_batch(ctx, x_local)                      # the model group's tp*b tokens
        y_mean = ctx.data_all_reduce(x.mean(0), "mean")        # mean over the global batch
        opt.zero_grad(set_to_none=True)
        out = sae.forward_normalised(x, K_SCHEDULE[t])
        loss = llama_scope_loss(out.x_hat, x, y_mean)
        loss.backward()
        ctx.sync_grads(sae.parameters())
        norm = H.clip_grad_norm_(ctx, sae.parameters(), MAX_NORM)
        opt.step()
        log.append({"step": t, "loss": ctx.data_all_reduce(loss.detach(), "mean").item(), "grad_norm": norm.item(),
                    "l0": (ctx.model_all_reduce(H.l0_sum(out)).item() / x.shape[0])})
        if save_dir is not None and t + 1 == SAVE_AT:
            H.save_checkpoint(ctx, Path(save_dir) / f"step{SAVE_AT}", sae, opt, trainer_state={"step": t + 1},
                              model_name=MODEL_NAME)
    if save_dir is not None:
        H.save_checkpoint(ctx, Path(save_dir) / "final", sae, opt, trainer_state={"step": STEPS}, model_name=MODEL_NAME)
    # Replicated b_dec must be identical on every rank; shards identical across data ranks.
    checks = {}
    bd = sae.b_dec.detach()
    checks["b_dec_spread"] = (ctx.world_all_reduce(bd, "max") + ctx.world_all_reduce(-bd, "max")).abs().max().item()
    w = sae.W_enc.detach()
    checks["W_enc_data_spread"] = (ctx.data_all_reduce(w, "max") + ctx.data_all_reduce(-w, "max")).abs().max().item()
    if ctx.is_main and log_path is not None:
        Path(log_path).write_text(json.dumps({"log": log, "checks": checks}))
    return sae, opt


def topk_worker(ctx, out_dir):
    results = {}
    for ci, case in enumerate(TOPK_CASES):
        d, n, N, k, weighted = case
        x, W_enc, b_enc, W_dec, b_dec = make_topk_problem(case, seed=ci)
        sh = [ctx.shard_rows(t) for t in (W_enc, b_enc, W_dec)]
        out = P.sharded_forward(ctx, x, sh[0], sh[1], sh[2], b_dec, k, weighted)
        vals, idx = H.gather_selection(ctx, out)
        results[ci] = {"x_hat": out.x_hat.detach(), "values": vals, "indices": idx}
    # Exact ties across shards at the k-th place: k-1 dominant latents, then latent 3 and an exact
    # copy of it at n-1 (another shard). The k-th slot must go to the smaller global index, 3.
    for k in (1, 4, 7):
        for weighted in (True, False):
            x, W_enc, b_enc, W_dec = make_tie_problem(k)
            sh = [ctx.shard_rows(t) for t in (W_enc, b_enc, W_dec)]
            out = P.sharded_forward(ctx, x, sh[0], sh[1], sh[2], torch.zeros(x.shape[1]), k, weighted)
            results[f"tie_{k}_{weighted}"] = H.gather_selection(ctx, out)[1]
    # Gradients through the sharded forward (one backward, no collective) equal the unsharded ones.
    x, W_enc, b_enc, W_dec, b_dec = make_topk_problem(TOPK_CASES[0], seed=0)
    params = [ctx.shard_rows(t).requires_grad_() for t in (W_enc, b_enc, W_dec)]
    bd = b_dec.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    out = P.sharded_forward(ctx, xr, *params, bd, TOPK_CASES[0][3], True)
    (out.x_hat.sin().sum()).backward()
    results["grads"] = {
        "W_enc": ctx.gather_rows(params[0].grad), "b_enc": ctx.gather_rows(params[1].grad),
        "W_dec": ctx.gather_rows(params[2].grad), "b_dec": bd.grad, "x": xr.grad,
    }
    # bf16 weights (the trainer's GPU precision): partial sums are reduced in fp32.
    x, W_enc, b_enc, W_dec, b_dec = (t.bfloat16() for t in make_topk_problem(TOPK_CASES[0], seed=0))
    sh = [ctx.shard_rows(t) for t in (W_enc, b_enc, W_dec)]
    out = P.sharded_forward(ctx, x, sh[0], sh[1], sh[2], b_dec, TOPK_CASES[0][3], True)
    results["bf16"] = {"x_hat": out.x_hat.detach(), "indices": H.gather_selection(ctx, out)[1]}
    # Data-parallel use (evaluation, LM splicing): each rank passes its own rows, different counts.
    full = make_sae()
    sae = P.ShardedTopKSAE.from_full(full, ctx)
    rows = 3 + ctx.model_rank  # unequal on purpose
    xs = make_batch(50 + ctx.rank)[:rows].reshape(1, rows, D)
    got = H.forward_local(sae, xs, 7)
    results["forward_local_err"] = ctx.world_all_reduce((got - full(xs, 7)).abs().max(), "max")
    # Dataset-norm estimate: every rank estimates on its own tokens, the world mean is the estimate.
    xs = make_batch(99)
    b = BATCH // ctx.world_size
    mu = ctx.world_all_reduce(xs[ctx.rank * b:(ctx.rank + 1) * b].norm(dim=1).mean(), "mean")
    results["mu"] = mu
    if ctx.is_main:
        torch.save(results, Path(out_dir) / "topk.pt")


def step_config(compute_dtype=None):
    """The trainer's StepConfig for the tiny problem: K-annealing 11 -> 5, warmup, decay, clipping,
    AuxK with a dead window of two steps (so dead latents exist from step 2 on), the data-dependent
    biases at step 0 (means over the global batch, b_enc from each shard's rows), the Adam row flags
    (held dead latents; restarted rows, whose per-row state is gathered and sharded by rows)."""
    from trainer.train import StepConfig

    return StepConfig(k=5, k_start=11, total_steps=STEPS, anneal_steps=3, warmup_steps=2, decay_fraction=0.5,
                      lr=LR, clip_grad_norm=MAX_NORM, loss="llama_scope", auxk=True, auxk_coef=1 / 32,
                      k_aux=13, dead_window_tokens=2 * BATCH, data_init=True, hold_dead=True,
                      reset_dead_moments=True, compute_dtype=compute_dtype)


def _spy_reads():
    """Stand-ins for the autograd Functions of the encode and the decode that record what the step's
    forward reads: the compute copies of W_enc, b_enc, W_dec and the decoder row norms that weight the
    selection (the first encode and decode of a step: AuxK's come after them)."""
    from sae_kernels import ops

    seen = {}
    real_enc, real_dec = ops._TopKEncode.apply, ops._SparseDecode.apply

    class Enc:
        @staticmethod
        def apply(x, W_enc, b_enc, k, dec_norm, W_c, b_c, keep):
            if "W_enc" not in seen:  # copies: the optimizer then updates the tensors in place
                seen.update({k: None if v is None else v.detach().clone()
                             for k, v in (("W_enc", W_c), ("b_enc", b_c), ("dec_norm", dec_norm))})
            return real_enc(x, W_enc, b_enc, k, dec_norm, W_c, b_c, keep)

    class Dec:
        @staticmethod
        def apply(values, indices, W_dec, b_dec, W_c, *rest):
            if "W_dec" not in seen:
                seen["W_dec"] = W_c.detach().clone()
            return real_dec(values, indices, W_dec, b_dec, W_c, *rest)

    return seen, Enc, Dec


def _run_steps(step, batch_of, gather_rows=lambda t: t):
    """STEPS steps; per step the metrics and (full-shape) what the forward read."""
    from sae_kernels import ops

    metrics, reads = [], []
    for t in range(STEPS):
        seen, Enc, Dec = _spy_reads()
        real = ops._TopKEncode, ops._SparseDecode
        ops._TopKEncode, ops._SparseDecode = Enc, Dec
        try:
            m = step(batch_of(t), None, t)
        finally:
            ops._TopKEncode, ops._SparseDecode = real
        metrics.append(m)
        reads.append({k: (str(v.dtype), gather_rows(v.detach().float())) for k, v in seen.items() if v is not None})
    return metrics, reads


def trainer_step_reference(compute_dtype=None):
    """The trainer's own single-process SAEStep on the global batches."""
    from trainer.train import SAEStep, make_optimizer

    sae = make_sae(distinct_norms=compute_dtype is not None)
    step = SAEStep(sae, make_optimizer(sae, LR, BETAS), step_config(compute_dtype))
    metrics, reads = _run_steps(step, make_batch)
    return {"sae": sae.state_dict(), "opt": step.opt.state_dict(), "since": step.since_fired,
            "count": step.fire_count, "deaths": step.deaths, "was_reset": step.was_reset,
            "metrics": [{k: float(v) for k, v in m.items()} for m in metrics], "reads": reads}


def step_worker(ctx, out_dir, compute_dtype=None, name="step.pt"):
    """The trainer's step on this layout (each model group feeds its share of the batch, as the
    trainer's RowExchange delivers it)."""
    from trainer.train import SAEStep, make_optimizer

    sae = P.ShardedTopKSAE.from_full(make_sae(distinct_norms=compute_dtype is not None), ctx)
    step = SAEStep(sae, make_optimizer(sae, LR, BETAS), step_config(compute_dtype), ctx)
    b = BATCH // ctx.dp
    out, reads = _run_steps(step, lambda t: make_batch(t)[ctx.data_rank * b:(ctx.data_rank + 1) * b],
                            gather_rows=lambda t: ctx.gather_rows(t))
    metrics = [{k: float(step.ctx.data_mean(v)) for k, v in m.items()} for m in out]
    sae_sd, opt_sd = step.full_state()
    if ctx.is_main:
        torch.save({"sae": sae_sd, "opt": opt_sd, "since": step.since_fired, "count": step.fire_count,
                    "deaths": step.deaths, "was_reset": step.was_reset, "metrics": metrics, "reads": reads},
                   Path(out_dir) / name)


def worker_main(argv):
    """One rank of a launch: ``--jobs "2:topk,2:train,1:train"`` runs each job on the (data, model)
    mesh with that tp, all on the one process group (start-up is the expensive part)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--kill-after", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=60.0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    mesh._GATHER_CHUNK_BYTES = 500  # checkpoint gathers in chunks of 5 rows of 24 floats: exercise chunking
    mesh._BUCKET_NUMEL = 1000  # W_enc / W_dec gradients all-reduced in place, biases bucketed
    ctx = None
    for spec in a.jobs.split(","):
        tp, job = spec.split(":")
        ctx = P.init_parallel(int(tp), timeout_s=a.timeout)
        out = Path(a.out) / f"tp{ctx.tp}_dp{ctx.dp}"
        out.mkdir(parents=True, exist_ok=True)
        with H.guard(ctx):
            if job == "topk":
                topk_worker(ctx, out)
            elif job == "step":
                step_worker(ctx, out)
            elif job == "step_bf16":  # the GPU precision: bf16 compute copies of fp32 masters
                step_worker(ctx, out, torch.bfloat16, "step_bf16.pt")
            elif job == "train":
                parallel_train(ctx, save_dir=out / "ckpt", log_path=out / "train.json", kill_after=a.kill_after)
            elif job == "resume":
                parallel_train(ctx, resume_from=a.resume, save_dir=out / "resumed", log_path=out / "resume.json")
            else:
                raise ValueError(f"unknown job {job!r}")
    with H.guard(ctx):
        ctx.barrier()
        H.shutdown_parallel()


# ----------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args, timeout: float = 120.0, stop_on_failure: bool = False):
    """Start ``world`` ranks of this file with torchrun's environment; wait for all of them.

    Returns ``(exit codes, exit times (monotonic), outputs)``. ``stop_on_failure`` kills the others
    once a rank exits non-zero (what torchrun's agent does). Processes still running at ``timeout``
    are killed (by pid) and reported with exit code None.
    """
    import tempfile

    port = _free_port()
    procs, logs = [], []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = tempfile.TemporaryFile(mode="w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", *map(str, args)], env=env, cwd=str(REPO),
            stdout=log, stderr=subprocess.STDOUT, text=True,
        ))
    t0 = time.monotonic()
    codes, ends = [None] * world, [None] * world
    try:
        while time.monotonic() - t0 < timeout and any(e is None for e in ends):
            for r, p in enumerate(procs):
                if ends[r] is None and p.poll() is not None:
                    codes[r], ends[r] = p.returncode, time.monotonic()
            if stop_on_failure and any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    return codes, ends, outs


def _check_ok(codes, outs):
    if any(c != 0 for c in codes):
        tails = "\n".join(f"--- rank {r} (exit {c}):\n{o[-3000:]}" for r, (c, o) in enumerate(zip(codes, outs)))
        pytest.fail(f"ranks failed: {codes}\n{tails}")


def _max_diff(a: dict, b: dict, keys=("W_enc", "b_enc", "W_dec", "b_dec")):
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in keys}


def _opt_diff(a: dict, b: dict):
    worst = 0.0
    for i, st in b["state"].items():
        got = a["state"][i]
        assert got.keys() == st.keys(), (got.keys(), st.keys())
        for key in ("exp_avg", "exp_avg_sq"):
            worst = max(worst, (got[key].double() - st[key].double()).abs().max().item())
        assert float(got["step"]) == float(st["step"])
        if "row_step0" in st:  # SAEAdam's restarted rows: step counts, equal on every layout
            assert torch.equal(got["row_step0"], st["row_step0"]), i
    return worst


def _load_folder(folder):
    """A checkpoint folder as (model state dict, optimizer state dict), through the public loader."""
    ctx = P.init_parallel(1)
    sae = TopKSAE(SAEConfig(d_model=D, d_sae=N_LAT, k=K_SCHEDULE[-1]), init=False)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=BETAS)
    state = H.load_checkpoint(ctx, folder, sae, opt)
    return sae.state_dict(), opt.state_dict(), state


# ----------------------------------------------------------------------------------------------
# Fixtures: the single-process reference and one launch per world layout
# ----------------------------------------------------------------------------------------------

MEASURED = {}   # max-abs diffs, printed at the end of the module for the report


@pytest.fixture(scope="module")
def reference():
    final_sd, final_opt, log, saved = reference_run(save_at=SAVE_AT)
    return {"sd": final_sd, "opt": final_opt, "log": log, "saved": saved}


@pytest.fixture(scope="module")
def sp_checkpoint(tmp_path_factory, reference):
    """The single-process run's step-3 state, written with the checkpoint code at tp=1."""
    folder = tmp_path_factory.mktemp("sp") / f"step{SAVE_AT}"
    ctx = P.init_parallel(1)
    sae = make_sae()
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=BETAS)
    sae.load_state_dict(reference["saved"][0])
    opt.load_state_dict(reference["saved"][1])
    H.save_checkpoint(ctx, folder, sae, opt, trainer_state={"step": SAVE_AT}, model_name=MODEL_NAME)
    return folder


def _run(tmp_path_factory, name, world, jobs, extra=()):
    out = tmp_path_factory.mktemp(name)
    codes, _, outs = launch(world, ["--out", out, "--jobs", jobs, *extra])
    _check_ok(codes, outs)
    return out


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """2 processes: tp=2 (x data 1) and data=2 (x tp 1)."""
    return _run(tmp_path_factory, "world2", 2, "2:topk,2:train,2:step,2:step_bf16,1:train")


@pytest.fixture(scope="module")
def world4(tmp_path_factory, sp_checkpoint):
    """4 processes: tp=2 x data=2 (train, and resume a single-process checkpoint), tp=4 (x data 1)."""
    return _run(tmp_path_factory, "world4", 4, "2:train,2:resume,2:step,4:topk,4:train", ["--resume", sp_checkpoint])


# ----------------------------------------------------------------------------------------------
# In-process tests (no process group)
# ----------------------------------------------------------------------------------------------


def test_select_global_topk_breaks_ties_by_global_index():
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    gidx = torch.tensor([[9, 4, 7, 2, 5, 0]])
    win = P.select_global_topk(scores, gidx, 3)
    assert sorted(gidx[win].tolist()) == [2, 5, 9]   # 3.0, then the two smallest ids among the 2.0s
    with pytest.raises(ValueError, match="at most 6"):
        P.select_global_topk(scores, gidx, 7)


def test_single_process_context_is_the_topksae_path(reference):
    """tp=1, world=1: ShardedTopKSAE + ctx helpers reproduce TopKSAE + torch's Adam/clipping."""
    ctx = P.init_parallel(1)
    assert not ctx.distributed and H.all_gather_batch(ctx, torch.ones(2)).shape == (2,)
    sae = P.ShardedTopKSAE.from_full(make_sae(), ctx)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=BETAS)
    full = make_sae()
    x = make_batch(0)
    assert torch.equal(sae(x, 7), full(x, 7))  # bitwise: the same kernels in the same order
    for t in range(STEPS):
        x = make_batch(t)
        opt.zero_grad(set_to_none=True)
        out = sae.forward_normalised(x, K_SCHEDULE[t])
        llama_scope_loss(out.x_hat, x, x.mean(0)).backward()
        ctx.sync_grads(sae.parameters())
        norm = H.clip_grad_norm_(ctx, sae.parameters(), MAX_NORM)
        assert abs(norm.item() - reference["log"][t]["grad_norm"]) <= 1e-6 * reference["log"][t]["grad_norm"]
        opt.step()
    diff = _max_diff(sae.state_dict(), reference["sd"])
    MEASURED["tp1 (no-op context) vs single-process"] = max(diff.values())
    assert max(diff.values()) <= ATOL, diff


def test_save_checkpoint_names_the_model_or_refuses(tmp_path):
    """lm_config.json always names the model (the release code's reader needs a string): the name passed,
    else the SAE's; with neither, nothing is written."""
    import warnings

    ctx = P.init_parallel(1)
    sae = make_sae()
    with pytest.raises(ValueError, match="save_checkpoint: no model name"):
        H.save_checkpoint(ctx, tmp_path / "none", sae)
    assert not (tmp_path / "none").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no model name" warning from to_llama_scope
        H.save_checkpoint(ctx, tmp_path / "passed", sae, model_name=MODEL_NAME)
        named = TopKSAE(SAEConfig(d_model=D, d_sae=N_LAT, k=K_SCHEDULE[-1], model_name="from/cfg"))
        H.save_checkpoint(ctx, tmp_path / "cfg", named)
    assert json.loads((tmp_path / "passed" / "lm_config.json").read_text())["model_name"] == MODEL_NAME
    assert json.loads((tmp_path / "cfg" / "lm_config.json").read_text())["model_name"] == "from/cfg"


def test_init_parallel_validates():
    with pytest.raises(ValueError, match="does not divide the world size 1"):
        P.init_parallel(2)
    with pytest.raises(ValueError, match="tp: expected a positive int"):
        P.init_parallel(0)
    ctx = P.ParallelContext(tp=3, model_rank=1)
    with pytest.raises(ValueError, match="d_sae=100 is not divisible by tp=3"):
        ctx.check_width(100)
    assert ctx.shard_range(99) == (33, 66)


# ----------------------------------------------------------------------------------------------
# Multi-process tests
# ----------------------------------------------------------------------------------------------


def _check_topk(run_dir, tp):
    res = torch.load(Path(run_dir) / "topk.pt", weights_only=True)
    for ci, case in enumerate(TOPK_CASES):
        d, n, N, k, weighted = case
        x, W_enc, b_enc, W_dec, b_dec = make_topk_problem(case, seed=ci)
        dn = W_dec.norm(dim=1) if weighted else None
        v_ref, i_ref = topk_encode(x, W_enc, b_enc, k, dn)
        got = res[ci]
        bad = 0
        for row in range(N):
            # Zero-valued picks (fewer than k positive latents) are arbitrary in both and inert.
            ref = {(int(i), round(float(v), 6)) for v, i in zip(v_ref[row], i_ref[row]) if v > 0}
            mine = {(int(i), round(float(v), 6)) for v, i in zip(got["values"][row], got["indices"][row]) if v > 0}
            bad += ref != mine
        assert got["indices"].shape == (N, k)
        assert bad == 0, f"tp={tp} case {case}: {bad}/{N} rows select a different (index, value) set"
        # The reconstruction equals the dense float64 reference on the same support.
        x_ref = dense_topk_sae(x.double(), W_enc.double(), b_enc.double(), W_dec.double(), b_dec.double(),
                               k, weighted, indices=got["indices"])[0]
        err = (got["x_hat"].double() - x_ref).abs().max().item()
        MEASURED[f"topk tp={tp} case {ci} x_hat vs float64"] = err
        assert err < 1e-4, f"case {case}: x_hat max abs err {err:g}"
    for k in (1, 4, 7):
        for weighted in (True, False):
            ti = res[f"tie_{k}_{weighted}"]
            want = {3, *range(N_LAT - 2, N_LAT - 1 - k, -1)}
            rows_bad = sum(set(r.tolist()) != want for r in ti)
            assert rows_bad == 0, f"tp={tp} k={k} weighted={weighted}: {rows_bad} rows broke the tie differently"
    g = res["grads"]
    x, W_enc, b_enc, W_dec, b_dec = make_topk_problem(TOPK_CASES[0], seed=0)
    ps = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, W_dec, b_dec)]
    k = TOPK_CASES[0][3]
    v, i = topk_encode(ps[0], ps[1], ps[2], k, W_dec.norm(dim=1))
    sparse_decode(v, i, ps[3], ps[4]).sin().sum().backward()
    for name, p in zip(("x", "W_enc", "b_enc", "W_dec", "b_dec"), ps):
        err = (g[name] - p.grad).abs().max().item()
        scale = p.grad.abs().max().item()
        MEASURED[f"topk tp={tp} grad {name} (max |grad| {scale:.3g})"] = err
        assert err <= 1e-6 * scale + 1e-7 and scale > 0, f"grad {name}: max abs diff {err:g} (max |grad| {scale:g})"
    bf = res["bf16"]
    x, W_enc, b_enc, W_dec, b_dec = (t.bfloat16().double() for t in make_topk_problem(TOPK_CASES[0], seed=0))
    x_ref = dense_topk_sae(x, W_enc, b_enc, W_dec, b_dec, TOPK_CASES[0][3], True, indices=bf["indices"])[0]
    err = (bf["x_hat"].double() - x_ref).abs().max().item()
    MEASURED[f"topk tp={tp} bf16 x_hat vs float64 (max |x_hat| {x_ref.abs().max().item():.3g})"] = err
    assert bf["x_hat"].dtype == torch.float32 and err < 3e-2 * x_ref.abs().max().item()
    assert res["forward_local_err"].item() < 1e-5, res["forward_local_err"]
    mu_ref = make_batch(99).norm(dim=1).mean().item()
    assert abs(res["mu"].item() - mu_ref) < 1e-5


def _check_train(run_dir, reference, label, log_name="train.json", folder="ckpt/final"):
    rec = json.loads((Path(run_dir) / log_name).read_text())
    for got, want in zip(rec["log"], reference["log"][-len(rec["log"]):]):
        assert abs(got["loss"] - want["loss"]) <= 1e-5 * abs(want["loss"]), (got, want)
        assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-5 * want["grad_norm"], (got, want)
    assert rec["checks"]["b_dec_spread"] == 0.0, "replicated b_dec differs between ranks"
    assert rec["checks"]["W_enc_data_spread"] == 0.0, "data-parallel replicas of a shard differ"
    sd, opt_sd, state = _load_folder(Path(run_dir) / folder)
    assert state["step"] == STEPS
    diff = _max_diff(sd, reference["sd"])
    moved = (reference["sd"]["W_enc"] - make_sae().W_enc.detach()).abs().max().item()
    assert moved > 1000 * ATOL, "the weights barely moved: the comparison would prove nothing"
    MEASURED[f"{label} weights"] = max(diff.values())
    assert max(diff.values()) <= ATOL, f"{label}: {diff}"
    od = _opt_diff(opt_sd, reference["opt"])
    MEASURED[f"{label} Adam moments"] = od
    assert od <= ATOL, f"{label}: Adam state max abs diff {od:g}"
    return diff


def test_topk_tp2_equals_unsharded(world2):
    _check_topk(world2 / "tp2_dp1", 2)


def test_topk_tp4_equals_unsharded(world4):
    _check_topk(world4 / "tp4_dp1", 4)


def test_train_tp2_equals_single_process(world2, reference):
    _check_train(world2 / "tp2_dp1", reference, "tp=2")


def test_train_dp2_equals_single_process(world2, reference):
    _check_train(world2 / "tp1_dp2", reference, "dp=2")


def test_train_tp2_dp2_equals_single_process(world4, reference):
    _check_train(world4 / "tp2_dp2", reference, "tp=2 x dp=2")


def test_train_tp4_equals_single_process(world4, reference):
    _check_train(world4 / "tp4_dp1", reference, "tp=4")


def test_resume_tp2_checkpoint_at_tp1(world2, reference):
    """Gathered step-3 state of the tp=2 run, continued single-process, equals the uninterrupted run."""
    folder = world2 / f"tp2_dp1/ckpt/step{SAVE_AT}"
    sd, opt_sd, state = _load_folder(folder)
    assert state["step"] == SAVE_AT
    assert json.loads((folder / "lm_config.json").read_text())["model_name"] == MODEL_NAME
    final_sd, final_opt, _, _ = reference_run(start_state=(sd, opt_sd), start_step=SAVE_AT)
    diff = _max_diff(final_sd, reference["sd"])
    MEASURED["resume tp=2 -> tp=1 weights"] = max(diff.values())
    assert max(diff.values()) <= ATOL, diff
    assert _opt_diff(final_opt, reference["opt"]) <= ATOL


def test_resume_single_process_checkpoint_at_tp2_dp2(world4, reference):
    """Single-process step-3 checkpoint, resumed with tp=2 x dp=2 (re-sharded on load)."""
    _check_train(world4 / "tp2_dp2", reference, "resume tp=1 -> tp=2 x dp=2", log_name="resume.json",
                 folder="resumed/final")


@pytest.fixture(scope="module")
def step_reference():
    return trainer_step_reference()


@pytest.fixture(scope="module")
def step_reference_bf16():
    return trainer_step_reference(torch.bfloat16)


def _check_step(run_dir, ref, label, name="step.pt", atol=ATOL):
    got = torch.load(Path(run_dir) / name, weights_only=True)
    assert any(m.get("auxk_loss", 0) > 0 for m in ref["metrics"]), "AuxK never engaged: the test is too easy"
    assert any(bool((st.get("row_step0", torch.zeros(1)) > 0).any()) for st in ref["opt"]["state"].values()), \
        "no row was restarted: the test is too easy"
    for t, (g, w) in enumerate(zip(got["metrics"], ref["metrics"])):
        assert g.keys() == w.keys(), (g.keys(), w.keys())
        for key in w:
            assert abs(g[key] - w[key]) <= 1e-5 * max(1.0, abs(w[key])), f"{label} step {t} {key}: {g[key]} vs {w[key]}"
    for key in ("since", "count", "deaths", "was_reset"):
        assert torch.equal(got[key], ref[key]), f"{label}: dead-latent counter {key} differs from the single-process step"
    # what the forward read at each step: the same compute copies and decoder norms, in the same dtypes
    for t, (g, w) in enumerate(zip(got["reads"], ref["reads"])):
        assert g.keys() == w.keys(), (t, g.keys(), w.keys())
        for key in w:
            assert g[key][0] == w[key][0], f"{label} step {t}: {key} read as {g[key][0]}, single process {w[key][0]}"
            err = (g[key][1] - w[key][1]).abs().max().item()
            scale = w[key][1].abs().max().item()
            # step 0 reads the initial weights: bitwise (but b_enc, set by the data init from the mean of
            # the global batch, an all-reduce under data parallelism); later ones differ by the masters'
            # drift (the order of fp32 sums, which bf16 gradients round into differences of about 1e-5)
            drift = 1e-4 if "bf16" in label else 1e-5
            exact = t == 0 and key != "b_enc"
            tol = 0.0 if exact else (2 ** -7 if "bfloat16" in w[key][0] else drift) * scale
            assert err <= tol, f"{label} step {t}: {key} read differs by {err:g} (max |{key}| {scale:g})"
    diff = _max_diff(got["sae"], ref["sae"])
    MEASURED[f"trainer SAEStep {label} weights"] = max(diff.values())
    assert max(diff.values()) <= atol, f"{label}: {diff}"
    od = _opt_diff(got["opt"], ref["opt"])
    MEASURED[f"trainer SAEStep {label} Adam moments"] = od
    assert od <= atol


def test_trainer_step_tp2_equals_single_process(world2, step_reference):
    """The trainer's SAEStep (K-annealing, lr schedule, clipping, AuxK, dead-latent counters) at tp=2
    ends where the single-process SAEStep does."""
    _check_step(world2 / "tp2_dp1", step_reference, "tp=2")


def test_trainer_step_tp2_bf16_reads_what_the_single_process_reads(world2, step_reference_bf16):
    """In the GPU precision (bf16 compute copies of fp32 masters) a tp=2 member's forward reads the same
    compute copies and fp32 decoder norms as the single-process step, and ends with the same dead-latent
    counters and, to float32 tolerance, the same weights."""
    # bf16 gradients: a sum order that differs in the last fp32 bit can round a gradient element to the
    # next bf16 value (2**-8 relative), which moves Adam's normalised update by about as much: per step
    # up to 2**-8 * LR on a weight.
    _check_step(world2 / "tp2_dp1", step_reference_bf16, "bf16 tp=2", name="step_bf16.pt", atol=STEPS * 2 ** -8 * LR)


def test_trainer_step_tp2_dp2_equals_single_process(world4, step_reference):
    _check_step(world4 / "tp2_dp2", step_reference, "tp=2 x dp=2")


def test_dead_rank_makes_survivors_exit_nonzero(tmp_path):
    """Rank 1 exits abruptly before step 2: the survivor fails at its next collective, not hangs."""
    codes, ends, outs = launch(2, ["--out", tmp_path, "--jobs", "2:train", "--kill-after", 2, "--timeout", 15],
                               timeout=90)
    assert codes[1] == 17, outs[1][-2000:]
    assert codes[0] not in (0, None), f"survivor exit {codes[0]}:\n{outs[0][-2000:]}"
    delay = ends[0] - ends[1]
    MEASURED["dead rank: survivor exit after the death (s)"] = delay
    assert delay < 15, f"the survivor took {delay:.1f} s to fail"
    assert "fatal" in outs[0], outs[0][-2000:]


def test_hung_rank_makes_others_exit_within_timeout(tmp_path):
    """Rank 1 hangs outside any collective: rank 0 times out (timeout_s=4) and exits non-zero;
    the harness then kills rank 1, as torchrun's agent does."""
    codes, ends, outs = launch(2, ["--out", tmp_path, "--jobs", "2:train", "--kill-after", -2, "--timeout", 4],
                               timeout=90, stop_on_failure=True)
    assert codes[0] not in (0, None), f"rank 0 exit {codes[0]}:\n{outs[0][-2000:]}"
    assert codes[1] is None, "rank 1 should still hang when rank 0 gives up"
    hung_at = float((tmp_path / "hung_at").read_text())
    delay = time.time() - hung_at - (time.monotonic() - ends[0])
    MEASURED["hung rank: others exit after the hang (s; timeout 4)"] = delay
    assert 3 < delay < 30, f"rank 0 failed {delay:.1f} s after the hang"


def test_cli_under_torchrun_tp2(tiny_llama, tmp_path):
    """The user-facing launch: torchrun --standalone --nproc_per_node 2 -m trainer.run --tp 2 on a tiny
    random Llama, on the CPU; rank 0 exports a checkpoint that loads, every rank exits 0."""
    pytest.importorskip("transformers")

    model = tiny_llama
    words = "alpha beta gamma delta sparse auto encoder latent token layer".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (60,), generator=g).tolist()) for _ in range(200)]
    (tmp_path / "data.txt").write_text("\n".join(lines))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainer.run", "--model", model, "--dataset", str(tmp_path / "data.txt"), "--layer", "1",
           "--expansion", "4", "--k", "4", "--tokens", "2048", "--batch-size", "128", "--buffer-tokens", "1024",
           "--context-len", "64", "--lm-batch-size", "4", "--eval-tokens", "128", "--no-eval-lm-loss",
           "--no-progress", "--device", "cpu", "--output", str(tmp_path / "runs"), "--tp", "2",
           "--dist-timeout", "60", "--export-dtype", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    run_dir = tmp_path / "runs" / "L1R-4x"
    ev = json.loads((run_dir / "eval.json").read_text())
    sae = TopKSAE.from_llama_scope(run_dir, fold=False)
    assert sae.d_sae == 128 and ev["l0"] > 0 and json.loads((run_dir / "hyperparams.json").read_text())["tp_size"] == 2


def test_zz_report_measured_diffs(capsys):
    with capsys.disabled():
        print("\nmax abs diffs (parallel vs single-process / float64):")
        for k, v in MEASURED.items():
            print(f"  {k}: {v:.3g}")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker_main(sys.argv[2:])
