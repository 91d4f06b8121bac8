"""benchmarks/gpu_check.py --tiny: the one-shot device check runs on the CPU under the Triton
interpreter (every section, tiny shapes), so it cannot rot between GPU loans. A fresh process, so
that it also shows nothing it imports needs what the device image lacks (datasets, gguf, accelerate,
the embedded model). One full run is shared by the assertions on its results; the simulated failures
(a pre-flight that finds no compiler, a section that crashes or hangs) each run only the sections
they need. No assertion depends on a timing."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _env(**extra):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("SAE_KERNELS_GPU_CHECK_FAULT", None)
    env.pop("SAE_KERNELS_BACKEND", None)
    env.update(extra)
    return env


def _run(out: Path, *args, **env):
    r = subprocess.run([sys.executable, str(SCRIPT), str(out), "--tiny", *args], cwd=str(REPO), env=_env(**env),
                       capture_output=True, text=True, timeout=600)
    res = json.loads((out / "gpu_check.json").read_text())
    return r, res


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    r, res = _run(out)
    assert r.returncode == 0 and not res["errors"], (json.dumps(res["errors"], indent=1) + r.stderr)[-4000:]
    return out, res


def test_gpu_check_tiny_runs_every_section(tiny_run):
    out, res = tiny_run
    assert res["forbidden_modules_loaded"] == [] and "skipped_for_time" not in res
    assert (out / "gpu_check.log").read_text().strip()
    assert res["env"]["torch"] and res["env"]["triton"]
    assert res["tests"]["returncode"] == 0, res["tests"]["groups"][0]["tail"][-2000:]
    # every test file of the device run was imported with the absent modules blocked
    assert " passed" in res["tests"]["summary"] and " deselected" in res["tests"]["summary"], res["tests"]["summary"]
    k = res["kernels"]["n64"]
    for key in ("gemm_addmm", "select_k4", "encode_two_pass_k4", "encode_fused_k4", "encode_two_pass_k20",
                "gather_rows_sparse_k20", "gather_rows_dense_k20", "scatter_sparse_k4", "saeadam_fp32_moments",
                "saeadam_bf16_moments", "torch_fused_adam_clip_casts"):
        assert math.isfinite(k[key]["ms"]) and k[key]["ms"] > 0, key
    assert set(k["decode_sweep_ms"]) == {"4", "20"}
    for key in ("lm_only_tokens_per_s", "one_sae_tokens_per_s", "suite_of_four_tokens_per_s",
                "one_sae_buffer_cpu_tokens_per_s"):
        assert res["e2e"][key] > 0, key


def test_preflight_records_the_tools(tiny_run):
    _, res = tiny_run
    pf = res["preflight"]
    assert pf["ok"] and pf["problems"] == [] and pf["trivial_kernel"]["ok"], pf
    assert pf["c_compiler"] and pf["python_h"] and pf["c_compiler_works"], pf
    assert pf["ptxas"]["env_var"].startswith("TRITON_PTXAS"), pf["ptxas"]
    assert res["backend"] != "torch" and "skipped" not in res


def test_tests_section_records_where_the_tests_ran(tiny_run):
    """--tiny: cpu and interpreted, as expected there (a device run fails unless cuda and compiled)."""
    _, res = tiny_run
    (group,) = res["tests"]["groups"]
    assert group["devices"] == ["cpu"] and group["interpreted"] is True and group["device_problem"] is None, group
    modules = group["report"]["modules"]
    assert modules["tests/unit/test_triton_kernels.py"]["DEVICE"] == "cpu", modules
    assert modules["tests/unit/test_triton_kernels.py"]["passed"] > 0, modules


def test_kernels_cross_check_reports_mismatch_counts(tiny_run):
    _, res = tiny_run
    xc = res["kernels"]["cross_check"]["n64"]
    for k in (4, 20):
        sel = xc[f"fused_vs_two_pass_k{k}"]
        assert sel["unexplained"] == 0 and sel["rows"] == 8, sel
        for name in ("gather_rows", "gather_dot", "scatter_outer_dW", "scatter_outer_sum"):
            r = xc[f"sparse_vs_dense_k{k}"][name]
            assert r["beyond_tol"] == 0 and r["nonfinite"] == 0 and r["elements"] > 0, (k, name, r)
    adam = xc["saeadam_vs_torch_adam"]
    assert adam["fp32_moments"]["mismatches"] == 0, adam
    assert adam["fp32_moments"]["max_diff_rel_update"] < 1e-3 and "mismatches" in adam["bf16_moments"], adam


def test_step_times_the_resolved_recipe(tiny_run):
    _, res = tiny_run
    st = res["step"]
    assert all(v["tokens_per_s"] > 0 for key, v in st.items() if key.startswith("n64_"))
    for k in (4, 20):
        flags = st["recipe_config"][f"n64_k{k}_b8"]
        assert flags["auxk"] and flags["hold_dead"] and flags["reset_dead_moments"], flags
        assert flags["k"] == k and flags["k_aux"] == 8 and flags["batch_size"] == 8, flags
        for pct in (0, 10, 50):
            r = st[f"n64_k{k}_b8_recipe_dead{pct}"]
            assert r["tokens_per_s"] > 0 and r["k_at_t"] == k, r
            # the dead latents stayed dead while timed (the main TopK did not revive them)
            assert abs(r["dead_fraction_after"] - pct / 100) < 0.05, r
            assert st["recipe_over_bare"][f"n64_k{k}_dead{pct}"] > 0


def test_e2e_window_and_load_without_accelerate(tiny_run):
    _, res = tiny_run
    e = res["e2e"]
    assert e["warmup_steps"] == e["buffer_capacity"] // e["batch_tokens"] >= 1 and "initial fill" in e["window"], e
    lm = e["load_model"]
    assert lm["ok"] and lm["accelerate_importable"] is False and lm["n_layers"] == 2, lm


def test_preflight_failure_keeps_the_torch_sections(tmp_path):
    """A pre-flight that finds no C compiler: one line naming it and CC; tests and kernels skipped with
    the reason; the step runs with the torch backend. The step also dies of a simulated CUDA fault after
    its first results (kept, the error recorded) and the e2e section still runs after it."""
    r, res = _run(tmp_path, "--skip", "tests", SAE_KERNELS_GPU_CHECK_FAULT="preflight:no_cc,step:crash_late")
    assert r.returncode == 1, r.stderr[-2000:]
    err = res["errors"]["preflight"]
    assert "\n" not in err and "no C compiler" in err and "set CC" in err, err
    assert res["preflight"]["ok"] is False and res["preflight"]["c_compiler"] is None
    assert "kernels" not in res and "pre-flight failed" in res["skipped"]["kernels"], res.get("skipped")
    assert "SAE_KERNELS_BACKEND=torch" in res["backend"]
    # the step crashed after its first results: they are kept, the crash is its error
    assert "SIGSEGV" in res["errors"]["step"] and "step" in res["incomplete_sections"], res["errors"]
    assert res["step"]["backend"] == "torch" and res["step"]["n64_k4_saeadam_auto"]["tokens_per_s"] > 0
    # the section after the crash ran, on the torch backend
    assert "e2e" not in res["errors"], res["errors"]
    assert res["e2e"]["backend"] == "torch" and res["e2e"]["one_sae_tokens_per_s"] > 0
    assert set(res["errors"]) == {"preflight", "step"}, res["errors"]


def test_hung_section_is_killed_and_the_run_goes_on(tmp_path):
    r, res = _run(tmp_path, "--skip", "tests,step,e2e", "--section-timeouts", "kernels=3",
                  SAE_KERNELS_GPU_CHECK_FAULT="kernels:hang")
    assert r.returncode == 1
    assert "timed out after 3 s" in res["errors"]["kernels"], res["errors"]
    assert res["preflight"]["ok"] and set(res["errors"]) == {"kernels"}, res["errors"]
    assert res["total_seconds"] < 300


def test_device_run_tests_must_compile_on_cuda(tmp_path):
    """Simulated CUDA: a device run's test groups get TRITON_INTERPRET=0, and a group whose tests ran on the
    CPU (or in the interpreter, or not at all) fails the tests section. On this CPU machine, compiled
    means skipped, so a run_tests with a Check that believes it is on CUDA must record an error."""
    code = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(REPO / 'benchmarks')!r})
import gpu_check as g
out = Path({str(tmp_path)!r})
c = g.Check(out, False, 450.0)
c.cuda = True
g.TEST_GROUPS[:] = [["tests/unit/test_triton_kernels.py", "-k", "test_gather_rows"]]
res = g.run_tests(c)
env = g.tests_env(c, out / "r.json")
print(json.dumps({{"error": c.results["errors"].get("tests"), "interpret": env["TRITON_INTERPRET"],
                  "cpu": g.tests_device_problem(c, {{"interpreted": False, "devices": ["cpu"]}}),
                  "interpreted": g.tests_device_problem(c, {{"interpreted": True, "devices": ["cuda"]}}),
                  "cuda": g.tests_device_problem(c, {{"interpreted": False, "devices": ["cuda"]}}),
                  "hints": [g._kernel_hint(m, {{"env_var": "TRITON_PTXAS_BLACKWELL_PATH"}}) for m in (
                      "RuntimeError: Failed to find C compiler. Please specify via CC environment variable",
                      "RuntimeError: Triton Error [CUDA]: the provided PTX was compiled with an unsupported toolchain",
                      "CalledProcessError: Command '['/usr/bin/gcc', ...]' returned non-zero exit status 1.")]}}))
"""
    env = _env()
    env.pop("TRITON_INTERPRET")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["interpret"] == "0", got
    assert got["error"] and "expected cuda" in got["error"], got
    assert got["cpu"] and got["interpreted"] and got["cuda"] is None, got
    # the pre-flight's one-line hint names the variable that points Triton at a working tool
    cc, ptxas, build = got["hints"]
    assert "set CC" in cc and "set TRITON_PTXAS_BLACKWELL_PATH" in ptxas and "set CC" in build, got["hints"]


def test_selection_cross_check_separates_near_ties():
    """The fused-vs-two-pass count: a latent swapped for one within bf16 rounding of the row's k-th score
    is a near-tie, one swapped for a latent far below it is unexplained (gpu_check imported in a fresh
    process: it blocks modules on import)."""
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(REPO / 'benchmarks')!r})
import gpu_check as g
x, W = torch.eye(2, 4), torch.zeros(5, 4)
b = torch.tensor([3.0, 2.0, 1.999, 0.5, 0.0])  # the scores (x W^T = 0); k = 2: latents 0 and 1
ref = torch.tensor([[0, 1], [0, 1]])
print(json.dumps([g._selection_mismatches(x, W, b, None, 2, ref, torch.tensor(o)) for o in (
    [[0, 2], [0, 1]], [[0, 3], [1, 0]])]))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    tie, far = json.loads(r.stdout.strip().splitlines()[-1])
    assert tie["rows_differing"] == 1 and tie["elements_differing"] == 1 and tie["unexplained"] == 0, tie
    assert far["rows_differing"] == 1 and far["unexplained"] == 1, far


def test_kernel_tests_compile_when_cuda_is_available():
    """tests/unit/test_triton_kernels.py with TRITON_INTERPRET unset and CUDA available (simulated) must
    not choose the interpreter: its DEVICE is cuda, as tests/conftest.py decides."""
    code = f"""
import importlib.util, os, sys
import torch
torch.cuda.is_available = lambda: True
sys.path.insert(0, {str(REPO / 'tests')!r})
spec = importlib.util.spec_from_file_location("tk", {str(REPO / 'tests' / 'unit' / 'test_triton_kernels.py')!r})
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
print(m.DEVICE, os.environ.get("TRITON_INTERPRET"))
"""
    env = _env()
    env.pop("TRITON_INTERPRET")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.split()[-2:] == ["cuda", "None"], r.stdout


def test_absent_modules_look_uninstalled():
    """gpu_check's stand-in for the device image: the blocked modules fail to import and probe as
    missing (find_spec None), in a fresh process where they are installed or not."""
    code = ("import importlib.util, benchmarks.absent_modules as a\n"
            "for m in a.ABSENT:\n"
            "    assert importlib.util.find_spec(m) is None, m\n"
            "    try:\n"
            "        __import__(m)\n"
            "    except ModuleNotFoundError:\n"
            "        pass\n"
            "    else:\n"
            "        raise AssertionError(m)\n"
            "print('ok', a.ABSENT)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
