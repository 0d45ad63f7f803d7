"""Publishing a finished merge output to the Hub (docs/hub.md §4): one commit, stale shards removed."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from mergekit_like import __version__
from mergekit_like.errors import MergeError
from mergekit_like.hub.errors import hub_call
from mergekit_like.hub.settings import HubSettings
from mergekit_like.hub.ids import is_valid_repo_id
from mergekit_like.io.verify import verify_output

STALE_WEIGHTS = ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
"""Weight files of an earlier publish; the ones this commit uploads are exempt."""

SCAN_CHUNK = 8 << 20
"""Bytes read at a time when scanning the files about to be uploaded for the token."""

_ABS_PATH = re.compile(r"(?m)^\s*-?\s*(?:model|base_model|path|tokenizer_source)\s*:\s*['\"]?(/|~|[A-Za-z]:\\)")


@dataclass(frozen=True)
class Published:
    url: str          # the commit URL, or the PR URL with create_pr
    commit: str
    files: list[str]
    warnings: list[str]


def publish(out: Path, repo_id: str, settings: HubSettings, *, private: bool = False,
            revision: str | None = None, create_pr: bool = False,
            message: str | None = None,
            check: Callable[[Path], Any] | None = None) -> Published:
    """Upload OUT to ``repo_id`` in one commit after checking it is a complete merge output
    (``check(out)``; default: ``verify_output`` without the data reads; the CLI passes the
    registry's, which also checks what a method adds, such as a Twin bundle's factors)."""
    out = Path(out)
    if "/" not in repo_id or not is_valid_repo_id(repo_id):
        raise MergeError(f"'{repo_id}' is not a Hub repo id of the form namespace/name")
    if not out.is_dir():
        raise MergeError(f"{out}: no such output folder")
    (check or (lambda o: verify_output(o, read_data=False)))(out)  # complete, no partial left
    if not settings.token:
        raise MergeError("publishing needs a token; set HF_TOKEN")
    if settings.offline:
        raise MergeError("cannot publish in offline mode (unset HF_HUB_OFFLINE)")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in
                                               p.relative_to(out).parts))
    for rel in files:  # the last line of defence: never upload the credential itself
        if _holds(out / rel, settings.token.encode()):
            raise MergeError(f"{out / rel} contains the Hub token in use; nothing was uploaded "
                             "(remove the file, or the token from it, and publish again)")
    warnings = []
    recipe = out / "mergekit_config.yml"
    if recipe.is_file() and _ABS_PATH.search(recipe.read_text(encoding="utf-8", errors="replace")):
        warnings.append("the recipe embedded in the model card names absolute local paths")
    api = HfApi(endpoint=settings.endpoint, token=settings.token)
    with hub_call(repo=repo_id, endpoint=settings.endpoint, revision=revision):
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(out), revision=revision, create_pr=create_pr,
            commit_message=message or f"Upload merged model (mergekit_like {__version__})",
            allow_patterns=files, delete_patterns=STALE_WEIGHTS)
    url = (info.pr_url if create_pr and info.pr_url else info.commit_url) or ""
    return Published(url=url, commit=info.oid or "", files=files, warnings=warnings)


def _holds(path: Path, needle: bytes, chunk: int = SCAN_CHUNK) -> bool:
    """Whether ``needle`` occurs in the file, read in chunks that overlap by len(needle) - 1
    bytes so a match across a chunk boundary is found."""
    if not needle:
        return False
    keep = len(needle) - 1
    tail = b""
    with open(path, "rb") as fh:
        while block := fh.read(max(chunk, len(needle))):
            window = tail + block
            if needle in window:
                return True
            tail = window[-keep:] if keep else b""
    return False
