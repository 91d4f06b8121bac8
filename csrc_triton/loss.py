"""Row-wise squared error: the reconstruction losses' one pass over the activations.

``_row_sq_error_kernel`` reads a ``[N, d]`` prediction, an optional offset added to it and a target
(``[N, d]``, or one ``[1, d]`` row broadcast to every row, e.g. the batch mean), and either writes each
row's ``sum_j (pred + offset - target)^2`` in fp32 (forward) or, given the loss's gradient with
respect to those sums ``g [N]``, writes ``2 (pred + offset - target) * g`` (backward, the gradient of
``pred``). Every loss and metric of a training step is a sum over rows of these sums divided by
per-row or global denominators (``trainer.train.step``), so one read of the activations replaces
the ~25 elementwise passes of the loss written as tensor expressions, and the backward is one more.
Accumulation in fp32 (fp64 inputs take the PyTorch path).
"""

import triton
import triton.language as tl


@triton.jit
def _row_sq_error_kernel(
    pred_ptr, pred_stride,            # [N, d] prediction
    off_ptr, off_stride,              # [N, d] offset added to the prediction (HAS_OFFSET)
    tgt_ptr, tgt_stride,              # [N, d] target, or [1, d] with stride 0 (broadcast)
    out_ptr,                          # forward: [N] fp32 sums of squares
    g_ptr, grad_ptr, grad_stride,     # backward: [N] fp32 d loss / d sums, [N, d] gradient of pred
    n_rows, d,
    HAS_OFFSET: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < n_rows
    offs = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if BACKWARD:
        g2 = 2.0 * tl.load(g_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + offs
        mask = row_mask[:, None] & (cols < d)[None, :]
        p = tl.load(pred_ptr + rows[:, None] * pred_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            p += tl.load(off_ptr + rows[:, None] * off_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        t = tl.load(tgt_ptr + rows[:, None] * tgt_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        diff = p - t
        if BACKWARD:
            tl.store(grad_ptr + rows[:, None] * grad_stride + cols[None, :],
                     (diff * g2[:, None]).to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            acc += tl.sum(diff * diff, axis=1)
    if not BACKWARD:
        tl.store(out_ptr + rows, acc, mask=row_mask)
