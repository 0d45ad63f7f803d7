"""Statistics folders (docs/methods/rcp.md §3, docs/methods/regmean.md §3): safetensors keyed
exactly like a model's checkpoint tensors, sharded with an index when large, and
``importance.json`` holding the folder's ``kind``, its metadata and per-tensor facts.

A folder is written into a hidden sibling ``.NAME.partial-PID`` and renamed into place when
complete, so a folder that exists is always whole. At merge time it is read per tensor through
``safe_open`` like a model (``LocalSource``). Every data-driven method (RCP's Fisher prior and
votes, RegMean's Gram matrices, Fisher merging's diagonal Fisher) writes one of these.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from huggingface_hub import save_torch_state_dict

from mergekit_like import __version__
from mergekit_like.errors import MergeError
from mergekit_like.io.fs import _fsync_dir, _remove, replace_dir, sibling_path
from mergekit_like.io.shards import INDEX_FILE, OutputSpec, index_text, plan_shards, parse_size
from mergekit_like.io.writer import ShardWriter

INFO_FILE = "importance.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_existing(out: Path, overwrite: bool) -> None:
    if os.path.lexists(out) and not overwrite:
        raise MergeError(f"output folder exists: {out} (pass --overwrite to replace it)")


def _atomically(out: Path, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    """Run ``fill(partial)`` on a fresh hidden sibling of ``out``, then rename it into place
    (removing the sibling on any failure)."""
    out = Path(out)
    refuse_existing(out, overwrite)
    partial = sibling_path(out, f"partial-{os.getpid()}")
    _remove(partial)
    partial.mkdir(parents=True)
    try:
        fill(partial)
        _fsync_dir(partial)
        replace_dir(partial, out)
    except BaseException:
        _remove(partial)
        raise
    return out


def _info_text(metadata: dict[str, Any], info: dict[str, Any]) -> tuple[dict[str, str], str]:
    meta = {str(k): str(v) for k, v in {**metadata, "tool_version": __version__}.items()}
    return meta, json.dumps({**meta, **info}, indent=2, sort_keys=False, default=str) + "\n"


def write_stats_folder(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                       info: dict[str, Any], *, overwrite: bool,
                       shard_size: int | str = "5GB") -> Path:
    """Write ``tensors`` (CPU, keyed like the model) with ``metadata`` (also the safetensors
    ``__metadata__``) and ``importance.json`` (= metadata + ``info``) into ``out``, atomically."""
    meta, text = _info_text(metadata, info)

    def fill(partial: Path) -> None:
        save_torch_state_dict(tensors, partial, max_shard_size=shard_size, metadata=meta)
        (partial / INFO_FILE).write_text(text)

    return _atomically(out, overwrite, fill)


def stream_stats_folder(out: Path, specs: list[OutputSpec],
                        produce: Callable[[str], torch.Tensor], metadata: dict[str, Any],
                        info: Callable[[], dict[str, Any]], *, overwrite: bool,
                        shard_size: int | str = "5GB",
                        before_rename: Iterable[Callable[[Path], None]] = ()) -> Path:
    """Like ``write_stats_folder``, but one tensor at a time: ``produce(name)`` returns each
    planned tensor (shape and dtype as ``specs`` say) just before it is written, so a folder of
    any size is written with one tensor in memory. ``info()`` is called after the last tensor
    (per-tensor facts gathered while producing); ``before_rename`` callbacks get the partial
    folder last (to remove scratch files)."""
    plans = plan_shards(specs, parse_size(shard_size))

    def fill(partial: Path) -> None:
        for plan in plans:
            writer = ShardWriter(partial / plan.filename, plan)
            try:
                for t in plan.tensors:
                    writer.write(t.name, produce(t.name))
                writer.finish()
            finally:
                writer.close()
        if len(plans) > 1:
            (partial / INDEX_FILE).write_text(index_text(plans, __version__))
        (partial / INFO_FILE).write_text(_info_text(metadata, info())[1])
        for callback in before_rename:
            callback(partial)

    return _atomically(out, overwrite, fill)


def read_stats_info(folder: Path, kinds: tuple[str, ...], label: str | None = None) -> dict[str, Any]:
    """``importance.json`` of a statistics folder whose ``kind`` is one of ``kinds``;
    MergeError (naming ``label`` or the folder) if absent, unreadable or of another kind."""
    folder = Path(folder)
    who = label or str(folder)
    path = folder / INFO_FILE
    if not folder.is_dir():
        raise MergeError(f"{who}: no such statistics folder")
    if not path.is_file():
        raise MergeError(f"{who}: no {INFO_FILE} (not written by mergekit-like)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MergeError(f"{who}: {INFO_FILE} is not valid JSON ({exc.msg})") from None
    if not isinstance(info, dict) or info.get("kind") not in kinds:
        got = info.get("kind") if isinstance(info, dict) else None
        raise MergeError(f"{who}: {INFO_FILE} has kind {got!r}; expected one of "
                         f"{', '.join(kinds)}")
    return info
