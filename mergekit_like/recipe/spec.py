"""What a merge method declares to the recipe validator: its parameters (``ParamSpec``) and
its shape (``MethodSpec``: base or not, how many inputs). The method adapters (methods/,
twin/, wemoe/, rcp/) build these; the validator reads them from the method table it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REQUIRED: Any = object()
"""Sentinel default of a parameter that must be set in the recipe."""

# Parameter kinds understood by the recipe validator.
#   "float":   finite float (bools rejected)           "density": float in [0, 1]
#   "bool":    bool, no gradients                       "rescale": true | false | "l1"
#   "choice":  one of ParamSpec.choices (str)           "structured": a map taken as is
#   "rank":    a fraction in (0, 1], an int ≥ 1 or "full" (docs/methods/twin.md §2)
#   "int":     an integer ≥ 1                           "penalty": a float ≥ 0, .inf allowed
PARAM_KINDS = ("float", "density", "bool", "rescale", "choice", "structured", "rank", "int",
               "penalty")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: str
    default: Any = REQUIRED
    per_model: bool = False
    choices: tuple[str, ...] = ()
    effective: bool = True
    """False: accepted for mergekit compatibility, but has no effect (the validator warns once)."""
    usual: tuple[float, float] | None = None
    """A float's usual range: a value outside it is accepted with a warning (slerp's t in
    [0, 1] extrapolates)."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: tuple[ParamSpec, ...]
    needs_base: bool = True
    base_joins_inputs: bool = False
    """linear: an unlisted base_model becomes an ordinary weighted input."""
    min_inputs: int = 1
    """Minimum number of method inputs (non-base models; all models when base_joins_inputs)."""
    exact_inputs: int | None = None
    """slerp: exactly this many models, base included."""

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]
