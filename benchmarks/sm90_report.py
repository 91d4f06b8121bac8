"""Compile every kernel configuration the launchers can pick for sm_90 (Hopper) without a GPU.

``python benchmarks/sm90_report.py [--jobs N] [--json OUT]`` prints, per configuration of
``sae_kernels.triton_ops.launch_configs()``, the registers per thread, spill stores / loads, shared
memory (bytes) and compile seconds, from Triton's own sm_90 pipeline (``GPUTarget("cuda", 90, 32)``)
and ``ptxas -v`` (the ptxas Triton bundles for sm_90). ``tests/e2e/test_compile_sm90.py`` runs it and
fails on spills, shared memory over the limit, or a TF32 MMA in an fp32 kernel.

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
from typing import Any, Dict, List, Optional

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


def _compile_one(index: int) -> Dict[str, Any]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    from sae_kernels import triton_ops

    name, fn, args, kwargs = list(triton_ops.launch_configs())[index]
    kwargs = dict(kwargs)
    t0 = time.perf_counter()
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    call_args = [MockTensor(a) if isinstance(a, torch.dtype) else a for a in args]
    bound, spec, opts = binder(*call_args, **kwargs)
    options, sig, constexprs, attrs = fn._pack_args(backend, opts, bound, spec, None)
    ck = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options.__dict__)
    ptx = ck.asm["ptx"]
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
        "name": name, "kernel": fn.__name__, "ok": r.returncode == 0,
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else None,
        "spill_loads": int(spill.group(2)) if spill else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "shared_bytes": int(ck.metadata.shared),
        "num_warps": int(kwargs.get("num_warps", 4)),
        "tf32_mma": bool(re.search(r"\.tf32", ptx)),
        "compile_s": round(time.perf_counter() - t0, 2),
        "constexprs": {k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in kwargs.items()},
        "ptxas_log": log.strip()[-400:] if r.returncode else "",
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
    a = ap.parse_args(argv)
    reason = available()
    if reason:
        print(f"skipped: {reason}")
        return 0
    rows = compile_all(a.jobs)
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
