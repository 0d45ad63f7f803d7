"""Multi-SLERP: barycentric interpolation of N tensors on the hypersphere through the tangent
space at their weighted mean direction, mergekit semantics (docs/methods/multislerp.md §1).

For x_1 … x_N (task vectors x_i − base when a base is given), flattened, weights w (÷ Σ w under
``normalize_weights``) and eps (default 1e-8)::

    n_i = ‖x_i‖ ;  u_i = x_i / (n_i + eps)               (onto the unit sphere)
    m = Σ w_i·u_i ;  ‖m‖ < eps: N = 2 → Σ w_i·x_i (lerp), else an error
    μ = m / ‖m‖                                           (weighted mean direction)
    T = Σ w_i·(u_i − ⟨u_i, μ⟩·μ)                          (tangent-space interpolation)
    τ = ‖T‖ + eps
    out = (Σ w_i·n_i) · (cos τ·μ + sin τ/τ · T)           (exponential map, rescaled)

Every vector above lies in the span of the x_i, so it is kept as a float64 coefficient vector
over them and every norm and dot product is a quadratic form in the Gram matrix G of the x_i
(``ops.gram``). ``multislerp_coefficients`` returns c with out = Σ c_j·x_j; the blend is one
weighted sum in the compute dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mergekit_like.ops.gram import gram, norm_of, weighted_sum

EPS = 1e-8


class AntipodalError(ValueError):
    """The weighted mean of the unit vectors vanishes for N > 2 (mergekit raises too)."""


def multislerp_coefficients(g: torch.Tensor, weights: Sequence[float], *,
                            normalize_weights: bool = True, eps: float = EPS) -> list[float]:
    """Coefficients c (floats) with out = Σ c_j·x_j, from the (N, N) float64 Gram matrix ``g``
    of x_1 … x_N and their weights. N = 1 gives [1.0]. Raises ZeroDivisionError when
    normalize_weights and Σ w = 0, AntipodalError when ‖m‖ < eps and N > 2."""
    n_models = g.shape[0]
    if n_models == 1:
        return [1.0]
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if normalize_weights:
        total = float(w.sum())
        if total == 0.0:
            raise ZeroDivisionError("weights sum to 0")
        w = w / total
    norms = torch.diagonal(g).clamp(min=0).sqrt()
    a = w / (norms + eps)                               # m = Σ a_j·x_j
    m_norm = norm_of(g, a)
    if m_norm < eps:
        if n_models == 2:
            return [float(v) for v in w]
        raise AntipodalError("the weighted sum of the unit input tensors is zero (antipodal "
                             "inputs with balancing weights); change the weights")
    mu = a / m_norm
    dots = (g @ mu) / (norms + eps)                     # ⟨u_i, μ⟩
    tangent = a - float((w * dots).sum()) * mu          # T = Σ w_i u_i − (Σ w_i⟨u_i, μ⟩)·μ
    tau = norm_of(g, tangent) + eps
    avg_norm = float((norms * w).sum())
    c = avg_norm * (math.cos(tau) * mu + (math.sin(tau) / tau) * tangent)
    return [float(v) for v in c]


def multislerp(xs: Sequence[torch.Tensor], weights: Sequence[float], *,
               base: torch.Tensor | None = None, normalize_weights: bool = True,
               eps: float = EPS) -> torch.Tensor:
    """Multi-SLERP of whole tensors of one shape and float dtype (a new tensor, same dtype):
    on the task vectors x_i − base and + base at the end when ``base`` is given."""
    if len(xs) == 1:
        return xs[0].clone()
    vs = [x - base for x in xs] if base is not None else list(xs)
    c = multislerp_coefficients(gram(vs), weights, normalize_weights=normalize_weights, eps=eps)
    out = weighted_sum(vs, c, torch.empty_like(vs[0]), torch.empty_like(vs[0]))
    return out.add_(base) if base is not None else out
