"""Arcee Fusion (mergekit v0.1; docs/methods/arcee_fusion.md §1): keep the other model's change
only where it is an outlier of importance.

a = the base, b = the other model, tensors of one shape, rows along the last dim::

    Δ   = b − a
    p   = softmax(b, dim=−1) + 1e-8          q = softmax(a, dim=−1) + 1e-8
    KL  = Σ_last p·log(p / q)                one value per row (per last-dim vector)
    imp = |Δ| · KL                           KL broadcast back over its row
    τ   = Q(0.5) + 1.5·(Q(0.75) − Q(0.25))   Q: the quantile of imp over the whole tensor
    out = a + Δ·[imp ≥ τ]

Q(q) is the sorted importance at index ⌊q·(n − 1)⌋ (the "lower" quantile, no interpolation),
over every element; a 0-d tensor is handled as a 1-element vector.
"""

from __future__ import annotations

import torch

KL_EPS = 1e-8
"""Added to each softmax before the KL divergence (mergekit's eps)."""
IQR_FACTOR = 1.5


def fusion_importance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """imp = |b − a| · KL(softmax(b) + eps ‖ softmax(a) + eps), the KL summed over the last dim
    and broadcast over it: a new tensor of a's shape and float dtype (0-d: KL of one element,
    which is 0)."""
    if a.dim() == 0:
        return fusion_importance(a.reshape(1), b.reshape(1)).reshape(())
    p = torch.softmax(b, dim=-1).add_(KL_EPS)
    q = torch.softmax(a, dim=-1).add_(KL_EPS)
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return torch.sub(b, a).abs_().mul_(kl)


def quantile_indices(n: int) -> tuple[int, int, int]:
    """0-based sorted positions ⌊q·(n − 1)⌋ of q = 0.25, 0.5, 0.75 among n ≥ 1 values (exact
    integer arithmetic)."""
    m = n - 1
    return m // 4, m // 2, (3 * m) // 4


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """τ = Q(0.5) + 1.5·(Q(0.75) − Q(0.25)) over every element of ``importance`` (n ≥ 1), a 0-d
    tensor of its dtype, the quantiles exact order statistics (``quantile_indices``)."""
    flat = importance.reshape(-1)
    i1, i2, i3 = quantile_indices(flat.numel())
    q1, med, q3 = (torch.kthvalue(flat, i + 1).values for i in (i1, i2, i3))
    return med + IQR_FACTOR * (q3 - q1)


def fuse(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """out = a + (b − a)·keep, ``keep`` a bool tensor of a's shape: a new tensor of a's dtype."""
    return torch.sub(b, a).mul_(keep.to(a.dtype)).add_(a)


def arcee_fusion(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The whole operator on two tensors of one shape and float dtype (n ≥ 1 elements)."""
    imp = fusion_importance(a, b)
    return fuse(a, b, imp >= fusion_threshold(imp))
