"""Model Breadcrumbs' outlier trim (Davari & Belilovsky, 2023; docs/methods/breadcrumbs.md §1–§2):
drop the largest-magnitude entries of a task vector (outliers) and the smallest ones, keep the
band between.

For a tensor of n entries, a density 0 < d < 1 and an outlier fraction γ ≥ 0::

    k      = int(d·n)                      entries kept (Python float product, truncated)
    t      = int(γ·n)                      largest entries dropped as outliers
    lower  = n − k − t ;  if lower < 0: t ← t + lower       (fewer outliers, so k still fit)
    q_j    = position of j when |δ| is ordered descending, ties by lowest flat index first
    keep_j = t ≤ q_j < t + k
    δ̂      = δ ⊙ keep                     a dropped entry is δ_j·0

d ≥ 1 keeps δ as is (no outlier removal either). With t = 0 the band is the top k: the
magnitude trim of ``ops/trim.py`` with the same tie rule. ``outlier_keep_sorted`` is that rule
in its paper form (one stable sort of |δ|). The fast path, ``kernels/breadcrumbs.outlier_keep``,
gives the same mask without sorting (tested bit for bit). ``outlier_trim`` applies the rule to a
whole tensor; the method adapter computes the mask once per model and tensor and applies slices
of it with ``apply_keep_``.
"""

from __future__ import annotations

import torch



def outlier_counts(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """(t, k): outliers dropped from the top and entries kept, for 0 ≤ d < 1, γ ≥ 0."""
    keep = int(density * numel)
    top = int(gamma * numel)
    lower = numel - keep - top
    if lower < 0:
        top += lower
    return top, keep


def outlier_keep_sorted(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """keep [flat n, bool]: t ≤ q_j < t + k (see the module docstring); all true for d ≥ 1.
    The paper form, by one stable sort: the reference ``outlier_keep`` is tested against.

    Memory: |δ| (float), the sort's values and indices, and the bool result, all of n entries."""
    n = delta.numel()
    if density >= 1.0:
        return torch.ones(n, dtype=torch.bool, device=delta.device)
    top, keep = outlier_counts(density, gamma, n)
    flat = delta.reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[top:top + keep]] = True
    return mask


def apply_keep_(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """δ ← δ·keep in place (a flat piece and the matching slice of the bool keep mask)."""
    return delta.mul_(keep)


def outlier_trim(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """δ̂ = δ ⊙ keep(δ; d, γ), a new tensor of δ's shape and dtype (δ copied for d ≥ 1)."""
    if density >= 1.0:
        return delta.clone()
    keep = outlier_keep_sorted(delta, density, gamma)
    return apply_keep_(delta.reshape(-1).clone(), keep).view(delta.shape)
