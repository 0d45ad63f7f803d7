"""Model Stock (Jang et al., ECCV 2024; docs/methods/model_stock.md §1), mergekit semantics.

With w0 the base and w_1 … w_N (N ≥ 2) the fine-tuned models, each seen as a matrix of rows
(§2: one row = the whole tensor, or with ``filter_wise`` one vector along the last dimension)::

    δ_i    = w_i − w0
    cos_ij = clamp(⟨δ_i, δ_j⟩ / max(‖δ_i‖·‖δ_j‖, 1e-6), −1, 1)      per row, for i < j
    c      = mean over the N(N−1)/2 pairs of cos_ij                  per row
    t      = N·c / (1 + (N−1)·c)
    out    = t·mean_i(w_i) + (1 − t)·w0

All arithmetic runs in the tensors' dtype (float32 in practice) with the same torch reductions
mergekit uses. No I/O, no tiling: whole tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch

COS_EPS = 1e-6
"""The product of norms is clamped to at least this before the division (mergekit)."""


def as_rows(t: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """A [R, C] view of ``t`` whose rows are the vectors one t is computed for: the whole
    tensor as one row (R = 1), or with ``filter_wise`` each vector along the last dimension
    (a 1-D or 0-d tensor is still one row). ``t`` must have at least one element."""
    if not filter_wise or t.dim() < 2:
        return t.reshape(1, -1)
    return t.reshape(-1, t.shape[-1])


def pair_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos per row of two [R, C] float tensors: ⟨a, b⟩ / max(‖a‖·‖b‖, 1e-6), clamped to
    [−1, 1]; a [R] tensor. A zero row gives cos 0."""
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return ((a * b).sum(dim=-1) / norms.clamp(min=COS_EPS)).clamp(-1, 1)


def mean_pairwise_cosine(offsets: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean over all pairs i < j (in that order) of ``pair_cosine(δ_i, δ_j)``: [R]."""
    cosines = [pair_cosine(offsets[i], offsets[j])
               for i in range(len(offsets)) for j in range(i + 1, len(offsets))]
    return torch.stack(cosines).mean(dim=0)


def stock_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """t = N·c / (1 + (N−1)·c), elementwise (same shape and dtype as ``cos``). Infinite or NaN
    where 1 + (N−1)·c = 0 (the task vectors cancel out)."""
    return (n * cos) / (1 + (n - 1) * cos)


def model_stock(base: torch.Tensor, xs: Sequence[torch.Tensor], *,
                filter_wise: bool = False, ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Model Stock of same-shape float tensors (N = len(xs) ≥ 2, at least one element): a new
    tensor of base's shape and dtype, t·mean(xs) + (1 − t)·base with t from ``model_ratio``
    (``ratio``: that t, [R, 1], when the caller has computed it already)."""
    if len(xs) < 2:
        raise ValueError("model_stock needs at least 2 models besides the base")
    w0 = as_rows(base, filter_wise)
    ws = [as_rows(x, filter_wise) for x in xs]
    t = model_ratio(base, xs, filter_wise=filter_wise) if ratio is None else ratio
    w_avg = sum(ws) / len(ws)
    return (t * w_avg + (1 - t) * w0).reshape(base.shape)


def model_ratio(base: torch.Tensor, xs: Sequence[torch.Tensor], *,
                filter_wise: bool = False) -> torch.Tensor:
    """The interpolation ratio t as an [R, 1] tensor (R = 1 unless ``filter_wise``)."""
    w0 = as_rows(base, filter_wise)
    offsets = [as_rows(x, filter_wise) - w0 for x in xs]
    return stock_ratio(mean_pairwise_cosine(offsets), len(xs)).unsqueeze(-1)
