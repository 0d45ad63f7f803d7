"""Reinforced Agent Merging (RAM and RAM+ tensor-local; docs/methods/ram.md §1), mergekit
semantics.

With b the base and x_1 … x_N the models, on flat task vectors T [N, M] (T_i = x_i − b)::

    a_i  = |T_i| > ε                 model i changed the entry ("active")
    c    = Σ_i a_i                   how many models changed it
    Z_i  = T_i ⊙ a_i
    ram:         Δ = Σ_i (Z_i ⊙ [c = 1] + Z_i ⊙ [c > 1] / max(c, 1))
    ramplus_tl:  s_i = Σ a_i ⊙ [c > 1] ;  u_i = Σ a_i ⊙ [c = 1]       counts over the tensor
                 ρ_i = s_i / max(u_i, ε) ;  λ_i = 1 + r·clamp(ρ_i, 0, α)
                 Δ = Σ_i (λ_i·Z_i ⊙ [c = 1] + Z_i ⊙ [c > 1] / max(c, 1))
    out = b + Δ

An entry changed by one model takes that model's change, by several the mean of their changes,
by none the base. Everything is elementwise except the counts s_i, u_i, which are integers
summed over the whole tensor, so any cut into pieces gives the same bits.
"""

from __future__ import annotations

import torch


def active(tvs: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [N, M] bool, c [1, M] int64) of task vectors ``tvs`` [N, M]: |T| > ε, and its sum
    over the models."""
    changed = tvs.abs() > epsilon
    return changed, changed.sum(dim=0, keepdim=True)


def model_counts(changed: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s [N], u [N] int64): per model, the entries it changed that others changed too, and
    the entries only it changed."""
    return (changed & (counts > 1)).sum(dim=1), (changed & (counts == 1)).sum(dim=1)


def unique_scales(shared: torch.Tensor, unique: torch.Tensor, r: float, alpha: float,
                  epsilon: float) -> torch.Tensor:
    """λ [N] float32 from the int64 counts s, u [N]: 1 + r·clamp(s / max(u, ε), 0, α), with
    torch's promotion (the clamp of an int64 tensor by a float gives float32). A model with no
    unique entry gets λ = 1: its λ multiplies nothing (mergekit's 0/0 there, for ε ≤ 0,
    would make every entry NaN)."""
    rho = shared / unique.clamp(min=epsilon)
    scales = 1 + r * rho.clamp(min=0, max=alpha)
    return torch.where(unique > 0, scales, torch.ones_like(scales))


def ram_delta(tvs: torch.Tensor, epsilon: float, scales: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Δ [M] (tvs' dtype, or float32 promotion with ``scales``) of flat task vectors [N, M]:
    RAM, or RAM+ when ``scales`` (λ [N] of ``unique_scales``) is given."""
    changed, counts = active(tvs, epsilon)
    unique, overlap = counts == 1, counts > 1
    z = tvs * changed
    solo = z * unique if scales is None else z * unique * scales.unsqueeze(-1)
    return (solo + z * overlap / counts.clamp(min=1)).sum(dim=0)
