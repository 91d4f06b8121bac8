"""Compile every kernel configuration the launchers can pick for sm_90 (Hopper) without a GPU.

``python benchmarks/sm90_report.py [--jobs N] [--json OUT]`` prints, per configuration of
``sae_kernels.triton_ops.launch_configs()``, the registers per thread, spill stores / loads, shared
memory (bytes) and compile seconds, from Triton's own sm_90 pipeline (``GPUTarget("cuda", 90, 32)``)
and ``ptxas -v`` (the ptxas Triton bundles for sm_90). ``tests/e2e/test_compile_sm90.py`` runs it and
fails on spills, shared memory over the limit, or a TF32 MMA in an fp32 kernel.

``python benchmarks/sm90_report.py --sass [--d-sae N ...] [--k K ...]`` prints the SASS instruction
count of the row select (``row_select_instructions_per_element``): the cubin disassembled with the
``cuobjdump`` Triton bundles, the instructions of each hot loop and of the code around them,
thread-level instructions per pre-activation element per pass and in total, and the implied time at
4096 rows against the one-HBM-read floor, under an issue-rate model (``H100_SXM``).
``sass_counts(config_name)`` gives the loops of any configuration of ``launch_configs()``.

These are internal APIs of Triton 3.9 (``ASTSource``, ``make_backend``, ``MockTensor``,
``create_function_from_signature``); ``available()`` says whether they and ptxas are present.
Must run with ``TRITON_INTERPRET`` unset: interpreted kernels cannot be compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SM90_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
SM90_MAX_REGS = 255


def _ptxas() -> Optional[str]:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception:
        return None
    return path if path and os.path.exists(path) else None


def available() -> Optional[str]:
    """None when the sm_90 compile can run here, else the reason it cannot."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: interpreted kernels cannot be compiled"
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import MockTensor, create_function_from_signature  # noqa: F401
    except Exception as e:  # another Triton version
        return f"triton internals missing ({type(e).__name__}: {e})"
    if _ptxas() is None:
        return "Triton's bundled ptxas for sm_90 not found"
    return None


def _compile(fn, args: List[Any], kwargs: Dict[str, Any]):
    """Triton's CompiledKernel of ``fn`` for sm_90 (``args`` as in ``launch_configs``: a torch.dtype
    stands for a tensor of that dtype)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    call_args = [MockTensor(a) if isinstance(a, torch.dtype) else a for a in args]
    bound, spec, opts = binder(*call_args, **kwargs)
    options, sig, constexprs, attrs = fn._pack_args(backend, opts, bound, spec, None)
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options.__dict__)


def _ptxas_info(ptx: str) -> Dict[str, Any]:
    """Registers, spills and stack of ``ptx`` for sm_90a, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "k.ptx"
        p.write_text(ptx)
        r = subprocess.run([_ptxas(), "-v", "--gpu-name=sm_90a", str(p), "-o", str(Path(tmp) / "k.o")],
                           capture_output=True, text=True)
    log = r.stderr + r.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {
        "ok": r.returncode == 0,
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else None,
        "spill_loads": int(spill.group(2)) if spill else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "ptxas_log": log.strip()[-400:] if r.returncode else "",
    }


def _compile_one(index: int) -> Dict[str, Any]:
    from sae_kernels import triton_ops

    name, fn, args, kwargs = list(triton_ops.launch_configs())[index]
    kwargs = dict(kwargs)
    t0 = time.perf_counter()
    ck = _compile(fn, args, kwargs)
    ptx = ck.asm["ptx"]
    info = _ptxas_info(ptx)
    return {
        "name": name, "kernel": fn.__name__, "ok": info["ok"],
        "registers": info["registers"], "spill_stores": info["spill_stores"], "spill_loads": info["spill_loads"],
        "stack_bytes": info["stack_bytes"],
        "shared_bytes": int(ck.metadata.shared),
        "num_warps": int(kwargs.get("num_warps", 4)),
        "tf32_mma": bool(re.search(r"\.tf32", ptx)),
        "compile_s": round(time.perf_counter() - t0, 2),
        "constexprs": {k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in kwargs.items()},
        "ptxas_log": info["ptxas_log"],
    }


def compile_all(jobs: int = 2) -> List[Dict[str, Any]]:
    """Compile every configuration (``jobs`` processes); one dict per configuration, in order."""
    reason = available()
    if reason:
        raise RuntimeError(reason)
    from sae_kernels import triton_ops

    n = len(list(triton_ops.launch_configs()))
    if jobs <= 1:
        return [_compile_one(i) for i in range(n)]
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        return list(ex.map(_compile_one, range(n)))


# ---------------------------------------------------------------------------------- SASS counts

# Issue-rate model: an H100 SXM issues at most one warp instruction per scheduler per cycle, 4
# schedulers per SM, 132 SMs, ~1.755 GHz sustained (1.98 GHz boost); HBM3 ~3.35 TB/s. The implied
# time is the instruction-issue bound at IPC 1 per scheduler (a lower bound of an instruction-bound
# kernel: dependencies, barriers and memory stalls come on top).
H100_SXM = dict(name="H100 SXM", sms=132, schedulers_per_sm=4, clock_ghz=1.755, ipc=1.0, hbm_tb_s=3.35)

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)")


def _nv_tool(name: str) -> Optional[str]:
    try:
        import triton

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    except Exception:
        return None
    return str(path) if path.exists() else None


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin, from the ``cuobjdump -sass`` (else ``nvdisasm``) Triton bundles."""
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "k.cubin"
        p.write_bytes(cubin)
        for tool, flags in (("cuobjdump", ["-sass"]), ("nvdisasm", [])):
            exe = _nv_tool(tool)
            if exe:
                r = subprocess.run([exe, *flags, str(p)], capture_output=True, text=True)
                if r.returncode == 0 and _SASS_LINE.search(r.stdout):
                    return r.stdout
    raise RuntimeError("no SASS disassembler (cuobjdump / nvdisasm) next to Triton's ptxas")


def parse_sass(text: str) -> List[Tuple[int, str]]:
    """(address, instruction) of every SASS instruction, in address order."""
    out = []
    for line in text.splitlines():
        m = _SASS_LINE.search(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def _opcode(ins: str) -> str:
    parts = ins.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def _loops(instrs: List[Tuple[int, str]]) -> List[Tuple[int, int]]:
    """Loops as (first, last) address ranges: every backward branch (ptxas lays loops out whole)."""
    loops = set()
    for a, ins in instrs:
        m = _BRANCH.search(ins)
        if m and int(m.group(1), 16) < a:
            loops.add((int(m.group(1), 16), a))
    return sorted(loops)


def _merge_overlapping(ranges: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Innermost loop ranges that overlap without nesting, merged: one loop that ptxas laid out with
    two back edges (seen at d_sae not a multiple of 16, where the unaligned row loads change SW's
    layout), counted as one loop of the union's instructions."""
    out: List[Tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _loop_stats(instrs: List[Tuple[int, str]], lo: int, hi: int) -> Dict[str, int]:
    ops = [_opcode(i) for a, i in instrs if lo <= a <= hi]
    return {
        "instructions": len(ops),
        "barriers": sum(o.startswith("BAR") for o in ops),
        "shared_atomics": sum(o.startswith("ATOMS") for o in ops),
        "global_loads": sum(o.startswith("LDG") for o in ops),
        "global_stores": sum(o.startswith("STG") for o in ops),
        "shuffles": sum(o.startswith("SHFL") for o in ops),
    }


def sass_counts(config_name: str) -> Dict[str, Any]:
    """Compile one configuration of ``launch_configs()`` for sm_90a and count its SASS: total
    instructions, registers / spills / shared memory, and every innermost loop (address range,
    instructions per iteration, barriers, shared atomics, global loads and stores, shuffles), in
    address order."""
    reason = available()
    if reason:
        raise RuntimeError(reason)
    from sae_kernels import triton_ops

    configs = {c[0]: c for c in triton_ops.launch_configs()}
    if config_name not in configs:
        raise KeyError(f"{config_name!r}: not in launch_configs() ({', '.join(sorted(configs))})")
    _, fn, args, kwargs = configs[config_name]
    return {k: v for k, v in _sass_report(fn, args, dict(kwargs), config_name).items() if not k.startswith("_")}


def _sass_report(fn, args, kwargs, name) -> Dict[str, Any]:
    ck = _compile(fn, args, kwargs)
    instrs = parse_sass(disassemble(ck.asm["cubin"]))
    loops = _loops(instrs)
    inner = [(lo, hi) for lo, hi in loops if not any((a, b) != (lo, hi) and lo <= a and b <= hi for a, b in loops)]
    info = _ptxas_info(ck.asm["ptx"])
    return {
        "name": name, "kernel": fn.__name__, "num_warps": int(kwargs.get("num_warps", 4)),
        "registers": info["registers"], "spill_stores": info["spill_stores"], "spill_loads": info["spill_loads"],
        "shared_bytes": int(ck.metadata.shared), "instructions": len(instrs),
        "loops": [dict(first=hex(lo), last=hex(hi), **_loop_stats(instrs, lo, hi)) for lo, hi in inner],
        "_instrs": instrs, "_loops": loops,
    }


# --- the row select's typical row, simulated on synthetic rows (the kernel's decisions, in torch)


def _keys(s):
    """The kernel's uint32 key of fp32 scores (csrc_triton/topk_select.py ``_key``), as int64."""
    import torch

    i = s.contiguous().view(torch.int32).to(torch.int64)
    t = torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return torch.clamp_max((t + 0x7F800000) % (1 << 32), 0xFF000001)


def _choose(hist, need: int) -> Tuple[int, int, int]:
    import torch

    ge = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])
    b = int((ge >= need).nonzero().max())
    above = int(ge[b + 1]) if b + 1 < len(ge) else 0
    return b, above, int(ge[b]) - above


def _simulate_row_select(d_sae: int, k: int, dtype: str, has_norm: bool, rows: int, seed: int) -> Dict[str, float]:
    """Mean per-row trip counts of the row select's loops on synthetic rows: pre-activations N(0, 1)
    rounded to ``dtype``, decoder norms U(0.8, 1.2) (or none)."""
    import numpy as np
    import torch

    from sae_kernels import triton_ops as T

    g = torch.Generator().manual_seed(seed)
    cfg = T._row_select_config(False, has_norm, k)
    block, wb, sb = cfg["BLOCK"], cfg["BLOCK"] // 2, (256 if cfg["SMALL_K"] else 2048)
    cap = T._select_capacity(d_sae, k)
    n_s, k_s = T._select_sample(d_sae, k)
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    pre = torch.randn(rows, d_sae, generator=g).to(tdt).float()
    norm = (0.8 + 0.4 * torch.rand(d_sae, generator=g)) if has_norm else None
    z = torch.where(pre > 0, pre, torch.zeros_like(pre))
    keys = _keys(z * norm if norm is not None else z)
    n_words = -(-d_sae // 32)
    acc = dict(rounds=0.0, n_c=0.0, s_iters=[0.0, 0.0, 0.0], s_runs=[0.0, 0.0, 0.0], sw_iters=0.0, fallback=0.0,
               dense=0.0, flat=0.0, z=0.0, z_done=0.0)
    dense_div = 8   # csrc_triton/topk_select.py DENSE_DIV
    for key in keys:
        b, above, in_bin = _choose(torch.bincount(key[:n_s] >> 21, minlength=2048), k_s)
        thr = b << 21
        n_span = n_s
        ok = False
        if n_s == d_sae and b == 0x3FC:   # Z: W from the row, the K-th key +0.0's
            acc["z"] += 1
            if int((key > 0x7F800000).sum()) == above:
                acc["z_done"] += 1
                continue
        for attempt in range(2):
            if attempt == 1:
                acc["fallback"] += 1
                b, above, in_bin = _choose(torch.bincount(key >> 21, minlength=2048), k)
                thr = b << 21   # (rows needing H1 / H2 are not modelled: none in these data)
                n_span = d_sae
            cand = key >= thr
            n_c = int(cand.sum())
            dense = (above + in_bin) * dense_div >= n_span
            if n_s < d_sae or n_c <= cap or attempt == 1:
                if not dense:
                    bits = torch.zeros(n_words * 32, dtype=torch.int64)
                    bits[:d_sae] = cand.to(torch.int64)
                    pop = bits.view(n_words, 32).sum(1)
                    acc["rounds"] += sum(int(pop[w0:w0 + wb].max()) for w0 in range(0, n_words, wb))
                ok = k <= n_c <= cap
            if ok:
                break
        acc["dense"] += dense
        ck = key[cand].numpy().astype(np.int64)
        acc["n_c"] += n_c
        n_eq = int((key == thr).sum()) if dense else 0
        lo, need, more, width = thr, k, True, (1 << 32) - 1
        if n_c - n_eq < k:   # the K-th key is thr itself: no S pass
            acc["flat"] += 1
            more = False
        span = np.float32(int(ck.max()) - lo)
        sh = max(int((span.view(np.int32) >> 23)) - 126 - 11, 0)
        for p in range(3):
            if more:
                acc["s_runs"][p] += 1
                acc["s_iters"][p] += -(-n_c // sb)
                d = (ck - lo) % (1 << 32)
                hist = torch.bincount(torch.from_numpy(d[d < width] >> sh), minlength=2048)
                b, above, in_bin = _choose(hist, need)
                need -= above
                lo += b << sh
                width = 1 << sh
                more = in_bin != need and sh > 0
                sh = sh - 11 if sh > 11 else 0
        acc["sw_iters"] += -(-n_c // sb)
    out = {key: (v / rows if not isinstance(v, list) else [x / rows for x in v]) for key, v in acc.items()}
    out.update(block=block, wb=wb, sb=sb, cap=cap, n_sample=n_s, k_sample=k_s, n_words=n_words)
    return out


def row_select_instructions_per_element(d_sae: int = 32768, k: int = 50, n_rows: int = 4096, dtype: str = "bf16",
                                        has_norm: bool = True, has_bias: bool = False,
                                        gpu: Optional[Dict[str, Any]] = None, rows_simulated: int = 32,
                                        seed: int = 0) -> Dict[str, Any]:
    """Thread-level SASS instructions per pre-activation element of the row select at one shape, per
    pass and in total, and the implied time against one HBM read of the pre-activations.

    The kernel is compiled for sm_90a as the launcher configures it (``MARK=True``: ``pmevent``
    markers bracket its code regions, see ``csrc_triton/topk_select.py``), disassembled, and each SASS
    instruction weighted by how often a typical row runs it: the hot loops by their trip counts (from
    a simulation of the kernel's decisions on synthetic rows, ``_simulate_row_select``), the rest of the
    hot code once per row, the code of Z, D, C and X, of the masked tails and of an S pass by the
    fraction of rows that run it, the cold code (fallbacks) by the fallback rate (its static size: an
    upper bound). Per element = warp instructions x 32 lanes x warps / d_sae. The loop structure is
    checked against ``HOT_LOOPS`` (order, content and marker region); innermost loops that overlap
    without nesting (ptxas gives a loop two back edges at some shapes) count as one. At d_sae not a
    multiple of 16 the rows are compiled with the stride the launcher passes on a GPU (a copy to an
    aligned stride, whose read and write are added to the implied time).

    For comparison, the kernel this replaced (four 8-bit radix passes over the row and a cumsum write
    pass, 2048-entry blocks, one program per row; main at c79d4e2), counted the same way on the same
    synthetic rows: 127 / 137 thread instructions per element at d_sae 32768, k 50 / 2048 (0.57 /
    0.62 ms, 7.2x / 7.8x the floor) and 126 / 134 at 131072 (2.28 / 2.43 ms, 7.1x / 7.6x)."""
    reason = available()
    if reason:
        raise RuntimeError(reason)
    import torch

    from csrc_triton import topk_select as ts
    from sae_kernels import triton_ops as T

    gpu = dict(H100_SXM if gpu is None else gpu)
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    cfg = T._row_select_config(has_bias, has_norm, k)
    # rows as the launcher passes them from a contiguous [n_rows, d_sae] tensor: copied into rows of an
    # aligned stride first when d_sae is not a multiple of 16 (that copy's read and write are added to
    # the implied time below, as HBM time)
    stride = T._select_row_stride(d_sae, d_sae)
    args = [tdt, stride, f32, f32, tdt, i64, i32, i64, n_rows, d_sae, k, T._select_capacity(d_sae, k),
            *T._select_sample(d_sae, k)]
    marked = _sass_report(T._row_topk_kernel, args, dict(cfg, MARK=True), "row_topk (MARK)")
    plain = _sass_report(T._row_topk_kernel, args, dict(cfg), "row_topk")
    warps = marked["num_warps"]
    sim = _simulate_row_select(d_sae, k, dtype, has_norm, rows_simulated, seed)
    instrs, loops = marked["_instrs"], marked["_loops"]

    # regions from the markers (PMTRIG 1 << event), in address order
    region, cur = {}, "prologue"
    for a, ins in instrs:
        m = re.match(r"PMTRIG\s+0x([0-9a-f]+)", ins)
        if m:
            cur = ts.REGIONS.get(int(m.group(1), 16).bit_length() - 1, "?")
        region[a] = cur
    row_loop = max(loops, key=lambda lh: lh[1] - lh[0])
    inner = _merge_overlapping([(lo, hi) for lo, hi in loops
                                if not any((a, b) != (lo, hi) and lo <= a and b <= hi for a, b in loops)])
    hot = [(lo, hi) for lo, hi in inner if region[lo] != "cold"]
    names = [n for n, _, _ in ts.HOT_LOOPS]
    stats = [_loop_stats(instrs, lo, hi) for lo, hi in hot]
    # the content each loop must show: shared atomics (a histogram), global stores behind barriers,
    # no barrier at all (X's rounds), in the loop's own marker region
    kind = {"H0": "atoms", "H0.tail": "atoms", "W": "stg", "W.tail": "stg", "C": "stg", "C.tail": "stg", "X.round": "no-bar", "D": "stg",
            "D.tail": "stg", "S0": "atoms", "S1": "atoms", "S2": "atoms", "SW": "stg"}
    expect = [f"{kind[n]}@{r}" for n, r, _ in ts.HOT_LOOPS]
    got = [("atoms" if st["shared_atomics"] else "stg" if st["global_stores"] and st["barriers"] else
            "no-bar" if not st["barriers"] else "?") + f"@{region[lo]}" for st, (lo, hi) in zip(stats, hot)]
    if got != expect:
        raise RuntimeError(f"row select SASS: hot loops {got}, expected {expect} ({names})")
    x_round = hot[names.index("X.round")]
    x_outer = min((lh for lh in loops if lh != x_round and lh != row_loop and lh[0] <= x_round[0]
                   and x_round[1] <= lh[1]), key=lambda lh: lh[1] - lh[0])
    sparse = 1.0 - sim["z_done"] - sim["dense"]
    full_c, tail_c = d_sae // sim["block"], float(d_sae % sim["block"] != 0)
    rest = 1.0 - sim["z_done"]
    trips = {"H0": sim["n_sample"] // sim["block"], "H0.tail": float(sim["n_sample"] % sim["block"] != 0),
             "W": sim["z"] * full_c, "W.tail": sim["z"] * tail_c,
             "C": sparse * full_c, "C.tail": sparse * tail_c, "X.round": sim["rounds"],
             "D": sim["dense"] * full_c, "D.tail": sim["dense"] * tail_c,
             "S0": sim["s_iters"][0], "S1": sim["s_iters"][1], "S2": sim["s_iters"][2], "SW": sim["sw_iters"]}
    x_outer_trips = sparse * -(-sim["n_words"] // sim["wb"])
    s_prob = {"S0": sim["s_runs"][0], "S1": sim["s_runs"][1], "S2": sim["s_runs"][2], "D": sim["dense"], "CX": sparse,
              "Z": sim["z"], "rest": rest, "C.tail": sparse, "D.tail": sim["dense"], "W.tail": sim["z"]}

    per_row = {n: 0.0 for n in names}
    per_row.update({"X (outside rounds)": 0.0, "per-row code": 0.0, "S code": 0.0})
    cold_static = prologue = 0
    for a, ins in instrs:
        if not (row_loop[0] <= a <= row_loop[1]):
            prologue += 1
            continue
        loop = next((i for i, (lo, hi) in enumerate(hot) if lo <= a <= hi), None)
        if loop is not None:
            per_row[names[loop]] += trips[names[loop]]
        elif region[a] == "cold":
            cold_static += 1
        elif x_outer[0] <= a <= x_outer[1]:
            per_row["X (outside rounds)"] += x_outer_trips
        elif region[a] in ("D", "CX", "Z", "rest", "C.tail", "D.tail", "W.tail"):
            per_row["per-row code"] += s_prob[region[a]]
        elif region[a] in s_prob:
            per_row["S code"] += s_prob[region[a]]
        else:
            per_row["per-row code"] += 1
    # a fallback row also reads the rest of the row (H0's loop), collects again and runs the cold code
    h0_body = stats[names.index("H0")]["instructions"]
    collect = sum(per_row[n] for n in ("C", "C.tail", "X.round", "D", "D.tail", "X (outside rounds)"))
    fallback_extra = cold_static + (d_sae - sim["n_sample"]) / sim["block"] * h0_body + collect
    per_row["fallback (expected)"] = sim["fallback"] * fallback_extra
    scale = 32 * warps / d_sae   # warp instructions per row -> thread instructions per element
    per_elem = {n: v * scale for n, v in per_row.items()}
    total_warp = (sum(per_row.values()) * n_rows + prologue * min(n_rows, 2 * gpu["sms"])) * warps
    issue = gpu["sms"] * gpu["schedulers_per_sm"] * gpu["clock_ghz"] * 1e9 * gpu["ipc"]
    elt = torch.empty((), dtype=tdt).element_size()
    floor_ms = n_rows * d_sae * elt / (gpu["hbm_tb_s"] * 1e12) * 1e3
    copy_ms = 2 * floor_ms if stride != d_sae else 0.0
    ms = total_warp / issue * 1e3 + copy_ms
    return {
        "shape": dict(n_rows=n_rows, d_sae=d_sae, k=k, dtype=dtype, norm=has_norm, bias=has_bias),
        "config": {kk: v for kk, v in cfg.items()}, "gpu": gpu,
        "registers": plain["registers"], "spill_stores": plain["spill_stores"], "spill_loads": plain["spill_loads"],
        "shared_bytes": plain["shared_bytes"], "sass_instructions": plain["instructions"],
        "loops": [dict(name=n, **st, trips_per_row=round(trips[n], 3),
                       thread_instr_per_elem=round(st["instructions"] * trips[n] * scale, 3))
                  for n, st in zip(names, stats)],
        "plain_loop_instructions": [lp["instructions"] for lp in plain["loops"]],
        "cold_static_instructions": cold_static, "prologue_instructions": prologue,
        "simulation": {kk: v for kk, v in sim.items()},
        "thread_instr_per_elem": {n: round(v, 3) for n, v in per_elem.items()},
        "total_thread_instr_per_elem": round(sum(per_elem.values()), 2),
        "row_stride": stride, "copy_ms": round(copy_ms, 4),
        "implied_ms": round(ms, 4), "floor_ms": round(floor_ms, 4), "ratio_to_floor": round(ms / floor_ms, 2),
    }


def sass_table(r: Dict[str, Any]) -> str:
    sh = r["shape"]
    lines = [f"row select, {sh['n_rows']} rows x d_sae {sh['d_sae']}, k {sh['k']}, {sh['dtype']}, "
             f"norm={int(sh['norm'])} bias={int(sh['bias'])}: {r['registers']} registers, spills "
             f"{r['spill_stores']}/{r['spill_loads']} B, {r['shared_bytes']} B shared, {r['sass_instructions']} SASS "
             f"instructions (warps {r['config']['num_warps']}, BLOCK {r['config']['BLOCK']})",
             f"  {'loop':<12}{'instr/iter':>11}{'bar':>5}{'iters/row':>11}{'thread instr/elem':>19}"]
    for lp in r["loops"]:
        lines.append(f"  {lp['name']:<12}{lp['instructions']:>11}{lp['barriers']:>5}{lp['trips_per_row']:>11}"
                     f"{lp['thread_instr_per_elem']:>19.2f}")
    for n in ("X (outside rounds)", "per-row code", "S code", "fallback (expected)"):
        lines.append(f"  {n:<38}{r['thread_instr_per_elem'][n]:>19.2f}")
    sim = r["simulation"]
    copy = f" + the aligned copy of the rows (stride {r['row_stride']}) {r['copy_ms']:.3f} ms" if r["copy_ms"] else ""
    lines.append(f"  total {r['total_thread_instr_per_elem']:.1f} thread instructions per element -> "
                 f"{r['implied_ms']:.3f} ms at IPC 1{copy} ({r['gpu']['name']}, {r['gpu']['clock_ghz']} GHz) vs floor "
                 f"{r['floor_ms']:.3f} ms (one read at {r['gpu']['hbm_tb_s']} TB/s): {r['ratio_to_floor']:.2f}x "
                 f"[candidates {sim['n_c']:.0f}, fallback rows {sim['fallback']:.1%}, cold code "
                 f"{r['cold_static_instructions']} instr, Z rows {sim['z']:.1%} (settled {sim['z_done']:.1%}), D rows {sim['dense']:.1%}, K-th key at thr {sim['flat']:.1%}]")
    return "\n".join(lines)


def table(rows: List[Dict[str, Any]]) -> str:
    lines = [f"{'configuration':<44}{'regs':>6}{'spill st/ld':>13}{'smem B':>9}{'warps':>7}{'s':>6}"]
    for r in rows:
        spills = f"{r['spill_stores']}/{r['spill_loads']}"
        lines.append(f"{r['name']:<44}{r['registers'] or '-':>6}{spills:>13}"
                     f"{r['shared_bytes']:>9}{r['num_warps']:>7}{r['compile_s']:>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--sass", action="store_true",
                    help="the row select's SASS instructions per element and implied time (instead of the table)")
    ap.add_argument("--d-sae", type=int, nargs="+", default=[32768, 131072], help="--sass: latents (default 32768 131072)")
    ap.add_argument("--k", type=int, nargs="+", default=[50, 2048], help="--sass: k (default 50 2048)")
    ap.add_argument("--rows", type=int, default=4096, help="--sass: rows (default 4096)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="--sass: pre-activations")
    a = ap.parse_args(argv)
    reason = available()
    if reason:
        print(f"skipped: {reason}")
        return 0
    if a.sass:
        results = []
        for d_sae in a.d_sae:
            for k in a.k:
                r = row_select_instructions_per_element(d_sae, k, a.rows, a.dtype)
                print(sass_table(r))
                results.append(r)
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
        return 0
    rows = compile_all(a.jobs)
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
