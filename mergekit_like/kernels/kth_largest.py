"""The exact k-th largest |δ| of a tensor without sorting it (docs/methods/ties.md §3).

``ops/trim.py`` defines the trim by a sort: keep the k largest |δ|, ties at v_k by lowest flat
index. Sorting (or ``torch.topk``) a large tensor is the slow part of TIES, so v_k and the tie
cutoff are found here in about one read pass: a random sample of |δ| brackets v_k, one pass counts
the entries above the bracket and collects those inside it, and a selection on that small set
gives v_k; a missed bracket is widened and the pass repeated. When the k-th largest value is tied
and only some of its copies fit, the cutoff index is found among the collected indices, in the one
counted piece that holds it, or by a second pass. ``ops.trim.trim_piece_`` then applies the trim.
The result is the sort's exactly (tests/kernels/test_kth_largest.py).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from mergekit_like.kernels import fused_cpu
from mergekit_like.kernels.tiling import Scratch, buffer, pieces, run_parallel, spans
from mergekit_like.tensor_task import TensorTask
from mergekit_like.ops.task_vectors import task_vector
from mergekit_like.ops.trim import next_float

SAMPLE_MIN, SAMPLE_MAX = 1 << 14, 1 << 17
SAMPLE_RUN = 64
MARGINS = (4.0, 30.0)
"""Bracket half-widths in standard deviations of the sample quantile; then the whole range."""


class KthLargest(NamedTuple):
    """v = k-th largest value; ``above`` = #entries > v; ``equal`` = #entries == v; ``cutoff``
    = flat index of the last copy of v that top-k keeps (lowest indices first) when only some
    fit and they were seen in the collected set, else None; ``passes`` = read passes made;
    ``tie_piece`` = (offset, length, r) when only some copies of v fit and v was counted, not
    collected: the last kept copy is the r-th copy of v in that piece (no extra pass needed)."""
    value: float
    above: int
    equal: int
    passes: int
    cutoff: int | None = None
    tie_piece: tuple[int, int, int] | None = None


PieceSource = Callable[[], Iterable[tuple[int, torch.Tensor]]]
Scan = Callable[[float, float, float, float, bool, bool, bool], tuple]
"""One read pass over one part: (lo, hi, c_lo, c_hi, hi_open, lo_open, collect) → the tuple
of ``scan_pass`` (``fused_cpu.scan_abs_delta`` is the fused one)."""


def _count(mask: torch.Tensor) -> int:
    """Number of ones of a 0/1 float mask (exact: float sums of 0/1 are exact below 2^24)."""
    if mask.numel() < (1 << 24):
        return int(mask.sum().item())
    return int(torch.count_nonzero(mask).item())


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """int64 indices of the true entries of a flat bool mask. On CPU numpy's scan is ~4× faster
    than ``torch.nonzero`` (the hot spot of collecting a bracket)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().view(-1)


def sorted_values(t: torch.Tensor) -> torch.Tensor:
    """A flat tensor's values in ascending order. On CPU numpy's sort is ~20× faster than
    ``torch.sort`` and 4× faster than one ``torch.kthvalue`` on 2^17 floats."""
    if t.device.type == "cpu":
        return torch.from_numpy(np.sort(t.reshape(-1).numpy()))
    return t.reshape(-1).sort().values


def kth_smallest(t: torch.Tensor, j: int) -> float:
    """The j-th smallest value (1-based) of a flat tensor; numpy's introselect on CPU."""
    if t.device.type == "cpu":
        return float(np.partition(t.numpy(), j - 1)[j - 1])
    return float(t.kthvalue(j).values)


def kth_largest(abs_pieces: PieceSource | Sequence[PieceSource], numel: int, k: int,
                sample: torch.Tensor, margins: tuple[float, ...] = MARGINS,
                scratch: Scratch | Sequence[Scratch] | None = None,
                run: Callable[[list[Callable[[], Any]]], list[Any]] | None = None) -> KthLargest:
    """Exact k-th largest of a non-negative tensor seen as pieces, 1 ≤ k ≤ numel.

    ``abs_pieces()`` yields (flat offset, flat float piece) covering the tensor (any cut, any
    order; a piece may be a reused buffer); it is called once per pass. It may also be a list
    of such sources, consecutive parts of the tensor in order, each with its own ``scratch``
    (a list too): ``run`` (e.g. ``tiling.run_parallel``) then scans the parts of a pass at
    once. ``sample`` is a random sample of the values (or all of them) used to bracket the
    answer; it only affects speed and memory. See ``kth_largest_scanned`` for the passes.
    """
    sources = list(abs_pieces) if isinstance(abs_pieces, (list, tuple)) else [abs_pieces]
    scratches = list(scratch) if isinstance(scratch, (list, tuple)) else [scratch] * len(sources)
    scans = [partial(scan_pass, src, scr) for src, scr in zip(sources, scratches)]
    return kth_largest_scanned(scans, numel, k, sample, margins, run)


class _Bracket(NamedTuple):
    """One pass's bracket lo ≤ hi; c_lo, c_hi: the collected range (an open end moved one
    value inward); ``collect``: whether anything can be collected."""
    lo: float
    hi: float
    c_lo: float
    c_hi: float
    hi_open: bool
    lo_open: bool
    collect: bool


class _Miss(NamedTuple):
    """v_k lies outside the bracket: known_lo < v_k < known_hi bound the next one."""
    known_lo: float
    known_hi: float


def kth_largest_scanned(scans: Sequence[Scan], numel: int, k: int, sample: torch.Tensor,
                        margins: tuple[float, ...] = MARGINS,
                        run: Callable[[list[Callable[[], Any]]], list[Any]] | None = None
                        ) -> KthLargest:
    """``kth_largest`` over parts given as ``Scan`` functions (one per consecutive part).

    One pass over a bracket lo ≤ hi counts #(> hi) and collects the values in [lo, hi]. An end
    that looks like an atom (repeated in the sample, e.g. the exact zeros of unchanged weights)
    or that is a known strict bound is left open instead and its entries are counted, not
    collected: #(≥ hi), #(≥ lo). Ranked from the top, k then falls in [> hi], [= hi], the
    collected set (its order statistic), [= lo], or outside the bracket: a
    miss, which bounds the next, wider bracket. The last bracket is everything left.
    Per-piece temporaries come from ``scratch`` when given.
    """
    if not 1 <= k <= numel:
        raise ValueError(f"k={k} outside [1, {numel}]")
    run = run or (lambda calls: [c() for c in calls])
    srt = sorted_values(sample)
    q = (numel - k) / numel                      # fraction of entries below v_k
    known = _Miss(-math.inf, math.inf)           # v_k > known_lo and v_k < known_hi
    for attempt in range(len(margins) + 1):
        margin = margins[attempt] if attempt < len(margins) else None
        br = _bracket(srt, q, margin, known)
        parts = run([partial(scan, *br) for scan in scans])
        found = _locate(k, br, parts, srt, attempt + 1, known)
        if isinstance(found, KthLargest):
            return found
        known = found
    raise AssertionError("kth_largest: the full bracket cannot miss")  # pragma: no cover


def _bracket(srt: torch.Tensor, q: float, margin: float | None, known: _Miss) -> _Bracket:
    """The bracket of one pass: ±``margin`` standard deviations of the sample quantile q within
    the known bounds (margin None, or an empty sample: the known bounds themselves)."""
    s, dtype = srt.numel(), srt.dtype
    lo, hi = known
    if margin is not None and s > 0:
        half = margin * math.sqrt(s * q * (1.0 - q)) + 2.0
        i_lo, i_hi = math.floor(q * s - half), math.ceil(q * s + half)
        lo = max(lo, float(srt[i_lo]) if i_lo >= 0 else -math.inf)
        hi = min(hi, float(srt[i_hi]) if i_hi < s else math.inf)
        if lo > hi:
            lo, hi = known

    def atom(v: float) -> bool:                    # v occurs at least twice in the sample
        at = torch.tensor([v], dtype=dtype, device=srt.device)
        first = int(torch.searchsorted(srt, at))
        return first + 1 < s and float(srt[first + 1]) == v

    hi_open = hi < math.inf and (hi == known.known_hi or lo == hi or atom(hi))
    lo_open = -math.inf < lo < hi and (lo == known.known_lo or atom(lo))
    c_lo = next_float(lo, math.inf, dtype) if lo_open else lo
    c_hi = next_float(hi, -math.inf, dtype) if hi_open else hi
    return _Bracket(lo, hi, c_lo, c_hi, hi_open, lo_open, lo < hi and c_lo <= c_hi)


def _locate(k: int, br: _Bracket, parts: list[tuple], srt: torch.Tensor, passes: int,
            known: _Miss) -> KthLargest | _Miss:
    """Where rank k falls given one pass's counts (summed over the parts), from the top:
    [> hi], [= hi] (open), the collected set, [= lo] (open); else the tighter bounds."""
    gt_hi, ge_hi, ge_lo = (sum(p[i] for p in parts) for i in range(3))
    inside = [t for p in parts for t in p[3]]
    where = [t for p in parts for t in p[4]]
    eq_hi = [c for p in parts for c in p[5]]     # per piece: copies of hi, of lo (open ends)
    eq_lo = [c for p in parts for c in p[6]]
    above = gt_hi
    if k <= above:                               # miss: v_k > hi
        return _Miss(br.hi, known.known_hi)
    if br.hi_open:
        if k <= ge_hi:
            equal = ge_hi - gt_hi
            part = _tie_piece(eq_hi, k - gt_hi) if k - gt_hi < equal else None
            return KthLargest(br.hi, gt_hi, equal, passes, None, part)
        above = ge_hi
    coll = torch.cat(inside) if inside else srt[:0]
    m = coll.numel()
    if k <= above + m:
        r = k - above                            # r-th largest of the collected set
        v = kth_smallest(coll, m - r + 1)
        above += int((coll > v).sum())
        ties = torch.cat(where)[coll == v]
        cutoff = None
        if k - above < ties.numel():             # only the lowest-index copies fit
            cutoff = int(ties.sort().values[k - above - 1])
        return KthLargest(float(v), above, ties.numel(), passes, cutoff)
    above += m
    if br.lo_open and k <= ge_lo:
        equal = ge_lo - above
        part = _tie_piece(eq_lo, k - above) if k - above < equal else None
        return KthLargest(br.lo, above, equal, passes, None, part)
    return _Miss(known.known_lo, br.lo)          # miss: v_k < lo


def _tie_piece(counts: list[tuple[int, int, int]], need: int) -> tuple[int, int, int]:
    """The piece holding the ``need``-th copy (row-major) of a value counted per piece as
    (offset, length, copies in the piece), and that copy's rank within the piece."""
    seen = 0
    for off, n, c in counts:
        if seen + c >= need:
            return off, n, need - seen
        seen += c
    raise ValueError(f"fewer than {need} copies counted")  # pragma: no cover


def scan_pass(abs_pieces: PieceSource, scratch: Scratch | None, lo: float, hi: float,
              c_lo: float, c_hi: float, hi_open: bool, lo_open: bool, collect: bool) -> tuple:
    """One pass of ``kth_largest`` over one part: #(> hi), #(≥ hi), #(≥ lo), the collected
    values in [c_lo, c_hi] with their flat indices, and per-piece copies of hi and of lo."""
    gt_hi = ge_hi = ge_lo = 0
    inside: list[torch.Tensor] = []
    where: list[torch.Tensor] = []
    eq_hi: list[tuple[int, int, int]] = []
    eq_lo: list[tuple[int, int, int]] = []
    for off, a in abs_pieces():
        tmp = buffer(scratch, "kth_tmp", a)
        gt_p = ge_p = coll_p = 0
        if hi < math.inf:
            gt_p = _count(torch.gt(a, hi, out=tmp))
            if hi_open:
                ge_p = _count(torch.ge(a, hi, out=tmp))
                eq_hi.append((off, a.numel(), ge_p - gt_p))
        if collect:
            torch.clamp(a, c_lo, c_hi, out=tmp)
            torch.eq(tmp, a, out=tmp)           # c_lo ≤ a ≤ c_hi
            coll_p = _count(tmp)
            if coll_p:
                idx = flat_nonzero(buffer(scratch, "kth_mask", a, torch.bool).copy_(tmp))
                inside.append(a[idx])
                where.append(idx.add_(off))
        if lo_open:
            ge_lo_p = _count(torch.ge(a, lo, out=tmp))
            ge_lo += ge_lo_p
            eq_lo.append((off, a.numel(), ge_lo_p - coll_p - (ge_p if hi_open else gt_p)))
        gt_hi += gt_p
        ge_hi += ge_p
    return gt_hi, ge_hi, ge_lo, inside, where, eq_hi, eq_lo


def tie_cutoff(abs_pieces: Iterable[tuple[int, torch.Tensor]], value: float, need: int,
               scratch: Scratch | None = None) -> int:
    """Flat index of the ``need``-th entry (1-based, in row-major order) equal to ``value``.

    ``abs_pieces`` yields (flat offset, values) in increasing offset order; stops early."""
    seen = 0
    for off, a in abs_pieces:
        eq = torch.eq(a, value, out=buffer(scratch, "tie_eq", a))
        c = _count(eq)
        if seen + c >= need:
            mask = buffer(scratch, "tie_mask", a, torch.bool).copy_(eq)
            return off + int(flat_nonzero(mask)[need - seen - 1])
        seen += c
    raise ValueError(f"fewer than {need} entries equal {value}")


def sample_abs_delta(task: TensorTask, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|δ| at min(numel, ~numel/32 clipped to [2^14, 2^17]) flat indices: runs of
    ``SAMPLE_RUN`` consecutive entries at random starts (fixed seed), which reads whole cache
    lines instead of one value per line; every entry when the tensor is small. The sample
    only steers the bracket: any sample gives the exact answer."""
    n = task.numel
    size = min(SAMPLE_MAX, max(SAMPLE_MIN, n // 32))
    xf, bf = x.reshape(-1), base.reshape(-1)
    if n > size:
        g = torch.Generator().manual_seed(0)
        runs = size // SAMPLE_RUN
        starts = torch.randint(n - SAMPLE_RUN + 1, (runs, 1), generator=g)
        idx = (starts + torch.arange(SAMPLE_RUN)).view(-1).to(x.device)
        xf, bf = xf[idx], bf[idx]
    return (task.cast(xf) - task.cast(bf)).abs_()


def trim_threshold(task: TensorTask, x: torch.Tensor, base: torch.Tensor, k: int,
                   scratch: Scratch) -> tuple[KthLargest, int | None]:
    """(v_k of |x − b| in the compute dtype, the flat index of the last copy of v_k the trim
    keeps, or None when it keeps them all): the parameters of ``ops.trim.trim_piece_`` that
    give ``ops.trim.magnitude_trim``'s kept set. The task's row spans are scanned in parallel,
    by the fused loop when ``fused_cpu.supported``; ``scratch`` serves the first span."""

    def abs_pieces(span: tuple[int, int] | None,
                   buf: Scratch) -> Iterator[tuple[int, torch.Tensor]]:
        for off, (b, xp) in pieces(task, [base, x], span=span):
            yield off, task_vector(xp, b, out=buf.get("ties_abs", b.numel())).abs_()

    parts = spans(task)
    if fused_cpu.supported(task, [x, base]):
        scans = [partial(fused_cpu.scan_abs_delta, x, base, span) for span in parts]
    else:
        scratches = [scratch] + [Scratch(task.compute_dtype, task.device) for _ in parts[1:]]
        scans = [partial(scan_pass, partial(abs_pieces, span, buf), buf)
                 for span, buf in zip(parts, scratches)]
    kth = kth_largest_scanned(scans, task.numel, k, sample_abs_delta(task, x, base),
                              run=partial(run_parallel, workers=task.workers))
    need = k - kth.above                      # ties at v_k to keep, lowest flat index first
    if kth.cutoff is not None or need >= kth.equal or not kth.value > 0:
        return kth, kth.cutoff
    if kth.tie_piece is not None:             # recompute |δ| of the one piece that holds it
        off, n, r = kth.tie_piece
        xf, bf = x.reshape(-1)[off:off + n], base.reshape(-1)[off:off + n]
        a = (task.cast(xf) - task.cast(bf)).abs_()
        return kth, off + int(flat_nonzero(a == kth.value)[r - 1])
    return kth, tie_cutoff(abs_pieces(None, scratch), kth.value, need, scratch)
