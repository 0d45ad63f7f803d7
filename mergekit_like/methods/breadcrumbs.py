"""Model Breadcrumbs (Davari & Belilovsky, 2023; docs/methods/breadcrumbs.md): drop each task
vector's outliers and its smallest entries, then add (``breadcrumbs``) or let the survivors vote
on signs first (``breadcrumbs_ties``).

The adapter of the task-vector form (``task_arithmetic.TaskVectorMethod``) with the outlier trim
of ``ops/breadcrumbs.py`` as its sparsifier. The band needs a ranking of the whole tensor, so
each model's band is found once per tensor (two exact k-th-largest selections on |δ|) and
applied to every piece by its flat offset: the result does not depend on blocking, threads or
order. With inputs known finite the selections are the fused scans TIES uses and the band is
two thresholds (``kernels.breadcrumbs.band_tops``); otherwise a whole-tensor keep mask
(``kernels.breadcrumbs.outlier_keep``). Either way not a sort, and δ ⊙ keep is bit-identical
to the sort's (``outlier_keep_sorted``).
"""

from __future__ import annotations

import math

import torch

from mergekit_like.kernels import fused_cpu
from mergekit_like.kernels.tiling import Scratch, pieces
from mergekit_like.methods.base import MethodSpec, ParamSpec, TensorTask
from mergekit_like.methods.task_arithmetic import TaskVectorMethod, task_vector_params
from mergekit_like.kernels.breadcrumbs import band_piece_, band_tops, fused_band, outlier_keep
from mergekit_like.ops.breadcrumbs import apply_keep_
from mergekit_like.ops.task_vectors import task_vector


def whole_delta(task: TensorTask, x: torch.Tensor) -> torch.Tensor:
    """δ = x − b of the whole tensor, flat, in the compute dtype, converted exactly as the
    merge pass converts its pieces (``kernels.tiling.pieces``)."""
    out = torch.empty(task.numel, dtype=task.compute_dtype, device=task.device)
    for off, (b, xp) in pieces(task, [task.base, x]):
        task_vector(xp, b, out=out[off:off + b.numel()])
    return out


class OutlierTrim:
    """One model's breadcrumbs band for one tensor: with inputs known finite the two thresholds
    of ``kernels.breadcrumbs.band_tops`` (applied per piece), else the keep mask (flat bool,
    whole tensor) of ``outlier_keep``. The thresholds' form also runs in the fused loops
    (``fused_sparsifier``); the mask's does not (it is taken only when some |δ| is not finite,
    where δ·0 is NaN, whose bf16 spelling the loops do not match)."""

    def __init__(self, task: TensorTask, pos: int, density: float,
                 scratch: Scratch | None = None):
        gamma = float(task.model_params[pos]["gamma"])
        self.keep = self.tops = None
        if task.inputs_finite:
            tops = band_tops(task, task.inputs[pos], density, gamma,
                             scratch or Scratch(task.compute_dtype, task.device))
            if all(math.isfinite(t.value) for t in tops):
                self.tops = tops
                return
        self.keep = outlier_keep(whole_delta(task, task.inputs[pos]), density, gamma,
                                 workers=task.workers)

    def fused_sparsifier(self) -> fused_cpu.Band | None:
        return None if self.tops is None else fused_band(self.tops)

    def apply(self, delta: torch.Tensor, offset: int, scratch: Scratch | None = None) -> None:
        if self.tops is not None:
            band_piece_(delta, offset, self.tops, scratch)
            return
        apply_keep_(delta, self.keep[offset:offset + delta.numel()])


def gamma_problem(model_params: list[dict]) -> str | None:
    """γ is a fraction of the entries: refuse values outside [0, 1]."""
    for mp in model_params:
        gamma = float(mp["gamma"])
        if not 0.0 <= gamma <= 1.0:
            return (f"gamma {gamma:g} must be between 0 and 1 (the fraction of largest "
                    "entries dropped)")
    return None


class _Breadcrumbs(TaskVectorMethod):
    sparsifier_kind = None        # the mask depends on gamma too: never shared by grid points

    def check_tensor_params(self, name, model_params, params):
        problem = gamma_problem(model_params)
        return None if problem is None else f"{self.spec.name}: {problem} (tensor '{name}')"

    def make_sparsifier(self, task: TensorTask, pos: int, density: float, scratch: Scratch):
        return OutlierTrim(task, pos, density, scratch)

    def _delta_keeper(self, task: TensorTask) -> torch.Tensor | None:
        return None               # Δ depends on gamma, which the grid memo key does not hold


def _params() -> tuple[ParamSpec, ...]:
    return task_vector_params(normalize=False, rescale=False, density_effective=True,
                              rescale_effective=True) \
        + (ParamSpec("gamma", "float", 0.01, per_model=True),)


class Breadcrumbs(_Breadcrumbs):
    """Outlier trim, then task arithmetic (normalize and rescale default false)."""

    spec = MethodSpec(name="breadcrumbs", params=_params(), needs_base=True)
    consensus = False


class BreadcrumbsTies(_Breadcrumbs):
    """Outlier trim, then TIES' sum sign consensus (normalize and rescale default false)."""

    spec = MethodSpec(name="breadcrumbs_ties", params=_params(), needs_base=True)
    consensus = True
