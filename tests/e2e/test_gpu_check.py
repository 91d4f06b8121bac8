"""benchmarks/gpu_check.py --tiny: the one-shot device check runs on the CPU under the Triton
interpreter (every section, tiny shapes), so it cannot rot between GPU loans. A fresh process, so
that it also shows nothing it imports needs what the device image lacks (datasets, gguf, the
embedded model)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_tiny_runs_every_section(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), str(tmp_path), "--tiny"],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r.returncode == 0 and not res["errors"], (json.dumps(res["errors"], indent=1) + r.stderr)[-4000:]
    assert res["forbidden_modules_loaded"] == [] and "skipped_for_time" not in res
    assert (tmp_path / "gpu_check.log").read_text().strip()
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
    assert res["step"] and all(v["tokens_per_s"] > 0 for v in res["step"].values())
    for key in ("lm_only_tokens_per_s", "one_sae_tokens_per_s", "suite_of_four_tokens_per_s",
                "one_sae_buffer_cpu_tokens_per_s"):
        assert res["e2e"][key] > 0, key


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
