"""Phase B of validation and the merge plan: which output tensors, from which inputs, with which
resolved parameters. Reads metadata only (config.json, index, safetensors headers).

Everything that can be wrong with the inputs (a missing tensor, a shape mismatch, a parameter
with no value for some tensor) is found here, before any weight byte is read or any output byte
written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mergekit_like.dtypes import is_float_code
from mergekit_like.engine.jobs import (MergePlan, TensorJob, compute_dtype_of, copy_job,
                                       merge_tensor_job)
from mergekit_like.engine.slice_plan import plan_slices
from mergekit_like.engine.vocab_plan import plan_vocab, rows_may_differ
from mergekit_like.errors import MergeError
from mergekit_like.io.layers import config_num_layers
from mergekit_like.io.local import LocalSource
from mergekit_like.io.source import CheckpointSource, TensorInfo
from mergekit_like.methods.base import Method
from mergekit_like.recipe import InputModel, Recipe
from mergekit_like.recipe.params import layer_positions

__all__ = ["MergePlan", "SourceOpener", "TensorJob", "build_plan", "open_input"]

SourceOpener = Callable[[InputModel], CheckpointSource]


def _check_names(recipe: Recipe, inputs: list[InputModel], headers: list[dict[str, TensorInfo]],
                 ref: int, warnings: list[str]) -> None:
    ref_names = headers[ref]
    ref_label = "base" if inputs[ref].is_base else inputs[ref].ref.display
    for pos, (inp, header) in enumerate(zip(inputs, headers)):
        if pos == ref:
            continue
        who = inp.ref.display
        missing = [n for n in ref_names if n not in header]
        if missing and recipe.on_missing_tensor != "skip":
            raise MergeError(
                f"{who} lacks '{missing[0]}' (present in {ref_label})"
                + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "")
                + "; set on_missing_tensor: skip to merge without it")
        if missing:
            warnings.append(f"{who}: {len(missing)} tensors missing, merged without this model "
                            f"(first: '{missing[0]}')")
        extra = [n for n in header if n not in ref_names]
        if extra and recipe.on_extra_tensor != "ignore":
            raise MergeError(
                f"{who} has tensor '{extra[0]}' that {ref_label} lacks"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + "; set on_extra_tensor: ignore to drop it")
        if extra:
            warnings.append(f"{who}: ignoring {len(extra)} tensors the reference lacks "
                            f"({', '.join(extra[:3])}{' …' if len(extra) > 3 else ''})")
        for name, info in ref_names.items():
            other = header.get(name)
            if other is None:
                continue
            if other.shape != info.shape and not rows_may_differ(name, info, other):
                raise MergeError(
                    f"{who}: tensor '{name}' has shape {list(other.shape)}, "
                    f"{ref_label} has {list(info.shape)}")
            if is_float_code(info.dtype) != is_float_code(other.dtype):
                raise MergeError(f"{who}: tensor '{name}' is {other.dtype}, {ref_label} has "
                                 f"{info.dtype} (floating and non-floating cannot be merged)")


def build_plan(recipe: Recipe, open_source: SourceOpener) -> MergePlan:
    """Phase B: open every input's metadata, check it against the recipe, resolve parameters.
    Sources are closed again if any check fails."""
    inputs = list(recipe.inputs)
    sources: list[CheckpointSource] = []
    try:
        for inp in inputs:
            sources.append(open_input(recipe, open_source, inp))
        if recipe.slices is not None:
            plan = plan_slices(recipe, inputs, sources)
        else:
            plan = _plan(recipe, inputs, sources)
        return _finish_plan(plan, recipe, inputs, sources, open_source)
    except BaseException:
        for s in sources:
            s.close()
        raise


def open_input(recipe: Recipe, open_source: SourceOpener, inp: InputModel,
               line_path: tuple | None = None, label: str | None = None) -> CheckpointSource:
    """``open_source(inp)``; an error opening a Hub model is located at the model's recipe line:
    ``recipe.yml:4 models[1] (org/x): cannot reach …`` (the name is left out of the label when
    the message already gives it)."""
    try:
        return open_source(inp)
    except MergeError as exc:
        if inp.ref.is_local:
            raise  # local errors already name the folder
        message = str(exc)
        if line_path is None:
            line_path = ("models", inp.index) if inp.listed else ("base_model",)
        if label is None:
            label = "base_model" if not inp.listed else f"models[{inp.index}]"
        if inp.ref.path not in message:
            label += f" ({inp.ref.display})"
        raise MergeError(f"{recipe.locator.at(line_path, label)}: {message}",
                         exit_code=exc.exit_code) from None


def _plan(recipe: Recipe, inputs: list[InputModel], sources: list[CheckpointSource]
          ) -> MergePlan:
    """The ``models`` form: one job per tensor of the reference model."""
    method: Method = recipe.method
    spec = method.spec
    headers = [s.tensors() for s in sources]
    base_pos = next((i for i, inp in enumerate(inputs) if inp.is_base), None)
    reference_pos = base_pos if base_pos is not None else 0
    chosen = method.reference_input(recipe)
    if chosen is not None:
        reference_pos = chosen
    method_inputs = [i for i, inp in enumerate(inputs)
                     if not inp.is_base or spec.base_joins_inputs]
    if spec.base_joins_inputs:
        base_pos = None
    warnings: list[str] = []
    _check_names(recipe, inputs, headers, reference_pos, warnings)

    ref_header = headers[reference_pos]
    positions = layer_positions(list(ref_header),
                                config_num_layers(sources[reference_pos].config()))
    jobs: list[TensorJob] = []
    for name, info in ref_header.items():
        t = positions.get(name, 0.0)
        if not is_float_code(info.dtype):
            jobs.append(copy_job(recipe, name, info, t, reference_pos))
            continue
        participants = [p for p in method_inputs if name in headers[p]]
        jobs.append(merge_tensor_job(recipe, inputs, name, info, t, participants, base_pos,
                                     warnings))
    return MergePlan(recipe, method, inputs, sources, headers, reference_pos, base_pos,
                     method_inputs, jobs, compute_dtype_of(recipe), warnings=warnings)


def _finish_plan(plan: MergePlan, recipe: Recipe, inputs: list[InputModel],
                 sources: list[CheckpointSource], open_source: SourceOpener) -> MergePlan:
    """The tokenizer donor, the method's side inputs and its whole-plan check."""
    chosen = plan.reference_pos if recipe.slices is None and \
        recipe.method.reference_input(recipe) is not None else None
    plan.tokenizer = tokenizer_donor(recipe, inputs, sources, open_source, chosen)
    plan.unused = [s for s in sources if all(s is not t for t in plan.sources)]
    plan_vocab(plan)
    if not any(job.align for job in plan.jobs):
        _check_tokenizer_vocab(plan.tokenizer, plan.headers[plan.reference_pos])
    try:
        for label, folder in recipe.method.side_inputs(plan).items():
            if recipe.slices is not None:
                raise MergeError(f"{recipe.display}: {label}: side inputs (importance maps, "
                                 "masks) are keyed like one model and cannot be used with slices")
            plan.side[label] = open_side_input(folder, label)
        recipe.method.check_plan(plan)
    except BaseException:
        for src in plan.side.values():
            src.close()
        raise
    return plan


def open_side_input(folder: Any, label: str) -> CheckpointSource:
    """A local folder of safetensors keyed like a model (an importance map, a mask)."""
    path = Path(folder)
    if not path.is_dir():
        raise MergeError(f"{label}: no such folder")
    return LocalSource(path, label)


def _check_tokenizer_vocab(donor: CheckpointSource, ref_header: dict[str, TensorInfo]) -> None:
    """The tokenizer donor's vocab_size must match the output embedding rows."""
    embed = next((i for n, i in ref_header.items() if n.endswith("embed_tokens.weight")), None)
    config = donor.config() or {}
    vocab = config.get("vocab_size")
    if embed is not None and isinstance(vocab, int) and embed.shape and vocab != embed.shape[0]:
        raise MergeError(f"tokenizer_source {donor.ref}: vocab_size {vocab} differs from the "
                         f"output embedding rows ({embed.shape[0]})")


def tokenizer_donor(recipe: Recipe, inputs: list[InputModel], sources: list[CheckpointSource],
                    open_source: SourceOpener, method_reference: int | None = None
                    ) -> CheckpointSource:
    """tokenizer_source if set (opened if it is not an input), else the method's reference
    model (``Method.reference_input``), else the base, else model 0."""
    want = recipe.tokenizer_source
    if want is None:
        if method_reference is not None:
            return sources[method_reference]
        return sources[next((i for i, inp in enumerate(inputs) if inp.is_base), 0)]
    for inp, src in zip(inputs, sources):
        if inp.ref.path == want.path and inp.ref.revision == want.revision:
            return src
    return open_input(recipe, open_source,
                      InputModel(ref=want, index=-1, is_base=False, entry_params={}),
                      ("tokenizer_source",), "tokenizer_source")
