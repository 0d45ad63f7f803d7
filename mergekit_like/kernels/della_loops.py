"""numba loops behind ``kernels/della.py`` (imported on first use, like ``fused_loops``).

The bucketed rank and keep bits of each row, with the "l1" row sums, are ``della_rank``'s
``keep_rows`` (its ``Work`` holds a thread's arrays); this module is the one ``LazyLoops``
imports, so both come from here. ``l1_terms`` gives the float64 terms of the "l1" rescale's
sums for a piece whose row sums ``keep_rows`` could not make exactly (torch sums them).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mergekit_like.kernels.della_rank import Work, keep_rows  # noqa: F401 - the loops' API
from mergekit_like.kernels.fused_loops import _select

_JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)


@njit(**_JIT)
def l1_terms(delta, keep, full, kept):  # pragma: no cover - compiled
    """full = float64(|δ|), kept = float64(|δ·keep|) of a flat float32 piece: the terms the
    "l1" rescale sums (``TaskVectorMethod._l1_factors``: abs, ``δ.mul_(keep)``, abs, cast)."""
    for i in range(delta.size):
        d = delta[i]
        full[i] = np.float64(abs(d))
        kept[i] = np.float64(abs(d * _select(keep[i], np.float32(1), np.float32(0))))
