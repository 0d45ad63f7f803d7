"""MAGPRUNE's keep mask (``ops/della.py``) from a bucketed rank of each row.

``ops.della.magprune_ranks`` ranks |δ| along each row with torch's stable float sort (argsort
indices in int64, a scatter for the ranks), then ``magprune_piece_`` turns ranks into float64
probabilities, thresholds and SplitMix64 draws. Here, for tensors of 1 or 2 dims on CPU
(float32 compute), each piece of whole rows goes to one compiled call
(``della_rank.keep_rows``): δ = x − b straight from the stored bf16/float32 bits (or from
torch's δ when a load rounding applies or the dtype is another), each row counted into
monotone buckets of its magnitude bits instead of sorted, each entry's keep bit drawn against
the thresholds (a table ``ops.della`` computes once per tensor) of its bucket's rank range,
the few entries that range leaves open ranked exactly, and the "l1" row sums made from the
same keys. The keep mask (one bool per entry) is all that stays per model. Bit-equal to
``magprune_piece_`` with the ranks of ``magprune_ranks`` (tests/kernels/test_della_kernel.py,
test_della_rank.py).
"""

from __future__ import annotations

import math
import threading
from functools import partial
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from mergekit_like.kernels.fused_cpu import raw
from mergekit_like.kernels.lazy_numba import LazyLoops, enabled
from mergekit_like.kernels.tiling import PIECE, pieces, row_elems, run_parallel, spans
from mergekit_like.ops.della import keep_thresholds, magprune_probs, rank_rows
from mergekit_like.ops.task_vectors import task_vector
from mergekit_like.tensor_task import TensorTask

MAX_ROW = 1 << 28
"""Longest row the bucketed rank takes (its ranks and columns are uint32)."""


def _smoke(loops) -> None:
    work = loops.Work(2)
    keep, sums, table = np.zeros(2, np.bool_), np.zeros(1), np.zeros(2, np.int32)
    for x, b in [(np.zeros(2, np.uint16),) * 2, (np.zeros(2, np.float32),) * 2,
                 (np.zeros(2, np.float32), None)]:
        loops.keep_rows(x, b, 2, 0, np.uint64(0), table, keep, sums, sums, True, *work.arrays())
    loops.l1_terms(np.zeros(2, np.float32), keep, np.zeros(2), np.zeros(2))


LOOPS = LazyLoops("mergekit_like.kernels.della_loops", _smoke, "della loops")
warm_up = LOOPS.warm_up
_RAW = (torch.bfloat16, torch.float32)
_LOCAL = threading.local()


def supported(task: TensorTask) -> bool:
    """CPU, float32 compute, 1-D or 2-D (rows are contiguous), inputs known finite (the
    float sort's order of NaN is not the keys' order), rows shorter than ``MAX_ROW``."""
    return (task.device.type == "cpu" and task.compute_dtype == torch.float32
            and len(task.shape) in (1, 2) and task.numel > 0 and task.inputs_finite
            and rank_rows(task.shape) < MAX_ROW and enabled() and LOOPS.get() is not None)


def rank_thresholds(m: int, density: float, epsilon: float) -> np.ndarray:
    """[m] int32: floor(p_r·2²⁴) (≤ 2²⁴) for r = 0 … m−1, by ``ops.della``'s own functions."""
    ranks = torch.arange(m, dtype=torch.int64)
    table = keep_thresholds(magprune_probs(ranks, m, density, epsilon))
    return table.to(torch.int32).numpy()


class Keep(NamedTuple):
    """MAGPRUNE's keep mask of one model's tensor (flat bool) and, when asked for, the totals
    of the "l1" rescale: ‖δ‖₁ and ‖keep⊙δ‖₁ as ``TaskVectorMethod._l1_factors`` sums them."""
    keep: torch.Tensor
    l1: tuple[float, float] | None = None


def magprune_keep(task: TensorTask, x: torch.Tensor, key: int, density: float,
                  epsilon: float) -> torch.Tensor:
    """MAGPRUNE's keep mask [flat bool, the tensor's numel] of model input ``x``: δ = cast(x) −
    cast(b) piece by piece, ranked along rows (``supported`` must hold); the task's row spans
    run on ``task.workers`` threads."""
    return magprune(task, x, key, density, epsilon, l1=False).keep


def magprune(task: TensorTask, x: torch.Tensor, key: int, density: float, epsilon: float,
             l1: bool, out: torch.Tensor | None = None) -> Keep:
    """``magprune_keep``'s mask, and with ``l1`` the "l1" totals from the same pass over δ:
    the float64 row sums of |δ| and |keep·δ| (exact, hence torch's; a piece with a row that may
    not be is summed by torch as the adapter's own pass would), summed exactly. ``out``: a
    flat bool buffer of numel entries to hold the mask (a reused one spares the page faults
    of a new one); every entry is written."""
    m = rank_rows(task.shape)
    run = _Run(task, x, m, key, rank_thresholds(m, density, epsilon), l1, out)
    if len(task.shape) == 1:                  # one row: the whole tensor
        run.row_tensor()
    else:
        run_parallel([partial(run.span, s) for s in spans(task)], task.workers)
    if not l1:
        return Keep(run.keep)
    return Keep(run.keep, (math.fsum(run.full.tolist()), math.fsum(run.kept.tolist())))


class _Run:
    """One model's keep pass over one tensor: the outputs (keep [numel] bool, the per-row sums
    full / kept [rows] float64, or for a 1-D tensor its per-entry terms when not exact) and
    how δ is read (``direct``: from the stored bf16/float32 bits)."""

    def __init__(self, task: TensorTask, x: torch.Tensor, m: int, key: int,
                 table: np.ndarray, l1: bool, out: torch.Tensor | None):
        self.task, self.x, self.m, self.table, self.l1 = task, x, m, table, l1
        self.key = np.uint64(key)
        self.keep = torch.empty(task.numel, dtype=torch.bool) if out is None else out
        self.full = np.zeros(task.numel // m)
        self.kept = np.zeros(task.numel // m)
        self.direct = all(t.dtype in _RAW and t.is_contiguous() and task.load_rounding(t.dtype)
                          is None for t in (task.base, x))

    def call(self, xs: np.ndarray, bs: np.ndarray | None, s: int, n: int) -> bool:
        """keep_rows on the piece [s, s + n) of rows; False when its sums are not exact."""
        work = _work(self.m)
        r0, r1 = s // self.m, (s + n) // self.m
        return LOOPS.get().keep_rows(xs, bs, self.m, s, self.key, self.table,
                                     self.keep.numpy()[s:s + n], self.full[r0:r1],
                                     self.kept[r0:r1], self.l1, *work.arrays())

    def span(self, span: tuple[int, int]) -> None:
        """The pieces of a row span (those of ``tiling.pieces``); a piece whose sums are not
        exact gets the torch row sums of its δ (``_l1_sums``)."""
        task = self.task
        if self.direct:
            rx, rb = raw(self.x), raw(task.base)
            for s, e in _piece_ranges(task, span):
                if not self.call(rx[s:e], rb[s:e], s, e - s) and self.l1:
                    delta = task_vector(task.cast(self.x.reshape(-1)[s:e]),
                                        task.cast(task.base.reshape(-1)[s:e]))
                    self._torch_sums(delta, s, row_elems(task.shape))
            return
        bufs: dict[str, torch.Tensor] = {}
        for s, (b, xp) in pieces(task, [task.base, self.x], span=span):
            delta = task_vector(xp, b, out=_buf(bufs, "delta", b.numel(), torch.float32))
            if not self.call(delta.numpy(), None, s, delta.numel()) and self.l1:
                self._torch_sums(delta, s, row_elems(task.shape), bufs)

    def row_tensor(self) -> None:
        """A 1-D tensor: one row, one call; when its sums are not exact, the per-entry terms
        (then summed exactly, as the adapter's pass makes them for rows of one entry)."""
        task, n = self.task, self.task.numel
        if self.direct:
            exact = self.call(raw(self.x), raw(task.base), 0, n)
            delta = None
        else:
            delta = torch.empty(n, dtype=torch.float32)
            for off, (b, xp) in pieces(task, [task.base, self.x]):
                task_vector(xp, b, out=delta[off:off + b.numel()])
            exact = self.call(delta.numpy(), None, 0, n)
        if self.l1 and not exact:
            if delta is None:
                delta = task_vector(task.cast(self.x), task.cast(task.base)).reshape(-1)
            full, kept = _l1_sums(delta, self.keep, 1, {})
            self.full, self.kept = full.numpy(), kept.numpy()

    def _torch_sums(self, delta: torch.Tensor, s: int, row: int,
                    bufs: dict[str, torch.Tensor] | None = None) -> None:
        n = delta.numel()
        full, kept = _l1_sums(delta, self.keep[s:s + n], row, {} if bufs is None else bufs)
        self.full[s // row:(s + n) // row] = full.numpy()
        self.kept[s // row:(s + n) // row] = kept.numpy()


def _piece_ranges(task: TensorTask, span: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """The flat ranges of ``tiling.pieces(task, …, span=span)``'s pieces, without converting."""
    row = row_elems(task.shape)
    step = max(1, PIECE // row) * row
    lo, hi = span
    for block in task.blocks():
        start, end = max(block.flat_offset, lo), min(block.flat_offset + block.numel, hi)
        for s in range(start, end, step):
            yield s, min(s + step, end)


def _work(m: int):
    """This thread's ``Work`` for rows of m entries (kept while m repeats)."""
    work = getattr(_LOCAL, "work", None)
    if work is None or work.m != m:
        work = _LOCAL.work = LOOPS.get().Work(m)
    return work


def _buf(bufs: dict[str, torch.Tensor], slot: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    if slot not in bufs or bufs[slot].numel() < n:
        bufs[slot] = torch.empty(n, dtype=dtype)
    return bufs[slot][:n]


def _l1_sums(delta: torch.Tensor, keep: torch.Tensor, row: int,
             bufs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float64 sums of |δ| and |keep·δ| of a piece of whole rows, as
    ``tiling.row_sums`` makes them (the terms from one compiled pass)."""
    n = delta.numel()
    full = _buf(bufs, "full", n, torch.float64)
    kept = _buf(bufs, "kept", n, torch.float64)
    LOOPS.get().l1_terms(delta.numpy(), keep.numpy(), full.numpy(), kept.numpy())
    if row == 1:
        return full.clone(), kept.clone()
    return full.view(-1, row).sum(dim=1), kept.view(-1, row).sum(dim=1)
