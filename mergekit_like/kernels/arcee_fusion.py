"""Arcee Fusion's threshold (``ops.arcee_fusion.fusion_threshold``) by one bracketed selection.

The definition takes the three quartiles with three ``torch.kthvalue`` calls, each of which
copies and partially sorts the whole importance tensor. Here (CPU, float32) a sample brackets
each quartile, one compiled pass counts the values below, at each end of (an end may be an atom,
such as the zeros of unchanged weights) and inside each bracket, and a second collects those
strictly inside; the order statistic is then selected (``np.partition``) among them.
A missed bracket (rare: ±4 standard deviations of the sample quantile) falls back to
``np.partition`` of the whole tensor. τ is then formed with the same float32 tensor operations.
The same value (tests/kernels/test_arcee_fusion_kernel.py; bit for bit except, possibly, the
sign of a zero τ, which ``imp ≥ τ`` cannot see); a tensor holding NaN takes the definition.
"""

from __future__ import annotations

import math
import numpy as np
import torch

from mergekit_like.kernels.breadcrumbs import sample_runs
from mergekit_like.kernels.lazy_numba import LazyLoops, enabled
from mergekit_like.ops.arcee_fusion import IQR_FACTOR, fusion_threshold as reference, \
    quantile_indices

MARGIN = 4.0
"""Bracket half-width in standard deviations of the sample quantile."""


def _smoke(loops) -> None:
    z = np.zeros(1, np.float32)
    loops.bracket_counts(z, z, z, np.zeros((1, 4), np.int64))


LOOPS = LazyLoops("mergekit_like.kernels.select_loops", _smoke, "selection loops")
warm_up = LOOPS.warm_up


def order_statistics(a: np.ndarray, positions: list[int]) -> list[float]:
    """The values at 0-based ``positions`` of the ascending order of flat float32 ``a``
    (no NaN): ``np.partition(a, positions)[positions]``, without partitioning all of ``a``."""
    n, loops = a.size, LOOPS.get()
    sample = np.sort(sample_runs(torch.from_numpy(a)).numpy())
    s = sample.size
    if loops is None or s == n:
        part = np.partition(a, positions)
        return [float(part[i]) for i in positions]
    lo, hi = np.empty(len(positions), np.float32), np.empty(len(positions), np.float32)
    for q, i in enumerate(positions):
        f = i / max(1, n - 1)
        half = MARGIN * math.sqrt(s * f * (1.0 - f)) + 2.0
        i_lo, i_hi = math.floor(f * s - half), math.ceil(f * s + half)
        lo[q] = sample[i_lo] if i_lo >= 0 else -np.inf
        hi[q] = sample[i_hi] if i_hi < s else np.inf
    counts = np.zeros((len(positions), 4), np.int64)
    loops.bracket_counts(a, lo, hi, counts)
    values = [_in_bracket(i, float(lo[q]), float(hi[q]), counts[q])
              for q, i in enumerate(positions)]
    if any(v is None for v in values):
        part = np.partition(a, positions)        # a missed bracket: the whole tensor
        return [float(part[i]) for i in positions]
    mids = [q for q, v in enumerate(values) if isinstance(v, int)]
    if mids:
        out = np.empty((len(positions), int(counts[:, 2].max()) + 1), np.float32)
        loops.bracket_collect(a, lo, hi, out, np.zeros(len(positions), np.int64))
        for q in mids:
            r = values[q]
            values[q] = float(np.partition(out[q, :counts[q, 2]], r)[r])
    return values


def _in_bracket(i: int, lo: float, hi: float, counts: np.ndarray) -> float | int | None:
    """Where position i falls given a bracket's counts (below, at lo, strictly inside, at
    hi): the value lo or hi (float), the rank r among the inside values (int), or None (miss)."""
    below, at_lo, mid, at_hi = (int(c) for c in counts)
    if i < below:
        return None
    if i < below + at_lo:
        return lo
    if i < below + at_lo + mid:
        return i - below - at_lo
    if i < below + at_lo + mid + at_hi:
        return hi
    return None


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """τ = Q(0.5) + 1.5·(Q(0.75) − Q(0.25)) over every element (n ≥ 1): a 0-d tensor of the
    importance's dtype, equal to ``ops.arcee_fusion.fusion_threshold``."""
    flat = importance.reshape(-1)
    if flat.device.type != "cpu" or flat.dtype != torch.float32 or not enabled() \
            or bool(torch.isnan(flat).any()):
        return reference(importance)
    q1, med, q3 = (torch.tensor(v, dtype=flat.dtype)
                   for v in order_statistics(flat.contiguous().numpy(),
                                             list(quantile_indices(flat.numel()))))
    return med + IQR_FACTOR * (q3 - q1)
