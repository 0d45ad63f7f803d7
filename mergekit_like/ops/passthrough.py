"""Passthrough (docs/methods/passthrough.md §1): the single input's tensor, optionally scaled::

    out = x            (scale unset)
    out = scale·x      (scale set)

mergekit's per-model ``scale`` multiplies the one input's tensor; without it the tensor is passed
through untouched.
"""

from __future__ import annotations

import torch


def passthrough(x: torch.Tensor, scale: float | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (any shape, a float dtype) times ``scale`` when given, else ``x`` itself copied;
    a new tensor of ``x``'s shape and dtype (or ``out``, a buffer of that shape and dtype)."""
    if scale is None:
        return x.clone() if out is None else out.copy_(x)
    return torch.mul(x, float(scale), out=out) if out is not None else x * float(scale)
