"""SCE (``ops/sce.py``) without a sort and without stack-sized temporaries.

``ops.sce.sce`` is the definition: it stacks the task vectors, ranks the variance with a full
stable sort and builds four more stack-sized temporaries. Here, on CPU with float32 compute and
bf16/float32 inputs read as stored (``fused_cpu.supported``'s conditions), in compiled passes
over row spans on ``task.workers`` threads, each recomputing T_i = x_i − b from the inputs:

1. the variance (``sce_loops.variance``, torch's float64 Welford update) into one float32
   tensor, whose top k is ``kernels.breadcrumbs.top_mask``: the exact k-th largest search with
   the stable sort's tie rule (largest first, lowest flat index first);
2. per model, the squares of the selected T_i, reduced by torch as ``ops.sce.sce_weights``
   reduces the stack (``row_mean_squares``);
3. select, erase and the weighted mean, written in the output dtype (``sce_loops.combine``).

Memory: one float32 tensor and one bool mask of the tensor's size. Bit-equal to ``ops.sce.sce``
(tests/kernels/test_sce_kernel.py). Up to 4 models (torch's reduction over dim 0 of more rows
is no longer a plain sum in row order).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from mergekit_like.kernels import fused_cpu
from mergekit_like.kernels.lazy_numba import LazyLoops
from mergekit_like.kernels.breadcrumbs import sample_runs, top_mask
from mergekit_like.kernels.tiling import run_parallel, spans
from mergekit_like.ops.sce import DENOM_EPS, WEIGHT_EPS, topk_count
from mergekit_like.tensor_task import TensorTask

MAX_MODELS = 4


def _smoke(loops) -> None:
    a = np.zeros(4, np.uint16)
    loops.variance(a, (a,), np.zeros(4, np.float32))


LOOPS = LazyLoops("mergekit_like.kernels.sce_loops", _smoke, "sce loops")
warm_up = LOOPS.warm_up


def supported(task: TensorTask, models: list[int]) -> bool:
    """``fused_cpu.supported`` (CPU, float32 compute, contiguous bf16/float32 inputs without a
    load rounding), inputs known finite, one stored dtype for the models, 1 ≤ N ≤ 4, ≥ 1 dim."""
    xs = [task.inputs[pos] for pos in models]
    return (len(task.shape) >= 1 and task.numel > 0 and 1 <= len(xs) <= MAX_MODELS
            and task.inputs_finite and len({x.dtype for x in xs}) == 1
            and task.out_dtype in (torch.bfloat16, torch.float32)
            and fused_cpu.supported(task, [task.base, *xs])
            and LOOPS.get() is not None)


def keep_top(var: torch.Tensor, fraction: float, nonzero: int, workers: int = 1) -> torch.Tensor:
    """``ops.sce.variance_keep`` [flat bool] from the flat variance and its count of nonzeros:
    the k = ``topk_count`` largest, ties by lowest flat index."""
    m = var.numel()
    k = topk_count(nonzero, fraction) if 0 < fraction < 1 else 0
    if fraction >= 1 or fraction <= 0 or k <= 0:
        return torch.full((m,), fraction >= 1, dtype=torch.bool)
    if not bool(torch.isfinite(var.max())):     # the sort's order of inf/NaN is the rule
        keep = torch.zeros(m, dtype=torch.bool)
        keep[torch.sort(var, descending=True, stable=True).indices[:k]] = True
        return keep
    return top_mask(var, k, sample_runs(var), workers)


def row_mean(sq: torch.Tensor) -> torch.Tensor:
    """``torch.mean(T ** 2, dim=1)[i]`` of a stack from row i's squares ``sq`` [M].

    torch reduces each output of a multi-output reduction serially, whatever the threads, but
    splits a single-output one over threads: viewing the row as two identical rows (stride 0)
    keeps it a two-output reduction, so the sum runs in the stacked form's order."""
    return torch.mean(sq.as_strided((2, sq.numel()), (0, 1)), dim=1)[0]


def weights(squares: torch.Tensor) -> torch.Tensor:
    """``ops.sce.sce_weights`` from the per-model means of squares [N]."""
    total = torch.sum(squares).item()
    if abs(total) < WEIGHT_EPS:
        return torch.ones_like(squares) / squares.numel()
    return squares / total


def sce_task(task: TensorTask, models: list[int], select_topk: float) -> torch.Tensor:
    """``ops.sce.sce(cast(base), [cast(x) for x in models], select_topk=…)`` in the output dtype
    (``supported`` must hold)."""
    loops = LOOPS.get()
    raw = fused_cpu.raw
    b, xs = raw(task.base), tuple(raw(task.inputs[pos]) for pos in models)
    parts = spans(task)

    def each(fn, *arrays):
        return run_parallel([partial(fn, s, e, *arrays) for s, e in parts], task.workers)

    work = np.empty(task.numel, np.float32)
    keep = torch.ones(task.numel, dtype=torch.bool)
    if select_topk < 1:
        nonzero = sum(each(lambda s, e: loops.variance(b[s:e], tuple(x[s:e] for x in xs),
                                                       work[s:e])))
        keep = keep_top(torch.from_numpy(work), select_topk, nonzero, task.workers)
    kb = keep.numpy()
    means = torch.empty(len(xs), dtype=torch.float32)
    for i, x in enumerate(xs):
        each(lambda s, e: loops.squares(b[s:e], x[s:e], kb[s:e], work[s:e]))
        means[i] = row_mean(torch.from_numpy(work))
    del work
    w = weights(means).numpy()
    out = task.empty_output()
    o, eps = raw(out), np.float32(DENOM_EPS)
    each(lambda s, e: loops.combine(b[s:e], tuple(x[s:e] for x in xs), kb[s:e], w, o[s:e], eps))
    return out
