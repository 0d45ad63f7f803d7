"""The validated recipe (the result of phase A) and parameter resolution (docs/recipe.md §4)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from mergekit_like.dtypes import TORCH_TO_NAME
from mergekit_like.errors import MergeError
from mergekit_like.recipe.spec import REQUIRED, MethodSpec, ParamSpec
from mergekit_like.recipe.params import NO_VALUE, Setting, canonical, evaluate
from mergekit_like.recipe.refs import ModelRef
from mergekit_like.recipe.yaml_lines import Locator, dotted


@dataclass
class InputModel:
    """One method input. ``index`` is the position in ``models`` as written (an appended base
    gets ``len(models)``); ``entry_params`` the parsed per-model settings under
    ``models[index].parameters`` that apply (ignored ones dropped); ``extra`` the method's own
    entry keys (e.g. twin's ``name``)."""

    ref: ModelRef
    index: int
    is_base: bool
    entry_params: dict[str, Setting]
    extra: dict[str, Any] = field(default_factory=dict)
    listed: bool = True
    """False for a base_model that is not listed under models (appended)."""
    where: tuple = ()
    """Its recipe path when it is not ``models[index]``: ``("slices", k, "sources", i)``."""


@dataclass
class SliceSource:
    """One source of an output slice: an input (``InputModel``, its per-source parameters in
    ``entry_params``) and the layers [start, stop) it contributes."""

    inp: InputModel
    start: int
    stop: int


@dataclass
class SliceSpec:
    """One entry of ``slices`` (docs/recipe.md §8): its sources (equal layer counts), the base
    the method takes against (the slice's ``base_model``, else the recipe's, when it is one of
    the sources) and the slice's own ``parameters`` (between a source's and the top level)."""

    index: int
    sources: list[SliceSource]
    base: ModelRef | None
    params: dict[str, Setting]

    @property
    def num_layers(self) -> int:
        return self.sources[0].stop - self.sources[0].start


@dataclass
class Recipe:
    path: Path
    text: str
    display: str
    merge_method: str
    method: Any
    spec: MethodSpec
    base: ModelRef | None
    inputs: list[InputModel]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    tokenizer_source: ModelRef | None
    chat_template: str | None
    seed: int
    vocab_policy: str
    on_missing_tensor: str
    on_extra_tensor: str
    warnings: list[str]
    top_params: dict[str, Setting]
    locator: Locator
    methods: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The method table the recipe was validated with (a sub-recipe, twin's ``shared``, looks
    its operator up here)."""
    slices: list[SliceSpec] | None = None
    """The ``slices`` form (docs/recipe.md §8); None for the ``models`` form. ``inputs`` then
    lists each distinct model once (no parameters); ``slice_view(k)`` is slice k as a recipe."""
    vocab: Any = None
    """``recipe.vocab.VocabSpec`` when the recipe merges vocabularies (tokenizer_source or the
    tokenizer block set), else None."""
    slice_params: dict[str, Setting] = field(default_factory=dict)
    """A slice view's own ``parameters``: consulted after a source's, before the top level."""

    # ------------------------------------------------------------ convenience
    @property
    def base_input(self) -> InputModel | None:
        return next((m for m in self.inputs if m.is_base), None)

    @property
    def reference(self) -> ModelRef:
        """The reference model: base_model if set, else the first model (docs/recipe.md §1)."""
        return self.base if self.base is not None else self.inputs[0].ref

    @property
    def non_base_inputs(self) -> list[InputModel]:
        return [m for m in self.inputs if not m.is_base]

    def all_refs(self) -> list[ModelRef]:
        """Every distinct model reference (inputs, then a tokenizer donor that is not an input):
        phase B pins each Hub ref by setting ``ref.sha``."""
        refs = [m.ref for m in self.inputs]
        if self.tokenizer_source is not None and all(r is not self.tokenizer_source for r in refs):
            refs.append(self.tokenizer_source)
        return refs

    def where(self, *path: Any) -> str:
        """``recipe.yml:7 models[1].parameters.weight`` (line of that key, dotted path)."""
        return self.locator.where(*path)

    def input_label(self, inp: InputModel) -> str:
        """``models[1] (org/code-8b)``, ``slices[0].sources[1] (org/x)``, or ``base_model
        (org/base)`` for an appended base."""
        if not inp.listed:
            return f"base_model ({inp.ref.display})"
        if inp.where:
            return f"{dotted(inp.where)} ({inp.ref.display})"
        return f"models[{inp.index}] ({inp.ref.display})"

    def _input_path(self, inp: InputModel) -> tuple:
        if inp.where:
            return inp.where
        return ("models", inp.index) if inp.listed else ("base_model",)

    @property
    def models_path(self) -> tuple:
        """Where the inputs are listed: ``("models",)``, or ``("slices", k, "sources")`` in a
        slice view."""
        first = self.inputs[0].where if self.inputs else ()
        return first[:3] if first else ("models",)

    def slice_view(self, k: int) -> "Recipe":
        """Slice k as a ``models``-form recipe: its sources as the inputs (each with its own
        parameters), its base, its parameters as ``slice_params``."""
        sl = self.slices[k]
        inputs = [src.inp for src in sl.sources]
        return replace(self, inputs=inputs, base=sl.base, slices=None, slice_params=sl.params)

    def _param_spec(self, name: str) -> ParamSpec:
        p = self.spec.param(name)
        if p is None:
            raise KeyError(f"method '{self.merge_method}' has no parameter '{name}'")
        return p

    # ------------------------------------------------------------ resolution (§4)
    def model_param(self, name: str, inp: InputModel, tensor: str, t: float) -> Any:
        """Per-model parameter ``name`` of ``inp`` on ``tensor`` at layer position ``t``:
        models[i].parameters, then top-level parameters, then the method default. The base of a
        task-vector method gets None. Raises MergeError when a required value is missing."""
        p = self._param_spec(name)
        if not p.per_model:
            raise ValueError(f"'{name}' is method-wide; use method_param")
        if inp.is_base and not self.spec.base_joins_inputs:
            return None
        own = inp.entry_params.get(name)
        mid = self.slice_params.get(name)
        top = self.top_params.get(name)
        v = _first_value((own, mid, top), p.default, tensor, t)
        if v is not NO_VALUE:
            return v
        if own is not None:
            line_path = self._input_path(inp) + ("parameters", name)
        elif mid is not None and inp.where:
            line_path = inp.where[:2] + ("parameters", name)
        elif top is not None:
            line_path = ("parameters", name)
        else:
            line_path = self._input_path(inp)
        why = ("it is not set" if own is None and mid is None and top is None
               else "no filter matched and there is no catch-all entry")
        raise MergeError(f"{self.locator.at(line_path, self.input_label(inp))}: '{name}' has no "
                         f"value for tensor '{tensor}' ({why})")

    def model_params(self, inp: InputModel, tensor: str, t: float) -> dict[str, Any]:
        """Every per-model parameter of ``inp`` (None for the base of a task-vector method)."""
        return {p.name: self.model_param(p.name, inp, tensor, t)
                for p in self.spec.params if p.per_model}

    def method_param(self, name: str, tensor: str, t: float) -> Any:
        """Method-wide parameter: top-level parameters, then the method default."""
        p = self._param_spec(name)
        if p.per_model:
            raise ValueError(f"'{name}' is a per-model parameter; use model_param")
        top = self.top_params.get(name)
        mid = self.slice_params.get(name)
        v = _first_value((mid, top), p.default, tensor, t)
        if v is not NO_VALUE:
            return v
        why = "it is not set" if top is None and mid is None else \
            "no filter matched and there is no catch-all entry"
        raise MergeError(f"{self.where('parameters', name)}: '{name}' has no value for tensor "
                         f"'{tensor}' ({why})")

    def method_params(self, tensor: str, t: float) -> dict[str, Any]:
        return {p.name: self.method_param(p.name, tensor, t)
                for p in self.spec.params if not p.per_model}

    # ------------------------------------------------------------ resolved form (§7)
    def resolved(self) -> dict[str, Any]:
        """Canonical JSON-able form: defaults filled in, Hub refs at their commit sha when known
        (``ModelRef.sha``), ignored values dropped, floats normalised."""
        models = []
        for inp in self.inputs:
            params: dict[str, Any] = {}
            if not inp.is_base or self.spec.base_joins_inputs:
                for p in self.spec.params:
                    if not p.per_model:
                        continue
                    if p.name in inp.entry_params:
                        params[p.name] = _jsonable(canonical(inp.entry_params[p.name]))
                    elif p.name not in self.top_params and p.default is not REQUIRED:
                        params[p.name] = _jsonable(p.default)
            entry = {"model": inp.ref.resolved(), "index": inp.index, "is_base": inp.is_base,
                     "parameters": params}
            if inp.extra:
                entry["extra"] = _jsonable(inp.extra)
            models.append(entry)
        top: dict[str, Any] = {}
        for p in self.spec.params:
            if p.name in self.top_params:
                top[p.name] = _jsonable(canonical(self.top_params[p.name]))
            elif not p.per_model and p.default is not REQUIRED:
                top[p.name] = _jsonable(p.default)
        resolved = {
            "merge_method": self.merge_method,
            "base_model": self.base.resolved() if self.base is not None else None,
            "models": models,
            "parameters": _jsonable(top),
            "dtype": TORCH_TO_NAME[self.dtype] if self.dtype is not None else None,
            "out_dtype": TORCH_TO_NAME[self.out_dtype] if self.out_dtype is not None else None,
            "tokenizer_source": (self.tokenizer_source.resolved()
                                 if self.tokenizer_source is not None else "default"),
            "chat_template": self.chat_template,
            "seed": self.seed,
            "vocab_policy": self.vocab_policy,
            "on_missing_tensor": self.on_missing_tensor,
            "on_extra_tensor": self.on_extra_tensor,
        }
        if self.vocab is not None:
            resolved["vocab"] = self.vocab.resolved()
        if self.slices is not None:
            resolved["slices"] = [self._resolved_slice(k) for k in range(len(self.slices))]
        return resolved

    def _resolved_slice(self, k: int) -> dict[str, Any]:
        sl = self.slices[k]
        view = self.slice_view(k).resolved()
        for entry, src in zip(view["models"], sl.sources):
            entry["layer_range"] = [src.start, src.stop]
        return {"sources": view["models"], "base_model": view["base_model"],
                "parameters": _jsonable({n: canonical(s) for n, s in sl.params.items()})}

    def resolved_json(self) -> str:
        """``resolved()`` as canonical JSON: sorted keys, compact separators."""
        return json.dumps(self.resolved(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)

    def resolved_hash(self) -> str:
        """sha256 hex of ``resolved_json()`` (the resume key's recipe part, the grid run id)."""
        return hashlib.sha256(self.resolved_json().encode("utf-8")).hexdigest()


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _first_value(levels, default: Any, tensor: str, t: float) -> Any:
    """§4 precedence: the first level (a setting, or None when unset) that yields a value for
    ``tensor`` at ``t``, else the method default; NO_VALUE when neither applies."""
    for setting in levels:
        if setting is not None:
            v = evaluate(setting, tensor, t)
            if v is not NO_VALUE:
                return v
    return NO_VALUE if default is REQUIRED else default
