"""Phase A for the ``slices`` form (docs/recipe.md §8): each slice's sources, layer ranges,
parameters and base, checked from the recipe alone.

A slice lists sources ``{model, layer_range: [a, b], parameters}``, all with the same number of
layers b − a; the slices are stacked in order into the output's layers. Parameters resolve
source → slice → top level → method default (mergekit's ``ConfigReader``). A slice's base is
its own ``base_model``, else the recipe's; a method that takes task vectors needs it among the
slice's sources.
"""

from __future__ import annotations

from typing import Any

from mergekit_like.recipe.checker import Checker
from mergekit_like.recipe.checker import show as _show
from mergekit_like.recipe.model import InputModel, SliceSource, SliceSpec
from mergekit_like.recipe.params import Setting
from mergekit_like.recipe.refs import ModelRef, parse_ref
from mergekit_like.recipe.schema import RecipeDoc, unknown_key
from mergekit_like.recipe.spec import REQUIRED, MethodSpec
from mergekit_like.recipe.yaml_lines import Locator


def build_slices(doc: RecipeDoc, spec: MethodSpec, checker: Checker, loc: Locator,
                 base: ModelRef | None, top_params: dict[str, Setting], warnings: list[str]
                 ) -> tuple[list[InputModel], list[SliceSpec]]:
    """(every distinct model once, in first-seen order, base_model last when no slice lists
    it; the checked slices). One ModelRef object per model, so a Hub sha pinned in phase B
    reaches every slice."""
    refs: dict[tuple, ModelRef] = {} if base is None else {base.key: base}
    slices = []
    for k, sl in enumerate(doc.slices or []):
        where = ("slices", k)
        slice_base = base
        if sl.base_model is not None:
            slice_base = _shared(parse_ref(sl.base_model, loc, where + ("base_model",), warnings),
                                 refs)
        if sl.residual_weight is not None:
            warnings.append(f"{loc.where(*where, 'residual_weight')}: ignored (mergekit reads it "
                            "but no merge method uses it)")
        if not sl.sources:
            raise loc.error(where + ("sources",), "a slice needs at least one source")
        sources = [_source(k, i, src, slice_base, refs, loc, warnings)
                   for i, src in enumerate(sl.sources)]
        _check_lengths(k, sources, loc)
        params = _params(sl.parameters or {}, spec, checker, loc, where + ("parameters",),
                         per_model_ok=True)
        for src in sources:
            _source_params(src.inp, sl.sources[src.inp.index].parameters or {}, spec, checker,
                           loc, warnings)
        has_base = slice_base is not None and any(s.inp.is_base for s in sources)
        _check_slice_inputs(k, spec, sources, slice_base, has_base, loc)
        _check_required(k, spec, sources, params, top_params, loc)
        slices.append(SliceSpec(k, sources, slice_base if has_base else None, params))
    first_use: dict[tuple, tuple] = {}
    for sl in slices:
        for s in sl.sources:
            first_use.setdefault(s.inp.ref.key, s.inp.where)
    order = [r for r in refs.values() if r is not base] + ([base] if base is not None else [])
    inputs = [InputModel(ref, i, ref is base, {}, listed=ref.key in first_use,
                         where=first_use.get(ref.key, ())) for i, ref in enumerate(order)]
    return inputs, slices


def _shared(ref: ModelRef, refs: dict[tuple, ModelRef]) -> ModelRef:
    return refs.setdefault(ref.key, ref)


def _source(k: int, i: int, src: Any, base: ModelRef | None, refs: dict[tuple, ModelRef],
            loc: Locator, warnings: list[str]) -> SliceSource:
    where = ("slices", k, "sources", i)
    ref = _shared(parse_ref(src.model, loc, where + ("model",), warnings), refs)
    start, stop = _layer_range(src.layer_range, loc, where + ("layer_range",))
    inp = InputModel(ref, i, base is not None and ref.key == base.key, {}, where=where)
    return SliceSource(inp, start, stop)


def _layer_range(raw: Any, loc: Locator, path: tuple) -> tuple[int, int]:
    """[a, b) with 0 ≤ a < b, both integers."""
    ok = isinstance(raw, (list, tuple)) and len(raw) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in raw)
    if not ok:
        raise loc.error(path, f"expected two integers [first, end), got {_show(raw)}")
    a, b = raw
    if a < 0 or b <= a:
        raise loc.error(path, f"[{a}, {b}] is not a layer range: need 0 ≤ first < end (end is "
                              "exclusive)")
    return a, b


def _check_lengths(k: int, sources: list[SliceSource], loc: Locator) -> None:
    """Every source of a slice contributes the same number of layers (mergekit's rule)."""
    first = sources[0].stop - sources[0].start
    for src in sources[1:]:
        n = src.stop - src.start
        if n != first:
            raise loc.error(("slices", k, "sources", src.inp.index, "layer_range"),
                            f"{n} layers, but sources[0] has {first}; every source of a slice "
                            "contributes the same number of layers")
    seen: dict[tuple, int] = {}
    for src in sources:
        i = seen.setdefault(src.inp.ref.key, src.inp.index)
        if i != src.inp.index:
            raise loc.error(("slices", k, "sources", src.inp.index, "model"),
                            f"'{src.inp.ref.display}' is already sources[{i}] of this slice")


def _params(raw: dict, spec: MethodSpec, checker: Checker, loc: Locator, path: tuple, *,
            per_model_ok: bool) -> dict[str, Setting]:
    """A parameters map checked like the top level's (names, kinds, ranges)."""
    out: dict[str, Setting] = {}
    for key, value in raw.items():
        p = spec.param(key) if isinstance(key, str) else None
        if p is None or (p.per_model and not per_model_ok):
            raise unknown_key(loc, path + (key,), spec.param_names,
                              f"unknown parameter for method '{spec.name}'")
        out[key] = checker.setting(p, value, path + (key,))
        checker.note_ineffective(p, path + (key,))
    return out


def _source_params(inp: InputModel, raw: dict, spec: MethodSpec, checker: Checker,
                   loc: Locator, warnings: list[str]) -> None:
    """A source's ``parameters`` into ``inp.entry_params``; method-wide ones, or any on the
    slice's base when the method uses it only as the base, are warned about and ignored."""
    for key, value in raw.items():
        path = inp.where + ("parameters", key)
        p = spec.param(key) if isinstance(key, str) else None
        if p is None:
            raise unknown_key(loc, path, spec.param_names,
                              f"unknown parameter for method '{spec.name}'")
        if not p.per_model or (inp.is_base and not spec.base_joins_inputs):
            why = ("is method-wide; set it under the slice's or the top-level parameters"
                   if not p.per_model else "is ignored on the base, which this method uses "
                                           "only as the base")
            warnings.append(f"{loc.where(*path)}: '{key}' {why}")
            continue
        inp.entry_params[key] = checker.setting(p, value, path)
        checker.note_ineffective(p, path)


def _check_slice_inputs(k: int, spec: MethodSpec, sources: list[SliceSource],
                        base: ModelRef | None, has_base: bool, loc: Locator) -> None:
    """The method's base and input counts, per slice."""
    where = ("slices", k, "sources")
    if spec.needs_base and not has_base:
        what = (f"base_model '{base.display}' is not among this slice's sources" if base
                is not None else "there is no base_model (set one at the top or on the slice)")
        raise loc.error(("slices", k), f"merge_method '{spec.name}' needs the base among each "
                                       f"slice's sources, and {what}")
    joining = [s for s in sources if spec.base_joins_inputs or not s.inp.is_base]
    if spec.exact_inputs is not None and len(sources) != spec.exact_inputs:
        raise loc.error(where, f"{spec.name} takes exactly {spec.exact_inputs} sources per "
                               f"slice, got {len(sources)}")
    if len(joining) < spec.min_inputs:
        raise loc.error(where, f"merge_method '{spec.name}' needs at least {spec.min_inputs} "
                               f"source{'s' if spec.min_inputs != 1 else ''} besides the base "
                               f"per slice, got {len(joining)}")


def _check_required(k: int, spec: MethodSpec, sources: list[SliceSource],
                    params: dict[str, Setting], top: dict[str, Setting], loc: Locator) -> None:
    """Every required parameter is set for every joining source: on the source, the slice
    or the top level."""
    for p in spec.params:
        if p.default is not REQUIRED or p.name in params or p.name in top:
            continue
        if not p.per_model:
            raise loc.error(("slices", k), f"merge_method '{spec.name}' requires '{p.name}' "
                                           "under the slice's or the top-level parameters")
        for src in sources:
            if (src.inp.is_base and not spec.base_joins_inputs) or p.name in src.inp.entry_params:
                continue
            raise loc.error(src.inp.where, f"method '{spec.name}' requires '{p.name}', but "
                                           "neither this source, its slice nor the top level "
                                           "sets it")
