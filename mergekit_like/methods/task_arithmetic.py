"""Task arithmetic (Ilharco et al., ICLR 2023) and the engine adapter of the task-vector form that
TIES and DARE share (docs/methods/task_arithmetic.md §1)::

    δ̂_i = keep_i ⊙ rescale(sparsify(δ_i; d_i)) ;  W_i = w_i·δ̂_i ;  out = b + λ·Δ(W, w)

The math is ``ops/``: ``task_vectors`` (δ, Σ, D, b + λ·Δ), ``sign_consensus``, ``trim`` and
``drop`` (the sparsifiers and rescale), ``masks`` (keep_i, applied by ``methods/masks.py``).
``TaskVectorMethod`` resolves each model's steps once per tensor, then runs them over the
tensor's row spans in parallel: as torch steps on pieces, or as one fused CPU loop per span
(``kernels/fused_cpu.py``) when ``fused_loops_apply`` says that gives the same bits. It is
subclassed by ``ties.py`` and ``dare.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch

from mergekit_like.kernels import fused_cpu
from mergekit_like.kernels.tiling import (Scratch, exact_total, models_against_base, pieces,
                                          row_elems, row_sums, run_parallel, spans)
from mergekit_like.methods import masks
from mergekit_like.methods.base import REQUIRED, Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.ops.drop import SCALE_NONE, l1_factor, rescale_, rescale_step
from mergekit_like.ops.task_vectors import apply_delta_, merged_delta_, task_vector

DELTA_MEMO_BYTES = 256 * 10**6
"""Most bytes of Δ a grid pass keeps per tensor for points that differ only in λ."""


class Sparsifier(Protocol):
    """Zeroes the dropped entries of a flat δ piece in place; ``offset`` is its global flat
    index; temporaries come from the caller's ``scratch``. Must not depend on how the tensor
    is cut into pieces, and may be called from several threads at once. ``fused_sparsifier``
    (optional) gives its form for the fused loops (None: none for this tensor)."""

    def apply(self, delta: torch.Tensor, offset: int, scratch: Scratch | None = None) -> None: ...


@dataclass
class TaskVectorSteps:
    """The resolved steps of one tensor's merge, per model that has it (list index j ↔
    ``task.inputs[models[j]]``)."""

    models: list[int]
    weights: list[float]
    densities: list[float]
    sparsifiers: list[Sparsifier | None]
    """None: δ_j is not sparsified (d ≥ 1, or a method without a sparsifier)."""
    scales: list[tuple[int, float]]
    """The rescale of each sparsified δ̂_j: (mode, value) of ``ops.drop.rescale_``."""
    masking: masks.TensorMasks | None
    normalize: bool
    lam: float
    rescale: bool | str


def fused_loops_apply(task: TensorTask, xs: list[torch.Tensor], out: torch.Tensor,
                      steps: TaskVectorSteps) -> bool:
    """Whether the adapter runs ``fused_cpu.merge_span`` (one pass over memory per span instead
    of ~60 torch passes for TIES) instead of the torch steps. Only when it gives exactly their
    bits, which needs all of:

    * no importance mask (the loops have no mask step);
    * inputs checked finite (torch's vectorised bf16 cast spells NaN differently from its
      scalar one, so NaN payloads could differ);
    * every δ̂_j present, i.e. no density 0 (the loops have no "absent, never votes" term);
    * one stored dtype for all models (the loops take them as one homogeneous tuple);
    * ``fused_cpu.supported``: CPU, float32 compute, contiguous bf16/float32 tensors, no load
      rounding, numba available and ``MERGEKIT_LIKE_FUSED`` not 0;
    * sparsifiers the loops implement (magnitude trim, random drop, a precomputed keep mask, a
      band: ``fused_form``).
    """
    return (steps.masking is None and task.inputs_finite and min(steps.densities) > 0.0
            and len({x.dtype for x in xs}) == 1
            and fused_cpu.supported(task, [task.base, *xs], out)
            and all(sp is None or fused_form(sp) is not None for sp in steps.sparsifiers)
            and fused_cpu.forms_supported([sp and fused_form(sp) for sp in steps.sparsifiers]))


def fused_form(sparsifier: Sparsifier) -> Any:
    """The sparsifier's form for the fused loops (its ``fused_sparsifier()``), or None when it
    has none (no such method, or it returns None for this tensor)."""
    make = getattr(sparsifier, "fused_sparsifier", None)
    return None if make is None else make()


def delta_memo_key(method: "TaskVectorMethod", task: TensorTask, steps: TaskVectorSteps) -> tuple:
    """The grid memo's key of this tensor's Δ (before λ): everything Δ depends on but λ, so
    points of a pass that differ only in λ share it."""
    return ("delta", method.spec.name, method.consensus, steps.normalize, tuple(steps.weights),
            tuple(steps.densities), str(steps.rescale),
            tuple(task.input_indices[p] for p in steps.models), task.seed, task.compute_dtype,
            task.load_dtype, steps.masking and steps.masking.key)


def weighted_piece(steps: TaskVectorSteps, j: int, x: torch.Tensor, b: torch.Tensor,
                   offset: int, scratch: Scratch) -> torch.Tensor | None:
    """W_j = w_j·keep_j ⊙ rescale(sparsify(x − b)) of one flat piece at flat index ``offset``,
    in scratch slot ("w", j) (compute dtype); None when d_j = 0 (δ̂_j = 0, never votes)."""
    if steps.densities[j] <= 0.0:
        return None
    buf = task_vector(x, b, out=scratch.get(("w", j), b.numel()))
    sparsifier = steps.sparsifiers[j]
    if sparsifier is not None:
        sparsifier.apply(buf, offset, scratch)
        rescale_(buf, *steps.scales[j])
    if steps.masking is not None:
        steps.masking.apply(j, buf, offset, scratch)        # keep_j ⊙ δ̂_j
    if steps.weights[j] != 1.0:
        buf.mul_(steps.weights[j])
    return buf


def _store(target: torch.Tensor, b: torch.Tensor, delta: torch.Tensor | None, lam: float) -> None:
    """target ← b + λ·Δ, computed in the compute dtype and cast once to target's dtype."""
    same_dtype = target.dtype == b.dtype
    res = apply_delta_(b, delta, lam, target if same_dtype else None)
    if not same_dtype:
        target.copy_(res)


class TaskVectorMethod(Method):
    """Engine adapter of the task-vector form. Subclasses set ``spec``, ``consensus`` and
    ``make_sparsifier`` (called for 0 < d < 1 only)."""

    consensus = False
    span_parallel = True
    sparsifies = True
    """False: ``density`` is accepted but ignored (task_arithmetic)."""
    sparsifier_kind: str | None = None
    """Names what ``make_sparsifier`` computes, so grid points can share it (None: never)."""

    def make_sparsifier(self, task: TensorTask, pos: int, density: float,
                        scratch: Scratch) -> Sparsifier | None:
        return None

    def check_recipe(self, recipe: Any) -> None:
        masks.check_recipe(recipe)

    def side_inputs(self, plan: Any) -> dict[str, Any]:
        return masks.side_folders(plan)

    def check_plan(self, plan: Any) -> None:
        masks.check_plan(plan)

    def warm_up(self, device: torch.device) -> None:
        if device.type == "cpu":
            fused_cpu.warm_up()

    def card_extra(self, plan: Any, reports: dict[str, dict]) -> dict[str, Any] | None:
        return masks.card_extra(plan, reports)

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        models, copied = models_against_base(task, self.spec.name)
        if copied is not None:
            return copied
        steps = self.resolve_steps(task, models)
        xs = [task.inputs[pos] for pos in models]
        out = task.empty_output()
        key = delta_memo_key(self, task, steps)
        shared = task.memo.get(key) if task.memo is not None else None
        keep = self._delta_keeper(task) if shared is None else None
        if shared is not None:
            work = partial(self._shared_span, task, steps, out, shared)
        elif fused_loops_apply(task, xs, out, steps):
            work = partial(self._fused_span, task, steps, xs, out, keep)
        else:
            work = partial(self._torch_span, task, steps, xs, out, keep)
        run_parallel([partial(work, span) for span in spans(task)], task.workers)
        if keep is not None and not torch.isnan(keep).any():
            task.memo[key] = keep
            task.memo["delta_bytes"] = task.memo.get("delta_bytes", 0) + keep.numel() * 4
        if steps.masking is not None:
            task.report = steps.masking.report(task.memo, key,
                                               [task.input_indices[p] for p in models])
        return out

    def resolve_steps(self, task: TensorTask, models: list[int]) -> TaskVectorSteps:
        """Each model's steps for this tensor from the parameters the plan resolved (defaults
        included): its weight and density, its sparsifier (TIES: the threshold passes), its
        rescale ("l1": the norm passes) and its importance masks."""
        weights = [float(task.model_params[pos]["weight"]) for pos in models]
        densities = [float(task.model_params[pos]["density"]) if self.sparsifies else 1.0
                     for pos in models]
        rescale = task.params["rescale"]
        sparsifiers = [self._sparsifier(task, pos, d) for pos, d in zip(models, densities)]
        factors: list[float | None] = [None] * len(models)      # "l1" rescale factors r_j
        if rescale == "l1" and any(s is not None for s in sparsifiers):
            factors = self._l1_factors(task, [task.inputs[pos] for pos in models], sparsifiers)
        scales = [(SCALE_NONE, 1.0) if sp is None else rescale_step(rescale, d, r)
                  for sp, d, r in zip(sparsifiers, densities, factors)]
        return TaskVectorSteps(models, weights, densities, sparsifiers, scales,
                               masks.TensorMasks.build(task, models),
                               bool(task.params["normalize"]), float(task.params["lambda"]),
                               rescale)

    @staticmethod
    def _delta_keeper(task: TensorTask) -> torch.Tensor | None:
        """A buffer for this tensor's Δ when a grid pass may share it and it fits the budget."""
        if task.memo is None or \
                task.memo.get("delta_bytes", 0) + task.numel * 4 > DELTA_MEMO_BYTES:
            return None
        return torch.empty(task.numel, dtype=task.compute_dtype, device=task.device)

    def _torch_span(self, task: TensorTask, steps: TaskVectorSteps, xs: list[torch.Tensor],
                    out: torch.Tensor, keep: torch.Tensor | None, span: tuple[int, int]) -> None:
        """out[span] = b + λ·Δ by torch steps on pieces (and Δ into ``keep``: NaN where no
        model has a δ̂, which is never shared)."""
        scratch = Scratch(task.compute_dtype, task.device)
        flat_out = out.view(-1)
        for off, (b, *parts) in pieces(task, [task.base, *xs], span=span):
            n = b.numel()
            weighted = [weighted_piece(steps, j, x, b, off, scratch) for j, x in enumerate(parts)]
            delta = merged_delta_(weighted, steps.weights, consensus=self.consensus,
                                  normalize=steps.normalize, scratch=scratch)
            if keep is not None:
                if delta is None:
                    keep[off:off + n].fill_(math.nan)
                else:
                    keep[off:off + n].copy_(delta)
            _store(flat_out[off:off + n], b, delta, steps.lam)

    def _fused_span(self, task: TensorTask, steps: TaskVectorSteps, xs: list[torch.Tensor],
                    out: torch.Tensor, keep: torch.Tensor | None, span: tuple[int, int]) -> None:
        """The same as ``_torch_span`` as one fused CPU loop (see ``fused_loops_apply``)."""
        trims = [None if sp is None else fused_form(sp) for sp in steps.sparsifiers]
        fused_cpu.merge_span(out, keep, task.base, xs, span, trims, steps.scales, steps.weights,
                             consensus=self.consensus, normalize=steps.normalize, lam=steps.lam)

    @staticmethod
    def _shared_span(task: TensorTask, steps: TaskVectorSteps, out: torch.Tensor,
                     shared: torch.Tensor, span: tuple[int, int]) -> None:
        """out[span] = b + λ·Δ from the Δ another grid point of the pass kept."""
        scratch = Scratch(task.compute_dtype, task.device)
        flat_out = out.view(-1)
        for off, (b,) in pieces(task, [task.base], span=span):
            n = b.numel()
            delta = scratch.get("delta", n).copy_(shared[off:off + n])
            _store(flat_out[off:off + n], b, delta, steps.lam)

    def _sparsifier(self, task: TensorTask, pos: int, density: float) -> Sparsifier | None:
        if not 0.0 < density < 1.0:
            return None
        key = (self.sparsifier_kind, task.input_indices[pos], density, task.seed,
               task.compute_dtype, task.load_dtype)
        if task.memo is not None and key in task.memo:  # another point of the grid pass
            return task.memo[key]
        made = self.make_sparsifier(task, pos, density, Scratch(task.compute_dtype, task.device))
        if task.memo is not None and self.sparsifier_kind is not None:
            task.memo[key] = made
        return made

    def _l1_factors(self, task: TensorTask, xs: list[torch.Tensor],
                    sparsifiers: list[Sparsifier | None]) -> list[float | None]:
        """r_j = ‖δ_j‖₁ / ‖sparsify(δ_j)‖₁ (``ops.drop.l1_factor``) for the sparsified models,
        from exact sums over per-row float64 sums (so independent of the cut)."""
        row = row_elems(task.shape)
        idx = [j for j, s in enumerate(sparsifiers) if s is not None]

        def span_sums(span: tuple[int, int]) -> tuple[dict, dict]:
            scratch = Scratch(task.compute_dtype, task.device)
            full: dict[int, list[torch.Tensor]] = {j: [] for j in idx}
            kept: dict[int, list[torch.Tensor]] = {j: [] for j in idx}
            for off, (b, *parts) in pieces(task, [task.base, *[xs[j] for j in idx]], span=span):
                for j, x in zip(idx, parts):
                    n = b.numel()
                    buf = task_vector(x, b, out=scratch.get("l1", n))
                    mag = torch.abs(buf, out=scratch.get("l1_abs", n))
                    work = scratch.get("l1_f64", n, torch.float64)
                    full[j].append(row_sums(mag, row, work))
                    sparsifiers[j].apply(buf, off, scratch)
                    kept[j].append(row_sums(buf.abs_(), row, work))
            return full, kept

        parts = run_parallel([partial(span_sums, span) for span in spans(task)], task.workers)
        factors: list[float | None] = [None] * len(sparsifiers)
        for j in idx:
            factors[j] = l1_factor(exact_total([t for full, _ in parts for t in full[j]]),
                                   exact_total([t for _, kept in parts for t in kept[j]]))
        return factors


def task_vector_params(*, normalize: bool, rescale: Any, density_effective: bool,
                       rescale_effective: bool) -> tuple[ParamSpec, ...]:
    """Parameters every task-vector method accepts (mergekit declares all of them)."""
    return (
        ParamSpec("weight", "float", REQUIRED, per_model=True),
        ParamSpec("density", "density", 1.0, per_model=True, effective=density_effective),
        ParamSpec("normalize", "bool", normalize),
        ParamSpec("lambda", "float", 1.0),
        ParamSpec("rescale", "rescale", rescale, effective=rescale_effective),
        ParamSpec("int8_mask", "bool", False, effective=False),
        ParamSpec("mask", "structured", None, per_model=True),     # methods/masks.py
        ParamSpec("protect", "structured", None, per_model=True),
    )


class TaskArithmetic(TaskVectorMethod):
    """out = b + λ·Σ_i w_i·(x_i − b) (÷ Σ_i w_i when normalize)."""

    spec = MethodSpec(
        name="task_arithmetic",
        params=task_vector_params(normalize=False, rescale=False, density_effective=False,
                                  rescale_effective=False),
        needs_base=True,
    )
    sparsifies = False
    io_bound = True
