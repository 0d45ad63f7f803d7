"""Spherical linear interpolation (Shoemake, SIGGRAPH 1985) of two tensors, mergekit semantics
(docs/methods/slerp.md §1).

v0 = base and v1 = the other model, flattened. Each is normalised only when its norm exceeds
1e-8 (mergekit's quirk, which matters for all-zero biases); c = ⟨v̂0, v̂1⟩::

    |c| > 0.9995:  out = (1−t)·v0 + t·v1
    otherwise:     θ = arccos c ;  out = sin((1−t)·θ)/sin θ · v0 + sin(t·θ)/sin θ · v1

The unnormalised tensors are interpolated; the coefficients are computed in float64 from the
float64 norms and dot product, the blend runs in the tensors' dtype. t = 0 gives v0 and t = 1
gives v1 bit for bit.
"""

from __future__ import annotations

import math

import torch

NORM_EPS = 1e-8
COLINEAR = 0.9995


def slerp_coefficients(t: float, norm0: float, norm1: float, dot: float) -> tuple[float, float]:
    """(c0, c1) with out = c0·v0 + c1·v1, from ‖v0‖, ‖v1‖ and ⟨v0, v1⟩ (float64 scalars)."""
    n0 = norm0 if norm0 > NORM_EPS else 1.0
    n1 = norm1 if norm1 > NORM_EPS else 1.0
    c = dot / (n0 * n1)
    if abs(c) > COLINEAR:
        return 1.0 - t, t
    theta = math.acos(c)
    sin_theta = math.sin(theta)
    theta_t = theta * t
    return math.sin(theta - theta_t) / sin_theta, math.sin(theta_t) / sin_theta


def blend(v0: torch.Tensor, v1: torch.Tensor, c0: float, c1: float,
          out: torch.Tensor | None = None, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """c0·v0 + c1·v1 elementwise (each product rounded, then added); a zero coefficient drops
    its term, so (1, 0) returns v0 exactly. ``out``/``tmp``: optional work buffers."""
    if c1 == 0.0:
        return v0.clone() if out is None else out.copy_(v0)
    if c0 == 0.0:
        return torch.mul(v1, c1, out=out) if out is not None else v1 * c1
    res = torch.mul(v0, c0, out=out) if out is not None else v0 * c0
    return res.add_(torch.mul(v1, c1, out=tmp) if tmp is not None else v1 * c1)


def row_products(a: torch.Tensor, b: torch.Tensor, row: int,
                 work: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row sums of a·b for flat float64 a, b of whole rows ``row`` entries long (row = 1:
    the products themselves), a new float64 tensor. ``work``: a buffer for the products."""
    prod = torch.mul(a, b, out=work)
    if row == 1:
        return prod if work is None else prod.clone()
    return prod.view(-1, row).sum(dim=1)


def slerp_statistics(v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float, float]:
    """(‖v0‖, ‖v1‖, ⟨v0, v1⟩) in float64: products summed per row (a dim-0 slice; each entry
    of a 0-d/1-d tensor is a row), then exactly over the rows (math.fsum), so any cut of the
    tensor into whole rows gives the same three numbers."""
    row = max(1, math.prod(v0.shape[1:])) if v0.dim() >= 2 else 1
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()

    def total(x: torch.Tensor, y: torch.Tensor) -> float:
        return math.fsum(row_products(x, y, row).tolist())

    return math.sqrt(total(a, a)), math.sqrt(total(b, b)), total(a, b)


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP of two whole tensors of equal shape and dtype: c0·v0 + c1·v1 (a new tensor)."""
    c0, c1 = slerp_coefficients(t, *slerp_statistics(v0, v1))
    return blend(v0, v1, c0, c1)
