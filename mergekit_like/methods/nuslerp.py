"""NuSLERP (docs/methods/nuslerp.md): spherical interpolation of two models with
t = w2/(w1 + w2), per row, per column or over the whole tensor, on task vectors when a
base_model is given; the adapter of ``ops/nuslerp.py``.

Two passes over the pieces: the float64 sums per vector (``ops.nuslerp.VectorSums``), then the
blend [base +] c0·v0 + c1·v1 in the compute dtype with the coefficients of
``ops.nuslerp.nuslerp_coefficients``: ``ops.nuslerp.nuslerp`` of the inputs, bit for bit.
"""

from __future__ import annotations

import torch

from mergekit_like.kernels.tiling import Scratch, copy_of, present
from mergekit_like.methods.base import REQUIRED, Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.methods.sphere_passes import blend_pass, vector_pieces
from mergekit_like.ops.nuslerp import (VectorSums, nuslerp_coefficients, nuslerp_t,
                                       piece_coefficients, piece_view, vector_layout)


class NuSlerp(Method):
    spec = MethodSpec(
        name="nuslerp",
        params=(ParamSpec("weight", "float", REQUIRED, per_model=True),
                ParamSpec("nuslerp_row_wise", "bool", False),
                ParamSpec("nuslerp_flatten", "bool", True)),
        needs_base=False,
    )

    def check_recipe(self, recipe) -> None:
        others = [m for m in recipe.inputs if not m.is_base]
        if recipe.base is not None and len(others) != 2:
            listed = any(m.is_base and m.listed for m in recipe.inputs)
            why = (" (base_model can not be one of the two models it merges)"
                   if listed and len(others) == 1 else "")
            raise recipe.locator.error(recipe.models_path, "nuslerp with a base_model merges "
                                       f"exactly two other models, got {len(others)}{why}")
        if recipe.base is None and len(others) > 2:
            raise recipe.locator.error(recipe.models_path, "nuslerp merges exactly two models "
                                       f"(plus an optional base_model), got {len(others)}")

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        models = present(task)
        if len(models) < 2:                     # one model alone (or only one has the tensor)
            return copy_of(task, task.inputs[models[0]] if models else task.base)
        w1, w2 = (float(task.model_params[p]["weight"]) for p in models)
        t = nuslerp_t(w1, w2)
        layout = vector_layout(task.shape, bool(task.params["nuslerp_row_wise"]),
                               bool(task.params["nuslerp_flatten"]))
        xs = [task.inputs[p] for p in models]
        sums = VectorSums(layout, task.shape)
        for _, (v0, v1), _ in vector_pieces(task, xs, task.base,
                                            Scratch(task.compute_dtype, task.device)):
            sums.add(v0, v1)
        cs = [c.to(task.compute_dtype).to(task.device)
              for c in nuslerp_coefficients(t, *sums.finish())]
        shape = task.shape
        return blend_pass(task, xs, task.base,
                          lambda off, n: [piece_coefficients(layout, shape, c, off, n) for c in cs],
                          view=lambda v: piece_view(layout, shape, v))
