"""What the methods that read one statistics folder per model share (RegMean's Gram matrices,
Fisher merging's Fisher; docs/methods/regmean.md §3): the folder named on each model entry
(``models[i].parameters.<param>``), its kind checked at recipe time before any download, the
folders opened as side inputs labelled ``<param>:<i>``, and the plan-time check that every
model's folder covers the same tensors with the expected shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mergekit_like.errors import MergeError
from mergekit_like.recipe.params import Scalar, Structured
from mergekit_like.runtime.stats_folder import read_stats_info


def folder_of(entry_params: dict[str, Any], param: str) -> Any:
    setting = entry_params.get(param)
    return setting.value if isinstance(setting, (Scalar, Structured)) else None


def check_stats_folders(recipe, param: str, kinds: tuple[str, ...], command: str) -> list[dict]:
    """Every non-base model names a statistics folder of one of ``kinds`` under ``param``;
    returns their ``importance.json`` infos in model order. Errors name the recipe line."""
    loc = recipe.locator
    if param in recipe.top_params:
        raise loc.error(("parameters", param), f"'{param}' belongs on each model's entry "
                        f"(models[i].parameters.{param}: FOLDER)")
    infos = []
    for inp in recipe.non_base_inputs:
        path = ("models", inp.index, "parameters", param)
        folder = folder_of(inp.entry_params, param)
        if folder is None:
            raise loc.error(("models", inp.index), f"{recipe.merge_method} needs '{param}: "
                            f"FOLDER' on every model (from `mergekit-like {command}`)")
        if not isinstance(folder, str):
            raise loc.error(path, f"'{param}' must be a folder path")
        try:
            infos.append(read_stats_info(Path(folder), kinds))
        except MergeError as exc:
            raise loc.error(path, str(exc)) from None
    return infos


def stats_side_inputs(plan, param: str) -> dict[str, Path]:
    """{``<param>:<i>``: folder} for every non-base model i."""
    return {f"{param}:{inp.index}": Path(folder_of(inp.entry_params, param))
            for inp in plan.recipe.non_base_inputs}


def check_stats_coverage(plan, param: str, expected_shape: Callable[[str, tuple], tuple | None]
                         ) -> dict[str, int]:
    """For every merged tensor: either no model's folder has it or every one has it, with the
    shape ``expected_shape(name, tensor shape)`` (None: any shape is refused). Returns
    {tensor name: bytes of its statistics over all models} for the tensors that have some."""
    labels = [f"{param}:{inp.index}" for inp in plan.recipe.non_base_inputs]
    covered: dict[str, int] = {}
    for job in plan.jobs:
        if not job.merge:
            continue
        have = {label: plan.side[label].tensors().get(job.name) for label in labels}
        present = [label for label, info in have.items() if info is not None]
        if not present:
            continue
        if len(present) != len(labels):
            missing = next(label for label in labels if have[label] is None)
            raise MergeError(f"{_who(plan, missing)} has no statistics for tensor '{job.name}' "
                             f"that {_who(plan, present[0])} has (statistics of another model, "
                             "or a layer missing?)")
        want = expected_shape(job.name, tuple(job.info.shape))
        for label in present:
            got = tuple(have[label].shape)
            if want is None or got != want:
                raise MergeError(f"{_who(plan, label)}: statistics of tensor '{job.name}' have "
                                 f"shape {list(got)}, the models' tensor {list(job.info.shape)} "
                                 f"needs {list(want) if want else 'none'} (statistics of "
                                 "another model?)")
        covered[job.name] = sum(have[label].nbytes for label in present)
    return covered


def _who(plan, label: str) -> str:
    src = plan.side[label]
    return f"{label.partition(':')[0]} of models[{label.partition(':')[2]}] ({getattr(src, 'folder', src.ref)})"
