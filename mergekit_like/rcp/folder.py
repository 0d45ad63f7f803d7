"""Importance folders (docs/methods/rcp.md §3): safetensors keyed exactly like the model's checkpoint tensors,
sharded with an index when large, ``__metadata__`` (string → string) in the single file or the
index, and the same information plus per-tensor statistics in ``importance.json``.

A folder is written into a hidden sibling ``.NAME.partial-PID`` and renamed into place when
complete, so a folder that exists is always whole. At merge time it is read per tensor through
``safe_open`` like a model (``LocalSource``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict

from mergekit_like import __version__
from mergekit_like.errors import MergeError
from mergekit_like.io.fs import _fsync_dir, _remove, replace_dir, sibling_path

INFO_FILE = "importance.json"
KINDS = ("rcp_fisher", "rcp_votes", "rcp_raw_sensitivity", "rcp_critical_lambda")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_existing(out: Path, overwrite: bool) -> None:
    if os.path.lexists(out) and not overwrite:
        raise MergeError(f"output folder exists: {out} (pass --overwrite to replace it)")


def write_importance(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     info: dict[str, Any], *, overwrite: bool, shard_size: int | str = "5GB") -> Path:
    """Write ``tensors`` (CPU, keyed like the model) with ``metadata`` and ``importance.json``
    (= metadata + ``info``) into ``out``, atomically."""
    out = Path(out)
    refuse_existing(out, overwrite)
    meta = {str(k): str(v) for k, v in {**metadata, "tool_version": __version__}.items()}
    partial = sibling_path(out, f"partial-{os.getpid()}")
    _remove(partial)
    partial.mkdir(parents=True)
    try:
        save_torch_state_dict(tensors, partial, max_shard_size=shard_size, metadata=meta)
        text = json.dumps({**meta, **info}, indent=2, sort_keys=False, default=str) + "\n"
        (partial / INFO_FILE).write_text(text)
        _fsync_dir(partial)
        replace_dir(partial, out)
    except BaseException:
        _remove(partial)
        raise
    return out


def read_info(folder: Path, label: str | None = None) -> dict[str, Any]:
    """``importance.json`` of an importance folder; MergeError if absent or not one."""
    folder = Path(folder)
    who = label or str(folder)
    path = folder / INFO_FILE
    if not folder.is_dir():
        raise MergeError(f"{who}: no such importance folder")
    if not path.is_file():
        raise MergeError(f"{who}: no {INFO_FILE} (not written by `mergekit-like importance`)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MergeError(f"{who}: {INFO_FILE} is not valid JSON ({exc.msg})") from None
    if not isinstance(info, dict) or info.get("kind") not in KINDS:
        raise MergeError(f"{who}: {INFO_FILE} has no known 'kind' (expected one of "
                         f"{', '.join(KINDS)})")
    return info


def lambda_text(lam: float) -> str:
    """λ as a folder suffix: 1000 → ``1e3``, 1e6 → ``1e6``, 2.5e4 → ``2.5e4``, 0 → ``0``,
    ∞ → ``inf``."""
    if lam == 0 or not math.isfinite(lam):
        return "0" if lam == 0 else str(lam)
    mantissa, _, exponent = f"{lam:.6e}".partition("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def votes_folder(out: Path, lam: float) -> Path:
    """``runs/rcp_votes`` + λ 1e6 → ``runs/rcp_votes_1e6``."""
    out = Path(out)
    return out.with_name(f"{out.name}_{lambda_text(lam)}")
