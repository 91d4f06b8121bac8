"""pytest-benchmark comparisons: ``pytest benchmarks/ --benchmark-only``.

Providers side by side at the same shapes (see providers.py): ``dense`` (a textbook dense PyTorch TopK
SAE), ``torch`` (this package's PyTorch path), ``triton`` (this package's kernels, CUDA only) and
``sparsify`` (EleutherAI's eai-sparsify, skipped when not importable). A summary table with the
speedups over the dense provider is printed at the end of the run.

Benchmarks marked ``slow`` (the trainer's step recipes, ``test_bench_sae_step.py``, and the analysis
pass on the embedded LM, ``test_bench_analyze.py``) are skipped unless ``--run-slow`` is given or their
file is named on the command line (``pytest benchmarks/test_bench_analyze.py --benchmark-only``).
"""
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # sparsify decodes with Triton unless told otherwise, which fails without a GPU; read at its import.
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import pytest  # noqa: E402

import providers  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the benchmarks marked slow (the trainer's SAE step recipes, the analysis "
                          "pass on the embedded LM): minutes more")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long benchmark (loads the LM, or runs minutes): skipped unless "
                                       "--run-slow is given or its file is named on the command line")


def _named_files(config):
    """The files named on the command line (``path`` or ``path::test``), resolved."""
    out = set()
    for arg in config.args:
        p = Path(str(arg).split("::", 1)[0])
        p = p if p.is_absolute() else Path(config.invocation_params.dir) / p
        if p.is_file():
            out.add(p.resolve())
    return out


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    named = _named_files(config)
    skip = pytest.mark.skip(reason="slow benchmark: pass --run-slow (or name its file) to run it")
    for item in items:
        if "slow" in item.keywords and Path(str(item.fspath)).resolve() not in named:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def machine():
    """``machine(shape)``: the roofline figures for ``shape`` (measured once per shape on a CPU)."""
    cache = {}

    def get(shape):
        if shape not in cache:
            cache[shape] = providers.measure_machine(shape)
        return cache[shape]

    return get


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k"


def _speedup(r: dict, other) -> str:
    """How many times faster ``r`` is than ``other`` (a row or None): median times (best times)."""
    if other is None:
        return "-"
    return f"{other['median_s'] / r['median_s']:.2f} ({other['min_s'] / r['min_s']:.2f})"


def _line(r: dict, by: dict) -> str:
    return (
        f"{r['median_s'] * 1e3:>10.1f}{r['min_s'] * 1e3:>9.1f}{_fmt_rate(r['tokens_per_s']):>10}"
        f"{_speedup(r, by.get('dense')):>15}{_speedup(r, by.get('sparsify')):>15}"
    )


def pytest_terminal_summary(terminalreporter):
    rows, interleaved = providers.RESULTS, providers.INTERLEAVED
    if not rows and not interleaved:
        return
    tr = terminalreporter
    tr.section("sae-kernels: providers side by side")
    first = rows[0] if rows else interleaved[0]
    tr.write_line(f"device: {first['device']}; torch {first['torch']}, {first['threads']} threads")
    if rows:
        tr.write_line(f"roofline: {first['roofline']}")
    tr.write_line(
        "tokens/s from the median round; x dense, x sparsify: how many times faster than that provider "
        "in this run, from median (and best) round times; peak: see peak_memory_method in the JSON"
    )
    cols = f"{'median ms':>10}{'best ms':>9}{'tokens/s':>10}{'x dense':>15}{'x sparsify':>15}"
    groups = {}
    for r in rows:
        groups.setdefault((r["shape"], r["op"], r["mode"]), {})[r["provider"]] = r
    shape = None
    for (shp, op, mode), by in groups.items():
        if shp != shape:
            shape = shp
            tr.write_line("")
            tr.write_line(f"shape {shp}, each provider's rounds back to back")
            tr.write_line(f"{'op':<14}{'mode':<9}{'provider':<10}{cols}{'roofline':>10}{'peak MiB':>10}")
        for p, r in by.items():
            tr.write_line(
                f"{op:<14}{mode:<9}{p:<10}{_line(r, by)}{r['roofline_fraction']:>10.1%}{r['peak_memory_mib']:>10.1f}"
            )
    for info in interleaved:
        tr.write_line("")
        tr.write_line(
            f"{info['op']} {info['mode']} {info['shape']}, {info['interleaved_rounds']} rounds interleaved "
            "across providers (the fairest comparison on a shared machine)"
        )
        tr.write_line(f"{'provider':<10}{cols}{'x floor':>15}")
        by = info["providers"]
        for p, r in by.items():
            xf = f"{r['x_floor']:.2f} ({r['x_floor_best']:.2f})" if "x_floor" in r else "-"
            tr.write_line(f"{p:<10}{_line(r, by)}{xf:>15}")
        if "floor" in by:
            tr.write_line("floor: the bare encoder GEMM (addmm) and torch.topk of its output; x floor: a "
                          "provider's median (best) round over the floor's")
