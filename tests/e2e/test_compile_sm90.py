"""Every kernel configuration the launchers can pick compiles for sm_90 (H100/H200) without a GPU,
with no register spills and shared memory within the limit (benchmarks/sm90_report.py).

Uses Triton 3.9's internal compile APIs and its bundled ptxas: skipped with another Triton version
or where they are missing. Runs in a subprocess with TRITON_INTERPRET unset (interpreted kernels
cannot be compiled), two compile processes.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]


def test_every_kernel_configuration_compiles_for_sm90_without_spills(tmp_path):
    if not triton.__version__.startswith("3.9"):
        pytest.skip(f"the compile recipe uses Triton 3.9 internals; installed {triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "sm90.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sm90_report.py"), "--jobs", "2",
                        "--json", str(out)], cwd=str(REPO), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    if r.stdout.startswith("skipped:"):
        pytest.skip(r.stdout.strip())
    print(r.stdout)
    rows = json.loads(out.read_text())
    names = [row["name"] for row in rows]
    assert len(names) == len(set(names)) and len(rows) >= 40, names
    problems = []
    for row in rows:
        if not row["ok"]:
            problems.append(f"{row['name']}: ptxas failed: {row['ptxas_log']}")
            continue
        if row["spill_stores"] or row["spill_loads"]:
            problems.append(f"{row['name']}: spills {row['spill_stores']}/{row['spill_loads']} B")
        if row["shared_bytes"] > 232448:
            problems.append(f"{row['name']}: {row['shared_bytes']} B shared memory (sm_90 limit 232448)")
        if row["registers"] is None or row["registers"] > 255:
            problems.append(f"{row['name']}: registers {row['registers']}")
        first_dtype = row["name"].split("[")[1].split(",")[0] if "[" in row["name"] else ""
        if first_dtype.startswith("fp32") and row["tf32_mma"]:
            problems.append(f"{row['name']}: an fp32 kernel uses a TF32 MMA (inexact, unlike the interpreter)")
    assert not problems, "\n".join(problems)
