"""Task arithmetic (Ilharco et al., ICLR 2023) and the task-vector form shared by TIES and DARE.

Every task-vector method computes, per tensor (operators.md §2), with b the base, x_i the
models, w_i their weights and δ_i = x_i − b::

    δ̂_i = keep_i ⊙ sparsify(δ_i; d_i)               sparsify: identity for task_arithmetic
          keep_i = [I_i > X] ∧ ¬protect_i            all-true without mask/protect (masks.py)
    W_i = w_i·δ̂_i
    consensus:  S = Σ_i W_i ;  s = +1 where S ≥ 0 else −1
                m_i = [sign(W_i) == s] ;  Δ = Σ_i m_i·W_i ;  D = Σ_i m_i·w_i ;  D[D == 0] = 1
    otherwise:  Δ = Σ_i W_i ;  D = Σ_i w_i ;  D = 1 if |D| < 1e-8
    normalize:  Δ = Δ / D
    out = b + λ·Δ

keep_i applies to the trimmed / dropped / rescaled δ_i, before w_i and the election: a TIES
density stays relative to the unmasked δ_i and "l1" factors ignore it. The pure functions below
work on flat float32/float64 tensors of equal shape; sums run in model order.
``TaskVectorMethod`` at the bottom adapts them to the engine (pieces, sparsifiers, rescaling,
masks) and is subclassed by ``ties.py`` and ``dare.py``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Protocol, Sequence

import torch

from mergekit_like.errors import MergeError
from mergekit_like.kernels import fused_cpu
from mergekit_like.ops import masks
from mergekit_like.methods.base import REQUIRED, Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.kernels.tiling import (Scratch, buffer, copy_of, exact_total, pieces,
                                          present, row_elems, row_sums, run_parallel, spans)

DELTA_MEMO_BYTES = 256 * 10**6
"""Most bytes of Δ a grid pass keeps per tensor for points that differ only in λ."""

L1_EPS = 1e-7
""""l1" rescale: r = 1 when ‖δ‖₁ or ‖δ̂‖₁ is below this."""


def task_vector(x: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """δ = x − b, elementwise, same shape and dtype (written into ``out`` when given)."""
    return torch.sub(x, b, out=out) if out is not None else x - b


def weighted_sum(weighted: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Δ = Σ_i W_i in order, accumulated in place into the first term (None terms are 0).
    Returns None when every term is None."""
    acc = None
    for w_i in weighted:
        if w_i is None:
            continue
        if acc is None:
            acc = w_i
        else:
            acc.add_(w_i)
    return acc


def sign_consensus(weighted: Sequence[torch.Tensor | None], weights: Sequence[float],
                   normalize: bool, scratch: Scratch | None = None) -> torch.Tensor | None:
    """TIES disjoint merge with the sign elected by sum (TIES "mass"), on flat tensors.

    ``weighted[i]`` is W_i = w_i·δ̂_i (None: δ̂_i = 0, never votes), ``weights[i]`` is w_i.
    Returns Δ = Σ_i m_i·W_i, divided elementwise by D = Σ_i m_i·w_i (D == 0 → 1) when
    ``normalize``; None when every term is None. S = 0 elects +1; an entry W_i = 0 never agrees.

    Computed as Δ = s ⊙ Σ_i relu(s ⊙ W_i): multiplying by s = ±1 is exact and rounding is
    symmetric, so this equals the masked sum bit for bit. The W_i buffers are overwritten;
    temporaries come from ``scratch`` when given.
    """
    terms = [(w_i, float(c)) for w_i, c in zip(weighted, weights) if w_i is not None]
    if not terms:
        return None
    first = terms[0][0]
    if len(terms) == 1:
        total = first                                     # S = W_1 (read before W_1 changes)
    else:
        total = torch.add(first, terms[1][0], out=buffer(scratch, "sc_sum", first))
        for w_i, _ in terms[2:]:
            total.add_(w_i)                               # S = Σ_i W_i
    votes = torch.ge(total, 0, out=buffer(scratch, "sc_votes", first))   # s ∈ {1, 0} ...
    votes.mul_(2).sub_(1)                                 # ... → {+1, −1}; S = 0 elects +1
    agree = denom = acc = None
    if normalize:
        agree = total if total is not first else buffer(scratch, "sc_agree", first)
        denom = buffer(scratch, "sc_denom", first)
    for n, (w_i, c) in enumerate(terms):
        w_i.mul_(votes).relu_()                           # |W_i| where it agrees, else 0
        if normalize:
            torch.gt(w_i, 0, out=agree)                   # m_i as 0/1
            if n == 0:
                torch.mul(agree, c, out=denom)
            else:
                denom.add_(agree if c == 1.0 else agree.mul_(c))
        acc = w_i if acc is None else acc.add_(w_i)
    if normalize:
        torch.eq(denom, 0, out=agree)
        denom.add_(agree)                                 # D[D == 0] = 1
        acc.div_(denom)
    return acc.mul_(votes)


def merged_delta(weighted: Sequence[torch.Tensor | None], weights: Sequence[float], *,
                 consensus: bool, normalize: bool,
                 scratch: Scratch | None = None) -> torch.Tensor | None:
    """Δ of operators.md §2 (÷ D when normalize) from the W_i = w_i·δ̂_i, before λ; None when
    every term is None. The W_i buffers are consumed; Δ may live in one of them."""
    if consensus:
        return sign_consensus(weighted, weights, normalize, scratch)
    delta = weighted_sum(weighted)
    if delta is not None and normalize:
        denom = sum(float(c) for c in weights)
        delta.div_(1.0 if abs(denom) < 1e-8 else denom)
    return delta


def apply_delta(base: torch.Tensor, delta: torch.Tensor | None, lam: float,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """out = b + λ·Δ (b itself when Δ is None); Δ is scaled in place. ``out`` may be of another
    dtype (one cast); without it the result may live in Δ's buffer."""
    if delta is None:
        return base.clone() if out is None else out.copy_(base)
    if lam != 1.0:
        delta.mul_(lam)
    if out is None:
        return delta.add_(base)
    return torch.add(delta, base, out=out)


def combine_task_vectors(base: torch.Tensor, weighted: Sequence[torch.Tensor | None],
                         weights: Sequence[float], *, consensus: bool, normalize: bool,
                         lam: float, out: torch.Tensor | None = None,
                         scratch: Scratch | None = None) -> torch.Tensor:
    """out = b + λ·Δ (Δ/D when normalize) of operators.md §2, on flat tensors of equal shape.

    ``weighted`` are the W_i = w_i·δ̂_i (None where δ̂_i = 0: no vote, but w_i still counts in
    the plain denominator), ``weights`` the w_i of the models that have this tensor. The W_i
    buffers are consumed; the result is written to ``out`` when given (it may be of another
    dtype: one cast), else it may live in one of them.
    """
    delta = merged_delta(weighted, weights, consensus=consensus, normalize=normalize,
                         scratch=scratch)
    return apply_delta(base, delta, lam, out)


# --------------------------------------------------------------------------------------------
# engine adapter


class Sparsifier(Protocol):
    """Zeroes the dropped entries of a flat δ piece in place; ``offset`` is its global flat
    index; temporaries come from the caller's ``scratch``. Must not depend on how the tensor
    is cut into pieces, and may be called from several threads at once."""

    def apply(self, delta: torch.Tensor, offset: int, scratch: Scratch | None = None) -> None: ...


def _flag(value: Any, default: Any) -> Any:
    return default if value is None else value


class TaskVectorMethod(Method):
    """Engine adapter of the shared form. Subclasses set ``spec``, ``consensus`` and
    ``make_sparsifier`` (called for 0 < d < 1 only)."""

    consensus = False
    span_parallel = True
    sparsifies = True
    sparsifier_kind: str | None = None
    """Names what ``make_sparsifier`` computes, so grid points can share it (None: never)."""
    """False: ``density`` is accepted but ignored (task_arithmetic)."""

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

    def _default(self, name: str) -> Any:
        p = self.spec.param(name)
        return None if p is None or p.default is REQUIRED else p.default

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        params = task.params
        normalize = bool(_flag(params.get("normalize"), self._default("normalize") or False))
        lam = float(_flag(params.get("lambda"), 1.0))
        rescale = _flag(params.get("rescale"), self._default("rescale") or False)
        if task.base is None:
            raise MergeError(f"{self.spec.name}: tensor '{task.name}' has no base tensor")
        models = present(task)
        if not models or task.numel == 0:
            return copy_of(task, task.base)
        weights, densities = [], []
        for pos in models:
            mp = task.model_params[pos]
            if mp.get("weight") is None:
                raise MergeError(f"{self.spec.name}: no weight for input {pos} of tensor '{task.name}'")
            weights.append(float(mp["weight"]))
            densities.append(float(_flag(mp.get("density"), 1.0)) if self.sparsifies else 1.0)
        # one sparsifier per model (TIES: its threshold passes, span-parallel inside)
        sparsifiers = [self._sparsifier(task, pos, d) for pos, d in zip(models, densities)]
        xs = [task.inputs[pos] for pos in models]
        factors: list[float | None] = [None] * len(models)   # "l1" rescale factors r_i
        if rescale == "l1" and any(s is not None for s in sparsifiers):
            factors = self._l1_factors(task, xs, sparsifiers)

        masking = masks.TensorMasks.build(task, models)   # keep_i (None: no mask/protect)
        out = task.empty_output()
        flat_out = out.view(-1)
        same_dtype = out.dtype == task.compute_dtype
        # Grid points of a pass that differ only in λ share Δ (kept for this tensor only)
        key = ("delta", self.spec.name, self.consensus, normalize, tuple(weights),
               tuple(densities), str(rescale), tuple(task.input_indices[p] for p in models),
               task.seed, task.compute_dtype, task.load_dtype, masking and masking.key)
        shared = task.memo.get(key) if task.memo is not None else None
        keep = None
        if shared is None and task.memo is not None and \
                task.memo.get("delta_bytes", 0) + task.numel * 4 <= DELTA_MEMO_BYTES:
            keep = torch.empty(task.numel, dtype=task.compute_dtype, device=task.device)

        def merge_span(span: tuple[int, int]) -> None:
            scratch = Scratch(task.compute_dtype, task.device)
            if shared is not None:
                for off, (b,) in pieces(task, [task.base], span=span):
                    n = b.numel()
                    delta = scratch.get("delta", n).copy_(shared[off:off + n])
                    target = flat_out[off:off + n]
                    res = apply_delta(b, delta, lam, target if same_dtype else None)
                    if not same_dtype:
                        target.copy_(res)
                return
            for off, (b, *parts) in pieces(task, [task.base, *xs], span=span):
                n = b.numel()
                weighted: list[torch.Tensor | None] = []
                for j, x in enumerate(parts):
                    if densities[j] <= 0.0:
                        weighted.append(None)                   # d = 0: δ̂ = 0
                        continue
                    buf = task_vector(x, b, out=scratch.get(("w", j), n))
                    sp = sparsifiers[j]
                    if sp is not None:
                        sp.apply(buf, off, scratch)
                        if factors[j] is not None:
                            if factors[j] != 1.0:
                                buf.mul_(factors[j])
                        elif rescale is True:
                            buf.div_(densities[j])              # exactly 1/d (DARE paper)
                    if masking is not None:
                        masking.apply(j, buf, off, scratch)     # keep_i ⊙ δ̂_i
                    if weights[j] != 1.0:
                        buf.mul_(weights[j])
                    weighted.append(buf)
                target = flat_out[off:off + n]
                delta = merged_delta(weighted, weights, consensus=self.consensus,
                                     normalize=normalize, scratch=scratch)
                if keep is not None:
                    if delta is None:
                        keep[off:off + n].fill_(math.nan)   # marks "no Δ": never shared
                    else:
                        keep[off:off + n].copy_(delta)
                res = apply_delta(b, delta, lam, target if same_dtype else None)
                if not same_dtype:
                    target.copy_(res)

        # the same steps as one fused loop per span, when it computes exactly the same bits
        fused = shared is None and self._fused_plan(task, xs, out, densities, sparsifiers,
                                                    factors, rescale, masking)

        def fused_span(span: tuple[int, int]) -> None:
            fused_cpu.merge_span(out, keep, task.base, xs, span, *fused, weights,
                                 consensus=self.consensus, normalize=normalize, lam=lam)

        work = fused_span if fused else merge_span
        run_parallel([partial(work, span) for span in spans(task)], task.workers)
        if keep is not None and not torch.isnan(keep).any():
            task.memo[key] = keep
            task.memo["delta_bytes"] = task.memo.get("delta_bytes", 0) + keep.numel() * 4
        if masking is not None:
            task.report = masking.report(task.memo, key, [task.input_indices[p] for p in models])
        return out

    @staticmethod
    def _fused_plan(task: TensorTask, xs: list[torch.Tensor], out: torch.Tensor,
                    densities: list[float], sparsifiers: list[Sparsifier | None],
                    factors: list[float | None], rescale: Any, masking: Any) -> tuple | None:
        """(trims, scales) for ``fused_cpu.merge_span`` when it computes exactly what
        ``merge_span`` does here: finite inputs of one dtype, every δ̂_i present, sparsifiers
        the loops know (magnitude trim, random drop), no masks. None otherwise."""
        if masking is not None or not task.inputs_finite or min(densities) <= 0.0 \
                or len({x.dtype for x in xs}) != 1 \
                or not fused_cpu.supported(task, [task.base, *xs], out) \
                or any(sp is not None and not hasattr(sp, "fused_sparsifier")
                       for sp in sparsifiers):
            return None
        trims, scales = [], []
        for sp, factor, density in zip(sparsifiers, factors, densities):
            trims.append(None if sp is None else sp.fused_sparsifier())
            if sp is None:
                scales.append((0, 1.0))
            elif factor is not None:
                scales.append((1, factor) if factor != 1.0 else (0, 1.0))
            elif rescale is True:
                scales.append((2, density))
            else:
                scales.append((0, 1.0))
        return trims, scales

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
        """r_i = ‖δ_i‖₁ / ‖δ̂_i‖₁ (1 if either is below 1e-7), exact sums over row sums."""
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
            n_full = exact_total([t for full, _ in parts for t in full[j]])
            n_kept = exact_total([t for _, kept in parts for t in kept[j]])
            factors[j] = 1.0 if n_full < L1_EPS or n_kept < L1_EPS else n_full / n_kept
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
        ParamSpec("mask", "structured", None, per_model=True),     # masks.py
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

