"""The trainer's own step (``trainer.train.SAEStep``) at the embedded default's shape, released recipe
against the default, rounds interleaved: ``pytest benchmarks/test_bench_sae_step.py --benchmark-only`` (marked
slow: ``pytest benchmarks/`` runs it only with ``--run-slow``).

Shape: ``python -m trainer.run`` with no arguments on a CPU (batch 1024 tokens, d_model 576,
d_sae 4608, K 50, fp32, Llama Scope loss, clipping, Adam); on a GPU the Llama Scope 8x shape
(batch 2048, d_model 4096, d_sae 32768, bf16). Steps:

* ``released``: ``--released-recipe`` (no AuxK): the step as it was before the default changed;
* ``default, m dead``: the default step (AuxK, the Adam row flags) with ``m`` dead latents, so AuxK runs
  its auxiliary top-k over those ``m`` latents (read from the forward's pre-activations on the PyTorch
  path) and decodes up to ``k_aux`` of them per token. ``m`` = 0 (no dead latent: AuxK costs only the
  dead-id lookup), 2% and 5% of d_sae, 9% (the mean dead fraction over the default run at layer 12,
  R 9.0%, A 8.4%, TC 4.4%, M 0%: what a whole run pays on average), and 30% (about the peak, 19-29%,
  reached while K anneals; a worst case).

The dead latents are made like those of a training run: each one's encoder bias is shifted so that its
pre-activation is positive on ``POSITIVE`` = 24% of the tokens. Counted from the forward's
pre-activations at every AuxK step of ``python -m trainer.run --layer 12 --position A``: per token, the
dead latents were positive on a mean 24% of them at the peak (m ~ 1000 dead), 13% at m ~ 420 and 2-10%
late in the run, so 24% overstates the later cost. (A random latent is positive on about half of them:
AuxK's top-k then has twice the candidates of a run's, and never finds a batch it can skip.)

In the default steps ``RESTARTED`` = 40% of the latents (the dead ones among them) have a restarted
Adam (``SAEAdam``'s RESET at some earlier step: bias corrections counted from it; held when they get no
gradient), as in a run: at L12A 1791 of the 4608 latents died at least once.

The data-dependent initialisation runs once, at step 0, and is not part of a step's cost. Every round
runs each step once on the same rotating batches; the load of a shared machine changes under all of
them alike. The ratio to ``released`` (median and best rounds) is printed and kept in extra_info.
"""
from __future__ import annotations

import time

import pytest
import torch

from sae_kernels import SAEConfig, TopKSAE
from trainer.train import SAEStep, StepConfig, make_optimizer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
B, D, N, K = (2048, 4096, 32768, 50) if CUDA else (1024, 576, 4608, 50)
DTYPE = torch.bfloat16 if CUDA else None
K_AUX = D // 2  # the default (d_model / 2)
ROUNDS = 9
POSITIVE = 0.24
RESTARTED = 0.4

# Six steps x 9 interleaved rounds (a minute or more on 2 busy cores): skipped by `pytest benchmarks/`
# unless --run-slow is given or this file is named (benchmarks/conftest.py).
pytestmark = pytest.mark.slow
DEAD = {"default, 0 dead": 0, "default, 2% dead": N // 50, "default, 5% dead": N // 20,
        "default, 9% dead": 9 * N // 100, "default, 30% dead": 3 * N // 10}


def make_step(auxk: bool, n_dead: int, x: torch.Tensor) -> SAEStep:
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(d_model=D, d_sae=N, k=K), device=DEVICE)
    sae.check_inputs = False
    opt = make_optimizer(sae, 2e-3, (0.9, 0.9999))
    cfg = StepConfig(k=K, k_start=K, total_steps=10_000, anneal_steps=0, warmup_steps=10, decay_fraction=0.2,
                     lr=2e-3, clip_grad_norm=1e-3, auxk=auxk, k_aux=K_AUX, dead_window_tokens=10**12,
                     compute_dtype=DTYPE, hold_dead=auxk, reset_dead_moments=auxk)
    step = SAEStep(sae, opt, cfg)
    g = torch.Generator().manual_seed(1)
    dead = torch.randperm(N, generator=g)[:n_dead].to(DEVICE)
    step._dead_ids = dead
    if n_dead:
        with torch.no_grad():  # positive on a POSITIVE fraction of the tokens, as a run's dead latents
            pre = x.float() @ sae.W_enc[dead].float().t() + sae.b_enc[dead].float()
            sae.b_enc[dead] -= torch.quantile(pre, 1 - POSITIVE, dim=0).to(sae.b_enc.dtype)
    return step


def mark_restarted(step: SAEStep) -> None:
    """Give RESTARTED of the latents (the dead ones first) a restart at step 10, as RESET would have."""
    n = max(int(RESTARTED * N), len(step._dead_ids))
    rest = torch.randperm(N, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    rest = torch.cat([step._dead_ids, rest[~torch.isin(rest, step._dead_ids)]])[:n]
    step.was_reset[rest] = True
    for p in (step.sae.W_enc, step.sae.b_enc, step.sae.W_dec):
        r = step.opt.state[p].setdefault("row_step0", torch.zeros(p.shape[0], device=DEVICE))
        r[rest] = 10.0


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def test_sae_step_released_vs_default(benchmark):
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(D, generator=g) * 2  # a residual-stream-like common direction
    xs = [(torch.randn(B, D, generator=g) + mean).to(DEVICE) for _ in range(4)]
    steps = {"released": make_step(False, 0, xs[0])}
    steps.update({name: make_step(True, m, xs[0]) for name, m in DEAD.items()})
    times = {name: [] for name in steps}
    t_step = {name: 20 for name in steps}

    def run(name):
        st = steps[name]
        # the dead set is pinned: `since_fired` is reset to it before every step
        st.since_fired.zero_()
        st.since_fired[st._dead_ids] = 10**12
        x = xs[t_step[name] % len(xs)]
        _sync()
        t0 = time.perf_counter()
        st(x, None, t_step[name])
        _sync()
        times[name].append(time.perf_counter() - t0)
        t_step[name] += 1

    for name in steps:  # warm-up (scratch buffers, first-call costs)
        run(name)
        times[name].clear()
        if name != "released":
            mark_restarted(steps[name])

    def cycle():
        for name in steps:
            run(name)

    benchmark.pedantic(cycle, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    med = {n: sorted(ts)[len(ts) // 2] for n, ts in times.items()}
    best = {n: min(ts) for n, ts in times.items()}
    rows = {n: {"median_ms": med[n] * 1e3, "best_ms": best[n] * 1e3, "x_released_median": med[n] / med["released"],
                "x_released_best": best[n] / best["released"], "tokens_per_s": B / med[n]} for n in steps}
    benchmark.extra_info.update(shape=dict(tokens=B, d_model=D, d_sae=N, k=K, k_aux=K_AUX),
                                device=str(DEVICE), torch=torch.__version__, threads=torch.get_num_threads(),
                                rounds=ROUNDS, steps=rows)
    lines = [f"SAEStep, {B} tokens x d_model {D} -> d_sae {N}, k {K}, k_aux {K_AUX}, {DEVICE}, {ROUNDS} interleaved rounds"]
    for n, r in rows.items():
        lines.append(f"  {n:<20} median {r['median_ms']:8.1f} ms  best {r['best_ms']:8.1f} ms  "
                     f"x released {r['x_released_median']:.2f} (best {r['x_released_best']:.2f})")
    print("\n" + "\n".join(lines))
