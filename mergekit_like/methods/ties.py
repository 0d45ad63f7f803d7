"""TIES-merging (Yadav et al., NeurIPS 2023; docs/methods/ties.md): trim, elect sign, disjoint
merge.

The adapter of the task-vector form (``task_arithmetic.TaskVectorMethod``) with the magnitude
trim of ``ops/trim.py`` as its sparsifier and the sign consensus of ``ops/sign_consensus.py``.
Each model's v_k and tie cutoff come from the exact streaming search of
``kernels/kth_largest.py`` (ties.md §3), then ``ops.trim.trim_piece_`` trims every piece.
"""

from __future__ import annotations

import torch

from mergekit_like.errors import MergeError
from mergekit_like.kernels import fused_cpu
from mergekit_like.kernels.kth_largest import trim_threshold
from mergekit_like.kernels.tiling import Scratch
from mergekit_like.methods.base import MethodSpec, ParamSpec, TensorTask
from mergekit_like.methods.task_arithmetic import TaskVectorMethod, task_vector_params
from mergekit_like.ops.trim import next_float, trim_count, trim_piece_


class MagnitudeTrim:
    """The exact top-k trim of one model's δ for one tensor: k, v_k (``kth``) and the tie
    cutoff from one read pass over the pieces (more only on a bracket miss, +1 for a partial
    tie); ``below`` = the value just under v_k."""

    def __init__(self, task: TensorTask, pos: int, density: float, scratch: Scratch):
        self.k = trim_count(density, task.numel)
        self.kth, self.cutoff = trim_threshold(task, task.inputs[pos], task.base, self.k, scratch)
        self.below = next_float(self.kth.value, 0.0, task.compute_dtype)

    def apply(self, delta: torch.Tensor, offset: int, scratch: Scratch | None = None) -> None:
        trim_piece_(delta, offset, self.kth.value, self.cutoff, self.below)

    def fused_sparsifier(self) -> fused_cpu.Trim:
        return fused_cpu.Trim(self.kth.value, self.below, self.cutoff)


class Ties(TaskVectorMethod):
    """TIES: magnitude trim, sign election by sum, disjoint (weighted) mean."""

    spec = MethodSpec(
        name="ties",
        params=task_vector_params(normalize=True, rescale=False, density_effective=True,
                                  rescale_effective=True)
        + (ParamSpec("trim_scope", "choice", "tensor", choices=("tensor", "model")),),
        needs_base=True,
    )
    consensus = True
    sparsifier_kind = "magnitude_trim"

    def check_tensor_params(self, name, model_params, params):
        if params["trim_scope"] == "model":
            return "trim_scope: model is not supported yet"
        return None

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        if task.params["trim_scope"] == "model":
            raise MergeError("trim_scope: model is not supported yet")
        return super().merge_tensor(task)

    def make_sparsifier(self, task, pos, density, scratch):
        return MagnitudeTrim(task, pos, density, scratch)
