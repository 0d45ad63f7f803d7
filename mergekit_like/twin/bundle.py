"""The Twin bundle on disk (docs/methods/twin.md §5): reading it, and checking it (``verify``).

```
OUT/                              the shared model, a standard HF checkpoint
  twin/twin.json                  format, tasks (router output order), per-tensor kind/rank/energy
  twin/<task>/exclusive.safetensors   (or exclusive-0000k-of-0000N.safetensors + index)
  twin/router.safetensors         only after train-router
```

Per task and tensor ``W`` of the shared model, the exclusive part is
``W.twin_A`` [out, r] and ``W.twin_B`` [r, in] (delta = A @ B) for ``kind: lowrank``, or
``W.twin_delta`` (same shape as W) for ``kind: dense``; ``shared_only`` tensors have none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_like.errors import MergeError
from mergekit_like.io.local import LocalSource
from mergekit_like.io.verify import verify_weights

BUNDLE_DIR = "twin"
INFO_FILE = "twin.json"
FACTOR_STEM = "exclusive"
ROUTER_FILE = "router.safetensors"
FORMAT = "mergekit_like.twin"
FORMAT_VERSION = 1
FACTOR_LAYOUT = "delta = A @ B; A = U diag(S) [out, r]; B = V^T [r, in]"
SUFFIX_A, SUFFIX_B, SUFFIX_DELTA = ".twin_A", ".twin_B", ".twin_delta"
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
KINDS = ("lowrank", "dense", "shared_only")


@dataclass(frozen=True)
class TensorEntry:
    """``twin.json``'s record of one shared-model tensor."""

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int | None = None
    energy: dict[str, float] = field(default_factory=dict)
    svd: str | None = None

    def factor_names(self) -> list[str]:
        """Names of this tensor's exclusive tensors in each task's file."""
        if self.kind == "lowrank":
            return [self.name + SUFFIX_A, self.name + SUFFIX_B]
        if self.kind == "dense":
            return [self.name + SUFFIX_DELTA]
        return []

    def factor_shapes(self) -> list[tuple[int, ...]]:
        if self.kind == "lowrank":
            out, inp = self.shape[0], int(torch.Size(self.shape[1:]).numel())
            return [(out, self.rank), (self.rank, inp)]
        if self.kind == "dense":
            return [tuple(self.shape)]
        return []


def info_path(root: Path) -> Path:
    return Path(root) / BUNDLE_DIR / INFO_FILE


def is_bundle(root: Path) -> bool:
    return info_path(root).is_file()


def read_info(root: Path) -> dict[str, Any]:
    """``twin.json`` of the bundle at ``root``, checked for format, version and tasks."""
    path = info_path(root)
    if not path.is_file():
        raise MergeError(f"{root}: not a Twin bundle (no {BUNDLE_DIR}/{INFO_FILE})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MergeError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise MergeError(f"{path}: not a Twin bundle description (format is not {FORMAT!r})")
    if info.get("format_version") != FORMAT_VERSION:
        raise MergeError(f"{path}: format_version {info.get('format_version')!r} is not "
                         f"supported (this version reads {FORMAT_VERSION})")
    tasks = info.get("tasks")
    if (not isinstance(tasks, list) or len(tasks) < 2 or len(set(tasks)) != len(tasks)
            or not all(isinstance(t, str) and TASK_NAME.match(t) for t in tasks)):
        raise MergeError(f"{path}: 'tasks' must list two or more distinct task names")
    if not isinstance(info.get("tensors"), dict):
        raise MergeError(f"{path}: 'tensors' is missing")
    return info


def _entries(info: dict[str, Any], where: str) -> dict[str, TensorEntry]:
    out = {}
    for name, e in info["tensors"].items():
        if not isinstance(e, dict) or e.get("kind") not in KINDS:
            raise MergeError(f"{where}: tensor '{name}' has no valid kind (one of {KINDS})")
        rank = e.get("rank")
        if e["kind"] == "lowrank" and (not isinstance(rank, int) or rank < 1):
            raise MergeError(f"{where}: tensor '{name}' is lowrank without a rank")
        out[name] = TensorEntry(name, e["kind"], tuple(e.get("shape") or ()), rank,
                                dict(e.get("energy") or {}), e.get("svd"))
    return out


class TwinBundle:
    """An opened bundle: the shared model and every task's exclusive parts (headers checked).

    ``exclusive(task, name)`` returns the task's part of shared tensor ``name`` on CPU in its
    stored dtype: ``(A, B)`` for lowrank, ``(delta,)`` for dense, ``()`` for shared_only.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.info = read_info(self.root)
        self.tasks: list[str] = list(self.info["tasks"])
        where = str(info_path(self.root))
        self.entries = _entries(self.info, where)
        self.shared = LocalSource(self.root, str(self.root))
        shared_names = self.shared.tensors()
        unknown = [n for n in self.entries if n not in shared_names]
        if unknown:
            raise MergeError(f"{where}: lists tensor '{unknown[0]}', which the shared model lacks")
        self.parts: dict[str, LocalSource] = {}
        try:
            for task in self.tasks:
                self.parts[task] = _open_part(self.root, task)
                _check_part(self.parts[task], self.entries, task)
        except BaseException:
            self.close()
            raise

    @property
    def router_path(self) -> Path:
        return self.root / BUNDLE_DIR / ROUTER_FILE

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise MergeError(f"{self.root}: unknown task '{task}' (the bundle's tasks: "
                             f"{', '.join(self.tasks)})")

    def exclusive(self, task: str, name: str) -> tuple[torch.Tensor, ...]:
        self.check_task(task)
        entry = self.entries.get(name)
        if entry is None:
            return ()
        return tuple(self.parts[task].read_tensor(n) for n in entry.factor_names())

    def close(self) -> None:
        self.shared.close()
        for part in self.parts.values():
            part.close()

    def __enter__(self) -> "TwinBundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_part(root: Path, task: str) -> LocalSource:
    folder = root / BUNDLE_DIR / task
    if not folder.is_dir():
        raise MergeError(f"{root}: task '{task}' has no exclusive parts ({BUNDLE_DIR}/{task}/ "
                         "is missing)")
    return LocalSource(folder, f"{root} task '{task}'", stem=FACTOR_STEM)


def _check_part(part: LocalSource, entries: dict[str, TensorEntry], task: str) -> None:
    """Every listed factor present with the shape twin.json implies, nothing else."""
    have = part.tensors()
    expected = {}
    for entry in entries.values():
        for n, shape in zip(entry.factor_names(), entry.factor_shapes()):
            expected[n] = shape
    for n, shape in expected.items():
        if n not in have:
            raise MergeError(f"{part.ref}: factor '{n}' is missing")
        if tuple(have[n].shape) != tuple(shape):
            raise MergeError(f"{part.ref}: factor '{n}' has shape {list(have[n].shape)}, "
                             f"twin.json implies {list(shape)}")
    extra = sorted(set(have) - set(expected))
    if extra:
        raise MergeError(f"{part.ref}: holds '{extra[0]}', which twin.json does not list")


def verify_bundle(root: Path, *, read_data: bool = True, allow_nonfinite: bool = False) -> dict:
    """``verify`` of a bundle's ``twin/`` folder: twin.json, every task's weights (as the main
    model's), their names and shapes against twin.json, and the router file when recorded.
    Returns {"tasks": [...], "factor_bytes": {task: bytes}}."""

    root = Path(root)
    info = read_info(root)
    entries = _entries(info, str(info_path(root)))
    stray = sorted(p.name for p in (root / BUNDLE_DIR).iterdir()
                   if p.name not in (INFO_FILE, ROUTER_FILE, *info["tasks"])
                   and not p.name.startswith("."))
    if stray:
        raise MergeError(f"{root / BUNDLE_DIR}: '{stray[0]}' is not part of the bundle")
    sizes = {}
    for task in info["tasks"]:
        folder = root / BUNDLE_DIR / task
        if not folder.is_dir():
            raise MergeError(f"{root}: task '{task}' has no exclusive parts "
                             f"({BUNDLE_DIR}/{task}/ is missing)")
        report = verify_weights(folder, FACTOR_STEM, str(folder), read_data=read_data,
                                allow_nonfinite=allow_nonfinite)
        part = LocalSource(folder, f"{root} task '{task}'", stem=FACTOR_STEM)
        try:
            _check_part(part, entries, task)
        finally:
            part.close()
        sizes[task] = report.total_bytes
    if info.get("router") and not (root / BUNDLE_DIR / ROUTER_FILE).is_file():
        raise MergeError(f"{root}: twin.json records a router but {BUNDLE_DIR}/{ROUTER_FILE} "
                         "is missing")
    return {"tasks": list(info["tasks"]), "factor_bytes": sizes}

