"""Shared test setup.

Without a GPU the Triton kernels run through the interpreter: TRITON_INTERPRET must be set before
any ``@triton.jit`` function is defined, so it is set here, before the package is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def backend(request, monkeypatch):
    """Forces the backend named by the test's parameter (see helpers.BACKENDS)."""
    monkeypatch.setenv("SAE_KERNELS_BACKEND", request.param)
    return request.param
