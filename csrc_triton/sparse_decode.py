"""Sparse row kernels over a latent-major matrix W [d_sae, d_model] and k selected latents per token.

* ``_gather_rows_kernel``:   out[t] = sum_j val[t, j] * W[idx[t, j]]          (decoder forward, encoder dx)
* ``_gather_dot_kernel``:    out[t, j] = <g[t], W[idx[t, j]]>                 (decoder d(values))
* ``_scatter_rows_kernel``:  dW[i] = sum_{(t, j): idx[t, j] = i} val[t, j] * Y[t] (dW_dec, dW_enc, db_enc)

The scatter is a deterministic latent-major reduction over a CSR reverse map (entries sorted by
latent, built once per step by the launcher and shared by the decoder's and the encoder's backward):
one program per (block of BLOCK_L consecutive latents, d-block) walks the block's entries in order
and reduces them with one MMA per tile, ``acc[L, D] += onehot(latent)[L, E] * val @ Y[tok][E, D]``.
Plain stores, no float atomics: bitwise reproducible, fp32 accumulation, any output dtype. None of
them materialises an N x k x d tensor. Ids outside [0, d_sae) contribute nothing (masked loads), so
no index can make a kernel read outside W; the public ops reject such ids before launching.
"""

import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(
    out_ptr, out_row_stride,          # [n_tokens, d_model] output, W dtype
    val_ptr, idx_ptr, k_row_stride,   # [n_tokens, K] coefficients / latent ids (int64)
    w_ptr, w_row_stride,              # [d_sae, d_model] latent-major
    d_sae, d_model, K,
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
        idx = tl.load(idx_ptr + row * k_row_stride + j0 + offs_j, mask=j_mask, other=0).to(tl.int64)
        j_mask = j_mask & (idx >= 0) & (idx < d_sae)
        val = tl.load(val_ptr + row * k_row_stride + j0 + offs_j, mask=j_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * w_row_stride + offs_d[None, :],
                    mask=j_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(val[:, None] * w, axis=0)
    tl.store(out_ptr + row * out_row_stride + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _gather_dot_kernel(
    out_ptr,                          # [n_tokens, K] contiguous
    g_ptr, g_row_stride,              # [n_tokens, d_model]
    idx_ptr, k_row_stride,            # [n_tokens, K] latent ids (int64)
    w_ptr, w_row_stride,              # [d_sae, d_model] latent-major
    d_sae, d_model, K,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = offs_j < K
    idx = tl.load(idx_ptr + row * k_row_stride + offs_j, mask=j_mask, other=0).to(tl.int64)
    w_mask = j_mask & (idx >= 0) & (idx < d_sae)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    for d0 in range(0, d_model, BLOCK_D):
        d_mask = (d0 + offs_d) < d_model
        g = tl.load(g_ptr + row * g_row_stride + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * w_row_stride + d0 + offs_d[None, :],
                    mask=w_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + row * K + offs_j, acc.to(out_ptr.dtype.element_ty), mask=j_mask)


@triton.jit
def _scatter_rows_kernel(
    dw_ptr, dw_row_stride,            # [n_rows, d_model] output (any float dtype)
    dsum_ptr,                         # [n_rows] fp32 output: the sums of each latent's coefficients
    val_ptr,                          # [n_tokens * K] flattened coefficients
    crow_ptr, order_ptr, tok_ptr,     # CSR: latent i's entries are order[crow[i]:crow[i+1]], tokens tok[...]
    y_ptr, y_row_stride,              # [n_tokens, d_model]
    n_rows, d_model,
    CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    slots = tl.arange(0, BLOCK_L)
    lat = pid_l * BLOCK_L + slots
    lat_mask = lat < n_rows
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < d_model
    offs_e = tl.arange(0, BLOCK_E)
    # The block's entries are one contiguous range of the map; run ends locate each entry's latent.
    start = tl.load(crow_ptr + pid_l * BLOCK_L)
    end = tl.load(crow_ptr + tl.minimum(pid_l * BLOCK_L + BLOCK_L, n_rows))
    run_end = tl.load(crow_ptr + lat + 1, mask=lat_mask, other=end)          # [BLOCK_L] int64
    acc = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
    acc_sum = tl.zeros([BLOCK_L], dtype=tl.float32)
    # Fixed traversal order (stable sort by latent, fixed tiles, fixed MMA shape): deterministic.
    for e0 in range(start, end, BLOCK_E):
        e = e0 + offs_e
        e_mask = e < end
        pos = tl.load(order_ptr + e, mask=e_mask, other=0)                  # flat (token, j) position
        tok = tl.load(tok_ptr + e, mask=e_mask, other=0)
        val = tl.load(val_ptr + pos, mask=e_mask, other=0.0)
        slot = tl.sum((run_end[:, None] <= e[None, :]).to(tl.int32), axis=0)  # [BLOCK_E] latent - l0
        hit = (slots[:, None] == slot[None, :]) & e_mask[None, :]            # [BLOCK_L, BLOCK_E]
        y = tl.load(y_ptr + tok[:, None] * y_row_stride + offs_d[None, :],
                    mask=e_mask[:, None] & d_mask[None, :], other=0.0)      # [BLOCK_E, BLOCK_D]
        if CAST_FP32:
            # Interpreter (tl.dot on bf16 is wrong there) or coefficients wider than Y: fp32 MMA.
            coef = tl.where(hit, val.to(tl.float32)[None, :], 0.0)
            y = y.to(tl.float32)
        else:
            coef = tl.where(hit, val[None, :], 0.0).to(y.dtype)              # exact: val has y's dtype
        if IEEE:
            acc = tl.dot(coef, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(coef, y, acc)
        acc_sum += tl.sum(coef.to(tl.float32), axis=1)
    # Latents with no entries store zeros.
    tl.store(dw_ptr + lat.to(tl.int64)[:, None] * dw_row_stride + offs_d[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=lat_mask[:, None] & d_mask[None, :])
    if pid_d == 0:
        tl.store(dsum_ptr + lat, acc_sum, mask=lat_mask)
