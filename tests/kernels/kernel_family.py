"""Inputs and helpers the kernel tests share (imported by name: pytest puts this folder on
``sys.path``): float bits, and a base + fine-tunes family that hits the fast paths' edge cases."""

from __future__ import annotations

from typing import Sequence

import torch

BF16, F32 = torch.bfloat16, torch.float32


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float bits of ``t`` (so −0.0 ≠ +0.0 and every NaN payload counts)."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def family(shape, n_models, seed, dtype=BF16, base_dtype=None,
           zeros: float | Sequence[float] = 0.3, scale=0.01):
    """A base (with some ±0.0 entries) and fine-tunes whose deltas sit on bf16's coarse grid
    (many exact ties); a share ``zeros`` (one value, or one per model) of each model's entries
    equals the base exactly."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.05).to(base_dtype or dtype)
    flat = base.view(-1)
    flat[::97] = 0.0                    # signed zeros in the base make a zero's sign visible
    flat[1::97] = -0.0
    shares = [zeros] * n_models if isinstance(zeros, (int, float)) else list(zeros)
    xs = []
    for share in shares:
        x = (base.float() + torch.randn(shape, generator=g) * scale).to(dtype)
        same = torch.rand(shape, generator=g) < share
        x[same] = base[same].to(dtype)
        xs.append(x)
    return base, xs
