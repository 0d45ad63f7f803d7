"""Truncated SVD of a task vector (Twin-Merging's exclusive parts, docs/methods/twin.md §1; WEMoE's
low-rank experts, docs/methods/wemoe.md §1).

For v [m, n] (float32/float64) and a rank r::

    r        = max(1, ⌊rank·min(m, n)⌋)       a fraction rank in (0, 1]
             = min(rank, min(m, n))           an int rank ≥ 1
    U, σ, Vᵀ = svd_r(v)                       the top-r singular triplets
    A = U diag(σ) [m, r],  B = Vᵀ [r, n]      v ≈ A @ B
    energy   = Σ_{i≤r} σ_i² / ‖v‖_F²          1 when v = 0

``svd_r`` is the exact thin SVD, or ``torch.svd_lowrank`` (randomized, q = r + 16, 4 power
iterations) under a forked RNG seeded per (tensor, task), so results do not depend on what ran
before; a failed or non-finite attempt falls back to float64 on CPU.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch

from mergekit_like.errors import MergeError

EXACT_MAX_DIM = 1024
LOWRANK_OVERSAMPLE, LOWRANK_ITERS = 16, 4


def rank_for(rank: float | int, m: int, n: int) -> int:
    """A fraction in (0, 1] → max(1, ⌊rank·min(m, n)⌋); an int ≥ 1 → itself, capped at min(m, n)."""
    full = min(m, n)
    if isinstance(rank, int):
        return min(rank, full)
    return max(1, math.floor(rank * full))


def exact_svd(v: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r triplets of v [m, n] by thin SVD: U [m, r], σ [r], Vᵀ [r, n]."""
    u, sig, vh = torch.linalg.svd(v, full_matrices=False)
    return u[:, :r], sig[:r], vh[:r]


def randomized_svd(v: torch.Tensor, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """Top-r triplets by ``torch.svd_lowrank`` (q = r + 16, 4 power iterations) under a forked
    RNG seeded with ``seed``: reproducible whatever ran before."""
    q = min(r + LOWRANK_OVERSAMPLE, *v.shape)
    devices = [v.device] if v.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, sig, vv = torch.svd_lowrank(v, q=q, niter=LOWRANK_ITERS)
    return u[:, :r], sig[:r], vv[:, :r].T


def truncated_svd(v: torch.Tensor, r: int, mode: str, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(U, σ, Vᵀ, how) for v [m, n] float32/64. ``mode`` auto | exact | lowrank (auto: exact when
    min(m, n) ≤ 1024 or r > min(m, n)/4). On a convergence error or non-finite output: exact
    SVD on CPU in float64, then randomized in float64, else a MergeError (caller names it)."""
    small = min(v.shape)
    first = mode if mode != "auto" else \
        ("exact" if small <= EXACT_MAX_DIM or r > small / 4 else "lowrank")
    attempts: list[tuple[str, Callable]] = [
        (first, lambda: exact_svd(v, r) if first == "exact" else randomized_svd(v, r, seed)),
        ("exact-float64-cpu", lambda: exact_svd(v.double().cpu(), r)),
        ("lowrank-float64", lambda: randomized_svd(v.double().cpu(), r, seed)),
    ]
    for how, attempt in attempts:
        try:
            u, sig, vh = attempt()
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            continue
        if all(bool(torch.isfinite(t).all()) for t in (u, sig, vh)):
            return u.to(v.dtype).to(v.device), sig.to(v.dtype).to(v.device), \
                vh.to(v.dtype).to(v.device), how
    raise MergeError("SVD failed (exact, float64 and randomized)")


def factorize(v: torch.Tensor, r: int, mode: str, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor, float, str]:
    """v [m, n] ≈ A @ B with A = U diag(σ) [m, r], B = Vᵀ [r, n]; returns (A, B, energy, how)."""
    u, sig, vh, how = truncated_svd(v, r, mode, seed)
    total = float(torch.linalg.vector_norm(v.double()) ** 2)
    kept = float((sig.double() ** 2).sum())
    energy = 1.0 if total == 0.0 else min(1.0, kept / total)
    return u * sig, vh, energy, how


def svd_seed(seed: int, tensor: str, task: str) -> int:
    """The forked RNG seed of one (tensor, task): independent of processing order."""
    digest = hashlib.sha256(f"{seed}\0{tensor}\0{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
