"""What a merge method is, to the recipe validator and to the engine.

The paper's equations are pure functions on tensors in ``ops/`` (``ops/trim.py`` …), their fast
paths in ``kernels/`` (bit-equal to ops/); a method file (``methods/ties.py`` …) is the adapter:
a ``Method`` subclass that turns a ``TensorTask`` into calls of them:

* ``spec`` (a ``MethodSpec``) tells the recipe validator which parameters exist, their kinds,
  defaults, whether a base is needed and how many inputs are allowed;
* ``plan_outputs`` says which output tensors one reference tensor produces (default: itself);
  methods that emit extra tensors or several outputs (WEMoE, Twin) override it;
* ``merge`` turns one ``TensorTask`` (all inputs of one reference tensor, already read, in their
  stored dtype on the compute device) into ``{output name: tensor in its output dtype}``.

Inputs are handed over whole in their stored dtype; operators convert them to the compute dtype
block by block (``TensorTask.blocks`` / ``TensorTask.load``, rounding through the recipe dtype as
``TensorTask.load_rounding`` says), so a 50 M-element embedding never
exists as N float32 copies at once. Two-pass operators (TIES threshold, SLERP norms, DARE "l1")
make a statistics pass over the blocks first, then the merge pass.
"""

from __future__ import annotations

from typing import Any

import torch

from mergekit_like.io.shards import OutputSpec, output_key  # noqa: F401 - part of the method protocol
from mergekit_like.recipe.spec import PARAM_KINDS, REQUIRED, MethodSpec, ParamSpec  # noqa: F401
from mergekit_like.tensor_task import Block, TensorTask  # noqa: F401 - part of the method protocol


class Method:
    """Adapter of one merge method to the engine.

    The protocol is two members: ``spec`` (what a recipe may set, for the validator) and
    ``merge(task)`` (one reference tensor's outputs; most methods define ``merge_tensor`` and
    keep the default ``merge``). Everything else is an optional hook whose default does nothing,
    grouped below by the phase that calls it:

    ==============  =========================================================================
    recipe          ``check_recipe``, ``entry_keys``
    plan            ``reference_input``, ``side_inputs``, ``check_plan``,
                    ``check_tensor_params``, ``plan_outputs``
    merge           ``warm_up``, ``working_bytes``, ``io_bound``, ``span_parallel``
    write, verify   ``side_files``, ``card_extra``, ``card_title``, ``indexed_groups``,
                    ``output_folders``, ``check_output``
    ==============  =========================================================================
    """

    spec: MethodSpec

    def merge(self, task: TensorTask) -> dict[str, torch.Tensor]:
        """``{output key: tensor in its planned dtype}`` for one reference tensor."""
        return {task.name: self.merge_tensor(task)}

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- recipe (phase A) -------------------------------------------------------------------

    takes_slices: bool = True
    """False: the method merges whole models (data-driven ones), and refuses ``slices:``."""
    entry_keys: tuple[str, ...] = ()
    """Keys a ``models`` entry may hold besides model/parameters (twin's ``name``)."""

    def check_recipe(self, recipe: Any) -> None:
        """Phase-A checks of a recipe naming this method (raise MergeError, append warnings)."""

    # ---- plan (phase B, metadata only) -------------------------------------------------------

    def reference_input(self, recipe: Any) -> int | None:
        """Position in ``recipe.inputs`` of the reference model (tensor set, config.json,
        tokenizer), when it is not the usual base / first model (RCP: the reasoning model)."""
        return None

    def side_inputs(self, plan: Any) -> dict[str, Any]:
        """Folders keyed like the model that the merge reads per tensor beside the models
        (label → local path; RCP votes, masks). The plan opens them before ``check_plan``;
        each job's tensors of the same name reach the operator as ``TensorTask.side``."""
        return {}

    def check_plan(self, plan: Any) -> None:
        """Plan-time checks that need the inputs' configs or headers (raise MergeError)."""

    def check_tensor_params(self, name: str, model_params: list[dict[str, Any]],
                            params: dict[str, Any]) -> str | None:
        """Plan-time check of the resolved parameters of one tensor; a message means error."""
        return None

    def plan_outputs(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, *,
                     params: dict[str, Any] | None = None, inputs: list[Any] | None = None,
                     warn: Any = None) -> list[OutputSpec]:
        """Output tensors produced from reference tensor ``name`` (default: the tensor itself).
        ``params``: the method-wide parameters resolved for it; ``inputs``: the InputModels of
        its method inputs; ``warn(message)``: a plan warning (repeats are shown once)."""
        return [OutputSpec(name, shape, dtype)]

    # ---- merge ---------------------------------------------------------------------------------

    io_bound: bool = False
    """A few cheap passes per element: on CPU the engine then leaves one core to the reader
    thread instead of giving every core to the arithmetic (measured faster for linear and
    task arithmetic on 2 cores, slower for TIES and DARE)."""
    span_parallel: bool = False
    """The operator splits each tensor over ``TensorTask.workers`` threads itself (one span of
    rows each, single-threaded torch ops). On a small CPU this beats torch's intra-op threads,
    whose per-op barrier stalls whenever the reader thread takes a core."""

    def working_bytes(self, plan: Any) -> int:
        """Bytes the worst tensor's merge holds beyond its float32 blocks (RegMean's float64
        solve); added to the plan's peak memory estimate."""
        return 0

    def warm_up(self, device: torch.device) -> None:
        """Called once before a pass starts reading: may start background preparation (the
        task-vector methods load their compiled CPU loops while the first tensors are read)."""

    # ---- write and verify ----------------------------------------------------------------------

    card_title: str | None = None
    indexed_groups: tuple[str, ...] = ()
    """Output groups whose files the model's index lists too (WEMoE's ``router``); a method
    with any always writes the index, single shard included."""
    output_folders: tuple[str, ...] = ()
    """Sub-folders of an output holding this method's own weight files (Twin: ``twin``); the
    main ``verify`` leaves them to ``check_output``."""

    def side_files(self, plan: Any, reports: dict[str, dict]) -> dict[str, str]:
        """More files for the output (name → text), written after the standard side files
        (a name may replace one, e.g. README.md); ``reports``: tensor name → TensorTask.report."""
        return {}

    def card_extra(self, plan: Any, reports: dict[str, dict]) -> dict[str, Any] | None:
        """Settings listed under the method in the model card."""
        return None

    def check_output(self, folder: Any, *, read_data: bool = True,
                     allow_nonfinite: bool = False) -> Any:
        """``verify`` of what this method adds to an output folder (raise MergeError); None when
        ``folder`` holds nothing of this method's."""
        return None
