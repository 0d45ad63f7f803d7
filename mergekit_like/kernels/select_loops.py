"""numba loops behind ``kernels/arcee_fusion.order_statistics`` (imported on first use).

A bracket q is lo[q] ≤ hi[q]; its two ends are counted (they may be atoms such as the exact
zeros of unchanged weights, too many to collect) and only the values strictly inside collected.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)


@njit(**_JIT)
def bracket_counts(a, lo, hi, counts):  # pragma: no cover - compiled
    """counts[q] += (#(a < lo), #(a = lo), #(lo < a < hi), #(a = hi > lo)) [nq, 4] int64."""
    for q in range(lo.size):                  # one simple loop per count: they vectorise
        lq, hq = lo[q], hi[q]
        below = at_lo = mid = at_hi = 0
        for j in range(a.size):
            v = a[j]
            below += 1 if v < lq else 0
            at_lo += 1 if v == lq else 0
            mid += 1 if (v > lq) & (v < hq) else 0
            at_hi += 1 if (v == hq) & (hq > lq) else 0
        counts[q, 0] += below
        counts[q, 1] += at_lo
        counts[q, 2] += mid
        counts[q, 3] += at_hi


@njit(**_JIT)
def bracket_collect(a, lo, hi, out, fill):  # pragma: no cover - compiled
    """out[q, fill[q]++] = each a with lo[q] < a < hi[q], in order. Branch-free: every value
    is stored and the fill advances only when it is inside, so ``out`` needs one spare
    column."""
    nq = lo.size
    for j in range(a.size):
        v = a[j]
        for q in range(nq):
            out[q, fill[q]] = v
            fill[q] += 1 if (v > lo[q]) & (v < hi[q]) else 0
