"""Passthrough (docs/methods/passthrough.md): the adapter of ``ops.passthrough.passthrough``,
out = x, or scale·x with the per-model ``scale`` set.

Exactly one model (base_model included, when it is another model than the one listed): mergekit
fails on every tensor otherwise, we refuse the recipe (phase A). The copy or product runs piece
by piece in the compute dtype and is cast once to the output dtype.
"""

from __future__ import annotations

import torch

from mergekit_like.errors import MergeError
from mergekit_like.kernels.tiling import Scratch, pieces, present
from mergekit_like.methods.base import Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.ops.passthrough import passthrough


class Passthrough(Method):
    io_bound = True
    spec = MethodSpec(
        name="passthrough",
        params=(ParamSpec("scale", "float", None, per_model=True),),
        needs_base=False,
        base_joins_inputs=True,
    )

    def check_recipe(self, recipe) -> None:
        n = len(recipe.inputs)
        if n != 1:
            raise recipe.locator.error(recipe.models_path, f"passthrough takes exactly one model "
                                                    f"(base_model included), got {n}")

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        models = present(task)
        if len(models) != 1:
            raise MergeError(f"passthrough: tensor '{task.name}' needs exactly one input, "
                             f"got {len(models)}")
        pos = models[0]
        scale = task.model_params[pos].get("scale")
        scale = None if scale is None else float(scale)
        scratch = Scratch(task.compute_dtype, task.device)
        out = task.empty_output()
        flat_out = out.view(-1)
        for off, (x,) in pieces(task, [task.inputs[pos]]):
            n = x.numel()
            flat_out[off:off + n].copy_(passthrough(x, scale, out=scratch.get("acc", n)))
        return out
