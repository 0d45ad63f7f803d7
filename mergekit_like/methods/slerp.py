"""Spherical linear interpolation (Shoemake, SIGGRAPH 1985) of two models, mergekit semantics.

v0 = base and v1 = the other model, flattened. Each is normalised only when its norm exceeds
1e-8 (mergekit's quirk, which matters for all-zero biases); c = ⟨v̂0, v̂1⟩::

    |c| > 0.9995:  out = (1−t)·v0 + t·v1
    otherwise:     θ = arccos c ;  out = sin((1−t)·θ)/sin θ · v0 + sin(t·θ)/sin θ · v1

The unnormalised tensors are interpolated. Norms and the dot product are accumulated in float64
(per row, then exactly over rows), the coefficients are computed in float64, the blend runs in
the compute dtype. t = 0 gives v0 and t = 1 gives v1 bit for bit.
"""

from __future__ import annotations

import math

import torch

from mergekit_like.errors import MergeError
from mergekit_like.methods.base import REQUIRED, Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.kernels.tiling import Scratch, copy_of, exact_total, pieces, row_elems

NORM_EPS = 1e-8
COLINEAR = 0.9995


def slerp_coefficients(t: float, norm0: float, norm1: float, dot: float) -> tuple[float, float]:
    """(c0, c1) with out = c0·v0 + c1·v1, from ‖v0‖, ‖v1‖ and ⟨v0, v1⟩ (float64 scalars)."""
    n0 = norm0 if norm0 > NORM_EPS else 1.0
    n1 = norm1 if norm1 > NORM_EPS else 1.0
    c = dot / (n0 * n1)
    if abs(c) > COLINEAR:
        return 1.0 - t, t
    theta = math.acos(c)
    sin_theta = math.sin(theta)
    theta_t = theta * t
    return math.sin(theta - theta_t) / sin_theta, math.sin(theta_t) / sin_theta


def blend(v0: torch.Tensor, v1: torch.Tensor, c0: float, c1: float,
          out: torch.Tensor | None = None, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """c0·v0 + c1·v1 elementwise (each product rounded, then added); a zero coefficient drops
    its term, so (1, 0) returns v0 exactly."""
    if c1 == 0.0:
        return v0.clone() if out is None else out.copy_(v0)
    if c0 == 0.0:
        return torch.mul(v1, c1, out=out) if out is not None else v1 * c1
    res = torch.mul(v0, c0, out=out) if out is not None else v0 * c0
    return res.add_(torch.mul(v1, c1, out=tmp) if tmp is not None else v1 * c1)


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP of two whole tensors of equal shape (reference form of the blocked adapter)."""
    a, b = v0.reshape(-1).double(), v1.reshape(-1).double()
    c0, c1 = slerp_coefficients(t, math.sqrt(float(a @ a)), math.sqrt(float(b @ b)), float(a @ b))
    return blend(v0, v1, c0, c1)


class Slerp(Method):
    spec = MethodSpec(
        name="slerp",
        params=(ParamSpec("t", "float", REQUIRED),),
        needs_base=True,
        exact_inputs=2,
    )

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        t = task.params.get("t")
        if t is None:
            raise MergeError(f"slerp: no value of 't' for tensor '{task.name}'")
        t = float(t)
        others = [x for x in task.inputs if x is not None]
        if len(others) > 1:
            raise MergeError(f"slerp takes exactly 2 models (base included), got {len(others) + 1}")
        v0, v1 = task.base, (others[0] if others else None)
        if v0 is None or v1 is None:                    # only one model has the tensor
            return copy_of(task, v1 if v0 is None else v0)
        row = row_elems(task.shape)
        s00: list[torch.Tensor] = []
        s11: list[torch.Tensor] = []
        s01: list[torch.Tensor] = []
        scratch = Scratch(torch.float64, task.device)
        for _, (a, b) in pieces(task, [v0, v1]):        # pass 1: norms and dot product
            n = a.numel()
            a64, b64 = scratch.get("a", n).copy_(a), scratch.get("b", n).copy_(b)
            prod = scratch.get("p", n)
            s00.append(_rows(torch.mul(a64, a64, out=prod), row))
            s11.append(_rows(torch.mul(b64, b64, out=prod), row))
            s01.append(_rows(torch.mul(a64, b64, out=prod), row))
        c0, c1 = slerp_coefficients(t, math.sqrt(exact_total(s00)), math.sqrt(exact_total(s11)),
                                    exact_total(s01))
        scratch = Scratch(task.compute_dtype, task.device)
        out = task.empty_output()
        flat_out = out.view(-1)
        for off, (a, b) in pieces(task, [v0, v1]):      # pass 2: blend
            n = a.numel()
            flat_out[off:off + n].copy_(blend(a, b, c0, c1, scratch.get("acc", n),
                                              scratch.get("tmp", n)))
        return out


def _rows(v: torch.Tensor, row: int) -> torch.Tensor:
    """Per-row sums of a flat float64 piece of whole rows (a new tensor)."""
    return v.clone() if row == 1 else v.view(-1, row).sum(dim=1)

