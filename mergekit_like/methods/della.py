"""DELLA (Deep, Bhardwaj et al., 2024; docs/methods/della.md): MAGPRUNE's magnitude-ranked random
drop, rescaled to the task vector's L1 norm, then TIES' sum sign consensus (``della``) or task arithmetic
(``della_linear``).

The adapter of the task-vector form (``task_arithmetic.TaskVectorMethod``) with ``ops/della.py``
as its sparsifier. Each model's keep mask is computed once per tensor (on CPU by a bucketed
rank of each row, ``kernels/della.py``; else the ranks of a row-wise sort of |δ|, kept as
int32); the draw is DARE's counter-based SplitMix64 stream (same key), so every
piece's mask depends only on (seed, model index, tensor name, flat index) and its rank.
``rescale: true`` is mergekit's rescale: the kept task vector is scaled back to the L1 norm it
had (the same as ``"l1"``); ``false`` none. The paper's per-entry 1/p_j is not used, so that
task-vector norms match mergekit's (docs/methods/della.md).
"""

from __future__ import annotations

import threading
from dataclasses import replace

import torch

from mergekit_like.kernels import della as fast
from mergekit_like.kernels import fused_cpu
from mergekit_like.kernels.tiling import BufferPool, Scratch
from mergekit_like.methods.base import MethodSpec, ParamSpec, TensorTask
from mergekit_like.methods.breadcrumbs import whole_delta
from mergekit_like.methods.task_arithmetic import TaskVectorMethod, task_vector_params
from mergekit_like.ops.della import epsilon_problem, magprune_piece_, magprune_ranks, rank_rows
from mergekit_like.ops.drop import l1_factor, mask_key


_MASKS = threading.local()


class MagPrune:
    """One model's MAGPRUNE for one tensor: its draw key, d, ε, and either its keep bits (flat
    bool, ``kernels.della.magprune``, when supported: ``divide`` is always false here; with
    ``l1``, the "l1" totals ‖δ‖₁, ‖keep⊙δ‖₁ from the same pass) or the flat ranks r_j (int32
    when they fit). The keep bits also run in the fused loops
    (``fused_sparsifier``)."""

    def __init__(self, task: TensorTask, pos: int, density: float, masks: BufferPool):
        self.key = mask_key(task.seed, task.input_indices[pos], task.name)
        self.density = density
        self.epsilon = float(task.model_params[pos]["epsilon"])
        self.divide = False       # rescale is the shared L1 factor (mergekit's rule)
        self.m = rank_rows(task.shape)
        self.keep = self.ranks = self.l1 = None
        if fast.supported(task):  # the keep bits themselves, bit-equal to the ranks' draw
            made = fast.magprune(task, task.inputs[pos], self.key, density, self.epsilon,
                                 l1=task.params["rescale"] == "l1",
                                 out=masks.take(task.numel, torch.bool))
            self.keep, self.l1 = made
            return
        delta = whole_delta(task, task.inputs[pos]).view(task.shape)
        ranks = magprune_ranks(delta).reshape(-1)
        self.ranks = ranks.to(torch.int32) if self.m < 2**31 else ranks

    def fused_sparsifier(self) -> fused_cpu.Keep | None:
        return None if self.keep is None else fused_cpu.Keep(self.keep)

    def apply(self, delta: torch.Tensor, offset: int, scratch: Scratch | None = None) -> None:
        if self.keep is not None:
            delta.mul_(self.keep[offset:offset + delta.numel()])
            return
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
        return MagPrune(task, pos, density, self._masks())

    @staticmethod
    def _masks() -> BufferPool:
        """This thread's keep-mask buffers, reused tensor after tensor by every DELLA point of
        a pass (a merge's tensors, and its sparsifiers, are made on the thread that calls
        ``merge_tensor``)."""
        pool = getattr(_MASKS, "pool", None)
        if pool is None:
            pool = _MASKS.pool = BufferPool()
        return pool

    def warm_up(self, device: torch.device) -> None:
        super().warm_up(device)
        if device.type == "cpu":
            fast.warm_up()

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        """``rescale: true`` runs as mergekit's L1 rescale (``"l1"``)."""
        if task.params["rescale"] is True:
            task = replace(task, params={**task.params, "rescale": "l1"})
        try:
            return super().merge_tensor(task)
        finally:                  # the output is computed: no mask of this tensor is used again
            self._masks().release()

    def _delta_keeper(self, task: TensorTask) -> torch.Tensor | None:
        return None               # Δ depends on epsilon, which the grid memo key does not hold

    def _l1_factors(self, task, xs, sparsifiers):
        """The "l1" factors from the totals each ``MagPrune`` summed while it ranked (the same
        sums as the adapter's own pass, without reading the inputs again), else that pass."""
        if not all(sp is None or sp.l1 is not None for sp in sparsifiers):
            return super()._l1_factors(task, xs, sparsifiers)
        return [None if sp is None else l1_factor(*sp.l1) for sp in sparsifiers]


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
