"""Fisher merging (docs/methods/fisher.md): the adapter of ``ops.fisher.fisher_average``.

Each model entry names its Fisher folder (``models[i].parameters.fisher``, from ``mergekit-like
stats fisher``), keyed like the model. Every tensor with Fisher entries in the folders is the
Fisher-weighted mean; a tensor without any (a buffer the pass does not differentiate) is the
weighted mean of the models. ``weight`` is the model's scaling coefficient (FusionBench's
``fisher_scaling_coefficients``, default equal); ``normalize_fisher_weight`` divides each
model's coefficient by its whole-model ‖F‖ (recorded by the pass), FusionBench's default.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from mergekit_like.errors import MergeError
from mergekit_like.fisher.fisher_pass import FISHER_KIND
from mergekit_like.methods.base import Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.methods.stats_inputs import (check_stats_coverage, check_stats_folders,
                                                stats_side_inputs)
from mergekit_like.ops.fisher import fisher_average, norm_coefficients
from mergekit_like.ops.linear import linear_combination
from mergekit_like.runtime.stats_folder import INFO_FILE, read_stats_info

PARAM = "fisher"


class Fisher(Method):
    takes_slices = False
    spec = MethodSpec(
        name="fisher",
        params=(ParamSpec(PARAM, "structured", None, per_model=True),
                ParamSpec("weight", "float", 1.0, per_model=True),
                ParamSpec("normalize_fisher_weight", "bool", True),
                ParamSpec("minimal_fisher_weight", "float", 1e-6)),
        needs_base=False,
        min_inputs=2,
    )
    card_title = "Fisher merging (Matena & Raffel, NeurIPS 2022; docs/methods/fisher.md)"

    def check_recipe(self, recipe) -> None:
        check_stats_folders(recipe, PARAM, (FISHER_KIND,), "stats fisher")
        m = recipe.top_params.get("minimal_fisher_weight")
        if m is not None and not float(getattr(m, "value", 0.0)) >= 0:
            raise recipe.locator.error(("parameters", "minimal_fisher_weight"), "must be ≥ 0")
        if recipe.base is not None:
            recipe.warnings.append("fisher: base_model is not merged (Fisher merging averages "
                                   "the models themselves); it only gives the config and tokenizer")

    def side_inputs(self, plan) -> dict[str, Any]:
        return stats_side_inputs(plan, PARAM)

    def check_plan(self, plan) -> None:
        check_stats_coverage(plan, PARAM, lambda name, shape: shape)

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        if any(x is None for x in task.inputs):
            raise MergeError(f"fisher: tensor '{task.name}' is missing in a model")
        weights = [float(mp["weight"]) for mp in task.model_params]
        fishers = [task.side.get(f"{PARAM}:{i}") for i in task.input_indices]
        xs = [task.cast(x) for x in task.inputs]
        if all(f is None for f in fishers):
            return linear_combination(xs, weights, normalize=True).to(task.out_dtype)
        minimal = float(task.params["minimal_fisher_weight"])
        norms = ([fisher_norm(mp[PARAM]) for mp in task.model_params]
                 if task.params["normalize_fisher_weight"] else None)
        coeffs = norm_coefficients(weights, norms, minimal)
        return fisher_average(xs, fishers, coeffs, minimal).to(task.out_dtype)


def fisher_norm(folder: Any) -> float:
    """‖F‖ over every tensor of a Fisher folder, as its pass recorded it."""
    path = Path(str(folder)).resolve()
    return _recorded_norm(str(path), (path / INFO_FILE).stat().st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _recorded_norm(folder: str, mtime_ns: int) -> float:
    return float(read_stats_info(Path(folder), (FISHER_KIND,))["fisher_norm"])
