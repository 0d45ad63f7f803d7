"""DARE's drop and rescale (Yu et al., ICML 2024; docs/methods/dare.md §2–§3).

Each entry j of δ is kept with probability d by a counter-based draw (scheme ``splitmix64-v1``),
so the mask depends only on (seed, model index, tensor name, j), never on order, blocking or
device::

    key    = first 8 bytes, little-endian, of SHA-256("{seed}:{model_index}:{tensor_name}")
    z      = key + (j+1)·GOLDEN                         (mod 2^64)
    z      = (z ⊕ (z >> 30))·MIX1
    z      = (z ⊕ (z >> 27))·MIX2
    z      = z ⊕ (z >> 31)                              (SplitMix64)
    u_j    = z >> 40  ;  keep_j = u_j < floor(d·2^24)
    δ̂      = keep ⊙ δ · r        r = 1/d (rescale: true), ‖δ‖₁/‖keep⊙δ‖₁ ("l1"), 1 (false)

This file is the one place the constants live (``kernels/fused_loops.py`` imports them).
``splitmix64`` / ``dare_keep`` / ``random_drop`` are the formula as written; ``keep_mask`` and
``random_drop_`` compute the same bits faster on int64 tensors with in-place ops, ~1e6 entries at
a time: multiplication wraps modulo 2^64, a logical shift is an arithmetic shift masked to its
low 64−s bits, and constants ≥ 2^63 are written as their two's-complement negatives.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

SCHEME = "splitmix64-v1"
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
U_BITS = 24
U_SHIFT = 64 - U_BITS
"""u_j = z >> U_SHIFT: the top 24 bits of the last SplitMix64 output."""
KEEP_ALL = 1 << U_BITS
"""keep_threshold(1): every u_j is below it."""
MASK_CHUNK = 1 << 20
L1_EPS = 1e-7
""""l1" rescale: r = 1 when ‖δ‖₁ or ‖keep⊙δ‖₁ is below this."""

SCALE_NONE, SCALE_BY, SCALE_DIVIDE = 0, 1, 2
"""How δ̂ is rescaled after the drop (or trim): not at all, × r ("l1"), ÷ d (rescale: true)."""

_M64 = (1 << 64) - 1
_SIGN = -(1 << 63)


def _i64(u: int) -> int:
    """An integer mod 2^64 as the signed int64 with the same bits."""
    u &= _M64
    return u - (1 << 64) if u >= (1 << 63) else u


def mask_key(seed: int, model_index: int, tensor_name: str) -> int:
    """key = first 8 bytes (little-endian) of SHA-256("{seed}:{model_index}:{tensor_name}")."""
    digest = hashlib.sha256(f"{seed}:{model_index}:{tensor_name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def keep_threshold(density: float) -> int:
    """floor(d·2^24): keep_j ⇔ u_j < this (integer comparison); 0 drops all, KEEP_ALL keeps all."""
    return int(math.floor(density * (1 << U_BITS)))


_STEPS: dict[torch.device, torch.Tensor] = {}


def _steps(device: torch.device) -> torch.Tensor:
    """(i+1)·GOLDEN mod 2^64 for i < MASK_CHUNK, as int64 (cached per device)."""
    t = _STEPS.get(device)
    if t is None:
        t = torch.arange(1, MASK_CHUNK + 1, dtype=torch.int64, device=device).mul_(_i64(GOLDEN))
        _STEPS[device] = t
    return t


def _xorshift_(z: torch.Tensor, s: int, tmp: torch.Tensor) -> None:
    """z ⊕= z >> s (logical), in place."""
    torch.bitwise_right_shift(z, s, out=tmp)
    tmp.bitwise_and_((1 << (64 - s)) - 1)
    z.bitwise_xor_(tmp)


def _mix_(key: int, start: int, z: torch.Tensor, tmp: torch.Tensor) -> None:
    """z_j (j = start..start+len−1) after the second multiply, written into z (≤ MASK_CHUNK)."""
    n = z.numel()
    torch.add(_steps(z.device)[:n], _i64(key + start * GOLDEN), out=z)   # key + (j+1)·GOLDEN
    _xorshift_(z, 30, tmp)
    z.mul_(_i64(MIX1))
    _xorshift_(z, 27, tmp)
    z.mul_(_i64(MIX2))


def splitmix64(key: int, start: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Full SplitMix64 outputs z_j for j = start..start+n−1, as int64 [n] (bits of the uint64)."""
    out = torch.empty(n, dtype=torch.int64, device=device)
    for s in range(0, n, MASK_CHUNK):
        z = out[s:s + MASK_CHUNK]
        tmp = torch.empty_like(z)
        _mix_(key, start + s, z, tmp)
        _xorshift_(z, 31, tmp)
    return out


def dare_keep(key: int, start: int, n: int, density: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """keep_j = (z_j >> 40) < floor(d·2^24) for j = start..start+n−1, bool [n], straight from
    the full outputs (the reference of ``keep_mask``)."""
    u = torch.bitwise_right_shift(splitmix64(key, start, n, device), U_SHIFT)
    return u.bitwise_and_(KEEP_ALL - 1) < keep_threshold(density)


def keep_mask(key: int, start: int, n: int, density: float, *, dtype: torch.dtype = torch.bool,
              device: torch.device | str = "cpu", out: torch.Tensor | None = None,
              work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``dare_keep`` as a flat ``dtype`` tensor (bool, or 0/1 floats), computed faster.

    u_j = z_j >> 40 is read before the last xorshift, which only touches the low 33 bits; the
    unsigned test z < floor(d·2^24)·2^40 is done in signed int64 by flipping the sign bit.
    ``out``: the result buffer; ``work``: two int64 buffers of ≥ min(n, MASK_CHUNK) entries."""
    if out is None:
        out = torch.empty(n, dtype=dtype, device=device)
    threshold = keep_threshold(density)
    if threshold <= 0 or threshold >= KEEP_ALL:               # d ≤ 0: none; d ≥ 1: all
        return out.fill_(threshold > 0)
    limit = _i64((threshold << U_SHIFT) ^ (1 << 63))
    if work is None:
        z = torch.empty(min(n, MASK_CHUNK), dtype=torch.int64, device=out.device)
        work = (z, torch.empty_like(z))
    z, tmp = work
    for s in range(0, n, MASK_CHUNK):
        c = min(MASK_CHUNK, n - s)
        zc, tc = z[:c], tmp[:c]
        _mix_(key, start + s, zc, tc)
        zc.bitwise_xor_(_SIGN)
        torch.lt(zc, limit, out=out[s:s + c])
    return out


def random_drop(delta: torch.Tensor, key: int, density: float) -> torch.Tensor:
    """keep ⊙ δ for a whole tensor (flat index j row-major), as a new tensor: δ for d ≥ 1, +0
    for d ≤ 0. A dropped entry is δ_j·0 (so keeps δ_j's sign). No rescaling."""
    if density >= 1.0:
        return delta.clone()
    if density <= 0.0:
        return torch.zeros_like(delta)
    keep = dare_keep(key, 0, delta.numel(), density, delta.device)
    return delta * keep.view(delta.shape).to(delta.dtype)


def random_drop_(delta: torch.Tensor, offset: int, key: int, density: float,
                 scratch: Any = None) -> torch.Tensor:
    """``random_drop`` in place on a flat piece whose first entry has flat index ``offset``.
    Work buffers come from ``scratch.get(slot, n, dtype)`` when given (kernels.tiling.Scratch)."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    n = delta.numel()
    if scratch is None:
        return delta.mul_(keep_mask(key, offset, n, density, dtype=delta.dtype,
                                    device=delta.device))
    c = min(n, MASK_CHUNK)
    work = (scratch.get("dare_z", c, torch.int64), scratch.get("dare_t", c, torch.int64))
    mask = keep_mask(key, offset, n, density, out=scratch.get("dare_mask", n, delta.dtype),
                     work=work)
    return delta.mul_(mask)


def l1_norm(delta: torch.Tensor) -> float:
    """‖δ‖₁ as the "l1" rescale sums it: |δ| in float64 summed per row (a dim-0 slice; each
    entry of a 0-d/1-d tensor is a row), then exactly over the rows (math.fsum), so any cut of
    the tensor into whole rows gives the same number."""
    row = max(1, math.prod(delta.shape[1:])) if delta.dim() >= 2 else 1
    mag = delta.abs().reshape(-1).to(torch.float64)
    return math.fsum((mag if row == 1 else mag.view(-1, row).sum(dim=1)).tolist())


def l1_factor(full_l1: float, kept_l1: float) -> float:
    """r = ‖δ‖₁ / ‖δ̂‖₁ of the "l1" rescale; 1 when either norm is below L1_EPS."""
    return 1.0 if full_l1 < L1_EPS or kept_l1 < L1_EPS else full_l1 / kept_l1


def rescale_(delta: torch.Tensor, mode: int, value: float) -> torch.Tensor:
    """δ̂ ← δ̂·r (SCALE_BY, value = r) or δ̂ / d exactly (SCALE_DIVIDE, value = d), in place;
    SCALE_NONE leaves it."""
    if mode == SCALE_BY:
        return delta.mul_(value)
    if mode == SCALE_DIVIDE:
        return delta.div_(value)
    return delta


def rescale_step(rescale: bool | str, density: float, l1: float | None = None) -> tuple[int, float]:
    """The rescale of one sparsified δ̂ as (mode, value) for ``rescale_``: ``"l1"`` → × r
    (``l1`` = r; none when r = 1), ``true`` → ÷ d, ``false`` → none."""
    if rescale == "l1":
        return (SCALE_BY, l1) if l1 != 1.0 else (SCALE_NONE, 1.0)
    if rescale is True:
        return SCALE_DIVIDE, density
    return SCALE_NONE, 1.0
