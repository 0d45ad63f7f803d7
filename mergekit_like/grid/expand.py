"""Expansion of a grid file into validated points (docs/grid.md §1–2), and the slice partition (§7).

Pure: reads the grid file and asks (through ``build_recipe``) whether local model folders exist;
no model is opened and no network is touched. The runner merges the points.

Steps: parse the YAML with line numbers; split off the grid keys (``grid``, ``zip``, ``exclude``,
``label``); build the axes (every ``grid:`` entry, then every ``zip:`` group, in file order);
take the cartesian product (last axis fastest), substituting each point's values into a deep copy
of the recipe; drop points matching an exclude rule; label and validate every point; collapse
points with the same resolved recipe. A point that fails validation is kept as an
``InvalidPoint`` (the runner records it as a failed row) unless ``strict`` or no point is valid.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from mergekit_like.errors import MergeError
from mergekit_like.recipe.model import Recipe
from mergekit_like.recipe.validate import build_recipe, read_text_file
from mergekit_like.recipe.yaml_lines import Locator, load_yaml
from mergekit_like.registry import method_table
from mergekit_like.grid.paths import (PLACEHOLDER_RE, RESERVED, PathError, get_path, make_label,
                                      matches, overlaps, parse_path, set_path, short_keys)

MAX_POINTS = 100_000


@dataclass
class GridPoint:
    """One run of the grid. ``values`` maps every varied dotted path to this point's value (axis
    order); ``doc`` is the recipe document with the grid keys removed and the values substituted,
    ``text`` that document as YAML (the point's ``mergekit_config.yml``)."""

    index: int
    values: dict[str, Any]
    doc: dict
    text: str
    recipe: Recipe
    label: str

    @property
    def id(self) -> str:
        """First 12 hex characters of the resolved recipe's sha256 (computed on demand, so Hub
        shas pinned on the recipe's refs afterwards are included)."""
        return self.recipe.resolved_hash()[:12]


@dataclass
class InvalidPoint:
    """A point that failed validation: its label and varied values, its recipe document as YAML
    (``text``) and the validator's message on one line (naming the grid file's line)."""

    label: str
    values: dict[str, Any]
    text: str
    message: str

    @property
    def id(self) -> str:
        """First 12 hex characters of the sha256 of ``text``: stable across runs (so --resume
        and --skip-failed find the point's earlier row); it never names a folder."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]


@dataclass
class Grid:
    """An expanded grid. ``points`` are the valid, distinct points in expansion order (``index``
    is the position in this list); ``invalid_points`` the distinct points that failed validation
    (only with ``strict=False``; the runner records each as a failed row)."""

    path: Path
    text: str
    points: list[GridPoint]
    varied: list[str]
    warnings: list[str]
    invalid_points: list[InvalidPoint] = field(default_factory=list)

    @property
    def invalid(self) -> list[tuple[str, str]]:
        """(label, message) of every invalid point."""
        return [(p.label, p.message) for p in self.invalid_points]


@dataclass
class _Axis:
    """One axis: its paths, one tuple of values per position, and for each position and path
    the locator path of the candidate (for error lines)."""

    paths: list[str]
    rows: list[tuple]
    where: list[tuple]


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_doc(doc: dict) -> str:
    """A point's recipe document as YAML (key order kept, no anchors)."""
    return yaml.dump(doc, Dumper=_NoAliasDumper, sort_keys=False)


# ---------------------------------------------------------------- grid keys

def _path_or_error(raw: Any, loc: Locator, line_path: tuple, section: str) -> str:
    try:
        parse_path(raw)
    except PathError as exc:
        raise loc.error(line_path, str(exc), label=section) from None
    return raw


def _candidates(raw: Any, loc: Locator, line_path: tuple, section: str) -> list:
    if not isinstance(raw, list):
        raise loc.error(line_path, "expected a list of candidate values (to try one list value, "
                                   "wrap it: [[0, 0.5, 1]])", label=section)
    if not raw:
        raise loc.error(line_path, "the list of candidate values is empty", label=section)
    return raw


def parse_axes(keys: dict, loc: Locator) -> list[_Axis]:
    """The axes of ``grid:`` (one per entry) and ``zip:`` (one per group), in file order."""
    axes: list[_Axis] = []
    if "grid" in keys:
        grid = keys["grid"]
        if not isinstance(grid, dict):
            raise loc.error(("grid",), "expected a mapping of dotted paths to lists of values")
        for path, raw in grid.items():
            section = f"grid '{path}'"
            _path_or_error(path, loc, ("grid", path), section)
            values = _candidates(raw, loc, ("grid", path), section)
            axes.append(_Axis([path], [(v,) for v in values],
                              [(("grid", path, i),) for i in range(len(values))]))
    if "zip" in keys:
        groups = keys["zip"]
        if not isinstance(groups, list):
            raise loc.error(("zip",), "expected a list of groups (mappings of dotted paths to "
                                      "lists of equal length)")
        for g, group in enumerate(groups):
            if not isinstance(group, dict) or not group:
                raise loc.error(("zip", g), "expected a non-empty mapping of dotted paths to "
                                            "lists of equal length", label=f"zip[{g}]")
            lists = {}
            for path, raw in group.items():
                section = f"zip[{g}] '{path}'"
                _path_or_error(path, loc, ("zip", g, path), section)
                lists[path] = _candidates(raw, loc, ("zip", g, path), section)
            lengths = {len(v) for v in lists.values()}
            if len(lengths) > 1:
                sizes = ", ".join(f"{p}: {len(v)}" for p, v in lists.items())
                raise loc.error(("zip", g), f"the lists of a zip group must have equal lengths "
                                            f"({sizes})", label=f"zip[{g}]")
            n = lengths.pop()
            paths = list(lists)
            axes.append(_Axis(paths, [tuple(lists[p][i] for p in paths) for i in range(n)],
                              [tuple(("zip", g, p, i) for p in paths) for i in range(n)]))
    _check_disjoint(axes, loc)
    return axes


def _check_disjoint(axes: list[_Axis], loc: Locator) -> None:
    """A path may appear on only one axis (nor inside another axis's path)."""
    seen: list[tuple[str, tuple]] = []
    for axis in axes:
        for path, where in zip(axis.paths, axis.where[0]):
            key_path = where[:-1]
            for other, other_where in seen:
                if overlaps(path, other):
                    what = "is already on another axis" if path == other else \
                        f"overlaps '{other}' on another axis"
                    raise loc.error(key_path, f"path '{path}' {what} (line "
                                              f"{loc.line(*other_where)}); a path may appear on "
                                              "only one axis", label=_section(key_path))
            seen.append((path, key_path))


def _section(key_path: tuple) -> str:
    return f"grid '{key_path[1]}'" if key_path[0] == "grid" else \
        f"zip[{key_path[1]}] '{key_path[2]}'"


def parse_excludes(raw: Any, loc: Locator) -> list[dict[str, Any]]:
    """The exclude rules: each a mapping of dotted path -> value or list of any-of values."""
    if not isinstance(raw, list):
        raise loc.error(("exclude",), "expected a list of rules (mappings of dotted paths to "
                                      "values)")
    rules = []
    for i, rule in enumerate(raw):
        if not isinstance(rule, dict) or not rule:
            raise loc.error(("exclude", i), "expected a non-empty mapping of dotted paths to "
                                            "values", label=f"exclude[{i}]")
        for path in rule:
            _path_or_error(path, loc, ("exclude", i, path), f"exclude[{i}] '{path}'")
        rules.append(rule)
    return rules


def parse_label(raw: Any, loc: Locator) -> str:
    """The label template; every ``{path}`` placeholder must be a valid path."""
    if not isinstance(raw, str) or not raw.strip():
        raise loc.error(("label",), "expected a non-empty string template with {dotted.path} "
                                    "placeholders")
    for m in PLACEHOLDER_RE.finditer(raw):
        _path_or_error(m.group(1), loc, ("label",), "label")
    return raw


# ---------------------------------------------------------------- points

def _substitute(base: dict, axes: list[_Axis], combo: tuple, loc: Locator,
                lines: dict) -> tuple[dict, dict[str, Any], dict]:
    """(doc, values, line map) of one point: ``combo`` holds one row position per axis."""
    doc = copy.deepcopy(base)
    values: dict[str, Any] = {}
    point_lines = dict(lines)
    for axis, pos in zip(axes, combo):
        for path, value, where in zip(axis.paths, axis.rows[pos], axis.where[pos]):
            try:
                keys = set_path(doc, path, copy.deepcopy(value))
            except PathError as exc:
                raise loc.error(where[:-1], str(exc), label=_section(where[:-1])) from None
            values[path] = copy.deepcopy(value)
            for k in [k for k in point_lines if k[:len(keys)] == keys]:
                del point_lines[k]
            point_lines[keys] = loc.line(*where)
    return doc, values, point_lines


def _excluded(doc: dict, rules: list[dict[str, Any]], hits: list[int]) -> bool:
    """True when every key of some rule matches the point's value there; counts rule hits."""
    for i, rule in enumerate(rules):
        if all(matches(get_path(doc, p), wanted) for p, wanted in rule.items()):
            hits[i] += 1
            return True
    return False


def _dedupe(points: list[GridPoint], display: str) -> tuple[list[GridPoint], list[str]]:
    """Points with equal resolved recipes collapse into the first (with a warning). Two different
    recipes with the same 12-character id are an error."""
    first: dict[str, GridPoint] = {}
    by_id: dict[str, str] = {}
    kept, warnings = [], []
    for p in points:
        h = p.recipe.resolved_hash()
        if h in first:
            warnings.append(f"{display}: points '{first[h].label}' and '{p.label}' have the same "
                            f"resolved recipe; '{p.label}' is merged into '{first[h].label}'")
            continue
        if h[:12] in by_id:
            raise MergeError(f"{display}: points '{first[by_id[h[:12]]].label}' and '{p.label}' "
                             f"are different recipes with the same id {h[:12]}")
        first[h], by_id[h[:12]] = p, h
        kept.append(p)
    for i, p in enumerate(kept):
        p.index = i
    return kept, warnings


def _point_count(axes: list[_Axis], loc: Locator) -> int:
    n = 1
    for axis in axes:
        n *= len(axis.rows)
    if n > MAX_POINTS:
        where = ("grid",) if ("grid",) in loc.lines else ("zip",)
        raise loc.error(where, f"the grid expands to {n} points (at most {MAX_POINTS})",
                        label=where[0])
    return n


# ---------------------------------------------------------------- entry points

def load_grid_text(text: str, display: str = "grid.yml", *, path: str | Path | None = None,
                   seed: int | None = None, strict: bool = True,
                   methods: Mapping[str, Any] | None = None) -> Grid:
    """Expand and validate a grid given as text (``display`` names it in errors).

    ``seed`` (the CLI's ``--seed``) overrides every point's seed; ``methods`` replaces the method
    table (default: the registry's). With ``strict`` (the default) any invalid point raises one
    MergeError listing every invalid point; otherwise invalid points go to
    ``Grid.invalid_points`` (not to ``warnings``), unless no point is valid: that raises too.
    """
    if methods is None:
        methods = method_table()
    path = Path(path or display)
    data, lines = load_yaml(text, display)
    loc = Locator(display, lines)
    if not isinstance(data, dict):  # not a mapping: the recipe validator says why
        build_recipe(data, loc, path=path, text=text, seed=seed, methods=methods)
        raise loc.error((), "the grid must be a YAML mapping")  # pragma: no cover
    keys = {k: data[k] for k in RESERVED if k in data}
    base = {k: v for k, v in data.items() if k not in RESERVED}
    base_lines = {k: v for k, v in lines.items() if not (k and k[0] in RESERVED)}
    axes = parse_axes(keys, loc)
    rules = parse_excludes(keys["exclude"], loc) if "exclude" in keys else []
    template = parse_label(keys["label"], loc) if "label" in keys else None
    varied = [p for axis in axes for p in axis.paths]
    short = short_keys(varied)
    total = _point_count(axes, loc)

    hits = [0] * len(rules)
    candidates = []
    for combo in itertools.product(*(range(len(a.rows)) for a in axes)):
        doc, values, point_lines = _substitute(base, axes, combo, loc, base_lines)
        if not _excluded(doc, rules, hits):
            candidates.append((doc, values, point_lines))
    warnings = [f"{loc.where('exclude', i)}: this rule matches no point"
                for i, n in enumerate(hits) if n == 0]
    if not candidates:
        raise loc.error(("exclude",), f"every one of the {total} points is excluded; the grid "
                                      "is empty", label="exclude")

    points, invalid, first_error = _validate(candidates, template, short, loc, path,
                                             seed=seed, methods=methods)
    if invalid and (strict or not points):  # nothing valid: the grid itself is bad input
        if not axes and len(candidates) == 1:
            raise first_error  # a plain recipe: its own error, unchanged
        listing = "; ".join(f"{p.label}: {p.message}" for p in invalid)
        raise MergeError(f"{display}: {len(invalid)} of {len(candidates)} points are invalid: "
                         f"{listing}")
    points, dup_warnings = _dedupe(points, display)
    return Grid(path=path, text=text, points=points, varied=varied,
                warnings=warnings + dup_warnings, invalid_points=invalid)


def _validate(candidates: list[tuple[dict, dict, dict]], template: str | None,
              short: dict[str, str], loc: Locator, path: Path, *, seed: int | None,
              methods: Mapping[str, Any] | None
              ) -> tuple[list[GridPoint], list[InvalidPoint], MergeError | None]:
    """Label and validate every candidate: (valid points, distinct invalid points, the first
    validation error). Invalid points with the same recipe text collapse into the first."""
    display = loc.display
    points: list[GridPoint] = []
    invalid: dict[str, InvalidPoint] = {}
    first_error: MergeError | None = None
    for doc, values, point_lines in candidates:
        label = make_label(template, values, doc, short, loc)
        point_text = dump_doc(doc)
        try:
            recipe = build_recipe(doc, Locator(display, point_lines), path=path,
                                  text=point_text, seed=seed, methods=methods)
        except MergeError as exc:
            bad = InvalidPoint(label, values, point_text, " ".join(str(exc).split("\n")))
            invalid.setdefault(bad.id, bad)
            first_error = first_error or exc
            continue
        points.append(GridPoint(len(points), values, doc, point_text, recipe, label))
    return points, list(invalid.values()), first_error


def load_grid(path: str | Path, *, seed: int | None = None, strict: bool = True,
              methods: Mapping[str, Any] | None = None) -> Grid:
    """Read, expand and validate a grid file (a plain recipe is a grid of one point)."""
    display = str(path)
    text = read_text_file(path, "grid")
    return load_grid_text(text, display, path=Path(path), seed=seed, strict=strict,
                          methods=methods)


# ---------------------------------------------------------------- sharding

def partition(costs: list[float], n: int) -> list[list[int]]:
    """Greedy least-loaded assignment (docs/grid.md §7): items sorted by cost descending (ties by
    index) each go to the slice with the smallest load so far (ties: the lowest slice number).
    Returns the item indices of each of the ``n`` slices, ascending. Deterministic."""
    if n < 1:
        raise ValueError(f"the number of slices must be at least 1, got {n}")
    loads = [0.0] * n
    slices: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        s = min(range(n), key=lambda s: (loads[s], s))
        slices[s].append(i)
        loads[s] += costs[i]
    return [sorted(s) for s in slices]
