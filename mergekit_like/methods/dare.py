"""DARE (Yu et al., "Language Models are Super Mario", ICML 2024): drop And REscale
(docs/methods/dare.md).

The adapter of the task-vector form (``task_arithmetic.TaskVectorMethod``) with the counter-based
random drop of ``ops/drop.py`` as its sparsifier: δ̂ = keep ⊙ δ·r, r = 1/d (``rescale: true``),
‖δ‖₁/‖keep⊙δ‖₁ (``"l1"``) or 1 (``false``). ``dare_ties`` then applies the sum sign consensus
of TIES without a second trim; ``dare_linear`` adds the task vectors.
"""

from __future__ import annotations

import torch

from mergekit_like.kernels import fused_cpu
from mergekit_like.kernels.tiling import Scratch
from mergekit_like.methods.base import MethodSpec, TensorTask
from mergekit_like.methods.task_arithmetic import TaskVectorMethod, task_vector_params
from mergekit_like.ops.drop import keep_threshold, mask_key, random_drop_


class RandomDrop:
    """DARE's random drop of one model's δ for one tensor (its mask key and density)."""

    def __init__(self, task: TensorTask, pos: int, density: float):
        self.key = mask_key(task.seed, task.input_indices[pos], task.name)
        self.density = density

    def apply(self, delta: torch.Tensor, offset: int, scratch: Scratch | None = None) -> None:
        random_drop_(delta, offset, self.key, self.density, scratch)

    def fused_sparsifier(self) -> fused_cpu.Drop:
        return fused_cpu.Drop(self.key, keep_threshold(self.density))


class _Dare(TaskVectorMethod):
    def make_sparsifier(self, task: TensorTask, pos: int, density: float, scratch: Scratch):
        return RandomDrop(task, pos, density)


class DareTies(_Dare):
    """DARE, then the sum sign consensus; normalize defaults to false (a weighted sum)."""

    spec = MethodSpec(
        name="dare_ties",
        params=task_vector_params(normalize=False, rescale=True, density_effective=True,
                                  rescale_effective=True),
        needs_base=True,
    )
    consensus = True


class DareLinear(_Dare):
    """DARE, then task arithmetic."""

    spec = MethodSpec(
        name="dare_linear",
        params=task_vector_params(normalize=False, rescale=True, density_effective=True,
                                  rescale_effective=True),
        needs_base=True,
    )
    consensus = False
