"""Turning model references into checkpoint sources (local folders now; the Hub plugs in here)."""

from __future__ import annotations

from pathlib import Path

from mergekit_like.errors import MergeError
from mergekit_like.io.local import LocalSource
from mergekit_like.io.source import CheckpointSource
from mergekit_like.plan import SourceOpener
from mergekit_like.recipe import InputModel


def source_opener(*, allow_pickle: bool = False) -> SourceOpener:
    def open_input(inp: InputModel) -> CheckpointSource:
        ref = inp.ref
        if not ref.is_local:
            raise MergeError(f"{ref.display}: not an existing local folder, and Hub models are "
                             "not supported yet (download it and use the folder path)")
        return LocalSource(Path(ref.path), ref.display, allow_pickle=allow_pickle)

    return open_input


def open_ref(ref: str, *, allow_pickle: bool = False) -> CheckpointSource:
    """A model named on the command line (``inspect``)."""
    if not Path(ref).is_dir():
        raise MergeError(f"{ref}: not an existing local folder (Hub models are not supported yet)")
    return LocalSource(Path(ref), ref, allow_pickle=allow_pickle)
