"""Magnitude trim of TIES (docs/methods/ties.md §2): keep the k largest |δ| of a task vector.

For a tensor of n entries and a density 0 < d < 1::

    k   = max(1, int(d·n))                 Python float product, truncated (as mergekit)
    v_k = the k-th largest |δ|
    keep_j = |δ_j| > v_k, or |δ_j| = v_k among the first (lowest flat index) copies until k are kept
    δ̂  = δ where keep, else +0             δ̂ = δ unchanged when v_k = 0 (< k non-zero entries)

``magnitude_keep`` / ``magnitude_trim`` are that rule on a whole tensor (a stable sort).
``trim_piece_`` is the same rule given v_k and the tie cutoff, applied in place to any flat piece
of the tensor; ``kernels/kth_largest.py`` finds v_k and the cutoff without sorting, and the
tests prove the two routes give the same bits. ``trim_count`` is the one definition of k, also
used by the importance masks' ``top`` and by WEMoE's sparse experts.
"""

from __future__ import annotations

import math

import torch


def trim_count(density: float, numel: int) -> int:
    """k = max(1, int(d·numel)) (Python float product, truncated), for 0 < d ≤ 1."""
    return max(1, int(density * numel))


def magnitude_keep(delta: torch.Tensor, density: float) -> torch.Tensor:
    """keep [delta's shape, bool]: the k = trim_count(d, n) entries of largest |δ|, ties at v_k
    taken in row-major order (a stable sort of −|δ|); all-true for d ≥ 1."""
    flat = delta.reshape(-1)
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    k = trim_count(density, flat.numel())
    order = torch.sort(-flat.abs(), stable=True).indices[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order] = True
    return keep.view(delta.shape)


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """δ̂ = δ where ``magnitude_keep``, else +0 (a new tensor, same shape and dtype); δ itself
    (copied) when v_k = 0, i.e. when fewer than k entries are non-zero, so zeros keep their
    sign. For finite δ and 0 < d < 1 (d ≥ 1 keeps δ)."""
    k = trim_count(density, delta.numel())
    if density >= 1.0 or int(torch.count_nonzero(delta)) < k:
        return delta.clone()
    return torch.where(magnitude_keep(delta, density), delta, torch.zeros_like(delta))


def next_float(v: float, toward: float, dtype: torch.dtype) -> float:
    """The representable neighbour of v (a value of ``dtype``) in the direction of ``toward``
    (±inf steps to ±finfo.max)."""
    if math.isinf(v):
        return v if v == toward else (-torch.finfo(dtype).max if v < 0 else torch.finfo(dtype).max)
    t = torch.tensor(v, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(toward, dtype=dtype)))


def trim_piece_(delta: torch.Tensor, offset: int, value: float,
                cutoff: int | None = None, below: float | None = None) -> torch.Tensor:
    """The trim of a flat piece of δ in place, given v_k = ``value`` (a value of delta's dtype):
    keep |δ| > v_k, and |δ| = v_k only at flat indices ≤ ``cutoff`` (all of them when None);
    zero (+0) the rest. ``offset`` is the flat index of delta[0]; ``below`` = next_float(v_k, 0)
    may be passed to save recomputing it. v_k ≤ 0 keeps everything.

    One ``hardshrink`` per part: |δ| > below ⇔ |δ| ≥ v_k keeps the ties, |δ| > v_k drops them."""
    if value <= 0.0:
        return delta                              # everything non-zero is kept
    if below is None:
        below = next_float(value, 0.0, delta.dtype)
    n = delta.numel()
    if cutoff is None or cutoff >= offset + n - 1:
        return torch.hardshrink(delta, below, out=delta)
    if cutoff < offset:
        return torch.hardshrink(delta, value, out=delta)
    c = cutoff - offset + 1
    torch.hardshrink(delta[:c], below, out=delta[:c])
    torch.hardshrink(delta[c:], value, out=delta[c:])
    return delta
