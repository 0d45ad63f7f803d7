"""The plan of a ``slices`` recipe (docs/recipe.md §8): each slice's sources become inputs of
their own (the same opened model may appear in several slices, each time with that slice's
parameters), and one job per output tensor names the tensor each input is read from.

Output layer j of slice s reads layer ``start_i + o`` of each source i (``layer_map``); the
embeddings are merged from the first slice's sources and the final norm and head from the
last slice's, as mergekit's planner does. A source layer used by two slices is read twice
(each slice's merge needs it in its own step; keeping it in memory would break the bound).
"""

from __future__ import annotations

from mergekit_like.dtypes import is_float_code
from mergekit_like.engine.jobs import (MergePlan, TensorJob, compute_dtype_of, copy_job,
                                       merge_tensor_job)
from mergekit_like.engine.layer_map import (OutputLayer, layer_name, layer_tensors, main_stack,
                                            non_layer_split, output_layers, stacked_config)
from mergekit_like.engine.vocab_plan import rows_may_differ
from mergekit_like.errors import MergeError
from mergekit_like.io.layers import config_num_layers, layer_stacks
from mergekit_like.io.source import CheckpointSource, TensorInfo
from mergekit_like.recipe import InputModel, Recipe


class _Slice:
    """One slice's view (a models-form recipe) and where its inputs sit in the plan."""

    def __init__(self, recipe: Recipe, k: int, offset: int):
        self.k = k
        self.spec = recipe.slices[k]
        self.view = recipe.slice_view(k)
        self.offset = offset
        joins = recipe.spec.base_joins_inputs
        self.positions = [offset + i for i, inp in enumerate(self.view.inputs)
                          if joins or not inp.is_base]
        base = next((i for i, inp in enumerate(self.view.inputs) if inp.is_base), None)
        self.base = None if base is None or joins else offset + base
        self.reference = offset + (base if base is not None else 0)

    def start(self, pos: int) -> int:
        return self.spec.sources[pos - self.offset].start

    def read_positions(self) -> list[int]:
        return ([self.base] if self.base is not None else []) + self.positions


def plan_slices(recipe: Recipe, inputs: list[InputModel], sources: list[CheckpointSource]
                ) -> MergePlan:
    """Phase B of a slices recipe: the layer map, each source's layers checked against its
    model, one job per output tensor, and the stacked config.json."""
    by_key = {inp.ref.key: src for inp, src in zip(inputs, sources)}
    slices: list[_Slice] = []
    plan_inputs: list[InputModel] = []
    for k in range(len(recipe.slices)):
        slices.append(_Slice(recipe, k, len(plan_inputs)))
        plan_inputs += slices[-1].view.inputs
    plan_sources = [by_key[inp.ref.key] for inp in plan_inputs]
    headers = [s.tensors() for s in plan_sources]
    first, last = slices[0], slices[-1]
    prefix = main_stack(list(headers[first.reference]), plan_inputs[first.reference].ref.display)
    _check_ranges(recipe, slices, plan_inputs, headers, prefix)

    warnings: list[str] = []
    pre, _ = non_layer_split(list(headers[first.reference]))
    _, post = non_layer_split(list(headers[last.reference]))
    jobs = [_job(recipe, first, plan_inputs, headers, n, {}, 0.0, warnings) for n in pre]
    layers = output_layers([sl.spec.num_layers for sl in slices])
    for layer in layers:
        jobs += _layer_jobs(recipe, slices[layer.slice_index], plan_inputs, headers, prefix,
                            layer, warnings)
    jobs += [_job(recipe, last, plan_inputs, headers, n, {}, 0.0, warnings) for n in post]

    plan = MergePlan(recipe, recipe.method, plan_inputs, plan_sources, headers, first.reference,
                     None, sorted({p for sl in slices for p in sl.positions}), jobs,
                     compute_dtype_of(recipe),
                     warnings=warnings)
    plan.config = _output_config(recipe, slices, layers, plan_sources, by_key)
    plan.layer_map = _describe(slices, layers)
    return plan


def _check_ranges(recipe: Recipe, slices: list[_Slice], inputs: list[InputModel],
                  headers: list[dict[str, TensorInfo]], prefix: str) -> None:
    """Each source's [start, stop) lies within its model's layer stack."""
    for sl in slices:
        for src in sl.spec.sources:
            n = layer_stacks(headers[sl.offset + src.inp.index]).get(prefix, 0)
            if src.stop > n:
                where = recipe.locator.at(src.inp.where + ("layer_range",),
                                          f"slices[{sl.k}].sources[{src.inp.index}] "
                                          f"({src.inp.ref.display})")
                raise MergeError(f"{where}: layer_range [{src.start}, {src.stop}] goes past the "
                                 f"model's {n} layers ('{prefix}')")


def _layer_jobs(recipe: Recipe, sl: _Slice, inputs: list[InputModel],
                headers: list[dict[str, TensorInfo]], prefix: str, layer: OutputLayer,
                warnings: list[str]) -> list[TensorJob]:
    """The jobs of output layer ``layer``: each tensor of the reference source's layer, read
    from every source's matching layer, written under the output layer's index."""
    ref_layer = sl.start(sl.reference) + layer.offset
    jobs = []
    for suffix in layer_tensors(list(headers[sl.reference]), prefix, ref_layer):
        reads = {pos: layer_name(prefix, sl.start(pos) + layer.offset, suffix)
                 for pos in {*sl.read_positions(), sl.reference}}
        out = layer_name(prefix, layer.index, suffix)
        jobs.append(_job(recipe, sl, inputs, headers, out, reads, layer.t, warnings))
    return jobs


def _job(recipe: Recipe, sl: _Slice, inputs: list[InputModel],
         headers: list[dict[str, TensorInfo]], name: str, reads: dict[int, str], t: float,
         warnings: list[str]) -> TensorJob:
    """One output tensor of slice ``sl``: its sources checked (present, same shape, kind)."""
    info = headers[sl.reference][reads.get(sl.reference, name)]
    if not is_float_code(info.dtype):
        return copy_job(recipe, name, info, t, sl.reference, reads)
    participants = []
    for pos in sl.read_positions():
        src_name = reads.get(pos, name)
        other = headers[pos].get(src_name)
        who = f"slices[{sl.k}].sources[{pos - sl.offset}] ({inputs[pos].ref.display})"
        if other is None:
            if recipe.on_missing_tensor == "skip" and pos != sl.base:
                warnings.append(f"{who}: lacks '{src_name}', merged without it")
                continue
            raise MergeError(f"{who} lacks '{src_name}' (needed for output '{name}')")
        if (other.shape != info.shape and not rows_may_differ(src_name, info, other)) \
                or is_float_code(other.dtype) != is_float_code(info.dtype):
            raise MergeError(f"{who}: tensor '{src_name}' is {other.dtype} {list(other.shape)}, "
                             f"the slice's reference has {info.dtype} {list(info.shape)}")
        if pos != sl.base:
            participants.append(pos)
    return merge_tensor_job(sl.view, inputs, name, info, t, participants, sl.base, warnings,
                            reads)


def _output_config(recipe: Recipe, slices: list[_Slice], layers: list[OutputLayer],
                   sources: list[CheckpointSource], by_key: dict) -> dict | None:
    """The base's config (else the first source's) with the stacked layer count and per-layer
    lists taken from each output layer's source model."""
    donor = by_key[recipe.base.key] if recipe.base is not None else sources[slices[0].reference]
    config = donor.config()
    if config is None:
        return None
    per_layer, counts = [], []
    for layer in layers:
        sl = slices[layer.slice_index]
        src_config = sources[sl.reference].config()
        per_layer.append((src_config, sl.start(sl.reference) + layer.offset))
        counts.append(config_num_layers(src_config) or 0)
    return stacked_config(config, per_layer, counts)


def _describe(slices: list[_Slice], layers: list[OutputLayer]) -> list[str]:
    """One line per slice: output layers [a, b) ← each source's layers."""
    lines, first = [], 0
    for sl in slices:
        n = sl.spec.num_layers
        srcs = ", ".join(f"{s.inp.ref.display}[{s.start}:{s.stop}]" for s in sl.spec.sources)
        lines.append(f"layers {first}–{first + n - 1} ← slice {sl.k}: {srcs}")
        first += n
    assert first == len(layers)
    return lines
