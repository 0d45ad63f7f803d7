"""Karcher (Riemannian, Fréchet) mean of N tensors on the unit hypersphere, rescaled by their
mean norm, mergekit semantics (docs/methods/karcher.md §1).

For x_1 … x_N, flattened, equal weights α_i = 1/N, ``max_iter`` (10) and ``tol`` (1e-5)::

    n_i = ‖x_i‖ ;  u_i = x_i / n_i ;  V = {i : n_i > tol} ;  V empty → out = 0
    β_i = α_i / Σ_V α                                     (i in V)
    u = Σ_V β_i·u_i ;  ‖u‖ < tol → u = u_first(V), else u = u / ‖u‖
    repeat max_iter times:
        θ_i = arccos(clamp(⟨u, u_i⟩, −1, 1))
        T = Σ_{i in V, θ_i ≥ tol} β_i·θ_i/sin θ_i·(u_i − ⟨u, u_i⟩·u)      (log map, averaged)
        ‖T‖ < tol → stop
        u = cos‖T‖·u + sin‖T‖·T/‖T‖ ;  ‖u‖ > tol → u = u / ‖u‖          (exp map)
    out = (Σ_i α_i·n_i)·u

u and T lie in the span of the x_i, so they are float64 coefficient vectors over them and
every norm and dot product is a quadratic form in their Gram matrix (``ops.gram``).
``karcher_coefficients`` returns c with out = Σ c_j·x_j.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mergekit_like.ops.gram import gram, norm_of, weighted_sum

MAX_ITER = 10
TOL = 1e-5


def karcher_coefficients(g: torch.Tensor, *, max_iter: int = MAX_ITER,
                         tol: float = TOL) -> list[float]:
    """Coefficients c (floats) with out = Σ c_j·x_j from the (N, N) float64 Gram matrix of
    x_1 … x_N (equal weights). N = 1 gives [1.0]; no norm above tol gives all zeros."""
    n = g.shape[0]
    if n == 1:
        return [1.0]
    norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(n)]
    alphas = [1.0 / n] * n
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    alpha_sum = sum(alphas[i] for i in valid)
    beta = {i: alphas[i] / alpha_sum for i in valid}
    units = {i: _unit(n, i, norms[i]) for i in valid}   # u_i = x_i / n_i as coefficients
    u = sum((beta[i] * units[i] for i in valid), torch.zeros(n, dtype=torch.float64))
    u_norm = norm_of(g, u)
    u = units[valid[0]].clone() if u_norm < tol else u / u_norm
    for _ in range(max_iter):
        tangent = torch.zeros(n, dtype=torch.float64)
        for i in valid:
            dot = min(1.0, max(-1.0, float(units[i] @ g @ u)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += beta[i] * (theta / math.sin(theta)) * (units[i] - dot * u)
        t_norm = norm_of(g, tangent)
        if t_norm < tol:
            break
        u = math.cos(t_norm) * u + math.sin(t_norm) * (tangent / t_norm)
        u_norm = norm_of(g, u)
        if u_norm > tol:
            u = u / u_norm
    scale = sum(a * m for a, m in zip(alphas, norms))
    return [float(v) for v in scale * u]


def _unit(n: int, i: int, norm: float) -> torch.Tensor:
    e = torch.zeros(n, dtype=torch.float64)
    e[i] = 1.0 / norm
    return e


def karcher(xs: Sequence[torch.Tensor], *, max_iter: int = MAX_ITER,
            tol: float = TOL) -> torch.Tensor:
    """Karcher mean of whole tensors of one shape and float dtype (a new tensor, same dtype)."""
    if len(xs) == 1:
        return xs[0].clone()
    c = karcher_coefficients(gram(xs), max_iter=max_iter, tol=tol)
    return weighted_sum(list(xs), c, torch.empty_like(xs[0]), torch.empty_like(xs[0]))
