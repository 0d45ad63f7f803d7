"""NuSLERP: spherical interpolation of two tensors, per vector or whole, with mergekit's
conventions (docs/methods/nuslerp.md §1).

A tensor is cut into *vectors* by ``vector_layout``: ``"whole"`` (flattened to one vector),
``"last"`` (each slice along the last dimension: the rows of a 2-d weight) or ``"first"`` (each
slice along dimension 0: the columns of a 2-d weight). For each pair of vectors v0, v1::

    n_k = max(‖v_k‖, 1e-7) ;  c = ⟨v0, v1⟩ / (n0·n1) ;  θ = arccos(clamp(c, −1, 1))
    |sin θ| < 1e-8:  out = (1 − t)·v0 + t·v1                       (colinear: lerp)
    otherwise:       out = sin((1 − t)·θ)/sin θ · v0 + sin(t·θ)/sin θ · v1

with t = w2 / (w1 + w2) (``nuslerp_t``). The unnormalised vectors are interpolated.

The sums ⟨v0, v0⟩, ⟨v1, v1⟩, ⟨v0, v1⟩ are taken in float64 (``VectorSums``, fed pieces of whole
rows in order: the result does not depend on the cut), the coefficients in float64
(``nuslerp_coefficients``), the blend in the tensors' dtype (``blend_pieces``).
"""

from __future__ import annotations

import math

import torch

from mergekit_like.ops.gram import weighted_sum

NORM_EPS = 1e-7
"""mergekit's clamp of each vector's norm before normalising."""
COLINEAR_EPS = 1e-8
"""|sin θ| below this takes the lerp branch."""
ZERO_WEIGHTS = 1e-6
"""|w1 + w2| below this: mergekit uses t = 0.5."""


def nuslerp_t(w1: float, w2: float) -> float:
    """t = w2 / (w1 + w2); 0.5 when |w1 + w2| < 1e-6 (mergekit's fallback, not an error)."""
    total = w1 + w2
    if abs(total) < ZERO_WEIGHTS:
        return 0.5
    return w2 / total


def vector_layout(shape: tuple[int, ...], row_wise: bool, flatten: bool) -> str:
    """"whole", "last" or "first" (see module doc). A 0-d or 1-d tensor is one vector either
    way; ``flatten`` wins over ``row_wise``; ``row_wise`` selects the dim-0 slices."""
    if flatten or len(shape) <= 1:
        return "whole"
    return "first" if row_wise else "last"


class VectorSums:
    """⟨a, a⟩, ⟨b, b⟩, ⟨a, b⟩ per vector in float64, fed flat pieces of whole rows in row order.

    ``"whole"``: per-row sums kept and summed exactly (math.fsum) at the end, one value each;
    ``"last"``: each vector lies inside one row, its sum is taken whole, in vector order;
    ``"first"``: one running float64 accumulator per dim-0 slice, rows added one at a time
    in row order. ``finish()`` gives three float64 tensors of shape (vectors,).

    The per-row (or per-vector) sums go into one preallocated float64 [3, groups] tensor and
    the float64 copies and products into buffers reused across pieces: fresh temporaries per
    piece, interleaved with the small kept sums, fragmented the heap and held about one float64
    copy of the whole tensor per sum (1.2 GB for a 32000 × 1536 embedding)."""

    def __init__(self, layout: str, shape: tuple[int, ...]):
        self.layout, self.shape = layout, shape
        self.row = max(1, math.prod(shape[1:])) if len(shape) >= 2 else 1
        self.width = shape[-1] if layout == "last" else self.row
        self.groups = math.prod(shape) // max(1, self.width) if layout != "first" else 0
        self.sums: torch.Tensor | None = None
        self.done = 0
        self.acc: torch.Tensor | None = None
        self.work: torch.Tensor | None = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """One piece of each tensor (flat, whole rows, any float dtype)."""
        n = a.numel()
        if self.work is None or self.work.shape[1] < n:
            self.work = torch.empty((3, n), dtype=torch.float64, device=a.device)
        a64, b64, prod = self.work[0, :n].copy_(a), self.work[1, :n].copy_(b), self.work[2, :n]
        if self.layout == "first":
            if self.acc is None:
                self.acc = torch.zeros((3, self.row), dtype=torch.float64, device=a.device)
            for k, (x, y) in enumerate(((a64, a64), (b64, b64), (a64, b64))):
                for r in torch.mul(x, y, out=prod).view(-1, self.row):
                    self.acc[k].add_(r)
            return
        if self.sums is None:
            self.sums = torch.zeros((3, self.groups), dtype=torch.float64, device=a.device)
        g = n // self.width
        for k, (x, y) in enumerate(((a64, a64), (b64, b64), (a64, b64))):
            dest = self.sums[k, self.done:self.done + g]
            torch.mul(x, y, out=prod)
            if self.width == 1:
                dest.copy_(prod)
            else:
                torch.sum(prod.view(-1, self.width), dim=1, out=dest)
        self.done += g

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.layout == "first":
            if self.acc is None:
                return tuple(torch.zeros(self.row, dtype=torch.float64) for _ in range(3))
            return tuple(a.cpu() for a in self.acc)
        sums = (self.sums[:, :self.done].cpu() if self.sums is not None
                else torch.zeros((3, 0), dtype=torch.float64))
        if self.layout == "whole":
            return tuple(torch.tensor([math.fsum(c.tolist())], dtype=torch.float64)
                         for c in sums)
        return tuple(c.clone() for c in sums)


def nuslerp_coefficients(t: float, s00: torch.Tensor, s11: torch.Tensor,
                         s01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1), float64 tensors of shape (vectors,), with out = c0·v0 + c1·v1 per vector,
    from the float64 sums ⟨v0, v0⟩, ⟨v1, v1⟩, ⟨v0, v1⟩ (see module doc for the equation)."""
    n0 = s00.clamp(min=0).sqrt().clamp(min=NORM_EPS)
    n1 = s11.clamp(min=0).sqrt().clamp(min=NORM_EPS)
    theta = torch.acos((s01 / (n0 * n1)).clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    colinear = sin_theta.abs() < COLINEAR_EPS
    c0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return c0, c1


def piece_coefficients(layout: str, shape: tuple[int, ...], c: torch.Tensor, offset: int,
                       n: int) -> float | torch.Tensor:
    """The coefficient(s) of ``c`` (one per vector, in the compute dtype) that apply to the
    flat piece of ``n`` elements at flat ``offset``, shaped to broadcast against the piece
    viewed by ``piece_view``: a float ("whole"), (vectors in piece, 1) or (1, row)."""
    if layout == "whole":
        return float(c[0])
    if layout == "last":
        width = shape[-1]
        return c[offset // width:(offset + n) // width].view(-1, 1)
    return c.view(1, -1)


def piece_view(layout: str, shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """A flat piece viewed for ``piece_coefficients``: itself, (vectors, width) or (rows, row)."""
    if layout == "whole":
        return x
    width = shape[-1] if layout == "last" else max(1, math.prod(shape[1:]))
    return x.view(-1, width)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False,
            flatten: bool = True) -> torch.Tensor:
    """NuSLERP of two whole tensors of equal shape and float dtype (a new tensor, same dtype):
    the same sums, coefficients and blend the adapter computes piece by piece."""
    shape = tuple(v0.shape)
    layout = vector_layout(shape, row_wise, flatten)
    sums = VectorSums(layout, shape)
    sums.add(v0.reshape(-1), v1.reshape(-1))
    c0, c1 = (c.to(v0.dtype) for c in nuslerp_coefficients(t, *sums.finish()))
    n = v0.numel()
    k0, k1 = (piece_coefficients(layout, shape, c, 0, n) for c in (c0, c1))
    flat0, flat1 = (piece_view(layout, shape, v.reshape(-1)) for v in (v0, v1))
    out = torch.empty_like(flat0)
    return weighted_sum([flat0, flat1], [k0, k1], out, torch.empty_like(flat0)).reshape(shape)
