"""TIES-merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

Trim (operators.md §3): keep the k = max(1, int(d·numel)) entries of largest |δ|; with v_k the
k-th largest |δ|, keep every |δ| > v_k and, among |δ| = v_k, those with the lowest flat
(row-major) indices. Elect and merge: the sign consensus of ``task_arithmetic.sign_consensus``.

The k-th largest is found exactly without sorting the tensor (operators.md §3, option b): a
random sample of |δ| brackets v_k, one pass counts the entries above the bracket and collects
those inside it, and a selection on that small set gives v_k; a missed bracket is widened and
the pass repeated. When the k-th largest value is tied and only some of its copies fit, a
second pass counts the ties in row-major order up to the cutoff index. The trim itself is then
one ``hardshrink`` per piece: |δ| > prev(v_k) keeps |δ| ≥ v_k, |δ| > v_k drops the ties.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from mergekit_like.errors import MergeError
from mergekit_like.kernels import fused_cpu
from mergekit_like.methods.base import MethodSpec, ParamSpec, TensorTask
from mergekit_like.methods.task_arithmetic import (TaskVectorMethod, task_vector,
                                                   task_vector_params)
from mergekit_like.kernels.tiling import Scratch, buffer, cast, pieces, run_parallel, spans

SAMPLE_MIN, SAMPLE_MAX = 1 << 14, 1 << 17
SAMPLE_RUN = 64
MARGINS = (4.0, 30.0)
"""Bracket half-widths in standard deviations of the sample quantile; then the whole range."""


def trim_count(density: float, numel: int) -> int:
    """k = int(d·numel) (Python float product, truncated), at least 1; for 0 < d < 1."""
    return max(1, int(density * numel))


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


def _tie_piece(counts: list[tuple[int, int, int]], need: int) -> tuple[int, int, int]:
    """The piece holding the ``need``-th copy (row-major) of a value counted per piece as
    (offset, length, copies in the piece), and that copy's rank within the piece."""
    seen = 0
    for off, n, c in counts:
        if seen + c >= need:
            return off, n, need - seen
        seen += c
    raise ValueError(f"fewer than {need} copies counted")  # pragma: no cover


def _next(v: float, toward: float, dtype: torch.dtype) -> float:
    """The representable neighbour of v (a value of ``dtype``) in the direction of ``toward``."""
    if math.isinf(v):
        return v if v == toward else (-torch.finfo(dtype).max if v < 0 else torch.finfo(dtype).max)
    t = torch.tensor(v, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(toward, dtype=dtype)))


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


PieceSource = Callable[[], Iterable[tuple[int, torch.Tensor]]]
Scan = Callable[[float, float, float, float, bool, bool, bool], tuple]
"""One read pass over one part: (lo, hi, c_lo, c_hi, hi_open, lo_open, collect) → the tuple
of ``_scan_pass`` (``fused_cpu.scan_abs_delta`` is the fused one)."""


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
    scans = [partial(_scan_pass, src, scr) for src, scr in zip(sources, scratches)]
    return kth_largest_scanned(scans, numel, k, sample, margins, run)


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
    dtype = sample.dtype
    srt = sorted_values(sample)
    s = srt.numel()
    q = (numel - k) / numel                      # fraction of entries below v_k
    known_lo, known_hi = -math.inf, math.inf     # v_k > known_lo and v_k < known_hi
    for attempt in range(len(margins) + 1):
        lo, hi = known_lo, known_hi
        if attempt < len(margins) and s > 0:
            half = margins[attempt] * math.sqrt(s * q * (1.0 - q)) + 2.0
            i_lo, i_hi = math.floor(q * s - half), math.ceil(q * s + half)
            lo = max(lo, float(srt[i_lo]) if i_lo >= 0 else -math.inf)
            hi = min(hi, float(srt[i_hi]) if i_hi < s else math.inf)
            if lo > hi:
                lo, hi = known_lo, known_hi

        def atom(v: float) -> bool:                # v occurs at least twice in the sample
            at = torch.tensor([v], dtype=dtype, device=srt.device)
            first = int(torch.searchsorted(srt, at))
            return first + 1 < s and float(srt[first + 1]) == v

        hi_open = hi < math.inf and (hi == known_hi or lo == hi or atom(hi))
        lo_open = -math.inf < lo < hi and (lo == known_lo or atom(lo))
        c_lo = _next(lo, math.inf, dtype) if lo_open else lo
        c_hi = _next(hi, -math.inf, dtype) if hi_open else hi
        collect = lo < hi and c_lo <= c_hi
        parts = run([partial(scan, lo, hi, c_lo, c_hi, hi_open, lo_open, collect)
                     for scan in scans])
        gt_hi, ge_hi, ge_lo = (sum(p[i] for p in parts) for i in range(3))
        inside = [t for p in parts for t in p[3]]
        where = [t for p in parts for t in p[4]]
        eq_hi = [c for p in parts for c in p[5]]     # per piece: copies of hi, of lo (open ends)
        eq_lo = [c for p in parts for c in p[6]]
        passes = attempt + 1
        above = gt_hi
        if k <= above:                           # miss: v_k > hi
            known_lo = hi
            continue
        if hi_open:
            if k <= ge_hi:
                equal = ge_hi - gt_hi
                part = _tie_piece(eq_hi, k - gt_hi) if k - gt_hi < equal else None
                return KthLargest(hi, gt_hi, equal, passes, None, part)
            above = ge_hi
        coll = torch.cat(inside) if inside else srt[:0]
        m = coll.numel()
        if k <= above + m:
            r = k - above                        # r-th largest of the collected set
            v = kth_smallest(coll, m - r + 1)
            above += int((coll > v).sum())
            ties = torch.cat(where)[coll == v]
            cutoff = None
            if k - above < ties.numel():             # only the lowest-index copies fit
                cutoff = int(ties.sort().values[k - above - 1])
            return KthLargest(float(v), above, ties.numel(), passes, cutoff)
        above += m
        if lo_open and k <= ge_lo:
            equal = ge_lo - above
            part = _tie_piece(eq_lo, k - above) if k - above < equal else None
            return KthLargest(lo, above, equal, passes, None, part)
        known_hi = lo                            # miss: v_k < lo
    raise AssertionError("kth_largest: the full bracket cannot miss")  # pragma: no cover


def _scan_pass(abs_pieces: PieceSource, scratch: Scratch | None, lo: float, hi: float,
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


def magnitude_trim_(delta: torch.Tensor, offset: int, value: float,
                    cutoff: int | None = None, below: float | None = None) -> torch.Tensor:
    """Trim a flat δ piece in place: keep |δ| > value, and |δ| == value only at flat indices
    ≤ ``cutoff`` (all of them when cutoff is None); zero the rest. ``offset`` is the flat
    index of delta[0]. value is a value of delta's dtype (the k-th largest |δ|); ``below``, its
    next smaller value, may be passed to save recomputing it."""
    if value <= 0.0:
        return delta                              # everything non-zero is kept
    if below is None:
        below = _next(value, 0.0, delta.dtype)    # |δ| > below ⇔ |δ| ≥ value
    n = delta.numel()
    if cutoff is None or cutoff >= offset + n - 1:
        return torch.hardshrink(delta, below, out=delta)
    if cutoff < offset:
        return torch.hardshrink(delta, value, out=delta)
    c = cutoff - offset + 1
    torch.hardshrink(delta[:c], below, out=delta[:c])
    torch.hardshrink(delta[c:], value, out=delta[c:])
    return delta


# --------------------------------------------------------------------------------------------
# engine adapter


class MagnitudeTrim:
    """The exact top-k trim of one model's δ for one tensor: (v_k, tie cutoff) from one read
    pass over the pieces (more only on a bracket miss, +1 for a partial tie)."""

    def __init__(self, task: TensorTask, pos: int, density: float, scratch: Scratch):
        self.k = trim_count(density, task.numel)
        x, base = task.inputs[pos], task.base

        def abs_pieces(span: tuple[int, int] | None, buf: Scratch) -> Iterator[tuple[int, torch.Tensor]]:
            for off, (b, xp) in pieces(task, [base, x], span=span):
                yield off, task_vector(xp, b, out=buf.get("ties_abs", b.numel())).abs_()

        parts = spans(task)                       # the tensor's row spans, scanned in parallel
        if fused_cpu.supported(task, [x, base]):
            scans = [partial(fused_cpu.scan_abs_delta, x, base, span) for span in parts]
        else:
            scratches = [scratch] + [Scratch(task.compute_dtype, task.device) for _ in parts[1:]]
            scans = [partial(_scan_pass, partial(abs_pieces, span, buf), buf)
                     for span, buf in zip(parts, scratches)]
        sample = sample_abs_delta(task, x, base)
        self.kth = kth_largest_scanned(scans, task.numel, self.k, sample,
                                       run=partial(run_parallel, workers=task.workers))
        need = self.k - self.kth.above            # ties at v_k to keep, lowest flat index first
        self.cutoff = self.kth.cutoff
        if self.cutoff is None and need < self.kth.equal and self.kth.value > 0:
            if self.kth.tie_piece is not None:    # recompute |δ| of the one piece that holds it
                off, n, r = self.kth.tie_piece
                a = (cast(task, x.reshape(-1)[off:off + n])
                     - cast(task, base.reshape(-1)[off:off + n])).abs_()
                self.cutoff = off + int(flat_nonzero(a == self.kth.value)[r - 1])
            else:
                self.cutoff = tie_cutoff(abs_pieces(None, scratch), self.kth.value, need, scratch)
        self.below = _next(self.kth.value, 0.0, task.compute_dtype)

    def apply(self, delta: torch.Tensor, offset: int, scratch: Scratch | None = None) -> None:
        magnitude_trim_(delta, offset, self.kth.value, self.cutoff, self.below)

    def fused_sparsifier(self) -> fused_cpu.Trim:
        return fused_cpu.Trim(self.kth.value, self.below, self.cutoff)


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
    return (cast(task, xf) - cast(task, bf)).abs_()


class Ties(TaskVectorMethod):
    """TIES: magnitude trim, sign election by sum, disjoint (weighted) mean."""

    spec = MethodSpec(
        name="ties",
        params=task_vector_params(normalize=True, rescale=False, density_effective=True,
                                  rescale_effective=True)
        + (ParamSpec("trim_scope", "choice", "tensor", choices=("tensor", "model")),),
        needs_base=True,
    )
    consensus = True
    sparsifier_kind = "magnitude_trim"

    def check_tensor_params(self, name, model_params, params):
        if params.get("trim_scope", "tensor") == "model":
            return "trim_scope: model is not supported yet"
        return None

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        if task.params.get("trim_scope", "tensor") == "model":
            raise MergeError("trim_scope: model is not supported yet")
        return super().merge_tensor(task)

    def make_sparsifier(self, task, pos, density, scratch):
        return MagnitudeTrim(task, pos, density, scratch)

