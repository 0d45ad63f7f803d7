"""Multi-SLERP (docs/methods/multislerp.md): barycentric interpolation of N models on the
hypersphere, on task vectors when a base_model is given; the adapter of ``ops/multislerp.py``.

Two passes over the pieces: the float64 Gram matrix of the inputs (or task vectors), then the
blend [base +] Σ c_j·v_j with the coefficients of ``ops.multislerp.multislerp_coefficients``.
Σ w = 0 under normalize_weights is a plan-time error naming the tensor.
"""

from __future__ import annotations

import torch

from mergekit_like.errors import MergeError
from mergekit_like.kernels.tiling import copy_of, present
from mergekit_like.methods.base import REQUIRED, Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.methods.sphere_passes import blend_pass, gram_pass
from mergekit_like.ops.multislerp import EPS, AntipodalError, multislerp_coefficients


class MultiSlerp(Method):
    spec = MethodSpec(
        name="multislerp",
        params=(ParamSpec("weight", "float", REQUIRED, per_model=True),
                ParamSpec("normalize_weights", "bool", True),
                ParamSpec("eps", "float", EPS)),
        needs_base=False,
    )

    def check_tensor_params(self, name, model_params, params):
        if float(params["eps"]) < 0:
            return f"multislerp: eps must be ≥ 0, got {params['eps']} (tensor '{name}')"
        weights = [float(mp["weight"]) for mp in model_params]
        if params["normalize_weights"] and len(weights) > 1 and sum(weights) == 0.0:
            return (f"multislerp: the weights of tensor '{name}' sum to 0, so "
                    "normalize_weights: true would divide by zero; change the weights or set "
                    "normalize_weights: false")
        return None

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        models = present(task)
        if len(models) < 2:                     # mergekit returns a lone model's tensor as is
            return copy_of(task, task.inputs[models[0]] if models else task.base)
        xs = [task.inputs[p] for p in models]
        weights = [float(task.model_params[p]["weight"]) for p in models]
        g = gram_pass(task, xs, task.base)
        try:
            c = multislerp_coefficients(g, weights,
                                        normalize_weights=bool(task.params["normalize_weights"]),
                                        eps=float(task.params["eps"]))
        except (AntipodalError, ZeroDivisionError) as exc:
            raise MergeError(f"multislerp: tensor '{task.name}': {exc}") from None
        return blend_pass(task, xs, task.base, lambda off, n: c)
