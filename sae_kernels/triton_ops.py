"""Thin launchers for the Triton kernels in ``csrc_triton`` (flatten, choose blocks, allocate, launch).

The same primitives, signatures and semantics as the PyTorch path in ``sae_kernels.reference``:
``encode_select``, ``select_from_pre``, ``gather_rows``, ``gather_dot``, ``scatter_outer``; plus
``adam_step`` for ``sae_kernels.optim.SAEAdam``. No autograd here. Only called on CUDA tensors, or
on CPU tensors under ``TRITON_INTERPRET=1``. Every launch runs under the tensors' CUDA device, not
the current one.

Which kernel runs (every choice is made by a ``_*_config`` function below, and ``launch_configs``
enumerates everything they can return, so the sm_90 compile test covers each configuration):

* encode: two passes when the pre-activations fit ``TWO_PASS_MAX_BYTES`` (or for any shape when
  k > FUSED_MAX_K, in row slabs): cuBLAS ``addmm`` writes them in the weights' dtype, then
  ``_row_topk_kernel`` selects per row. Otherwise (k <= 64, huge N x d_sae) the fused GEMM + running
  top-K' kernel, which never writes them. ``ENCODE_METHOD`` forces one (benchmarks).
* decode, d(values), backward reductions: sparse row kernels for k below ``dense_k_threshold``
  (about d_sae / 256, from the cost model: a sparse pass reads k rows of d_model per token, a dense
  one is a B x d_sae x d_model GEMM); dense cuBLAS GEMMs on a scattered coefficient matrix above
  (K-annealing starts at k = d_model / 2, AuxK uses k_aux = 256..512).

Block sizes are GPU defaults chosen from the shapes and from ``ptxas -v`` for sm_90, not tuned
(no GPU was available when they were written); ``benchmarks/gpu_check.py`` times them.
"""

import contextlib
import math
import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import triton
from torch import Tensor

from csrc_triton.adam import _adam_kernel
from csrc_triton.loss import _row_sq_error_kernel
from csrc_triton.sparse_decode import _gather_dot_kernel, _gather_rows_kernel, _scatter_rows_kernel
from csrc_triton.topk_encode import _encode_topk_candidates_kernel, _select_candidates_kernel
from csrc_triton.topk_select import _row_topk_kernel

from . import reference

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------- choices

# Encode: "auto" (two-pass when the pre-activations fit the budget, else fused for k <= 64),
# "two_pass" or "fused" (k <= FUSED_MAX_K only). Benchmarks set it to time both paths.
ENCODE_METHOD = "auto"
# Bytes of pre-activations the two-pass encode may materialise at once: 1 GiB holds 4096 tokens x
# 131072 latents in bf16 (the largest Llama Scope shape at the recipe's batch); larger products use
# the fused kernel (k <= 64) or row slabs of this size (k > 64).
TWO_PASS_MAX_BYTES = 1 << 30
# The fused kernel keeps 3 x [BLOCK_M, K'] (score, value, id) next to the GEMM accumulator in
# registers: K' = 64 (k <= 64) is the most that fits a 64 x 64 tile without spills on sm_90.
FUSED_MAX_K = 64
# Sparse gathers read k rows of W per token (B k d elements, mostly from HBM: W is 256 MiB at
# d_sae 32768); the dense alternative is a B x d_sae x d GEMM (2 B n d FLOPs) plus a B x d_sae
# coefficient matrix. At ~2.5 TB/s against ~700 TFLOP/s they cost the same near k = d_sae / 280:
# 128 at d_sae 32768, 512 at 131072. Measured crossovers go here (gpu_check reports them).
DENSE_K_FRACTION = 1 / 256
DENSE_K_MIN = 128


def dense_k_threshold(d_sae: int) -> int:
    """Smallest k at which the decode / backward passes switch to dense GEMMs."""
    return max(DENSE_K_MIN, int(d_sae * DENSE_K_FRACTION))


# Fused kernel tile: 64 tokens x BLOCK_N latents x 32 of d_model, 8 warps. From `ptxas -v` for
# sm_90: bf16 with K' <= 32 fits 64 x 128; K' = 64 or fp32 (ieee dot) need 64 x 64.
_ENC_BLOCK_M, _ENC_BLOCK_K, _ENC_WARPS = 64, 32, 8
# Stage 2 of the fused path: one row of up to 4096 candidates per program.
_MAX_CAND_WIDTH = 4096
# Row select (csrc_triton/topk_select.py): 4096 entries of a row per step of a row pass, 8 warps (16 per
# thread, two 16 B loads of bf16); candidates in steps of 256 (k <= _SELECT_SMALL_K) or 2048. A
# persistent grid of _SELECT_PROGRAMS_PER_SM programs per SM, each with its own scratch: sm_90 ptxas
# must keep the kernel within two programs per SM (<= 128 registers at 8 warps; python
# benchmarks/sm90_report.py --sass prints its registers and instruction counts).
_SELECT_BLOCK, _SELECT_WARPS = 2048, 8
_SELECT_SMALL_K = 256
_SELECT_PROGRAMS_PER_SM = 2
# Scratch entries per program: the candidates (k plus the rest of the k-th key's quarter-octave bin,
# typically k + d_sae / 100, or the sample's estimate) must fit, else the row takes more passes.
_SELECT_MIN_CAPACITY = 4096
# H0 histograms the first quarter of a row (a multiple of the block; whole rows up to 4 blocks) and
# aims at the k-th entry scaled to it plus a margin of 3 standard deviations and 4 (too few
# candidates, under 1% of rows: the rest of the row is read and the selection redone exactly).
_SELECT_SAMPLE_DIV, _SELECT_SAMPLE_SIGMAS = 4, 3.0
# Row strides the kernel reads in place: multiples of 16 elements (Triton specialises integer arguments
# on divisibility by 16). Other rows (AuxK's over d_sae = 3277 latents) would take scalar loads, and the
# layouts of the [BLOCK / 8, 8] blocks change with them: layout conversions through shared memory in
# every loop (SW: 952 SASS instructions per step instead of 449) and spills at 128 registers. On a GPU
# such rows are first copied into rows of an aligned stride (one read and one write of the rows).
_SELECT_ROW_ALIGN = 16
# Sparse row kernels: BLOCK_D = 128 elements = 256 B of a bf16 row per program (full 128 B
# transactions, 4 warps x 32 lanes); BLOCK_J = 16 rows of W in flight per step hides gather latency.
_ROW_BLOCK_D, _ROW_BLOCK_J, _ROW_WARPS = 128, 16, 4
# gather_dot: one program covers 16 selected latents of one token, d_model swept 128 at a time.
_DOT_BLOCK_J, _DOT_BLOCK_D = 16, 128
# Backward reduction: blocks of 32 latents x 128 columns (a [32, 128] fp32 accumulator), entries
# 32 at a time (one 32 x 32 x 128 MMA per tile): 1024 x 32 programs at d_sae 32768, d_model 4096,
# instead of one program per (latent, 128 columns).
_SCAT_BLOCK_L, _SCAT_BLOCK_E, _SCAT_BLOCK_D = 32, 32, 128
# Adam: [8 rows, 128 columns] per step (512 B fp32 row segments, 1024 elements), 4 warps; a 1-D
# parameter is viewed as rows of 128. 4096 programs for W [32768, 4096].
_ADAM_BLOCK_R, _ADAM_BLOCK_C, _ADAM_WARPS, _ADAM_CHUNK = 8, 128, 4, 128
# Row squared error: 4 rows x 512 columns per step (2048 elements, 4 warps: 16 per thread).
_SQ_BLOCK_R, _SQ_BLOCK_D, _SQ_WARPS = 4, 512, 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(*tensors: Optional[Tensor]) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on the same device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"triton_ops needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device}")
    return device


def _on_device(device: torch.device):
    """Launch under the tensors' device: Triton launches on the *current* CUDA device otherwise, so
    tensors on cuda:1 with cuda:0 current would fault or compute on the wrong GPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _rows2d(t: Tensor) -> Tensor:
    """[..., d] -> contiguous [N, d]."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: programs run one by one, only the chunking logic matters


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """One dtype for a kernel's operands: theirs when they agree, fp32 when they are mixed (then the
    products are exact fp32 on the GPU as in the interpreter, never TF32)."""
    return dtypes[0] if all(d == dtypes[0] for d in dtypes) else torch.float32


# ---------------------------------------------------------------------------------------- configs
# Each returns the kernel's compile-time arguments (and num_warps) for one class of inputs; the
# launchers and launch_configs() both call them.


def _fused_config(k: int, dtype: torch.dtype, interpret: Optional[bool] = None) -> Dict[str, Any]:
    kp = max(16, triton.next_power_of_2(k))  # any K' >= k is exact; >= 16 keeps the layouts simple
    block_n = 128 if kp <= 32 and dtype != torch.float32 else 64
    interpret = _interpreting() if interpret is None else interpret
    return dict(HAS_NORM=True, CAST_FP32=interpret, IEEE=dtype == torch.float32, KP=kp,
                BLOCK_M=_ENC_BLOCK_M, BLOCK_N=block_n, BLOCK_K=_ENC_BLOCK_K, num_warps=_ENC_WARPS)


def _cand_select_config() -> Dict[str, Any]:
    return dict(BLOCK_R=1, BLOCK_W=_MAX_CAND_WIDTH, num_warps=4)


def _row_select_config(has_bias: bool, has_norm: bool, k: int) -> Dict[str, Any]:
    return dict(HAS_BIAS=has_bias, HAS_NORM=has_norm, BLOCK=_SELECT_BLOCK, SMALL_K=k <= _SELECT_SMALL_K,
                num_warps=_SELECT_WARPS, maxnreg=65536 // (32 * _SELECT_WARPS * _SELECT_PROGRAMS_PER_SM))


def _select_capacity(d_sae: int, k: int) -> int:
    """Candidates per program of the row select (at most d_sae, every candidate set fits then, rounded
    up to a multiple of 16: each program's scratch stays 128 B aligned, so that Triton's divisibility
    specialisation keeps the candidate loads vectorised at any d_sae)."""
    return -(-min(d_sae, max(_SELECT_MIN_CAPACITY, 2 * k + d_sae // 16)) // 16) * 16


def _select_sample(d_sae: int, k: int, sample: Optional[int] = None) -> Tuple[int, int]:
    """(entries H0 reads first, how many of them it aims above the threshold): the whole row and k,
    or the first quarter and k scaled to it plus a margin."""
    if sample is None:
        quarter = triton.cdiv(d_sae // _SELECT_SAMPLE_DIV, _SELECT_BLOCK) * _SELECT_BLOCK
        sample = d_sae if d_sae <= _SELECT_SAMPLE_DIV * _SELECT_BLOCK else quarter
    n_s = min(d_sae, max(1, int(sample)))
    if n_s >= d_sae:
        return d_sae, k
    mu = k * n_s / d_sae
    return n_s, max(1, min(n_s, int(math.ceil(mu + _SELECT_SAMPLE_SIGMAS * math.sqrt(mu) + 4))))


def _gather_config() -> Dict[str, Any]:
    return dict(BLOCK_J=_ROW_BLOCK_J, BLOCK_D=_ROW_BLOCK_D, num_warps=_ROW_WARPS)


def _dot_config() -> Dict[str, Any]:
    return dict(BLOCK_J=_DOT_BLOCK_J, BLOCK_D=_DOT_BLOCK_D, num_warps=_ROW_WARPS)


def _scatter_config(dtype: torch.dtype, interpret: Optional[bool] = None) -> Dict[str, Any]:
    interpret = _interpreting() if interpret is None else interpret
    return dict(CAST_FP32=interpret, IEEE=dtype == torch.float32,
                BLOCK_L=_SCAT_BLOCK_L, BLOCK_E=_SCAT_BLOCK_E, BLOCK_D=_SCAT_BLOCK_D, num_warps=_ROW_WARPS)


def _adam_config(has_copy: bool, flags: int = 0, row_bc: int = 0) -> Dict[str, Any]:
    return dict(HAS_SCALE=True, HAS_COPY=has_copy, HAS_SUMSQ=True, FLAGS=flags, ROW_BC=row_bc, BLOCK_R=_ADAM_BLOCK_R,
                BLOCK_C=_ADAM_BLOCK_C, num_warps=_ADAM_WARPS)


# ---------------------------------------------------------------------------------------- encode


def _n_chunks(n_tokens: int, d_sae: int, kp: int, block_n: int, device: torch.device) -> int:
    """Split the latents into chunks so that (token tiles x chunks) fills the GPU about twice."""
    m_tiles = triton.cdiv(n_tokens, _ENC_BLOCK_M)
    n_tiles = triton.cdiv(d_sae, block_n)
    want = triton.cdiv(2 * _num_sms(device), m_tiles)
    return max(1, min(want, n_tiles, _MAX_CAND_WIDTH // kp))


def _encode_select_fused(x, W_enc, b_enc, k, dec_norm, n_chunks=None):
    """Fused GEMM + running top-K' + exact second stage (k <= FUSED_MAX_K); x, W, b of one dtype."""
    n_tokens, d_model = x.shape
    d_sae = W_enc.shape[0]
    if k > FUSED_MAX_K:
        raise ValueError(f"the fused encode takes k <= {FUSED_MAX_K}, got {k}")
    cfg = _fused_config(k, W_enc.dtype)
    kp, block_n = cfg["KP"], cfg["BLOCK_N"]
    n_tiles = triton.cdiv(d_sae, block_n)
    if n_chunks is None:
        n_chunks = _n_chunks(n_tokens, d_sae, kp, block_n, x.device)
    n_chunks = max(1, min(int(n_chunks), n_tiles, _MAX_CAND_WIDTH // kp))
    tiles_per_chunk = triton.cdiv(n_tiles, n_chunks)
    n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
    if dec_norm is None:  # plain TopK: unit weights (one kernel configuration instead of two)
        dec_norm = torch.ones(d_sae, device=x.device, dtype=torch.float32)
    # -inf / -1 so that an unwritten slot could never pass as a candidate.
    cand_s = torch.full((n_tokens, n_chunks, kp), float("-inf"), device=x.device, dtype=torch.float32)
    cand_v = torch.zeros((n_tokens, n_chunks, kp), device=x.device, dtype=torch.float32)
    cand_i = torch.full((n_tokens, n_chunks, kp), -1, device=x.device, dtype=torch.int32)
    grid = (triton.cdiv(n_tokens, _ENC_BLOCK_M), n_chunks)
    _encode_topk_candidates_kernel[grid](
        x, x.stride(0), W_enc, W_enc.stride(0), b_enc, dec_norm,
        cand_s, cand_v, cand_i,
        n_tokens, d_model, d_sae, n_chunks, tiles_per_chunk, **cfg,
    )
    values = torch.empty((n_tokens, k), device=x.device, dtype=torch.float32)
    indices = torch.empty((n_tokens, k), device=x.device, dtype=torch.int64)
    scfg = _cand_select_config()
    _select_candidates_kernel[(triton.cdiv(n_tokens, scfg["BLOCK_R"]),)](
        cand_s, cand_v, cand_i, values, indices, n_tokens, n_chunks * kp, k, **scfg,
    )
    return values.to(x.dtype), indices


def _select_row_stride(d_sae: int, stride: int) -> int:
    """The row stride ``_row_select`` launches the kernel with (on a GPU): ``stride``, or d_sae rounded
    up to a multiple of _SELECT_ROW_ALIGN when ``stride`` is not one."""
    return stride if stride % _SELECT_ROW_ALIGN == 0 else -(-d_sae // _SELECT_ROW_ALIGN) * _SELECT_ROW_ALIGN


def _select_aligned_rows(pre: Tensor) -> Tensor:
    """``pre`` copied into rows of a stride that is a multiple of _SELECT_ROW_ALIGN (the padding is
    never read)."""
    n_rows, d_sae = pre.shape
    buf = torch.empty((n_rows, _select_row_stride(d_sae, pre.stride(0))), device=pre.device, dtype=pre.dtype)
    out = buf[:, :d_sae]
    out.copy_(pre)
    return out


def _row_select(pre: Tensor, k: int, dec_norm: Optional[Tensor], bias: Optional[Tensor],
                values: Tensor, indices: Tensor, capacity: Optional[int] = None,
                sample: Optional[int] = None) -> None:
    """``_row_topk_kernel`` over the rows of ``pre`` into ``values`` / ``indices`` (contiguous [N, k]).
    ``capacity`` (candidates per program) and ``sample`` (entries H0 reads first): tests force small
    ones to take the fallbacks."""
    n_rows, d_sae = pre.shape
    if n_rows == 0:
        return
    cfg = _row_select_config(bias is not None, dec_norm is not None, k)
    cap = _select_capacity(d_sae, k) if capacity is None else max(1, int(capacity))
    n_sample, k_sample = _select_sample(d_sae, k, sample)
    if pre.is_cuda and pre.stride(0) % _SELECT_ROW_ALIGN:
        pre = _select_aligned_rows(pre)
    n_prog = min(n_rows, _SELECT_PROGRAMS_PER_SM * _num_sms(pre.device))
    work = torch.empty((n_prog, triton.cdiv(d_sae, 32)), device=pre.device, dtype=torch.int32)
    cand = torch.empty((n_prog, cap), device=pre.device, dtype=torch.int64)
    _row_topk_kernel[(n_prog,)](
        pre, pre.stride(0), bias if bias is not None else pre, dec_norm if dec_norm is not None else pre,
        values, indices, work, cand, n_rows, d_sae, k, cap, n_sample, k_sample, **cfg,
    )


def _encode_select_two_pass(x, W_enc, b_enc, k, dec_norm, return_pre=False):
    """cuBLAS addmm (pre-activations in the weights' dtype), then the row select; x, W, b of one dtype.
    Rows in slabs of TWO_PASS_MAX_BYTES of pre-activations. ``return_pre``: also the pre-activations
    (None when they took more than one slab)."""
    n_tokens = x.shape[0]
    d_sae = W_enc.shape[0]
    values = torch.empty((n_tokens, k), device=x.device, dtype=W_enc.dtype)
    indices = torch.empty((n_tokens, k), device=x.device, dtype=torch.int64)
    slab = max(1, TWO_PASS_MAX_BYTES // max(1, d_sae * W_enc.element_size()))
    pre = None
    for r0 in range(0, n_tokens, slab):
        r1 = min(n_tokens, r0 + slab)
        pre = torch.addmm(b_enc, x[r0:r1], W_enc.t())
        _row_select(pre, k, dec_norm, None, values[r0:r1], indices[r0:r1])
    if return_pre and n_tokens > slab:
        pre = None
    return values, indices, pre


def _use_two_pass(n_tokens: int, d_sae: int, k: int, dtype: torch.dtype) -> bool:
    if ENCODE_METHOD == "two_pass" or k > FUSED_MAX_K:
        return True
    if ENCODE_METHOD == "fused":
        return False
    if ENCODE_METHOD != "auto":
        raise ValueError(f"triton_ops.ENCODE_METHOD: expected 'auto', 'two_pass' or 'fused', got {ENCODE_METHOD!r}")
    return n_tokens * d_sae * torch.empty((), dtype=dtype).element_size() <= TWO_PASS_MAX_BYTES


def encode_select(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, dec_norm: Optional[Tensor], *,
                  return_pre: bool = False):
    """Values z = relu(x W_enc^T + b_enc) at the k latents of largest z * dec_norm, and their int64 ids.

    x [N, d] (leading dims flattened), W_enc [n, d], b_enc [n], dec_norm [n] or None.
    Returns values [N, k] in x.dtype and indices [N, k] int64 (distinct per row; the two-pass path
    returns them in increasing id, the fused one in score order). ``return_pre``: a third result, the
    pre-activations for ``select_from_pre`` (None when the fused path or several slabs ran).
    Mixed x / W dtypes compute in exact fp32 (both paths, GPU and interpreter alike).
    """
    device = _check_device(x, W_enc, b_enc, dec_norm)
    lead = x.shape[:-1]
    x = _rows2d(x)
    d_sae, d_model = W_enc.shape
    k = int(k)
    if x.shape[1] != d_model or b_enc.shape != (d_sae,) or (dec_norm is not None and dec_norm.shape != (d_sae,)):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, W_enc {tuple(W_enc.shape)}, "
                         f"b_enc {tuple(b_enc.shape)}, dec_norm {None if dec_norm is None else tuple(dec_norm.shape)}")
    if not 1 <= k <= d_sae:
        raise ValueError(f"k must be in 1..{d_sae}, got {k}")
    out_dtype = x.dtype
    cdt = _compute_dtype(x.dtype, W_enc.dtype)
    x, W_enc, b_enc = x.to(cdt), W_enc.to(cdt).contiguous(), b_enc.to(cdt).contiguous()
    if dec_norm is not None:
        dec_norm = dec_norm.contiguous()
    pre = None
    with _on_device(device):
        if x.shape[0] == 0:
            values = torch.empty((0, k), device=device, dtype=cdt)
            indices = torch.empty((0, k), device=device, dtype=torch.int64)
        elif _use_two_pass(x.shape[0], d_sae, k, cdt):
            values, indices, pre = _encode_select_two_pass(x, W_enc, b_enc, k, dec_norm, return_pre)
        else:
            values, indices = _encode_select_fused(x, W_enc, b_enc, k, dec_norm)
    values, indices = values.to(out_dtype).reshape(*lead, k), indices.reshape(*lead, k)
    return (values, indices, pre) if return_pre else (values, indices)


def select_from_pre(pre: Tensor, k: int, dec_norm: Optional[Tensor], allowed: Optional[Tensor] = None
                    ) -> Tuple[Tensor, Tensor]:
    """A second top-k from the pre-activations that ``encode_select(..., return_pre=True)`` kept,
    without another GEMM: latents where ``allowed`` (bool [n]) is False count as z = 0 (AuxK's
    selection among dead latents). Values in ``pre.dtype``."""
    device = _check_device(pre, dec_norm, allowed)
    n_rows, d_sae = pre.shape
    k = int(k)
    if not 1 <= k <= d_sae:
        raise ValueError(f"k must be in 1..{d_sae}, got {k}")
    bias = None
    if allowed is not None:
        # relu(h - 1e30) = 0 for every finite h: masked latents rank with the zeros, value 0.
        bias = torch.where(allowed, 0.0, -1e30).to(device=device, dtype=torch.float32)
    values = torch.empty((n_rows, k), device=device, dtype=pre.dtype)
    indices = torch.empty((n_rows, k), device=device, dtype=torch.int64)
    with _on_device(device):
        _row_select(pre, k, dec_norm.contiguous() if dec_norm is not None else None, bias, values, indices)
    return values, indices


# ---------------------------------------------------------------------------------------- sparse ops


def _dense_ok(n_tokens: int, n_rows: int, k: int, dtype: torch.dtype) -> bool:
    """Dense GEMMs for large k, when the B x d_sae coefficient matrix fits the encode's budget."""
    return (k >= dense_k_threshold(n_rows)
            and n_tokens * n_rows * torch.empty((), dtype=dtype).element_size() <= TWO_PASS_MAX_BYTES)


def _coefficients(values: Tensor, indices: Tensor, n_rows: int, dtype: torch.dtype) -> Tensor:
    """Dense [N, n_rows] matrix with the (summed) coefficients of each row's latents."""
    coef = torch.zeros((indices.shape[0], n_rows), device=values.device, dtype=dtype)
    return coef.scatter_add_(1, indices, values.to(dtype))


_mm = reference.mm_out  # (the name step_cost.py traces)


def gather_rows(values: Tensor, indices: Tensor, W: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """out[t] = sum_j values[t, j] * W[indices[t, j]] -> [N, d] in ``out_dtype`` (default W.dtype; fp32
    accumulation either way)."""
    device = _check_device(values, indices, W)
    lead = values.shape[:-1]
    values, indices, W = _rows2d(values), _rows2d(indices), W.contiguous()
    n_tokens, k = values.shape
    d_sae, d_model = W.shape
    out_dtype = out_dtype or W.dtype
    with _on_device(device):
        if n_tokens and _dense_ok(n_tokens, d_sae, k, W.dtype):
            out = _mm(_coefficients(values, indices, d_sae, W.dtype), W, out_dtype)
        else:
            out = torch.empty((n_tokens, d_model), device=device, dtype=out_dtype)
            if n_tokens > 0:
                grid = (n_tokens, triton.cdiv(d_model, _ROW_BLOCK_D))
                _gather_rows_kernel[grid](
                    out, out.stride(0), values, indices, values.stride(0), W, W.stride(0),
                    d_sae, d_model, k, **_gather_config(),
                )
    return out.reshape(*lead, d_model)


def gather_dot(grad_out: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """out[t, j] = <grad_out[t], W[indices[t, j]]> -> [N, k] in grad_out.dtype (fp32 accumulation)."""
    device = _check_device(grad_out, indices, W)
    lead = indices.shape[:-1]
    grad_out, indices, W = _rows2d(grad_out), _rows2d(indices), W.contiguous()
    n_tokens, k = indices.shape
    d_sae, d_model = W.shape
    with _on_device(device):
        if n_tokens and _dense_ok(n_tokens, d_sae, k, W.dtype):
            full = _mm(grad_out.to(W.dtype), W.t(), torch.float32)        # [N, d_sae]
            out = full.gather(1, indices).to(grad_out.dtype)
        else:
            out = torch.empty((n_tokens, k), device=device, dtype=grad_out.dtype)
            if n_tokens > 0:
                grid = (n_tokens, triton.cdiv(k, _DOT_BLOCK_J))
                _gather_dot_kernel[grid](
                    out, grad_out, grad_out.stride(0), indices, indices.stride(0), W, W.stride(0),
                    d_sae, d_model, k, **_dot_config(),
                )
    return out.reshape(*lead, k)


def scatter_outer(values: Tensor, indices: Tensor, Y: Tensor, n_rows: int, with_sum: bool,
                  out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """dW[i] = sum_{(t,j): indices[t,j]=i} values[t,j] * Y[t] -> [n_rows, d] in ``out_dtype``
    (default Y.dtype; fp32 master gradients are written directly, never via a bf16 copy); optional
    dsum[i] = sum of the same values[t,j] -> [n_rows] in ``out_dtype`` (default values.dtype).
    Deterministic (no float atomics). The latent-major map is built once per step and shared by the
    decoder's and the encoder's backward (``reference.latent_csr`` caches it for the same indices)."""
    device = _check_device(values, indices, Y)
    values, indices, Y = _rows2d(values), _rows2d(indices), _rows2d(Y)
    n_tokens, k = indices.shape
    d_model = Y.shape[1]
    n_rows = int(n_rows)
    dw_dtype = out_dtype or Y.dtype
    sum_dtype = out_dtype or values.dtype
    with _on_device(device):
        if n_rows == 0 or n_tokens == 0:
            dW = torch.zeros((n_rows, d_model), device=device, dtype=dw_dtype)
            return dW, (torch.zeros((n_rows,), device=device, dtype=sum_dtype) if with_sum else None)
        if _dense_ok(n_tokens, n_rows, k, Y.dtype):
            coef = _coefficients(values, indices, n_rows, Y.dtype)
            dW = _mm(coef.t(), Y, dw_dtype)
            dsum = coef.sum(0, dtype=torch.float32).to(sum_dtype) if with_sum else None
            return dW, dsum
        cdt = _compute_dtype(values.dtype, Y.dtype)
        vals = values.reshape(-1).to(cdt)
        Y = Y.to(cdt)
        crow, order, token = reference.latent_csr(indices, n_rows)
        dW = torch.empty((n_rows, d_model), device=device, dtype=dw_dtype)
        dsum = torch.empty((n_rows,), device=device, dtype=torch.float32)
        grid = (triton.cdiv(n_rows, _SCAT_BLOCK_L), triton.cdiv(d_model, _SCAT_BLOCK_D))
        _scatter_rows_kernel[grid](
            dW, dW.stride(0), dsum, vals, crow, order, token, Y, Y.stride(0), n_rows, d_model,
            **_scatter_config(cdt),
        )
    return dW, (dsum.to(sum_dtype) if with_sum else None)


# ---------------------------------------------------------------------------------------- loss


def _sq_config(has_offset: bool, backward: bool) -> Dict[str, Any]:
    return dict(HAS_OFFSET=has_offset, BACKWARD=backward, BLOCK_R=_SQ_BLOCK_R, BLOCK_D=_SQ_BLOCK_D,
                num_warps=_SQ_WARPS)


def _sq_args(pred: Tensor, target: Tensor, offset: Optional[Tensor]):
    if pred.ndim != 2 or target.ndim != 2 or target.shape[1] != pred.shape[1] or target.shape[0] not in (1, pred.shape[0]):
        raise ValueError(f"row_sq_error: expected pred [N, d] and target [N, d] or [1, d], got "
                         f"{list(pred.shape)} and {list(target.shape)}")
    if offset is not None and offset.shape != pred.shape:
        raise ValueError(f"row_sq_error: expected offset {list(pred.shape)}, got {list(offset.shape)}")
    pred = pred if pred.stride(1) == 1 else pred.contiguous()
    target = target if target.stride(1) == 1 else target.contiguous()
    t_stride = 0 if target.shape[0] == 1 else target.stride(0)
    if offset is not None and offset.stride(1) != 1:
        offset = offset.contiguous()
    return pred, target, t_stride, offset


def row_sq_error(pred: Tensor, target: Tensor, offset: Optional[Tensor] = None) -> Tensor:
    """``sum_j (pred + offset - target)[t, j]^2`` per row -> ``[N]`` fp32 (``target`` may be one row,
    broadcast). One read of the operands (``csrc_triton.loss``)."""
    device = _check_device(pred, target, offset)
    pred, target, t_stride, offset = _sq_args(pred, target, offset)
    n_rows, d = pred.shape
    out = torch.empty(n_rows, device=device, dtype=torch.float32)
    if n_rows:
        with _on_device(device):
            _row_sq_error_kernel[(triton.cdiv(n_rows, _SQ_BLOCK_R),)](
                pred, pred.stride(0), offset if offset is not None else pred,
                offset.stride(0) if offset is not None else 0, target, t_stride, out,
                out, out, 0, n_rows, d, **_sq_config(offset is not None, False))
    return out


def row_sq_error_grad(pred: Tensor, target: Tensor, offset: Optional[Tensor], g: Tensor) -> Tensor:
    """The gradient of ``pred`` for ``row_sq_error``'s sums weighted by ``g [N]``:
    ``2 (pred + offset - target) * g[:, None]``, in ``pred.dtype``. One read, one write."""
    device = _check_device(pred, target, offset, g)
    pred, target, t_stride, offset = _sq_args(pred, target, offset)
    n_rows, d = pred.shape
    grad = torch.empty((n_rows, d), device=device, dtype=pred.dtype)
    g = g.to(torch.float32).contiguous()
    if n_rows:
        with _on_device(device):
            _row_sq_error_kernel[(triton.cdiv(n_rows, _SQ_BLOCK_R),)](
                pred, pred.stride(0), offset if offset is not None else pred,
                offset.stride(0) if offset is not None else 0, target, t_stride, g,
                g, grad, grad.stride(0), n_rows, d, **_sq_config(offset is not None, True))
    return grad


# ---------------------------------------------------------------------------------------- Adam


def adam_step(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, beta1: float, beta2: float,
              eps: float, step_size: float, bc2_sqrt: float, scale: Optional[Tensor] = None,
              copy: Optional[Tensor] = None, row_sumsq: Optional[Tensor] = None,
              flags: Optional[Tensor] = None, row_step_size: Optional[Tensor] = None,
              row_bc2_sqrt: Optional[Tensor] = None) -> None:
    """One fused Adam update of the fp32 parameter ``p`` in place (torch's arithmetic; see
    ``csrc_triton/adam.py``): gradient times ``scale`` (device scalar, e.g. the clip factor), moments
    in their own dtype, ``copy`` (same shape, compute dtype) rewritten from the new ``p``, and
    ``row_sumsq`` [rows] the sums of squares of the new rows of a 2-D ``p``. ``flags``: uint8
    ``[p.shape[0]]`` (a row of a 2-D ``p``, an element of a 1-D one): ``HOLD`` (1) keeps the value,
    ``RESET`` (2) zeroes both moments before the step (``sae_kernels.optim``). ``row_step_size``,
    ``row_bc2_sqrt``: fp32 ``[p.shape[0]]``, both or neither, used instead of ``step_size`` and
    ``bc2_sqrt`` (per-row bias corrections of rows restarted by a reset)."""
    device = _check_device(p, grad, exp_avg, exp_avg_sq, scale, copy, row_sumsq, flags, row_step_size, row_bc2_sqrt)
    if p.dtype != torch.float32 or not (p.is_contiguous() and grad.is_contiguous()
                                        and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("adam_step: expected contiguous tensors and an fp32 parameter")
    if flags is not None and (flags.dtype != torch.uint8 or tuple(flags.shape) != (p.shape[0],)
                              or not flags.is_contiguous() or p.dim() not in (1, 2)):
        raise ValueError(f"adam_step: flags: expected a contiguous uint8 [{p.shape[0]}] tensor for a 1-D or 2-D "
                         f"parameter, got {flags.dtype} {list(flags.shape)} for {list(p.shape)}")
    if (row_step_size is None) != (row_bc2_sqrt is None) or any(
            r is not None and (r.dtype != torch.float32 or tuple(r.shape) != (p.shape[0],) or not r.is_contiguous()
                               or p.dim() not in (1, 2)) for r in (row_step_size, row_bc2_sqrt)):
        raise ValueError(f"adam_step: row_step_size, row_bc2_sqrt: expected both or neither, contiguous fp32 "
                         f"[{p.shape[0]}] tensors for a 1-D or 2-D parameter of shape {list(p.shape)}")
    n_elem = p.numel()
    n_cols = p.shape[-1] if p.dim() == 2 else _ADAM_CHUNK
    n_rows = max(1, triton.cdiv(n_elem, n_cols))
    if row_sumsq is None:
        row_sumsq = torch.empty(n_rows, device=device, dtype=torch.float32)
    if scale is None:
        scale = torch.ones((), device=device, dtype=torch.float32)
    with _on_device(device):
        _adam_kernel[(triton.cdiv(n_rows, _ADAM_BLOCK_R),)](
            p, grad, exp_avg, exp_avg_sq, copy if copy is not None else p, row_sumsq, scale,
            flags if flags is not None else row_sumsq,
            row_step_size if row_step_size is not None else row_sumsq,
            row_bc2_sqrt if row_bc2_sqrt is not None else row_sumsq,
            n_elem, n_rows, n_cols, beta1, beta2, eps, step_size, bc2_sqrt,
            **_adam_config(copy is not None, 0 if flags is None else (1 if p.dim() == 2 else 2),
                           0 if row_step_size is None else (1 if p.dim() == 2 else 2)),
        )


# ---------------------------------------------------------------------------------------- compile test


def launch_configs() -> Iterator[Tuple[str, Any, List[Any], Dict[str, Any]]]:
    """Every (kernel, argument types, compile-time arguments) the launchers above can launch, as
    ``(name, kernel, args, kwargs)``: a ``torch.dtype`` in ``args`` stands for a tensor of that dtype,
    ints for runtime integers (values typical of d_model 4096, d_sae 32768, 4096 tokens). Used by
    ``tests/e2e/test_compile_sm90.py`` to compile each one for sm_90 without a GPU."""
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    N, d, n, k = 4096, 4096, 32768, 50
    for dt in KERNEL_DTYPES:
        for kk in (16, 32, 64):  # K' classes: k in 1..16, 17..32, 33..64
            cfg = _fused_config(kk, dt, interpret=False)
            yield (f"fused_encode[{_dn(dt)},KP={cfg['KP']}]", _encode_topk_candidates_kernel,
                   [dt, d, dt, d, dt, f32, f32, f32, i32, N, d, n, 8, 4], cfg)
    yield "select_candidates", _select_candidates_kernel, [f32, f32, i32, f32, i64, N, 512, k], _cand_select_config()
    for dt in KERNEL_DTYPES:
        for has_bias in (False, True):
            for has_norm in (False, True):
                for kk in (k, 2048):  # the two candidate step sizes (k <= _SELECT_SMALL_K or above)
                    cfg = _row_select_config(has_bias, has_norm, kk)
                    yield (f"row_topk[{_dn(dt)},bias={int(has_bias)},norm={int(has_norm)},small_k={int(cfg['SMALL_K'])}]",
                           _row_topk_kernel, [dt, n, f32, f32, dt, i64, i32, i64, N, n, kk, _select_capacity(n, kk),
                                              *_select_sample(n, kk)], cfg)
    # (coefficient dtype, W dtype): equal in the ops; fp32 coefficients on a half W are also accepted.
    pairs = [(dt, dt) for dt in KERNEL_DTYPES] + [(f32, torch.bfloat16), (f32, torch.float16)]
    for vdt, wdt in pairs:
        for odt in sorted({wdt, f32}, key=str):  # the trainer's decode writes fp32 from a half W
            yield (f"gather_rows[{_dn(vdt)},{_dn(wdt)}->{_dn(odt)}]", _gather_rows_kernel,
                   [odt, d, vdt, i64, k, wdt, d, n, d, k], _gather_config())
        yield (f"gather_dot[{_dn(vdt)},{_dn(wdt)}]", _gather_dot_kernel,
               [vdt, vdt, d, i64, k, wdt, d, n, d, k], _dot_config())
    for dt in KERNEL_DTYPES:
        for out in sorted({dt, f32}, key=str):
            yield (f"scatter_rows[{_dn(dt)}->{_dn(out)}]", _scatter_rows_kernel,
                   [out, d, f32, dt, i64, i64, i64, dt, d, n, d], _scatter_config(dt, interpret=False))
    for dt in KERNEL_DTYPES:
        for has_off in (False, True):
            for bwd in (False, True):
                yield (f"row_sq_error[{_dn(dt)},offset={int(has_off)},{'backward' if bwd else 'forward'}]",
                       _row_sq_error_kernel, [dt, d, dt, d, dt, d, f32, f32, dt, d, N, d], _sq_config(has_off, bwd))
    for mdt in (f32, torch.bfloat16):
        for cdt in (None, torch.bfloat16, torch.float16):
            # no flags, one per row (W_enc, W_dec), one per element (b_enc); with and without per-row corrections
            for fl, rb in ((0, 0), (1, 0), (2, 0), (1, 1), (2, 2)):
                yield (f"adam[moments={_dn(mdt)},copy={_dn(cdt) if cdt else 'none'},flags={fl},row_bc={rb}]",
                       _adam_kernel, [f32, f32, mdt, mdt, cdt or f32, f32, f32, torch.uint8 if fl else f32, f32, f32,
                                      n * d, n, d, 0.9, 0.9999, 1e-8, 1e-3, 0.5], _adam_config(cdt is not None, fl, rb))


def _dn(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]
