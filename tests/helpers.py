"""Comparison helpers shared by the tests (import as ``from helpers import ...``)."""
import os

import pytest
import torch

from sae_kernels.backend import triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (dtype, tol): a mismatch is |got - want| > tol * (|want| + max|want|) -- relative to the scale of the
# whole tensor, so cancellation in one entry cannot hide a bug elsewhere and bf16 rounding passes.
DTYPE_TOLS = [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)]


def mismatches(got: torch.Tensor, want: torch.Tensor, tol: float) -> str:
    """Empty string when close; otherwise a report with the mismatch count and worst entry."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return f"shape {list(got.shape)} != {list(want.shape)}"
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs()
    bad = err > tol * (want.abs() + scale) + 1e-12
    if not bad.any():
        return ""
    i = int(err.argmax())
    return (
        f"{int(bad.sum())}/{bad.numel()} mismatches (tol {tol:g}); worst at flat {i}: "
        f"got {got.reshape(-1)[i].item():.6g}, want {want.reshape(-1)[i].item():.6g}"
    )


def assert_close(got, want, tol, what=""):
    msg = mismatches(got, want, tol)
    assert not msg, f"{what}: {msg}"


BACKENDS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not triton_available() or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
            reason="triton not importable, or no GPU and not interpreting",
        ),
    ),
]
