"""SCE: select, calculate, erase (Wan et al., FuseChat, 2024; docs/methods/sce.md §1), mergekit
semantics.

With b the base and x_1 … x_N the models, on one whole tensor (T = [N, *shape] stacks them)::

    T_i  = x_i − b
    select (τ = select_topk < 1):
        v    = Var_i(T_i)                      population variance across models, per entry
        k    = int(count_nonzero(v)·τ)         a float32 product, truncated (as mergekit)
        keep = the k entries of largest v      ties: lowest flat index first
        T_i ← T_i ⊙ keep                       (τ ≤ 0: keep nothing; τ ≥ 1: keep all)
    calculate:  s_i = mean(T_i²) ;  w_i = s_i / Σ_j s_j   (1/N each when |Σ_j s_j| < 1e-6)
    erase:      e_i = [sign(T_i) = σ],  σ = +1 where Σ_i T_i ≥ 0, else −1   (zeros never agree)
    out  = b + Σ_i w_i·e_i·T_i / max(Σ_i w_i·e_i, 1e-6)

Arithmetic in the tensors' dtype (float32 in practice), with mergekit's torch reductions.
"""

from __future__ import annotations

from typing import Sequence

import torch

WEIGHT_EPS = 1e-6
"""|Σ_j s_j| below this: every model gets weight 1/N."""
DENOM_EPS = 1e-6
"""The per-entry sum of agreeing weights is clamped to at least this."""


def topk_count(nonzero: int, fraction: float) -> int:
    """k = int(nonzero·τ) computed as mergekit does: an int64 count times a Python float gives a
    float32 product, which is truncated."""
    return int(torch.tensor(nonzero, dtype=torch.int64) * fraction)


def variance_keep(tvs: torch.Tensor, fraction: float) -> torch.Tensor:
    """keep [tvs.shape[1:], bool] of the select step for task vectors ``tvs`` [N, *shape]:
    the k = ``topk_count`` entries of largest population variance across the models."""
    shape = tvs.shape[1:]
    if fraction <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=tvs.device)
    if fraction >= 1:
        return torch.ones(shape, dtype=torch.bool, device=tvs.device)
    var = torch.var(tvs, dim=0, unbiased=False).reshape(-1)
    k = topk_count(int(torch.count_nonzero(var)), fraction)
    keep = torch.zeros(var.numel(), dtype=torch.bool, device=tvs.device)
    if k > 0:
        keep[torch.sort(var, descending=True, stable=True).indices[:k]] = True
    return keep.reshape(shape)


def sce_weights(tvs: torch.Tensor) -> torch.Tensor:
    """w [N] (tvs' dtype): each model's mean of squares over its whole tensor, divided by the sum
    over models (Python float); 1/N each when that sum is below 1e-6. For stacked 0-d tensors
    (tvs of shape [N]) every weight is 1, as mergekit's reduction over no dimension gives."""
    n = tvs.shape[0]
    if tvs.dim() == 1:
        return torch.ones(n, dtype=tvs.dtype, device=tvs.device)
    squares = torch.mean(tvs ** 2, dim=list(range(1, tvs.dim())))
    total = torch.sum(squares).item()
    if abs(total) < WEIGHT_EPS:
        return torch.ones_like(squares) / n
    return squares / total


def erase_agree(tvs: torch.Tensor) -> torch.Tensor:
    """e [tvs.shape, bool]: sign(T_i) equals the sign elected by Σ_i T_i (≥ 0 elects +1)."""
    elected = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    return tvs.sign() == elected


def sce(base: torch.Tensor, xs: Sequence[torch.Tensor], *, select_topk: float = 1.0
        ) -> torch.Tensor:
    """SCE of same-shape float tensors (a new tensor of base's shape and dtype); ``xs`` empty
    gives a copy of base."""
    if not xs:
        return base.clone()
    tvs = torch.stack([x - base for x in xs], dim=0)
    if select_topk < 1:
        tvs = tvs * variance_keep(tvs, select_topk).to(tvs.dtype).unsqueeze(0)
    agree = erase_agree(tvs)
    weights = sce_weights(tvs).reshape(-1, *([1] * (tvs.dim() - 1)))
    erased = weights * agree
    merged = (tvs * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=DENOM_EPS)
