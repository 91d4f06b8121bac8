"""Exact weighted TopK over materialised pre-activations: the second pass of the two-pass encode.

The first pass is a plain GEMM (cuBLAS ``addmm``) that writes the pre-activations ``h = x W^T + b``
([N, d_sae], in the weights' dtype, bf16 in training). ``_row_topk_kernel`` then reads each row and
fuses what is left: an optional extra bias (AuxK's dead-latent mask), ReLU, the decoder-norm
weighting and an exact top-k, writing the k kept values ``relu(h)`` and their latent ids.

Semantics (the same as the PyTorch path in ``sae_kernels.reference``):
* the kept value is ``relu(h)``; the fp32 score ``relu(h) * norm`` only ranks (``norm`` may be absent,
  or any float: zero, negative, infinite);
* ties go to the smaller latent id (+0.0 and -0.0 tie); outputs of a row are in increasing latent id;
* NaN: a latent whose pre-activation (or score) is NaN ranks above every number (+inf included) and
  keeps the value NaN; NaNs tie among themselves; a NaN input row yields k NaN values at in-range,
  distinct latents;
* any float score is ranked correctly (negative norms, -inf): indices are always in [0, d_sae).

Ranking is by an order-preserving uint32 key of the fp32 score, ``min(((bits & 0x7fffffff) ^ m) - m
+ 0x7f800000, 0xff000001)`` with ``m`` the sign (arithmetic shift): -0.0 gets +0.0's key, -inf 0,
+inf 0xff000000 and every NaN 0xff000001. A persistent grid (about two programs per SM) takes rows in
turn; per row, in the common case:

1. H0 (a read of the first quarter of the row; of all of it for rows up to 4 blocks): a 2048-bin
   histogram of the keys' top 11 bits (sign, exponent and two mantissa bits: quarter-octave bins).
   Its threshold ``thr`` is the bin holding the K_SAMPLE-th largest key of the sample (k scaled to the
   sample plus 3 standard deviations, from the launcher; k itself when the sample is the row).
2. Z, only when the histogram is exact (the sample is the row) and its K-th key is in the bin of
   +0.0 (dense rows: AuxK's k_aux of mostly dead latents, the K-th entry among the zeros): the bin is
   guessed to hold zeros only (it also holds the positive scores below 2^-126), and W (below) writes
   the winners straight from the row with the K-th key +0.0's: the ``above`` entries above the bin, and
   the first K - above zeros by latent id. W counts the entries above +0.0 on the way: if they are
   ``above``, the row is done (no candidates, no S); else the way below rewrites every output (W writes
   no position from K up).
3. Collect the candidates, the entries with key >= thr, in latent order, as (score bits, latent id)
   records into the program's scratch, by one unordered float compare ``!(score < f_t)`` (f_t the
   smallest float of key >= thr; NaN passes), one of two ways:
   * sparse (the sample's candidates under an eighth of it): C (a read of the row, from L2 for the part
     H0 read): a bitmap of the candidates, a bit per entry; no keys, no cumsum over the row. X: each
     thread walks the set bits of its bitmap words, lowest first (a round per bit of the fullest word;
     positions from the words' popcounts);
   * dense: D, a read of the row, the candidates of each block compacted by a prefix sum of their flags
     (one round per block however full); D also counts the candidates whose key is thr itself.
4. If at least k and at most CAP candidates were collected, the top k of the row are the top k of the
   candidates (every entry left out has a key below thr, and k entries have one at or above it, ties
   included, so the sample only decides the cost, never the result). If fewer than k of them are above
   thr (D's count), the K-th key is thr itself; else S: radix passes over the candidates only, 11 bits a
   pass, over a window from thr to the largest candidate key and then the k-th key's bin (typically 1-2
   passes). SW: the winners, in latent order (those above the k-th key's bin, and in it the first
   ``need`` by latent id, positions from one prefix sum of both flags), their values relu(h) read again
   from the row.

Otherwise (the sample misjudged the row, heavy ties, k near d_sae): H0 over the rest of the row makes
the histogram exact; while the candidates do not fit the scratch, H1 and H2 (digits 20..10 and 9..0)
refine the k-th key over the row; then the collect with the exact threshold, or, if they still do not
fit, W: the winners straight from the row (one prefix sum of both flags a block, stores column by
column).

Every loop over the row takes its full blocks unmasked and its last partial block as a masked tail.
Rows whose stride is not a multiple of 16 elements are copied to an aligned stride by the launcher on a
GPU (``sae_kernels.triton_ops._SELECT_ROW_ALIGN``).

``MARK`` (compile-time, False in use) brackets the code regions with ``pmevent`` markers so that
``benchmarks/sm90_report.py`` can attribute the SASS instructions of a typical row (REGIONS);
``python benchmarks/sm90_report.py --sass`` prints the count per pass and the implied time.
"""

import triton
import triton.language as tl

NUM_BINS = 2048
# Marker events (``pmevent n`` -> SASS ``PMTRIG 1 << n``) of the regions the SASS counter tells apart:
# code runs once per row in HOT (loops aside), never in a typical row in COLD (the fallbacks), in TAIL
# once per row whose pass ends in a partial block (the masked tails: d_sae or the sample not a multiple
# of BLOCK; C.tail, D.tail and W.tail likewise, in the rows that run C, D or W), in S pass p only while the K-th key is unresolved, in D in the rows collected by D (dense
# rows), in CX in the others (C and X), in Z in the rows of an exact histogram whose K-th key is in +0.0's
# bin, in REST in the rows that Z did not settle.
REGIONS = {1: "hot", 2: "cold", 3: "tail", 4: "S0", 5: "S1", 6: "S2", 7: "D", 8: "CX", 9: "Z", 10: "rest",
           11: "C.tail", 12: "D.tail", 13: "W.tail"}
# The loops of a typical row, in the order of the SASS (innermost loops, cold regions excluded):
# (name, region, what one iteration covers). benchmarks/sm90_report.py checks the order by content.
HOT_LOOPS = (
    ("H0", "hot", "BLOCK entries of the sample"),
    ("H0.tail", "tail", "the sample's last partial block"),
    ("W", "Z", "BLOCK entries of the row"),
    ("W.tail", "W.tail", "the row's last partial block"),
    ("C", "CX", "BLOCK entries of the row"),
    ("C.tail", "C.tail", "the row's last partial block"),
    ("X.round", "CX", "WB bitmap words, one set bit each"),
    ("D", "D", "BLOCK entries of the row"),
    ("D.tail", "D.tail", "the row's last partial block"),
    ("S0", "S0", "SB candidates"),
    ("S1", "S1", "SB candidates"),
    ("S2", "S2", "SB candidates"),
    ("SW", "rest", "SB candidates"),
)


@triton.jit
def _mark(MARK: tl.constexpr, ASM: tl.constexpr):
    if MARK:
        tl.inline_asm_elementwise(ASM, "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _scores(pre_row, b_ptr, norm_ptr, cols, mask, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
            MASKED: tl.constexpr):
    """z = relu(h) (NaN kept, -0.0 -> +0.0) and the fp32 score s = z * norm at the latents ``cols``."""
    if MASKED:
        h = tl.load(pre_row + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.load(pre_row + cols).to(tl.float32)
    if HAS_BIAS:
        if MASKED:
            h += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            h += tl.load(b_ptr + cols).to(tl.float32)
    z = tl.where(h <= 0.0, 0.0, h)  # NaN <= 0 is False: NaN stays (tl.maximum(h, 0) would give 0)
    s = z
    if HAS_NORM:
        if MASKED:
            s = z * tl.load(norm_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            s = z * tl.load(norm_ptr + cols).to(tl.float32)
    return z, s


@triton.jit
def _key_raw(s):
    """The key of fp32 scores before NaN canonicalisation: monotone in the score over the numbers
    (+0.0 and -0.0 alike, -inf -> 0, +inf -> 0xff000000); a NaN maps above +inf (0xff000001 up)."""
    i = s.to(tl.int32, bitcast=True)
    m = i >> 31                                      # 0, or -1 for a set sign bit
    t = ((i & 0x7FFFFFFF) ^ m) - m                   # sign-magnitude -> two's complement (-0 -> 0)
    return t.to(tl.uint32, bitcast=True) + 0x7F800000


@triton.jit
def _key(s):
    """Order-preserving uint32 key of fp32 scores; every NaN -> 0xff000001, above +inf."""
    return tl.minimum(_key_raw(s), 0xFF000001)


@triton.jit
def _key_floor(prefix):
    """The smallest fp32 whose key is >= ``prefix`` (a uint32 scalar <= 0xff000000, the key of +inf):
    -inf for 0, +0.0 for the key of zero, +inf for 0xff000000."""
    k = prefix + 0x00800000
    pos = k - 0x80000000
    neg = (0x80000000 - k) | 0x80000000
    bits = tl.where(k >= 0x80000000, pos, neg)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nanmax(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _bin(d):
    """The histogram slot of digit d (< 2048): bins 8t..8t+7 land in one thread's registers (tl.histogram
    spreads slot q over thread q % 256, register q // 256, at 8 warps), so that ``_choose`` scans them
    in-thread."""
    return ((d & 7) << 8) | (d >> 3)


@triton.jit
def _choose(hist, need, NB: tl.constexpr):
    """Of a histogram with ``_bin`` slots: the bin b holding the need-th largest entry, the number of
    entries in the bins above b, and in b (one scan over the threads' totals, two reductions)."""
    h = tl.reshape(hist, [8, NB // 8])                         # [r, t]: bin 8t + r
    bins = tl.arange(0, NB // 8)[None, :] * 8 + tl.arange(0, 8)[:, None]
    ge_t = tl.cumsum(tl.sum(h, axis=0), axis=0, reverse=True)  # entries in bins >= 8t
    ge = ge_t[None, :] - tl.cumsum(h, axis=0) + h              # entries in bins >= 8t + r: non-increasing
    hit = ge >= need                                           # bins 0..b
    bg = tl.max(tl.max(tl.where(hit, (bins.to(tl.int64) << 32) | ge.to(tl.int64), -1), axis=0), axis=0)
    above = tl.max(tl.max(tl.where(hit, 0, ge), axis=0), axis=0)   # ge[b + 1]
    return (bg >> 32).to(tl.int32), above, (bg & 0xFFFFFFFF).to(tl.int32) - above


@triton.jit
def _split8(x, G: tl.constexpr):
    """The 8 columns of a [G, 8] tensor whose rows lie in one thread each (no data movement)."""
    a0, a1 = tl.split(tl.reshape(x, [G, 4, 2]))      # column 2q + r -> a_r[:, q]
    a00, a01 = tl.split(tl.reshape(a0, [G, 2, 2]))   # q = 2u + v -> a_rv[:, u]
    a10, a11 = tl.split(tl.reshape(a1, [G, 2, 2]))
    x0, x4 = tl.split(a00)
    x2, x6 = tl.split(a01)
    x1, x5 = tl.split(a10)
    x3, x7 = tl.split(a11)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _popc(x):
    """Bits set in each int32 (the SWAR form, which LLVM turns into one POPC)."""
    v = x.to(tl.uint32, bitcast=True)
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _store_winners(val_ptr, idx_ptr, out_row, pos, z, ids, G: tl.constexpr):
    """values[pos] = z, indices[pos] = ids for pos >= 0, of [G, 8] tensors whose rows lie in one
    thread each: column by column, so that the scattered stores keep the tensors' layout."""
    p0, p1, p2, p3, p4, p5, p6, p7 = _split8(pos, G)
    z0, z1, z2, z3, z4, z5, z6, z7 = _split8(z.to(val_ptr.dtype.element_ty), G)
    i0, i1, i2, i3, i4, i5, i6, i7 = _split8(ids.to(tl.int64), G)
    tl.store(val_ptr + out_row + p0, z0, mask=p0 >= 0)
    tl.store(idx_ptr + out_row + p0, i0, mask=p0 >= 0)
    tl.store(val_ptr + out_row + p1, z1, mask=p1 >= 0)
    tl.store(idx_ptr + out_row + p1, i1, mask=p1 >= 0)
    tl.store(val_ptr + out_row + p2, z2, mask=p2 >= 0)
    tl.store(idx_ptr + out_row + p2, i2, mask=p2 >= 0)
    tl.store(val_ptr + out_row + p3, z3, mask=p3 >= 0)
    tl.store(idx_ptr + out_row + p3, i3, mask=p3 >= 0)
    tl.store(val_ptr + out_row + p4, z4, mask=p4 >= 0)
    tl.store(idx_ptr + out_row + p4, i4, mask=p4 >= 0)
    tl.store(val_ptr + out_row + p5, z5, mask=p5 >= 0)
    tl.store(idx_ptr + out_row + p5, i5, mask=p5 >= 0)
    tl.store(val_ptr + out_row + p6, z6, mask=p6 >= 0)
    tl.store(idx_ptr + out_row + p6, i6, mask=p6 >= 0)
    tl.store(val_ptr + out_row + p7, z7, mask=p7 >= 0)
    tl.store(idx_ptr + out_row + p7, i7, mask=p7 >= 0)


@triton.jit
def _hist_row(hist, pre_row, b_ptr, norm_ptr, c_start, c_end, known, prefix, SHIFT: tl.constexpr,
              DMASK: tl.constexpr, FILTER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr,
              BLOCK: tl.constexpr, NB: tl.constexpr, MARK: tl.constexpr):
    """``hist`` plus the histogram of one key digit of the row's entries [c_start, c_end) that match
    ``prefix`` under ``known`` (FILTER; else all of them, digit 0)."""
    offs = tl.arange(0, BLOCK)
    n_full = c_start + (c_end - c_start) // BLOCK * BLOCK
    for c0 in range(c_start, n_full, BLOCK):
        z, s = _scores(pre_row, b_ptr, norm_ptr, c0 + offs, None, HAS_BIAS, HAS_NORM, False)
        key = _key(s)
        if FILTER:
            hist += tl.histogram(_bin(((key >> SHIFT) & DMASK).to(tl.int32)), NB, mask=(key & known) == prefix)
        else:
            hist += tl.histogram(_bin((key >> 21).to(tl.int32)), NB)
    # the masked tail, as a loop of at most one step (so that nothing of it is hoisted out of the row
    # loop to stay live, in registers or spilled, across the whole kernel)
    _mark(MARK, "pmevent 3;\n\tmov.b32 $0, 0;")
    for c0 in range(n_full, c_end, BLOCK):
        cols = c0 + offs
        z, s = _scores(pre_row, b_ptr, norm_ptr, cols, cols < c_end, HAS_BIAS, HAS_NORM, True)
        key = _key(s)
        if FILTER:
            hist += tl.histogram(_bin(((key >> SHIFT) & DMASK).to(tl.int32)), NB,
                                 mask=(cols < c_end) & ((key & known) == prefix))
        else:
            hist += tl.histogram(_bin((key >> 21).to(tl.int32)), NB, mask=cols < c_end)
    _mark(MARK, "pmevent 1;\n\tmov.b32 $0, 0;")
    return hist


@triton.jit
def _write_block(val_ptr, idx_ptr, out_row, z, s, cols, cm, prefix, known, need, K, taken, ties, n_gt,
                 G: tl.constexpr, MASKED: tl.constexpr):
    """W, one block ([G, 8], rows in one thread each, valid where ``cm`` if MASKED): the entries whose
    masked key is above ``prefix`` win, and of those equal to it the first ``need`` of the row (``ties``
    of them seen before); positions from one prefix sum of both flags (above: high half, equal: low
    half, each < 2^16 a block). Positions from K up are not written (a guess that failed, redone)."""
    mk = _key(s) & known
    if MASKED:
        gt = (cm & (mk > prefix)).to(tl.int32)
        eq = (cm & (mk == prefix)).to(tl.int32)
    else:
        gt = (mk > prefix).to(tl.int32)
        eq = (mk == prefix).to(tl.int32)
    pk = (gt << 16) | eq
    pk_tot = tl.sum(pk, axis=1)
    pk_ex = (tl.cumsum(pk_tot, axis=0) - pk_tot)[:, None] + tl.cumsum(pk, axis=1) - pk
    e_ex = pk_ex & 0xFFFF
    room = tl.maximum(need - ties, 0)
    pos = taken + (pk_ex >> 16) + tl.minimum(e_ex, room)
    sel = ((gt != 0) | ((eq != 0) & (e_ex < room))) & (pos < K)
    _store_winners(val_ptr, idx_ptr, out_row, tl.where(sel, pos, -1), z, cols, G)
    tot = tl.sum(pk_tot, axis=0)
    return taken + (tot >> 16) + tl.minimum(tot & 0xFFFF, room), ties + (tot & 0xFFFF), n_gt + (tot >> 16)


@triton.jit
def _write_row(pre_row, b_ptr, norm_ptr, val_ptr, idx_ptr, out_row, d_sae, prefix, known, need, K,
               HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK: tl.constexpr, MARK: tl.constexpr,
               EVENT: tl.constexpr):
    """W: the winners straight from the row (``_write_block`` per block, then the masked tail); returns
    the number of entries above ``prefix``."""
    G: tl.constexpr = BLOCK // 8
    g8 = tl.arange(0, G)[:, None] * 8 + tl.arange(0, 8)[None, :]
    n_full = d_sae - d_sae % BLOCK
    taken = tl.zeros([], dtype=tl.int32)
    ties = tl.zeros([], dtype=tl.int32)
    n_gt = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, n_full, BLOCK):
        cols = c0 + g8
        z, s = _scores(pre_row, b_ptr, norm_ptr, cols, None, HAS_BIAS, HAS_NORM, False)
        taken, ties, n_gt = _write_block(val_ptr, idx_ptr, out_row, z, s, cols, None, prefix, known, need, K,
                                         taken, ties, n_gt, G, False)
    _mark(MARK, "pmevent 13;\n\tmov.b32 $0, 0;")
    for c0 in range(n_full, d_sae, BLOCK):   # the masked tail (at most one step; see _hist_row)
        cols = c0 + g8
        cm = cols < d_sae
        z, s = _scores(pre_row, b_ptr, norm_ptr, cols, cm, HAS_BIAS, HAS_NORM, True)
        taken, ties, n_gt = _write_block(val_ptr, idx_ptr, out_row, z, s, cols, cm, prefix, known, need, K,
                                         taken, ties, n_gt, G, True)
    _mark(MARK, EVENT)
    return n_gt


@triton.jit
def _compact(rec, s, cols, cm, f_t, n_c, n_eq, top_v, CAP):
    """D, one block: the entries of ``s`` ([G, 8], rows in one thread each, latents ``cols``, valid
    where ``cm``) with key >= key(f_t), appended in latent order to ``rec`` from position n_c by a
    block prefix sum; n_c and n_eq (the entries of key == key(f_t)) counted, top_v ([G]) their running
    max (NaN first)."""
    flag = (cm & ~(s < f_t)).to(tl.int32)
    eq = (cm & (s == f_t)).to(tl.int32)                  # -0.0 == +0.0; NaN never
    tot = tl.sum(flag, axis=1)
    pos = n_c + (tl.cumsum(tot, axis=0) - tot)[:, None] + tl.cumsum(flag, axis=1) - 1
    r = (s.to(tl.int32, bitcast=True).to(tl.int64) << 32) | cols.to(tl.int64)
    tl.store(rec + pos, r, mask=(flag != 0) & (pos < CAP))
    top_v = _nanmax(top_v, tl.reduce(tl.where(flag != 0, s, float("-inf")), 1, _nanmax))
    # both counts in one reduction (each below 2^31): candidates in the high word
    both = tl.sum((tot.to(tl.int64) << 32) | tl.sum(eq, axis=1).to(tl.int64), axis=0)
    return n_c + (both >> 32).to(tl.int32), n_eq + (both & 0xFFFFFFFF).to(tl.int32), top_v


@triton.jit
def _collect(pre_row, b_ptr, norm_ptr, wrd, rec, thr, d_sae, CAP, dense, HAS_BIAS: tl.constexpr,
             HAS_NORM: tl.constexpr, BLOCK: tl.constexpr, MARK: tl.constexpr):
    """The entries of key >= thr (<= the key of +inf), in latent order, as (score bits << 32 | latent
    id) into ``rec`` (the first CAP of them); returns their number, largest key and the number of
    them whose key is thr itself (counted by D only; 0 after C and X). ``dense`` (a runtime flag: many
    candidates expected): D, one pass of block prefix sums; else C and X, a bitmap and its set bits."""
    G: tl.constexpr = BLOCK // 8     # groups of 8 latents per row block (one thread each)
    WB: tl.constexpr = BLOCK // 2    # bitmap words per step of X
    j8 = tl.arange(0, 8)
    g8 = tl.arange(0, G)[:, None] * 8 + j8[None, :]   # [G, 8]: block offsets in row order
    n_words = (d_sae + 31) // 32     # bit i of word w: latent 32 w + i
    n_full = d_sae - d_sae % BLOCK   # the row in full blocks (no masks), then one masked tail
    f_t = _key_floor(thr)            # key(s) >= thr <=> !(s < f_t)
    n_c = tl.zeros([], dtype=tl.int32)
    n_eq = tl.zeros([], dtype=tl.int32)
    if dense:
        # ---- D: the candidates of each block compacted by a prefix sum of their flags
        _mark(MARK, "pmevent 7;\n\tmov.b32 $0, 0;")
        top_d = tl.full([G], float("-inf"), tl.float32)
        for c0 in range(0, n_full, BLOCK):
            cols = c0 + g8
            z, s = _scores(pre_row, b_ptr, norm_ptr, cols, None, HAS_BIAS, HAS_NORM, False)
            n_c, n_eq, top_d = _compact(rec, s, cols, cols >= 0, f_t, n_c, n_eq, top_d, CAP)
        _mark(MARK, "pmevent 12;\n\tmov.b32 $0, 0;")
        for c0 in range(n_full, d_sae, BLOCK):   # the masked tail (at most one step; see _hist_row)
            cols = c0 + g8
            z, s = _scores(pre_row, b_ptr, norm_ptr, cols, cols < d_sae, HAS_BIAS, HAS_NORM, True)
            n_c, n_eq, top_d = _compact(rec, s, cols, cols < d_sae, f_t, n_c, n_eq, top_d, CAP)
        _mark(MARK, "pmevent 7;\n\tmov.b32 $0, 0;")
        top = tl.max(_key(top_d), axis=0)

    else:
        # ---- C: the bitmap of the candidates: 8 bits per thread, 4 threads per word
        _mark(MARK, "pmevent 8;\n\tmov.b32 $0, 0;")
        for c0 in range(0, n_full, BLOCK):
            z, s = _scores(pre_row, b_ptr, norm_ptr, c0 + g8, None, HAS_BIAS, HAS_NORM, False)
            byte = tl.sum((~(s < f_t)).to(tl.int32) << j8[None, :], axis=1)
            w = tl.sum(tl.reshape(byte, [G // 4, 4]) << (8 * tl.arange(0, 4))[None, :], axis=1)
            tl.store(wrd + c0 // 32 + tl.arange(0, G // 4), w)
        _mark(MARK, "pmevent 11;\n\tmov.b32 $0, 0;")
        for c0 in range(n_full, d_sae, BLOCK):   # the masked tail (at most one step; see _hist_row)
            cols = c0 + g8
            z, s = _scores(pre_row, b_ptr, norm_ptr, cols, cols < d_sae, HAS_BIAS, HAS_NORM, True)
            byte = tl.sum(((cols < d_sae) & ~(s < f_t)).to(tl.int32) << j8[None, :], axis=1)
            w = tl.sum(tl.reshape(byte, [G // 4, 4]) << (8 * tl.arange(0, 4))[None, :], axis=1)
            wi = c0 // 32 + tl.arange(0, G // 4)
            tl.store(wrd + wi, w, mask=wi < n_words)
        _mark(MARK, "pmevent 8;\n\tmov.b32 $0, 0;")
        tl.debug_barrier()  # the bitmap is read by other threads below

        # ---- X: each thread walks its words' set bits, lowest first: a round per bit of the step's
        # fullest word; positions from the words' popcounts
        top_v = tl.full([WB], float("-inf"), tl.float32)   # the largest candidate score (NaN first), per lane
        for w0 in range(0, n_words, WB):
            wi = w0 + tl.arange(0, WB)
            w = tl.load(wrd + wi, mask=wi < n_words, other=0)
            cnt = _popc(w)
            pos = n_c + tl.cumsum(cnt, axis=0) - cnt
            for t in range(tl.max(cnt, axis=0)):
                has = w != 0
                lat = wi * 32 + _popc((w & -w) - 1)
                z, s = _scores(pre_row, b_ptr, norm_ptr, lat, has, HAS_BIAS, HAS_NORM, True)
                r = (s.to(tl.int32, bitcast=True).to(tl.int64) << 32) | lat.to(tl.int64)
                tl.store(rec + pos, r, mask=has & (pos < CAP))
                top_v = _nanmax(top_v, tl.where(has, s, float("-inf")))
                pos += 1
                w = w & (w - 1)
            n_c += tl.sum(cnt, axis=0)
        top = tl.max(_key(top_v), axis=0)
    _mark(MARK, "pmevent 10;\n\tmov.b32 $0, 0;")
    tl.debug_barrier()  # the candidates are read by other threads after
    return n_c, top, n_eq


@triton.jit
def _row_topk_kernel(
    pre_ptr, pre_row_stride,          # [n_rows, d_sae] pre-activations (bias already added unless HAS_BIAS)
    b_ptr, norm_ptr,                  # [d_sae] extra bias (read when HAS_BIAS), [d_sae] weights (HAS_NORM)
    val_ptr, idx_ptr,                 # [n_rows, K] kept values (val dtype), int64 latent ids, contiguous
    wrd_ptr,                          # [programs, cdiv(d_sae, 32)] int32: a row's candidate bitmap
    rec_ptr,                          # [programs, CAP] int64: its candidates (score bits << 32 | latent id)
    n_rows, d_sae, K, CAP,
    N_SAMPLE, K_SAMPLE,               # H0 reads the first N_SAMPLE entries, aiming at K_SAMPLE of them
    HAS_BIAS: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK: tl.constexpr, SMALL_K: tl.constexpr,
    MARK: tl.constexpr = False,
):
    NB: tl.constexpr = 2048          # NUM_BINS
    DENSE_DIV: tl.constexpr = 8      # D collects when candidates are expected at 1 / DENSE_DIV or more
    G: tl.constexpr = BLOCK // 8
    SB: tl.constexpr = 256 if SMALL_K else 2048   # candidates per step of S and SW
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    bins = tl.arange(0, NB)
    j8 = tl.arange(0, 8)
    n_words = (d_sae + 31) // 32
    wrd = wrd_ptr + pid.to(tl.int64) * n_words
    rec = rec_ptr + pid.to(tl.int64) * CAP

    for row in range(pid, n_rows, nprog):
        _mark(MARK, "pmevent 1;\n\tmov.b32 $0, 0;")
        row_l = tl.cast(row, tl.int64)  # n_rows * d_sae overflows int32 at 16k x 131k
        pre_row = pre_ptr + row_l * pre_row_stride
        out_row = row_l * K

        # ---- H0: the keys' top 11 bits over the sample
        hist = _hist_row(tl.zeros([NB], dtype=tl.int32), pre_row, b_ptr, norm_ptr, 0, N_SAMPLE, 0, 0, 21, 0x7FF,
                         False, HAS_BIAS, HAS_NORM, BLOCK, NB, MARK)
        b, above, in_bin = _choose(hist, K_SAMPLE, NB)
        thr = b.to(tl.uint32) << 21
        # The exact selection over the row (the fallback): `prefix` holds the known bits (under `known`)
        # of the K-th key; the entries whose masked key is above it win (K - need of them); `n_cand`
        # entries have a masked key >= prefix; `more`: some of those equal to it lose.
        prefix = thr
        known = tl.full([], 0xFFE00000, tl.uint32)
        need = K - above
        n_cand = above + in_bin
        more = in_bin != need
        exact = N_SAMPLE == d_sae
        # ---- Z: an exact histogram whose K-th key is in the bin of +0.0 (the dense rows of AuxK, k_aux of
        # mostly dead latents: the K-th entry among the zeros): guess the bin holds zeros only, W straight
        # from the row with the K-th key +0.0's (`above` entries above it win, and the first K - above
        # zeros); right iff W met no other entry above +0.0 (a positive score below 2^-126 shares the
        # bin), else the way below rewrites every output
        zdone = N_SAMPLE < 0
        if exact & (b == 0x3FC):
            _mark(MARK, "pmevent 9;\n\tmov.b32 $0, 0;")
            n_gt = _write_row(pre_row, b_ptr, norm_ptr, val_ptr, idx_ptr, out_row, d_sae,
                              tl.full([], 0x7F800000, tl.uint32), tl.full([], 0xFFFFFFFF, tl.uint32), K - above, K, HAS_BIAS, HAS_NORM, BLOCK, MARK,
                              "pmevent 9;\n\tmov.b32 $0, 0;")
            zdone = n_gt == above
            _mark(MARK, "pmevent 1;\n\tmov.b32 $0, 0;")
        if ~zdone:
            _mark(MARK, "pmevent 10;\n\tmov.b32 $0, 0;")
            n_c = tl.zeros([], dtype=tl.int32)
            n_eq = tl.zeros([], dtype=tl.int32)
            top = tl.zeros([], dtype=tl.uint32)
            if (~exact) | (n_cand <= CAP):
                # D when the sample's candidates are at least an eighth of it, else C and X
                n_c, top, n_eq = _collect(pre_row, b_ptr, norm_ptr, wrd, rec, thr, d_sae, CAP,
                                          n_cand * DENSE_DIV >= N_SAMPLE, HAS_BIAS, HAS_NORM, BLOCK, MARK)
            ok = (n_c >= K) & (n_c <= CAP)
            if ~ok:
                # ---- the exact way: H0 over the rest of the row, H1 and H2 over the row while the
                # candidates do not fit the scratch, then C and X again (or W below)
                _mark(MARK, "pmevent 2;\n\tmov.b32 $0, 0;")
                if N_SAMPLE < d_sae:
                    hist = _hist_row(hist, pre_row, b_ptr, norm_ptr, N_SAMPLE, d_sae, 0, 0, 21, 0x7FF, False,
                                     HAS_BIAS, HAS_NORM, BLOCK, NB, False)
                    b, above, in_bin = _choose(hist, K, NB)
                    prefix = b.to(tl.uint32) << 21
                    need = K - above
                    n_cand = above + in_bin
                    more = in_bin != need
                n_top = tl.sum(tl.where(bins == 255, hist, 0), axis=0)   # bin 0x7f8 (slot 255): +inf, NaN
                for p in tl.static_range(1, 3):
                    SHIFT = 10 * (2 - p)             # digit 1: key bits 20..10, digit 2: bits 9..0
                    DMASK = 0x3FF | ((2 - p) << 10)
                    if more & (n_cand > CAP):
                        hist = _hist_row(tl.zeros([NB], dtype=tl.int32), pre_row, b_ptr, norm_ptr, 0, d_sae,
                                         known, prefix, SHIFT, DMASK, True, HAS_BIAS, HAS_NORM, BLOCK, NB, False)
                        b, above, in_bin = _choose(hist, need, NB)
                        need -= above
                        prefix = prefix | (b.to(tl.uint32) << SHIFT)
                        known = known | (tl.full([], DMASK, tl.uint32) << SHIFT)
                        n_cand = K - need + in_bin
                        more = in_bin != need
                # a NaN K-th key known to the last bit: collect from +inf up (the +inf entries lose in SW)
                n_cand = tl.where(prefix > 0xFF000000, n_top, n_cand)
                thr = tl.minimum(prefix, 0xFF000000)
                if n_cand <= CAP:
                    _mark(MARK, "pmevent 2;\n\tmov.b32 $0, 0;")   # (again: the block may be laid out apart)
                    n_c, top, n_eq = _collect(pre_row, b_ptr, norm_ptr, wrd, rec, thr, d_sae, CAP,
                                              n_cand * DENSE_DIV >= d_sae, HAS_BIAS, HAS_NORM, BLOCK, False)
                    ok = n_c <= CAP   # always
                _mark(MARK, "pmevent 10;\n\tmov.b32 $0, 0;")

            if ok:
                # ---- S: the K-th key among the candidates (all of key >= thr): radix passes of 11 bits over
                # a window [lo, lo + width): first from thr to the largest candidate key, then the K-th
                # key's bin
                lo = thr
                span = (top - lo).to(tl.float32)   # its exponent + 1 >= the bit length of the span
                sh = tl.maximum((span.to(tl.int32, bitcast=True) >> 23) - 126 - 11, 0).to(tl.uint32)
                # fewer than K candidates above thr (D counted those at thr: n_eq): the K-th key is thr
                # itself, no S pass (the dense rows whose K-th entry is among the zeros)
                flat = n_c - n_eq < K
                width = tl.where(flat, 1, tl.full([], 0xFFFFFFFF, tl.uint32))   # keys k in the window: k - lo < width
                need = tl.where(flat, K - (n_c - n_eq), K)
                more = (K > 0) & ~flat
                for p in tl.static_range(3):
                    if more:
                        if p == 0:
                            _mark(MARK, "pmevent 4;\n\tmov.b32 $0, 0;")
                        elif p == 1:
                            _mark(MARK, "pmevent 5;\n\tmov.b32 $0, 0;")
                        else:
                            _mark(MARK, "pmevent 6;\n\tmov.b32 $0, 0;")
                        hist = tl.zeros([NB], dtype=tl.int32)
                        for j0 in range(0, n_c, SB):
                            j = j0 + tl.arange(0, SB)
                            r = tl.load(rec + j, mask=j < n_c, other=0)
                            d = _key((r >> 32).to(tl.int32).to(tl.float32, bitcast=True)) - lo
                            hist += tl.histogram(_bin((d >> sh).to(tl.int32)), NB, mask=(j < n_c) & (d < width))
                        b, above, in_bin = _choose(hist, need, NB)
                        need -= above
                        lo = lo + (b.to(tl.uint32) << sh)
                        width = tl.full([], 1, tl.uint32) << sh
                        more = (in_bin != need) & (sh > 0)
                        sh = tl.where(sh > 11, sh - 11, 0)
                        _mark(MARK, "pmevent 10;\n\tmov.b32 $0, 0;")
                hi = lo + width   # the K-th key is in [lo, hi): every candidate from hi up wins, and the first
                #                   `need` in it

                # ---- SW: the winners among the candidates (in latent order); values relu(h) read again
                taken = 0
                ties = 0
                if SMALL_K:
                    for j0 in range(0, n_c, SB):
                        j = j0 + tl.arange(0, SB)
                        valid = j < n_c
                        r = tl.load(rec + j, mask=valid, other=0)
                        ids = (r & 0xFFFFFFFF).to(tl.int32)
                        key = _key((r >> 32).to(tl.int32).to(tl.float32, bitcast=True))
                        eq = valid & (key >= lo) & (key < hi)
                        eq_rank = ties + tl.cumsum(eq.to(tl.int32), axis=0) - 1
                        sel = (valid & (key >= hi)) | (eq & (eq_rank < need))
                        pos = taken + tl.cumsum(sel.to(tl.int32), axis=0) - 1
                        z, s = _scores(pre_row, b_ptr, norm_ptr, ids, sel, HAS_BIAS, False, True)
                        tl.store(val_ptr + out_row + pos, z.to(val_ptr.dtype.element_ty), mask=sel)
                        tl.store(idx_ptr + out_row + pos, ids.to(tl.int64), mask=sel)
                        # both counts in one reduction (each below 2^31): sel in the high word
                        both = tl.sum((sel.to(tl.int64) << 32) | eq.to(tl.int64), axis=0)
                        taken += (both >> 32).to(tl.int32)
                        ties += (both & 0xFFFFFFFF).to(tl.int32)
                else:
                    GS: tl.constexpr = SB // 8
                    for j0 in range(0, n_c, SB):
                        j = j0 + tl.arange(0, GS)[:, None] * 8 + j8[None, :]
                        valid = j < n_c
                        r = tl.load(rec + j, mask=valid, other=0)
                        ids = (r & 0xFFFFFFFF).to(tl.int32)
                        key = _key((r >> 32).to(tl.int32).to(tl.float32, bitcast=True))
                        # one prefix sum of both flags (above the K-th key's window: high half; in it: low
                        # half; each < 2^16 a step): an entry's position is the winners above before it
                        # plus the ties before it, at most the ties still to take
                        gt = (valid & (key >= hi)).to(tl.int32)
                        eq = (valid & (key >= lo) & (key < hi)).to(tl.int32)
                        pk = (gt << 16) | eq
                        pk_tot = tl.sum(pk, axis=1)
                        pk_ex = (tl.cumsum(pk_tot, axis=0) - pk_tot)[:, None] + tl.cumsum(pk, axis=1) - pk
                        e_ex = pk_ex & 0xFFFF
                        room = tl.maximum(need - ties, 0)
                        sel = (gt != 0) | ((eq != 0) & (e_ex < room))
                        pos = tl.where(sel, taken + (pk_ex >> 16) + tl.minimum(e_ex, room), -1)
                        z, s = _scores(pre_row, b_ptr, norm_ptr, ids, sel, HAS_BIAS, False, True)
                        _store_winners(val_ptr, idx_ptr, out_row, pos, z, ids, GS)
                        tot = tl.sum(pk_tot, axis=0)
                        taken += (tot >> 16) + tl.minimum(tot & 0xFFFF, room)
                        ties += tot & 0xFFFF
            else:
                # ---- W (fallback): the winners straight from the row (the K-th key known to the last bit,
                # or its whole bin taken)
                _mark(MARK, "pmevent 2;\n\tmov.b32 $0, 0;")
                _write_row(pre_row, b_ptr, norm_ptr, val_ptr, idx_ptr, out_row, d_sae, prefix, known, need, K,
                           HAS_BIAS, HAS_NORM, BLOCK, False, "")
                _mark(MARK, "pmevent 10;\n\tmov.b32 $0, 0;")
        tl.debug_barrier()  # the next row rewrites the scratch
