"""MAGPRUNE's keep bits from a counting rank of each row (numba; behind ``kernels/della.py``).

A row's rank order is that of the keys k = bits(|δ|) (uint32: for non-negative floats the bit
pattern orders like the value), equal keys ranked by decreasing column (the lowest index ranks
highest, ``ops.della.magprune_ranks``). ``keep_rows`` counts each row instead of sorting it:

1. buckets (``_plan``, once per piece from its first row): each binade e = k >> 23 gets 2^j
   consecutive buckets, bucket(k) = off[e] + (mantissa >> (23 − j)), monotone in k; j = the
   mantissa bits its values use, at most about log2 of its count (2^j ≤ its count); each run
   of binades absent there shares one bucket. The plan sets only the speed, never a bit;
2. one pass (``_scan``): δ = x − b as float32 from the stored bits (or δ given), its key, its
   bucket q, seen = #(earlier columns in q) (the count before this entry's increment), and
   whether q may hold different keys ("loose": a key with mantissa bits below the bucket's
   resolution, or a shared bucket); a prefix sum (``_tops``) gives each bucket its top rank;
3. the row's draws u_j (``ops.drop``'s SplitMix64 of flat index j, one vectorised pass), then
   column order (``_assign``): u_j below the lowest rank's threshold keeps and u_j not below
   the highest rank's drops whatever the rank (about 1 − 2ε of the entries, settled without a
   load); for the rest, in a bucket that is not loose all keys are equal, so an entry's rank
   is top(q) − seen (among equal keys the lowest column ranks highest), and its keep bit
   u_j < threshold[rank]. In a
   loose bucket the rank lies in [low(q), top(q)]: thresholds rise with the rank, so the bit is
   known unless threshold[low] ≤ u_j < threshold[top] (rare: a few entries per row);
4. those open entries get their exact rank by counting the row (``_settle``):
   #(k_j < k_c, j < c) + #(k_j ≤ k_c, j > c).

The "l1" row sums Σ|δ| and Σ|keep·δ| (float64) come from the same keys (``_l1``). They are
exact when the row's total is below 2⁵³ units of its smallest binade's float32 ulp (then every
partial sum of these non-negative float32 values is a float64, in any order, so they equal
torch's row sums); ``keep_rows`` says when a row is not, and the caller sums that piece with
torch. Bit-equal to the ranks of torch's stable sort for finite δ (tests/kernels/
test_della_rank.py); ±0.0 is one key.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros
from numba.extending import overload

from mergekit_like.kernels.fused_loops import _bits_to_f32, _f32, _f32_to_bits, _select
from mergekit_like.ops.drop import GOLDEN, MIX1, MIX2, U_SHIFT

_JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)
# numba's disk cache is keyed on this file: ops.drop's constants are frozen in at compile time
_GOLDEN, _MIX1, _MIX2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)
_U_SHIFT = np.uint64(U_SHIFT)
_MANT = np.uint32(0x7FFFFF)
_LOW = np.uint64(0xFFFFFFFF)
_LOOSE = np.uint32(0x80000000)          # a bucket count's flag: it may hold several keys
SPREAD = -1                             # buckets per binade ≤ 2^(bit length of its count + this)


def bucket_slots(m: int) -> int:
    """Buckets a row of m entries may use (the plan's bound, see ``_plan``)."""
    return (2 << max(SPREAD, 0)) * m + 512


class Work:
    """One thread's work arrays of ``keep_rows`` for rows of m entries (reused across pieces):
    keys uint32 [m], slot uint64 [m], per bucket count uint32 (all zero between rows) and low
    uint32 [``bucket_slots(m)``], open int64 [m], plan uint64 [256], draws int32 [m]."""

    def __init__(self, m: int):
        self.m = m
        self.keys = np.empty(m, np.uint32)
        self.slot = np.empty(m, np.uint64)
        self.count = np.zeros(bucket_slots(m), np.uint32)
        self.low = np.empty(bucket_slots(m), np.uint32)
        self.open = np.empty(m, np.int64)
        self.plan = np.zeros(256, np.uint64)
        self.draws = np.empty(m, np.int32)

    def arrays(self) -> tuple:
        return self.keys, self.slot, self.count, self.low, self.open, self.plan, self.draws


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
def _draw(key, j):  # pragma: no cover - compiled
    """u_j: the top 24 bits of SplitMix64 output j (``ops.drop``), int64."""
    z = key + np.uint64(j + 1) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = z ^ (z >> np.uint64(31))
    return np.int64(z >> _U_SHIFT)


@njit(**_JIT)
def _plan(x, b, m, plan, counts, bits):  # pragma: no cover - compiled
    """plan[e] = first bucket << 6 | shared << 5 | mantissa shift of binade e, from row 0 of
    x − b: a binade with n entries there gets 2^j buckets, j = min(its values' mantissa bits,
    bit length of n + SPREAD); each run of binades absent there shares one bucket (``shared``:
    its keys may differ in the exponent). ``counts``, ``bits``: int64 [256] scratch. Returns
    the number of buckets."""
    counts[:] = 0
    bits[:] = 0
    for c in range(m):
        k = _f32_to_bits(abs(_delta(x, b, c)))
        e = np.int64(k >> np.uint32(23))
        counts[e] += 1
        bits[e] |= np.int64(k & _MANT)
    nb = np.int64(0)
    for e in range(256):
        n = counts[e]
        if n == 0:
            if e > 0 and counts[e - 1] == 0:
                plan[e] = plan[e - 1]           # the run's one bucket
            else:
                plan[e] = (nb << np.int64(6)) | np.int64(32 + 23)
                nb += 1
            continue
        need = 0 if bits[e] == 0 else 23 - np.int64(trailing_zeros(np.uint64(bits[e])))
        room = max(0, 64 - np.int64(leading_zeros(np.uint64(n))) + SPREAD)
        j = min(need, room)
        plan[e] = (nb << np.int64(6)) | np.int64(23 - j)
        nb += np.int64(1) << j
    return nb


@njit(**_JIT)
def _bucket(plan, k):  # pragma: no cover - compiled
    """(bucket of key k as uint64, whether k may differ from its bucket's other keys: mantissa
    bits below the bucket's resolution, or a shared bucket)."""
    p = plan[k >> np.uint32(23)]
    shift = p & np.uint64(31)
    mant = np.uint64(k & _MANT)
    loose = ((mant & ((np.uint64(1) << shift) - np.uint64(1))) | (p & np.uint64(32))) != 0
    return (p >> np.uint64(6)) + (mant >> shift), loose


@njit(**_JIT)
def _scan(xs, bs, m, plan, keys, slot, count):  # pragma: no cover - compiled
    """One row (xs, bs: its slices): keys[c] = bits(|δ|), slot[c] = its bucket << 32 |
    #(earlier columns in that bucket); each bucket's count (bit 31: it may hold several
    values). Returns the smallest non-zero binade (255 when none)."""
    emin = np.uint32(255)
    for c in range(m):
        k = _f32_to_bits(abs(_delta(xs, bs, c)))
        keys[c] = k
        q, loose = _bucket(plan, k)
        old = count[q]
        count[q] = (old + np.uint32(1)) | _select(loose, _LOOSE, np.uint32(0))
        slot[c] = (q << np.uint64(32)) | np.uint64(old & ~_LOOSE)
        emin = min(emin, _select(k == np.uint32(0), np.uint32(255), k >> np.uint32(23)))
    return np.int64(emin)


@njit(**_JIT)
def _tops(nb, count, low):  # pragma: no cover - compiled
    """count[q] ← the bucket's highest rank (bit 31 kept: it may hold several values); low[q]
    its lowest rank for those that may."""
    run = np.uint32(0)
    for q in range(nb):
        cq = count[q]
        n = cq & ~_LOOSE
        count[q] = (run + n - np.uint32(1)) | (cq & _LOOSE)
        if cq & _LOOSE:
            low[q] = run
        run += n


@njit(**_JIT)
def _row_draws(key, j0, m, u):  # pragma: no cover - compiled (vectorises: no loads)
    """u[c] = u_{j0+c}, the row's draws (24 bits, int32)."""
    for c in range(m):
        u[c] = np.int32(_draw(key, j0 + c))


@njit(**_JIT)
def _assign(m, thresholds, slot, top, low, u, keep, open_):  # pragma: no cover - compiled
    """Column order over one row (keep: its slice; u: its draws). Thresholds rise with the rank,
    so u below the lowest rank's keeps and u not below the highest rank's drops whatever the
    rank: one branch-free pass settles those (about 1 − 2ε of the row) and gathers the rest,
    "mid", into ``open_``. A mid entry of a single-valued bucket has rank top − seen (the
    lowest column of equal keys ranks highest) and keep bit u < threshold[rank]; in a loose
    bucket the bit is known when u is below the threshold of its lowest rank or not below that
    of its highest, else the column stays in ``open_`` (at the front). Returns how many did."""
    t_lo, t_hi = thresholds[0], thresholds[m - 1]
    nmid = 0
    for c in range(m):
        uc = u[c]
        keep[c] = uc < t_lo
        open_[nmid] = c
        nmid += np.int64((uc >= t_lo) & (uc < t_hi))
    nopen = 0
    for i in range(nmid):
        c = open_[i]
        sl = slot[c]
        q = sl >> np.uint64(32)
        t = top[q]
        uc = u[c]
        if t & _LOOSE:
            lo = thresholds[low[q]]
            if uc >= lo and uc < thresholds[t & ~_LOOSE]:
                open_[nopen] = c                # nopen ≤ i: the mid list is read ahead of it
                nopen += 1
            keep[c] = uc < lo
        else:
            keep[c] = uc < thresholds[t - np.uint32(sl & _LOW)]
    return nopen


@njit(**_JIT)
def _settle(m, j0, key, thresholds, keys, open_, nopen, keep):  # pragma: no cover - compiled
    """The exact rank of each open entry: #(k_j < k_c, j < c) + #(k_j ≤ k_c, j > c)."""
    for i in range(nopen):
        c = open_[i]
        k = keys[c]
        r = np.int64(0)
        for j in range(c):
            r += np.int64(keys[j] < k)
        for j in range(c + 1, m):
            r += np.int64(keys[j] <= k)
        keep[c] = _draw(key, j0 + c) < thresholds[r]


@njit(nogil=True, cache=True, error_model="numpy", boundscheck=False, fastmath={"reassoc"})
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
def keep_rows(x, b, m, j0, key, thresholds, keep, full, kept, l1, keys, slot, count, low, open_,
              plan, u):  # pragma: no cover - compiled
    """MAGPRUNE's keep bits of a piece of whole rows of m entries, δ = x − b (bf16 bits as
    uint16 or float32, flat, the piece's length) or δ = x (float32) when b is None; j0: the
    flat index of its first entry; key: the draw key (uint64); thresholds [m] (int32 or int64)
    = floor(p(r)·2²⁴) per rank r; keep (flat bool, out); with ``l1``, full and kept [rows]
    float64 (out): the row sums of |δ| and |keep·δ|. The rest: ``Work.arrays()``.
    Returns False when some row's sums may differ from torch's (not exact)."""
    nb = _plan(x, b, m, plan, np.empty(256, np.int64), np.empty(256, np.int64))
    exact = True
    for r in range(x.size // m):
        s = r * m
        row = keep[s:s + m]
        emin = _scan(x[s:s + m], _rows(b, s, m), m, plan, keys, slot, count)
        _tops(nb, count, low)
        _row_draws(key, j0 + s, m, u)
        nopen = _assign(m, thresholds, slot, count, low, u, row, open_)
        count[:nb] = 0
        _settle(m, j0 + s, key, thresholds, keys, open_, nopen, row)
        if l1:
            full[r], kept[r] = _l1(m, keys, row)
            exact &= full[r] < math.ldexp(1.0, max(emin, 1) - 97)
    return exact
