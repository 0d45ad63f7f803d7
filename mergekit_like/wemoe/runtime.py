"""Loading a WEMoE output folder (docs/methods/wemoe.md §3) with the installed package's classes, no remote code.

* ``is_wemoe(path)``: the folder's config.json has ``model_type: "wemoe"``.
* ``load_wemoe(path, device="auto", dtype=torch.float32) -> LoadedModel``: the
  ``WEMoEForCausalLM`` of ``mergekit_like.wemoe.hf`` loaded from the folder (weights in ``dtype``,
  routers always float32), in eval mode on ``device``. It warns when the folder's
  ``wemoe.modeling_sha256`` differs from the installed modeling file's (the folder was written by
  another version: its remote code and this loader may compute different things).

Every bad folder is a one-line ``MergeError`` naming it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from mergekit_like.device import resolve_device
from mergekit_like.errors import MergeError
from mergekit_like.runtime.model import LoadedModel, _first_line, _load_tokenizer, require_transformers
from mergekit_like.wemoe.hf import modeling_sha256


def _read_config(folder: Path) -> dict | None:
    """config.json as a dict, None when absent; MergeError when unreadable."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeError(f"{folder}: cannot read config.json: {_first_line(exc)}") from None
    return config if isinstance(config, dict) else None


def is_wemoe(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose config.json says ``model_type: "wemoe"``."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    try:
        config = _read_config(folder)
    except MergeError:
        return False
    return config is not None and config.get("model_type") == "wemoe"


def load_wemoe(path: str | Path, device: str = "auto", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the WEMoE folder ``path`` with ``WEMoEForCausalLM.from_pretrained(path, dtype=dtype)``
    (local files only) and move it to ``device`` in eval mode. Missing, unexpected or mis-shaped
    tensors are a MergeError, as are a missing folder, a non-WEMoE config and a load failure."""
    folder = Path(path)
    if not folder.is_dir():
        raise MergeError(f"{folder}: no such model folder")
    config = _read_config(folder)
    if config is None:
        raise MergeError(f"{folder}: no config.json (not a transformers checkpoint folder)")
    if config.get("model_type") != "wemoe":
        raise MergeError(f"{folder}: not a WEMoE checkpoint (model_type is "
                         f"{config.get('model_type')!r}, expected 'wemoe')")
    block = config.get("wemoe")
    if not isinstance(block, dict):
        raise MergeError(f"{folder}: config.json has no 'wemoe' block")
    recorded, installed = block.get("modeling_sha256"), modeling_sha256()
    if recorded != installed:
        warnings.warn(f"{folder}: modeling_wemoe.py sha256 {str(recorded)[:12]}… differs from the "
                      f"installed file's {installed[:12]}…; loading with the installed code",
                      stacklevel=2)
    target = resolve_device(device)
    transformers = require_transformers()
    from mergekit_like.wemoe.hf.modeling_wemoe import WEMoEForCausalLM

    try:
        model, info = WEMoEForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                       output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise MergeError(f"{folder}: cannot load the WEMoE model: {_first_line(exc)}") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            raise MergeError(f"{folder}: {len(keys)} {kind.replace('_', ' ')} in the WEMoE "
                             f"checkpoint, e.g. {keys[0]}")
    model.to(target).eval()
    return LoadedModel(model=model, tokenizer=_load_tokenizer(folder, transformers), device=target)
