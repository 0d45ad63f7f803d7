"""DELLA's MAGPRUNE (Deep, Bhardwaj et al., 2024; docs/methods/della.md §1–§3): drop each entry
of a task vector at random with a keep probability that grows with its magnitude rank, then
rescale the survivors by 1/p.

For a density 0 < d < 1 and a spread ε with 0 < d − ε and d + ε < 1, ranks are taken along a
row: dim 1 of a tensor of two or more dims (as mergekit ranks), the whole tensor for 0-d/1-d::

    r_j    = ascending rank of |δ_j| in its row of m entries, 0 … m−1 (among equal magnitudes
             the lowest flat index ranks highest, as ``ops/trim.py`` breaks ties)
    p_j    = (d − ε) + (r_j / (m − 1))·2·ε          float64; p_j = d when m = 1
    keep_j = u_j < floor(p_j·2²⁴)                  u_j: ops/drop.py's SplitMix64 draw (same key)
    δ̂_j    = keep_j·δ_j / p_j  (rescale: true)     keep_j·δ_j otherwise

With ε = 0 every p_j = d and keep is DARE's mask bit for bit. ``magprune_ranks`` gives r (and m);
``magprune_probs`` p from them; ``magprune_piece_`` applies keep (and 1/p) to any flat piece given
the ranks of its entries, so blocking never changes a bit; ``magprune`` is the whole-tensor form.
"""

from __future__ import annotations

import torch

from mergekit_like.ops.drop import KEEP_ALL, U_BITS, U_SHIFT, splitmix64


def rank_rows(shape: tuple[int, ...]) -> int:
    """m: the length of the rows ranks are taken over (dim 1 for ≥ 2 dims, else every entry)."""
    if len(shape) >= 2:
        return int(shape[1])
    return int(shape[0]) if len(shape) == 1 else 1


def magprune_ranks(delta: torch.Tensor) -> torch.Tensor:
    """r [δ's shape, int64]: the ascending magnitude rank of each entry along its row (dim 1
    for ≥ 2 dims, the whole tensor for 0-d/1-d), 0 … m−1, ties: lowest index ranks highest.

    A stable descending sort puts equal magnitudes in index order, so r = m − 1 − position."""
    shape = delta.shape
    work = delta.reshape(1, -1) if delta.dim() < 2 else delta
    m = work.shape[1]
    order = torch.sort(work.abs(), dim=1, descending=True, stable=True).indices
    view = [1, m] + [1] * (work.dim() - 2)
    positions = torch.arange(m, device=delta.device).view(view).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    return ranks.neg_().add_(m - 1).reshape(shape)


def magprune_probs(ranks: torch.Tensor, m: int, density: float, epsilon: float) -> torch.Tensor:
    """p [ranks' shape, float64] = (d − ε) + (r/(m − 1))·2·ε; d everywhere when m = 1."""
    if m <= 1:
        return torch.full(ranks.shape, density, dtype=torch.float64, device=ranks.device)
    norm = ranks.to(torch.float64).div_(m - 1)
    return norm.mul_(2).mul_(epsilon).add_(density - epsilon)


def keep_thresholds(probs: torch.Tensor) -> torch.Tensor:
    """floor(p·2²⁴) [int64], clamped to [0, 2²⁴]: keep_j ⇔ u_j < threshold_j."""
    return torch.floor(probs * float(KEEP_ALL)).clamp_(0, KEEP_ALL).to(torch.int64)


def draws(key: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """u_j = top 24 bits of SplitMix64 output j (j = start … start+n−1) [int64], the draw DARE
    compares with its single threshold (ops/drop.py)."""
    z = splitmix64(key, start, n, device)
    return torch.bitwise_right_shift(z, U_SHIFT).bitwise_and_((1 << U_BITS) - 1)


def magprune_piece_(delta: torch.Tensor, offset: int, key: int, ranks: torch.Tensor, m: int,
                    density: float, epsilon: float, divide: bool) -> torch.Tensor:
    """MAGPRUNE in place on a flat piece of δ (compute dtype) whose first entry has flat index
    ``offset``; ``ranks`` are its entries' r_j (same length). ``divide``: δ̂ = keep·δ/p."""
    probs = magprune_probs(ranks, m, density, epsilon)
    keep = draws(key, offset, delta.numel(), delta.device) < keep_thresholds(probs)
    delta.mul_(keep)
    if divide:
        delta.div_(probs.to(delta.dtype))
    return delta


def magprune(delta: torch.Tensor, key: int, density: float, epsilon: float,
             divide: bool = True) -> torch.Tensor:
    """δ̂ of a whole tensor as a new tensor (flat index row-major); δ copied for d ≥ 1, +0 for
    d ≤ 0. Needs 0 < d − ε and d + ε < 1 for 0 < d < 1 (the caller checks)."""
    if density >= 1.0:
        return delta.clone()
    if density <= 0.0:
        return torch.zeros_like(delta)
    ranks = magprune_ranks(delta).reshape(-1)
    out = delta.reshape(-1).clone()
    magprune_piece_(out, 0, key, ranks, rank_rows(tuple(delta.shape)), density, epsilon, divide)
    return out.view(delta.shape)


def epsilon_problem(density: float, epsilon: float) -> str | None:
    """mergekit's rule: for 0 < d < 1, d − ε and d + ε must lie strictly inside (0, 1)."""
    if 0.0 < density < 1.0 and (density + epsilon >= 1.0 or density - epsilon <= 0.0):
        return (f"epsilon {epsilon:g} with density {density:g}: density ± epsilon must lie "
                f"strictly between 0 and 1")
    return None
