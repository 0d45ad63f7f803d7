"""DELLA (Deep, Bhardwaj et al., 2024; docs/methods/della.md): MAGPRUNE's magnitude-ranked random
drop, rescaled by 1/p, then TIES' sum sign consensus (``della``) or task arithmetic
(``della_linear``).

The adapter of the task-vector form (``task_arithmetic.TaskVectorMethod``) with ``ops/della.py``
as its sparsifier. Each model's magnitude ranks are computed once per tensor (one row-wise sort
of |δ|, kept as int32); the draw is DARE's counter-based SplitMix64 stream (same key), so every
piece's mask depends only on (seed, model index, tensor name, flat index) and its rank.
``rescale: true`` divides each kept entry by its own p_j inside the sparsifier (no scalar
rescale step); ``"l1"`` is the shared L1 factor; ``false`` none.
"""

from __future__ import annotations

import torch

from mergekit_like.kernels.tiling import Scratch
from mergekit_like.methods.base import MethodSpec, ParamSpec, TensorTask
from mergekit_like.methods.breadcrumbs import whole_delta
from mergekit_like.methods.task_arithmetic import (TaskVectorMethod, TaskVectorSteps,
                                                   task_vector_params)
from mergekit_like.ops.della import epsilon_problem, magprune_piece_, magprune_ranks, rank_rows
from mergekit_like.ops.drop import SCALE_NONE, mask_key


class MagPrune:
    """One model's MAGPRUNE for one tensor: its draw key, d, ε, and the flat ranks r_j (int32
    when they fit). Has no ``fused_sparsifier``: the fused loops never run it."""

    def __init__(self, task: TensorTask, pos: int, density: float):
        self.key = mask_key(task.seed, task.input_indices[pos], task.name)
        self.density = density
        self.epsilon = float(task.model_params[pos]["epsilon"])
        self.divide = task.params["rescale"] is True
        self.m = rank_rows(task.shape)
        delta = whole_delta(task, task.inputs[pos]).view(task.shape)
        ranks = magprune_ranks(delta).reshape(-1)
        self.ranks = ranks.to(torch.int32) if self.m < 2**31 else ranks

    def apply(self, delta: torch.Tensor, offset: int, scratch: Scratch | None = None) -> None:
        magprune_piece_(delta, offset, self.key, self.ranks[offset:offset + delta.numel()],
                        self.m, self.density, self.epsilon, self.divide)


class _Della(TaskVectorMethod):
    sparsifier_kind = None        # depends on epsilon and rescale: never shared by grid points

    def check_tensor_params(self, name, model_params, params):
        for mp in model_params:
            problem = epsilon_problem(float(mp["density"]), float(mp["epsilon"]))
            if problem is not None:
                return f"{self.spec.name}: {problem} (tensor '{name}')"
        return None

    def make_sparsifier(self, task: TensorTask, pos: int, density: float, scratch: Scratch):
        return MagPrune(task, pos, density)

    def resolve_steps(self, task: TensorTask, models: list[int]) -> TaskVectorSteps:
        """The shared steps, except that ``rescale: true`` is the per-entry 1/p_j the sparsifier
        applies, so no scalar ÷ d follows it."""
        steps = super().resolve_steps(task, models)
        if task.params["rescale"] is True:
            steps.scales = [(SCALE_NONE, 1.0)] * len(steps.scales)
        return steps

    def _delta_keeper(self, task: TensorTask) -> torch.Tensor | None:
        return None               # Δ depends on epsilon, which the grid memo key does not hold


def _params(normalize: bool) -> tuple[ParamSpec, ...]:
    return task_vector_params(normalize=normalize, rescale=True, density_effective=True,
                              rescale_effective=True) \
        + (ParamSpec("epsilon", "float", 0.15, per_model=True),)


class Della(_Della):
    """MAGPRUNE, then the sum sign consensus; normalize and rescale default true."""

    spec = MethodSpec(name="della", params=_params(True), needs_base=True)
    consensus = True


class DellaLinear(_Della):
    """MAGPRUNE, then task arithmetic; normalize defaults false, rescale true."""

    spec = MethodSpec(name="della_linear", params=_params(False), needs_base=True)
    consensus = False
