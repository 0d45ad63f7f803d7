"""Turning model references into checkpoint sources: local folders, Hub repos, or Hub repos
from the local cache when offline."""

from __future__ import annotations

import os
from pathlib import Path

from mergekit_like.errors import MergeError
from mergekit_like.hub.settings import HubSettings, resolve_settings
from mergekit_like.io.local import LocalSource
from mergekit_like.io.source import CheckpointSource
from mergekit_like.engine.plan import SourceOpener
from mergekit_like.recipe import InputModel
from mergekit_like.recipe.refs import ModelRef, is_valid_repo_id, looks_local, missing_folder

OFFLINE_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "merges.txt", "vocab.txt",
                    "chat_template.jinja", "*.py"]
"""What an offline run takes from a cached snapshot (weights, configs, tokenizer, code)."""


def open_hub(ref: ModelRef, settings: HubSettings) -> CheckpointSource:
    """A Hub ref as a source; offline: its cached snapshot, read as a local folder. The Hub
    client (about 0.2 s of imports) is imported here, so a merge of local folders never pays it."""
    from mergekit_like.hub.errors import hub_call
    from mergekit_like.hub.source import HubSource

    if settings.offline:
        from huggingface_hub import snapshot_download

        with hub_call(repo=ref.path, endpoint=settings.endpoint, revision=ref.revision,
                      cache_dir=settings.cache_dir):
            folder = snapshot_download(ref.path, revision=ref.revision,
                                       cache_dir=settings.cache_dir, local_files_only=True,
                                       allow_patterns=OFFLINE_PATTERNS)
        ref.sha = Path(folder).name
        return LocalSource(Path(folder), ref.display)

    source = HubSource(ref.path, ref.revision, ref.display, settings)
    ref.sha = source.sha
    return source


def source_opener(*, allow_pickle: bool = False, hub: HubSettings | None = None) -> SourceOpener:
    """Opens each recipe input: local folders directly, Hub refs through ``hub`` (settings
    resolved from the environment when not given)."""

    def open_input(inp: InputModel) -> CheckpointSource:
        ref = inp.ref
        if ref.is_local:
            return LocalSource(Path(ref.path), ref.display, allow_pickle=allow_pickle)
        return open_hub(ref, hub or resolve_settings())

    return open_input


def open_ref(ref: str, *, allow_pickle: bool = False,
             hub: HubSettings | None = None) -> CheckpointSource:
    """A model named on the command line (``inspect``): a folder, or ``org/name[@rev]``."""
    folder = Path(os.path.expanduser(ref))  # Path.expanduser raises for an unknown ~user
    if folder.is_dir():
        return LocalSource(folder, ref, allow_pickle=allow_pickle)
    if looks_local(ref):
        raise MergeError(missing_folder(ref))
    name, _, rev = ref.partition("@")
    if not is_valid_repo_id(name) or (("@" in ref) and not rev):
        raise MergeError(f"'{ref}' is neither an existing folder nor a valid Hub repo id")
    return open_hub(ModelRef(path=name, revision=rev or None, is_local=False, display=ref),
                    hub or resolve_settings())
