"""Twin's recipe checks (phase A, docs/methods/twin.md §2) and its bundle description ``twin.json`` (§4)."""

from __future__ import annotations

import json
import math
from typing import Any

from mergekit_like.dtypes import TORCH_TO_NAME
from mergekit_like.recipe.params import Structured
from mergekit_like.recipe.validate import check_method_params
from mergekit_like.twin.bundle import BUNDLE_DIR, FACTOR_LAYOUT, FORMAT, FORMAT_VERSION, TASK_NAME

SHARED_KEYS = ("merge_method", "parameters")


def check_twin_recipe(recipe) -> None:
    """Unique task names on every model, the ``shared`` sub-recipe valid for its own operator,
    no ``on_missing_tensor: skip``. Raises MergeError naming the recipe key."""
    check_task_names(recipe)
    _check_shared(recipe)


def check_task_names(recipe) -> None:
    """Every non-base model has a unique task ``name`` matching TASK_NAME, and every model
    has every tensor (twin and wemoe store one part per task)."""
    method = recipe.merge_method
    seen: dict[str, int] = {}
    for inp in recipe.inputs:
        if inp.is_base:
            continue
        name = inp.extra.get("name")
        where = ("models", inp.index, "name") if name is not None else ("models", inp.index)
        if name is None:
            raise recipe.locator.error(where, f"{method} needs a task 'name' on every model (it "
                                              "names the task's part and router output)")
        if not isinstance(name, str) or not TASK_NAME.match(name):
            raise recipe.locator.error(where, f"task name {name!r} must match "
                                              "[A-Za-z0-9][A-Za-z0-9_.-]*")
        if name in seen:
            raise recipe.locator.error(where, f"task name '{name}' is used twice (also "
                                              f"models[{seen[name]}])")
        seen[name] = inp.index
    if recipe.on_missing_tensor != "error":
        raise recipe.locator.error(("on_missing_tensor",), f"{method} needs every tensor in "
                                                           "every model (on_missing_tensor: error)")


def _check_shared(recipe) -> None:

    setting = recipe.top_params.get("shared")
    doc = setting.value if isinstance(setting, Structured) else \
        {"merge_method": "task_arithmetic"} if setting is None else None
    path = ("parameters", "shared")
    if not isinstance(doc, dict):
        raise recipe.locator.error(path, "'shared' must be a map {merge_method, parameters}")
    for key in doc:
        if key not in SHARED_KEYS:
            raise recipe.locator.error(path + (key,), f"unknown key in 'shared' (known: "
                                                      f"{', '.join(SHARED_KEYS)})")
    name = doc.get("merge_method", "task_arithmetic")
    method = recipe.methods.get(name) if isinstance(name, str) else None
    spec = getattr(method, "spec", None)
    if spec is None or not spec.needs_base or spec.base_joins_inputs or spec.exact_inputs \
            or name in ("twin", "wemoe"):
        raise recipe.locator.error(path + ("merge_method",), f"the shared model needs an "
                                   f"operator that takes a base and the fine-tunes (e.g. "
                                   f"task_arithmetic, ties), not {name!r}")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise recipe.locator.error(path + ("parameters",), "must be a map")
    check_method_params(spec, params, recipe.locator, path + ("parameters",), recipe.warnings)
    if spec.param("density") is None or not spec.param("density").effective:
        for inp in recipe.inputs:
            if "density" in inp.entry_params:
                raise recipe.locator.error(("models", inp.index, "parameters", "density"),
                                           f"'density' has no effect: the shared operator "
                                           f"{name} does not trim")


def resolved_shared(recipe) -> dict[str, Any]:
    setting = recipe.top_params.get("shared")
    doc = dict(setting.value) if setting is not None else \
        {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.3}}
    doc.setdefault("merge_method", "task_arithmetic")
    doc.setdefault("parameters", {})
    return doc


def twin_json(plan, reports: dict[str, dict]) -> str:
    """The bundle description of docs/methods/twin.md §5 (format version 1) as JSON text."""
    recipe = plan.recipe
    resolved = recipe.resolved()["parameters"]
    tasks = [inp.extra["name"] for inp in plan.inputs if not inp.is_base]
    tensors = {}
    for job in plan.jobs:
        tensors[job.name] = reports.get(job.name) or {"kind": "shared_only",
                                                      "shape": list(job.info.shape)}
    factor_bytes = {t: 0 for t in tasks}
    for out in plan.outputs:
        if out.group:
            task = out.group.split("/")[1]
            factor_bytes[task] += math.prod(out.shape) * out.dtype.itemsize
    summary = {}
    for t in tasks:
        energies = [r["energy"][t] for r in tensors.values() if r["kind"] == "lowrank"]
        summary[t] = {"mean_energy": sum(energies) / len(energies) if energies else None,
                      "min_energy": min(energies) if energies else None,
                      "bytes": factor_bytes[t]}
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tasks": tasks,
        "base_model": plan.inputs[plan.base_pos].ref.resolved(),
        "models": {inp.extra["name"]: inp.ref.resolved() for inp in plan.inputs if not inp.is_base},
        "shared": resolved_shared(recipe),
        "rank": resolved.get("rank"), "dense_small": resolved.get("dense_small"),
        "include_embeddings": resolved.get("include_embeddings"), "svd": resolved.get("svd"),
        "out_dtype": TORCH_TO_NAME[recipe.out_dtype] if recipe.out_dtype is not None else None,
        "factor_layout": FACTOR_LAYOUT,
        "tensors": tensors,
        "summary": summary,
        "router": None,
    }
    return json.dumps(info, indent=2, default=str) + "\n"


def card_extra(plan, reports: dict[str, dict]) -> dict[str, Any]:
    info = json.loads(twin_json(plan, reports))
    energy = ", ".join(f"{t} {s['mean_energy']:.3f}" for t, s in info["summary"].items()
                       if s["mean_energy"] is not None)
    return {
        "tasks": info["tasks"],
        "shared model": f"{info['shared']['merge_method']} {info['shared']['parameters']}",
        "rank": info["rank"],
        "mean SVD energy kept": energy or "(no low-rank tensors)",
        "materialize a task": f"mergekit-like twin materialize THIS_FOLDER OUT --task "
                              f"{info['tasks'][0]}",
        "exclusive parts": f"{BUNDLE_DIR}/<task>/ (delta = A @ B)",
    }

