"""numba loops behind ``kernels/della.py`` (imported on first use, like ``fused_loops``).

``row_keys`` packs each |δ_j| of a piece of whole rows with its column c as one uint64,
bits(|δ|)·2³² + (m − 1 − c): for non-negative floats the bit pattern orders like the value, so
an ascending sort of a row's keys lists its entries in ascending rank order, equal magnitudes
by decreasing column (the lowest index ranks highest, ``ops.della.magprune_ranks``' rule).
numpy sorts the rows (``np.sort`` is a vectorised sort for uint64); ``keep_from_sorted`` then
gives each entry its rank r = position and MAGPRUNE's keep bit: u_j (``ops.drop``'s SplitMix64
draw) below the threshold of rank r, from a table that ``ops.della.magprune_probs`` /
``keep_thresholds`` compute once per tensor (it depends on r, m, d and ε only); ``l1_terms``
gives the float64 terms of the "l1" rescale's sums in the same pass.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_like.kernels.fused_loops import _f32_to_bits, _select
from mergekit_like.ops.drop import GOLDEN, MIX1, MIX2, U_SHIFT

_JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)
_GOLDEN, _MIX1, _MIX2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)
_U_SHIFT = np.uint64(U_SHIFT)
_LOW = np.uint64(0xFFFFFFFF)


@njit(**_JIT)
def row_keys(delta, m, keys):  # pragma: no cover - compiled
    """keys[r, c] = bits(|δ[r·m + c]|) << 32 | (m − 1 − c) for a flat float32 piece of rows."""
    rows = delta.size // m
    for r in range(rows):
        for c in range(m):
            bits = np.uint64(_f32_to_bits(abs(delta[r * m + c])))
            keys[r, c] = (bits << np.uint64(32)) | np.uint64(m - 1 - c)


@njit(**_JIT)
def keep_from_sorted(keys, m, offset, key, thresholds, keep):  # pragma: no cover - compiled
    """keep[r·m + c] (flat bool, the piece's length) of MAGPRUNE for rows whose keys are sorted
    ascending; ``offset`` = the piece's first flat index (the draw's counter); ``thresholds``
    [m] int64 = floor(p(r)·2²⁴) for each rank r (the same for every row)."""
    rows = keys.shape[0]
    for r in range(rows):
        for p in range(m):
            c = m - 1 - np.int64(keys[r, p] & _LOW)
            i = r * m + c
            thr = thresholds[p]
            z = key + np.uint64(offset + i + 1) * _GOLDEN
            z = (z ^ (z >> np.uint64(30))) * _MIX1
            z = (z ^ (z >> np.uint64(27))) * _MIX2
            z = z ^ (z >> np.uint64(31))
            keep[i] = np.int64(z >> _U_SHIFT) < thr


@njit(**_JIT)
def l1_terms(delta, keep, full, kept):  # pragma: no cover - compiled
    """full = float64(|δ|), kept = float64(|δ·keep|) of a flat float32 piece: the terms the
    "l1" rescale sums (``TaskVectorMethod._l1_factors``: abs, ``δ.mul_(keep)``, abs, cast)."""
    for i in range(delta.size):
        d = delta[i]
        full[i] = np.float64(abs(d))
        kept[i] = np.float64(abs(d * _select(keep[i], np.float32(1), np.float32(0))))
