"""Linear merge (model soups, Wortsman et al., ICML 2022; docs/methods/linear.md §1)::

    out = Σ_i w_i·x_i / Σ_i w_i      (normalize, default)
    out = Σ_i w_i·x_i                (normalize: false)

The sum runs in model order in the compute dtype; each product w_i·x_i is rounded, then added
(no fused multiply-add), so the result does not depend on how the tensor is cut.
"""

from __future__ import annotations

from typing import Sequence

import torch


def linear_combination(xs: Sequence[torch.Tensor], weights: Sequence[float], *,
                       normalize: bool, out: torch.Tensor | None = None,
                       tmp: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i w_i·x_i (÷ Σ_i w_i when normalize) of same-shape float tensors, in order.

    ``out``/``tmp``: optional work buffers of x's shape (the result is then ``out``). Raises
    ZeroDivisionError when normalize and Σ_i w_i = 0."""
    if not xs:
        raise ValueError("linear_combination needs at least one tensor")
    total = sum(float(w) for w in weights)
    if normalize and total == 0.0:
        raise ZeroDivisionError("weights sum to 0")
    out = torch.mul(xs[0], float(weights[0]), out=out) if out is not None else xs[0] * float(weights[0])
    for x, w in zip(xs[1:], weights[1:]):
        term = torch.mul(x, float(w), out=tmp) if tmp is not None else x * float(w)
        out.add_(term)
    if normalize:
        out.div_(total)
    return out
