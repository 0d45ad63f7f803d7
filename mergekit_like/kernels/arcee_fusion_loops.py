"""numba loops behind ``kernels/arcee_fusion.py``'s passes (imported on first use, like
``fused_loops``).

Arrays are flat; bf16 arrives as uint16 bit patterns (``fused_loops._f32``: exact), the output
is written with torch's round-to-nearest-even (``fused_loops._store``). Per entry the loops make
the float32 operations of ``ops.arcee_fusion`` in its order:

* ``importance``: imp = |b − a| · KL, KL the row's float32 value (torch's
  ``sub(b, a).abs_().mul_(kl)``); it returns whether some |b − a| overflowed to inf (finite inputs
  only: then Δ·0 would be a NaN, which the bf16 store spells differently from torch).
* ``fuse``: out = (b − a)·m + a, m = 1.0 if imp ≥ τ else 0.0 (torch's
  ``sub(b, a).mul_(keep.to(float32)).add_(a)``, so a dropped entry is (±0) + a, as there).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_like.kernels.fused_loops import _f32, _select, _store

_JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)


@njit(**_JIT)
def importance(a, b, kl, row, imp):  # pragma: no cover - compiled
    """imp[j] = |b_j − a_j| · kl[j // row] over len(kl) whole rows of ``row`` entries;
    returns 1 if some |b_j − a_j| = inf, else 0 (an int32 flag: an int64 count stops LLVM
    vectorising the float32 lanes, 3× slower)."""
    inf = np.float32(np.inf)
    over = np.int32(0)
    for r in range(kl.size):
        k = kl[r]
        s = r * row
        for j in range(s, s + row):
            d = abs(_f32(b[j]) - _f32(a[j]))
            over |= _select(d == inf, np.int32(1), np.int32(0))
            imp[j] = d * k
    return over


@njit(**_JIT)
def fuse(a, b, imp, tau, out):  # pragma: no cover - compiled
    """out[j] = (b_j − a_j)·[imp_j ≥ τ] + a_j in out's dtype (branch-free: it vectorises)."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in range(a.size):
        aa = _f32(a[j])
        m = _select(imp[j] >= tau, one, zero)
        _store(out, j, (_f32(b[j]) - aa) * m + aa)


@njit(**_JIT)
def collect3(a, lo, hi, out, fill):  # pragma: no cover - compiled
    """``select_loops.bracket_collect`` for three brackets (the quartiles): the same
    branch-free stores (out[q, fill[q]] = v, fill[q] += [lo[q] < v < hi[q]]), with the three
    fills and rows held in locals, which LLVM cannot do for the array fill (it may alias
    ``out``): 2× faster."""
    l0, l1, l2, h0, h1, h2 = lo[0], lo[1], lo[2], hi[0], hi[1], hi[2]
    f0, f1, f2 = fill[0], fill[1], fill[2]
    o0, o1, o2 = out[0], out[1], out[2]
    for j in range(a.size):
        v = a[j]
        o0[f0] = v
        f0 += 1 if (v > l0) & (v < h0) else 0
        o1[f1] = v
        f1 += 1 if (v > l1) & (v < h1) else 0
        o2[f2] = v
        f2 += 1 if (v > l2) & (v < h2) else 0
    fill[0], fill[1], fill[2] = f0, f1, f2
