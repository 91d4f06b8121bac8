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
2. C (a read of the row, from L2 for the part H0 read): a bitmap of the candidates, the entries with
   key >= thr, by one unordered float compare ``!(score < f_t)`` (f_t the smallest float of key >= thr;
   NaN passes) and a bit per entry; no keys, no cumsum over the row.
3. X: the candidates, in latent order, as (score bits, latent id) records into the program's scratch:
   each thread walks the set bits of its bitmap words, lowest first (a round per bit of the fullest
   word; positions from the words' popcounts).
4. If at least k and at most CAP candidates were collected, the top k of the row are the top k of the
   candidates (every entry left out has a key below thr, and k entries have one at or above it, ties
   included, so the sample only decides the cost, never the result). S: radix passes over the candidates only, 11 bits a pass, over a window from thr to the
   largest candidate key and then the k-th key's bin (typically 1-2 passes); SW: the winners, in latent
   order (those above the k-th key's bin, and in it the first ``need`` by latent id), their values
   relu(h) read again from the row.

Otherwise (the sample misjudged the row, heavy ties, k near d_sae): H0 over the rest of the row makes
the histogram exact; while the candidates do not fit the scratch, H1 and H2 (digits 20..10 and 9..0)
refine the k-th key over the row; then C and X with the exact threshold, or, if they still do not fit,
W: the winners straight from the row (block cumsums, stores column by column).

``MARK`` (compile-time, False in use) brackets the code regions with ``pmevent`` markers so that
``benchmarks/sm90_report.py`` can attribute the SASS instructions of a typical row (REGIONS);
``python benchmarks/sm90_report.py --sass`` prints the count per pass and the implied time.
"""

import triton
import triton.language as tl

NUM_BINS = 2048
# Marker events (``pmevent n`` -> SASS ``PMTRIG 1 << n``) of the regions the SASS counter tells apart:
# code runs once per row in HOT (loops aside), never in a typical row in COLD (the fallbacks, the
# masked tails of partial blocks), and in S pass p only while the k-th key is unresolved.
REGIONS = {1: "hot", 2: "cold", 4: "S0", 5: "S1", 6: "S2"}
# The loops of a typical row, in the order of the SASS (innermost loops, cold regions excluded):
# (name, what one iteration covers). benchmarks/sm90_report.py checks the order by content.
HOT_LOOPS = (
    ("H0", "BLOCK entries of the sample"),
    ("C", "BLOCK entries of the row"),
    ("X.round", "WB bitmap words, one set bit each"),
    ("S0", "SB candidates"),
    ("S1", "SB candidates"),
    ("S2", "SB candidates"),
    ("SW", "SB candidates"),
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
    _mark(MARK, "pmevent 2;\n\tmov.b32 $0, 0;")
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
def _collect(pre_row, b_ptr, norm_ptr, wrd, rec, thr, d_sae, CAP, HAS_BIAS: tl.constexpr,
             HAS_NORM: tl.constexpr, BLOCK: tl.constexpr, MARK: tl.constexpr):
    """C and X: the entries of key >= thr (<= the key of +inf), in latent order, as (score bits << 32
    | latent id) into ``rec`` (the first CAP of them); returns their number and largest key."""
    G: tl.constexpr = BLOCK // 8     # groups of 8 latents per row block (one thread each)
    WB: tl.constexpr = BLOCK // 2    # bitmap words per step of X
    j8 = tl.arange(0, 8)
    g8 = tl.arange(0, G)[:, None] * 8 + j8[None, :]   # [G, 8]: block offsets in row order
    n_words = (d_sae + 31) // 32     # bit i of word w: latent 32 w + i
    n_full = d_sae - d_sae % BLOCK   # the row in full blocks (no masks), then one masked tail
    f_t = _key_floor(thr)            # key(s) >= thr <=> !(s < f_t)

    # ---- C: the bitmap of the candidates: 8 bits per thread, 4 threads per word
    for c0 in range(0, n_full, BLOCK):
        z, s = _scores(pre_row, b_ptr, norm_ptr, c0 + g8, None, HAS_BIAS, HAS_NORM, False)
        byte = tl.sum((~(s < f_t)).to(tl.int32) << j8[None, :], axis=1)
        w = tl.sum(tl.reshape(byte, [G // 4, 4]) << (8 * tl.arange(0, 4))[None, :], axis=1)
        tl.store(wrd + c0 // 32 + tl.arange(0, G // 4), w)
    _mark(MARK, "pmevent 2;\n\tmov.b32 $0, 0;")
    for c0 in range(n_full, d_sae, BLOCK):   # the masked tail (at most one step; see _hist_row)
        cols = c0 + g8
        z, s = _scores(pre_row, b_ptr, norm_ptr, cols, cols < d_sae, HAS_BIAS, HAS_NORM, True)
        byte = tl.sum(((cols < d_sae) & ~(s < f_t)).to(tl.int32) << j8[None, :], axis=1)
        w = tl.sum(tl.reshape(byte, [G // 4, 4]) << (8 * tl.arange(0, 4))[None, :], axis=1)
        wi = c0 // 32 + tl.arange(0, G // 4)
        tl.store(wrd + wi, w, mask=wi < n_words)
    _mark(MARK, "pmevent 1;\n\tmov.b32 $0, 0;")
    tl.debug_barrier()  # the bitmap is read by other threads below

    # ---- X: each thread walks its words' set bits, lowest first: a round per bit of the step's
    # fullest word; positions from the words' popcounts
    n_c = 0
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
    tl.debug_barrier()  # the candidates are read by other threads after
    return n_c, tl.max(_key(top_v), axis=0)


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
        n_c = tl.zeros([], dtype=tl.int32)
        top = tl.zeros([], dtype=tl.uint32)
        if (~exact) | (n_cand <= CAP):
            n_c, top = _collect(pre_row, b_ptr, norm_ptr, wrd, rec, thr, d_sae, CAP, HAS_BIAS, HAS_NORM,
                                BLOCK, MARK)
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
                n_c, top = _collect(pre_row, b_ptr, norm_ptr, wrd, rec, thr, d_sae, CAP, HAS_BIAS, HAS_NORM,
                                    BLOCK, False)
                ok = n_c <= CAP   # always
            _mark(MARK, "pmevent 1;\n\tmov.b32 $0, 0;")

        if ok:
            # ---- S: the K-th key among the candidates (all of key >= thr): radix passes of 11 bits over
            # a window [lo, lo + width): first from thr to the largest candidate key, then the K-th
            # key's bin
            lo = thr
            span = (top - lo).to(tl.float32)   # its exponent + 1 >= the bit length of the span
            sh = tl.maximum((span.to(tl.int32, bitcast=True) >> 23) - 126 - 11, 0).to(tl.uint32)
            width = tl.full([], 0xFFFFFFFF, tl.uint32)   # keys k in the window: k - lo < width
            need = K
            more = K > 0
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
                    _mark(MARK, "pmevent 1;\n\tmov.b32 $0, 0;")
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
                    eq = (valid & (key >= lo) & (key < hi)).to(tl.int32)
                    eq_tot = tl.sum(eq, axis=1)
                    eq_rank = ties + (tl.cumsum(eq_tot, axis=0) - eq_tot)[:, None] + tl.cumsum(eq, axis=1) - 1
                    sel = ((valid & (key >= hi)) | ((eq != 0) & (eq_rank < need))).to(tl.int32)
                    sel_tot = tl.sum(sel, axis=1)
                    pos = tl.where(sel != 0, taken + (tl.cumsum(sel_tot, axis=0) - sel_tot)[:, None]
                                   + tl.cumsum(sel, axis=1) - 1, -1)
                    z, s = _scores(pre_row, b_ptr, norm_ptr, ids, sel != 0, HAS_BIAS, False, True)
                    _store_winners(val_ptr, idx_ptr, out_row, pos, z, ids, GS)
                    taken += tl.sum(sel_tot, axis=0)
                    ties += tl.sum(eq_tot, axis=0)
        else:
            # ---- W (fallback): the winners straight from the row (the K-th key known to the last bit,
            # or its whole bin taken)
            _mark(MARK, "pmevent 2;\n\tmov.b32 $0, 0;")
            g8 = tl.arange(0, G)[:, None] * 8 + j8[None, :]
            taken = 0
            ties = 0
            for c0 in range(0, d_sae, BLOCK):
                cols = c0 + g8
                cm = cols < d_sae
                z, s = _scores(pre_row, b_ptr, norm_ptr, cols, cm, HAS_BIAS, HAS_NORM, True)
                mk = _key(s) & known
                eq = (cm & (mk == prefix)).to(tl.int32)
                eq_tot = tl.sum(eq, axis=1)
                eq_rank = ties + (tl.cumsum(eq_tot, axis=0) - eq_tot)[:, None] + tl.cumsum(eq, axis=1) - 1
                sel = ((cm & (mk > prefix)) | ((eq != 0) & (eq_rank < need))).to(tl.int32)
                sel_tot = tl.sum(sel, axis=1)
                pos = tl.where(sel != 0, taken + (tl.cumsum(sel_tot, axis=0) - sel_tot)[:, None]
                               + tl.cumsum(sel, axis=1) - 1, -1)
                _store_winners(val_ptr, idx_ptr, out_row, pos, z, cols, G)
                taken += tl.sum(sel_tot, axis=0)
                ties += tl.sum(eq_tot, axis=0)
            _mark(MARK, "pmevent 1;\n\tmov.b32 $0, 0;")
        tl.debug_barrier()  # the next row rewrites the scratch
