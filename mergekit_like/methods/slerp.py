"""Spherical linear interpolation of two models (docs/methods/slerp.md): the adapter of
``ops/slerp.py``, v0 = base, v1 = the other model.

Two passes over the pieces: the float64 norms and dot product (``ops.slerp.row_products`` per
piece of whole rows, then exactly over rows, as ``ops.slerp.slerp_statistics``), then the blend
in the compute dtype with the coefficients of ``ops.slerp.slerp_coefficients``. The result is
``ops.slerp.slerp`` of the inputs in the compute dtype, bit for bit.
"""

from __future__ import annotations

import math

import torch

from mergekit_like.errors import MergeError
from mergekit_like.kernels.tiling import Scratch, copy_of, exact_total, pieces, row_elems
from mergekit_like.methods.base import REQUIRED, Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.ops.slerp import blend, row_products, slerp_coefficients


class Slerp(Method):
    spec = MethodSpec(
        name="slerp",
        params=(ParamSpec("t", "float", REQUIRED, usual=(0.0, 1.0)),
                # mergekit's slerp ignores a per-model weight: accepted with a warning
                ParamSpec("weight", "float", None, per_model=True, effective=False)),
        needs_base=True,
        exact_inputs=2,
    )

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        t = float(task.params["t"])
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
            s00.append(row_products(a64, a64, row, prod))
            s11.append(row_products(b64, b64, row, prod))
            s01.append(row_products(a64, b64, row, prod))
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

