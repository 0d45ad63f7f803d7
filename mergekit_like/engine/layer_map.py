"""The layer map of a ``slices`` recipe (docs/recipe.md §8): which source layer each output layer
comes from, the renaming of layer tensors, which non-layer tensors go before the layers and
which after, and the output's config.json (layer count and per-layer lists). Metadata only.

With slices s = 0 … S−1 of L_s layers each, output layer j = (Σ_{s'<s} L_{s'}) + o takes source
i's layer ``start_i + o`` of slice s, at layer position t = o/(L_s − 1) (1 when L_s = 1), as
mergekit's planner does. Non-layer tensors: embeddings are merged from the first slice's
sources, every other one (final norm, head) from the last slice's, at t = 0.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from mergekit_like.errors import MergeError
from mergekit_like.io.layers import layer_index, layer_stacks

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
PRE_RE = re.compile(r"(embed|wte|wpe|word_embeddings|tok_embeddings)")
"""Non-layer tensors whose names match go with the first slice (mergekit's pre-weights)."""


@dataclass(frozen=True)
class OutputLayer:
    """Output layer ``index``: slice ``slice_index``, offset ``offset`` within it, position t."""

    index: int
    slice_index: int
    offset: int
    t: float


def output_layers(lengths: list[int]) -> list[OutputLayer]:
    """The output layers of slices with ``lengths`` layers each, in order."""
    out: list[OutputLayer] = []
    for s, n in enumerate(lengths):
        for o in range(n):
            out.append(OutputLayer(len(out), s, o, o / (n - 1) if n > 1 else 1.0))
    return out


def main_stack(names: list[str], who: str) -> str:
    """The one layer-stack prefix of a model (``model.layers``); slices need exactly one."""
    stacks = layer_stacks(names)
    if len(stacks) != 1:
        found = ", ".join(stacks) or "none"
        raise MergeError(f"{who}: slices need a model with exactly one layer stack (found: "
                         f"{found})")
    return next(iter(stacks))


def layer_tensors(names: list[str], prefix: str, layer: int) -> dict[str, str]:
    """suffix → full name of every tensor of layer ``layer`` in stack ``prefix``
    (``'mlp.up_proj.weight'`` → ``'model.layers.3.mlp.up_proj.weight'``)."""
    head = f"{prefix}.{layer}."
    return {n[len(head):]: n for n in names if n.startswith(head)}


def layer_name(prefix: str, layer: int, suffix: str) -> str:
    return f"{prefix}.{layer}.{suffix}"


def non_layer_split(names: list[str]) -> tuple[list[str], list[str]]:
    """(pre, post): the names outside any layer stack, embeddings first, the rest after."""
    outside = [n for n in names if layer_index(n) is None]
    pre = [n for n in outside if PRE_RE.search(n)]
    return pre, [n for n in outside if n not in pre]


def stacked_config(config: dict[str, Any], layers: list[tuple[dict[str, Any] | None, int]],
                   source_layers: list[int]) -> dict[str, Any]:
    """The output config: ``config`` (the base's, else the first source's) with its layer
    count set to ``len(layers)`` and every per-layer list rebuilt. ``layers[j]`` = (config of
    output layer j's source model, its layer index there); a list is per-layer when its length
    equals the layer count of the config it sits in (``source_layers`` holds the counts of the
    models in ``layers``, in the same order)."""
    out = copy.deepcopy(config)
    node = _layer_node(out)
    if node is None:
        return out
    own_count = _count(node)
    for key, value in list(node.items()):
        if key in LAYER_COUNT_KEYS:
            node[key] = len(layers)
        elif isinstance(value, list) and len(value) == own_count:
            node[key] = [_per_layer(src, key, i, n, value[0])
                         for (src, i), n in zip(layers, source_layers)]
    return out


def _layer_node(config: dict[str, Any]) -> dict[str, Any] | None:
    """The dict that holds the layer count (top level, else ``text_config``)."""
    if any(isinstance(config.get(k), int) for k in LAYER_COUNT_KEYS):
        return config
    sub = config.get("text_config")
    return _layer_node(sub) if isinstance(sub, dict) else None


def _count(node: dict[str, Any]) -> int:
    return next(node[k] for k in LAYER_COUNT_KEYS if isinstance(node.get(k), int))


def _per_layer(src: dict[str, Any] | None, key: str, i: int, n: int, fallback: Any) -> Any:
    """Entry i of the source config's per-layer list ``key`` (length n), else ``fallback``."""
    node = _layer_node(src) if src else None
    value = node.get(key) if node else None
    return value[i] if isinstance(value, list) and len(value) == n else fallback
