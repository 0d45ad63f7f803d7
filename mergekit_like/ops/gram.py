"""Gram matrices of flattened tensors in float64, summed exactly (the statistics pass of the
hypersphere methods, docs/methods/multislerp.md §1 and docs/methods/karcher.md §1).

For N tensors x_1 … x_N of one shape, flattened, ``G[i, j] = ⟨x_i, x_j⟩``. Products are taken
in float64 (a product of two float32 values is exact there), summed per row (a dim-0 slice;
each entry of a 0-d/1-d tensor is a row), then over all rows with ``math.fsum``: any cut of the
tensor into whole rows gives the same matrix, bit for bit.

The methods that use it (multislerp, karcher) are linear combinations of their inputs,
out = Σ_j c_j·x_j: once G is known, every norm and dot product of the algorithm is a small
matrix expression in the coefficients c, and the blend is ``weighted_sum``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def row_gram(flats: Sequence[torch.Tensor], row: int) -> torch.Tensor:
    """Per-row sums of x_i·x_j for flat float64 pieces of whole rows ``row`` long:
    a float64 tensor of shape (N, N, rows of the piece), symmetric in its first two axes."""
    n = len(flats)
    rows = flats[0].numel() // max(1, row)
    out = torch.empty((n, n, rows), dtype=torch.float64, device=flats[0].device)
    for i in range(n):
        for j in range(i, n):
            prod = flats[i] * flats[j]
            sums = prod if row == 1 else prod.view(-1, row).sum(dim=1)
            out[i, j] = sums
            out[j, i] = sums
    return out


def exact_gram(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The (N, N) float64 Gram matrix from ``row_gram`` pieces, each entry the correctly
    rounded sum (math.fsum) of all its row sums."""
    cat = torch.cat(list(parts), dim=2)
    n = cat.shape[0]
    g = torch.empty((n, n), dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = math.fsum(cat[i, j].tolist())
    return g


def gram(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, N) float64 Gram matrix of whole tensors of one shape (any float dtype)."""
    shape = xs[0].shape
    row = max(1, math.prod(shape[1:])) if len(shape) >= 2 else 1
    flats = [x.reshape(-1).to(torch.float64) for x in xs]
    return exact_gram([row_gram(flats, row)])


def quad(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """aᵀ·G·b (b = a when omitted) for float64 coefficient vectors: ⟨Σ a_i x_i, Σ b_j x_j⟩."""
    b = a if b is None else b
    return float(a @ g @ b)


def norm_of(g: torch.Tensor, a: torch.Tensor) -> float:
    """‖Σ a_i x_i‖ from the Gram matrix (a negative rounding residue counts as 0)."""
    return math.sqrt(max(quad(g, a), 0.0))


def weighted_sum(xs: Sequence[torch.Tensor], coeffs: Sequence[float | torch.Tensor],
                 out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Σ_j c_j·x_j into ``out`` (same shape as each x), in order, each product rounded and then
    added. A coefficient may be a float or a tensor that broadcasts against x (per-vector
    coefficients). Terms whose coefficient is exactly 0 are left out, so (1, 0) returns x_1 bit
    for bit and all-zero coefficients give +0.0 everywhere."""
    started = False
    for x, c in zip(xs, coeffs):
        if _is_zero(c):
            continue
        if not started:
            torch.mul(x, c, out=out)
            started = True
        else:
            out.add_(torch.mul(x, c, out=tmp))
    if not started:
        out.zero_()
    return out


def _is_zero(c: float | torch.Tensor) -> bool:
    if isinstance(c, torch.Tensor):
        return not bool(c.any())
    return float(c) == 0.0
