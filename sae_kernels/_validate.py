"""Argument checks shared by the ops and the module: every error names the argument and what was expected."""
from __future__ import annotations

import operator
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(
    name: str,
    t,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = FLOAT_DTYPES,
    device: Optional[torch.device] = None,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(
            f"{name}: expected dtype in {[str(d).replace('torch.', '') for d in dtypes]}, got {t.dtype}"
        )
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")


def check_finite(name: str, t: torch.Tensor) -> None:
    # One host sync; callers skip it in hot loops with check_finite=False.
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")


def as_int(name: str, v) -> int:
    """``v`` as a Python int when it is an integer of any type (int, numpy integer, one-element torch
    integer tensor); bools, floats (even 2.0) and strings are refused with a ValueError naming ``name``."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer, got a {v.dtype} tensor of shape {list(v.shape)}")
        return int(v.item())
    if isinstance(v, bool) or type(v).__name__ == "bool_":  # numpy.bool_ has __index__ on old numpy
        raise ValueError(f"{name}: expected an integer, got the bool {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"{name}: expected an integer, got {type(v).__name__} {v!r}") from None


def check_k(k, n: int, name: str = "k") -> int:
    k = as_int(name, k)
    if not 1 <= k <= n:
        raise ValueError(f"{name}: expected 1 <= {name} <= d_sae={n}, got {k}")
    return k
