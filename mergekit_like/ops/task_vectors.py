"""Task vectors (Ilharco et al., ICLR 2023) and the form every task-vector method shares
(docs/methods/task_arithmetic.md §1). With b the base, x_i the models, w_i their weights::

    δ_i = x_i − b                                       the task vector
    δ̂_i = keep_i ⊙ sparsify(δ_i; d_i)                  identity | ops/trim.py | ops/drop.py
    W_i = w_i·δ̂_i
    consensus:  Δ, D of ops/sign_consensus.py
    otherwise:  Δ = Σ_i W_i ;  D = Σ_i w_i ;  D := 1 when |D| < 1e-8
    normalize:  Δ ← Δ / D
    out = b + λ·Δ

``combine_task_vectors`` is that form on whole tensors (new tensors, inputs untouched);
``merged_delta_`` and ``apply_delta_`` compute the same bits in place on flat pieces (the torch
path of the task-vector methods). Tensors are float32/float64 of equal shape; sums run in model
order.
"""

from __future__ import annotations

from functools import reduce
from typing import Any, Sequence

import torch

from mergekit_like.ops.sign_consensus import sign_consensus, sign_consensus_

PLAIN_D_EPS = 1e-8
"""Without consensus, D = Σ_i w_i is replaced by 1 when |D| is below this."""


def task_vector(x: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """δ = x − b, elementwise, same shape and dtype (written into ``out`` when given)."""
    return torch.sub(x, b, out=out) if out is not None else x - b


def plain_denominator(weights: Sequence[float]) -> float:
    """D = Σ_i w_i of the weighted sum (a Python float), 1 when |D| < 1e-8."""
    total = sum(float(c) for c in weights)
    return 1.0 if abs(total) < PLAIN_D_EPS else total


def combine_task_vectors(base: torch.Tensor, weighted: Sequence[torch.Tensor | None],
                         weights: Sequence[float], *, consensus: bool, normalize: bool,
                         lam: float) -> torch.Tensor:
    """out = b + λ·Δ (Δ/D when normalize), a new tensor of b's shape and dtype.

    ``weighted`` are the W_i = w_i·δ̂_i (None where δ̂_i = 0: no vote, but w_i still counts in
    the plain denominator), ``weights`` the w_i of the models that have this tensor."""
    if consensus:
        delta = sign_consensus(weighted, weights, normalize)
    else:
        terms = [w_i for w_i in weighted if w_i is not None]
        delta = reduce(torch.add, terms) if terms else None
        if delta is not None and normalize:
            delta = delta / plain_denominator(weights)
    return base.clone() if delta is None else base + lam * delta


def weighted_sum_(weighted: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Δ = Σ_i W_i in order, accumulated in place into the first term (None terms are 0).
    Returns None when every term is None."""
    acc = None
    for w_i in weighted:
        if w_i is None:
            continue
        if acc is None:
            acc = w_i
        else:
            acc.add_(w_i)
    return acc


def merged_delta_(weighted: Sequence[torch.Tensor | None], weights: Sequence[float], *,
                  consensus: bool, normalize: bool, scratch: Any = None) -> torch.Tensor | None:
    """Δ (÷ D when normalize) from flat W_i, before λ; None when every term is None. The W_i
    buffers are consumed; Δ may live in one of them. ``scratch``: see ``sign_consensus_``."""
    if consensus:
        return sign_consensus_(weighted, weights, normalize, scratch)
    delta = weighted_sum_(weighted)
    if delta is not None and normalize:
        delta.div_(plain_denominator(weights))
    return delta


def apply_delta_(base: torch.Tensor, delta: torch.Tensor | None, lam: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """out = b + λ·Δ (b itself when Δ is None); Δ is scaled in place. ``out`` may be of another
    dtype (one cast); without it the result may live in Δ's buffer."""
    if delta is None:
        return base.clone() if out is None else out.copy_(base)
    if lam != 1.0:
        delta.mul_(lam)
    if out is None:
        return delta.add_(base)
    return torch.add(delta, base, out=out)
