"""SCE (docs/methods/sce.md): the adapter of ``ops.sce.sce``: variance top-k select,
mean-square weights, sign erase, weighted mean of the task vectors.

Whole tensors: the variance ranking and the per-model weights need every model's whole tensor,
so each input is converted once to the compute dtype (with the recipe dtype's load rounding)
and the result is cast once to the output dtype. Memory: the N task vectors stacked plus a few
temporaries of that size.
"""

from __future__ import annotations

import torch

from mergekit_like.kernels.tiling import models_against_base
from mergekit_like.methods.base import Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.ops.sce import sce


class Sce(Method):
    spec = MethodSpec(
        name="sce",
        params=(ParamSpec("select_topk", "density", 1.0),
                ParamSpec("int8_mask", "bool", False, effective=False)),
        needs_base=True,
    )

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        models, copied = models_against_base(task, 'sce')
        if copied is not None:
            return copied
        base = task.cast(task.base)
        xs = [task.cast(task.inputs[pos]) for pos in models]
        out = task.empty_output()
        out.copy_(sce(base, xs, select_topk=float(task.params["select_topk"])))
        return out
