"""The breadcrumbs band (docs/methods/breadcrumbs.md §2) without a sort: keep = top(t + k) ∖
top(t), where top(m) = {|δ| > v_m} ∪ {the lowest-index copies of v_m that fit} and v_m is the
exact m-th largest |δ| found by ``kth_largest`` (the selection TIES uses, about one read pass per
threshold). Bit-equal to ``ops.breadcrumbs.outlier_keep_sorted``, the paper form."""

from __future__ import annotations

import torch

from mergekit_like.kernels.kth_largest import (SAMPLE_MAX, SAMPLE_MIN, SAMPLE_RUN, flat_nonzero,
                                               kth_largest, tie_cutoff)
from mergekit_like.kernels.tiling import PIECE, Scratch, run_parallel
from mergekit_like.ops.breadcrumbs import outlier_counts, outlier_keep_sorted


def outlier_keep(delta: torch.Tensor, density: float, gamma: float,
                 workers: int = 1) -> torch.Tensor:
    """``outlier_keep_sorted``'s mask by two exact selections instead of a sort: keep =
    top(t + k) ∖ top(t). ``workers`` threads scan consecutive parts of |δ| at once.
    A tensor holding NaN or ±inf takes the sort (its order of non-finite values is the rule).

    Memory: |δ| (float) and three bool masks of n entries."""
    n = delta.numel()
    if density >= 1.0:
        return torch.ones(n, dtype=torch.bool, device=delta.device)
    top, keep = outlier_counts(density, gamma, n)
    a = delta.reshape(-1).abs()
    if n == 0 or not bool(torch.isfinite(a.max())):
        return outlier_keep_sorted(delta, density, gamma)
    sample = _sample(a)
    mask = top_mask(a, top + keep, sample, workers)
    if top > 0:
        mask &= top_mask(a, top, sample, workers).logical_not_()
    return mask


def top_mask(a: torch.Tensor, m: int, sample: torch.Tensor, workers: int = 1) -> torch.Tensor:
    """[flat n, bool]: the m largest entries of the flat non-negative finite ``a``, ties by
    lowest flat index (the first m of a stable descending sort), 0 ≤ m ≤ n."""
    n = a.numel()
    if m <= 0 or m >= n:
        return torch.full((n,), m > 0, dtype=torch.bool, device=a.device)
    parts = _parts(n, workers)
    sources = [lambda lo=lo, hi=hi: ((o, a[o:min(o + PIECE, hi)]) for o in range(lo, hi, PIECE))
               for lo, hi in parts]
    scratches = [Scratch(a.dtype, a.device) for _ in parts]
    kth = kth_largest(sources, n, m, sample, scratch=scratches,
                      run=lambda calls: run_parallel(calls, workers))
    mask = torch.gt(a, kth.value)
    eq = torch.eq(a, kth.value)
    need = m - kth.above                          # copies of v_m that fit, lowest index first
    if need < kth.equal:
        eq[_cutoff(a, kth, need) + 1:] = False
    return mask.logical_or_(eq)


def _cutoff(a: torch.Tensor, kth, need: int) -> int:
    """Flat index of the last copy of v_m that top(m) keeps (the ``need``-th copy)."""
    if kth.cutoff is not None:
        return kth.cutoff
    if kth.tie_piece is not None:
        off, length, r = kth.tie_piece
        return off + int(flat_nonzero(a[off:off + length] == kth.value)[r - 1])
    pieces = ((o, a[o:o + PIECE]) for o in range(0, a.numel(), PIECE))
    return tie_cutoff(pieces, kth.value, need)


def _parts(n: int, workers: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges cutting n entries into up to ``workers`` consecutive parts of whole
    pieces."""
    count = max(1, min(workers, -(-n // PIECE)))
    cuts = [round(i * n / count / PIECE) * PIECE for i in range(count)] + [n]
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


def _sample(a: torch.Tensor) -> torch.Tensor:
    """Runs of ``SAMPLE_RUN`` consecutive entries at random starts (fixed seed), about n/32 of
    them clipped to [2^14, 2^17]; all of ``a`` when small. Only steers the brackets."""
    n = a.numel()
    size = min(SAMPLE_MAX, max(SAMPLE_MIN, n // 32))
    if n <= size:
        return a
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(n - SAMPLE_RUN + 1, (size // SAMPLE_RUN, 1), generator=g)
    return a[(starts + torch.arange(SAMPLE_RUN)).view(-1).to(a.device)]
