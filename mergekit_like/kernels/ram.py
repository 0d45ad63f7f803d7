"""RAM and RAM+ tensor-local (``ops/ram.py``) as compiled passes over the stored inputs.

The definition works on stacked [N, block] task vectors with about fifteen torch passes and
as many temporaries per block (and RAM+ makes a first pass of the same kind for its counts).
On CPU with float32 compute and bf16/float32 inputs read as stored (``fused_cpu.supported``),
each row span is one compiled loop per pass (``ram_loops``), on ``task.workers`` threads,
written straight in the output dtype. Bit-equal (tests/kernels/test_ram_kernel.py). Up to 4
models (torch's reduction over dim 0 of more rows is no longer a plain sum in model order).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from mergekit_like.kernels import fused_cpu
from mergekit_like.kernels.lazy_numba import LazyLoops
from mergekit_like.kernels.tiling import run_parallel, spans
from mergekit_like.tensor_task import TensorTask

MAX_MODELS = 4


def _smoke(loops) -> None:
    a = np.zeros(4, np.uint16)
    c = np.zeros(1, np.int64)
    loops.counts(a, (a,), np.float32(0), c, c)


LOOPS = LazyLoops("mergekit_like.kernels.ram_loops", _smoke, "ram loops")
warm_up = LOOPS.warm_up


def supported(task: TensorTask, models: list[int]) -> bool:
    """``fused_cpu.supported``'s conditions (CPU, float32 compute, contiguous bf16/float32
    inputs without load rounding), inputs known finite, one stored dtype for the models, a
    bf16/float32 output, 1 ≤ N ≤ 4."""
    xs = [task.inputs[pos] for pos in models]
    return (task.numel > 0 and 1 <= len(xs) <= MAX_MODELS and task.inputs_finite
            and len({x.dtype for x in xs}) == 1
            and task.out_dtype in (torch.bfloat16, torch.float32)
            and fused_cpu.supported(task, [task.base, *xs]) and LOOPS.get() is not None)


def _parts(task: TensorTask, models: list[int]):
    raw = fused_cpu.raw
    b, xs = raw(task.base), tuple(raw(task.inputs[pos]) for pos in models)
    return [(s, e, b[s:e], tuple(x[s:e] for x in xs)) for s, e in spans(task)]


def model_counts(task: TensorTask, models: list[int], epsilon: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s [N], u [N] int64) of ``ops.ram.model_counts`` summed over the whole tensor."""
    loops, eps = LOOPS.get(), np.float32(epsilon)
    parts = _parts(task, models)
    found = [(np.zeros(len(models), np.int64), np.zeros(len(models), np.int64)) for _ in parts]
    run_parallel([partial(loops.counts, b, xs, eps, sh, un)
                  for (_, _, b, xs), (sh, un) in zip(parts, found)], task.workers)
    shared = sum(f[0] for f in found)
    unique = sum(f[1] for f in found)
    return torch.from_numpy(shared), torch.from_numpy(unique)


def ram_task(task: TensorTask, models: list[int], epsilon: float,
             scales: torch.Tensor | None) -> torch.Tensor:
    """b + ``ops.ram.ram_delta`` (RAM+ with λ ``scales`` [N] float32) in the output dtype."""
    loops, eps = LOOPS.get(), np.float32(epsilon)
    out = task.empty_output()
    o = fused_cpu.raw(out)
    lam = np.ones(len(models), np.float32) if scales is None else \
        scales.to(torch.float32).numpy()
    run_parallel([partial(loops.merge, b, xs, eps, lam, scales is not None, o[s:e])
                  for s, e, b, xs in _parts(task, models)], task.workers)
    return out
