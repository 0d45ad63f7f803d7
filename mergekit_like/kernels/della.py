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

import threading
import warnings
from functools import lru_cache, partial

import numpy as np
import torch

from mergekit_like.kernels.tiling import pieces, run_parallel, spans
from mergekit_like.ops.della import keep_thresholds, magprune_probs, rank_rows
from mergekit_like.ops.task_vectors import task_vector
from mergekit_like.tensor_task import TensorTask


def warm_up() -> None:
    """Import numba and load the compiled loops on a background thread, so that a merge pays
    it while its first tensors are being read (``Method.warm_up``)."""
    threading.Thread(target=_loops, name="della-loops-warm-up", daemon=True).start()


@lru_cache(maxsize=1)
def _loops():
    """The compiled loops, or None when numba cannot provide them (the torch path runs)."""
    try:
        from mergekit_like.kernels import della_loops

        keys = np.zeros((1, 2), np.uint64)
        della_loops.row_keys(np.zeros(2, np.float32), 2, keys)
        della_loops.keep_from_sorted(keys, 2, 0, np.uint64(0), np.zeros(2, np.int64),
                                     np.zeros(2, np.bool_))
    except Exception as exc:  # pragma: no cover - numba is a dependency
        warnings.warn(f"della loops unavailable ({type(exc).__name__}: {exc})", RuntimeWarning,
                      stacklevel=2)
        return None
    return della_loops


def supported(task: TensorTask) -> bool:
    """CPU, float32 compute, 1-D or 2-D (rows are contiguous), inputs known finite (the
    float sort's order of NaN is not the keys' order), rows shorter than 2³²."""
    return (task.device.type == "cpu" and task.compute_dtype == torch.float32
            and len(task.shape) in (1, 2) and task.numel > 0 and task.inputs_finite
            and rank_rows(task.shape) < 2**32 and _loops() is not None)


def rank_thresholds(m: int, density: float, epsilon: float) -> np.ndarray:
    """[m] int64: floor(p_r·2²⁴) for r = 0 … m−1, by ``ops.della``'s own functions."""
    ranks = torch.arange(m, dtype=torch.int64)
    return keep_thresholds(magprune_probs(ranks, m, density, epsilon)).numpy()


def keep_rows(delta: torch.Tensor, m: int, offset: int, key: int,
              thresholds: np.ndarray) -> torch.Tensor:
    """MAGPRUNE's keep bits [flat bool] of a flat float32 piece of whole rows of m entries whose
    first entry has flat index ``offset``; ``thresholds`` from ``rank_thresholds``."""
    loops = _loops()
    keys = np.empty((delta.numel() // m, m), np.uint64)
    loops.row_keys(delta.numpy(), m, keys)
    keys.sort(axis=1)
    keep = np.empty(delta.numel(), np.bool_)
    loops.keep_from_sorted(keys, m, offset, np.uint64(key), thresholds, keep)
    return torch.from_numpy(keep)


def magprune_keep(task: TensorTask, x: torch.Tensor, key: int, density: float,
                  epsilon: float) -> torch.Tensor:
    """MAGPRUNE's keep mask [flat bool, the tensor's numel] of model input ``x``: δ = cast(x) −
    cast(b) piece by piece, ranked along rows (``supported`` must hold); the task's row spans
    run on ``task.workers`` threads."""
    m = rank_rows(task.shape)
    table = rank_thresholds(m, density, epsilon)
    keep = torch.empty(task.numel, dtype=torch.bool)
    if len(task.shape) == 1:                  # one row: the whole tensor
        delta = torch.empty(task.numel, dtype=torch.float32)
        for off, (b, xp) in pieces(task, [task.base, x]):
            task_vector(xp, b, out=delta[off:off + b.numel()])
        return keep_rows(delta, m, 0, key, table)

    def span_keep(span: tuple[int, int]) -> None:
        buf = torch.empty(0, dtype=torch.float32)
        for off, (b, xp) in pieces(task, [task.base, x], span=span):
            n = b.numel()
            if buf.numel() < n:
                buf = torch.empty(n, dtype=torch.float32)
            delta = task_vector(xp, b, out=buf[:n])
            keep[off:off + n] = keep_rows(delta, m, off, key, table)

    run_parallel([partial(span_keep, s) for s in spans(task)], task.workers)
    return keep
