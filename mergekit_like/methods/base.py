"""What a merge method is, to the recipe validator and to the engine.

A method file (``methods/ties.py`` …) holds the paper's equations as small pure functions on
tensors and, at its bottom, one ``Method`` subclass that adapts them to the engine:

* ``spec`` (a ``MethodSpec``) tells the recipe validator which parameters exist, their kinds,
  defaults, whether a base is needed and how many inputs are allowed;
* ``plan_outputs`` says which output tensors one reference tensor produces (default: itself);
  methods that emit extra tensors or several outputs (WEMoE, Twin) override it;
* ``merge`` turns one ``TensorTask`` (all inputs of one reference tensor, already read, in their
  stored dtype on the compute device) into ``{output name: tensor in its output dtype}``.

Inputs are handed over whole in their stored dtype; operators convert them to the compute dtype
block by block (``TensorTask.blocks`` / ``TensorTask.load``), so a 50 M-element embedding never
exists as N float32 copies at once. Two-pass operators (TIES threshold, SLERP norms, DARE "l1")
make a statistics pass over the blocks first, then the merge pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from mergekit_like.io.shards import OutputSpec, output_key  # noqa: F401 - part of the method protocol
from mergekit_like.recipe.spec import PARAM_KINDS, REQUIRED, MethodSpec, ParamSpec  # noqa: F401


@dataclass(frozen=True)
class Block:
    """A contiguous run of rows (dim 0) of a tensor; ``flat_offset`` is the row-major index of its
    first element in the whole tensor (DARE keys its mask on the global flat index)."""

    rows: slice
    flat_offset: int
    numel: int


@dataclass
class TensorTask:
    """All inputs of one reference tensor, ready to merge.

    ``base`` and ``inputs`` are whole tensors in their stored dtype on the compute device.
    ``inputs[i]`` is None when that model lacks the tensor (``on_missing_tensor: skip``).
    ``model_params[i]`` are the per-model parameters resolved for this tensor and layer;
    ``params`` the method-wide ones. ``input_indices[i]`` is the model's 0-based position in
    ``models`` as written (an appended base gets ``len(models)``).
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    compute_dtype: torch.dtype
    load_dtype: torch.dtype | None
    base: torch.Tensor | None
    inputs: list[torch.Tensor | None]
    input_indices: list[int]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    seed: int = 0
    t: float = 0.0
    """The tensor's layer position in [0, 1] (for settings a method resolves itself)."""
    input_extra: list[dict[str, Any]] = field(default_factory=list)
    """Each input's own recipe entry keys (``Method.entry_keys``: twin's task ``name``)."""
    block_elems: int = 1 << 22
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workers: int = 1
    """Threads an operator may split its pieces over (``tiling.spans``); the engine sets it
    on CPU for ``Method.span_parallel`` methods and runs torch ops single-threaded then."""
    report: dict | None = None
    """An operator may put JSON-able facts about this tensor here (Twin: the energy kept);
    the engine hands every tensor's report to ``Method.side_files`` at the end."""
    side: dict[str, torch.Tensor] = field(default_factory=dict)
    """This tensor's entry in each side input (``Method.side_inputs``) that has it, by label, in
    its stored dtype on the compute device (RCP: the domain model's votes)."""
    inputs_finite: bool = False
    """The engine checked every input free of NaN/Inf (no --allow-nonfinite)."""
    memo: dict | None = None
    """Shared by the points of a grid pass for this tensor only: operators may cache results
    that depend on the inputs and their own key alone (TIES thresholds), never the output."""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def blocks(self) -> Iterator[Block]:
        """Row blocks of at most ~block_elems elements (a 0-d or 1-row tensor is one block)."""
        if len(self.shape) == 0 or self.numel == 0:
            yield Block(slice(None), 0, self.numel)
            return
        rows = self.shape[0]
        row_elems = max(1, self.numel // rows)
        step = max(1, self.block_elems // row_elems)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            yield Block(slice(start, stop), start * row_elems, (stop - start) * row_elems)

    def load(self, t: torch.Tensor, block: Block) -> torch.Tensor:
        """Rows of ``t`` cast to the recipe ``dtype`` (rounding as mergekit loads) and then to the
        compute dtype. Returns a new tensor, never a view of ``t``."""
        part = t if len(self.shape) == 0 else t[block.rows]
        if self.load_dtype not in (None, part.dtype, self.compute_dtype):
            part = part.to(self.load_dtype)  # rounding as mergekit loads (no-op if = compute)
        return part.to(self.compute_dtype, copy=True)

    def empty_output(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.out_dtype, device=self.device)

    def store(self, out: torch.Tensor, block: Block, value: torch.Tensor) -> None:
        """Cast ``value`` (compute dtype) once to the output dtype into ``out``'s rows."""
        if len(self.shape) == 0:
            out.copy_(value.reshape(()))
        else:
            out[block.rows].copy_(value.reshape(out[block.rows].shape))


class Method:
    """Adapter of one merge method to the engine. Subclasses set ``spec`` and ``merge_tensor``."""

    spec: MethodSpec
    io_bound: bool = False
    """A few cheap passes per element: on CPU the engine then leaves one core to the reader
    thread instead of giving every core to the arithmetic (measured faster for linear and
    task arithmetic on 2 cores, slower for TIES and DARE)."""
    span_parallel: bool = False
    """The operator splits each tensor over ``TensorTask.workers`` threads itself (one span of
    rows each, single-threaded torch ops). On a small CPU this beats torch's intra-op threads,
    whose per-op barrier stalls whenever the reader thread takes a core."""

    entry_keys: tuple[str, ...] = ()
    """Keys a ``models`` entry may hold besides model/parameters (twin's ``name``)."""
    card_title: str | None = None
    indexed_groups: tuple[str, ...] = ()
    """Output groups whose files the model's index lists too (WEMoE's ``router``); a method
    with any always writes the index, single shard included."""

    def plan_outputs(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, *,
                     params: dict[str, Any] | None = None, inputs: list[Any] | None = None,
                     warn: Any = None) -> list[OutputSpec]:
        """Output tensors produced from reference tensor ``name`` (default: the tensor itself).
        ``params``: the method-wide parameters resolved for it; ``inputs``: the InputModels of
        its method inputs; ``warn(message)``: a plan warning (repeats are shown once)."""
        return [OutputSpec(name, shape, dtype)]

    def reference_input(self, recipe: Any) -> int | None:
        """Position in ``recipe.inputs`` of the reference model (tensor set, config.json,
        tokenizer), when it is not the usual base / first model (RCP: the reasoning model)."""
        return None

    def side_inputs(self, plan: Any) -> dict[str, Any]:
        """Folders keyed like the model that the merge reads per tensor beside the models
        (label → local path; RCP votes, masks). The plan opens them before ``check_plan``;
        each job's tensors of the same name reach the operator as ``TensorTask.side``."""
        return {}

    def warm_up(self, device: torch.device) -> None:
        """Called once before a pass starts reading: may start background preparation (the
        task-vector methods load their compiled CPU loops while the first tensors are read)."""

    def check_plan(self, plan: Any) -> None:
        """Plan-time checks that need the inputs' configs or headers (raise MergeError)."""

    def card_extra(self, plan: Any, reports: dict[str, dict]) -> dict[str, Any] | None:
        """Settings listed under the method in the model card."""
        return None

    def check_tensor_params(self, name: str, model_params: list[dict[str, Any]],
                            params: dict[str, Any]) -> str | None:
        """Plan-time check of the resolved parameters of one tensor; a message means error."""
        return None

    def side_files(self, plan: Any, reports: dict[str, dict]) -> dict[str, str]:
        """More files for the output (name → text), written after the standard side files
        (a name may replace one, e.g. README.md); ``reports``: tensor name → TensorTask.report."""
        return {}

    output_folders: tuple[str, ...] = ()
    """Sub-folders of an output holding this method's own weight files (Twin: ``twin``); the
    main ``verify`` leaves them to ``check_output``."""

    def check_output(self, folder: Any, *, read_data: bool = True,
                     allow_nonfinite: bool = False) -> Any:
        """``verify`` of what this method adds to an output folder (raise MergeError); None when
        ``folder`` holds nothing of this method's."""
        return None

    def check_recipe(self, recipe: Any) -> None:
        """Phase-A checks of a recipe naming this method (raise MergeError, append warnings)."""

    def merge(self, task: TensorTask) -> dict[str, torch.Tensor]:
        return {task.name: self.merge_tensor(task)}

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
