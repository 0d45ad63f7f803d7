"""Layer stacks in checkpoint tensor names (``model.layers.3.mlp…``) and the layer count a
config.json states: what the recipe's layer positions and ``verify``'s config check read."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


LAYER_RE = re.compile(r"(^|\.)(layers|h|layer|blocks)\.(\d+)\.")


def layer_index(name: str) -> tuple[str, int] | None:
    """``'model.layers.3.mlp.up_proj.weight'`` -> ``('model.layers', 3)``; None outside stacks.

    The stack prefix is the name up to and including the stack word (``layers``/``h``/…)."""
    m = LAYER_RE.search(name)
    if m is None:
        return None
    return name[:m.end(2)], int(m.group(3))


def layer_stacks(tensor_names: Iterable[str]) -> dict[str, int]:
    """Stack prefix -> number of layers N (max index + 1), in order of first appearance."""
    stacks: dict[str, int] = {}
    for name in tensor_names:
        li = layer_index(name)
        if li is not None:
            prefix, i = li
            stacks[prefix] = max(stacks.get(prefix, 0), i + 1)
    return stacks


def config_num_layers(config: Mapping[str, Any] | None) -> int | None:
    """``num_hidden_layers`` (or ``n_layer`` / ``num_layers``) of a config.json, else None;
    looks into ``text_config`` when the top level has none."""
    if not config:
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = config.get(key)
        if _is_number(v):
            return int(v)
    sub = config.get("text_config")
    return config_num_layers(sub) if isinstance(sub, Mapping) else None
