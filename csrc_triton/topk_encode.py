"""Fused TopK encoder kernel: encoder GEMM + bias + ReLU + decoder-norm weighting + selection.

The launcher in ``sae_kernels/triton_ops.py`` uses it for k <= 64 when the pre-activations would not
fit the memory budget of the two-pass encode (``csrc_triton/topk_select.py``), and the device check
(``benchmarks/gpu_check.py``) times it against the two-pass path.

Two stages, exact: ``_encode_topk_candidates_kernel`` runs the GEMM for one token tile and one chunk
of latents, and keeps a running per-row top-K' (K' = next power of two >= k) of (score, value,
latent) in registers, so the N x n pre-activations never reach memory. It writes
``[N, n_chunks, K']`` candidates; ``_select_candidates_kernel`` then selects the exact top-k over
the candidates. Exact because every member of the global top-k is in the top-k of its chunk.

Selection uses comparisons and reductions only (``tl.max(..., return_indices=True)`` / ``tl.argmin``
with masking), never ``tl.topk`` / ``tl.sort``: those take minutes under ``TRITON_INTERPRET=1``.
Semantics as in ``topk_select``: NaN pre-activations rank first and keep the value NaN; any float
score (negative norms, -inf) is ranked below NaN/inf and above the empty-slot marker, so the
selected ids are always real latents.
"""

import triton
import triton.language as tl


@triton.jit
def _encode_tile(
    x_ptr, x_row_stride,              # [n_tokens, d_model] encoder input
    w_ptr, w_row_stride,              # [d_sae, d_model] encoder weight, latent-major
    b_ptr, norm_ptr,                  # [d_sae] encoder bias, [d_sae] decoder row norms (or dummy)
    rows, cols, row_mask, col_mask,   # [BLOCK_M] int64 token ids, [BLOCK_N] int64 latent ids
    d_model,
    HAS_NORM: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of z = relu(x W^T + b) and score = z * norm (-inf off the matrix)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * x_row_stride + offs_k[None, :]        # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + cols[None, :] * w_row_stride + offs_k[:, None]        # [BLOCK_K, BLOCK_N] = W^T tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d_model, BLOCK_K):
        k_mask = (k0 + offs_k) < d_model
        a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if CAST_FP32:
            # The interpreter's tl.dot returns garbage on bf16 operands (triton 3.9); mixed input
            # dtypes are also handled here. On GPU with bf16/fp16 inputs this branch is compiled out.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            # fp32 inputs: exact fp32 products (the default would be tf32 on tensor cores).
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    h = acc + bias[None, :]
    z = tl.where((h > 0.0) | (h != h), h, 0.0)   # ReLU keeping NaN (tl.maximum drops it)
    if HAS_NORM:
        norm = tl.load(norm_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        score = z * norm[None, :]
    else:
        score = z
    # NaN ranks first (as in torch.topk), and every real score sits strictly above the -inf that
    # marks empty slots and columns past d_sae (a -inf score, from a -inf or negative overflowing
    # norm, becomes -FLT_MAX): rows get k distinct in-range latents whatever the inputs.
    score = tl.where(score != score, float("inf"), score)
    score = tl.maximum(score, -3.4028234663852886e38)
    score = tl.where(row_mask[:, None] & col_mask[None, :], score, float("-inf"))
    return z, score


@triton.jit
def _encode_topk_candidates_kernel(
    x_ptr, x_row_stride,              # [n_tokens, d_model]
    w_ptr, w_row_stride,              # [d_sae, d_model] latent-major
    b_ptr, norm_ptr,                  # [d_sae], [d_sae] (norm only read when HAS_NORM)
    cand_s_ptr, cand_v_ptr, cand_i_ptr,  # [n_tokens, n_chunks, KP] fp32 score, fp32 value, int32 latent
    n_tokens, d_model, d_sae,
    n_chunks, tiles_per_chunk,
    HAS_NORM: tl.constexpr, CAST_FP32: tl.constexpr, IEEE: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)   # token tile; n_tokens * d_sae overflows int32 at 16k x 131k
    chunk = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < n_tokens
    offs_n = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, KP)

    # Running top-KP per row; -inf marks an empty slot (scores of real latents are >= 0).
    best_s = tl.full([BLOCK_M, KP], float("-inf"), tl.float32)
    best_v = tl.zeros([BLOCK_M, KP], dtype=tl.float32)
    best_i = tl.full([BLOCK_M, KP], -1, tl.int32)

    n_tiles = tl.cdiv(d_sae, BLOCK_N)
    tile_lo = chunk * tiles_per_chunk
    tile_hi = tl.minimum(tile_lo + tiles_per_chunk, n_tiles)
    first = tile_lo
    if KP == BLOCK_N:
        # The chunk's first tile fills the empty list exactly (K' = 64 = BLOCK_N, i.e. k in 33..64):
        # skips up to K' merge steps per chunk. Columns past d_sae carry -inf and are never selected.
        n0 = tile_lo * BLOCK_N
        cols = n0.to(tl.int64) + offs_n.to(tl.int64)
        best_v, best_s = _encode_tile(
            x_ptr, x_row_stride, w_ptr, w_row_stride, b_ptr, norm_ptr,
            rows, cols, row_mask, cols < d_sae, d_model,
            HAS_NORM, CAST_FP32, IEEE, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        best_i = tl.broadcast_to((n0 + offs_n)[None, :], [BLOCK_M, KP]).to(tl.int32)
        first = tile_lo + 1
    for tile in range(first, tile_hi):
        n0 = tile * BLOCK_N
        cols = n0.to(tl.int64) + offs_n.to(tl.int64)
        col_mask = cols < d_sae
        z, s = _encode_tile(
            x_ptr, x_row_stride, w_ptr, w_row_stride, b_ptr, norm_ptr,
            rows, cols, row_mask, col_mask, d_model,
            HAS_NORM, CAST_FP32, IEEE, BLOCK_M, BLOCK_N, BLOCK_K,
        )
        # Merge the tile into the running top-KP: repeatedly move each row's best tile entry into
        # that row's worst slot while it beats it. The first test is the cheap rejection: once the
        # running lists are full, most tiles have no entry above any row's KP-th best and cost one
        # max + one min reduction. Terminates: every accepted step removes a finite entry from s.
        # Ties go to the smaller latent id: a tile entry must beat the worst slot strictly (the
        # slots hold latents of earlier tiles, so smaller ids), the tile's max is its leftmost
        # (smallest id), and of the slots tied for worst the one with the largest id is replaced.
        m, am = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        thr = tl.min(best_s, axis=1)
        n_accept = tl.sum((m > thr).to(tl.int32), axis=0)
        while n_accept > 0:
            accept = m > thr
            slot = tl.argmax(tl.where(best_s == thr[:, None], best_i, -2), axis=1)
            hit = offs_n[None, :] == am[:, None]                       # [BLOCK_M, BLOCK_N] one-hot
            v_new = tl.sum(tl.where(hit, z, 0.0), axis=1)
            put = (slots[None, :] == slot[:, None]) & accept[:, None]  # [BLOCK_M, KP] one-hot
            best_s = tl.where(put, m[:, None], best_s)
            best_v = tl.where(put, v_new[:, None], best_v)
            best_i = tl.where(put, (n0 + am)[:, None].to(tl.int32), best_i)
            # Rows that did not accept lose nothing: their tile max is already <= their threshold.
            s = tl.where(hit, float("-inf"), s)
            m, am = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
            thr = tl.min(best_s, axis=1)
            n_accept = tl.sum((m > thr).to(tl.int32), axis=0)

    out = (rows[:, None] * n_chunks + chunk) * KP + slots[None, :]
    tl.store(cand_s_ptr + out, best_s, mask=row_mask[:, None])
    tl.store(cand_v_ptr + out, best_v, mask=row_mask[:, None])
    tl.store(cand_i_ptr + out, best_i, mask=row_mask[:, None])


@triton.jit
def _select_candidates_kernel(
    cand_s_ptr, cand_v_ptr, cand_i_ptr,   # [n_tokens, width] fp32 score, fp32 value, int32 latent
    val_ptr, idx_ptr,                     # [n_tokens, K] selected values (x dtype), int64 latents
    n_tokens, width, K,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Exact top-K over each row's candidates by K rounds of max extraction (sorted, descending;
    of equal scores the smaller latent id first: candidate slots are not in latent order).
    At least K candidates per row are real latents with a score above -inf (see _encode_tile)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < n_tokens
    cols = tl.arange(0, BLOCK_W)
    base = rows * width
    in_row = row_mask[:, None] & (cols[None, :] < width)
    s = tl.load(cand_s_ptr + base[:, None] + cols[None, :], mask=in_row, other=float("-inf"))
    # empty slots (id -1) and padding rank after every latent of an equal score
    ids = tl.load(cand_i_ptr + base[:, None] + cols[None, :], mask=in_row, other=-1)
    ids = tl.where(ids < 0, 2147483647, ids)
    for j in range(0, K):
        best = tl.max(s, axis=1)
        pos = tl.argmin(tl.where(s == best[:, None], ids, 2147483647), axis=1)
        v = tl.load(cand_v_ptr + base + pos, mask=row_mask, other=0.0)
        i = tl.load(cand_i_ptr + base + pos, mask=row_mask, other=0)
        tl.store(val_ptr + rows * K + j, v.to(val_ptr.dtype.element_ty), mask=row_mask)
        tl.store(idx_ptr + rows * K + j, i.to(tl.int64), mask=row_mask)
        s = tl.where(cols[None, :] == pos[:, None], float("-inf"), s)
