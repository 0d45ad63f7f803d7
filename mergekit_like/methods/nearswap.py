"""NearSwap (docs/methods/nearswap.md): the adapter of ``ops.nearswap.nearswap``, a = the base,
b = the other model, w = clamp(t / max(|a − b|, 1e-6), 0, 1), out = w·b + (1 − w)·a.

Elementwise, so one pass over the pieces in the compute dtype; ``t`` is method-wide and may vary
by tensor (gradients, filters). A tensor only the base has is the base's, copied.
"""

from __future__ import annotations

import torch

from mergekit_like.kernels.tiling import copy_of, other_of_pair, pieces
from mergekit_like.methods.base import REQUIRED, Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.ops.nearswap import nearswap


class Nearswap(Method):
    io_bound = True
    spec = MethodSpec(
        name="nearswap",
        params=(ParamSpec("t", "float", REQUIRED),),
        needs_base=True,
        exact_inputs=2,
    )

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        t = float(task.params["t"])
        other = other_of_pair(task, "nearswap")
        if other is None:                               # only the base has the tensor
            return copy_of(task, task.base)
        out = task.empty_output()
        flat_out = out.view(-1)
        for off, (a, b) in pieces(task, [task.base, other]):
            flat_out[off:off + a.numel()].copy_(nearswap(a, b, t))
        return out
