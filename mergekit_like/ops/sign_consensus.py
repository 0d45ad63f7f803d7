"""TIES sign election and disjoint merge (Yadav et al., NeurIPS 2023;
docs/methods/task_arithmetic.md §1).

With W_i = w_i·δ̂_i the weighted task vectors of the models that hold the tensor, in model order::

    S   = Σ_i W_i ;  s = +1 where S ≥ 0, else −1        the sign elected by the sum ("mass")
    m_i = [sign(W_i) = s]                               an entry W_i = 0 never agrees
    Δ   = Σ_i m_i·W_i                                   the disjoint sum
    D   = Σ_i m_i·w_i ;  D := 1 where D = 0             normalize: Δ ← Δ / D (disjoint mean)

m_i·W_i = s·relu(s·W_i): multiplying by s = ±1 is exact and rounding is symmetric, so
Δ = s ⊙ Σ_i relu(s ⊙ W_i) bit for bit, zeros' signs included; both functions compute that.
``sign_consensus`` is the equation on whole tensors; ``sign_consensus_`` the same bits in place on
flat pieces (the torch path of the task-vector methods). Sums run in model order.
"""

from __future__ import annotations

from functools import reduce
from typing import Any, Sequence

import torch


def sign_consensus(weighted: Sequence[torch.Tensor | None], weights: Sequence[float],
                   normalize: bool) -> torch.Tensor | None:
    """Δ (÷ D when ``normalize``) of same-shape float tensors W_i, as a new tensor; the inputs
    are not changed. None terms (δ̂_i = 0) never vote; None when every term is None."""
    terms = [(w_i, float(c)) for w_i, c in zip(weighted, weights) if w_i is not None]
    if not terms:
        return None
    W = torch.stack([w_i for w_i, _ in terms])                        # [n, *shape]
    s = torch.where(reduce(torch.add, W) >= 0, 1.0, -1.0).to(W.dtype)  # S = 0 elects +1
    agreeing = (W * s).relu_()                                        # |W_i| where m_i, else 0
    delta = reduce(torch.add, agreeing)
    if normalize:
        m = (agreeing > 0).to(W.dtype)
        D = reduce(torch.add, [m_i * c for m_i, (_, c) in zip(m, terms)])
        delta = delta / torch.where(D == 0, torch.ones_like(D), D)
    return delta * s


def sign_consensus_(weighted: Sequence[torch.Tensor | None], weights: Sequence[float],
                    normalize: bool, scratch: Any = None) -> torch.Tensor | None:
    """``sign_consensus`` in place on flat tensors: the W_i buffers are overwritten and Δ lives
    in one of them. Temporaries come from ``scratch.get(slot, n, dtype)`` when given
    (kernels.tiling.Scratch), else are allocated."""
    terms = [(w_i, float(c)) for w_i, c in zip(weighted, weights) if w_i is not None]
    if not terms:
        return None
    first = terms[0][0]

    def work(slot: str) -> torch.Tensor:
        return torch.empty_like(first) if scratch is None else \
            scratch.get(slot, first.numel(), first.dtype)

    if len(terms) == 1:
        total = first                                     # S = W_1 (read before W_1 changes)
    else:
        total = torch.add(first, terms[1][0], out=work("sc_sum"))
        for w_i, _ in terms[2:]:
            total.add_(w_i)                               # S = Σ_i W_i
    votes = torch.ge(total, 0, out=work("sc_votes"))      # s ∈ {1, 0} ...
    votes.mul_(2).sub_(1)                                 # ... → {+1, −1}; S = 0 elects +1
    agree = denom = acc = None
    if normalize:
        agree = total if total is not first else work("sc_agree")
        denom = work("sc_denom")
    for n, (w_i, c) in enumerate(terms):
        w_i.mul_(votes).relu_()                           # |W_i| where it agrees, else 0
        if normalize:
            torch.gt(w_i, 0, out=agree)                   # m_i as 0/1
            if n == 0:
                torch.mul(agree, c, out=denom)
            else:
                denom.add_(agree if c == 1.0 else agree.mul_(c))
        acc = w_i if acc is None else acc.add_(w_i)
    if normalize:
        torch.eq(denom, 0, out=agree)
        denom.add_(agree)                                 # D[D == 0] = 1
        acc.div_(denom)
    return acc.mul_(votes)
