"""MAGPRUNE's keep bits from a counting rank of each row (numba; behind ``kernels/della.py``).

A row's rank order is that of the keys k = bits(|δ|) (uint32: for non-negative floats the bit
pattern orders like the value), equal keys ranked by decreasing column (the lowest index ranks
highest, ``ops.della.magprune_ranks``). ``keep_rows`` counts each row instead of sorting it:

1. keys (``_keys``): δ = x − b as float32 from the stored bits (or δ given), k_c = bits(|δ_c|),
   and the row's largest and smallest key (a row of one key, all zeros say, has ranks
   m − 1 − c: ``_all_tied``);
2. buckets (``bucket_shape``): exact zeros in bucket 0, every other key in
   bucket(k) = 1 + min(max(k >> S, lo) − lo, B − 2) with lo = max((k_max >> S) − (B − 2), 0):
   2^(23 − S) buckets per binade over the row's top binades (about m/32 per binade, 8
   binades), the smaller keys in bucket 1. Monotone in k, so an entry's rank lies in its
   bucket's range [low(q), low(q + 1) − 1]: the buckets (one vectorised pass), their histogram
   (``_hist``) and its prefix sum (``_prefix``) give low, and with it each bucket's thresholds
   at the ends of its range, threshold[low(q)] and threshold[low(q + 1) − 1]. The shape sets
   only the speed, never a bit;
3. the row's draws u_j (``ops.drop``'s SplitMix64 of flat index j, one vectorised pass), then
   column order (``_assign``, one pass): thresholds rise with the rank, so an entry
   of bucket q keeps when u_j < threshold[low(q)], drops when u_j ≥ threshold[low(q + 1) − 1],
   and else stays "open" (a few per row, more where many entries share a bucket: equal keys,
   or a row whose keys span more binades than the buckets cover), gathered behind one
   unsigned compare whose branch is rarely taken;
4. each open entry gets its exact rank (``_settle``): a zero's from one running count of the
   row's zeros (rows of unchanged entries leave hundreds open in bucket 0), any other's as
   #(j < c: k_j < k_c) + #(j > c: k_j ≤ k_c) counted over the row (``_count_below``), or, past
   ``OPEN_CAP`` of them (rows of a few repeated values), looked up in the row's sorted
   (key, −column) pairs.

The "l1" row sums Σ|δ| and Σ|keep·δ| (float64) come from the same keys (``_l1``). They are
exact when the row's total is below 2⁵³ units of its smallest binade's float32 ulp (then every
partial sum of these non-negative float32 values is a float64, in any order, so they equal
torch's row sums); ``keep_rows`` says when a row is not, and the caller sums that piece with
torch. Bit-equal to the ranks of torch's stable sort for finite δ (tests/kernels/
test_della_rank.py); ±0.0 is one key. Indices are unsigned where they can be: a signed index
costs numba's wrap-around select on every load.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from mergekit_like.kernels.fused_loops import _bits_to_f32, _f32, _f32_to_bits, _select
from mergekit_like.ops.drop import GOLDEN, MIX1, MIX2, U_SHIFT

_JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)
_REASSOC = dict(_JIT, fastmath={"reassoc"})   # for sums exact in any order
# numba's disk cache is keyed on this file: ops.drop's constants are frozen in at compile time
_GOLDEN, _MIX1, _MIX2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)
_U_SHIFT = np.uint64(U_SHIFT)
_ONE = np.uint32(1)
_LOW32 = np.uint64(0xFFFFFFFF)
SPAN = 5                                # buckets per binade: 2^(bit length of m − 1 − SPAN)
BINADES = 8                             # binades the buckets cover below the row's largest key
OPEN_CAP = 32                           # open entries a row counts one by one (else: sort)
_CHUNK = 1 << 24                        # keys one float32 count may take (exact below 2^24)


def bucket_shape(m: int) -> tuple[int, int]:
    """(S, B) for rows of m entries: bucket(k) uses the key's top 32 − S bits, B buckets."""
    j = max(0, min(23, m.bit_length() - 1 - SPAN))
    return 23 - j, BINADES << j


class Work:
    """One thread's work arrays of ``keep_rows`` for rows of m entries (reused across pieces):
    keys and their buckets uint32 [m], per bucket count uint32 [B] (all zero between rows) and
    the thresholds at its rank range's ends int32 [2B], open uint32 [m], draws int32 [m],
    pairs uint64 [m] (the sorted fallback)."""

    def __init__(self, m: int):
        self.m = m
        self.shift, self.buckets = bucket_shape(m)
        self.keys = np.empty(m, np.uint32)
        self.qs = np.empty(m, np.uint32)
        self.count = np.zeros(self.buckets, np.uint32)
        self.bounds = np.zeros(2 * self.buckets, np.int32)
        self.open = np.empty(m, np.uint32)
        self.draws = np.empty(m, np.int32)
        self.pairs = np.empty(m, np.uint64)

    def arrays(self) -> tuple:
        return (np.uint32(self.shift), np.uint32(self.buckets), self.keys, self.qs, self.count,
                self.bounds, self.open, self.draws, self.pairs)


def _delta(x, b, i):  # pragma: no cover - replaced by the overload inside compiled code
    raise NotImplementedError


@overload(_delta, inline="always")
def _delta_impl(x, b, i):
    if isinstance(b, types.NoneType):                   # x is δ itself (float32)
        return lambda x, b, i: x[i]
    return lambda x, b, i: _f32(x[i]) - _f32(b[i])      # δ = x − b from the stored bits


def _rows(b, s, m):  # pragma: no cover - replaced by the overload inside compiled code
    raise NotImplementedError


@overload(_rows, inline="always")
def _rows_impl(b, s, m):
    if isinstance(b, types.NoneType):
        return lambda b, s, m: b
    return lambda b, s, m: b[s:s + m]


@njit(**_JIT)
def _row_draws(key, j0, m, u):  # pragma: no cover - compiled (vectorises: no loads)
    """u[c] = u_{j0+c}, the row's draws: the top 24 bits (int32) of ``ops.drop``'s SplitMix64
    output j = j0 + c, its counter key + (j + 1)·GOLDEN stepped by one addition per entry
    rather than multiplied out (AVX2 has no 64-bit vector multiply to spare)."""
    z = key + np.uint64(j0) * _GOLDEN
    for c in range(m):
        z += _GOLDEN
        y = (z ^ (z >> np.uint64(30))) * _MIX1
        y = (y ^ (y >> np.uint64(27))) * _MIX2
        u[c] = np.int32((y ^ (y >> np.uint64(31))) >> _U_SHIFT)


@njit(**_JIT)
def _keys(xs, bs, m, keys):  # pragma: no cover - compiled (vectorises)
    """keys[c] = bits(|δ_c|) of one row (xs, bs: its slices); returns the largest and the
    smallest key."""
    top = np.uint32(0)
    bottom = np.uint32(0xFFFFFFFF)
    for c in range(m):
        k = _f32_to_bits(abs(_delta(xs, bs, c)))
        keys[c] = k
        top = max(top, k)
        bottom = min(bottom, k)
    return top, bottom


@njit(**_JIT)
def _all_tied(m, thresholds, u, keep):  # pragma: no cover - compiled (vectorises)
    """A row of one key (all zeros, say): ranks m − 1 − c, the lowest column ranks highest."""
    for c in range(m):
        keep[c] = u[c] < thresholds[m - 1 - c]


@njit(**_JIT)
def _floor(top, shift, last):  # pragma: no cover - compiled
    """lo: the row's bucket 1 holds the non-zero keys with k >> S ≤ lo (uint32)."""
    high = top >> shift
    return np.uint32(high - last) if high >= last else np.uint32(0)


@njit(**_JIT)
def _bucket(k, shift, lo, last):  # pragma: no cover - compiled
    """The bucket of key k, monotone in k: 0 for k = 0 (exact zeros: one key, however many),
    else 1 + min(max(k >> S, lo) − lo, B − 2)."""
    return _select(k == np.uint32(0), np.uint32(0), _ONE + min(max(k >> shift, lo) - lo, last))


@njit(**_JIT)
def _buckets(m, keys, shift, lo, last, qs):  # pragma: no cover - compiled (vectorises)
    for c in range(m):
        qs[c] = _bucket(keys[c], shift, lo, last)


@njit(**_JIT)
def _hist(m, qs, count):  # pragma: no cover - compiled
    for c in range(m):
        count[qs[c]] += _ONE


@njit(**_JIT)
def _prefix(m, nb, thresholds, count, bounds):  # pragma: no cover - compiled
    """Each bucket's thresholds at the ends of its rank range: with low(q) = #(entries in
    buckets below q), bounds[2q] = threshold[low(q)] and bounds[2q + 1] = threshold[low(q + 1)
    − 1] (clamped into the table for an empty bucket, whose bounds nothing reads); count
    zeroed for the next row. Returns #(k = 0), bucket 0's count."""
    zeros = count[0]
    run = np.uint32(0)
    last = np.uint32(m - 1)
    for q in range(nb):
        n = count[q]
        count[q] = 0
        bounds[2 * q] = thresholds[min(run, last)]
        run += n
        bounds[2 * q + 1] = thresholds[max(run, _ONE) - _ONE]
    return zeros


@njit(**_JIT)
def _assign(m, qs, bounds, u, keep, open_):  # pragma: no cover - compiled
    """Column order over one row (keep: its slice; u: its draws), one pass: an entry
    of bucket q keeps when u < threshold[low(q)] (keeps at any rank of its bucket), drops when
    u ≥ threshold[low(q + 1) − 1], else is gathered into ``open_`` (at the front). Returns
    how many."""
    nopen = np.uint64(0)
    for c in range(m):
        q = np.uint64(qs[c]) << np.uint64(1)
        uc = u[c]
        floor_t = bounds[q]
        keep[c] = uc < floor_t
        # one unsigned compare, floor ≤ u < ceiling: a branch taken for a few entries a row
        # predicts well, where a store into open_ for every entry cost 0.5 ns each
        if np.uint32(uc - floor_t) < np.uint32(bounds[q + np.uint64(1)] - floor_t):
            open_[nopen] = np.uint32(c)
            nopen += np.uint64(1)
    return nopen


@njit(**_REASSOC)
def _count_chunk(keys, k):  # pragma: no cover - compiled (vectorises)
    """#(keys < k) over fewer than 2²⁴ keys, counted in float32 lanes (exact below 2²⁴, so any
    order of the additions gives it; numba's integer sums widen to int64, half the lanes)."""
    n = np.float32(0)
    for j in range(keys.size):
        n += np.float32(1) if keys[j] < k else np.float32(0)
    return np.int64(n)


@njit(**_JIT)
def _count_below(keys, k):  # pragma: no cover - compiled
    """#(keys < k) (uint32 keys, any length)."""
    n = 0
    for s in range(0, keys.size, _CHUNK):
        n += _count_chunk(keys[s:s + _CHUNK], k)
    return n


@njit(**_JIT)
def _pair(k, c):  # pragma: no cover - compiled
    """(key, −column) as one uint64: ascending pairs are ascending ranks."""
    return (np.uint64(k) << np.uint64(32)) | (_LOW32 - np.uint64(c))


@njit(**_JIT)
def _settle(m, thresholds, keys, u, open_, nopen, keep, pairs, zeros):  # pragma: no cover
    """The exact rank of each open entry (``open_`` in column order; u: the row's draws;
    ``zeros``: #(k = 0)). A zero's is zeros − 1 − #(zeros before it), from one running count
    over the row; the others' #(j < c: k_j < k_c) + #(j > c: k_j < k_c + 1), counted, or for
    more than ``OPEN_CAP`` of them the position of (k_c, −c) among the row's sorted pairs."""
    rest = np.uint64(0)
    seen = 0
    start = np.uint64(0)
    for i in range(nopen):
        c = open_[i]
        if keys[c] != np.uint32(0):
            open_[rest] = c                 # rest ≤ i: the others move to the front
            rest += np.uint64(1)
            continue
        seen += _count_below(keys[start:c], _ONE)        # the zeros before c
        keep[c] = u[c] < thresholds[zeros - 1 - seen]
        seen += 1
        start = np.uint64(c) + np.uint64(1)
    if rest <= OPEN_CAP:
        for i in range(rest):
            c = open_[i]
            k = keys[c]
            r = _count_below(keys[:c], k) + _count_below(keys[c + _ONE:], np.uint32(k + _ONE))
            keep[c] = u[c] < thresholds[r]
        return
    for c in range(m):
        pairs[c] = _pair(keys[c], c)
    pairs.sort()
    for i in range(rest):
        c = open_[i]
        r = np.searchsorted(pairs, _pair(keys[c], c))
        keep[c] = u[c] < thresholds[r]


@njit(**_JIT)
def _emin(keys):  # pragma: no cover - compiled (vectorises)
    """The smallest non-zero key's binade (255 when every key is 0)."""
    least = np.uint32(0xFFFFFFFF)
    for c in range(keys.size):
        least = min(least, keys[c] - _ONE)  # 0 wraps to the largest
    return 255 if least == np.uint32(0xFFFFFFFF) else np.int64((least + _ONE) >> np.uint32(23))


@njit(**_REASSOC)
def _l1(m, keys, keep):  # pragma: no cover - compiled (exact sums: any order is the same)
    """(Σ float64|δ|, Σ float64|keep·δ|) of a row from its keys (keep: its slice)."""
    full = 0.0
    kept = 0.0
    for c in range(m):
        v = np.float64(_bits_to_f32(keys[c]))
        full += v
        kept += _select(keep[c], v, 0.0)
    return full, kept


@njit(**_JIT)
def _rank_row(m, thresholds, keys, shift, lo, last, nb, qs, count, bounds, u, keep, open_,
              pairs):  # pragma: no cover - compiled
    """Steps 2–4 for one row of keys with its draws u (keep: its slice)."""
    _buckets(m, keys, shift, lo, last, qs)
    _hist(m, qs, count)
    zeros = _prefix(m, nb, thresholds, count, bounds)
    nopen = _assign(m, qs, bounds, u, keep, open_)
    _settle(m, thresholds, keys, u, open_, nopen, keep, pairs, zeros)


@njit(**_JIT)
def keep_rows(x, b, m, j0, key, thresholds, keep, full, kept, l1, shift, nb, keys, qs, count,
              bounds, open_, u, pairs):  # pragma: no cover - compiled
    """MAGPRUNE's keep bits of a piece of whole rows of m entries, δ = x − b (bf16 bits as
    uint16 or float32, flat, the piece's length) or δ = x (float32) when b is None; j0: the
    flat index of its first entry; key: the draw key (uint64); thresholds [m] (int32)
    = floor(p(r)·2²⁴) per rank r; keep (flat bool, out); with ``l1``, full and kept [rows]
    float64 (out): the row sums of |δ| and |keep·δ|. The rest: ``Work.arrays()``.
    Returns False when some row's sums may differ from torch's (not exact)."""
    exact = True
    last = nb - np.uint32(2)                # the last non-zero bucket is 1 + last
    for r in range(x.size // m):
        s = r * m
        row = keep[s:s + m]
        top, bottom = _keys(x[s:s + m], _rows(b, s, m), m, keys)
        _row_draws(key, j0 + s, m, u)
        if top == bottom:
            _all_tied(m, thresholds, u, row)
        else:
            _rank_row(m, thresholds, keys, shift, _floor(top, shift, last), last, nb, qs,
                      count, bounds, u, row, open_, pairs)
        if l1:
            full[r], kept[r] = _l1(m, keys, row)
            exact &= full[r] < math.ldexp(1.0, max(_emin(keys), 1) - 97)
    return exact
