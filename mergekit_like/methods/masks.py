"""Importance masks of the task-vector methods: the per-model parameters ``mask`` and ``protect``
(docs/methods/rcp.md §9), as recipe rules and as a step of the merge.

Each names a folder of safetensors keyed like the model (``importance``); I is its tensor of the
merged tensor's name::

    mask:    {importance: P, threshold: X}    (a bare string P: X = 0)   M_i = [I > X]
    protect: {importance: P, threshold: X}                               R_i = [I > X]
    protect: {importance: P, top: F}          0 < F ≤ 1                  R_i = top fraction F of I
    keep_i = M_i ∧ ¬R_i
    δ̂_i ← keep_i ⊙ sparsify(δ_i; d_i)         before w_i and the sign election
                                               (docs/methods/task_arithmetic.md §1)

So a TIES trim keeps its density relative to the unmasked δ_i and "l1" rescale factors ignore
the mask. The selections are the pure functions of ``ops/masks.py``. A NaN importance is an error.

Set under top-level ``parameters`` a rule applies to every model (the merge never moves the
weights the map marks important); under ``models[i].parameters`` only to that task vector
(``null`` there switches a top-level rule off for that model).

``check_recipe`` (phase A), ``side_folders`` / ``check_plan`` (phase B), ``TensorMasks`` (the
merge) and ``card_extra`` adapt the rules to the engine.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_like.errors import MergeError
from mergekit_like.ops.masks import (NATIVE_F32, above, at_least_f32, holds_exactly,
                                     kth_largest_f32)
from mergekit_like.ops.trim import trim_count
from mergekit_like.recipe.schema import suggest
from mergekit_like.recipe.params import Structured

KINDS = ("mask", "protect")
KEYS = {"mask": ("importance", "threshold"), "protect": ("importance", "top", "threshold")}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
"""An importance folder is keyed like a model: one of these (LocalSource's layouts)."""


# --------------------------------------------------------------------------------------------
# recipe values


@dataclass(frozen=True)
class Rule:
    """One ``mask`` or ``protect`` value, parsed; ``importance`` is the folder as written."""

    kind: str
    importance: str
    threshold: float | None = None
    top: float | None = None

    @property
    def label(self) -> str:
        """The side input's label: the folder's resolved path (shared by every rule on it)."""
        return os.path.realpath(self.importance)

    def describe(self) -> str:
        how = f"top {self.top:g}" if self.top is not None else f"I > {self.threshold:g}"
        return f"{self.kind} {self.importance} ({how})"


class RuleError(ValueError):
    def __init__(self, subpath: tuple, message: str):
        super().__init__(message)
        self.subpath, self.message = subpath, message


def _number(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        hint = ""
        if isinstance(v, str):
            try:
                float(v)
                hint = " (YAML reads forms like 1e-3 as strings; write 1.0e-3)"
            except ValueError:
                pass
        raise RuleError((key,), f"'{key}' must be a number, got {v!r}{hint}")
    if not math.isfinite(float(v)):
        raise RuleError((key,), f"'{key}' must be a finite number, got {v!r}")
    return float(v)


def parse_rule(kind: str, value: Any) -> Rule | None:
    """The ``mask`` / ``protect`` value as written (None: no rule); raises ``RuleError`` with
    the subpath of the offending key."""

    if value is None:
        return None
    if isinstance(value, str):
        if kind == "protect":
            raise RuleError((), "protect needs a map {importance: PATH, top: F} or {importance: "
                                "PATH, threshold: X}, not a bare path (only mask takes one)")
        value = {"importance": value}
    if not isinstance(value, dict):
        forms = "PATH or {importance: PATH, threshold: X}" if kind == "mask" else \
            "{importance: PATH, top: F} or {importance: PATH, threshold: X}"
        raise RuleError((), f"{kind} must be {forms}, got {type(value).__name__}")
    for key in value:
        if key not in KEYS[kind]:
            raise RuleError((key,), f"unknown key in {kind}{suggest(str(key), KEYS[kind])} "
                                    f"(known: {', '.join(KEYS[kind])})")
    path = value.get("importance")
    if not isinstance(path, str) or not path.strip():
        raise RuleError(("importance",) if "importance" in value else (),
                        f"{kind} needs 'importance': the folder of the importance map")
    threshold = _number(value["threshold"], "threshold") if "threshold" in value else None
    top = _number(value["top"], "top") if "top" in value else None
    if kind == "mask":
        return Rule(kind, path, 0.0 if threshold is None else threshold)
    if (threshold is None) == (top is None):
        raise RuleError((), "protect needs exactly one of 'top' and 'threshold'")
    if top is not None and not 0.0 < top <= 1.0:
        raise RuleError(("top",), f"'top' must be a fraction in (0, 1], got {value['top']!r}")
    return Rule(kind, path, threshold, top)


def rules_of(model_params: dict[str, Any]) -> list[Rule]:
    """The rules in one model's resolved parameters (already checked in phase A)."""
    return [r for kind in KINDS if (r := parse_rule(kind, model_params.get(kind))) is not None]


def check_recipe(recipe: Any) -> None:
    """Phase A: the form of every mask/protect value and that its folder exists."""

    places = [(("parameters",), recipe.top_params)]
    places += [(("models", m.index, "parameters"), m.entry_params) for m in recipe.inputs]
    for where, settings in places:
        for kind in KINDS:
            setting = settings.get(kind)
            if setting is None:
                continue
            path = where + (kind,)
            raw = setting.value if isinstance(setting, Structured) else setting
            try:
                rule = parse_rule(kind, raw)
            except RuleError as exc:
                raise recipe.locator.error(path + exc.subpath, exc.message) from None
            if rule is None:
                continue
            sub = ("importance",) if isinstance(raw, dict) else ()
            if not os.path.isdir(rule.importance):
                raise recipe.locator.error(path + sub, f"no such folder '{rule.importance}' "
                                                       "(the importance map)")
            if not any(os.path.isfile(os.path.join(rule.importance, f)) for f in WEIGHT_FILES):
                raise recipe.locator.error(path + sub, f"'{rule.importance}' holds no "
                                                       f"{' or '.join(WEIGHT_FILES)}")


def _key_of(plan: Any, pos: int, kind: str) -> tuple:
    """The recipe path that sets ``kind`` for input ``pos`` (its own entry, else top level)."""
    inp = plan.inputs[pos]
    return ("models", inp.index, "parameters", kind) if kind in inp.entry_params \
        else ("parameters", kind)


def side_folders(plan: Any) -> dict[str, str]:
    """label → folder of every importance map some merged tensor's model uses."""
    out: dict[str, str] = {}
    for job in plan.jobs:
        for mp in job.model_params:
            for rule in rules_of(mp):
                out.setdefault(rule.label, rule.importance)
    return out


def check_plan(plan: Any) -> None:
    """Phase B: every merged tensor of a masked model is in the map, with the same shape."""
    for job in plan.jobs:
        if not job.merge:
            continue
        for pos, mp in zip(job.participants, job.model_params):
            for rule in rules_of(mp):
                info = plan.side[rule.label].tensors().get(job.name)
                if info is not None and tuple(info.shape) == tuple(job.info.shape):
                    continue
                where = plan.recipe.where(*_key_of(plan, pos, rule.kind))
                if info is None:
                    raise MergeError(f"{where}: importance folder {rule.importance} has no "
                                     f"tensor '{job.name}'")
                raise MergeError(f"{where}: tensor '{job.name}' in {rule.importance} has "
                                 f"shape {list(info.shape)}, the model's is "
                                 f"{list(job.info.shape)}")


# --------------------------------------------------------------------------------------------
# the merge


class TensorMasks:
    """keep_i of every model of one tensor, applied to flat δ̂ pieces (thread-safe)."""

    def __init__(self, task: Any, rules: list[list[Rule]]):
        self.task = task
        self.rules = rules
        self.key = tuple(tuple((r.kind, r.label, r.threshold, r.top) for r in rs) for rs in rules)
        self.cuts: list[list[tuple[Rule, torch.Tensor, float, torch.dtype | None]]] = []
        for rs in rules:
            self.cuts.append([(r, *self._prepare(r)) for r in rs])
        self._lock = threading.Lock()
        self._dropped: dict[int, list[torch.Tensor]] = {}

    @classmethod
    def build(cls, task: Any, models: list[int]) -> "TensorMasks | None":
        """None when no model of this tensor has a rule (the merge is then unchanged)."""
        rules = [rules_of(task.model_params[pos]) for pos in models]
        return cls(task, rules) if any(rules) else None

    def _prepare(self, rule: Rule) -> tuple[torch.Tensor, float, torch.dtype | None]:
        """(flat importance, cut, dtype it is compared in when not as stored): threshold X, or
        v_k for ``top`` (once per tensor)."""
        task = self.task
        imp = task.side.get(rule.label)
        if imp is None:
            raise MergeError(f"importance folder {rule.importance} has no tensor '{task.name}'")
        flat = imp.reshape(-1)
        memo = task.memo if task.memo is not None else {}
        ok = ("importance_ok", rule.label)
        if ok not in memo:
            if flat.is_floating_point() and bool(torch.isnan(flat).any()):
                raise MergeError(f"{rule.importance}: tensor '{task.name}' has NaN importance "
                                 "values")
            memo[ok] = True
        if rule.top is None:
            wide = None if holds_exactly(flat.dtype, rule.threshold) else torch.float64
            return flat, rule.threshold, wide
        top = ("protect_top", rule.label, rule.top)
        if top not in memo:
            memo[top] = kth_largest_f32(flat, trim_count(rule.top, flat.numel()))
        return flat, memo[top], None if flat.dtype in NATIVE_F32 else torch.float32

    def apply(self, j: int, delta: torch.Tensor, offset: int, scratch: Any) -> None:
        """δ̂ ← keep_j ⊙ δ̂ on the flat piece starting at global index ``offset``."""
        if not self.cuts[j]:
            return
        n = delta.numel()
        drop = scratch.get("mask_drop", n, torch.bool)
        tmp = scratch.get("mask_tmp", n, torch.bool)
        for i, (rule, flat, cut, wide) in enumerate(self.cuts[j]):
            part = flat[offset:offset + n]
            into = drop if i == 0 else tmp
            work = None if wide is None else scratch.get(("mask", wide), n, wide)
            (above if rule.top is None else at_least_f32)(part, cut, out=into, work=work)
            if rule.kind == "mask":
                into.logical_not_()                   # mask: drop where not I > X
            if i:
                drop.logical_or_(tmp)
        delta.masked_fill_(drop, 0.0)
        count = torch.count_nonzero(drop)
        with self._lock:
            self._dropped.setdefault(j, []).append(count)

    def report(self, memo: dict | None, key: tuple, input_indices: list[int]) -> dict:
        """{"mask_kept": {model index: weights kept}, "numel": n} (from ``memo`` for a grid
        point that reused another's Δ)."""
        saved = ("mask_report",) + key
        if not self._dropped and memo is not None and saved in memo:
            return memo[saved]
        n = self.task.numel
        kept = {str(input_indices[j]): n - int(sum(int(c) for c in self._dropped.get(j, [])))
                for j, rs in enumerate(self.rules) if rs}
        out = {"mask_kept": kept, "numel": n}
        if memo is not None:
            memo[saved] = out
        return out


# --------------------------------------------------------------------------------------------
# the model card


def card_extra(plan: Any, reports: dict[str, dict]) -> dict[str, Any] | None:
    """Card lines: the rules as set, and the fraction of weights each masked model keeps."""
    recipe = plan.recipe
    rules = []
    for label, settings in [("all models", recipe.top_params)] + \
            [(f"models[{m.index}]", m.entry_params) for m in recipe.inputs if not m.is_base]:
        for kind in KINDS:
            s = settings.get(kind)
            if s is None:
                continue
            rule = parse_rule(kind, getattr(s, "value", None))
            rules.append(f"{label}: {rule.describe() if rule is not None else 'no ' + kind}")
    if not any(not r.endswith((": no mask", ": no protect")) for r in rules):
        return None
    kept: dict[str, list[int]] = {}
    for rep in reports.values():
        for idx, k in (rep.get("mask_kept") or {}).items():
            acc = kept.setdefault(idx, [0, 0])
            acc[0] += k
            acc[1] += rep["numel"]
    extra: dict[str, Any] = {"importance masks": "; ".join(rules)}
    if kept:
        extra["weights kept by the masks"] = ", ".join(
            f"models[{idx}] {100.0 * k / max(1, n):.2f}%"
            for idx, (k, n) in sorted(kept.items(), key=lambda kv: int(kv[0])))
    return extra
