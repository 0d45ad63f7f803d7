"""The shape of the recipe document (docs/recipe.md §1), as pydantic models.

Unknown keys are errors (with a ``difflib`` suggestion) except the documented extension keys.
mergekit keys the project does not implement yet are refused with a clear message before the
schema runs. Model references, dtype names and parameter values are typed loosely here
(``Any``) and checked by ``refs``/``validate``, which give more precise messages.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError

from mergekit_like.errors import MergeError
from mergekit_like.recipe.yaml_lines import Locator

MERGEKIT_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype",
                 "out_dtype", "tokenizer_source", "tokenizer", "chat_template")
EXTENSION_KEYS = ("seed", "vocab_policy", "on_missing_tensor", "on_extra_tensor")
TOP_LEVEL_KEYS = MERGEKIT_KEYS + EXTENSION_KEYS
ENTRY_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")

UNSUPPORTED_KEYS = {
    "modules": "per-module recipes ('modules', for multi-module architectures such as "
               "vision-language models) are not supported; use 'models:' or 'slices:', which "
               "merge every tensor of the checkpoint",
}


class EntryDoc(BaseModel):
    """One ``models`` entry. Extra keys are allowed here and checked against the method's own
    entry keys (twin/wemoe ``name``) by the validator."""

    model_config = ConfigDict(extra="allow")
    model: Any
    parameters: dict[Any, Any] | None = None


class SourceDoc(BaseModel):
    """One source of a slice: a model and the layers [a, b) it contributes."""

    model_config = ConfigDict(extra="forbid")
    model: Any
    layer_range: Any
    parameters: dict[Any, Any] | None = None


class SliceDoc(BaseModel):
    """One output slice (docs/recipe.md §8)."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SourceDoc]
    base_model: Any = None
    parameters: dict[Any, Any] | None = None
    residual_weight: Any = None


class RecipeDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: StrictStr
    base_model: Any = None
    models: list[EntryDoc] | None = None
    slices: list[SliceDoc] | None = None
    parameters: dict[Any, Any] | None = None
    dtype: Any = None
    out_dtype: Any = None
    tokenizer_source: Any = None
    tokenizer: Any = None
    chat_template: Any = None
    seed: StrictInt | None = None
    vocab_policy: Literal["common", "error"] = "common"
    on_missing_tensor: Literal["error", "skip"] = "error"
    on_extra_tensor: Literal["error", "ignore"] = "error"


def suggest(word: str, options: list[str] | tuple[str, ...]) -> str:
    """``"; did you mean 'x'?"`` or ``""`` (difflib, case-insensitive)."""
    low = {o.lower(): o for o in options}
    hits = difflib.get_close_matches(str(word).lower(), list(low), n=1, cutoff=0.6)
    return f"; did you mean '{low[hits[0]]}'?" if hits else ""


def unknown_key(loc: Locator, path: tuple, known: tuple[str, ...] | list[str],
                what: str = "unknown key") -> MergeError:
    key = path[-1]
    return loc.error(path, f"{what}{suggest(str(key), known)} (known: {', '.join(known)})")


def type_name(v: Any) -> str:
    """How an error message shows a recipe value: null, true/false, a list, a map, or repr."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a map"
    return repr(v)


def _translate(err: dict, data: dict, loc: Locator) -> MergeError:
    path = tuple(err["loc"])
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        return unknown_key(loc, path, _known_keys(path))
    if kind == "missing":
        field = path[-1]
        parent = path[:-1]
        if field == "merge_method":
            return loc.error((), "'merge_method' is required (the merge operator, e.g. ties)")
        if field == "model":
            return loc.error(parent, "'model' is required (the model reference of this entry)")
        if field == "layer_range":
            return loc.error(parent, "'layer_range' is required (the layers [a, b) this source "
                                     "contributes)")
        return loc.error(parent, f"'{field}' is required")
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return loc.error(path, f"{type_name(value)} is not allowed; use {expected}")
    if kind in ("string_type",):
        return loc.error(path, f"expected a string, got {type_name(value)}")
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return loc.error(path, f"expected an integer, got {type_name(value)}")
    if kind in ("list_type",):
        return loc.error(path, f"expected a list, got {type_name(value)}")
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        what = "a map like {model: org/name, parameters: {...}}" if path[:1] == ("models",) \
            and len(path) == 2 else "a map"
        return loc.error(path, f"expected {what}, got {type_name(value)}")
    return loc.error(path, err.get("msg", "invalid value"))  # pragma: no cover - fallback


def _known_keys(path: tuple) -> tuple[str, ...]:
    """The keys allowed where an unknown ``path[-1]`` was found."""
    if len(path) == 1:
        return TOP_LEVEL_KEYS
    if path[0] == "slices":
        return SLICE_KEYS if len(path) == 3 else SOURCE_KEYS
    return ENTRY_KEYS


def check_document(data: Any, loc: Locator) -> RecipeDoc:
    """Schema check of the whole document; raises the first error in file order."""
    if data is None:
        raise loc.error((), "the recipe is empty")
    if not isinstance(data, dict):
        raise loc.error((), f"the recipe must be a YAML mapping of keys, got {type_name(data)}")
    for key in data:
        if not isinstance(key, str):
            raise loc.error((key,), "keys must be strings")
    for key, message in UNSUPPORTED_KEYS.items():
        if key in data:
            raise loc.error((key,), message)
    try:
        doc = RecipeDoc.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        errors.sort(key=lambda e: (loc.line(*e["loc"]) or 0))
        first = errors[0]
        if first["type"] == "missing":  # a misspelt key is the better message: 'layers' for
            first = next((e for e in errors if e["type"] == "extra_forbidden"  # 'layer_range'
                          and tuple(e["loc"][:-1]) == tuple(first["loc"][:-1])), first)
        raise _translate(first, data, loc) from None
    if doc.models is not None and doc.slices is not None:
        raise loc.error(("slices",), "a recipe has either 'models' or 'slices', not both")
    if doc.slices is not None and not doc.slices:
        raise loc.error(("slices",), "'slices' is empty; list at least one slice")
    return doc
