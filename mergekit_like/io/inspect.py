"""``mergekit-like inspect``: what a model holds, as pure data (headers only, no tensor reads).

The CLI renders a ``ModelSummary`` with rich; nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from mergekit_like.io.source import CheckpointSource, TensorInfo

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


class FileSummary(NamedTuple):
    """Unpacks as ``(tensors, bytes)``."""

    tensors: int
    bytes: int  # tensor data bytes in this file


@dataclass(frozen=True)
class ModelSummary:
    ref: str
    tensors: list[TensorInfo]  # storage order; each has name, shape, dtype, file, nbytes, numel
    files: dict[str, FileSummary]  # file name -> (tensors, bytes), in file order
    dtypes: dict[str, int]  # safetensors code -> tensor count, most bytes first
    dtype_bytes: dict[str, int]  # safetensors code -> data bytes, same order
    total_params: int
    total_bytes: int
    num_layers: int | None  # from config.json (num_hidden_layers / n_layer / num_layers)
    model_type: str | None = None
    architectures: list[str] = field(default_factory=list)
    layout: str | None = None  # LocalSource: single / sharded / pickle / pickle-sharded
    config: dict[str, Any] | None = None

    @property
    def sharded(self) -> bool:
        if self.layout is not None:
            return self.layout.endswith("sharded")
        return len(self.files) > 1


def config_num_layers(cfg: dict[str, Any] | None) -> int | None:
    """The layer count a config declares (top level first, then ``text_config``)."""
    if not isinstance(cfg, dict):
        return None
    for sub in (cfg, cfg.get("text_config")):
        if isinstance(sub, dict):
            for key in LAYER_COUNT_KEYS:
                v = sub.get(key)
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
    return None


def describe(source: CheckpointSource) -> ModelSummary:
    infos = list(source.tensors().values())
    per_file: dict[str, list[int]] = {}  # file -> [tensors, bytes]
    per_dtype: dict[str, list[int]] = {}
    for t in infos:
        for acc in (per_file.setdefault(t.file, [0, 0]), per_dtype.setdefault(t.dtype, [0, 0])):
            acc[0] += 1
            acc[1] += t.nbytes
    dtype_order = sorted(per_dtype, key=lambda c: (-per_dtype[c][1], c))
    cfg = source.config()
    arch = cfg.get("architectures") if isinstance(cfg, dict) else None
    mtype = cfg.get("model_type") if isinstance(cfg, dict) else None
    return ModelSummary(
        ref=source.ref,
        tensors=infos,
        files={name: FileSummary(n, b) for name, (n, b) in per_file.items()},
        dtypes={code: per_dtype[code][0] for code in dtype_order},
        dtype_bytes={code: per_dtype[code][1] for code in dtype_order},
        total_params=sum(t.numel for t in infos),
        total_bytes=sum(t.nbytes for t in infos),
        num_layers=config_num_layers(cfg),
        model_type=mtype if isinstance(mtype, str) else None,
        architectures=[a for a in arch if isinstance(a, str)] if isinstance(arch, list) else [],
        layout=getattr(source, "layout", None),
        config=cfg,
    )
