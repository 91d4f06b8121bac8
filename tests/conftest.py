"""Shared test setup.

Without a GPU the Triton kernels run through the interpreter: TRITON_INTERPRET must be set before
any ``@triton.jit`` function is defined, so it is set here, before the package is imported.
"""
import os

# Set before torch starts OpenMP: the trainer's producer thread and the training thread each run an
# OpenMP team, and spinning waits on 2 cores slow small ops 5-15x (see trainer/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import interp_speedup  # noqa: E402

interp_speedup.install()  # nested @jit calls in the interpreter: see tests/interp_speedup.py


@pytest.fixture
def backend(request, monkeypatch):
    """Forces the backend named by the test's parameter (see helpers.BACKENDS)."""
    monkeypatch.setenv("SAE_KERNELS_BACKEND", request.param)
    return request.param
