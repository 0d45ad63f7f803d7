"""RegMean, "Dataless Knowledge Fusion by Merging Weights of Language Models" (Jin et al., ICLR
2023; docs/methods/regmean.md §1): the linear layer that keeps every model's outputs on its own
inputs, in closed form.

For a linear weight W_i (out × in, ``y = x·W_iᵀ``) and the Gram matrix G_i = X_iᵀX_i / T_i of that
layer's inputs (in × in, mean over model i's T_i calibration tokens)::

    G̃_i = α·G_i + (1 − α)·diag(G_i)               off-diagonal entries scaled by α
    W*ᵀ = (Σ_i G̃_i)⁻¹ · Σ_i G̃_i·W_iᵀ               least squares on the stacked inputs

α = ``reduce_non_diagonal_ratio``: 1 is the exact least-squares solution, 0 a per-input-column
weighted mean (weights G_i[k, k]). The solve is Cholesky in float64; when Σ G̃ is not positive
definite (an input direction no text reached), ``ridge_solve`` adds ε·I and pulls the solution
toward the plain mean there: (ΣG̃ + εI)·W*ᵀ = Σ G̃_i·W_iᵀ + ε·W̄ᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

JITTERS = (1e-8, 1e-6, 1e-4, 1e-2)
"""ε / mean(diag ΣG̃) tried in turn when Cholesky of ΣG̃ fails."""


def reduce_non_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α·G with the diagonal kept: a new (in, in) tensor of G's dtype."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


@dataclass
class Solve:
    """The merged weight (out × in, float64) and how it was found: ``jitter`` is the ε used
    (0.0: plain Cholesky)."""

    weight: torch.Tensor
    jitter: float


def regmean_solve(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor],
                  alpha: float) -> Solve:
    """W* for same-shape weights W_i (out × in, any float dtype) and Grams G_i (in × in), in
    float64 on the weights' device."""
    lhs = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros((weights[0].shape[1], weights[0].shape[0]), dtype=torch.float64,
                      device=weights[0].device)
    for w, g in zip(weights, grams):
        g_tilde = reduce_non_diagonal(g.to(torch.float64), alpha)
        lhs += g_tilde
        rhs += g_tilde @ w.to(torch.float64).T
    return ridge_solve(lhs, rhs, weights)


def ridge_solve(lhs: torch.Tensor, rhs: torch.Tensor, weights: Sequence[torch.Tensor]) -> Solve:
    """Xᵀ from lhs·Xᵀ = rhs by Cholesky; on failure the ridge toward the mean W̄ with the
    smallest ε of ``JITTERS`` that makes lhs + εI positive definite."""
    factor, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return Solve(torch.cholesky_solve(rhs, factor).T, 0.0)
    mean_t = torch.stack([w.to(torch.float64) for w in weights]).mean(dim=0).T
    scale = float(lhs.diagonal().abs().mean()) or 1.0
    eye = torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device)
    for rel in JITTERS:
        eps = rel * scale
        factor, info = torch.linalg.cholesky_ex(lhs + eps * eye)
        if int(info) == 0:
            return Solve(torch.cholesky_solve(rhs + eps * mean_t, factor).T, eps)
    return Solve(mean_t.T.contiguous(), float("inf"))
