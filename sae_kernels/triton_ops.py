"""Thin launchers for the Triton kernels in ``csrc_triton`` (flatten, choose blocks, allocate, launch).

Same four functions, same signatures and semantics as the PyTorch path in ``sae_kernels.reference``:
``encode_select``, ``gather_rows``, ``gather_dot``, ``scatter_outer``. No autograd here.
Only called on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.

Block sizes are GPU defaults chosen from the shapes, not tuned (no GPU was available when they
were written); the comments give the reasoning. Re-tune with ``triton.testing.do_bench`` on an H100.
"""

import os

import torch
import triton
from torch import Tensor

from csrc_triton.sparse_decode import _gather_dot_kernel, _gather_rows_kernel, _scatter_outer_kernel
from csrc_triton.topk_encode import (
    _encode_scores_kernel,
    _encode_topk_candidates_kernel,
    _select_candidates_kernel,
)

# encode_select uses the fused two-stage kernel for k <= FUSED_MAX_K, the dense fallback above.
# The running top-K' lives in registers as 3 x [BLOCK_M, K'] (score, value, index) next to the
# [BLOCK_M, BLOCK_N] accumulator: K' = 64 (k up to 64, covers the usual k = 32..64) is 48 KiB at
# BLOCK_M = 64, K' = 128 would double that and spill. Larger k only occurs during K-annealing.
FUSED_MAX_K = 64

# Encoder GEMM tile of the fused kernel: 64 tokens x BLOCK_N latents x 32 of d_model, 8 warps.
# Untimed (no GPU); chosen from `ptxas -v` for sm_90: with bf16 and K' <= 32 the 64 x 128 tile fits
# (241-255 regs, no spills); with K' = 64 it spills 120 B, 64 x 64 does not (209 regs); fp32 (ieee
# dot) spills at 64 x 128 even for K' = 8, 64 x 64 does not (190 regs). BLOCK_K = 64 or
# BLOCK_M = 128 spill 0.4-0.5 KiB because the top-K' state shares the register file.
_ENC_BLOCK_M, _ENC_BLOCK_K, _ENC_WARPS = 64, 32, 8


def _enc_block_n(kp: int, dtype: torch.dtype) -> int:
    return 128 if kp <= 32 and dtype != torch.float32 else 64

# Dense-score kernel (large k): a plain GEMM epilogue, so a larger token tile (239 regs, no spills).
_DENSE_BLOCK_M, _DENSE_BLOCK_N, _DENSE_BLOCK_K, _DENSE_WARPS = 128, 128, 32, 8
# Stage 2 of the fused path never needs more than this many candidates per row.
_MAX_CAND_WIDTH = 4096
# Dense fallback: at most this many fp32 scores materialised at once (1 GiB), rows processed in slabs.
_DENSE_MAX_ELEMS = 1 << 28
# Sparse row kernels: BLOCK_D = 128 elements = 256 B of a bf16 row per program (full 128 B
# transactions, 4 warps x 32 lanes); BLOCK_J = 16 rows of W in flight per step hides gather latency.
_ROW_BLOCK_D, _ROW_BLOCK_J, _ROW_WARPS = 128, 16, 4
# gather_dot: one program covers 16 selected latents of one token, d_model swept 128 at a time.
_DOT_BLOCK_J, _DOT_BLOCK_D = 16, 128
# scatter_outer: 32 entries of a latent's run per step, [32, 128] fp32 tile.
_SCAT_BLOCK_E, _SCAT_BLOCK_D = 32, 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(*tensors: Tensor | None) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on the same device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"triton_ops needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device}")
    return device


def _rows2d(t: Tensor) -> Tensor:
    """[..., d] -> contiguous [N, d]."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: programs run one by one, only the chunking logic matters


def _n_chunks(n_tokens: int, d_sae: int, kp: int, block_n: int, device: torch.device) -> int:
    """Split the latents into chunks so that (token tiles x chunks) fills the GPU about twice."""
    m_tiles = triton.cdiv(n_tokens, _ENC_BLOCK_M)
    n_tiles = triton.cdiv(d_sae, block_n)
    want = triton.cdiv(2 * _num_sms(device), m_tiles)
    return max(1, min(want, n_tiles, _MAX_CAND_WIDTH // kp))


def _encode_select_fused(x, W_enc, b_enc, k, dec_norm, n_chunks=None):
    n_tokens, d_model = x.shape
    d_sae = W_enc.shape[0]
    # K' >= 8: tiny register dims gain nothing and keep layouts simple; any K' >= k is exact.
    kp = max(8, triton.next_power_of_2(k))
    block_n = _enc_block_n(kp, x.dtype if x.dtype == W_enc.dtype else torch.float32)
    n_tiles = triton.cdiv(d_sae, block_n)
    if n_chunks is None:
        n_chunks = _n_chunks(n_tokens, d_sae, kp, block_n, x.device)
    n_chunks = max(1, min(int(n_chunks), n_tiles))
    tiles_per_chunk = triton.cdiv(n_tiles, n_chunks)
    n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
    # -inf / -1 so that an unwritten slot could never pass as a candidate.
    cand_s = torch.full((n_tokens, n_chunks, kp), float("-inf"), device=x.device, dtype=torch.float32)
    cand_v = torch.zeros((n_tokens, n_chunks, kp), device=x.device, dtype=torch.float32)
    cand_i = torch.full((n_tokens, n_chunks, kp), -1, device=x.device, dtype=torch.int32)
    interp = _interpreting()
    has_norm = dec_norm is not None
    grid = (triton.cdiv(n_tokens, _ENC_BLOCK_M), n_chunks)
    _encode_topk_candidates_kernel[grid](
        x, x.stride(0), W_enc, W_enc.stride(0), b_enc, dec_norm if has_norm else b_enc,
        cand_s, cand_v, cand_i,
        n_tokens, d_model, d_sae, n_chunks, tiles_per_chunk,
        HAS_NORM=has_norm, CAST_FP32=interp or x.dtype != W_enc.dtype,
        IEEE=x.dtype == torch.float32 and W_enc.dtype == torch.float32,
        KP=kp, BLOCK_M=_ENC_BLOCK_M, BLOCK_N=block_n, BLOCK_K=_ENC_BLOCK_K,
        num_warps=_ENC_WARPS,
    )
    values = torch.empty((n_tokens, k), device=x.device, dtype=x.dtype)
    indices = torch.empty((n_tokens, k), device=x.device, dtype=torch.int64)
    width = n_chunks * kp
    block_w = triton.next_power_of_2(width)
    block_r = max(1, min(16, 4096 // block_w))
    _select_candidates_kernel[(triton.cdiv(n_tokens, block_r),)](
        cand_s, cand_v, cand_i, values, indices, n_tokens, width, k,
        BLOCK_R=block_r, BLOCK_W=block_w, num_warps=4,
    )
    return values, indices


def _encode_select_dense(x, W_enc, b_enc, k, dec_norm):
    n_tokens, d_model = x.shape
    d_sae = W_enc.shape[0]
    interp = _interpreting()
    has_norm = dec_norm is not None
    values = torch.empty((n_tokens, k), device=x.device, dtype=x.dtype)
    indices = torch.empty((n_tokens, k), device=x.device, dtype=torch.int64)
    slab = max(1, _DENSE_MAX_ELEMS // d_sae)
    for r0 in range(0, n_tokens, slab):
        xs = x[r0:r0 + slab]
        rows = xs.shape[0]
        scores = torch.empty((rows, d_sae), device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(rows, _DENSE_BLOCK_M), triton.cdiv(d_sae, _DENSE_BLOCK_N))
        _encode_scores_kernel[grid](
            xs, xs.stride(0), W_enc, W_enc.stride(0), b_enc, dec_norm if has_norm else b_enc,
            scores, scores.stride(0), rows, d_model, d_sae,
            HAS_NORM=has_norm, CAST_FP32=interp or x.dtype != W_enc.dtype,
            IEEE=x.dtype == torch.float32 and W_enc.dtype == torch.float32,
            BLOCK_M=_DENSE_BLOCK_M, BLOCK_N=_DENSE_BLOCK_N, BLOCK_K=_DENSE_BLOCK_K,
            num_warps=_DENSE_WARPS,
        )
        top_s, top_i = torch.topk(scores, k, dim=1, sorted=False)
        del scores
        indices[r0:r0 + rows] = top_i
        if has_norm:
            # Scores are z * norm; recover z = relu(<x, W[i]> + b[i]) at the k winners (2 N k d FLOPs).
            _gather_dot_kernel[(rows, triton.cdiv(k, _DOT_BLOCK_J))](
                values[r0:r0 + rows], xs, xs.stride(0), top_i, top_i.stride(0),
                W_enc, W_enc.stride(0), b_enc, d_model, k,
                HAS_BIAS=True, APPLY_RELU=True,
                BLOCK_J=_DOT_BLOCK_J, BLOCK_D=_DOT_BLOCK_D, num_warps=_ROW_WARPS,
            )
        else:
            values[r0:r0 + rows] = top_s.to(x.dtype)
    return values, indices


def encode_select(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dec_norm: Tensor | None
                  ) -> tuple[Tensor, Tensor]:
    """Values z = relu(x W_enc^T + b_enc) at the k latents of largest z * dec_norm, and their int64 ids.

    x [N, d] (leading dims flattened), W_enc [n, d], b_enc [n], dec_norm [n] or None.
    Returns values [N, k] in x.dtype and indices [N, k] int64 (distinct per row, any order).
    k <= FUSED_MAX_K: fused GEMM + top-k epilogue, pre-activations never reach memory.
    k > FUSED_MAX_K: fused GEMM + bias + ReLU + weighting writes fp32 scores, then torch.topk.
    """
    _check_device(x, W_enc, b_enc, dec_norm)
    lead = x.shape[:-1]
    x = _rows2d(x)
    W_enc = W_enc.contiguous()
    b_enc = b_enc.contiguous()
    if dec_norm is not None:
        dec_norm = dec_norm.contiguous()
    d_sae, d_model = W_enc.shape
    k = int(k)
    if x.shape[1] != d_model or b_enc.shape != (d_sae,) or (dec_norm is not None and dec_norm.shape != (d_sae,)):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)}, "
                         f"b_enc {tuple(b_enc.shape)}, dec_norm {None if dec_norm is None else tuple(dec_norm.shape)}")
    if not 1 <= k <= d_sae:
        raise ValueError(f"k must be in 1..{d_sae}, got {k}")
    if x.shape[0] == 0:
        values = x.new_empty((0, k))
        indices = torch.empty((0, k), device=x.device, dtype=torch.int64)
    elif k <= FUSED_MAX_K:
        values, indices = _encode_select_fused(x, W_enc, b_enc, k, dec_norm)
    else:
        values, indices = _encode_select_dense(x, W_enc, b_enc, k, dec_norm)
    return values.reshape(*lead, k), indices.reshape(*lead, k)


def gather_rows(values: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """out[t] = sum_j values[t, j] * W[indices[t, j]] -> [N, d] in W.dtype (fp32 accumulation)."""
    _check_device(values, indices, W)
    lead = values.shape[:-1]
    values, indices, W = _rows2d(values), _rows2d(indices), W.contiguous()
    n_tokens, k = values.shape
    d_model = W.shape[1]
    out = torch.empty((n_tokens, d_model), device=W.device, dtype=W.dtype)
    if n_tokens > 0:
        grid = (n_tokens, triton.cdiv(d_model, _ROW_BLOCK_D))
        _gather_rows_kernel[grid](
            out, out.stride(0), values, indices, values.stride(0), W, W.stride(0), d_model, k,
            BLOCK_J=_ROW_BLOCK_J, BLOCK_D=_ROW_BLOCK_D, num_warps=_ROW_WARPS,
        )
    return out.reshape(*lead, d_model)


def gather_dot(grad_out: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """out[t, j] = <grad_out[t], W[indices[t, j]]> -> [N, k] in grad_out.dtype (fp32 accumulation)."""
    _check_device(grad_out, indices, W)
    lead = indices.shape[:-1]
    grad_out, indices, W = _rows2d(grad_out), _rows2d(indices), W.contiguous()
    n_tokens, k = indices.shape
    d_model = W.shape[1]
    out = torch.empty((n_tokens, k), device=W.device, dtype=grad_out.dtype)
    if n_tokens > 0:
        grid = (n_tokens, triton.cdiv(k, _DOT_BLOCK_J))
        _gather_dot_kernel[grid](
            out, grad_out, grad_out.stride(0), indices, indices.stride(0), W, W.stride(0), W,
            d_model, k, HAS_BIAS=False, APPLY_RELU=False,
            BLOCK_J=_DOT_BLOCK_J, BLOCK_D=_DOT_BLOCK_D, num_warps=_ROW_WARPS,
        )
    return out.reshape(*lead, k)


def scatter_outer(values: Tensor, indices: Tensor, Y: Tensor, n_rows: int, with_sum: bool
                  ) -> tuple[Tensor, Tensor | None]:
    """dW[i] = sum_{(t,j): indices[t,j]=i} values[t,j] * Y[t] -> [n_rows, d] in Y.dtype; optional
    dsum[i] = sum of the same values[t,j] -> [n_rows] in values.dtype. Deterministic (no float atomics)."""
    _check_device(values, indices, Y)
    values, indices, Y = _rows2d(values), _rows2d(indices), _rows2d(Y)
    n_tokens, k = indices.shape
    d_model = Y.shape[1]
    n_rows = int(n_rows)
    dW = torch.empty((n_rows, d_model), device=Y.device, dtype=Y.dtype)
    dsum = torch.empty((n_rows,), device=Y.device, dtype=values.dtype) if with_sum else None
    if n_rows == 0:
        return dW, dsum
    # CSR reverse map with torch ops (deterministic, no host sync): entries sorted by latent
    # (stable, so token order inside a run is fixed), offsets by binary search over the sorted ids.
    flat = indices.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(sorted_ids, torch.arange(n_rows + 1, device=Y.device, dtype=flat.dtype))
    grid = (n_rows, triton.cdiv(d_model, _SCAT_BLOCK_D))
    _scatter_outer_kernel[grid](
        dW, dW.stride(0), dsum if with_sum else dW, values.reshape(-1), order, offsets,
        Y, Y.stride(0), d_model, max(k, 1),
        WITH_SUM=with_sum, BLOCK_E=_SCAT_BLOCK_E, BLOCK_D=_SCAT_BLOCK_D, num_warps=_ROW_WARPS,
    )
    return dW, dsum
