"""YAML loading that remembers the line of every key, so errors can say
``recipe.yml:7 models[1].parameters.weight: ...``.

The document is parsed with PyYAML's safe loader (the same YAML 1.1 rules mergekit uses), then
built into plain Python values while recording, for every path into the document, the 1-based
line where it starts: for a mapping entry the line of its key, for a list item the line of the
item. Duplicate keys in one mapping are an error (PyYAML would silently keep the last one).
"""

from __future__ import annotations

from typing import Any, Iterable

import yaml

from mergekit_like.errors import MergeError

Path_ = tuple  # a path into the document: str keys and int list indices


def dotted(path: Iterable[Any]) -> str:
    """('models', 1, 'parameters', 'weight') -> 'models[1].parameters.weight'."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class Locator:
    """Formats error locations: ``<display>:<line> <dotted path>``."""

    def __init__(self, display: str, lines: dict[Path_, int] | None = None):
        self.display = display
        self.lines: dict[Path_, int] = dict(lines or {})

    def line(self, *path: Any) -> int | None:
        """Line of the deepest prefix of ``path`` that the document has (None: unknown)."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return None

    def at(self, line_path: Iterable[Any], label: str | None = None) -> str:
        """``recipe.yml:LINE label`` with the line of ``line_path``; label defaults to its dots."""
        line_path = tuple(line_path)
        line = self.line(*line_path) if line_path else None
        label = dotted(line_path) if label is None else label
        head = f"{self.display}:{line}" if line is not None else f"{self.display}:"
        return f"{head} {label}" if label else head

    def where(self, *path: Any) -> str:
        """``recipe.yml:7 models[1].parameters.weight`` (no path: ``recipe.yml:``)."""
        return self.at(path)

    def error(self, path: Iterable[Any], message: str, label: str | None = None) -> MergeError:
        """A MergeError located at ``path``: ``recipe.yml:7 models[1].x: message``."""
        path = tuple(path)
        if not path and label is None:
            return MergeError(f"{self.display}: {message}")
        return MergeError(f"{self.at(path, label)}: {message}")


MAX_NODES = 100_000
"""Most YAML nodes a document may hold once aliases are expanded (real recipes: a few thousand).
Bounds the work an alias bomb (``&a [*b, *b, ...]`` nested) can cause."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def check_expansion(root: yaml.Node, display: str, limit: int = MAX_NODES) -> int:
    """The node count of ``root`` with every alias expanded, computed once per distinct node
    (so in time linear in the text); raises MergeError past ``limit`` or on a recursive alias."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise MergeError(f"{display}:{node.start_mark.line + 1}: recursive YAML alias (an "
                             "anchor used inside itself)")
        active.add(key)
        n = 1
        for child in _children(node):
            n += size(child)
            if n > limit:
                raise MergeError(f"{display}:{node.start_mark.line + 1}: the YAML expands to more "
                                 f"than {limit} values once aliases are expanded (a recipe has "
                                 "a few thousand at most; an alias bomb?)")
        active.discard(key)
        sizes[key] = n
        return n

    return size(root)


def _build(loader: yaml.SafeLoader, node: yaml.Node, path: Path_, lines: dict, display: str,
           depth: int = 0) -> Any:
    if depth > 100:
        raise MergeError(f"{display}:{node.start_mark.line + 1}: YAML nesting is too deep "
                         "(recursive alias?)")
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_object(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, child in enumerate(node.value):
            lines.setdefault(path + (i,), child.start_mark.line + 1)
            items.append(_build(loader, child, path + (i,), lines, display, depth + 1))
        return items
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # YAML merge keys ('<<: *anchor')
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise MergeError(f"{display}:{key_node.start_mark.line + 1} {dotted(path)}: "
                                 "a mapping key must be a plain value") from None
            if key in out:
                where = dotted(path + (key,))
                raise MergeError(f"{display}:{key_node.start_mark.line + 1} {where}: duplicate key "
                                 f"'{key}' (first at line {lines.get(path + (key,), '?')})")
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _build(loader, value_node, path + (key,), lines, display, depth + 1)
        return out
    raise MergeError(f"{display}:{node.start_mark.line + 1}: unsupported YAML node")  # pragma: no cover


def load_yaml(text: str, display: str) -> tuple[Any, dict[Path_, int]]:
    """Parse one YAML document; returns (data, lines) where ``lines[path]`` is a 1-based line.

    A syntax error raises ``MergeError("recipe.yml:LINE: YAML syntax error: ...")``.
    """
    loader = yaml.SafeLoader(text)
    lines: dict[Path_, int] = {}
    try:
        node = loader.get_single_node()
        if node is None:
            return None, lines
        lines[()] = node.start_mark.line + 1
        check_expansion(node, display)
        data = _build(loader, node, (), lines, display)
    except RecursionError:
        raise MergeError(f"{display}: YAML nesting is too deep") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{display}:{mark.line + 1}" if mark is not None else f"{display}:"
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context == "expected a single document in the stream":
            problem = "the recipe must be a single YAML document (found a second one)"
        raise MergeError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as exc:  # reader errors (bad characters) carry no mark
        raise MergeError(f"{display}: YAML syntax error: {exc}") from None
    finally:
        loader.dispose()
    return data, lines
