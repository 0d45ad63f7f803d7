"""SCE (docs/methods/sce.md): the adapter of ``ops.sce.sce``: variance top-k select,
mean-square weights, sign erase, weighted mean of the task vectors.

Whole tensors: the variance ranking and the per-model weights need every model's whole tensor.
On CPU with float32 compute, bf16/float32 inputs and at most 4 models, ``kernels.sce.sce_task``
runs it over row spans in parallel (an exact selection instead of the sort, compiled passes,
bit-equal); memory: one float32 tensor and one bool mask of the tensor's size. Otherwise
``ops.sce.sce`` on the inputs converted once to the compute dtype (with the recipe dtype's load rounding), the result cast
once to the output dtype; memory: the N task vectors stacked plus a few temporaries of that
size.
"""

from __future__ import annotations

import torch

from mergekit_like.kernels import sce as fast
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
    span_parallel = True     # kernels.sce splits each tensor over task.workers threads

    def warm_up(self, device: torch.device) -> None:
        if device.type == "cpu":
            fast.warm_up()

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        models, copied = models_against_base(task, 'sce')
        if copied is not None:
            return copied
        topk = float(task.params["select_topk"])
        if fast.supported(task, models):
            return fast.sce_task(task, models, topk)
        base = task.cast(task.base)
        xs = [task.cast(task.inputs[pos]) for pos in models]
        out = task.empty_output()
        out.copy_(sce(base, xs, select_topk=topk))
        return out
