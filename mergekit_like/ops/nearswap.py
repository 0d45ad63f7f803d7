"""NearSwap (alchemonaut's QuartetAnemoi merges; docs/methods/nearswap.md §1), elementwise on two
tensors of one shape: a = the base, b = the other model::

    w   = clamp(t / max(|a − b|, 1e-6), 0, 1)
    out = w·b + (1 − w)·a

Where the two models already agree to within t, the base takes the other model's value
(w = 1); where they differ more, it moves toward it by t/|a − b| only. The 1e-6 floor on the
difference (mergekit's) keeps the division finite where a = b; w is clamped, so t ≤ 0 gives
w = 0 (the base).
"""

from __future__ import annotations

import torch

DIFF_FLOOR = 1e-6
"""mergekit's lower clamp of |a − b| before the division."""


def nearswap_weight(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """w = clamp(t / max(|a − b|, 1e-6), 0, 1): same shape and float dtype as a and b.

    The division is written as mergekit writes it (a Python float over a tensor), which torch
    evaluates as t·reciprocal(|a − b|); kept so the bits match."""
    absdiff = torch.sub(a, b).abs_().clamp_(min=DIFF_FLOOR)
    return (float(t) / absdiff).clamp_(min=0.0, max=1.0)  # torch: t·(1/|a − b|), as mergekit


def nearswap(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """out = w·b + (1 − w)·a with w = ``nearswap_weight(a, b, t)``, in a and b's dtype (a new
    tensor; each product rounded, then the two added, as mergekit writes it)."""
    w = nearswap_weight(a, b, t)
    return (w * b).add_((1.0 - w).mul_(a))
