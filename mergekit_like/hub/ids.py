"""Hub repository ids (huggingface_hub's naming rules), for the recipe's references and
``publish``."""

from __future__ import annotations

import re

_SEGMENT = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
REPO_ID_RE = re.compile(rf"^(?:{_SEGMENT}/)?{_SEGMENT}$")


def is_valid_repo_id(s: str) -> bool:
    """``namespace/name`` or a legacy single-segment id such as ``gpt2`` (huggingface_hub's rules:
    word characters, ``-`` and ``.``, no ``--`` or ``..``, at most 96 characters)."""
    return (bool(REPO_ID_RE.match(s)) and "--" not in s and ".." not in s and len(s) <= 96)
