"""Model Stock (docs/methods/model_stock.md): the adapter of ``ops.model_stock.model_stock``,
out = t·mean(models) + (1 − t)·base with t from the models' pairwise task-vector cosines.

Whole tensors: the cosines need every model's whole tensor (or row) at once, so each input is
converted once to the compute dtype (with the recipe dtype's load rounding) and the result is
cast once to the output dtype. Memory: the N converted inputs plus a few temporaries.
"""

from __future__ import annotations

import torch

from mergekit_like.errors import MergeError
from mergekit_like.kernels.tiling import models_against_base
from mergekit_like.methods.base import Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.ops.model_stock import model_ratio, model_stock


class ModelStock(Method):
    spec = MethodSpec(
        name="model_stock",
        params=(ParamSpec("filter_wise", "bool", False),),
        needs_base=True,
        min_inputs=2,
    )

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        models, copied = models_against_base(task, 'model_stock')
        if copied is not None:
            return copied
        if len(models) < 2:
            raise MergeError(f"model_stock: tensor '{task.name}' is in only {len(models)} "
                             "model besides the base; model_stock needs at least 2")
        filter_wise = bool(task.params["filter_wise"])
        base = task.cast(task.base)
        xs = [task.cast(task.inputs[pos]) for pos in models]
        ratio = model_ratio(base, xs, filter_wise=filter_wise)
        if not bool(torch.isfinite(ratio).all()):
            raise MergeError(f"model_stock: the task vectors of tensor '{task.name}' cancel "
                             "out (mean cosine −1/(N−1)), so t = N·cos/(1+(N−1)·cos) is "
                             "undefined")
        out = task.empty_output()
        out.copy_(model_stock(base, xs, filter_wise=filter_wise))
        return out
