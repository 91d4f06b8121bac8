"""Sparse row kernels over a latent-major matrix W [d_sae, d_model] and k selected latents per token.

* ``_gather_rows_kernel``:   out[t] = sum_j val[t, j] * W[idx[t, j]]          (decoder forward, encoder dx)
* ``_gather_dot_kernel``:    out[t, j] = <g[t], W[idx[t, j]]> (+ b[idx], relu)  (decoder d(values))
* ``_scatter_outer_kernel``: dW[i] = sum_{(t, j): idx[t, j] = i} val[t, j] * Y[t] (dW_dec, dW_enc, db_enc)

The scatter is a deterministic per-latent reduction over a CSR reverse map (entries sorted by latent,
built by the launcher): one program per (latent, d-block), plain stores, no float atomics, so it is
bitwise reproducible and correct in bf16. None of them materialises an N x k x d tensor.
"""

import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(
    out_ptr, out_row_stride,          # [n_tokens, d_model] output, W dtype
    val_ptr, idx_ptr, k_row_stride,   # [n_tokens, K] coefficients / latent ids (int64)
    w_ptr, w_row_stride,              # [d_sae, d_model] latent-major
    d_model, K,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)   # n_tokens * K and d_sae * d_model can overflow int32
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < d_model
    offs_j = tl.arange(0, BLOCK_J)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(0, K, BLOCK_J):
        j_mask = (j0 + offs_j) < K
        # BLOCK_J rows of W in flight at once instead of one dependent row load per step.
        idx = tl.load(idx_ptr + row * k_row_stride + j0 + offs_j, mask=j_mask, other=0)
        val = tl.load(val_ptr + row * k_row_stride + j0 + offs_j, mask=j_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx.to(tl.int64)[:, None] * w_row_stride + offs_d[None, :],
                    mask=j_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(val[:, None] * w, axis=0)
    tl.store(out_ptr + row * out_row_stride + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _gather_dot_kernel(
    out_ptr,                          # [n_tokens, K] contiguous
    g_ptr, g_row_stride,              # [n_tokens, d_model]
    idx_ptr, k_row_stride,            # [n_tokens, K] latent ids (int64)
    w_ptr, w_row_stride,              # [d_sae, d_model] latent-major
    b_ptr,                            # [d_sae] added to the dot when HAS_BIAS
    d_model, K,
    HAS_BIAS: tl.constexpr, APPLY_RELU: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = offs_j < K
    idx = tl.load(idx_ptr + row * k_row_stride + offs_j, mask=j_mask, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    for d0 in range(0, d_model, BLOCK_D):
        d_mask = (d0 + offs_d) < d_model
        g = tl.load(g_ptr + row * g_row_stride + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * w_row_stride + d0 + offs_d[None, :],
                    mask=j_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + idx, mask=j_mask, other=0.0).to(tl.float32)
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + row * K + offs_j, acc.to(out_ptr.dtype.element_ty), mask=j_mask)


@triton.jit
def _scatter_outer_kernel(
    dw_ptr, dw_row_stride,            # [d_sae, d_model] output, Y dtype
    dsum_ptr,                         # [d_sae] output, values dtype (written when WITH_SUM)
    val_ptr,                          # [n_tokens * K] flattened coefficients
    order_ptr, offsets_ptr,           # CSR: entries of latent i are order[offsets[i]:offsets[i+1]]
    y_ptr, y_row_stride,              # [n_tokens, d_model]
    d_model, K,
    WITH_SUM: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    latent = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < d_model
    offs_e = tl.arange(0, BLOCK_E)
    start = tl.load(offsets_ptr + latent)
    end = tl.load(offsets_ptr + latent + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sum = tl.zeros([BLOCK_E], dtype=tl.float32)
    # Fixed traversal order (stable sort by latent, then a fixed-shape tree reduction): deterministic.
    for e0 in range(start, end, BLOCK_E):
        e_mask = (e0 + offs_e) < end
        pos = tl.load(order_ptr + e0 + offs_e, mask=e_mask, other=0)   # flat (token, j) position
        tok = pos // K
        val = tl.load(val_ptr + pos, mask=e_mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + tok[:, None] * y_row_stride + offs_d[None, :],
                    mask=e_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(val[:, None] * y, axis=0)
        acc_sum += val
    # Latents with no entries fall through the loop and store zeros.
    tl.store(dw_ptr + latent * dw_row_stride + offs_d, acc.to(dw_ptr.dtype.element_ty), mask=d_mask)
    if WITH_SUM:
        if pid_d == 0:
            tl.store(dsum_ptr + latent, tl.sum(acc_sum, axis=0).to(dsum_ptr.dtype.element_ty))
