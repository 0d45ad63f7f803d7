"""Phase B of validation and the merge plan: which output tensors, from which inputs, with which
resolved parameters. Reads metadata only (config.json, index, safetensors headers).

Everything that can be wrong with the inputs (a missing tensor, a shape mismatch, a parameter
with no value for some tensor) is found here, before any weight byte is read or any output byte
written.
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mergekit_like.dtypes import is_float_code
from mergekit_like.errors import MergeError
from mergekit_like.io.local import LocalSource
from mergekit_like.io.source import CheckpointSource, TensorInfo
from mergekit_like.methods.base import Method, OutputSpec
from mergekit_like.recipe import InputModel, Recipe
from mergekit_like.recipe.params import layer_positions

SourceOpener = Callable[[InputModel], CheckpointSource]


@dataclass
class TensorJob:
    """One reference tensor: its inputs, resolved parameters and the outputs it produces."""

    name: str
    info: TensorInfo  # the reference model's header entry
    t: float  # layer position in [0, 1]
    merge: bool  # False: non-floating tensor, copied byte for byte from the reference
    participants: list[int]  # positions in plan.inputs of the method inputs holding this tensor
    model_params: list[dict[str, Any]]  # aligned with participants
    params: dict[str, Any]  # method-wide, resolved for this tensor
    outputs: list[OutputSpec]

    def read_bytes(self, plan: "MergePlan") -> int:
        if not self.merge:
            return self.info.nbytes
        reads = [plan.tensor_info(p, self.name).nbytes for p in self.participants]
        if plan.base_pos is not None and plan.base_pos not in self.participants:
            reads.append(plan.tensor_info(plan.base_pos, self.name).nbytes)
        reads += [src.tensors()[self.name].nbytes for src in plan.side.values()
                  if self.name in src.tensors()]
        return sum(reads)


@dataclass
class MergePlan:
    recipe: Recipe
    method: Method
    inputs: list[InputModel]
    sources: list[CheckpointSource]
    headers: list[dict[str, TensorInfo]]
    reference_pos: int
    base_pos: int | None  # position in inputs of the base (None when the method takes none)
    method_inputs: list[int]  # positions in inputs the method merges (base excluded unless it joins)
    jobs: list[TensorJob]
    compute_dtype: torch.dtype
    tokenizer: CheckpointSource  # the tokenizer_source donor (may be one of sources)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the method reports once the output is complete (printed after "wrote OUT")."""
    side: dict[str, CheckpointSource] = field(default_factory=dict)
    """Side inputs (``Method.side_inputs``) by label, read per tensor like the models."""

    @property
    def reference(self) -> CheckpointSource:
        return self.sources[self.reference_pos]

    def close(self) -> None:
        for s in {id(s): s for s in [*self.sources, self.tokenizer, *self.side.values()]}.values():
            s.close()

    def tensor_info(self, pos: int, name: str) -> TensorInfo:
        return self.headers[pos][name]

    @property
    def outputs(self) -> list[OutputSpec]:
        return [o for job in self.jobs for o in job.outputs]

    @property
    def output_bytes(self) -> int:
        return sum(math.prod(o.shape) * o.dtype.itemsize for o in self.outputs)

    @property
    def read_bytes(self) -> int:
        return sum(job.read_bytes(self) for job in self.jobs)

    def peak_memory_estimate(self, block_elems: int) -> int:
        """Host bytes at the worst tensor: its inputs and the next one's (prefetch), the output
        and one queued in the writer, and float32 blocks of working set (inputs + 4 scratch)."""
        if not self.jobs:
            return 0
        reads = sorted((job.read_bytes(self) for job in self.jobs), reverse=True)
        outs = max(math.prod(o.shape) * o.dtype.itemsize for o in self.outputs)
        width = len(self.method_inputs) + 5
        working = min(block_elems, max(j.info.numel for j in self.jobs)) * 4 * width
        return reads[0] + (reads[1] if len(reads) > 1 else 0) + 2 * outs + working



def _num_layers(config: dict[str, Any] | None) -> int | None:
    if not config:
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    text = config.get("text_config")
    return _num_layers(text) if isinstance(text, dict) else None


def _output_dtype(recipe: Recipe, info: TensorInfo) -> torch.dtype:
    if not is_float_code(info.dtype):
        return info.torch_dtype
    return recipe.out_dtype or recipe.dtype or info.torch_dtype


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
            if other.shape != info.shape:
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
        return _plan(recipe, inputs, sources, open_source)
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


def _plan(recipe: Recipe, inputs: list[InputModel], sources: list[CheckpointSource],
          open_source: SourceOpener) -> MergePlan:
    method: Method = recipe.method
    spec = method.spec
    if recipe.vocab_policy != "error":
        raise MergeError(f"{recipe.where('vocab_policy')}: vocab_policy '{recipe.vocab_policy}' "
                         "is not supported yet; give every model the same vocabulary size")
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
    positions = layer_positions(list(ref_header), _num_layers(sources[reference_pos].config()))
    compute_dtype = torch.float64 if recipe.dtype == torch.float64 else torch.float32

    jobs: list[TensorJob] = []
    for name, info in ref_header.items():
        t = positions.get(name, 0.0)
        if not is_float_code(info.dtype):
            jobs.append(TensorJob(name, info, t, False, [reference_pos], [], {},
                                  [OutputSpec(name, info.shape, info.torch_dtype)]))
            continue
        participants = [p for p in method_inputs if name in headers[p]]
        model_params = [
            {p.name: recipe.model_param(p.name, inputs[pos], name, t)
             for p in spec.params if p.per_model}
            for pos in participants]
        params = {p.name: recipe.method_param(p.name, name, t)
                  for p in spec.params if not p.per_model}
        problem = method.check_tensor_params(name, model_params, params)
        if problem:
            raise MergeError(f"{recipe.display}: {problem}")
        outputs = method.plan_outputs(name, info.shape, _output_dtype(recipe, info),
                                      params=params, inputs=[inputs[p] for p in participants],
                                      warn=warnings.append)
        jobs.append(TensorJob(name, info, t, True, participants, model_params, params, outputs))

    donor = tokenizer_donor(recipe, inputs, sources, open_source, chosen)
    _check_tokenizer_vocab(donor, ref_header)
    plan = MergePlan(recipe, method, inputs, sources, headers, reference_pos, base_pos,
                     method_inputs, jobs, compute_dtype, donor, warnings)
    try:
        for label, folder in method.side_inputs(plan).items():
            plan.side[label] = open_side_input(folder, label)
        method.check_plan(plan)
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
