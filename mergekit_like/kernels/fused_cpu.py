"""Fused CPU loops (numba) for the two hot paths of the task-vector methods.

The functions of ``ops/`` (task_vectors, sign_consensus, trim, drop) define the math; torch runs
each of their elementwise steps as its own pass over memory, about 60 passes per parameter for
TIES. The loops here make the same IEEE float32 operations in the same order, one chunk of a span
at a time, straight from the stored bf16/float32 bytes, so they give the same bits
(``tests/kernels/`` compares them with the torch path and with the ops/ equations on tensors built
to hit every branch):

* ``scan_abs_delta``: one read pass of ``kth_largest.scan_pass`` over a span of |δ| = |x − b|:
  #(|δ| > hi), #(|δ| ≥ hi), #(|δ| ≥ lo) and the values (with flat indices) in [c_lo, c_hi].
* ``merge_span``: out = b + λ·Δ of docs/methods/task_arithmetic.md §1 over a span, for
  magnitude-trimmed (TIES), randomly dropped (DARE), masked by precomputed keep bits (DELLA's
  MAGPRUNE: ``Keep``), banded (breadcrumbs: ``Band``) or whole δ_i, with or without the sign
  consensus, written in the output dtype.

bf16 is read as its bit pattern (uint16 << 16 is the float32 of equal value) and written with
round-to-nearest-even, as torch casts. Only used when ``supported`` says so: CPU, float32
compute, bf16/float32 contiguous inputs, no load rounding; and, for ``merge_span``, inputs known
finite (torch's vectorised bf16 cast spells NaN differently from its scalar one).
``MERGEKIT_LIKE_FUSED=0`` turns them off (``lazy_numba.enabled``). numba compiles each signature
once (cached on disk).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from mergekit_like.kernels.lazy_numba import LazyLoops, enabled
from mergekit_like.ops.drop import KEEP_ALL
from mergekit_like.ops.task_vectors import plain_denominator

PIECE = 1 << 16
"""Elements per counted piece of a scan (a multiple of fused_loops.CHUNK): a partial tie at the k-th value
is then located by recomputing |δ| over one such piece only."""

_RAW = {torch.bfloat16: np.uint16, torch.float32: np.float32}


def supported(task: Any, tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> bool:
    """True when the fused loops compute exactly what the torch path computes for ``task``."""
    if not enabled() or task.device.type != "cpu" or task.compute_dtype != torch.float32:
        return False
    for t in [*tensors, *([out] if out is not None else [])]:
        if t.dtype not in _RAW or not t.is_contiguous() or t.device.type != "cpu":
            return False
        if task.load_rounding(t.dtype) is not None:
            return False                       # a load rounding step (recipe dtype) applies
    return _kernels() is not None


def raw(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous bf16 (as uint16 bits) or float32 tensor."""
    flat = t.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def _smoke(kernels) -> None:
    a = np.zeros(kernels.CHUNK, np.uint16)
    kernels.scan(a, a, np.float32(1), np.float32(0), np.float32(0), np.float32(1), True, 0, PIECE)


LOOPS = LazyLoops("mergekit_like.kernels.fused_loops", _smoke, "fused CPU loops",
                  fallback="merging with torch operations (slower)")
_kernels = LOOPS.get
"""The compiled loops, or None when numba cannot provide them here (then every merge takes
the torch path)."""


def warm_up() -> None:
    """Load the compiled loops on a background thread while a merge reads its first tensors."""
    if enabled():
        LOOPS.warm_up()


def scan_abs_delta(x: torch.Tensor, b: torch.Tensor, span: tuple[int, int], lo: float,
                   hi: float, c_lo: float, c_hi: float, hi_open: bool, lo_open: bool,
                   collect: bool) -> tuple:
    """``kth_largest.scan_pass`` over flat ``span`` of |x − b|, in pieces of ``PIECE`` elements."""
    k = _kernels()
    s, e = span
    lo_c = c_lo if c_lo > 0.0 else 0.0         # |δ| ≥ 0 (and +0.0: -0.0's bits would not do)
    collect = collect and c_hi >= lo_c
    f32 = np.float32
    counts, m, vals, idx = k.scan(raw(x)[s:e], raw(b)[s:e], f32(hi), f32(lo), f32(lo_c),
                                  f32(c_hi), collect, s, PIECE)
    gt, ge_hi, ge_lo, _ = (int(v) for v in counts.sum(axis=0))
    eq_hi: list[tuple[int, int, int]] = []
    eq_lo: list[tuple[int, int, int]] = []
    for p, (g, gh, gl, coll) in enumerate(counts.tolist()):
        off = s + p * PIECE
        n = min(PIECE, e - off)
        if hi_open:
            eq_hi.append((off, n, gh - g))
        if lo_open:
            eq_lo.append((off, n, gl - coll - (gh if hi_open else g)))
    inside = [torch.from_numpy(vals[:m])] if m else []
    where = [torch.from_numpy(idx[:m])] if m else []
    return gt, (ge_hi if hi_open else 0), (ge_lo if lo_open else 0), inside, where, eq_hi, eq_lo


class Trim:
    """One model's magnitude trim as the loops take it: keep |δ| > below at flat indices
    ≤ cutoff and |δ| > value after it (``ops.trim.trim_piece_``); value ≤ 0 keeps all."""

    def __init__(self, value: float, below: float, cutoff: int | None):
        self.value, self.below = value, below
        self.cutoff = np.iinfo(np.int64).max if cutoff is None else cutoff


class Drop:
    """One model's DARE drop as the loops take it: ``ops.drop.mask_key``, and keep_j ⇔ the top
    24 bits of z_j < ``threshold`` = ``ops.drop.keep_threshold(d)`` (0: drop all; KEEP_ALL: keep
    all)."""

    def __init__(self, key: int, threshold: int):
        self.key, self.threshold = key, threshold


class Keep:
    """One model's precomputed keep mask (flat bool, the tensor's length; DELLA's MAGPRUNE):
    δ̂ = δ·keep, as ``δ.mul_(keep)``."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep


class Band:
    """One model's breadcrumbs band: keep top(hi) ∖ top(lo), each top(m) given as (v, c):
    {|δ| > v} ∪ {|δ| = v at flat indices ≤ c} (``kernels.breadcrumbs.Top``); δ̂ = δ·keep."""

    def __init__(self, hi: tuple[float, int], lo: tuple[float, int]):
        self.hi, self.lo = hi, lo


_ALL = (-1.0, -1)                       # top(v, c) holding every finite |δ| ≥ 0
_NONE = (float("inf"), -1)              # … and none of them


MAX_KEEP_MODELS = 32
"""Most models whose keep masks the loops take (bit j of one uint32 per entry)."""


def forms_supported(trims: Sequence[Any]) -> bool:
    """Whether ``merge_span`` takes these per-model forms (at most ``MAX_KEEP_MODELS`` models
    when any has a ``Keep``)."""
    return len(trims) <= MAX_KEEP_MODELS or not any(isinstance(t, Keep) for t in trims)


def _mask_tuple(trims: Sequence[Any], s: int, e: int) -> tuple | None:
    """The span's keep masks, one uint8 array per model (all ones for a model without one), or
    None when no model has one."""
    if not any(isinstance(t, Keep) for t in trims):
        return None
    return tuple(raw(t.keep)[s:e].view(np.uint8) if isinstance(t, Keep)
                 else np.ones(e - s, np.uint8) for t in trims)


def _band_tuples(trims: Sequence[Any]) -> tuple | None:
    """(v_hi, c_hi, v_lo, c_lo) per-model tuples (keep-all for models without a band), or
    None."""
    if not any(isinstance(t, Band) for t in trims):
        return None
    pairs = [(t.hi, t.lo) if isinstance(t, Band) else (_ALL, _NONE) for t in trims]
    return (tuple(np.float32(hi[0]) for hi, _ in pairs), tuple(np.int64(hi[1]) for hi, _ in pairs),
            tuple(np.float32(lo[0]) for _, lo in pairs), tuple(np.int64(lo[1]) for _, lo in pairs))


def merge_span(out: torch.Tensor, keep: torch.Tensor | None, base: torch.Tensor,
               xs: Sequence[torch.Tensor], span: tuple[int, int], trims: Sequence[Trim | None],
               scales: Sequence[tuple[int, float]], weights: Sequence[float], *,
               consensus: bool, normalize: bool, lam: float) -> None:
    """out[span] = b + λ·Δ (the torch steps of the task-vector adapter, fused).

    ``trims[i]``: model i's ``Trim``, ``Drop``, ``Keep`` or ``Band`` (None: not sparsified); ``scales[i]``: its
    rescale step (mode, value) of ``ops.drop.rescale_`` (SCALE_NONE, SCALE_BY r, SCALE_DIVIDE d);
    ``weights[i]`` = w_i. ``keep`` (float32, the tensor's length) receives Δ before λ when given
    (grid memo)."""
    k = _kernels()
    s, e = span
    f32 = np.float32
    magnitude = [t if isinstance(t, Trim) else None for t in trims]
    value = tuple(f32(t.value if t else 0.0) for t in magnitude)
    below = tuple(f32(t.below if t else 0.0) for t in magnitude)
    cutoff = tuple(np.int64(t.cutoff if t else 0) for t in magnitude)
    keys = thresholds = None                   # None: the loop has no drop step at all
    if any(isinstance(t, Drop) for t in trims):
        keys = tuple(np.uint64(t.key if isinstance(t, Drop) else 0) for t in trims)
        thresholds = tuple(np.uint64(t.threshold if isinstance(t, Drop) else KEEP_ALL)
                           for t in trims)
    mode = tuple(np.int64(m) for m, _ in scales)
    scale = tuple(f32(v) for _, v in scales)
    w = tuple(f32(c) for c in weights)
    norm_div = f32(plain_denominator(weights))
    keep_r = raw(keep)[s:e] if keep is not None else None
    k.merge(raw(out)[s:e], keep_r, raw(base)[s:e], tuple(raw(x)[s:e] for x in xs), value,
            below, cutoff, keys, thresholds, _mask_tuple(trims, s, e), _band_tuples(trims), mode,
            scale, w, consensus, normalize, norm_div, f32(lam), s)
