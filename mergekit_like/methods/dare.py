"""DARE (Yu et al., "Language Models are Super Mario", ICML 2024): drop And REscale.

Each entry of δ is kept with probability d: δ̂ = keep ⊙ δ·r, with r = 1/d (``rescale: true``),
‖δ‖₁/‖keep⊙δ‖₁ (``"l1"``, mergekit) or 1 (``false``). ``dare_ties`` then applies the sum sign
consensus of TIES without a second trim; ``dare_linear`` adds the task vectors.

The mask is counter-based (operators.md §4, scheme ``splitmix64-v1``), so it depends only on
(seed, model index, tensor name, flat index j), never on order, blocking or device::

    key    = first 8 bytes, little-endian, of SHA-256("{seed}:{model_index}:{tensor_name}")
    z      = key + (j+1)·0x9E3779B97F4A7C15                     (mod 2^64)
    z      = (z ⊕ (z >> 30))·0xBF58476D1CE4E5B9
    z      = (z ⊕ (z >> 27))·0x94D049BB133111EB
    z      = z ⊕ (z >> 31)                                      (SplitMix64)
    u_j    = z >> 40  ;  keep_j = u_j < floor(d·2^24)

It runs on int64 tensors with in-place ops, ~1e6 elements at a time: multiplication wraps
modulo 2^64, a logical shift is an arithmetic shift masked to its low 64−s bits, and constants
≥ 2^63 are written as their two's-complement negatives.
"""

from __future__ import annotations

import hashlib
import math

import torch

from mergekit_like.kernels import fused_cpu
from mergekit_like.methods.base import MethodSpec, TensorTask
from mergekit_like.methods.task_arithmetic import TaskVectorMethod, task_vector_params
from mergekit_like.kernels.tiling import Scratch, buffer

SCHEME = "splitmix64-v1"
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
U_BITS = 24
MASK_CHUNK = 1 << 20
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
    """floor(d·2^24): keep_j ⇔ u_j < this (integer comparison)."""
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
    """Full SplitMix64 outputs z_j for j = start..start+n−1, as int64 (bits of the uint64)."""
    out = torch.empty(n, dtype=torch.int64, device=device)
    for s in range(0, n, MASK_CHUNK):
        z = out[s:s + MASK_CHUNK]
        tmp = torch.empty_like(z)
        _mix_(key, start + s, z, tmp)
        _xorshift_(z, 31, tmp)
    return out


def keep_mask(key: int, start: int, n: int, density: float, *, dtype: torch.dtype = torch.bool,
              device: torch.device | str = "cpu", out: torch.Tensor | None = None,
              work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """keep_j for j = start..start+n−1 as a flat ``dtype`` tensor (bool, or 0/1 floats).

    u_j = z_j >> 40 is read before the last xorshift, which only touches the low 33 bits; the
    unsigned test z < floor(d·2^24)·2^40 is done in signed int64 by flipping the sign bit.
    ``out``: the result buffer; ``work``: two int64 buffers of ≥ min(n, MASK_CHUNK) entries."""
    if out is None:
        out = torch.empty(n, dtype=dtype, device=device)
    threshold = keep_threshold(density)
    if threshold <= 0 or threshold >= (1 << U_BITS):          # d ≤ 0: none; d ≥ 1: all
        return out.fill_(threshold > 0)
    limit = _i64((threshold << (64 - U_BITS)) ^ (1 << 63))
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


def random_drop_(delta: torch.Tensor, offset: int, key: int, density: float,
                 scratch: Scratch | None = None) -> torch.Tensor:
    """keep ⊙ δ in place for a flat piece whose first entry has global flat index ``offset``.
    No rescaling here (the caller divides by d or applies the "l1" factor)."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    n = delta.numel()
    work = None
    if scratch is not None:
        c = min(n, MASK_CHUNK)
        work = (scratch.get("dare_z", c, torch.int64), scratch.get("dare_t", c, torch.int64))
    mask = keep_mask(key, offset, n, density, out=buffer(scratch, "dare_mask", delta), work=work)
    return delta.mul_(mask)


# --------------------------------------------------------------------------------------------
# engine adapter


class RandomDrop:
    """DARE's random drop of one model's δ for one tensor."""

    def __init__(self, task: TensorTask, pos: int, density: float):
        self.key = mask_key(task.seed, task.input_indices[pos], task.name)
        self.density = density

    def apply(self, delta: torch.Tensor, offset: int, scratch: Scratch | None = None) -> None:
        random_drop_(delta, offset, self.key, self.density, scratch)

    def fused_sparsifier(self) -> fused_cpu.Drop:
        return fused_cpu.Drop(self.key, keep_threshold(self.density))


class _Dare(TaskVectorMethod):
    def make_sparsifier(self, task: TensorTask, pos: int, density: float, scratch: Scratch):
        return RandomDrop(task, pos, density)


class DareTies(_Dare):
    """DARE, then the sum sign consensus; normalize defaults to false (a weighted sum)."""

    spec = MethodSpec(
        name="dare_ties",
        params=task_vector_params(normalize=False, rescale=True, density_effective=True,
                                  rescale_effective=True),
        needs_base=True,
    )
    consensus = True


class DareLinear(_Dare):
    """DARE, then task arithmetic."""

    spec = MethodSpec(
        name="dare_linear",
        params=task_vector_params(normalize=False, rescale=True, density_effective=True,
                                  rescale_effective=True),
        needs_base=True,
    )
    consensus = False

