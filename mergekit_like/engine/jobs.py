"""The plan's data: one ``TensorJob`` per output tensor (its inputs, the tensor each input is
read from, resolved parameters, outputs) and the ``MergePlan`` that holds them with the opened
sources. ``merge_tensor_job`` resolves one floating tensor's parameters and outputs; both recipe
forms (plan.py: ``models``, slice_plan.py: ``slices``) build their jobs with it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mergekit_like.dtypes import is_float_code
from mergekit_like.errors import MergeError
from mergekit_like.io.source import CheckpointSource, TensorInfo
from mergekit_like.methods.base import Method, OutputSpec
from mergekit_like.recipe import InputModel, Recipe


@dataclass
class TensorJob:
    """One output tensor: its inputs, resolved parameters and the outputs it produces."""

    name: str  # the output tensor's name
    info: TensorInfo  # the reference input's header entry for it
    t: float  # layer position in [0, 1]
    merge: bool  # False: non-floating tensor, copied byte for byte from participants[0]
    participants: list[int]  # positions in plan.inputs of the method inputs holding this tensor
    model_params: list[dict[str, Any]]  # aligned with participants
    params: dict[str, Any]  # method-wide, resolved for this tensor
    outputs: list[OutputSpec]
    base: int | None = None  # position in plan.inputs of the base it is taken against
    reads: dict[int, str] = field(default_factory=dict)
    """position → the tensor read there when it is not ``name`` (a slice's source layer)."""
    align: str = ""
    """How the inputs' rows are aligned first (engine/vocab_plan.py): "" none, "vocab" by
    token to the output vocabulary, "common" the rows every model has."""

    def read_name(self, pos: int) -> str:
        return self.reads.get(pos, self.name)

    def read_positions(self) -> list[int]:
        """The inputs a merge job reads: its base, then each participant."""
        base = [self.base] if self.base is not None and self.base not in self.participants else []
        return base + list(self.participants)

    def read_bytes(self, plan: "MergePlan") -> int:
        if not self.merge:
            return self.info.nbytes
        reads = [plan.tensor_info(p, self.read_name(p)).nbytes for p in self.read_positions()]
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
    tokenizer: CheckpointSource | None = None  # the tokenizer donor (may be one of sources)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the method reports once the output is complete (printed after "wrote OUT")."""
    side: dict[str, CheckpointSource] = field(default_factory=dict)
    """Side inputs (``Method.side_inputs``) by label, read per tensor like the models."""
    config: dict[str, Any] | None = None
    """The output's config.json when it is not the reference's (slices: the stacked one)."""
    layer_map: list[str] = field(default_factory=list)
    """Lines describing which source layers make each output layer (slices; --dry-run)."""
    vocab: Any = None
    """``engine.vocab.VocabPlan`` when the rows of per-token tensors are aligned by token."""
    chat_template: str | None = None
    """The chat template to write into the output's tokenizer files (None: keep theirs)."""
    unused: list[CheckpointSource] = field(default_factory=list)
    """Opened sources no job reads (a base_model no slice lists), closed with the plan."""

    @property
    def reference(self) -> CheckpointSource:
        return self.sources[self.reference_pos]

    def close(self) -> None:
        opened = [*self.sources, self.tokenizer, *self.side.values(), *self.unused]
        for s in {id(s): s for s in opened if s is not None}.values():
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
        return (reads[0] + (reads[1] if len(reads) > 1 else 0) + 2 * outs + working
                + self.method.working_bytes(self))



def compute_dtype_of(recipe: Recipe) -> torch.dtype:
    """float64 when the recipe loads in float64, else float32."""
    return torch.float64 if recipe.dtype == torch.float64 else torch.float32


def output_dtype(recipe: Recipe, info: TensorInfo) -> torch.dtype:
    if not is_float_code(info.dtype):
        return info.torch_dtype
    return recipe.out_dtype or recipe.dtype or info.torch_dtype



def merge_tensor_job(recipe: Recipe, inputs: list[InputModel], name: str, info: TensorInfo,
                     t: float, participants: list[int], base: int | None,
                     warnings: list[str], reads: dict[int, str] | None = None) -> TensorJob:
    """The job of one floating tensor ``name``: per-model parameters of each participant
    (filters matched against the tensor it is read from, as mergekit's planner does),
    method-wide ones (against ``name``), the method's check and its planned outputs."""
    method = recipe.method
    spec = method.spec
    reads = reads or {}
    model_params = [
        {p.name: recipe.model_param(p.name, inputs[pos], reads.get(pos, name), t)
         for p in spec.params if p.per_model}
        for pos in participants]
    params = {p.name: recipe.method_param(p.name, name, t)
              for p in spec.params if not p.per_model}
    problem = method.check_tensor_params(name, model_params, params)
    if problem:
        raise MergeError(f"{recipe.display}: {problem}")
    outputs = method.plan_outputs(name, info.shape, output_dtype(recipe, info), params=params,
                                  inputs=[inputs[p] for p in participants], warn=warnings.append)
    return TensorJob(name, info, t, True, participants, model_params, params, outputs, base,
                     dict(reads))


def copy_job(recipe: Recipe, name: str, info: TensorInfo, t: float, pos: int,
             reads: dict[int, str] | None = None) -> TensorJob:
    """A non-floating tensor, copied byte for byte from the input at ``pos``."""
    return TensorJob(name, info, t, False, [pos], [], {},
                     [OutputSpec(name, info.shape, info.torch_dtype)], None, reads or {})
