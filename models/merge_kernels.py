"""Fused per-element loops for models.merging, compiled with numba.

A merge written as torch ops makes one pass over memory per op (TIES is ~30 of them per chunk); these loops
make one pass per stage, with the same float operations in the same order, so their results equal the
torch formulas in models.merging bit for bit (tests/test_merging.py runs both). Each works on one chunk:
`b` the base values, `ms` a tuple of the models' values (1 to MAX_MODELS = 4 of them: from 5 stacked rows on,
torch's sum is not in row order and models.merging uses its torch path), all of the working dtype (float32 or
float64);
`s` is the chunk's flat offset in the tensor (for the top-k cut-off by index and for DARE's counter).
Scalars come in already rounded to the working dtype, as torch rounds a Python number against a tensor.
The loops release the GIL, so models.merging runs chunks on several threads.
The output loops (weighted_sum, ties_chunk, dare_chunk, sce_chunk) also return whether every delta m_j - b
they computed is finite (d - d == 0 exactly when d is): a delta is finite only when both of its inputs are,
so True proves the chunk's inputs finite and merge_safetensors skips its own pass over them (False: an input
is NaN or inf, or a subtraction overflowed; merge_safetensors then checks the inputs themselves).

AVAILABLE is False when numba cannot be imported; models.merging then uses its torch path (same results).
"""
from __future__ import annotations

import math

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is in requirements.txt
    numba = None

AVAILABLE = numba is not None


def _has_avx512() -> bool:
    """Whether the loops are compiled for this CPU (numba's default) and it has AVX-512F: the selection
    scans then collect their bracketed positions with its compress instruction."""
    if not AVAILABLE or numba.config.CPU_NAME not in (None, "host"):
        return False
    try:
        from llvmlite import binding
        return bool(binding.get_host_cpu_features().get("avx512f", False))
    except Exception:  # pragma: no cover - an llvmlite without the query: the portable loop
        return False


AVX512 = _has_avx512()
MAX_MODELS = 4  # torch adds up to 4 stacked rows in order; from 5 on in an order of its own

# SplitMix64 (Steele, Lea & Flood 2014): output k of the generator seeded with `seed` is mix(seed + k * GAMMA)
GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


def uniforms(seed: int, start: int, count: int) -> np.ndarray:
    """DARE's uniforms in [0, 1) as float32 (24 random bits, like torch.rand): element i of a tensor is output
    i + 1 of SplitMix64 seeded with `seed`, so any chunk is computed on its own. Plain numpy (the reference
    and the torch path); the kernels inline the same arithmetic."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(start + 1, start + count + 1, dtype=np.uint64) * GAMMA)
        z = (z ^ (z >> np.uint64(30))) * MIX1
        z = (z ^ (z >> np.uint64(27))) * MIX2
        z ^= z >> np.uint64(31)
    return ((z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)).astype(np.float32)


def bracket_ranks(s: int, numel: int, k: float, extra_sd: float) -> tuple[int, int]:
    """(hi_i, lo_i): the ranks, in descending order and 0-based, of a sample of s values out of numel that
    bracket the k-th largest of all numel: 4 standard deviations of the sample quantile either side (plus 4 x
    extra_sd sample ranks: the uncertainty of an estimated k) plus 16. hi_i < s and lo_i >= 0 always; hi_i < 0
    or lo_i >= s means that side is open. Plain Python, and compiled for ties_tensor_f32: the same bracket."""
    q = k / numel
    margin = 4.0 * (math.sqrt(s * q * (1 - q)) + extra_sd) + 16
    return int(q * s - margin), int(q * s + margin)


if AVAILABLE:
    _jit = numba.njit(nogil=True, cache=True, error_model="numpy")
    _bracket_ranks = _jit(bracket_ranks)

    @_jit
    def weighted_sum(b, ms, w, lam, out):  # pragma: no cover - compiled
        """out = b + lam * sum_j (m_j - b) * w_j  (task arithmetic; VaRM with lam = 1); returns whether every
        delta m_j - b is finite."""
        n = len(ms)
        bad = False
        for i in range(b.size):
            bi = b[i]
            d = ms[0][i] - bi
            bad |= d - d != 0
            acc = d * w[0]
            for j in range(1, n):
                d = ms[j][i] - bi
                bad |= d - d != 0
                acc = acc + d * w[j]
            out[i] = bi + lam * acc
        return not bad

    @_jit
    def _kept(a, thr, cut, gi):  # pragma: no cover - compiled
        """In the top-k of (threshold, cut): above the threshold, or equal to it at a flat index below cut."""
        return a > thr or (a == thr and gi < cut)

    @_jit
    def scan_abs_deltas(b, ms, his, los, inside, where, counts):  # pragma: no cover - compiled
        """One pass of the top-k selection over |m_j - b| for every model given: (count of values > his[j],
        count in [los[j], his[j]]) into counts[j], the values in the bracket to the front of inside[j] and
        their indices (in order) to the front of where[j]; returns whether a NaN was seen. Branch-free (the
        comparisons are coin flips at TIES' densities): every value is stored, the position advances on a
        hit."""
        nan = False
        for j in range(len(ms)):
            mj, hi, lo, row, irow = ms[j], his[j], los[j], inside[j], where[j]
            above = 0
            c = 0
            for i in range(b.size):
                x = abs(mj[i] - b[i])
                above += x > hi
                row[c] = x
                irow[c] = i
                c += (x >= lo) & (x <= hi)
                nan |= x != x
            counts[j, 0] = above
            counts[j, 1] = c
        return nan

    SCAN_BLOCK = 256  # scan_abs_deltas_f32: elements per block (its |d| stay in L1 for the collecting loop)

    @_jit
    def bracketed_positions_portable(ubuf, m, lo_bits, span_bits, hits):  # pragma: no cover - compiled
        """The positions i < m (in order) of the float32 bits ubuf[i] in the bracket [lo, hi] (for x >= 0 the
        bits of x order as x does: x is in [lo, hi] exactly when bits(x) - bits(lo) <= bits(hi) - bits(lo)
        as unsigned 32-bit integers; NaN's bits lie above +inf's, so NaN is never in it) to the front of
        hits; returns their count. A branch per element: rarely taken, but each hit costs a misprediction."""
        h = 0
        for i in range(m):
            if np.uint32(ubuf[i] - lo_bits) <= span_bits:
                hits[h] = i
                h += 1
        return h

    if AVX512:
        from llvmlite import ir as _ir
        from numba.core import cgutils as _cgutils
        from numba.core import types as _types
        from numba.extending import intrinsic as _intrinsic

        @_intrinsic
        def _compress_positions16(typingctx, ubuf, k0, lo_bits, span_bits, hits, h):
            """hits[h:h + 16] = the positions k0..k0 + 15 whose bits ubuf[k] are in the bracket, packed to the
            front (vpcompressd into a register, then one 16-lane store: compressing straight to memory is
            several times slower on AMD Zen 4); returns how many. hits needs 16 slots beyond h."""
            def codegen(context, builder, signature, args):
                u, k, lo, span, out, at = args
                i32 = _ir.IntType(32)
                vec = _ir.VectorType(i32, 16)

                def splat(x):
                    x = builder.trunc(x, i32) if x.type.width > 32 else builder.zext(x, i32) if x.type.width < 32 else x
                    v = builder.insert_element(_ir.Constant(vec, _ir.Undefined), x, _ir.Constant(i32, 0))
                    return builder.shuffle_vector(v, v, _ir.Constant(vec, [0] * 16))

                data = context.make_array(signature.args[0])(context, builder, u).data
                dest = context.make_array(signature.args[4])(context, builder, out).data
                bits = builder.load(builder.bitcast(builder.gep(data, [k]), vec.as_pointer()), align=4)
                inside = builder.icmp_unsigned("<=", builder.sub(bits, splat(lo)), splat(span))
                positions = builder.add(splat(k), _ir.Constant(vec, list(range(16))))
                compress = _cgutils.get_or_insert_function(
                    builder.module, _ir.FunctionType(vec, [vec, vec, _ir.VectorType(_ir.IntType(1), 16)]),
                    "llvm.x86.avx512.mask.compress.v16i32")
                packed = builder.call(compress, [positions, positions, inside])
                builder.store(packed, builder.bitcast(builder.gep(dest, [at]), vec.as_pointer()), align=4)
                return builder.zext(builder.ctpop(builder.bitcast(inside, _ir.IntType(16))), _ir.IntType(64))

            return _types.intp(ubuf, k0, lo_bits, span_bits, hits, h), codegen

        @_jit
        def bracketed_positions_avx512(ubuf, m, lo_bits, span_bits, hits):  # pragma: no cover - compiled
            """bracketed_positions_portable, 16 positions per compress instruction (no branch per element;
            measured 2x faster for TIES' whole scan); hits needs 16 slots beyond m."""
            h = 0
            full = m - m % 16
            for k0 in range(0, full, 16):
                h += _compress_positions16(ubuf, k0, lo_bits, span_bits, hits, h)
            for i in range(full, m):
                if np.uint32(ubuf[i] - lo_bits) <= span_bits:
                    hits[h] = i
                    h += 1
            return h

        bracketed_positions = bracketed_positions_avx512
    else:
        bracketed_positions = bracketed_positions_portable

    @_jit
    def scan_abs_deltas_f32(b, ms, his, lo_bits, span_bits, inside, where, counts):  # pragma: no cover - compiled
        """scan_abs_deltas for float32 (see scan_abs_deltas_f32_capped; rows as long as the chunk: never full)."""
        return scan_abs_deltas_f32_capped(b, ms, his, lo_bits, span_bits, inside, where, counts)[0]

    @_jit
    def scan_abs_deltas_f32_capped(b, ms, his, lo_bits, span_bits, inside, where, counts):  # pragma: no cover
        """scan_abs_deltas for float32, faster: per block, one vectorised loop computes |d| into a buffer, counts
        the values above his[j] and looks for NaN; bracketed_positions then finds those in the bracket by
        one integer comparison of their bits (where x >= lo and x <= hi compile to a coin-flip branch), and
        they are copied to the row (their indices to where[j]). lo_bits[j] = bits(max(lo, 0)),
        span_bits[j] = bits(hi) - lo_bits[j]. Returns (NaN seen, full): full when a model's row could not hold
        all the values in its bracket (the scan then stops; counts are not set)."""
        nan = False
        n = len(ms)
        buf = np.empty(SCAN_BLOCK, dtype=np.float32)
        ubuf = buf.view(np.uint32)
        hits = np.empty(SCAN_BLOCK + 16, dtype=np.int32)
        size = b.size
        hi = np.empty(n, dtype=np.float32)
        above = np.zeros(n, dtype=np.int64)
        c = np.zeros(n, dtype=np.int64)
        for j in range(n):
            hi[j] = his[j]
        # blocks outside, models inside: the base's block is read from memory once for all of them
        # (measured 1.2x faster than model by model)
        for i0 in range(0, size, SCAN_BLOCK):
            m = min(SCAN_BLOCK, size - i0)
            bb = b[i0:i0 + m]
            for j in range(n):
                mm, hj = ms[j][i0:i0 + m], hi[j]
                aj = 0
                for i in range(m):
                    x = abs(mm[i] - bb[i])
                    buf[i] = x
                    aj += x > hj
                    nan |= x != x
                above[j] += aj
                h = bracketed_positions(ubuf, m, lo_bits[j], span_bits[j], hits)
                row, irow, cj = inside[j], where[j], c[j]
                if cj + h > row.size:
                    return nan, True
                for t in range(h):
                    row[cj + t] = buf[hits[t]]
                    irow[cj + t] = i0 + hits[t]
                c[j] = cj + h
        for j in range(n):
            counts[j, 0] = above[j]
            counts[j, 1] = c[j]
        return nan, False

    @_jit
    def _add_to_lanes(sq, m, lanes):  # pragma: no cover - compiled
        """lanes[l] += sq[i] for the block's first m positions i with l = i mod 16 (sq beyond m zeroed first):
        16 independent float64 sums, so the loop vectorises."""
        for i in range(m, SCAN_BLOCK):
            sq[i] = 0.0
        # the sums in local variables: with lanes[k] += ..., the compiler cannot rule out that lanes and sq
        # overlap, so it stores and reloads every lane each time (measured 1.5x slower)
        l0, l1, l2, l3, l4, l5, l6, l7 = lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7]
        l8, l9, l10, l11 = lanes[8], lanes[9], lanes[10], lanes[11]
        l12, l13, l14, l15 = lanes[12], lanes[13], lanes[14], lanes[15]
        for k in range(0, SCAN_BLOCK, 16):
            l0, l1, l2, l3 = l0 + sq[k], l1 + sq[k + 1], l2 + sq[k + 2], l3 + sq[k + 3]
            l4, l5, l6, l7 = l4 + sq[k + 4], l5 + sq[k + 5], l6 + sq[k + 6], l7 + sq[k + 7]
            l8, l9, l10, l11 = l8 + sq[k + 8], l9 + sq[k + 9], l10 + sq[k + 10], l11 + sq[k + 11]
            l12, l13, l14, l15 = l12 + sq[k + 12], l13 + sq[k + 13], l14 + sq[k + 14], l15 + sq[k + 15]
        lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7] = l0, l1, l2, l3, l4, l5, l6, l7
        lanes[8], lanes[9], lanes[10], lanes[11], lanes[12], lanes[13], lanes[14], lanes[15] = (l8, l9, l10, l11, l12,
                                                                                             l13, l14, l15)

    @_jit
    def sce_first_pass(b, ms, var, hi, lo_bits, span_bits, lanes, cand_v, cand_i, cand_sq,
                       counts):  # pragma: no cover - compiled
        """SCE's variance, its selection scan and its energies in one pass over the inputs (float32), block by
        block: var = welford_var's (the same operations, models in the outer loop); counts = (non-zero
        variances, variances > hi, variances in the bracket [lo, hi], NaN seen); the bracketed variances
        and their indices to the front of cand_v / cand_i, their d_j^2 (float64) to cand_sq[j] (collected
        as scan_abs_deltas_f32 does, by their bits); lanes[j, l] = the float64 sum of d_j^2 over positions
        with variance > hi, block position i added to lane i mod 16 (16 independent sums: it vectorises)."""
        n = len(ms)
        size = b.size
        vbuf = np.empty(SCAN_BLOCK, dtype=np.float32)
        ubuf = vbuf.view(np.uint32)
        hits = np.empty(SCAN_BLOCK + 16, dtype=np.int32)
        mean = np.empty(SCAN_BLOCK)
        m2 = np.empty(SCAN_BLOCK)
        sq = np.zeros(SCAN_BLOCK)
        hi32 = np.float32(hi)
        nnz = 0
        above = 0
        c = 0
        nan = False
        for j in range(n):
            for k in range(16):
                lanes[j, k] = 0.0
        for i0 in range(0, size, SCAN_BLOCK):
            m = min(SCAN_BLOCK, size - i0)
            bb, vv, m0 = b[i0:i0 + m], var[i0:i0 + m], ms[0][i0:i0 + m]
            for i in range(m):
                mean[i] = np.float64(m0[i] - bb[i])
                m2[i] = 0.0
            for j in range(1, n):
                mj = ms[j][i0:i0 + m]
                count = np.float64(j + 1)
                for i in range(m):
                    x = np.float64(mj[i] - bb[i])
                    mu = mean[i]
                    delta = x - mu
                    mu = mu + delta / count
                    mean[i] = mu
                    m2[i] = m2[i] + (x - mu) * delta
            for i in range(m):
                v = np.float32(m2[i] / n)
                vv[i] = v
                vbuf[i] = v
                nnz += v != 0
                above += v > hi32
                nan |= v != v
            for j in range(n):
                mj, lj = ms[j][i0:i0 + m], lanes[j]
                for i in range(m):
                    d = np.float64(mj[i] - bb[i])
                    sq[i] = d * d if vbuf[i] > hi32 else 0.0
                _add_to_lanes(sq, m, lj)
            h = bracketed_positions(ubuf, m, lo_bits, span_bits, hits)
            for t in range(h):
                i = hits[t]
                cand_v[c] = vbuf[i]
                cand_i[c] = i0 + i
                for j in range(n):
                    d = np.float64(ms[j][i0 + i] - bb[i])
                    cand_sq[j, c] = d * d
                c += 1
        counts[0] = nnz
        counts[1] = above
        counts[2] = c
        counts[3] = nan

    @_jit
    def scan_values(v, hi, lo, inside):  # pragma: no cover - compiled
        """scan_abs_deltas' pass for one row of given non-negative values: (count > hi, count in [lo, hi], NaN
        seen), the values in [lo, hi] to the front of `inside`."""
        above = 0
        c = 0
        nan = False
        for i in range(v.size):
            x = v[i]
            above += x > hi
            inside[c] = x
            c += (x >= lo) & (x <= hi)
            nan |= x != x
        return above, c, nan

    @_jit
    def find_abs_delta_equal(b, m, thr, need):  # pragma: no cover - compiled
        """(count of |m - b| == thr, index of the need-th of them or -1 when fewer)."""
        c = 0
        for i in range(b.size):
            if abs(m[i] - b[i]) == thr:
                c += 1
                if c == need:
                    return c, i
        return c, -1

    SELECT_BUCKETS = 2048  # select_nonneg_f32: histogram buckets per round
    SELECT_SORT = 64  # select_nonneg_f32: at most this many keys left are sorted

    @_jit
    def _key_range(keys, n):  # pragma: no cover - compiled
        """(min, max) of the first n keys, sign bits cleared."""
        mask = np.uint32(0x7fffffff)
        kmin = np.uint32(0xffffffff)
        kmax = np.uint32(0)
        for i in range(n):
            k = keys[i] & mask
            kmin = min(kmin, k)
            kmax = max(kmax, k)
        return kmin, kmax

    @_jit
    def _histogram(keys, n, kmin, kmax):  # pragma: no cover - compiled
        """(counts, shift): the first n keys (sign cleared) counted into SELECT_BUCKETS ranges of [kmin, kmax],
        key k into bucket (k - kmin) >> shift."""
        mask = np.uint32(0x7fffffff)
        shift = 0
        while ((kmax - kmin) >> shift) >= SELECT_BUCKETS:
            shift += 1
        hist = np.zeros(SELECT_BUCKETS, dtype=np.int64)
        for i in range(n):
            hist[((keys[i] & mask) - kmin) >> shift] += 1
        return hist, shift

    @_jit
    def _bucket_keys(keys, n, kmin, shift, bucket, count):  # pragma: no cover - compiled
        """The `count` keys (sign cleared) among the first n that fall in `bucket`."""
        mask = np.uint32(0x7fffffff)
        kept = np.empty(count, dtype=np.uint32)
        c = 0
        for i in range(n):
            k = keys[i] & mask
            if (k - kmin) >> shift == bucket:
                kept[c] = k
                c += 1
        return kept

    @_jit
    def _select_keys(keys, rank, hist, kmin, shift):  # pragma: no cover - compiled
        """The rank-th smallest key of `keys` (sign cleared), given the first round's histogram: rounds keep
        the bucket holding the rank until the keys left are all equal or few enough to sort."""
        n = keys.size
        while True:
            bucket = 0
            while rank >= hist[bucket]:
                rank -= hist[bucket]
                bucket += 1
            keys = _bucket_keys(keys, n, kmin, shift, bucket, hist[bucket])
            n = keys.size
            kmin, kmax = _key_range(keys, n)
            if kmin == kmax:
                return kmin
            if n <= SELECT_SORT:
                keys.sort()
                return keys[rank]
            hist, shift = _histogram(keys, n, kmin, kmax)

    @_jit
    def select_nonneg_f32(x, ranks, out):  # pragma: no cover - compiled
        """out[r] = the ranks[r]-th smallest (0-based) of x, float32 values >= 0 or NaN, as
        np.partition(x, ranks)[ranks] gives them (NaN sorts last; -0.0 counts as 0.0 and comes back as
        0.0). A radix select on the bits: for x >= 0 the bits order as the values do, and NaN's (sign
        cleared) lie above +inf's. Each round counts the keys into SELECT_BUCKETS equal ranges of
        [min, max] and keeps the bucket that holds the rank, until the keys left are all equal or few
        enough to sort: linear, and unlike introselect not slowed by many equal values. The ranks share
        the first round. x is not modified."""
        keys = x.view(np.uint32)
        kmin, kmax = _key_range(keys, keys.size)
        res = out.view(np.uint32)
        if kmin == kmax:
            for r in range(ranks.size):
                res[r] = kmin
            return
        hist, shift = _histogram(keys, keys.size, kmin, kmax)
        for r in range(ranks.size):
            res[r] = _select_keys(keys, ranks[r], hist, kmin, shift)

    @_jit
    def find_value_equal(v, thr, need):  # pragma: no cover - compiled
        """find_abs_delta_equal over given values."""
        c = 0
        for i in range(v.size):
            if v[i] == thr:
                c += 1
                if c == need:
                    return c, i
        return c, -1

    @_jit
    def ties_chunk(b, ms, w, thr, cut, s, lam, uniform, eps, one, out):  # pragma: no cover - compiled
        """TIES on a chunk: trim each delta to its top-k (thr[j], cut[j]), weight, elect the sign of the sum
        (0 -> +), average the agreeing entries (divisor: their count, at least 1, when `uniform`; else their
        weights' sum, 1 where below eps), out = b + lam * mixed / divisor. One loop over the elements with
        the models inside it (their number is part of the compiled type, so those loops unroll and the
        element loop vectorises); each trimmed delta is computed twice, which is cheaper than storing it.
        No cut-off may fall inside the chunk (the caller splits it there): then an entry tied at th[j] is kept
        everywhere in the chunk or nowhere, and the loop needs no index comparison (1.65x faster than with
        it). Returns whether every delta is finite."""
        return ties_range(b, ms, 0, b.size, w, thr, cut, s, lam, uniform, eps, one, out)

    @_jit
    def ties_range(b, ms, p, q, w, thr, cut, s, lam, uniform, eps, one, out):  # pragma: no cover - compiled
        """ties_chunk on the positions [p, q) of the arrays (flat offsets s + p .. s + q - 1 in the tensor)."""
        n = len(ms)
        zero = one - one
        th = np.empty(n, dtype=b.dtype)  # the thresholds are values of the working dtype (or -1, inf): exact
        loose = np.empty(n, dtype=np.bool_)  # model j keeps its entries tied at th[j] in this chunk
        for j in range(n):
            if s + p < cut[j] < s + q:
                raise ValueError("ties_chunk: a cut-off inside the chunk (split the chunk there)")
            th[j] = thr[j]
            loose[j] = cut[j] >= s + q
        bad = False
        for i in range(np.uint64(p), np.uint64(q)):  # unsigned: no negative-index wraparound, so it vectorises
            bi = b[i]
            total = zero
            for j in range(n):
                d = ms[j][i] - bi
                bad |= d - d != zero
                a = abs(d)
                x = (d if (a > th[j]) | ((a == th[j]) & loose[j]) else zero) * w[j]
                total = x if j == 0 else total + x
            up = total >= zero
            mixed = zero
            div = zero
            for j in range(n):
                d = ms[j][i] - bi
                a = abs(d)
                x = (d if (a > th[j]) | ((a == th[j]) & loose[j]) else zero) * w[j]
                agree = ((x > zero) & up) | ((x < zero) & (not up))
                add = one if uniform else w[j]
                mixed = (x if agree else zero) if j == 0 else mixed + (x if agree else zero)
                div = (add if agree else zero) if j == 0 else div + (add if agree else zero)
            if uniform:
                div = one if div < one else div
            else:
                div = one if abs(div) < eps else div
            out[i] = bi + (lam * mixed) / div
        return not bad

    @_jit
    def _f32_bits(x):  # pragma: no cover - compiled
        """The bits of a float32 value as uint32."""
        a = np.empty(1, dtype=np.float32)
        a[0] = x
        return a.view(np.uint32)[0]

    @_jit
    def ties_tensor_f32(b, ms, k, step, w, lam, uniform, eps, one, thr, cut, out):  # pragma: no cover - compiled
        """TIES on a whole float32 tensor in one call, with no Python (and no GIL) between its stages: each
        model's top-k (k largest |d_j|) found as models.merging's fused selection finds it (the sample
        |d_j| at every step-th position brackets the k-th largest, bracket_ranks; one scan counts the values
        above the bracket and collects those inside with their positions; the exact k-th among those; ties
        at it kept from the lowest position on), written to thr[j], cut[j] (the k largest: |d_j| > thr[j],
        plus |d_j| == thr[j] at positions < cut[j]), then ties_chunk's loop over the pieces between the
        cut-offs. Returns (status, finite): status 0 done, `finite` whether every delta was; 1 nothing
        written: a bracket cannot be used (its ends equal, the k-th outside it, or more values inside it than
        twice the expected number), the caller's general path takes over; 2 a delta is NaN."""
        n = len(ms)
        numel = b.size
        s = (numel + step - 1) // step
        hi_i, lo_i = _bracket_ranks(s, numel, k, 0.0)
        ranks = np.empty(2, dtype=np.int64)
        nr = 0
        if hi_i >= 0:
            ranks[nr] = s - hi_i - 1
            nr += 1
        if lo_i < s:
            ranks[nr] = s - lo_i - 1
            nr += 1
        got = np.empty(2, dtype=np.float32)
        samp = np.empty(s, dtype=np.float32)
        his = np.empty(n, dtype=np.float64)
        lo_bits = np.empty(n, dtype=np.uint32)
        span_bits = np.empty(n, dtype=np.uint32)
        for j in range(n):
            mj = ms[j]
            for i in range(s):
                samp[i] = abs(mj[i * step] - b[i * step])
            if nr > 0:
                select_nonneg_f32(samp, ranks[:nr], got[:nr])
            hi = got[0] if hi_i >= 0 else np.float32(np.inf)
            lo = got[nr - 1] if lo_i < s else np.float32(-np.inf)
            if hi == lo:
                return 1, False
            his[j] = hi
            lo_bits[j] = _f32_bits(lo if lo > 0 else np.float32(0.0))
            span_bits[j] = _f32_bits(hi) - lo_bits[j]
        cap = min(numel, 2 * numel * (min(lo_i, s) - max(hi_i, -1) + 1) // s + 4096)
        inside = np.empty((n, cap), dtype=np.float32)
        where = np.empty((n, cap), dtype=np.int32)
        counts = np.empty((n, 2), dtype=np.int64)
        nan, full = scan_abs_deltas_f32_capped(b, ms, his, lo_bits, span_bits, inside, where, counts)
        if nan:
            return 2, False
        if full:
            return 1, False
        one_rank = np.empty(1, dtype=np.int64)
        for j in range(n):
            above, nc = counts[j, 0], counts[j, 1]
            if not above < k <= above + nc:
                return 1, False
            cand = inside[j, :nc]
            one_rank[0] = nc - (k - above)
            select_nonneg_f32(cand, one_rank, got[:1])
            t = got[0]
            n_above = above
            n_tie = 0
            for i in range(nc):
                n_above += cand[i] > t
                n_tie += cand[i] == t
            need = k - n_above
            thr[j] = t
            cut[j] = numel
            if need != n_tie:
                seen = 0
                for i in range(nc):
                    if cand[i] == t:
                        seen += 1
                        if seen == need:
                            cut[j] = where[j, i] + 1
                            break
        ends = np.empty(n + 2, dtype=np.int64)
        ends[0], ends[1] = 0, numel
        for j in range(n):
            ends[j + 2] = cut[j]
        ends.sort()
        finite = True
        for e in range(n + 1):
            if ends[e + 1] > ends[e]:
                finite &= ties_range(b, ms, ends[e], ends[e + 1], w, thr, cut, 0, lam, uniform, eps, one, out)
        return 0, finite

    @_jit
    def dare_chunk(b, ms, w, seeds, s, density, rescale, lam, one, out):  # pragma: no cover - compiled
        """DARE on a chunk: keep delta entry i of model j where its uniform (SplitMix64 output s + i + 1 of
        seeds[j]) is below `density`, divide the kept by `density` when `rescale`, weight, sum;
        out = b + lam * sum. Returns whether every delta is finite."""
        n = len(ms)
        zero = one - one
        bad = False
        for i in range(b.size):
            bi = b[i]
            k = np.uint64(s + i + 1)
            acc = zero
            for j in range(n):
                z = seeds[j] + k * GAMMA
                z = (z ^ (z >> np.uint64(30))) * MIX1
                z = (z ^ (z >> np.uint64(27))) * MIX2
                z = z ^ (z >> np.uint64(31))
                u = np.float32(z >> np.uint64(40)) * np.float32(2.0 ** -24)
                d = ms[j][i] - bi
                bad |= d - d != zero
                if not u < density:
                    d = d * zero
                if rescale:
                    d = d / density
                d = d * w[j]
                acc = d if j == 0 else acc + d
            out[i] = bi + lam * acc
        return not bad

    @_jit
    def welford_var(b, ms, var):  # pragma: no cover - compiled
        """var = torch.var(stacked deltas, dim=0, unbiased=False): Welford's recurrence in float64, rounded to
        var's dtype (what torch does per position)."""
        n = len(ms)
        for i in range(b.size):
            bi = b[i]
            mean = np.float64(ms[0][i] - bi)
            m2 = 0.0
            for j in range(1, n):
                x = np.float64(ms[j][i] - bi)
                delta = x - mean
                mean = mean + delta / (j + 1)
                m2 = m2 + (x - mean) * delta
            var[i] = m2 / n

    @_jit
    def energy_sums(b, ms, var, thr, cut, s, sums):  # pragma: no cover - compiled
        """sums[j] = sum of (d_j masked)^2 in float64, the mask selecting positions whose variance is in the
        top-k (thr, cut) (thr < 0: every position). Block by block: the squares into a buffer, then added
        into 16 running sums (block position i into sum i mod 16: independent sums, so the loop vectorises),
        which are added pairwise at the end."""
        n = len(ms)
        c = cut - s
        size = b.size
        sq = np.zeros(SCAN_BLOCK)
        lanes = np.zeros((n, 16))
        t = var.dtype.type(thr)  # a value of var's dtype (or -1, inf): the comparisons stay in that dtype
        for i0 in range(0, size, SCAN_BLOCK):
            m = min(SCAN_BLOCK, size - i0)
            bb, vv = b[i0:i0 + m], var[i0:i0 + m]
            for j in range(n):
                mj, lj = ms[j][i0:i0 + m], lanes[j]
                if thr < 0:
                    for i in range(m):
                        d = np.float64(mj[i] - bb[i])
                        sq[i] = d * d
                else:
                    ci = c - i0
                    for i in range(m):
                        d = np.float64(mj[i] - bb[i])
                        v = vv[i]
                        sq[i] = d * d if (v > t) | ((v == t) & (i < ci)) else 0.0
                _add_to_lanes(sq, m, lj)
        for j in range(n):
            lj = lanes[j]
            for k in range(8):
                lj[k] += lj[k + 8]
            sums[j] = ((lj[0] + lj[1]) + (lj[2] + lj[3])) + ((lj[4] + lj[5]) + (lj[6] + lj[7]))

    @_jit
    def _nth_or_last(xs, j):  # pragma: no cover - compiled
        """xs[j], or the last item where j is beyond it (a placeholder its callers never read)."""
        return xs[min(j, len(xs) - 1)]

    @_jit
    def _agrees(d, sel, up):  # pragma: no cover - compiled
        """A selected delta whose sign is the elected one (up: +); zero never agrees."""
        return sel & (((d > 0) & up) | ((d < 0) & (not up)))

    @_jit
    def sce_chunk(b, ms, var, thr, cut, s, masked, w, eps, one, out):  # pragma: no cover - compiled
        """SCE's last stage on a chunk: the deltas (masked by the variance top-k when `masked`; thr < 0
        selects all), the sign of their sum elected (0 -> +), agreeing entries weighted by w:
        out = b + sum_j w_j d_j [agree] / sum_j w_j [agree] (denominator 1 where below eps). Returns whether
        every delta is finite.
        The models are spelt out as MAX_MODELS named arrays (the `if n > j` branches fold away: n is part of the
        compiled type), each sum taken in model order from zero as before: written as loops over ms[j]
        inside the element loop, this loop did not vectorise (1.6-2.3x slower at 1-3 models, measured)."""
        n = len(ms)
        if n > MAX_MODELS:
            raise ValueError("sce_chunk: more models than MAX_MODELS")
        zero = one - one
        every = not masked or thr < 0
        t = var.dtype.type(thr) if not every else var.dtype.type(0)
        c = cut - s
        m0, m1, m2, m3 = _nth_or_last(ms, 0), _nth_or_last(ms, 1), _nth_or_last(ms, 2), _nth_or_last(ms, 3)
        w0, w1, w2, w3 = _nth_or_last(w, 0), _nth_or_last(w, 1), _nth_or_last(w, 2), _nth_or_last(w, 3)
        bad = False
        for i in range(b.size):
            bi = b[i]
            sel = every | (var[i] > t) | ((var[i] == t) & (i < c))  # `or` here stops the loop vectorising
            d0 = m0[i] - bi
            d1 = m1[i] - bi if n > 1 else zero
            d2 = m2[i] - bi if n > 2 else zero
            d3 = m3[i] - bi if n > 3 else zero
            bad |= (d0 - d0 != zero) | (d1 - d1 != zero) | (d2 - d2 != zero) | (d3 - d3 != zero)
            total = zero + (d0 if sel else zero)  # unselected: the delta counts as 0
            if n > 1:
                total = total + (d1 if sel else zero)
            if n > 2:
                total = total + (d2 if sel else zero)
            if n > 3:
                total = total + (d3 if sel else zero)
            up = total >= 0
            a0, a1, a2, a3 = _agrees(d0, sel, up), _agrees(d1, sel, up), _agrees(d2, sel, up), _agrees(d3, sel, up)
            num = zero + (d0 * w0 if a0 else zero)
            den = zero + (w0 if a0 else zero)
            if n > 1:
                num, den = num + (d1 * w1 if a1 else zero), den + (w1 if a1 else zero)
            if n > 2:
                num, den = num + (d2 * w2 if a2 else zero), den + (w2 if a2 else zero)
            if n > 3:
                num, den = num + (d3 * w3 if a3 else zero), den + (w3 if a3 else zero)
            out[i] = bi + num / (one if abs(den) < eps else den)
        return not bad


def load(dtypes: tuple = (np.float32,)) -> float:
    """Compile (first use on this machine) or load from numba's cache every loop for the given working dtypes,
    by running each on a few elements; returns the seconds it took. A merge does this on first use anyway;
    benchmarks call it first to report it apart (it is once per process, ~0.3 s from the cache)."""
    import time

    if not AVAILABLE:
        return 0.0
    t = time.perf_counter()
    for dt in dtypes:
        one = dt(1.0)
        b = np.zeros(4, dtype=dt)
        ms = (b + one, b - one)
        w = np.ones(2, dtype=dt)
        out = np.empty(4, dtype=dt)
        thr, cut = np.array([0.5, 0.5]), np.zeros(2, dtype=np.int64)
        weighted_sum(b, ms, w, one, out)
        for models in (ms, ms[:1]):  # all models, and one (the per-model path)
            scan_abs_deltas(b, models, np.ones(len(models)), np.zeros(len(models)), np.empty((2, 4), dtype=dt),
                            np.empty((2, 4), np.int32), np.empty((2, 2), np.int64))
            if dt == np.float32:
                scan_abs_deltas_f32(b, models, np.ones(len(models)), np.zeros(len(models), np.uint32),
                                    np.ones(len(models), np.uint32), np.empty((2, 4), dtype=dt),
                                    np.empty((2, 4), np.int32), np.empty((2, 2), np.int64))
        scan_values(b, 2.0, 0.5, np.empty(4, dtype=dt))
        find_abs_delta_equal(b, ms[0], 1.0, 1)
        find_value_equal(b, 0.0, 1)
        if dt == np.float32:
            select_nonneg_f32(b, np.array([1]), np.empty(1, dtype=dt))
        ties_chunk(b, ms, w, thr, cut, 0, one, True, one, one, out)
        ties_chunk(b, ms, w, thr, cut, 0, one, False, one, one, out)
        dare_chunk(b, ms, w, np.zeros(2, dtype=np.uint64), 0, dt(0.5), True, one, one, out)
        dare_chunk(b, ms, w, np.zeros(2, dtype=np.uint64), 0, dt(0.5), False, one, one, out)
        var = np.empty(4, dtype=dt)
        welford_var(b, ms, var)
        if dt == np.float32:
            for models in (ms, ms[:1]):
                sce_first_pass(b, models, var, 1.0, np.uint32(0), np.uint32(1), np.empty((len(models), 16)),
                               np.empty(4, dtype=dt), np.empty(4, np.int64), np.empty((len(models), 4)),
                               np.empty(4, np.int64))
        energy_sums(b, ms, var, -1.0, 0, 0, np.empty(2))
        energy_sums(b, ms, b, -1.0, 0, 0, np.empty(2))
        for masked in (True, False):
            sce_chunk(b, ms, var, 0.5, 0, 0, masked, w, one, one, out)
    return time.perf_counter() - t
