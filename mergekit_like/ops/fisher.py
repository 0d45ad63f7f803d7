"""Fisher merging, "Merging Models with Fisher-Weighted Averaging" (Matena & Raffel, NeurIPS
2022; docs/methods/fisher.md §1): each entry averaged with the models' diagonal Fisher
information as weights::

    θ*  = Σ_i c_i·(F_i + m)·θ_i / Σ_i c_i·(F_i + m)

with m = ``minimal_fisher_weight`` (keeps the division defined where no model has information)
and c_i the model's coefficient. Under ``normalize_fisher_weight`` (FusionBench's default) c_i is
the recipe weight times n_i = (1/(‖F_i‖ + m)) / Σ_j 1/(‖F_j‖ + m), ‖F_i‖ the L2 norm of model i's
whole Fisher (every tensor), so a model whose texts give larger gradients does not dominate.
"""

from __future__ import annotations

from typing import Sequence

import torch


def norm_coefficients(weights: Sequence[float], fisher_norms: Sequence[float] | None,
                      minimal: float) -> list[float]:
    """c_i: the weights, times the normalised inverse Fisher norms when those are given."""
    if fisher_norms is None:
        return [float(w) for w in weights]
    inv = [1.0 / (float(n) + minimal) for n in fisher_norms]
    total = sum(inv)
    return [float(w) * v / total for w, v in zip(weights, inv)]


def fisher_average(thetas: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor],
                   coefficients: Sequence[float], minimal: float) -> torch.Tensor:
    """Σ c_i (F_i + m) θ_i / Σ c_i (F_i + m) of same-shape tensors, in float32 (or wider, if an
    input is), summed in model order."""
    dtype = torch.promote_types(torch.float32, thetas[0].dtype)
    num = torch.zeros(thetas[0].shape, dtype=dtype, device=thetas[0].device)
    den = torch.zeros_like(num)
    for theta, f, c in zip(thetas, fishers, coefficients):
        w = (f.to(dtype) + minimal) * float(c)
        num += w * theta.to(dtype)
        den += w
    return num / den
