"""The breadcrumbs band (docs/methods/breadcrumbs.md §2) without a sort: keep = top(t + k) ∖
top(t), where top(m) = {|δ| > v_m} ∪ {the lowest-index copies of v_m that fit} and v_m is the
exact m-th largest |δ| found by ``kth_largest`` (the selection TIES uses, about one read pass per
threshold). Bit-equal to ``ops.breadcrumbs.outlier_keep_sorted``, the paper form.

``band_tops`` / ``band_piece_`` are the same band as two thresholds applied piece by piece
(the adapter's path for inputs known finite): δ ⊙ keep bit-equal to the sort's."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mergekit_like.kernels import fused_cpu
from mergekit_like.kernels.kth_largest import (SAMPLE_MAX, SAMPLE_MIN, SAMPLE_RUN, flat_nonzero,
                                               kth_largest, tie_cutoff, trim_threshold)
from mergekit_like.kernels.tiling import PIECE, Scratch, buffer, run_parallel
from mergekit_like.ops.breadcrumbs import outlier_counts, outlier_keep_sorted
from mergekit_like.tensor_task import TensorTask

INT64_MAX = 2**63 - 1


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
    sample = sample_runs(a)
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


def sample_runs(a: torch.Tensor) -> torch.Tensor:
    """Runs of ``SAMPLE_RUN`` consecutive entries at random starts (fixed seed), about n/32 of
    them clipped to [2^14, 2^17]; all of ``a`` when small. Only steers the brackets."""
    n = a.numel()
    size = min(SAMPLE_MAX, max(SAMPLE_MIN, n // 32))
    if n <= size:
        return a
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(n - SAMPLE_RUN + 1, (size // SAMPLE_RUN, 1), generator=g)
    return a[(starts + torch.arange(SAMPLE_RUN)).view(-1).to(a.device)]


class Top(NamedTuple):
    """top(m) of a tensor of n entries as thresholds: {|δ| > value} ∪ {|δ| = value at flat
    indices ≤ cutoff} (cutoff None: every copy of value); m ≤ 0 is empty, m ≥ n everything."""
    m: int
    n: int
    value: float = 0.0
    cutoff: int | None = None


def band_tops(task: TensorTask, x: torch.Tensor, density: float, gamma: float,
              scratch: Scratch) -> tuple[Top, Top]:
    """(top(t + k), top(t)) of |x − b| for the band keep = top(t + k) ∖ top(t), each v_m found
    by ``kth_largest.trim_threshold`` (the fused scan TIES uses, straight from the stored
    inputs, over the task's row spans in parallel: no whole-tensor δ or mask).

    The one liberty: when v_m = 0, the trim's cutoff is None (every zero in top(m)); the entries
    it adds or removes have δ = ±0, and ±0·keep is ±0 either way, so δ ⊙ keep keeps its bits."""
    top, keep = outlier_counts(density, gamma, task.numel)

    def top_of(m: int) -> Top:
        if m <= 0 or m >= task.numel:
            return Top(m, task.numel)
        kth, cutoff = trim_threshold(task, x, task.base, m, scratch)
        return Top(m, task.numel, kth.value, cutoff)

    return top_of(top + keep), top_of(top)


def fused_band(tops: tuple[Top, Top]) -> fused_cpu.Band:
    """The band keep = top(t + k) ∖ top(t) as the fused loops take it: each top(m) as (v, c),
    {|δ| > v} ∪ {|δ| = v at flat indices ≤ c}, the same sets ``top_piece`` builds."""
    def pair(top: Top) -> tuple[float, int]:
        if top.m <= 0:
            return (math.inf, -1)                 # nothing (|δ| finite)
        if top.m >= top.n:
            return (-1.0, -1)                     # everything (|δ| ≥ 0)
        return (top.value, INT64_MAX if top.cutoff is None else top.cutoff)
    return fused_cpu.Band(pair(tops[0]), pair(tops[1]))


def top_piece(a: torch.Tensor, top: Top, offset: int, out: torch.Tensor) -> torch.Tensor:
    """[bool, into ``out``] membership in ``top`` of a flat piece ``a`` = |δ| whose first entry
    has flat index ``offset``."""
    if top.m <= 0 or top.m >= top.n:
        return out.fill_(top.m > 0)
    if top.cutoff is None:
        return torch.ge(a, top.value, out=out)
    torch.gt(a, top.value, out=out)
    r = min(max(top.cutoff - offset + 1, 0), a.numel())
    if r:
        out[:r].logical_or_(a[:r] == top.value)
    return out


def band_piece_(delta: torch.Tensor, offset: int, tops: tuple[Top, Top],
                scratch: Scratch | None = None) -> torch.Tensor:
    """δ ← δ ⊙ (top(t + k) ∖ top(t)) in place on a flat piece at flat index ``offset``."""
    n = delta.numel()
    a = torch.abs(delta, out=buffer(scratch, "band_abs", delta))
    keep = top_piece(a, tops[0], offset, buffer(scratch, "band_keep", delta, torch.bool))
    if tops[1].m > 0:
        drop = top_piece(a, tops[1], offset, buffer(scratch, "band_drop", delta, torch.bool))
        keep.logical_and_(drop.logical_not_())
    return delta.mul_(keep[:n])
