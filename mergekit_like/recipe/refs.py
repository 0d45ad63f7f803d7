"""Model references (docs/recipe.md §2).

String form ``X`` or ``X@rev``:
1. ``X`` (the whole string, ``@`` included, ``~`` expanded) naming an existing local directory
   is used as is;
2. ``X`` written as a local path (``./ ../ / ~`` first, or a first path component that exists
   here) but naming no folder is an error ("no model folder at X"), never a Hub id;
3. otherwise it is split at the ``@`` (more than one is an error); the left part must be a valid
   Hub repo id (``namespace/name`` or a legacy single-segment id), the right part a branch, tag or
   commit;
4. a local folder may not carry a revision.

Dict form ``{model: {path: X, revision: R}}`` (mergekit's ``ModelReference``); ``model`` may also
be a plain string in the string form. ``override_architecture`` is ignored with a warning; LoRA
(``lora:`` or ``model+adapter``) is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from mergekit_like.hub.ids import is_valid_repo_id  # noqa: F401 - part of this module's face
from mergekit_like.recipe.yaml_lines import Locator

SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def is_valid_revision(rev: str) -> bool:
    """A branch, tag or commit: non-empty, no whitespace or control characters, no '@'."""
    return bool(rev) and not any(c.isspace() or ord(c) < 32 for c in rev) and "@" not in rev \
        and ".." not in rev


@dataclass
class ModelRef:
    """One model reference. ``display`` is the reference as the recipe writes it; ``sha`` is the
    commit the Hub revision resolved to (filled in by phase B; None for local folders)."""

    path: str
    revision: str | None
    is_local: bool
    display: str
    sha: str | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        """Identity for duplicate detection: the real path of a local folder, else (repo, rev)."""
        if self.is_local:
            return (os.path.realpath(self.path), None)
        return (self.path, self.revision)

    def resolved(self) -> dict[str, Any]:
        """Canonical form for the resume hash: Hub refs at their commit when known."""
        if self.is_local:
            return {"path": self.path, "local": True}
        return {"path": self.path, "revision": self.sha or self.revision}

    def __str__(self) -> str:
        return self.display


def _is_dir(p: str) -> bool:
    try:
        return os.path.isdir(os.path.expanduser(p))
    except (OSError, ValueError):
        return False


def _first_component(s: str) -> str:
    return s.split("/", 1)[0]


def looks_local(s: str) -> bool:
    """``s`` is written as a local path: it starts with ``./``, ``../``, ``/`` or ``~`` (or is
    ``.``/``..``), or its first path component exists here (``demo_models/ft4`` next to a
    ``demo_models`` folder). Such a reference is never taken for a Hub repo id."""
    if s in (".", "..") or s.startswith(("./", "../", "/", "~")):
        return True
    first = _first_component(s)
    try:
        return bool(first) and os.path.lexists(first)
    except (OSError, ValueError):
        return False


def missing_folder(s: str) -> str:
    """The message for a local-looking reference that names no folder."""
    full = os.path.abspath(os.path.expanduser(s))
    shown = f"{s} ({full})" if full != s else s
    if os.path.lexists(full):
        return f"{shown} is not a folder; a model reference names a model folder or a Hub repo"
    msg = f"no model folder at {shown}"
    first = _first_component(s)
    if not s.startswith(("./", "../", "/", "~")) and s not in (".", ".."):
        msg += f" ('{first}' exists here, so this is a local path, not a Hub repo id)"
    return msg


def parse_ref_string(s: str, loc: Locator, path: tuple) -> ModelRef:
    """The string form ``X`` / ``X@rev``; errors are located at ``path``."""
    if not s or not s.strip():
        raise loc.error(path, "empty model reference")
    if _is_dir(s):
        return ModelRef(path=os.path.expanduser(s), revision=None, is_local=True, display=s)
    if "+" in s:
        raise loc.error(path, f"LoRA references ('{s}', model+adapter) are not supported yet; "
                              "merge the adapter into its model first")
    name, _, rev = s.partition("@")
    if "@" in s and _is_dir(name):
        raise loc.error(path, f"'{s}': local folder '{name}' cannot take a revision "
                              f"('@{rev}'); revisions are for Hub repos")
    if looks_local(s):
        raise loc.error(path, missing_folder(s))
    if s.count("@") > 1:
        raise loc.error(path, f"'{s}' has more than one '@'; write repo@revision")
    if "@" in s:
        if not rev:
            raise loc.error(path, f"'{s}' has an empty revision after '@'")
        if not is_valid_revision(rev):
            raise loc.error(path, f"'{s}': '{rev}' is not a valid branch, tag or commit")
    if not is_valid_repo_id(name):
        raise loc.error(path, f"'{name}' is neither an existing folder nor a valid Hub repo id")
    return ModelRef(path=name, revision=rev or None, is_local=False, display=s)


def parse_ref(value: Any, loc: Locator, path: tuple, warnings: list[str]) -> ModelRef:
    """A model reference in string or dict form (mergekit's ``ModelReference``)."""
    if isinstance(value, str):
        return parse_ref_string(value, loc, path)
    if not isinstance(value, dict):
        raise loc.error(path, f"expected a model reference ('org/name', 'org/name@rev', a local "
                              f"folder or {{model: {{path, revision}}}}), got {_show(value)}")
    if "lora" in value:
        raise loc.error(path + ("lora",), "LoRA adapters are not supported yet; merge the adapter "
                                          "into its model first")
    allowed = ("model", "override_architecture", "lora")
    for key in value:
        if key not in allowed:
            hint = " (the path goes under model: {path: X, revision: R})" \
                if key in ("path", "revision") else ""
            raise loc.error(path + (key,), f"unknown key in a model reference{hint} "
                                           "(known: model, override_architecture)")
    if "override_architecture" in value:
        warnings.append(f"{loc.where(*path, 'override_architecture')}: ignored "
                        "(the architecture in config.json is kept)")
    if "model" not in value:
        raise loc.error(path, "a model reference map needs 'model': {path: X, revision: R}")
    inner = value["model"]
    ipath = path + ("model",)
    if isinstance(inner, str):
        return parse_ref_string(inner, loc, ipath)
    if not isinstance(inner, dict):
        raise loc.error(ipath, f"expected {{path: X, revision: R}}, got {_show(inner)}")
    for key in inner:
        if key not in ("path", "revision"):
            raise loc.error(ipath + (key,), "unknown key (known: path, revision)")
    p, rev = inner.get("path"), inner.get("revision")
    if not isinstance(p, str) or not p:
        raise loc.error(ipath + ("path",), "'path' must be a non-empty string")
    if rev is not None and not isinstance(rev, str):
        raise loc.error(ipath + ("revision",), f"revision must be a string, got {_show(rev)} "
                                               "(quote commit shas and numeric tags)")
    display = f"{p}@{rev}" if rev else p
    if _is_dir(p):
        if rev:
            raise loc.error(ipath + ("revision",), f"local folder '{p}' cannot take a revision "
                                                   f"('{rev}'); revisions are for Hub repos")
        return ModelRef(path=os.path.expanduser(p), revision=None, is_local=True, display=display)
    if looks_local(p):
        raise loc.error(ipath + ("path",), missing_folder(p))
    if rev is not None and not is_valid_revision(rev):
        raise loc.error(ipath + ("revision",), f"'{rev}' is not a valid branch, tag or commit")
    if not is_valid_repo_id(p):
        raise loc.error(ipath + ("path",),
                        f"'{p}' is neither an existing folder nor a valid Hub repo id")
    return ModelRef(path=p, revision=rev or None, is_local=False, display=display)


def _show(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "a map"
    return repr(value)
