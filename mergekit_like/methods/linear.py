"""Linear merge (model soups, Wortsman et al., ICML 2022; docs/methods/linear.md): the adapter of
``ops.linear.linear_combination``, out = Σ_i w_i·x_i (÷ Σ_i w_i under normalize, the default).

All inputs take part, an unlisted base_model as an ordinary weighted input; the sum runs in model
order in the compute dtype, piece by piece. Σ w_i = 0 under normalize is a plan-time error naming
the tensor.
"""

from __future__ import annotations

import torch

from mergekit_like.errors import MergeError
from mergekit_like.kernels.tiling import Scratch, pieces, present
from mergekit_like.methods.base import REQUIRED, Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.ops.linear import linear_combination


class Linear(Method):
    io_bound = True
    spec = MethodSpec(
        name="linear",
        params=(ParamSpec("weight", "float", REQUIRED, per_model=True),
                ParamSpec("normalize", "bool", True)),
        needs_base=False,
        base_joins_inputs=True,
    )

    def check_tensor_params(self, name, model_params, params):
        if not params["normalize"]:
            return None
        weights = [mp["weight"] for mp in model_params]
        if weights and sum(float(w) for w in weights) == 0.0:
            return (f"linear: the weights of tensor '{name}' sum to 0, so normalize: true would "
                    "divide by zero; set normalize: false or change the weights")
        return None

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        normalize = bool(task.params["normalize"])
        models = present(task)
        if not models:
            raise MergeError(f"linear: no input has tensor '{task.name}'")
        weights = [float(task.model_params[pos]["weight"]) for pos in models]
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

