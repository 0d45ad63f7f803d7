"""Dotted paths into a recipe document, value comparison, short value forms and labels
(docs/grid.md §1–2).

A path is a list of segments separated by ``.``. A segment that is a non-negative integer indexes
a list (the element must exist; lists never grow); any other segment indexes a mapping, creating
missing keys and mappings on the way. Everything here is pure: errors are ``PathError`` with a
message the caller places (file, line, which grid key).
"""

from __future__ import annotations

import re
from typing import Any

from mergekit_like.recipe.yaml_lines import Locator

RESERVED = ("grid", "zip", "exclude", "label")
PLAIN_LABEL = "(recipe)"
PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
"""A ``{dotted.path}`` placeholder of a label template."""
_INDEX_RE = re.compile(r"^[0-9]+$")
MISSING = object()
"""What ``get_path`` returns where the document has no value."""


class PathError(ValueError):
    """A path that is malformed or breaks on the document; ``str()`` is the one-line reason."""


def parse_path(path: Any) -> list[str | int]:
    """``'models.0.parameters.density'`` -> ``['models', 0, 'parameters', 'density']``.

    Raises PathError for a non-string, an empty segment or a reserved first segment.
    """
    if not isinstance(path, str) or not path:
        raise PathError(f"a path must be a non-empty string of dotted keys, got {path!r}")
    parts = path.split(".")
    if any(p == "" for p in parts):
        raise PathError(f"path '{path}' has an empty segment")
    if parts[0] in RESERVED:
        raise PathError(f"path '{path}' may not start with '{parts[0]}' (reserved for the grid "
                        f"keys {', '.join(RESERVED)})")
    return [int(p) if _INDEX_RE.match(p) else p for p in parts]


def _where(segs: list[str | int], n: int) -> str:
    return ".".join(str(s) for s in segs[:n])


def _step(node: Any, seg: str | int, segs: list, i: int, path: str) -> tuple:
    """(container, key) for segment ``segs[i]`` in ``node``; raises PathError where it breaks."""
    here = _where(segs, i) or "the recipe"
    if isinstance(node, list):
        if not isinstance(seg, int):
            raise PathError(f"path '{path}': '{here}' is a list, so segment '{seg}' must be an "
                            "index")
        if seg >= len(node):
            raise PathError(f"path '{path}': index {seg} is out of range at "
                            f"'{_where(segs, i + 1)}' ('{here}' has {len(node)} item"
                            f"{'s' if len(node) != 1 else ''}; lists never grow)")
        return node, seg
    if isinstance(node, dict):
        if isinstance(seg, int):
            for key in (seg, str(seg)):
                if key in node:
                    return node, key
            raise PathError(f"path '{path}': segment {seg} at '{_where(segs, i + 1)}' is a list "
                            f"index, but '{here}' is a mapping")
        return node, seg
    raise PathError(f"path '{path}': '{here}' is a scalar ({_short_repr(node)}), so it has no "
                    f"'{seg}' (the path breaks at '{_where(segs, i + 1)}')")


def _short_repr(v: Any) -> str:
    s = repr(v) if isinstance(v, str) else short_value(v)
    return s if len(s) <= 40 else s[:37] + "..."


def set_path(doc: dict, path: str, value: Any) -> tuple:
    """Put ``value`` at ``path`` in ``doc`` (in place); returns the concrete key tuple (str keys
    and int indices, as ``Locator`` uses them). Missing mappings (and null values on the way)
    become ``{}``; lists never grow."""
    segs = parse_path(path)
    node: Any = doc
    keys: list = []
    for i, seg in enumerate(segs):
        container, key = _step(node, seg, segs, i, path)
        keys.append(key)
        if i == len(segs) - 1:
            container[key] = value
            break
        nxt = container.get(key) if isinstance(container, dict) else container[key]
        if nxt is None and not isinstance(segs[i + 1], int):
            nxt = container[key] = {}
        elif nxt is None:
            raise PathError(f"path '{path}': '{_where(segs, i + 1)}' is missing, so index "
                            f"{segs[i + 1]} cannot exist (lists never grow)")
        node = nxt
    return tuple(keys)


def get_path(doc: Any, path: str) -> Any:
    """The value at ``path`` in ``doc``, or ``MISSING`` when the document has none there
    (a missing key, an index out of range, a path through a scalar)."""
    node = doc
    for seg in parse_path(path):
        if isinstance(node, list) and isinstance(seg, int) and seg < len(node):
            node = node[seg]
        elif isinstance(node, dict) and seg in node:
            node = node[seg]
        elif isinstance(node, dict) and isinstance(seg, int) and str(seg) in node:
            node = node[str(seg)]
        else:
            return MISSING
    return node


def overlaps(a: str, b: str) -> bool:
    """True when one path equals the other or lies inside it (``parameters`` / ``parameters.x``)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


# ---------------------------------------------------------------- comparison and display

def normalise(v: Any) -> Any:
    """A hashable, type-normalised form for comparisons: numbers (not bools) as floats, so
    ``1 == 1.0``; bools stay distinct from numbers; lists and mappings recursively."""
    if v is MISSING or v is None:
        return ("null",)
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, (int, float)):
        return ("num", float(v))
    if isinstance(v, str):
        return ("str", v)
    if isinstance(v, (list, tuple)):
        return ("list", tuple(normalise(x) for x in v))
    if isinstance(v, dict):
        return ("map", tuple(sorted(((str(k), normalise(x)) for k, x in v.items()))))
    return ("other", repr(v))


def matches(actual: Any, wanted: Any) -> bool:
    """Exclude-rule match: ``wanted`` is a value, or a list meaning any of its elements (wrap a
    list to match it exactly: ``[[0, 0.5, 1]]``). A missing value equals null."""
    options = wanted if isinstance(wanted, list) else [wanted]
    a = normalise(actual)
    return any(a == normalise(o) for o in options)


def short_value(v: Any) -> str:
    """Short display form: floats as Python prints them (0.5), bools true/false, null, strings
    as is, lists ``[0,0.5,1]`` and mappings ``{k:v}`` without spaces."""
    if v is None or v is MISSING:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v) if not isinstance(v, float) else repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(short_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{short_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def short_keys(paths: list[str]) -> dict[str, str]:
    """Shortest unique dotted suffix per path: ``['parameters.lambda',
    'models.0.parameters.density', 'models.1.parameters.density']`` -> ``lambda``,
    ``0.parameters.density``, ``1.parameters.density``. A suffix is unique when it is not a
    suffix (whole segments) of any other path; otherwise the full path is used."""
    out: dict[str, str] = {}
    for p in paths:
        segs = p.split(".")
        others = [q for q in paths if q != p]
        out[p] = p
        for k in range(1, len(segs) + 1):
            suffix = ".".join(segs[-k:])
            if not any(q == suffix or q.endswith("." + suffix) for q in others):
                out[p] = suffix
                break
    return out


def make_label(template: str | None, values: dict[str, Any], doc: dict, short: dict[str, str],
               loc: Locator) -> str:
    """The point's label: the template filled with short value forms, else ``key=value`` pairs
    of the varied paths (short keys), else ``(recipe)``."""
    if template is None:
        if not values:
            return PLAIN_LABEL
        return ",".join(f"{short[p]}={short_value(v)}" for p, v in values.items())

    def fill(m: re.Match) -> str:
        v = get_path(doc, m.group(1))
        if v is MISSING:
            raise loc.error(("label",), f"placeholder {m.group(0)} names no value in the recipe",
                            label="label")
        return short_value(v)
    return PLACEHOLDER_RE.sub(fill, template)
