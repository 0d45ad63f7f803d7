"""Parameter values (docs/recipe.md §3) and layer positions.

A setting is parsed once into one of:

* ``Scalar(value)``: float, int, bool or str;
* ``Gradient(values)``: a list of numbers, interpolated over the layer position t;
* ``Steps(values)``: a list of non-numbers, ``L[int(t*(n-1))]``;
* ``Conditional(entries)``: ``{filter, value}`` entries, first plain-substring match wins; no
  match yields nothing (the caller falls through to the next precedence level);
* ``Structured(value)``: a map a method declares as such, taken as is.

``evaluate(setting, tensor, t)`` returns the value or ``NO_VALUE``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from mergekit_like.errors import MergeError
from mergekit_like.io.layers import LAYER_RE, config_num_layers, layer_index, layer_stacks  # noqa: F401


class _NoValue:
    _inst = None

    def __new__(cls):
        if cls._inst is None:
            cls._inst = super().__new__(cls)
        return cls._inst

    def __repr__(self) -> str:
        return "NO_VALUE"

    def __bool__(self) -> bool:
        return False


NO_VALUE: Any = _NoValue()
"""What a conditional yields when no entry matches."""


@dataclass(frozen=True)
class Scalar:
    value: Any


@dataclass(frozen=True)
class Gradient:
    values: tuple[float, ...]


@dataclass(frozen=True)
class Steps:
    values: tuple[Any, ...]


@dataclass(frozen=True)
class CondEntry:
    filter: str | None
    value: Scalar | Gradient | Steps


@dataclass(frozen=True)
class Conditional:
    entries: tuple[CondEntry, ...]
    single: bool = field(default=False, compare=False)
    """Written as one {filter, value} map rather than a list (only changes error locations)."""

    def sub(self, i: int) -> tuple:
        """Subpath of entry i relative to the parameter, as the YAML writes it."""
        return () if self.single else (i,)

    @property
    def has_catch_all(self) -> bool:
        return any(e.filter is None or e.filter in ("*", "") for e in self.entries)


@dataclass(frozen=True)
class Structured:
    value: Any


Setting = Scalar | Gradient | Steps | Conditional | Structured


class SettingFormError(ValueError):
    """A malformed setting; ``subpath`` is relative to the parameter's own path."""

    def __init__(self, subpath: tuple, message: str):
        super().__init__(message)
        self.subpath = subpath
        self.message = message


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_FLOAT_RE = re.compile(r"[+-]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity|nan)",
                       re.IGNORECASE)
_INT_RE = re.compile(r"[+-]?\d+")
_WHOLE_RE = re.compile(r"[+-]?\d+(?:\.0*)?")


def numeric_string(x: Any) -> int | float | None:
    """The number a string spells, as pydantic's float does for mergekit: ``"1e6"``,
    ``"-2.5E-3"``, ``".5"``, ``"+3"``, ``"inf"`` (YAML 1.1 reads ``1e6`` and ``5e-1`` as
    strings; only ``1.0e+6`` is a float to it). Digits only give an int. None for anything else,
    non-strings included."""
    if not isinstance(x, str):
        return None
    t = x.strip()
    if _INT_RE.fullmatch(t):
        return int(t)
    return float(t) if _FLOAT_RE.fullmatch(t) else None


def integral_string(x: Any) -> int | None:
    """The int a string spells (``"8"``, ``"+3"``, ``"8.0"``, as pydantic's int takes them)."""
    if not isinstance(x, str) or not _WHOLE_RE.fullmatch(x.strip()):
        return None
    return int(x.strip().split(".")[0])


def is_number_like(x: Any) -> bool:
    """A number, or a string that spells one (``numeric_string``)."""
    return is_number(x) or numeric_string(x) is not None


def numeric_lists(setting: "Setting") -> "Setting":
    """For a numeric parameter: step lists whose every item is a number or spells one become
    gradients of numbers (``[1e-3, 5e-1]`` is a gradient, not two steps)."""
    if isinstance(setting, Steps) and all(is_number_like(v) for v in setting.values):
        return Gradient(tuple(v if is_number(v) else numeric_string(v) for v in setting.values))
    if isinstance(setting, Conditional):
        return Conditional(tuple(CondEntry(e.filter, numeric_lists(e.value))
                                 for e in setting.entries), single=setting.single)
    return setting


def _is_cond_map(x: Any) -> bool:
    return isinstance(x, dict) and "value" in x and set(x) <= {"filter", "value"}


def _plain(raw: Any, subpath: tuple) -> Scalar | Gradient | Steps:
    """A scalar, gradient or step list (the forms allowed as a conditional's value)."""
    if isinstance(raw, list):
        if not raw:
            raise SettingFormError(subpath, "an empty list is not a value")
        for i, x in enumerate(raw):
            if isinstance(x, (list, dict)):
                raise SettingFormError(subpath + (i,), "a gradient or step list holds plain "
                                                       "values only (no nested lists or maps)")
        if all(is_number(x) for x in raw):
            return Gradient(tuple(raw))
        return Steps(tuple(raw))
    if isinstance(raw, dict):
        raise SettingFormError(subpath, "a conditional's value must be a plain value or a "
                                        "gradient (conditionals do not nest)")
    return Scalar(raw)


def parse_setting(raw: Any, structured: bool = False) -> Setting:
    """Parse one parameter setting into its form (kinds and ranges are checked elsewhere).

    Leaf values are kept as written; raises ``SettingFormError`` on a malformed setting.
    """
    if structured:
        return Structured(raw)
    if isinstance(raw, dict):
        if not _is_cond_map(raw):
            bad = [str(k) for k in raw if k not in ("filter", "value")]
            if "value" not in raw and not bad:
                raise SettingFormError((), "a {filter, value} entry needs 'value'")
            raise SettingFormError((), "expected a value, a list, or {filter, value} entries; "
                                       f"unexpected key(s): {', '.join(bad)}")
        raw = [raw]  # a single {filter, value} map is a one-element conditional
        single = True
    else:
        single = False
    if isinstance(raw, list) and raw and any(isinstance(x, dict) for x in raw):
        entries = []
        for i, item in enumerate(raw):
            sub = () if single else (i,)
            if not isinstance(item, dict):
                raise SettingFormError(sub, "mixes {filter, value} entries with plain values")
            bad = [str(k) for k in item if k not in ("filter", "value")]
            if bad:
                raise SettingFormError(sub + (bad[0],), "unknown key in a conditional entry "
                                                        "(known: filter, value)")
            if "value" not in item:
                raise SettingFormError(sub, "a {filter, value} entry needs 'value'")
            flt = item.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise SettingFormError(sub + ("filter",), "a filter must be a string (a plain "
                                                          "substring of the tensor name)")
            entries.append(CondEntry(flt, _plain(item["value"], sub + ("value",))))
        return Conditional(tuple(entries), single=single)
    return _plain(raw, ())


def leaves(setting: Setting) -> Iterator[tuple[tuple, Any]]:
    """Every literal leaf as (subpath relative to the parameter, value); none for Structured."""
    if isinstance(setting, Scalar):
        yield (), setting.value
    elif isinstance(setting, (Gradient, Steps)):
        for i, v in enumerate(setting.values):
            yield (i,), v
    elif isinstance(setting, Conditional):
        for i, e in enumerate(setting.entries):
            for sub, v in leaves(e.value):
                yield setting.sub(i) + ("value",) + sub, v


def map_leaves(setting: Setting, fn) -> Setting:
    """The same setting with every literal leaf replaced by ``fn(subpath, value)``."""
    if isinstance(setting, Scalar):
        return Scalar(fn((), setting.value))
    if isinstance(setting, Gradient):
        return Gradient(tuple(fn((i,), v) for i, v in enumerate(setting.values)))
    if isinstance(setting, Steps):
        return Steps(tuple(fn((i,), v) for i, v in enumerate(setting.values)))
    if isinstance(setting, Conditional):
        return Conditional(tuple(
            CondEntry(e.filter, map_leaves(
                e.value, lambda sub, v, i=i: fn(setting.sub(i) + ("value",) + sub, v)))
            for i, e in enumerate(setting.entries)), single=setting.single)
    return setting


def interpolate(values: Iterable[float], t: float) -> float:
    """The layer gradient, in Python floats and in exactly this order (mergekit bit for bit):
    ``s = t*(n-1); i0 = int(s); i1 = min(n-1, i0+1); f = s - i0; v = (1-f)*L[i0] + f*L[i1]``."""
    L = list(values)
    n = len(L)
    s = t * (n - 1)
    i0 = int(s)
    i1 = min(n - 1, i0 + 1)
    f = s - i0
    return (1 - f) * L[i0] + f * L[i1]


def step_value(values: Iterable[Any], t: float) -> Any:
    """A step list: ``L[int(t*(n-1))]``."""
    L = list(values)
    return L[int(t * (len(L) - 1))]


def filter_matches(flt: str | None, tensor: str) -> bool:
    """Absent, ``"*"`` or a plain substring of the tensor name (not a regex, not a glob)."""
    return flt is None or flt == "*" or flt in tensor


def evaluate(setting: Setting, tensor: str, t: float) -> Any:
    """The setting's value for tensor ``tensor`` at layer position ``t``, or ``NO_VALUE``."""
    if isinstance(setting, Scalar):
        return setting.value
    if isinstance(setting, Gradient):
        return interpolate(setting.values, t)
    if isinstance(setting, Steps):
        return step_value(setting.values, t)
    if isinstance(setting, Conditional):
        for e in setting.entries:
            if filter_matches(e.filter, tensor):
                return evaluate(e.value, tensor, t)
        return NO_VALUE
    if isinstance(setting, Structured):
        return setting.value
    raise TypeError(f"not a setting: {setting!r}")


def canonical(setting: Setting) -> Any:
    """JSON-able canonical form (for the resolved recipe and its hash)."""
    if isinstance(setting, Scalar):
        return setting.value
    if isinstance(setting, (Gradient, Steps)):
        return list(setting.values)
    if isinstance(setting, Conditional):
        return [{"filter": e.filter, "value": canonical(e.value)} for e in setting.entries]
    if isinstance(setting, Structured):
        return setting.value
    raise TypeError(f"not a setting: {setting!r}")


# ---------------------------------------------------------------- layer positions

def layer_positions(tensor_names: Iterable[str], num_layers_from_config: int | None,
                    source: str | None = None) -> dict[str, float]:
    """Layer position t of every tensor: ``i/(N-1)`` (``1`` when N == 1) inside a stack of N
    layers, ``0`` outside any stack (embeddings, final norm, lm_head).

    Raises MergeError when the largest stack disagrees with ``num_layers_from_config`` (None: no
    check; a model without any stack is not checked). ``source`` names the model in the message.
    """
    names = list(tensor_names)
    stacks = layer_stacks(names)
    if stacks and num_layers_from_config is not None:
        prefix = max(stacks, key=lambda p: stacks[p])
        if stacks[prefix] != num_layers_from_config:
            who = f"{source}: " if source else ""
            raise MergeError(f"{who}the largest layer stack '{prefix}' has {stacks[prefix]} "
                             f"layers but config.json says {num_layers_from_config} "
                             "(num_hidden_layers)")
    out: dict[str, float] = {}
    for name in names:
        li = layer_index(name)
        if li is None:
            out[name] = 0.0
            continue
        prefix, i = li
        n = stacks[prefix]
        out[name] = i / (n - 1) if n > 1 else 1.0
    return out
