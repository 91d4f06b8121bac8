"""Fused Adam step over one parameter, with what an SAE step needs around it folded in.

``_adam_kernel`` reads the fp32 parameter, its gradient and both moments once and writes the
parameter and the moments once (torch's Adam arithmetic), and in the same pass:

* multiplies the gradient by a device scalar (the gradient-clipping factor, HAS_SCALE), so clipping
  costs no pass of its own and no host sync;
* writes a copy of the new parameter in the compute dtype (bf16), HAS_COPY: the forward's weights
  are never cast again;
* writes the sum of squares of each new row (HAS_SUMSQ): the decoder row norms the next selection
  weights by, without another read of W_dec;
* reads a flag per latent (FLAGS: 1 one per row of a 2-D weight, 2 one per element of a bias): bit
  HOLD (1) keeps the parameter's value (the moments still take the step), bit RESET (2) zeroes both
  moments before the step. The SAE step holds the latents no token selected (Adam's momentum would
  otherwise keep moving them) and resets the moments of latents that just died;
* reads a step size and a second-moment correction per latent instead of the scalars (ROW_BC: 1 one
  per row, 2 one per element): a row's Adam restarted by a reset counts its bias corrections from
  the reset (``sae_kernels.optim``).

The parameter is viewed as rows of ``n_cols`` elements (its real rows for a 2-D weight; 128-element
chunks of a 1-D bias); a program updates BLOCK_R rows, BLOCK_C columns at a time. Moments may be
stored in bf16 (an option, off by default).
"""

import triton
import triton.language as tl


@triton.jit
def _adam_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr,        # [n_elem] fp32 parameter, gradient (any float), moments (fp32 or bf16)
    copy_ptr, sumsq_ptr, scale_ptr,    # [n_elem] compute copy, [n_rows] fp32 row sums of squares, [1] grad factor
    flags_ptr,                         # uint8 per row (FLAGS 1) or per element (FLAGS 2): HOLD 1, RESET 2
    rstep_ptr, rbc2_ptr,               # fp32 per row (ROW_BC 1) or per element (ROW_BC 2): step size, bc2_sqrt
    n_elem, n_rows, n_cols,
    beta1, beta2, eps, step_size, bc2_sqrt,
    HAS_SCALE: tl.constexpr, HAS_COPY: tl.constexpr, HAS_SUMSQ: tl.constexpr, FLAGS: tl.constexpr,
    ROW_BC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < n_rows
    offs = tl.arange(0, BLOCK_C)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    if FLAGS == 1:
        row_flags = tl.load(flags_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    if ROW_BC == 1:
        row_step = tl.load(rstep_ptr + rows, mask=row_mask, other=0.0)[:, None]
        row_bc2 = tl.load(rbc2_ptr + rows, mask=row_mask, other=1.0)[:, None]
    for c0 in range(0, n_cols, BLOCK_C):
        col = c0 + offs
        i = rows[:, None] * n_cols + col[None, :]
        mask = row_mask[:, None] & (col < n_cols)[None, :] & (i < n_elem)
        p = tl.load(p_ptr + i, mask=mask, other=0.0)
        g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32) * scale
        m = tl.load(m_ptr + i, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + i, mask=mask, other=0.0).to(tl.float32)
        if FLAGS != 0:
            if FLAGS == 1:
                f = row_flags[:, None] + tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
            else:
                f = tl.load(flags_ptr + i, mask=mask, other=0).to(tl.int32)
            reset = (f & 2) != 0
            m = tl.where(reset, 0.0, m)
            v = tl.where(reset, 0.0, v)
        m = m + (1.0 - beta1) * (g - m)                  # exp_avg.lerp_(grad, 1 - beta1)
        v = v * beta2 + (1.0 - beta2) * g * g            # exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)
        if ROW_BC == 1:
            new = p - row_step * (m / (tl.sqrt(v) / row_bc2 + eps))
        elif ROW_BC == 2:
            e_step = tl.load(rstep_ptr + i, mask=mask, other=0.0)
            e_bc2 = tl.load(rbc2_ptr + i, mask=mask, other=1.0)
            new = p - e_step * (m / (tl.sqrt(v) / e_bc2 + eps))
        else:
            new = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
        if FLAGS != 0:
            new = tl.where((f & 1) != 0, p, new)
        p = new
        tl.store(p_ptr + i, p, mask=mask)
        tl.store(m_ptr + i, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + i, v.to(v_ptr.dtype.element_ty), mask=mask)
        if HAS_COPY:
            tl.store(copy_ptr + i, p.to(copy_ptr.dtype.element_ty), mask=mask)
        if HAS_SUMSQ:
            acc += p * p
    if HAS_SUMSQ:
        tl.store(sumsq_ptr + rows, tl.sum(acc, axis=1), mask=row_mask)
