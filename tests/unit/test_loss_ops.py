"""``sae_kernels.ops.row_sq_error``: the row sums of squares every loss and metric of a training step
is built from (one pass forward, one backward on the Triton path), against float64 on odd shapes, both
backends, with a broadcast target and an offset, values and gradients."""
import pytest
import torch

from helpers import BACKENDS, DEVICE, assert_close
from sae_kernels.ops import row_sq_error


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,d,bcast,offset", [(1, 7, False, False), (13, 700, True, False), (37, 33, False, True),
                                              (6, 1030, True, True), (0, 5, False, False)])
def test_row_sq_error_against_float64(N, d, bcast, offset, dtype, tol, backend):
    """Forward: ``sum_j (pred + offset - target)^2`` per row, accumulated in fp32 from the stored
    values (so only the accumulation order differs from float64); backward: ``2 (pred + offset -
    target) g`` to ``pred`` only, in ``pred``'s dtype."""
    g = torch.Generator().manual_seed(N * 31 + d)
    pred = (torch.randn(N, d, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    target = torch.randn(1 if bcast else N, d, generator=g).to(DEVICE, dtype)
    off = torch.randn(N, d, generator=g).to(DEVICE, dtype) if offset else None
    got = row_sq_error(pred, target, off)
    assert got.shape == (N,) and got.dtype == torch.float32
    p64, t64 = pred.detach().double().requires_grad_(), target.double()
    diff = p64 - t64 + (off.double() if offset else 0.0)
    want = (diff * diff).sum(1)
    assert_close(got, want, rtol=tol, atol=1e-6, what="row sums")
    w = torch.randn(N, generator=g).to(DEVICE)
    (got * w).sum().backward()
    (want * w.double()).sum().backward()
    assert pred.grad.dtype == dtype
    rt = 1e-5 if dtype == torch.float32 else 8e-3  # the gradient is rounded to pred's dtype
    assert_close(pred.grad, p64.grad, rtol=rt, atol=1e-6 * (float(p64.grad.abs().max()) if N else 1.0), what="d pred")


def test_row_sq_error_checks_its_arguments():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="target: expected \\[4, 6\\] or \\[1, 6\\]"):
        row_sq_error(x, torch.randn(2, 6))
    with pytest.raises(ValueError, match="offset"):
        row_sq_error(x, x, torch.randn(4, 5))
    with pytest.raises(ValueError, match="pred: expected a 2-D tensor"):
        row_sq_error(torch.randn(6), x)
