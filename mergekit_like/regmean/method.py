"""RegMean (docs/methods/regmean.md): the adapter of ``ops.regmean.regmean_solve``.

Each model entry names its Gram folder (``models[i].parameters.gram``, from ``mergekit-like stats
gram``). A linear weight with Grams is solved in float64 on the compute device and cast once;
every other tensor (embeddings, norms, biases, a head without Grams) is the weighted mean of
the models (``weight``, normalized), as RegMean's authors and FusionBench do. With a base_model
and ``lambda`` (an extension, docs/methods/regmean.md §1), every tensor is then scaled from the
base like task arithmetic: base + λ·N·(merged − base), so λ = 1/N is RegMean itself. A solve that needed
the ridge fallback is named in the merge's notes and in ``regmean_report.json``.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from mergekit_like.errors import MergeError
from mergekit_like.io.shards import format_bytes
from mergekit_like.methods.base import Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.methods.stats_inputs import (check_stats_coverage, check_stats_folders,
                                                stats_side_inputs)
from mergekit_like.ops.linear import linear_combination
from mergekit_like.ops.regmean import regmean_solve
from mergekit_like.regmean.gram_pass import GRAM_KIND

PARAM = "gram"
REPORT_FILE = "regmean_report.json"


class RegMean(Method):
    takes_slices = False
    spec = MethodSpec(
        name="regmean",
        params=(ParamSpec(PARAM, "structured", None, per_model=True),
                ParamSpec("weight", "float", 1.0, per_model=True),
                ParamSpec("reduce_non_diagonal_ratio", "density", 0.95),
                ParamSpec("normalize", "bool", True),
                ParamSpec("lambda", "float", None)),
        needs_base=False,
        min_inputs=2,
    )
    card_title = "RegMean (Jin et al., ICLR 2023; docs/methods/regmean.md)"

    def check_recipe(self, recipe) -> None:
        check_stats_folders(recipe, PARAM, (GRAM_KIND,), "stats gram")
        if "lambda" in recipe.top_params:
            if recipe.base is None:
                raise recipe.locator.error(("parameters", "lambda"), "lambda scales the merge's "
                                           "task vector and needs a base_model")
        elif recipe.base is not None:
            recipe.warnings.append("regmean: base_model is not merged (RegMean averages the "
                                   "models themselves); it only gives the config and tokenizer")

    def side_inputs(self, plan) -> dict[str, Any]:
        return stats_side_inputs(plan, PARAM)

    def check_plan(self, plan) -> None:
        covered = check_stats_coverage(plan, PARAM, _gram_shape)
        if covered:
            name = max(covered, key=lambda n: _solve_bytes(plan, n))
            plan.notes.append(
                f"regmean: {len(covered)} linear weights solved from Grams "
                f"({format_bytes(sum(covered.values()))} of statistics read); largest solve "
                f"{format_bytes(_solve_bytes(plan, name))} in float64 ({name})")

    def working_bytes(self, plan) -> int:
        names = [j.name for j in plan.jobs if j.merge and j.name in _first_side(plan).tensors()]
        return max((_solve_bytes(plan, n) for n in names), default=0)

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        grams = [task.side.get(f"{PARAM}:{i}") for i in task.input_indices]
        if any(x is None for x in task.inputs):
            raise MergeError(f"regmean: tensor '{task.name}' is missing in a model")
        xs = [task.cast(x) for x in task.inputs]
        if all(g is None for g in grams):
            merged = self._mean(task, xs)
        else:
            solved = regmean_solve(xs, grams, float(task.params["reduce_non_diagonal_ratio"]))
            if solved.jitter:
                task.report = {"ridge_epsilon": solved.jitter}
            merged = solved.weight
        lam = task.params.get("lambda")
        if lam is not None:
            merged = _scaled_to_base(task, merged, float(lam) * len(xs))
        return merged.to(task.out_dtype).contiguous()

    def _mean(self, task: TensorTask, xs: list[torch.Tensor]) -> torch.Tensor:
        """A tensor without Grams: Σ w_i x_i / Σ w_i (``normalize``) or Σ w_i x_i."""
        weights = [float(mp["weight"]) for mp in task.model_params]
        normalize = bool(task.params["normalize"])
        if normalize and sum(weights) == 0.0:
            raise MergeError(f"regmean: the weights of tensor '{task.name}' sum to 0 "
                             "(normalize: true)")
        return linear_combination(xs, weights, normalize=normalize)

    def side_files(self, plan, reports: dict[str, dict]) -> dict[str, str]:
        ridge = {n: r["ridge_epsilon"] for n, r in reports.items() if r and "ridge_epsilon" in r}
        if ridge:
            first = ", ".join(list(ridge)[:3]) + (" …" if len(ridge) > 3 else "")
            plan.notes.append(f"regmean: {len(ridge)} Gram sum(s) not positive definite, solved "
                              f"by the ridge toward the mean ({first}); see {REPORT_FILE}")
        text = json.dumps({"method": "regmean", "ridge_fallback": ridge,
                           "reduce_non_diagonal_ratio":
                               plan.recipe.resolved()["parameters"].get(
                                   "reduce_non_diagonal_ratio", 0.95)}, indent=2) + "\n"
        return {REPORT_FILE: text}


def _scaled_to_base(task: TensorTask, merged: torch.Tensor, scale: float) -> torch.Tensor:
    """base + s·(merged − base): ``lambda`` as task arithmetic's λ, s = λ·N (λ = 1/N: the merge
    itself; for an averaged tensor with equal weights, base + λ·Σ(x_i − base))."""
    if task.base is None:
        raise MergeError(f"regmean: tensor '{task.name}' has no base tensor (lambda needs one)")
    base = task.cast(task.base).to(merged.dtype)
    return base + scale * (merged - base)


def _gram_shape(name: str, shape: tuple) -> tuple | None:
    """A linear weight (out, in) needs an (in, in) Gram; other shapes take none."""
    return (shape[1], shape[1]) if len(shape) == 2 else None


def _first_side(plan):
    return next(iter(plan.side.values()))


def _solve_bytes(plan, name: str) -> int:
    """float64 bytes the solve of ``name`` holds: Σ G̃ and its factor (in²) and the right-hand
    side and solution (in × out), plus one model's G̃ and weight."""
    job = next(j for j in plan.jobs if j.name == name)
    out, n = job.info.shape
    return 8 * (3 * n * n + 3 * n * out)
