"""Karcher mean (docs/methods/karcher.md): the Riemannian mean of the models' directions on
the hypersphere, rescaled by their mean norm; the adapter of ``ops/karcher.py``.

Every model takes part with equal weight, an unlisted base_model as an ordinary input (as in
mergekit). Two passes over the pieces: the float64 Gram matrix, then the blend Σ c_j·x_j with
the coefficients of ``ops.karcher.karcher_coefficients``.
"""

from __future__ import annotations

import torch

from mergekit_like.kernels.tiling import copy_of, present
from mergekit_like.methods.base import Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.methods.sphere_passes import blend_pass, gram_pass
from mergekit_like.ops.karcher import MAX_ITER, TOL, karcher_coefficients


class Karcher(Method):
    spec = MethodSpec(
        name="karcher",
        params=(ParamSpec("max_iter", "int", MAX_ITER),
                ParamSpec("tol", "float", TOL)),
        needs_base=False,
        base_joins_inputs=True,
    )

    def check_tensor_params(self, name, model_params, params):
        if float(params["tol"]) < 0:
            return f"karcher: tol must be ≥ 0, got {params['tol']} (tensor '{name}')"
        return None

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        models = present(task)
        xs = [task.inputs[p] for p in models]
        if len(xs) == 1:
            return copy_of(task, xs[0])
        g = gram_pass(task, xs, None)
        c = karcher_coefficients(g, max_iter=int(task.params["max_iter"]),
                                 tol=float(task.params["tol"]))
        return blend_pass(task, xs, None, lambda off, n: c)
