"""numba loops behind ``kernels/ram.py`` (imported on first use, like ``fused_loops``).

Arrays are flat; bf16 arrives as uint16 bit patterns (``fused_loops._f32``), the output is
written with torch's round-to-nearest-even (``fused_loops._store``). Per entry the loops make
the float32 operations of ``ops.ram.ram_delta`` in its order: a_i = |T_i| > ε (ε as float32,
as torch compares with a scalar), c = Σ a_i, z_i = T_i·a_i, solo_i = z_i·[c = 1] (·λ_i),
shared_i = z_i·[c > 1] / max(c, 1), Δ = Σ_i (solo_i + shared_i) summed from +0 in model order
(torch's reduction over dim 0 of ≤ 4 rows), out = b + Δ.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_like.kernels.fused_loops import _f32, _select, _store

_JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)


@njit(**_JIT)
def counts(b, xs, eps, shared, unique):  # pragma: no cover - compiled
    """shared[i] += #(a_i ∧ c > 1), unique[i] += #(a_i ∧ c = 1) (int64 [N])."""
    n = len(xs)
    a = np.empty(n, np.bool_)
    for j in range(b.size):
        bb = _f32(b[j])
        c = 0
        for i in range(n):
            a[i] = abs(_f32(xs[i][j]) - bb) > eps
            c += 1 if a[i] else 0
        for i in range(n):
            if a[i]:
                if c > 1:
                    shared[i] += 1
                else:
                    unique[i] += 1


@njit(**_JIT)
def merge(b, xs, eps, scales, scaled, out):  # pragma: no cover - compiled
    """out[j] = b_j + Δ_j; ``scaled``: RAM+ (solo_i · scales[i], float32 [N]) or RAM.
    Branch-free (T_i is recomputed in the second loop), so LLVM vectorises it."""
    n = len(xs)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in range(b.size):
        bb = _f32(b[j])
        c = 0
        for i in range(n):
            c += _select(abs(_f32(xs[i][j]) - bb) > eps, 1, 0)
        u = _select(c == 1, one, zero)
        o = _select(c > 1, one, zero)
        cf = np.float32(max(c, 1))
        acc = zero
        for i in range(n):
            t = _f32(xs[i][j]) - bb
            z = t * _select(abs(t) > eps, one, zero)
            solo = z * u
            solo = _select(scaled, solo * scales[i], solo)
            acc = acc + (solo + (z * o) / cf)
        _store(out, j, bb + acc)
