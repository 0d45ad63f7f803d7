"""Phase A of docs/recipe.md §6: everything that can be checked from the recipe alone (no I/O besides
reading the file and asking whether local model folders exist).

YAML syntax, the schema, unsupported features, known method, model references and duplicates,
dtype names, base present when required, input counts, known parameter names, value kinds and
ranges on every literal leaf, required parameters present at some level.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any, Callable, Mapping

from mergekit_like.dtypes import RECIPE_DTYPES, parse_recipe_dtype
from mergekit_like.errors import MergeError
from mergekit_like.recipe.checker import Checker as _Checker
from mergekit_like.recipe.checker import show as _show
from mergekit_like.recipe.model import InputModel, Recipe
from mergekit_like.recipe.params import Scalar, Setting, leaves
from mergekit_like.recipe.refs import ModelRef, parse_ref
from mergekit_like.recipe.slices import build_slices
from mergekit_like.recipe.vocab import tokenizer_settings
from mergekit_like.recipe.schema import (ENTRY_KEYS, RecipeDoc, check_document, suggest,
                                         unknown_key)
from mergekit_like.recipe.spec import REQUIRED, MethodSpec, ParamSpec
from mergekit_like.recipe.yaml_lines import Locator, load_yaml

log = logging.getLogger(__name__)

def _lookup(methods: Mapping[str, Any] | None) -> tuple[Callable[[str], Any], list[str]]:
    """(get, known names) of the method table the caller passes in: name -> Method, MethodSpec,
    or None for a name that is known but not implemented yet; its order is the display order
    (``registry.method_table()``)."""
    if methods is None:
        raise TypeError("the recipe validator needs the method table (registry.method_table())")
    return (lambda n: methods.get(n)), list(methods)


def _spec_of(method: Any) -> MethodSpec:
    return method if isinstance(method, MethodSpec) else method.spec


# ---------------------------------------------------------------- phase A

def build_recipe(data: Any, loc: Locator, *, path: Path, text: str, seed: int | None = None,
                 methods: Mapping[str, Any] | None = None) -> Recipe:
    """Validate a parsed recipe document (with its line map inside ``loc``) into a Recipe.

    The checks run in the order of the steps below; the first failing one raises MergeError.
    """
    warnings: list[str] = []
    doc = check_document(data, loc)
    name = doc.merge_method
    method = _known_method(name, loc, methods)
    spec = _spec_of(method)
    checker = _Checker(spec, loc, warnings)

    entries: list[dict] = list(data.get("models") or [])
    base, refs = _model_refs(doc, entries, method, loc, warnings)
    dtypes = _dtypes(doc, loc)

    slices = None
    if doc.slices is not None:
        if not getattr(method, "takes_slices", True):
            raise loc.error(("slices",), f"merge_method '{name}' merges whole models; use "
                                         "'models:' (slices are for static merge methods)")
        top_params = _top_params(doc, spec, name, checker, loc)
        inputs, slices = build_slices(doc, spec, checker, loc, base, top_params, warnings)
    else:
        _check_base_present(spec, name, base, loc)
        inputs, base = _input_models(refs, entries, base)
        _check_input_counts(spec, name, inputs, base, loc)
        top_params = _top_params(doc, spec, name, checker, loc)
        _entry_params(inputs, entries, spec, name, checker, loc, warnings)
        _check_required_params(spec, name, inputs, top_params, loc)
        _check_trim_scope(spec, top_params, inputs, loc)
    vocab, tokenizer_source = tokenizer_settings(doc, loc, base, inputs, warnings)
    if doc.seed is not None and doc.seed < 0:
        raise loc.error(("seed",), f"must be a non-negative integer, got {doc.seed}")
    _note_pure_sign_consensus(name, spec, top_params, inputs)

    recipe = Recipe(
        path=path, text=text, display=loc.display, merge_method=name, method=method, spec=spec,
        base=base, inputs=inputs, dtype=dtypes["dtype"],
        out_dtype=dtypes["out_dtype"] or dtypes["dtype"], tokenizer_source=tokenizer_source,
        chat_template=doc.chat_template,
        seed=seed if seed is not None else (doc.seed if doc.seed is not None else 0),
        vocab_policy=doc.vocab_policy, on_missing_tensor=doc.on_missing_tensor,
        on_extra_tensor=doc.on_extra_tensor, warnings=warnings, top_params=top_params,
        locator=loc, methods=methods, slices=slices, vocab=vocab)
    if not isinstance(method, MethodSpec):  # a Method: its own phase-A checks (Method.check_recipe)
        for view in ([recipe.slice_view(k) for k in range(len(slices))] if slices else [recipe]):
            method.check_recipe(view)
    return recipe


def _known_method(name: str, loc: Locator, methods: Mapping[str, Any] | None) -> Any:
    """The Method or MethodSpec called ``name`` (``merge_method``); an unknown name, or one
    known but not implemented yet, is a MergeError listing the alternatives."""
    get, known = _lookup(methods)
    if name not in known:
        raise loc.error(("merge_method",), f"unknown method '{name}'{suggest(name, known)} "
                                           f"(known: {', '.join(known)})")
    method = get(name)
    if method is None:
        implemented = [n for n in known if get(n) is not None]
        raise MergeError(f"{loc.at(('merge_method',), '')} merge_method '{name}' is not supported "
                         f"yet (supported: {', '.join(implemented) or 'none'})")
    return method


def _model_refs(doc: RecipeDoc, entries: list[dict], method: Any, loc: Locator,
                warnings: list[str]) -> tuple[ModelRef | None, list[ModelRef]]:
    """(base_model's reference or None, one reference per ``models`` entry); an entry key the
    method does not know, or a model listed twice, is a MergeError."""
    base = parse_ref(doc.base_model, loc, ("base_model",), warnings) \
        if doc.base_model is not None else None
    entry_keys = tuple(ENTRY_KEYS) + (() if isinstance(method, MethodSpec) else method.entry_keys)
    refs: list[ModelRef] = []
    seen: dict[tuple, int] = {}
    for i, entry in enumerate(entries):
        for key in entry:
            if key not in entry_keys:
                raise unknown_key(loc, ("models", i, key), entry_keys)
        ref = parse_ref(entry["model"], loc, ("models", i, "model"), warnings)
        if ref.key in seen:
            raise loc.error(("models", i, "model"), f"'{ref.display}' is listed twice (also "
                                                    f"models[{seen[ref.key]}]); duplicate models "
                                                    "are not allowed")
        seen[ref.key] = i
        refs.append(ref)
    return base, refs


def _dtypes(doc: RecipeDoc, loc: Locator) -> dict[str, Any]:
    """``{"dtype": ..., "out_dtype": ...}`` parsed (None where unset); an unknown name is a
    MergeError listing the supported ones."""
    dtypes = {}
    for key in ("dtype", "out_dtype"):
        raw = getattr(doc, key)
        dt = parse_recipe_dtype(raw) if isinstance(raw, str) else None
        if raw is not None and dt is None:
            raise loc.error((key,), f"{_show(raw)} is not a supported dtype; use one of "
                                    f"{', '.join(RECIPE_DTYPES)}")
        dtypes[key] = dt
    return dtypes


def _check_base_present(spec: MethodSpec, name: str, base: ModelRef | None,
                        loc: Locator) -> None:
    """A method that needs base_model must have one."""
    if spec.needs_base and base is None:
        why = ("t=0 is base_model, t=1 the other model" if name == "slerp"
               else "the model the task vectors are taken against")
        raise loc.error((), f"merge_method '{name}' needs base_model ({why})")


def _input_models(refs: list[ModelRef], entries: list[dict],
                  base: ModelRef | None) -> tuple[list[InputModel], ModelRef | None]:
    """(the inputs: the listed models, then base_model when it is not listed; the base's
    reference, the listed entry's object when base_model is also listed under models)."""
    inputs = [InputModel(ref, i, base is not None and ref.key == base.key, {},
                         {k: v for k, v in entries[i].items() if k not in ENTRY_KEYS})
              for i, ref in enumerate(refs)]
    listed_base = next((m for m in inputs if m.is_base), None)
    if listed_base is not None:
        base = listed_base.ref  # one object per model, so pinning a sha reaches every use
    elif base is not None:
        inputs.append(InputModel(base, len(entries), True, {}, {}, listed=False))
    return inputs, base


def _check_input_counts(spec: MethodSpec, name: str, inputs: list[InputModel],
                        base: ModelRef | None, loc: Locator) -> None:
    """The method's exact or minimum number of input models."""
    if spec.exact_inputs is not None and len(inputs) != spec.exact_inputs:
        incl = " (base included)" if base is not None or spec.needs_base else ""
        raise loc.error((), f"{name} takes exactly {spec.exact_inputs} models{incl}, "
                            f"got {len(inputs)}")
    counted = inputs if spec.base_joins_inputs or base is None else \
        [m for m in inputs if not m.is_base]
    if len(counted) < spec.min_inputs:
        besides = " besides base_model" if base is not None and not spec.base_joins_inputs else ""
        raise loc.error(("models",), f"merge_method '{name}' needs at least {spec.min_inputs} "
                                     f"model{'s' if spec.min_inputs != 1 else ''}{besides}, "
                                     f"got {len(counted)}")


def _param_spec(spec: MethodSpec, name: str, key: Any, path: tuple, loc: Locator) -> ParamSpec:
    """The method's parameter called ``key``; an unknown one is a MergeError at ``path``."""
    p = spec.param(key) if isinstance(key, str) else None
    if p is None:
        raise unknown_key(loc, path, spec.param_names, f"unknown parameter for method '{name}'")
    return p


def _top_params(doc: RecipeDoc, spec: MethodSpec, name: str, checker: _Checker,
                loc: Locator) -> dict[str, Setting]:
    """The top-level ``parameters``, each name, kind and range checked."""
    top_params: dict[str, Setting] = {}
    for key, raw in (doc.parameters or {}).items():
        p = _param_spec(spec, name, key, ("parameters", key), loc)
        top_params[key] = checker.setting(p, raw, ("parameters", key))
        checker.note_ineffective(p, ("parameters", key))
    return top_params


def _entry_params(inputs: list[InputModel], entries: list[dict], spec: MethodSpec, name: str,
                  checker: _Checker, loc: Locator, warnings: list[str]) -> None:
    """Check each listed model's ``parameters`` into its ``entry_params``. A method-wide
    parameter there, or any on a base_model the method uses only as the base, is warned about
    and ignored."""
    for inp in inputs:
        if not inp.listed:
            continue
        i = inp.index
        raw_params = entries[i].get("parameters") or {}
        ignored_base: list[str] = []
        for key, raw in raw_params.items():
            ppath = ("models", i, "parameters", key)
            p = _param_spec(spec, name, key, ppath, loc)
            if not p.per_model:
                warnings.append(f"{loc.where(*ppath)}: '{key}' is method-wide; the value under "
                                f"models[{i}].parameters is ignored; put it under top-level "
                                "parameters")
                continue
            if inp.is_base and not spec.base_joins_inputs:
                ignored_base.append(key)
                continue
            inp.entry_params[key] = checker.setting(p, raw, ppath)
            checker.note_ineffective(p, ppath)
        if ignored_base:
            warnings.append(f"{loc.where('models', i, 'parameters')}: {', '.join(ignored_base)} "
                            f"ignored: models[{i}] is base_model, which '{name}' uses only as the "
                            "base")


def _check_required_params(spec: MethodSpec, name: str, inputs: list[InputModel],
                           top_params: dict[str, Setting], loc: Locator) -> None:
    """Every required parameter is set: a per-model one for each input that joins the merge
    (in its entry or at top level), a method-wide one at top level."""
    for inp in inputs:
        if inp.is_base and not spec.base_joins_inputs:
            continue
        for p in spec.params:
            if not p.per_model or p.default is not REQUIRED:
                continue
            if p.name in inp.entry_params or p.name in top_params:
                continue
            if not inp.listed:
                raise loc.error(("base_model",),
                                f"method '{name}' requires '{p.name}' for every input, and "
                                "base_model is not listed under models, so it joins as an ordinary "
                                f"input; list it under models with a '{p.name}', or set a "
                                f"top-level '{p.name}'", label=f"base_model ({inp.ref.display})")
            raise loc.error(("models", inp.index),
                            f"method '{name}' requires '{p.name}', but neither "
                            f"models[{inp.index}].parameters nor top-level parameters sets it",
                            label=f"models[{inp.index}] ({inp.ref.display})")
    for p in spec.params:
        if not p.per_model and p.default is REQUIRED and p.name not in top_params:
            raise loc.error((), f"merge_method '{name}' requires '{p.name}' under top-level "
                                "parameters")


def _note_pure_sign_consensus(name: str, spec: MethodSpec, top_params: dict[str, Setting],
                              inputs: list[InputModel]) -> None:
    """Log that a ties merge without any density does no trimming."""
    if name == "ties" and spec.param("density") is not None and "density" not in top_params \
            and not any("density" in m.entry_params for m in inputs):
        log.info("ties without density: a pure sign-consensus merge (no trimming)")


def check_method_params(spec: MethodSpec, raw: Mapping, loc: Locator, path: tuple,
                        warnings: list[str]) -> dict[str, Setting]:
    """Parse and check a map of method-wide parameters of ``spec`` found at ``path`` (a
    sub-recipe's, e.g. twin's ``shared``): names, kinds and ranges, as for top-level ones."""
    checker = _Checker(spec, loc, warnings)
    out = {}
    for key, value in raw.items():
        p = spec.param(key) if isinstance(key, str) else None
        if p is None or p.per_model:
            known = [q.name for q in spec.params if not q.per_model]
            why = (f"'{key}' is per-model: set it under models[i].parameters"
                   if p is not None else f"unknown parameter for method '{spec.name}'")
            raise unknown_key(loc, path + (key,), known, why)
        out[key] = checker.setting(p, value, path + (key,))
    return out


def _check_trim_scope(spec: MethodSpec, top: dict[str, Setting], inputs: list[InputModel],
                      loc: Locator) -> None:
    """With ``trim_scope: model``, density must be a plain scalar per model (docs/recipe.md §5)."""
    if spec.param("trim_scope") is None:
        return
    ts = top.get("trim_scope")
    model_scope = any(v == "model" for _, v in leaves(ts)) if ts is not None else \
        spec.param("trim_scope").default == "model"
    if not model_scope:
        return
    places = [(("parameters", "density"), top.get("density"))]
    places += [(("models", m.index, "parameters", "density"), m.entry_params.get("density"))
               for m in inputs]
    for path, s in places:
        if s is not None and not isinstance(s, Scalar):
            raise loc.error(path, "with trim_scope: model, density must be a plain number per "
                                  "model (no gradient, no filter)")


def load_recipe_text(text: str, display: str = "recipe.yml", *, path: str | Path | None = None,
                     seed: int | None = None, methods: Mapping[str, Any] | None = None) -> Recipe:
    """Phase A on recipe text (``display`` names it in errors)."""
    data, lines = load_yaml(text, display)
    return build_recipe(data, Locator(display, lines), path=Path(path or display), text=text,
                        seed=seed, methods=methods)


MAX_TEXT_BYTES = 1 << 20
"""Largest recipe or grid file read (1 MiB); real ones are a few KiB."""


def _read_bounded(path: str | Path, kind: str) -> bytes:
    """At most ``MAX_TEXT_BYTES + 1`` bytes of a regular file. Opened non-blocking and checked
    on the open descriptor, so a FIFO cannot hang the open and a device is never read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):
            raise MergeError(f"{path}: not a regular file (a device, pipe or socket); a {kind} "
                             "file must be a plain file")
        if st.st_size > MAX_TEXT_BYTES:
            raise MergeError(f"{path}: too large for a {kind} file ({st.st_size} bytes; the "
                             "limit is 1 MiB)")
        data = fh.read(MAX_TEXT_BYTES + 1)  # bounded even where st_size says 0 (/proc)
    if len(data) > MAX_TEXT_BYTES:
        raise MergeError(f"{path}: too large for a {kind} file (more than 1 MiB)")
    return data


def read_text_file(path: str | Path, kind: str) -> str:
    """A UTF-8 file's text (newlines kept); a missing, unreadable, non-regular (device, FIFO),
    oversized (over ``MAX_TEXT_BYTES``) or non-UTF-8 file is a one-line MergeError naming it and
    what it should be (``kind``: "recipe", "grid")."""
    display = str(path)
    try:
        data = _read_bounded(path, kind)
    except FileNotFoundError:
        raise MergeError(f"{display}: {kind} file not found") from None
    except IsADirectoryError:
        raise MergeError(f"{display}: is a folder, not a {kind} file") from None
    except OSError as exc:
        raise MergeError(f"{display}: cannot read the {kind} file ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MergeError(f"{display}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_recipe(path: str | Path, *, seed: int | None = None,
                methods: Mapping[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file (phase A of docs/recipe.md §6); raises MergeError.

    ``seed`` (the CLI's ``--seed``) overrides the recipe's ``seed``. ``methods`` maps method
    names to Method instances or MethodSpecs (None: not implemented yet) in place of the registry.
    """
    display = str(path)
    text = read_text_file(path, "recipe")
    return load_recipe_text(text, display, path=Path(path), seed=seed, methods=methods)
