"""The trainer's step (``trainer.train.SAEStep``) for each architecture (docs/method.md sec. 11), side by side
with ``topk``, rounds interleaved: ``pytest benchmarks/test_bench_variants.py --benchmark-only`` (marked slow:
``pytest benchmarks/`` runs it only with ``--run-slow``).

Shape: the embedded default's on a CPU (d_model 576, d_sae 4608, K 50, fp32, the default recipe with
AuxK on and no latent dead yet, Llama Scope loss, clipping, Adam), 4096 tokens a step; on a GPU the Llama
Scope 8x shape (d_model 4096, d_sae 32768, bf16). ``matryoshka_batchtopk`` uses the default prefixes (d_sae /
64, / 16, / 4, d_sae), ``standard`` an L1 coefficient of 5 (dense: it has no K).

BatchTopK's cost depends on how unevenly the batch's scores spread over its tokens (its slots are as many
as the fullest token keeps). The SAE is first trained ``WARM_STEPS`` steps as ``topk`` on the same stream of
activations (random with a shared direction and token norms spread over 0.5-2x, as a residual stream's), so
the scores are a trained SAE's rather than a random one's; the fullest token's L0 (the slots) is
printed and kept in extra_info. The ratio to ``topk`` (median and best rounds) is the target: within 1.15x.
"""
from __future__ import annotations

import copy
import time

import pytest
import torch

from sae_kernels import SAEConfig, TopKSAE
from trainer.train import SAEStep, StepConfig, make_optimizer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
B, D, N, K = (4096, 4096, 32768, 50) if CUDA else (4096, 576, 4608, 50)
DTYPE = torch.bfloat16 if CUDA else None
ROUNDS = 9
WARM_STEPS = 30
ARCHS = {"topk": {}, "batchtopk": {},
         "matryoshka_batchtopk": {"matryoshka_widths": (N // 64, N // 16, N // 4, N)},
         "standard": {"l1_coefficient": 5.0, "l1_warmup_steps": 0}}

pytestmark = pytest.mark.slow


def step_config(arch: str, **kw) -> StepConfig:
    return StepConfig(k=K, k_start=K, total_steps=10_000, anneal_steps=0, warmup_steps=10, decay_fraction=0.2,
                      lr=2e-3, clip_grad_norm=1e-3, auxk=arch != "standard", k_aux=D // 2, dead_window_tokens=10**12,
                      compute_dtype=DTYPE, hold_dead=True, reset_dead_moments=True, architecture=arch, **kw)


def stream(n: int):
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(D, generator=g) * 2  # a residual-stream-like common direction
    out = []
    for _ in range(n):
        x = torch.randn(B, D, generator=g) + mean
        x *= torch.empty(B, 1).uniform_(0.5, 2.0, generator=g)  # token norms vary, as in a residual stream
        out.append(x.to(DEVICE))
    return out


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def test_variant_steps_vs_topk(benchmark):
    xs = stream(4)
    torch.manual_seed(0)
    base = TopKSAE(SAEConfig(d_model=D, d_sae=N, k=K), device=DEVICE)
    base.check_inputs = False
    warm = SAEStep(base, make_optimizer(base, 2e-3, (0.9, 0.9999)), step_config("topk"))
    for t in range(WARM_STEPS):
        warm(xs[t % len(xs)], None, t)
    steps = {}
    for arch, kw in ARCHS.items():
        sae = copy.deepcopy(base)
        steps[arch] = SAEStep(sae, make_optimizer(sae, 2e-3, (0.9, 0.9999)), step_config(arch, **kw))
    times = {a: [] for a in steps}
    l0_max = {a: [] for a in steps}
    t_step = {a: WARM_STEPS for a in steps}

    def run(arch):
        st = steps[arch]
        x = xs[t_step[arch] % len(xs)]
        _sync()
        t0 = time.perf_counter()
        out = st(x, None, t_step[arch])
        _sync()
        times[arch].append(time.perf_counter() - t0)
        if st.batch:
            l0_max[arch].append(st.slots)
        t_step[arch] += 1
        return out

    for arch in steps:  # warm-up (scratch buffers, first-call costs)
        run(arch)
        times[arch].clear()

    def cycle():
        for arch in steps:
            run(arch)

    benchmark.pedantic(cycle, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    med = {a: sorted(ts)[len(ts) // 2] for a, ts in times.items()}
    best = {a: min(ts) for a, ts in times.items()}
    rows = {a: {"median_ms": med[a] * 1e3, "best_ms": best[a] * 1e3, "x_topk_median": med[a] / med["topk"],
                "x_topk_best": best[a] / best["topk"], "tokens_per_s": B / med[a],
                "slots_per_token_max": max(l0_max[a]) if l0_max[a] else None} for a in steps}
    benchmark.extra_info.update(shape=dict(tokens=B, d_model=D, d_sae=N, k=K), device=str(DEVICE),
                                torch=torch.__version__, threads=torch.get_num_threads(), rounds=ROUNDS,
                                warm_steps=WARM_STEPS, steps=rows)
    lines = [f"SAEStep by architecture, {B} tokens x d_model {D} -> d_sae {N}, K {K}, {DEVICE}, {ROUNDS} interleaved rounds"]
    for a, r in rows.items():
        lines.append(f"  {a:<22} median {r['median_ms']:8.1f} ms  best {r['best_ms']:8.1f} ms  "
                     f"x topk {r['x_topk_median']:.2f} (best {r['x_topk_best']:.2f})"
                     + (f"  fullest token {r['slots_per_token_max']} latents" if r["slots_per_token_max"] else ""))
    print("\n" + "\n".join(lines))
