"""Block and piece iteration shared by the method adapters (no merge method here).

The engine hands each operator whole tensors in their stored dtype. Operators walk them with
``pieces``: the engine's row blocks (``TensorTask.blocks``), each converted once to the compute
dtype, cut into row-aligned *pieces* of about ``PIECE`` elements so that the handful of
elementwise passes an operator makes over one piece stay in cache. Pieces come as flat (1-D)
tensors together with the global row-major index of their first element.

Pieces are read-only: when an input already has the compute dtype (and no load rounding applies)
a piece is a view of the engine's tensor, never a copy. Operators write into their own buffers.

Reductions that feed a result (SLERP norms, DARE/TIES "l1" norms) are summed per row in float64
and then exactly with ``math.fsum`` over the row sums, so they do not depend on how the tensor
was cut into blocks: blocked and unblocked runs give bit-identical results.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from mergekit_like.errors import MergeError
from mergekit_like.tensor_task import TensorTask

PIECE = 1 << 18
"""Target elements per piece (1 MiB of float32): a few passes over it stay in L2 cache."""


def row_elems(shape: Sequence[int]) -> int:
    """Elements per row (dim 0 slice); 1 for 0-d and 1-D tensors (each element is a row)."""
    if len(shape) < 2:
        return 1
    n = 1
    for s in shape[1:]:
        n *= s
    return max(1, n)


def pieces(task: TensorTask, tensors: Sequence[torch.Tensor], piece: int | None = None,
           span: tuple[int, int] | None = None) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Yield ``(flat_offset, [flat piece of each tensor])`` over the whole tensor (or the flat
    range ``span``, row-aligned, from ``spans``) in row-major order, within the engine's
    blocks. Pieces hold whole rows (at least one), about ``piece`` (default ``PIECE``)
    elements, in the compute dtype; read-only, and valid only until the next piece is yielded.

    Each piece is converted from the stored dtype straight into a buffer reused for the whole
    pass (or is a view when no conversion applies): converting a whole block into fresh memory
    first costs more in page faults and memory traffic than the arithmetic that follows."""
    piece = PIECE if piece is None else piece
    row = row_elems(task.shape)
    step = max(1, piece // row) * row
    flats = [t.reshape(-1) for t in tensors]
    bufs: list[torch.Tensor | None] = [None] * len(flats)
    lo, hi = (0, task.numel) if span is None else span
    for block in task.blocks():
        start, end = max(block.flat_offset, lo), min(block.flat_offset + block.numel, hi)
        for s in range(start, end, step):
            e = min(s + step, end)
            yield s, [_converted(task, f[s:e], bufs, k) for k, f in enumerate(flats)]


def spans(task: TensorTask, n: int | None = None) -> list[tuple[int, int]]:
    """The tensor's flat range cut at row boundaries into at most ``n`` (default
    ``task.workers``) near-equal non-empty spans, in order."""
    n = task.workers if n is None else n
    if len(task.shape) == 0 or task.numel == 0:
        return [(0, task.numel)]
    rows, row = task.shape[0], row_elems(task.shape)
    n = max(1, min(n, rows, math.ceil(task.numel / PIECE)))
    cuts = [round(i * rows / n) for i in range(n + 1)]
    return [(a * row, b * row) for a, b in zip(cuts, cuts[1:]) if b > a]


T = TypeVar("T")
_POOL: ThreadPoolExecutor | None = None


def run_parallel(calls: Sequence[Callable[[], T]], workers: int) -> list[T]:
    """Results of ``calls`` in order, run on up to ``workers`` threads (inline when 1).
    torch ops release the GIL, so single-threaded ops on disjoint data run truly parallel."""
    global _POOL
    if workers <= 1 or len(calls) <= 1:
        return [c() for c in calls]
    if _POOL is None or _POOL._max_workers < workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge-span")
    futures = [_POOL.submit(c) for c in calls]
    return [f.result() for f in futures]


def _converted(task: TensorTask, part: torch.Tensor, bufs: list[torch.Tensor | None],
               k: int) -> torch.Tensor:
    """``part`` as ``TensorTask.cast`` converts it, into the reused buffer ``bufs[k]`` (or
    ``part`` itself when it already has the compute dtype)."""
    via = task.load_rounding(part.dtype)
    if via is not None:
        part = part.to(via)  # a real rounding step (e.g. float32 stored, dtype bf16)
    if part.dtype == task.compute_dtype:
        return part
    buf = bufs[k]
    if buf is None or buf.numel() < part.numel():
        buf = bufs[k] = torch.empty(part.numel(), dtype=task.compute_dtype, device=part.device)
    return buf[:part.numel()].copy_(part)


def row_sums(values: torch.Tensor, row: int, work: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row float64 sums of a flat piece of whole rows ``row`` elements long (a new tensor;
    ``work``: optional float64 buffer of the piece's length for the conversion)."""
    if row == 1:
        return values.to(torch.float64, copy=True)
    v = values.to(torch.float64) if work is None else work.copy_(values)
    return v.view(-1, row).sum(dim=1)


def exact_total(parts: list[torch.Tensor]) -> float:
    """Correctly rounded sum of all float64 row sums (order-independent)."""
    if not parts:
        return 0.0
    return math.fsum(torch.cat(parts).tolist())


class Scratch:
    """Reusable flat work buffers of one merge call: ``get(slot, n)`` is a length-n view.

    Operators take every per-piece temporary from here: a fresh allocation per piece costs
    page faults that can exceed the arithmetic (several ms per MiB on some VMs)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self._bufs: dict[object, torch.Tensor] = {}

    def get(self, slot: object, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        buf = self._bufs.get(slot)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = torch.empty(n, dtype=dtype, device=self.device)
            self._bufs[slot] = buf
        return buf[:n]


class BufferPool:
    """Flat buffers lent out during one tensor's merge and all taken back after it
    (``release``), so that the next tensor reuses their pages: a fresh 50 MB mask costs about
    60 ms of page faults on these VMs, a third of MAGPRUNE's keep pass. A buffer serves only
    requests of at least half its size, and ``release`` keeps only the buffers lent since the
    last one: the pool holds at most what one tensor used, within a factor of two (so the
    embeddings' masks are not kept through the layers, nor after the merge)."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lent: list[torch.Tensor] = []

    def take(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat length-n view (contents undefined) of a buffer that nobody else holds until
        ``release``: the smallest free one of n to 2n entries, else a new one."""
        fits = [k for k, b in enumerate(self._free)
                if b.dtype == dtype and n <= b.numel() <= 2 * n]
        if fits:
            buf = self._free.pop(min(fits, key=lambda k: self._free[k].numel()))
        else:
            buf = torch.empty(n, dtype=dtype)
        self._lent.append(buf)
        return buf[:n]

    def release(self) -> None:
        """Take back every lent buffer (its views must no longer be used); the free buffers
        that were not lent since the last release are dropped."""
        self._free, self._lent = self._lent, []


def buffer(scratch: Scratch | None, slot: object, like: torch.Tensor,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """A flat work buffer shaped like flat ``like``: from ``scratch`` when given, else new."""
    if scratch is None:
        return torch.empty(like.numel(), dtype=dtype or like.dtype, device=like.device)
    return scratch.get(slot, like.numel(), dtype or like.dtype)


def present(task: TensorTask) -> list[int]:
    """Positions in ``task.inputs`` of the models that have this tensor."""
    return [i for i, x in enumerate(task.inputs) if x is not None]


def models_against_base(task: TensorTask, method: str) -> tuple[list[int], torch.Tensor | None]:
    """(positions of the models that have this tensor, None), or ([], the base's copy) when
    there is nothing to merge (no model has it, or it is empty): the opening of every operator
    that works on task vectors. A tensor without a base tensor is an error naming ``method``."""
    if task.base is None:
        raise MergeError(f"{method}: tensor '{task.name}' has no base tensor")
    models = present(task)
    if not models or task.numel == 0:
        return [], copy_of(task, task.base)
    return models, None


def other_of_pair(task: TensorTask, method: str) -> torch.Tensor | None:
    """The non-base input of a two-model method (base included), or None when only the base has
    this tensor; more than one other input, or no base tensor, is an error naming ``method``."""
    others = [x for x in task.inputs if x is not None]
    if len(others) > 1:
        raise MergeError(f"{method} takes exactly 2 models (base included), "
                         f"got {len(others) + 1}")
    if task.base is None:
        raise MergeError(f"{method}: the base model lacks tensor '{task.name}'")
    return others[0] if others else None


def copy_of(task: TensorTask, t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded through the compute dtype into a fresh output tensor (block by block)."""
    out = task.empty_output()
    flat = out.view(-1)
    for off, (p,) in pieces(task, [t]):
        flat[off:off + p.numel()].copy_(p)
    return out
