"""MAGPRUNE's keep mask (``ops/della.py``) from one row sort of packed integer keys.

``ops.della.magprune_ranks`` ranks |δ| along each row with torch's stable float sort (argsort
indices in int64, a scatter for the ranks), then ``magprune_piece_`` turns ranks into float64
probabilities, thresholds and SplitMix64 draws: about 40× the I/O floor. Here, for tensors of
1 or 2 dims on CPU (float32 δ): each piece of whole rows becomes uint64 keys (magnitude bits and
reversed column, ``della_loops.row_keys``), numpy sorts them along the rows, and one compiled
loop gives each entry its rank (its position) and keep bit, the rank's threshold taken from a
table ``ops.della`` computes once per tensor. The keep mask (one bool per entry,
instead of int32 ranks) is all that stays per model. Bit-equal to ``magprune_piece_`` with the
ranks of ``magprune_ranks`` (tests/kernels/test_della_kernel.py).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from mergekit_like.kernels.lazy_numba import LazyLoops, enabled
from mergekit_like.kernels.tiling import exact_total, pieces, row_elems, run_parallel, spans
from mergekit_like.ops.della import keep_thresholds, magprune_probs, rank_rows
from mergekit_like.ops.task_vectors import task_vector
from mergekit_like.tensor_task import TensorTask


def _smoke(loops) -> None:
    keys = np.zeros((1, 2), np.uint64)
    loops.row_keys(np.zeros(2, np.float32), 2, keys)
    loops.keep_from_sorted(keys, 2, 0, np.uint64(0), np.zeros(2, np.int64),
                           np.zeros(2, np.bool_))


LOOPS = LazyLoops("mergekit_like.kernels.della_loops", _smoke, "della loops")
warm_up = LOOPS.warm_up


def supported(task: TensorTask) -> bool:
    """CPU, float32 compute, 1-D or 2-D (rows are contiguous), inputs known finite (the
    float sort's order of NaN is not the keys' order), rows shorter than 2³²."""
    return (task.device.type == "cpu" and task.compute_dtype == torch.float32
            and len(task.shape) in (1, 2) and task.numel > 0 and task.inputs_finite
            and rank_rows(task.shape) < 2**32 and enabled() and LOOPS.get() is not None)


def rank_thresholds(m: int, density: float, epsilon: float) -> np.ndarray:
    """[m] int64: floor(p_r·2²⁴) for r = 0 … m−1, by ``ops.della``'s own functions."""
    ranks = torch.arange(m, dtype=torch.int64)
    return keep_thresholds(magprune_probs(ranks, m, density, epsilon)).numpy()


def keep_rows(delta: torch.Tensor, m: int, offset: int, key: int, thresholds: np.ndarray,
              out: torch.Tensor | None = None, keys: np.ndarray | None = None) -> torch.Tensor:
    """MAGPRUNE's keep bits [flat bool, into ``out`` when given] of a flat float32 piece of
    whole rows of m entries whose first entry has flat index ``offset``; ``thresholds`` from
    ``rank_thresholds``; ``keys``: optional uint64 work buffer of at least the piece's length
    (fresh buffers per piece cost page faults comparable to the sort)."""
    loops = LOOPS.get()
    n = delta.numel()
    keys = (np.empty(n, np.uint64) if keys is None else keys[:n]).reshape(n // m, m)
    loops.row_keys(delta.numpy(), m, keys)
    keys.sort(axis=1)
    out = torch.empty(n, dtype=torch.bool) if out is None else out
    loops.keep_from_sorted(keys, m, offset, np.uint64(key), thresholds, out.numpy())
    return out


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
             l1: bool) -> Keep:
    """``magprune_keep``'s mask, and with ``l1`` the "l1" totals from the same pass over δ:
    the float64 row sums of |δ| and |keep·δ| of the same pieces (so the same torch sums, the
    same bits) that the adapter's own pass would make, summed exactly."""
    m = rank_rows(task.shape)
    table = rank_thresholds(m, density, epsilon)
    keep = torch.empty(task.numel, dtype=torch.bool)
    if len(task.shape) == 1:                  # one row: the whole tensor
        delta = torch.empty(task.numel, dtype=torch.float32)
        for off, (b, xp) in pieces(task, [task.base, x]):
            task_vector(xp, b, out=delta[off:off + b.numel()])
        keep = keep_rows(delta, m, 0, key, table)
        sums = [_l1_sums(delta, keep, 1, {})] if l1 else []
    else:
        def span_keep(span: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            bufs: dict[str, torch.Tensor] = {}
            out = []
            for off, (b, xp) in pieces(task, [task.base, x], span=span):
                n = b.numel()
                delta = task_vector(xp, b, out=_buf(bufs, "delta", n, torch.float32))
                keys = _buf(bufs, "keys", n, torch.float64).numpy().view(np.uint64)
                keep_rows(delta, m, off, key, table, keep[off:off + n], keys)
                if l1:
                    out.append(_l1_sums(delta, keep[off:off + n], row_elems(task.shape), bufs))
            return out

        parts = run_parallel([partial(span_keep, s) for s in spans(task)], task.workers)
        sums = [p for part in parts for p in part]
    if not l1:
        return Keep(keep)
    return Keep(keep, (exact_total([f for f, _ in sums]), exact_total([k for _, k in sums])))


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
