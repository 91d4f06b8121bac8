"""Exact weighted TopK over materialised pre-activations: the second pass of the two-pass encode.

The first pass is a plain GEMM (cuBLAS ``addmm``) that writes the pre-activations ``h = x W^T + b``
([N, d_sae], in the weights' dtype, bf16 in training). ``_row_topk_kernel`` then reads each row and
fuses what is left: an optional extra bias (AuxK's dead-latent mask), ReLU, the decoder-norm
weighting and an exact top-k, writing the k kept values ``relu(h)`` and their latent ids.

Selection by radix select on order-preserving 32-bit keys of the fp32 scores ``relu(h) * norm``:
four passes over the row build 256-bin histograms of one key byte each (high byte first) among
the entries that still match the k-th key's prefix, and stop early once the k-th key's bin is
taken whole; a last pass writes the entries above the threshold and, of the entries equal to it,
the ones with the smallest latent ids. Every pass after the first reads the row from L2 (the rows
in flight: ~132 SMs x 2 programs x 64 KiB at d_sae 32768 in bf16 = 17 MB, under the H100's 50 MB),
so the pass is bound by one HBM read of the scores.

Semantics (the same as the PyTorch path in ``sae_kernels.reference``):
* the kept value is ``relu(h)``; the score ``relu(h) * norm`` only ranks;
* ties go to the smaller latent id; outputs of a row are in increasing latent id;
* NaN: a latent whose pre-activation (or score) is NaN ranks above every number and keeps the value
  NaN; a NaN input row therefore yields k NaN values at in-range, distinct latents;
* any float score is ranked correctly (negative norms, -inf): indices are always in [0, d_sae).
"""

import triton
import triton.language as tl


@triton.jit
def _row_topk_kernel(
    pre_ptr, pre_row_stride,          # [n_rows, d_sae] pre-activations (bias already added unless HAS_BIAS)
    b_ptr, norm_ptr,                  # [d_sae] extra bias (read when HAS_BIAS), [d_sae] weights (HAS_NORM)
    val_ptr, idx_ptr,                 # [n_rows, K] kept values (val dtype), int64 latent ids, contiguous
    d_sae, K,
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)   # n_rows * d_sae overflows int32 at 16k x 131k
    pre_row = pre_ptr + row * pre_row_stride
    out_row = row * K
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    sign = tl.full([BLOCK], 0x80000000, tl.uint32)
    nan_key = tl.full([BLOCK], 0xFFFFFFFF, tl.uint32)

    # Passes 0-3: radix select of the K-th largest key, one byte per pass. Invariant: `prefix` holds
    # the known high bytes of the K-th key (the bits under `known`), and `need` of the entries
    # matching it are still to be taken (every entry with a larger masked key is taken).
    # Pass 4: write the winners in latent order: every entry above the threshold, and the first
    # `need` entries equal to it (ties to the smaller latent id).
    # One loop body for all five passes (the interpreter pays ~1 ms per nested @jit call).
    prefix = tl.zeros([], dtype=tl.uint32)
    known = tl.zeros([], dtype=tl.uint32)
    need = K
    go = K > 0
    taken = 0
    ties = 0
    for p in tl.static_range(5):
        shift = 24 - 8 * p  # compile-time: the byte this pass resolves (p < 4)
        if go | (p == 4):
            hist = tl.zeros([256], dtype=tl.int32)
            for c0 in range(0, d_sae, BLOCK):
                cols = c0 + offs
                col_mask = cols < d_sae
                h = tl.load(pre_row + cols, mask=col_mask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    h += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                # ReLU that keeps NaN (tl.maximum(h, 0) gives 0 for NaN, on GPU and in the interpreter)
                z = tl.where((h > 0.0) | (h != h), h, 0.0)
                s = z
                if HAS_NORM:
                    s = z * tl.load(norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                s = tl.where(s == 0.0, 0.0, s)  # -0.0 (zero times a negative norm) ranks with +0.0
                u = s.to(tl.uint32, bitcast=True)
                key = tl.where((u & sign) != 0, ~u, u | sign)  # negative floats: reversed, below positives
                key = tl.where(s != s, nan_key, key)
                mk = key & known
                if p < 4:
                    digit = ((key >> shift) & 0xFF).to(tl.int32)
                    hist += tl.histogram(digit, 256, mask=col_mask & (mk == prefix))
                else:
                    eq = col_mask & (mk == prefix)
                    eq_rank = ties + tl.cumsum(eq.to(tl.int32), axis=0) - 1
                    sel = (col_mask & (mk > prefix)) | (eq & (eq_rank < need))
                    pos = taken + tl.cumsum(sel.to(tl.int32), axis=0) - 1
                    tl.store(val_ptr + out_row + pos, z.to(val_ptr.dtype.element_ty), mask=sel)
                    tl.store(idx_ptr + out_row + pos, cols.to(tl.int64), mask=sel)
                    # both counts in one reduction (each below 2^31): sel in the high word
                    both = tl.sum((sel.to(tl.int64) << 32) | eq.to(tl.int64), axis=0)
                    taken += (both >> 32).to(tl.int32)
                    ties += (both & 0xFFFFFFFF).to(tl.int32)
            if p < 4:
                ge = tl.cumsum(hist, axis=0, reverse=True)               # entries with this byte >= bin
                b_star = tl.max(tl.where(ge >= need, bins, -1), axis=0)  # the K-th key's byte
                # ge[b_star] (high word) and ge[b_star + 1] (low word) in one reduction
                both = tl.sum(tl.where(bins == b_star, ge.to(tl.int64) << 32, 0)
                              + tl.where(bins == b_star + 1, ge.to(tl.int64), 0), axis=0)
                above = (both & 0xFFFFFFFF).to(tl.int32)
                in_bin = (both >> 32).to(tl.int32) - above
                need -= above
                prefix = prefix | (b_star.to(tl.uint32) << shift)
                known = known | (tl.full([], 0xFF, tl.uint32) << shift)
                go = in_bin != need   # the whole bin is taken: the lower bytes need no resolving
