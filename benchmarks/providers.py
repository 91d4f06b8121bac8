"""Providers, shapes, the roofline model and the measurement helpers shared by the benchmark files.

Every benchmark builds a ``Case`` for one (op, provider, shape): a ``forward`` that records the autograd
graph as training does, the tensors and upstream gradients its ``backward`` starts from, and the
parameters the Adam step updates. The three modes time the same three pieces for every provider:

* ``forward``: the forward alone (graph recorded, as in training);
* ``backward``: the backward alone (of one recorded forward, re-run with ``retain_graph``);
* ``full``: forward + backward + ``torch.optim.Adam(fused=True)`` step + ``zero_grad(set_to_none=True)``.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from sae_kernels import SAEConfig, TopKSAE, sparse_decode, topk_encode
from sae_kernels.backend import triton_available

Tensor = torch.Tensor

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = ("dense", "torch", "triton", "sparsify")
MODES = ("forward", "backward", "full")
# Llama Scope optimiser (docs/method.md sec. 4): Adam, betas (0.9, 0.9999), lr 8e-4, no weight decay.
ADAM = dict(lr=8e-4, betas=(0.9, 0.9999))

# Seconds of timed rounds per benchmark, within [MIN_ROUNDS, MAX_ROUNDS]: the whole CPU suite stays
# under 5 minutes on 2 busy cores while the fast providers get 10-15 rounds.
ROUND_BUDGET_S = 1.5
MIN_ROUNDS, MAX_ROUNDS = 3, 15
# Rounds of the interleaved comparison (every round runs each provider once, in turn).
INTERLEAVED_ROUNDS = 7


@dataclass(frozen=True)
class Shape:
    tokens: int
    d_model: int
    d_sae: int
    k: int
    dtype: torch.dtype

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "").replace("float", "fp").replace("bfp", "bf")
        return f"B{self.tokens}-d{self.d_model}-n{self.d_sae}-k{self.k}-{dt}"


# GPU: the Llama Scope shapes. CPU: scaled down so the suite finishes in a few minutes.
GPU_SHAPES = [Shape(4096, 4096, 32768, 50, torch.bfloat16), Shape(4096, 4096, 131072, 50, torch.bfloat16)]
CPU_SHAPES = [Shape(4096, 576, 4608, 50, torch.float32)]
SHAPES = GPU_SHAPES if DEVICE.type == "cuda" else CPU_SHAPES


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or 'cpu'} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def skip_reason(provider: str) -> Optional[str]:
    """Why ``provider`` cannot run here, or None."""
    if provider == "triton":
        if DEVICE.type != "cuda":
            return "triton provider needs CUDA (the interpreter on CPU is useless for timing)"
        if not triton_available():
            return "triton not importable"
    if provider == "sparsify":
        try:
            import sparsify  # noqa: F401  (SPARSIFY_DISABLE_TRITON is set in conftest.py on CPU)
        except Exception as e:  # not installed, or a dependency missing
            return f"eai-sparsify not importable ({type(e).__name__}: {e})"
    return None


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# Inputs and parameters, identical for every provider (sparsify keeps its own parameter layout).
# --------------------------------------------------------------------------------------------------


def make_sae(shape: Shape, seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    cfg = SAEConfig(d_model=shape.d_model, d_sae=shape.d_sae, k=shape.k, dtype=str(shape.dtype).replace("torch.", ""))
    return TopKSAE(cfg, device=DEVICE)


def make_x(shape: Shape, seed: int = 1) -> Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    # Unit-variance activations shifted by a common direction, like a residual stream (never zeros).
    x = torch.randn(shape.tokens, shape.d_model, generator=g) + torch.randn(shape.d_model, generator=g)
    return x.to(DEVICE, shape.dtype)


def fvu(x_hat: Tensor, x: Tensor) -> Tensor:
    """The normalised MSE every provider minimises (sparsify's ``fvu``): sum (x̂-x)^2 / sum (x-x̄)^2."""
    xf = x.float()
    return (x_hat.float() - xf).pow(2).sum() / (xf - xf.mean(0)).pow(2).sum()


@dataclass
class Case:
    forward: Callable[[], Any]
    # outputs of forward -> (tensors, grad_tensors) for torch.autograd.backward
    backward_args: Callable[[Any], Tuple[Sequence[Tensor], Optional[Sequence[Tensor]]]]
    params: List[Tensor]

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.params, **ADAM, fused=True)  # fused kernels exist on CPU and CUDA


def _params(*ts: Tensor) -> List[Tensor]:
    return [t.detach().clone().requires_grad_() for t in ts]


@contextlib.contextmanager
def backend(provider: str):
    """The package's backend for ``provider`` (torch or triton) while the benchmark runs; for the other
    providers the default (the package is only used to build inputs there)."""
    saved = os.environ.pop("SAE_KERNELS_BACKEND", None)
    if provider in ("torch", "triton"):
        os.environ["SAE_KERNELS_BACKEND"] = provider
    try:
        yield
    finally:
        os.environ.pop("SAE_KERNELS_BACKEND", None)
        if saved is not None:
            os.environ["SAE_KERNELS_BACKEND"] = saved


def _dense_encode(x, W_enc, b_enc, k, dec_norm):
    # The first half of reference.dense_topk_sae: linear, ReLU, weighted top-k, scatter to a mask.
    z = torch.relu(F.linear(x, W_enc, b_enc))
    idx = torch.topk((z * dec_norm).detach(), k, dim=1).indices
    return z * torch.zeros_like(z).scatter_(1, idx, 1.0)


def topk_encode_case(provider: str, shape: Shape) -> Case:
    sae = make_sae(shape)
    x = make_x(shape)
    dec_norm = sae.dec_norm()
    W, b = _params(sae.W_enc, sae.b_enc)
    g = torch.Generator(device="cpu").manual_seed(2)
    grad_values = torch.randn(shape.tokens, shape.k, generator=g).to(DEVICE, shape.dtype)
    if provider in ("torch", "triton"):
        return Case(lambda: topk_encode(x, W, b, shape.k, dec_norm, check_finite_input=False)[0], lambda v: ([v], [grad_values]), [W, b])
    if provider == "dense":
        # The dense encoder's upstream gradient is dense (it comes out of the decoder GEMM's backward):
        # the same values scattered at the selection, built once, untimed. A dense backward costs the
        # same whatever the support, so it stays valid after Adam moves the selection.
        with torch.no_grad():
            idx = torch.topk(torch.relu(F.linear(x, W, b)) * dec_norm, shape.k, dim=1).indices
            grad_f = torch.zeros(shape.tokens, shape.d_sae, dtype=shape.dtype, device=DEVICE)
            grad_f.scatter_(1, idx, grad_values)
        return Case(lambda: _dense_encode(x, W, b, shape.k, dec_norm), lambda f: ([f], [grad_f]), [W, b])
    if provider == "sparsify":
        from sparsify.fused_encoder import fused_encoder

        return Case(lambda: fused_encoder(x, W, b, shape.k, "topk").top_acts, lambda v: ([v], [grad_values]), [W, b])
    raise ValueError(provider)


def sparse_decode_case(provider: str, shape: Shape) -> Case:
    sae = make_sae(shape)
    x = make_x(shape)
    with torch.no_grad():
        values, indices = topk_encode(x, sae.W_enc, sae.b_enc, shape.k, sae.dec_norm(), check_finite_input=False)
        f_dense = torch.zeros(shape.tokens, shape.d_sae, dtype=shape.dtype, device=DEVICE).scatter_(1, indices, values)
    g = torch.Generator(device="cpu").manual_seed(3)
    grad_out = torch.randn(shape.tokens, shape.d_model, generator=g).to(DEVICE, shape.dtype)
    W, b = _params(sae.W_dec, sae.b_dec)
    bwd = lambda out: ([out], [grad_out])  # noqa: E731
    if provider in ("torch", "triton"):
        v = values.detach().clone().requires_grad_()
        return Case(lambda: sparse_decode(v, indices, W, b, check_indices=False), bwd, [W, b])
    if provider == "dense":
        f = f_dense.requires_grad_()
        return Case(lambda: f @ W + b, bwd, [W, b])
    if provider == "sparsify":
        from sparsify.utils import decoder_impl

        v = values.detach().clone().requires_grad_()
        # SparseCoder.decode: decoder_impl(top_indices, top_acts, W_dec.mT) + b_dec.
        return Case(lambda: decoder_impl(indices, v, W.mT) + b, bwd, [W, b])
    raise ValueError(provider)


def train_step_case(provider: str, shape: Shape) -> Case:
    """The whole SAE: encode, decode, FVU loss. Backward from the loss; Adam over all parameters."""
    sae = make_sae(shape)
    x = make_x(shape)
    loss = lambda l: ([l], None)  # noqa: E731
    if provider in ("torch", "triton"):
        # The package's module as the trainer runs it: weighted TopK, sparse decode, and no NaN check
        # on the input (a host sync; trainer/run.py turns it off the same way).
        sae.check_inputs = False
        return Case(lambda: fvu(sae(x), x), loss, list(sae.parameters()))
    if provider == "dense":
        from sae_kernels.reference import dense_topk_sae

        We, be, Wd, bd = _params(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
        return Case(lambda: fvu(dense_topk_sae(x, We, be, Wd, bd, shape.k)[0], x), loss, [We, be, Wd, bd])
    if provider == "sparsify":
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(0)
        cfg = SparseCoderConfig(num_latents=shape.d_sae, k=shape.k)
        sc = SparseCoder(shape.d_model, cfg, device=DEVICE, dtype=shape.dtype)
        return Case(lambda: sc(x).fvu, loss, list(sc.parameters()))
    raise ValueError(provider)


CASES = {"topk_encode": topk_encode_case, "sparse_decode": sparse_decode_case, "train_step": train_step_case}


# --------------------------------------------------------------------------------------------------
# The modes: what one timed round runs, and the untimed setup before it.
# --------------------------------------------------------------------------------------------------


def mode_fns(case: Case, mode: str) -> Tuple[Callable, Optional[Callable]]:
    """``(target, setup)``: ``setup()`` returns ``(args, kwargs)`` for ``target`` (pytest-benchmark's
    pedantic protocol) or is None."""
    if mode == "forward":
        def fwd():
            out = case.forward()
            sync()
            return out

        return fwd, None
    if mode == "backward":
        # One forward for all rounds; each round runs the backward of that graph again (retain_graph)
        # after dropping the previous round's gradients.
        args = case.backward_args(case.forward())
        sync()

        def setup():
            for p in case.params:
                p.grad = None
            return (), {}

        def bwd():
            torch.autograd.backward(*args, retain_graph=True)
            sync()

        return bwd, setup
    if mode == "full":
        opt = case.optimizer()
        for p in case.params:  # create the Adam state now: zero gradients leave the parameters as they are
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)

        def step():
            torch.autograd.backward(*case.backward_args(case.forward()))
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()

        return step, None
    raise ValueError(mode)


def time_once(target: Callable, setup: Optional[Callable]) -> float:
    args, kwargs = setup() if setup else ((), {})
    t = time.perf_counter()
    target(*args, **kwargs)
    return time.perf_counter() - t


def rounds_for(seconds_per_round: float) -> int:
    return max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(ROUND_BUDGET_S / max(seconds_per_round, 1e-6))))


PEAK_METHOD = (
    "torch.cuda.max_memory_allocated minus memory_allocated before the call"
    if DEVICE.type == "cuda"
    else "torch.profiler memory events (every c10 CPU allocation and free, in time order): running-sum "
    "maximum during one call above what was live at its start; the package's cached CPU scratch is "
    "released first so that it is counted"
)


def peak_memory_bytes(target: Callable, setup: Optional[Callable]) -> Tuple[int, float]:
    """``(peak bytes, seconds)`` of one call of ``target``: the peak of tensor memory allocated during
    the call above what was live when it started, and the call's duration (with the profiler on).

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch keeps no allocator statistics for the CPU, so
    the allocations and frees the profiler records (``profile_memory=True``) are summed in time order
    and the running maximum is taken. Gradients count (``zero_grad(set_to_none=True)`` frees them after
    each step); parameters, inputs and the Adam state (created beforehand) do not. Frees of blocks
    allocated before the call are not seen, which can only overstate the peak. Library scratch outside
    torch's allocator (MKL / oneDNN workspaces) is not seen.
    """
    from sae_kernels.reference import release_scratch

    args, kwargs = setup() if setup else ((), {})
    release_scratch()  # the package's CPU path keeps its N x d_sae buffers between calls: count them
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        target(*args, **kwargs)  # ends with a synchronize
        elapsed = time.perf_counter() - t
        return torch.cuda.max_memory_allocated() - base, elapsed
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t = time.perf_counter()
        target(*args, **kwargs)
        elapsed = time.perf_counter() - t
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, elapsed


# --------------------------------------------------------------------------------------------------
# Roofline: the minimal work of each (op, mode), priced at this machine's measured (CPU) or published
# (GPU, PERFORMANCE.md) peak GEMM throughput and memory bandwidth.
# --------------------------------------------------------------------------------------------------

# Dense bf16 tensor-core peak and HBM bandwidth (PERFORMANCE.md; the H200 has the H100's compute).
GPU_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


@dataclass
class Machine:
    name: str
    flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    source: str


def measure_machine(shape: Shape) -> Machine:
    name = device_name()
    if DEVICE.type == "cuda":
        for key, (fl, bw) in GPU_PEAKS.items():
            if key in name:
                return Machine(name, fl, bw, f"published {key} peaks, PERFORMANCE.md")
    # Best of 5: the encoder GEMM at this shape (the floor of a sparse step) and a 256 MiB copy.
    x = make_x(shape)
    W = torch.randn(shape.d_sae, shape.d_model, dtype=shape.dtype, device=DEVICE)
    b = torch.zeros(shape.d_sae, dtype=shape.dtype, device=DEVICE)
    out = torch.empty(shape.tokens, shape.d_sae, dtype=shape.dtype, device=DEVICE)
    src = torch.ones(1 << 26, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    t_gemm = t_copy = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.addmm(b, x, W.t(), out=out)
        sync()
        t_gemm = min(t_gemm, time.perf_counter() - t)
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        t_copy = min(t_copy, time.perf_counter() - t)
    flops = 2 * shape.tokens * shape.d_model * shape.d_sae / t_gemm
    bw = 2 * src.numel() * src.element_size() / t_copy
    return Machine(name, flops, bw, "measured at session start: best of 5 encoder GEMMs (addmm) and 256 MiB copies")


def work(op: str, mode: str, s: Shape) -> Tuple[float, float]:
    """(FLOPs, bytes) of the minimal sparse computation: what a fused kernel must do, whatever the
    provider actually does (so a dense provider's "TFLOP/s" is effective throughput).

    Encoder forward: the ``B x d x n`` GEMM, reading x and W_enc, writing values + int64 indices.
    Encoder backward: dW_enc and db from k rows per token (x needs no gradient in training).
    Decoder forward: k rows of W_dec per token. Decoder backward: d(values) and dW_dec.
    Adam: ~10 FLOPs and 7 element accesses per parameter (p, m, v read and written, grad read).
    """
    B, d, n, k = s.tokens, s.d_model, s.d_sae, s.k
    e = torch.tensor([], dtype=s.dtype).element_size()
    sel = B * k * (e + 8)
    enc = {"forward": (2 * B * d * n, (B * d + n * d + n) * e + sel),
           "backward": (2 * B * k * d, (B * d + 2 * n * d + 2 * n) * e + sel)}
    dec = {"forward": (2 * B * k * d, (B * d + n * d + d) * e + sel),
           "backward": (4 * B * k * d, (2 * B * d + 2 * n * d + 2 * d + B * k) * e + sel)}
    adam = lambda p: (10 * p, 7 * e * p)  # noqa: E731
    passes = [m for m in ("forward", "backward") if mode in (m, "full")]
    parts = []
    if op in ("topk_encode", "train_step"):
        parts += [enc[m] for m in passes]
    if op in ("sparse_decode", "train_step"):
        parts += [dec[m] for m in passes]
    if mode == "full":
        params = {"topk_encode": n * d + n, "sparse_decode": n * d + d, "train_step": 2 * n * d + n + d}[op]
        parts.append(adam(params))
    return float(sum(f for f, _ in parts)), float(sum(b for _, b in parts))


# --------------------------------------------------------------------------------------------------
# Running one benchmark, and the rows of the summary table that conftest.py prints.
# --------------------------------------------------------------------------------------------------

RESULTS: List[Dict[str, Any]] = []


def run(benchmark, machine: Machine, op: str, provider: str, mode: str, shape: Shape) -> None:
    """Times ``mode`` of ``op`` for ``provider`` with pytest-benchmark, then records extra_info."""
    reason = skip_reason(provider)
    if reason:
        import pytest

        pytest.skip(reason)
    benchmark.group = f"{op} {mode} {shape.id}"
    with backend(provider):
        case = CASES[op](provider, shape)
        target, setup = mode_fns(case, mode)
        if DEVICE.type == "cuda":
            time_once(target, setup)  # JIT compilation, library workspaces: not a step's memory
        # The memory measurement is also the warm-up round, and sizes the timed rounds.
        peak, first = peak_memory_bytes(target, setup)
        rounds = rounds_for(first)
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing to record
        return
    st = benchmark.stats.stats
    flops, nbytes = work(op, mode, shape)
    t_roof = flops / machine.flops + nbytes / machine.bandwidth
    info = dict(
        op=op, provider=provider, mode=mode, shape=shape.id, tokens=shape.tokens, d_model=shape.d_model,
        d_sae=shape.d_sae, k=shape.k, dtype=str(shape.dtype).replace("torch.", ""), device=machine.name,
        torch=torch.__version__, threads=torch.get_num_threads(), rounds=rounds,
        tokens_per_s=shape.tokens / st.median, tokens_per_s_best=shape.tokens / st.min,
        tflops=flops / st.median / 1e12, gb_per_s=nbytes / st.median / 1e9,
        model_flops=flops, model_bytes=nbytes, roofline_fraction=t_roof / st.median,
        roofline=f"{machine.flops / 1e12:.3f} TFLOP/s + {machine.bandwidth / 1e9:.1f} GB/s ({machine.source}); "
        "floor = minimal sparse FLOPs / FLOP/s + minimal bytes / bandwidth",
        peak_memory_mib=peak / 2**20, peak_memory_method=PEAK_METHOD,
    )
    benchmark.extra_info.update(info)
    RESULTS.append(dict(info, median_s=st.median, min_s=st.min))


INTERLEAVED: List[Dict[str, Any]] = []


def floor_fn(shape: Shape) -> Callable[[], None]:
    """The floor of a training step: the bare encoder GEMM (``addmm`` into a kept buffer) and
    ``torch.topk`` of its output, nothing else (no ReLU, weighting, decode, backward or optimizer)."""
    x = make_x(shape)
    W = torch.randn(shape.d_sae, shape.d_model, dtype=shape.dtype, device=DEVICE)
    b = torch.zeros(shape.d_sae, dtype=shape.dtype, device=DEVICE)
    out = torch.empty(shape.tokens, shape.d_sae, dtype=shape.dtype, device=DEVICE)

    def floor():
        torch.addmm(b, x, W.t(), out=out)
        torch.topk(out, shape.k, dim=1)
        sync()

    return floor


def run_interleaved(benchmark, machine: Machine, op: str, mode: str, shape: Shape) -> None:
    """All available providers, rounds interleaved (dense, torch, sparsify, dense, ...): on a machine
    shared with other work, the load then changes under all of them alike, which back-to-back
    benchmarks of one provider each cannot promise. pytest-benchmark times whole cycles; the
    per-provider round times go into extra_info["providers"]. For the training step, ``floor`` (the
    bare encoder GEMM and ``torch.topk``, ``floor_fn``) runs in every round too, and each provider's
    ``x_floor`` is its median over the floor's."""
    providers = [p for p in PROVIDERS if skip_reason(p) is None]
    fns = {}
    for p in providers:
        with backend(p):
            fns[p] = mode_fns(CASES[op](p, shape), mode)
            time_once(*fns[p])  # warm-up
    if op == "train_step" and mode == "full":
        providers.append("floor")
        fns["floor"] = (floor_fn(shape), None)
        time_once(*fns["floor"])
    times: Dict[str, List[float]] = {p: [] for p in providers}

    def cycle():
        for p in providers:
            with backend(p):
                times[p].append(time_once(*fns[p]))

    benchmark.group = f"{op} {mode} {shape.id} interleaved"
    benchmark.pedantic(cycle, rounds=INTERLEAVED_ROUNDS, warmup_rounds=0, iterations=1)
    if benchmark.stats is None:
        return
    per = {}
    for p, ts in times.items():
        med = statistics.median(ts)
        per[p] = dict(median_s=med, min_s=min(ts), rounds=len(ts), round_s=ts,
                      tokens_per_s=shape.tokens / med, tokens_per_s_best=shape.tokens / min(ts))
    for p, r in per.items():
        for other in ("dense", "sparsify"):
            if other in per:
                r[f"speedup_vs_{other}"] = per[other]["median_s"] / r["median_s"]
                r[f"speedup_vs_{other}_best"] = per[other]["min_s"] / r["min_s"]
        if "floor" in per:
            r["x_floor"] = r["median_s"] / per["floor"]["median_s"]
            r["x_floor_best"] = r["min_s"] / per["floor"]["min_s"]
    info = dict(op=op, mode=mode, shape=shape.id, device=machine.name, torch=torch.__version__,
                threads=torch.get_num_threads(), interleaved_rounds=INTERLEAVED_ROUNDS, providers=per)
    benchmark.extra_info.update(info)
    INTERLEAVED.append(info)
