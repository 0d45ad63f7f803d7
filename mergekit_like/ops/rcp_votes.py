"""RCP-Merging's importance equations (docs/methods/rcp.md §1), as pure functions on tensors.

j indexes the scalar weights of one parameter tensor, k the calibration texts. With g^r the
gradient of the mean token loss of a reasoning text on the reasoning model θ_r and g^t that of
a domain text on the domain model θ_t (all tensors of one parameter's shape)::

    F_j     = (1/K_r)·Σ_k (g^r_{j,k}·θ_r,j)²          fisher_kind grad_x_weight_sq (default)
            = (1/K_r)·Σ_k (g^r_{j,k})²                 fisher_kind grad_sq
    p_j     = F_j·(θ_r,j − θ_t,j)²                     EWC-style penalty
    S_{j,k} = g^t_{j,k}·θ_t,j                          signed domain sensitivity of text k
    C_{j,k} = S_{j,k} + λ·p_j                          λ·p_j := 0 where p_j = 0 (also for λ = ∞)
    v_j     = Σ_k [+1 if C_{j,k} ≤ 0 else −1]          zero_grad "keep": C_{j,k} = 0 counts 0
    m_j     = [v_j > vote_threshold]                   a tie v = 0 is not merged

Accumulators are float32 (F) and int8/int16 (v) on the host; every function returns a new
tensor or updates its accumulator argument in place, and does no I/O.
"""

from __future__ import annotations

import math

import torch

FISHER_KINDS = ("grad_x_weight_sq", "grad_sq")
ZERO_GRAD = ("merge", "keep")


def fisher_term(grad: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """One text's contribution to K_r·F: (g·θ)² or g², float32, same shape as ``grad``."""
    g = grad.float()
    if kind == "grad_x_weight_sq":
        g = g * weight.float()
    elif kind != "grad_sq":
        raise ValueError(f"fisher kind {kind!r}: use one of {', '.join(FISHER_KINDS)}")
    return g.square_()


def penalty(fisher: torch.Tensor, theta_r: torch.Tensor, theta_t: torch.Tensor) -> torch.Tensor:
    """p = F·(θ_r − θ_t)², float32."""
    return (theta_r.float() - theta_t.float()).square_().mul_(fisher.float())


def scaled_penalty(p: torch.Tensor, lam: float) -> torch.Tensor:
    """λ·p with λ·0 = 0, so λ = ∞ penalises exactly the weights with p > 0 (float32)."""
    if math.isinf(lam):
        return torch.where(p > 0, torch.full_like(p, math.inf), torch.zeros_like(p))
    return p * lam


def sensitivity(grad: torch.Tensor, theta_t: torch.Tensor) -> torch.Tensor:
    """S = g^t·θ_t of one domain text (float32)."""
    return grad.float() * theta_t.float()


def text_votes(s: torch.Tensor, lam_p: torch.Tensor, zero_grad: str = "merge") -> torch.Tensor:
    """One text's vote per weight (int8): +1 where C = S + λ·p ≤ 0, else −1; under
    ``zero_grad: keep`` a text with C exactly 0 abstains (0)."""
    c = s + lam_p
    vote = torch.where(c <= 0, 1, -1).to(torch.int8)
    if zero_grad == "keep":
        vote[c == 0] = 0
    elif zero_grad != "merge":
        raise ValueError(f"zero_grad {zero_grad!r}: use merge or keep")
    return vote


def add_votes(counter: torch.Tensor, s: torch.Tensor, lam_p: torch.Tensor,
              zero_grad: str = "merge") -> torch.Tensor:
    """counter += text_votes(S, λ·p) in place (the counter's integer dtype); returns it."""
    return counter.add_(text_votes(s, lam_p, zero_grad).to(counter.dtype))


def votes_dtype(n_texts: int) -> torch.dtype:
    """int8 when |v| ≤ K_t ≤ 127, else int16 (docs/methods/rcp.md §3)."""
    return torch.int8 if n_texts <= 127 else torch.int16


def selection(votes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """m = [v > threshold] (bool)."""
    return votes > threshold


def critical_lambda(s: torch.Tensor, p: torch.Tensor, threshold: float = 0.0,
                    zero_grad: str = "merge") -> torch.Tensor:
    """λ*_j such that m_j(λ) = [λ ≤ λ*_j] (docs/methods/rcp.md §3 sweep mode), from the sensitivities
    ``s`` [K, *shape] of every text and the penalty ``p`` [*shape]; float32.

    λ_{j,k} = −S_{j,k}/p_j where p_j > 0, else +∞ if S ≤ 0, else −∞. Under ``keep``, texts with
    S = 0 and p = 0 abstain. λ* is the q-th largest remaining λ_{j,k}, q = ⌊(K_j + thr)/2⌋ + 1,
    or −∞ when fewer than q texts remain (+∞ when q ≤ 0). (Under ``keep`` the votes also drop a text whose
    C is exactly 0 with p > 0, i.e. at λ = λ_{j,k} itself; λ* counts it, as §3 defines.)
    """
    s = s.float()
    p = p.float().expand_as(s)
    lam = torch.where(p > 0, -s / torch.where(p > 0, p, torch.ones_like(p)),
                      torch.where(s <= 0, math.inf, -math.inf))
    abstain = (s == 0) & (p == 0) if zero_grad == "keep" else torch.zeros_like(s, dtype=torch.bool)
    lam = torch.where(abstain, -math.inf, lam)            # abstainers sort last
    k_j = (~abstain).sum(0)
    q = torch.floor((k_j.float() + threshold) / 2).long() + 1
    ordered = lam.sort(dim=0, descending=True).values
    pick = ordered.gather(0, q.clamp(1, s.shape[0]).sub(1).unsqueeze(0)).squeeze(0)
    pick = torch.where(q <= k_j, pick, torch.full_like(pick, -math.inf))
    return torch.where(q <= 0, torch.full_like(pick, math.inf), pick)  # q ≤ 0: any λ passes
