"""Which implementation runs an op: the Triton kernels or the sparse PyTorch path.

Triton for CUDA tensors, PyTorch for CPU tensors. ``SAE_KERNELS_BACKEND=triton|torch`` forces one.
With ``TRITON_INTERPRET=1`` and the triton backend forced, the kernels run on CPU tensors through the
Triton interpreter (that is how the tests check them on a machine without a GPU).
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "torch")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install on an exotic platform
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Return "triton" or "torch" for tensors on ``device`` of ``dtype``.

    float64 always takes the PyTorch path: the kernels accumulate in fp32.
    """
    forced = os.environ.get("SAE_KERNELS_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(
                f"SAE_KERNELS_BACKEND must be one of {BACKENDS}, got {forced!r}"
            )
        if forced == "triton":
            if dtype == torch.float64:
                raise ValueError("SAE_KERNELS_BACKEND=triton: the Triton kernels take fp32/bf16/fp16, got float64")
            if not triton_available():
                raise ValueError("SAE_KERNELS_BACKEND=triton but triton cannot be imported")
            if device.type != "cuda" and not interpreting():
                raise ValueError(
                    f"SAE_KERNELS_BACKEND=triton needs CUDA tensors (got {device.type}) "
                    "or TRITON_INTERPRET=1 to run the kernels on the CPU"
                )
        return forced
    if device.type == "cuda" and dtype != torch.float64 and triton_available():
        return "triton"
    return "torch"


def get_impl(device: torch.device, dtype: torch.dtype = torch.float32):
    """The module holding the four primitives (encode_select, gather_rows, gather_dot, scatter_outer)."""
    if choose_backend(device, dtype) == "triton":
        from . import triton_ops

        return triton_ops
    from . import reference

    return reference
