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

The two passes around it (``supported``: CPU, float32 compute, contiguous bf16/float32 inputs
read as stored, finite inputs, a bf16/float32 output): pass 1 keeps torch's softmax / log / KL
row sums (a compiled exp or log is not torch's vectorised one) with fewer temporaries, and
|b − a|·KL is one compiled loop over the stored bytes (``arcee_fusion_loops.importance``);
pass 2, out = a + (b − a)·[imp ≥ τ], is one compiled loop written straight in the output
dtype (``arcee_fusion_loops.fuse``); the blocks are shared over ``task.workers`` threads
(the method is ``span_parallel``: torch ops single-threaded, which on a small shared CPU beats
their intra-op barriers several times over). The selection's collect of three brackets is
``arcee_fusion_loops.collect3`` (2× ``select_loops.bracket_collect``). Bit-equal to the torch
path, which ``MERGEKIT_LIKE_FUSED=0`` (or an |b − a| overflowing to inf) still takes.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch

from mergekit_like.kernels import fused_cpu
from mergekit_like.kernels.breadcrumbs import sample_runs
from mergekit_like.kernels.lazy_numba import LazyLoops, enabled
from mergekit_like.kernels.tiling import run_parallel, spans
from mergekit_like.ops.arcee_fusion import IQR_FACTOR, KL_EPS, \
    fusion_threshold as reference, quantile_indices
from mergekit_like.tensor_task import TensorTask

MARGIN = 4.0
"""Bracket half-width in standard deviations of the sample quantile."""


def _smoke(loops) -> None:
    z = np.zeros(1, np.float32)
    loops.bracket_counts(z, z, z, np.zeros((1, 4), np.int64))


def _smoke_passes(loops) -> None:
    z, u = np.zeros(1, np.float32), np.zeros(1, np.uint16)
    for x in (z, u):
        loops.importance(x, x, z, 1, z)
        for o in (z, u):
            loops.fuse(x, x, z, np.float32(0), o)
    t = np.zeros(3, np.float32)
    loops.collect3(z, t, t, np.zeros((3, 2), np.float32), np.zeros(3, np.int64))


LOOPS = LazyLoops("mergekit_like.kernels.select_loops", _smoke, "selection loops")
PASSES = LazyLoops("mergekit_like.kernels.arcee_fusion_loops", _smoke_passes,
                   "arcee_fusion loops")


def warm_up() -> None:
    """Load both loop modules on background threads (``Method.warm_up``)."""
    if enabled():
        LOOPS.warm_up()
        PASSES.warm_up()


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
        passes = PASSES.get() if len(positions) == 3 else None
        collect = loops.bracket_collect if passes is None else passes.collect3
        collect(a, lo, hi, out, np.zeros(len(positions), np.int64))
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


def supported(task: TensorTask, a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``fused_passes`` computes exactly the torch path's bits for ``task``: at
    least 2 dims, ``fused_cpu.supported``'s conditions for a and b (CPU, float32 compute,
    contiguous bf16/float32 stored tensors, no load rounding), finite inputs, a bf16/float32
    output, and both loop modules loaded."""
    return (len(task.shape) >= 2 and task.numel > 0 and task.inputs_finite
            and task.out_dtype in (torch.bfloat16, torch.float32)
            and fused_cpu.supported(task, [a, b]) and PASSES.get() is not None
            and LOOPS.get() is not None)


class _Buffers:
    """Four reused float32 work buffers of one block (a, b, softmax(a), softmax(b)): a fresh
    16 MiB tensor per step costs its page faults, as much as the step itself."""

    def __init__(self, size: int):
        self.flat = [torch.empty(size, dtype=torch.float32) for _ in range(4)]

    def views(self, shape: tuple[int, ...]) -> list[torch.Tensor]:
        n = math.prod(shape)
        return [f[:n].view(shape) for f in self.flat]


def _row_kl(a: torch.Tensor, b: torch.Tensor, bufs: _Buffers) -> np.ndarray:
    """KL(softmax(b) + eps ‖ softmax(a) + eps) per row of the stored rows a, b, flat float32:
    ``ops.arcee_fusion.fusion_importance``'s torch steps into reused buffers (the float32
    conversion is exact however it is made; ``aten._softmax.out`` is what ``torch.softmax``
    runs; log(p / q)·p is p·log(p / q) bit for bit)."""
    a32, b32, p, q = bufs.views(tuple(a.shape))
    a32.copy_(a)
    b32.copy_(b)
    torch.ops.aten._softmax.out(b32, -1, False, out=p)
    torch.ops.aten._softmax.out(a32, -1, False, out=q)
    p.add_(KL_EPS)
    q.add_(KL_EPS)
    return torch.div(p, q, out=q).log_().mul_(p).sum(dim=-1).reshape(-1).numpy()


def _finite_threshold(imp: torch.Tensor) -> np.float32:
    """``fusion_threshold`` of an importance known free of NaN (no check pass)."""
    q1, med, q3 = (torch.tensor(v, dtype=torch.float32)
                   for v in order_statistics(imp.numpy(), list(quantile_indices(imp.numel()))))
    return np.float32((med + IQR_FACTOR * (q3 - q1)).item())


def _importance_blocks(loops, a: torch.Tensor, b: torch.Tensor, row: int, imp: np.ndarray,
                       blocks: list) -> int:
    """Pass 1 over ``blocks`` (one thread's share) into the flat importance; 1 when some
    |b − a| overflowed."""
    ra, rb, over = fused_cpu.raw(a), fused_cpu.raw(b), 0
    bufs = _Buffers(max(block.numel for block in blocks))
    for block in blocks:
        s, e = block.flat_offset, block.flat_offset + block.numel
        kl = _row_kl(a[block.rows], b[block.rows], bufs)
        over |= loops.importance(ra[s:e], rb[s:e], kl, row, imp[s:e])
    return over


def fused_passes(task: TensorTask, a: torch.Tensor, b: torch.Tensor,
                 out: torch.Tensor) -> bool:
    """Both passes of the method into ``out`` (``supported`` holds), the blocks shared over
    ``task.workers`` threads; False (``out`` not written) when some |b − a| overflowed to inf
    (Δ·0 = NaN): the torch path then runs. Otherwise every imp is finite (so is KL: p, q ∈
    [1e-8, 1 + 1e-8])."""
    loops = PASSES.get()
    imp = torch.empty(task.numel, dtype=torch.float32)
    ri = imp.numpy()
    blocks = list(task.blocks())
    n = max(1, min(task.workers, len(blocks)))
    shares = [blocks[i::n] for i in range(n)]
    flags = run_parallel([partial(_importance_blocks, loops, a, b, task.shape[-1], ri, share)
                          for share in shares], n)
    if any(flags):
        return False
    tau = _finite_threshold(imp)
    ra, rb, ro = fused_cpu.raw(a), fused_cpu.raw(b), fused_cpu.raw(out)
    run_parallel([partial(loops.fuse, ra[s:e], rb[s:e], ri[s:e], tau, ro[s:e])
                  for s, e in spans(task)], task.workers)
    return True
