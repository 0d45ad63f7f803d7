"""Linear merge (model soups, Wortsman et al., ICML 2022): a weighted average of the models.

    out = Σ_i w_i·x_i / Σ_i w_i      (normalize, default)
    out = Σ_i w_i·x_i                (normalize: false)

All inputs take part, an unlisted base_model as an ordinary weighted input; the sum runs in model
order in the compute dtype. Σ w_i = 0 under normalize is a plan-time error naming the tensor.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mergekit_like.errors import MergeError
from mergekit_like.methods.base import REQUIRED, Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.kernels.tiling import Scratch, pieces, present


def linear_combination(xs: Sequence[torch.Tensor], weights: Sequence[float], *,
                       normalize: bool, out: torch.Tensor | None = None,
                       tmp: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i w_i·x_i (÷ Σ_i w_i when normalize) of same-shape float tensors, in order.

    Each product w_i·x_i is rounded, then added (no fused multiply-add), so the result does not
    depend on how the tensor is cut. ``out``/``tmp``: optional work buffers of x's shape."""
    if not xs:
        raise ValueError("linear_combination needs at least one tensor")
    total = sum(float(w) for w in weights)
    if normalize and total == 0.0:
        raise ZeroDivisionError("weights sum to 0")
    out = torch.mul(xs[0], float(weights[0]), out=out) if out is not None else xs[0] * float(weights[0])
    for x, w in zip(xs[1:], weights[1:]):
        term = torch.mul(x, float(w), out=tmp) if tmp is not None else x * float(w)
        out.add_(term)
    if normalize:
        out.div_(total)
    return out


class Linear(Method):
    io_bound = True
    spec = MethodSpec(
        name="linear",
        params=(ParamSpec("weight", "float", REQUIRED, per_model=True),
                ParamSpec("normalize", "bool", True)),
        needs_base=False,
        base_joins_inputs=True,
    )

    @staticmethod
    def _normalize(params: dict[str, Any]) -> bool:
        v = params.get("normalize")
        return True if v is None else bool(v)

    def check_tensor_params(self, name, model_params, params):
        if not self._normalize(params):
            return None
        weights = [mp.get("weight") for mp in model_params]
        if weights and all(w is not None for w in weights) and sum(float(w) for w in weights) == 0.0:
            return (f"linear: the weights of tensor '{name}' sum to 0, so normalize: true would "
                    "divide by zero; set normalize: false or change the weights")
        return None

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        normalize = self._normalize(task.params)
        models = present(task)
        if not models:
            raise MergeError(f"linear: no input has tensor '{task.name}'")
        weights = []
        for pos in models:
            w = task.model_params[pos].get("weight")
            if w is None:
                raise MergeError(f"linear: no weight for input {pos} of tensor '{task.name}'")
            weights.append(float(w))
        if normalize and sum(weights) == 0.0:
            raise MergeError(f"linear: the weights of tensor '{task.name}' sum to 0 "
                             "(normalize: true); set normalize: false or change the weights")
        scratch = Scratch(task.compute_dtype, task.device)
        out = task.empty_output()
        flat_out = out.view(-1)
        for off, parts in pieces(task, [task.inputs[pos] for pos in models]):
            n = parts[0].numel()
            res = linear_combination(parts, weights, normalize=normalize,
                                     out=scratch.get("acc", n), tmp=scratch.get("tmp", n))
            flat_out[off:off + n].copy_(res)
        return out

