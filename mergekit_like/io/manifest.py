"""The output manifest: ``merge_manifest.json``, the size and sha256 of every file a finished
output holds, and the resume key of the run that wrote it.

::

    {"format": "mergekit_like-manifest-v1", "mergekit_like_version": "0.1.0",
     "resume_key": "<sha256 of what decided the bytes>",
     "files": {"model.safetensors": {"size": 123, "sha256": "…"}, "config.json": {…}, …}}

It is written last, just before the output is renamed into place, and travels with the folder
(``publish`` uploads it). The model card, README.md, is left out: users edit it. ``verify`` recomputes every hash, so a flipped bit, a truncated or
removed shard, or an edited index is found; a later in-place change by this tool
(``train-router``) rewrites the entries of the files it replaced (``update_manifest``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mergekit_like.errors import MergeError

MANIFEST = "merge_manifest.json"
FORMAT = "mergekit_like-manifest-v1"
UNLISTED = frozenset({"README.md"})
"""Files left out of the manifest: the model card is the user's to edit before publishing."""
_BLOCK = 1 << 24


class Hasher:
    """sha256 and byte count of data fed in pieces (a shard as the writer streams it)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self.size = 0

    def update(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        self._digest.update(view)
        self.size += view.nbytes

    def entry(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self._digest.hexdigest()}


def file_entry(path: Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of the file at ``path``, read in 16 MiB blocks."""
    hasher = Hasher()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            hasher.update(block)
    return hasher.entry()


def manifest_text(files: dict[str, dict[str, Any]], resume_key: str | None, version: str) -> str:
    doc = {"format": FORMAT, "mergekit_like_version": version, "resume_key": resume_key,
           "files": {name: files[name] for name in sorted(files) if name not in UNLISTED}}
    return json.dumps(doc, indent=2) + "\n"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder``, or None if it has none. A manifest that is there but cannot
    be understood is a MergeError."""
    path = Path(folder) / MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MergeError(f"{folder}: {MANIFEST} cannot be read ({str(exc).splitlines()[0]})"
                         ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MergeError(f"{folder}: {MANIFEST} is not a {FORMAT} manifest")
    files = doc.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int)
            and isinstance(e.get("sha256"), str) for e in files.values()):
        raise MergeError(f"{folder}: {MANIFEST} has no valid 'files' table")
    return doc


def check_manifest(folder: Path, where: str, *, hashes: bool) -> dict[str, Any]:
    """Every file the manifest lists is there with its size (and, with ``hashes``, its sha256);
    raises a one-line MergeError naming the first file that is not. Returns the manifest."""
    folder = Path(folder)
    doc = read_manifest(folder)
    if doc is None:
        raise MergeError(f"{where}: {MANIFEST} is missing (not a finished mergekit_like output, "
                         "or written before 0.2; pass --no-manifest to check the structure only)")
    for name, want in doc["files"].items():
        path = folder / name
        if not path.is_file():
            raise MergeError(f"{where}: {name} is missing ({MANIFEST} lists it)")
        size = path.stat().st_size
        if size != want["size"]:
            raise MergeError(f"{where}: {name} has {size} bytes, {MANIFEST} recorded "
                             f"{want['size']} (truncated or replaced)")
        if hashes and file_entry(path)["sha256"] != want["sha256"]:
            raise MergeError(f"{where}: {name} does not match its sha256 in {MANIFEST} "
                             "(the file is corrupt or was changed after the merge)")
    return doc


def update_manifest(folder: Path, names: list[str]) -> None:
    """Re-record ``names`` (files this tool replaced in place) in ``folder``'s manifest, if it
    has one; the manifest itself is replaced atomically."""
    folder = Path(folder)
    doc = read_manifest(folder)
    if doc is None:
        return
    for name in names:
        doc["files"][name] = file_entry(folder / name)
    path = folder / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(manifest_text(doc["files"], doc.get("resume_key"),
                                 doc.get("mergekit_like_version", "")), encoding="utf-8")
    os.replace(tmp, path)
