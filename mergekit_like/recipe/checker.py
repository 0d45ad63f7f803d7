"""Parsing one parameter setting and checking the kind and range of every literal leaf
(phase A of docs/recipe.md §6, used by validate.py for top-level, per-model and sub-recipe values)."""

from __future__ import annotations

import math
from typing import Any

from mergekit_like.recipe.spec import MethodSpec, ParamSpec
from mergekit_like.recipe.params import (Conditional, Gradient, Setting, SettingFormError, Steps,
                                         integral_string, is_number, is_number_like, map_leaves,
                                         numeric_lists, numeric_string, parse_setting)
from mergekit_like.recipe.schema import suggest
from mergekit_like.recipe.yaml_lines import Locator

FLOAT_KINDS = ("float", "density", "penalty")
NUMERIC_KINDS = FLOAT_KINDS + ("rank", "int")
"""Kinds whose values may be written as numeric strings (``1e6``: a string to YAML 1.1)."""


def show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a map"
    return repr(v)


def _spelled(v: Any, parse) -> Any:
    """``v``, or the number a string ``v`` spells (``parse``: None when it spells none)."""
    n = parse(v) if isinstance(v, str) else None
    return v if n is None else n


class Checker:
    """Parses settings and checks the kind and range of every literal leaf."""

    def __init__(self, spec: MethodSpec, loc: Locator, warnings: list[str]):
        self.spec, self.loc, self.warnings = spec, loc, warnings
        self.warned_ineffective: set[str] = set()

    def setting(self, p: ParamSpec, raw: Any, path: tuple) -> Setting:
        try:
            s = parse_setting(raw, structured=(p.kind == "structured"))
        except SettingFormError as exc:
            raise self.loc.error(path + exc.subpath, exc.message) from None
        if p.kind in NUMERIC_KINDS:
            s = numeric_lists(s)
        if p.kind in ("bool", "float", "density", "rank", "int", "penalty"):
            self._no_steps(p, s, path)
        if p.kind == "rank":
            self._fraction_gradients(p, s, path)
        return map_leaves(s, lambda sub, v: self.leaf(p, v, path + sub))

    def _fraction_gradients(self, p: ParamSpec, s: Setting, path: tuple) -> None:
        """Rank gradients interpolate fractions; an absolute rank (an int) stands alone."""
        forms = [((), s)] if not isinstance(s, Conditional) else \
            [(s.sub(i) + ("value",), e.value) for i, e in enumerate(s.entries)]
        for sub, form in forms:
            if isinstance(form, Gradient) and any(isinstance(v, int) for v in form.values):
                raise self.loc.error(path + sub, "a rank gradient takes fractions only (write "
                                                 "0.1, not 1); an absolute rank is a single int")

    def _no_steps(self, p: ParamSpec, s: Setting, path: tuple) -> None:
        forms = [((), s)] if not isinstance(s, Conditional) else \
            [(s.sub(i) + ("value",), e.value) for i, e in enumerate(s.entries)]
        for sub, form in forms:
            if p.kind == "bool" and isinstance(form, (Gradient, Steps)):
                raise self.loc.error(path + sub, f"'{p.name}' must be true or false; gradients "
                                                 "are not allowed for bools")
            if isinstance(form, Steps):  # a list with a non-number in a numeric parameter
                i, bad = next((i, v) for i, v in enumerate(form.values)
                              if not is_number_like(v))
                self.leaf(p, bad, path + sub + (i,))

    def leaf(self, p: ParamSpec, v: Any, path: tuple) -> Any:
        kind = p.kind
        if v is None and p.default is None:
            return None
        if kind in FLOAT_KINDS:
            v = _spelled(v, numeric_string)
            if not is_number(v):
                raise self.loc.error(path, f"expected a number, got {show(v)}")
            f = float(v)
            if kind == "penalty":
                if not f >= 0.0:
                    raise self.loc.error(path, f"'{p.name}' must be ≥ 0 (.inf allowed), "
                                               f"got {show(v)}")
                return f
            if not math.isfinite(f):
                raise self.loc.error(path, f"{show(v)} is not a finite number")
            if kind == "density" and not 0.0 <= f <= 1.0:
                raise self.loc.error(path, f"{show(v)} is outside [0, 1]")
            if p.usual is not None and not p.usual[0] <= f <= p.usual[1]:
                self.warnings.append(f"{self.loc.where(*path)}: {show(v)} is outside "
                                     f"[{p.usual[0]:g}, {p.usual[1]:g}] (extrapolation)")
            return f
        if kind == "rank":
            return self._rank(p, v, path)
        if kind == "int":
            v = _spelled(v, integral_string)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise self.loc.error(path, f"'{p.name}' must be an integer ≥ 1, got {show(v)}")
            return v
        if kind == "bool":
            if not isinstance(v, bool):
                raise self.loc.error(path, f"'{p.name}' must be true or false, got {show(v)}")
            return v
        if kind == "rescale":
            if not (isinstance(v, bool) or v == "l1"):
                raise self.loc.error(path, f"'{p.name}' must be true, false or \"l1\", "
                                           f"got {show(v)}")
            return v
        if kind == "choice":
            if not isinstance(v, str) or v not in p.choices:
                hint = suggest(v, p.choices) if isinstance(v, str) else ""
                raise self.loc.error(path, f"'{p.name}' must be one of {', '.join(p.choices)}; "
                                           f"got {show(v)}{hint}")
            return v
        return v  # structured / kinds this validator does not know: taken as is

    def _rank(self, p: ParamSpec, v: Any, path: tuple) -> float | int:
        """A fraction of full rank in (0, 1], an absolute rank (int ≥ 1), or "full" (1.0)."""
        if v == "full":
            return 1.0
        v = _spelled(v, numeric_string)
        if isinstance(v, bool) or not is_number(v):
            raise self.loc.error(path, f"'{p.name}' must be a fraction in (0, 1], an integer "
                                       f"rank ≥ 1 or \"full\"; got {show(v)}")
        if isinstance(v, int):
            if v < 1:
                raise self.loc.error(path, f"an absolute rank must be at least 1, got {v}")
            if v == 1:
                self.warnings.append(f"{self.loc.where(*path)}: '{p.name}: 1' is the absolute "
                                     "rank 1, not full rank (write 1.0 or full for that)")
            return v
        if not (math.isfinite(v) and 0.0 < v <= 1.0):
            raise self.loc.error(path, f"a rank fraction must be in (0, 1], got {show(v)}")
        return float(v)

    def note_ineffective(self, p: ParamSpec, path: tuple) -> None:
        if not p.effective and p.name not in self.warned_ineffective:
            self.warned_ineffective.add(p.name)
            self.warnings.append(f"{self.loc.where(*path)}: '{p.name}' has no effect for "
                                 f"merge_method '{self.spec.name}' (accepted for mergekit "
                                 "compatibility)")
