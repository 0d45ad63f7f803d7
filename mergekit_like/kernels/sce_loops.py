"""numba loops behind ``kernels/sce.py`` (imported on first use, like ``fused_loops``).

Arrays are flat; bf16 arrives as uint16 bit patterns (``fused_loops._f32``), the output is
written with torch's round-to-nearest-even (``fused_loops._store``). Each loop recomputes
T_ij = x_ij − b_j from the stored bytes (cheaper than keeping an [N, M] float32 stack) and makes,
per entry, the IEEE operations torch makes for the ``ops/sce.py`` step it replaces, in the same
order, so the bits are the same (tests/kernels/test_sce_kernel.py):

* ``variance``: ``torch.var(T, dim=0, unbiased=False)`` on CPU is Welford's update in float64
  (mean += d/n; m2 += d·(x − mean)), then m2/N rounded to float32;
* ``squares``: (T_ij·keep_j)² of one model, for torch's own mean (``kernels.sce.weights``);
* ``combine``: the select, the erase and the weighted mean; torch sums a reduction over dim 0
  of ≤ 4 rows from +0 in row order, which the loop repeats.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_like.kernels.fused_loops import _f32, _select, _store

_JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)


@njit(**_JIT)
def variance(b, xs, out):  # pragma: no cover - compiled
    """out[j] = population variance over i of x_ij − b_j (float32); returns #nonzero."""
    n = len(xs)
    nonzero = 0
    for j in range(b.size):
        bb = _f32(b[j])
        mean = 0.0
        m2 = 0.0
        for i in range(n):
            x = np.float64(_f32(xs[i][j]) - bb)
            d = x - mean
            mean = mean + d / np.float64(i + 1)
            m2 = m2 + d * (x - mean)
        v = np.float32(m2 / np.float64(n))
        out[j] = v
        nonzero += 1 if v != 0 else 0
    return nonzero


@njit(**_JIT)
def squares(b, x, keep, out):  # pragma: no cover - compiled
    """out[j] = ((x_j − b_j)·keep_j)², keep_j as 1.0 / 0.0."""
    for j in range(b.size):
        t = (_f32(x[j]) - _f32(b[j])) * (np.float32(1.0) if keep[j] else np.float32(0.0))
        out[j] = t * t


@njit(**_JIT)
def combine(b, xs, keep, weights, out, eps):  # pragma: no cover - compiled
    """out[j] = b_j + Σ_i w_i·e_ij·T_ij / max(Σ_i w_i·e_ij, eps), T_ij = (x_ij − b_j)·keep_j,
    e_ij = [sign(T_ij) = σ_j], σ_j = +1 where Σ_i T_ij ≥ 0 else −1; ``weights`` [N] float32.
    Branch-free (T_ij is recomputed in the second loop), so LLVM vectorises it."""
    n = len(xs)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for j in range(b.size):
        bb = _f32(b[j])
        f = _select(keep[j], one, zero)
        s = zero
        for i in range(n):
            s = s + (_f32(xs[i][j]) - bb) * f
        up = s >= zero
        num = zero
        den = zero
        for i in range(n):
            t = (_f32(xs[i][j]) - bb) * f
            agree = _select(up, t > zero, t < zero)        # sign(T) = σ
            e = weights[i] * _select(agree, one, zero)
            num = num + t * e
            den = den + e
        den = _select(den < eps, eps, den)
        _store(out, j, bb + num / den)
