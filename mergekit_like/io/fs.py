"""Small filesystem helpers of the output folder (io/output.py): directory fsync, removal,
tree size, whether a lock's pid is alive, a shard's header hash (for resume), the names of an
output's hidden siblings, and the check that an output stays apart from every input."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from mergekit_like.errors import MergeError
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def replace_dir(partial: Path, out: Path) -> None:
    """Rename the finished folder ``partial`` to ``out``; an existing ``out`` is moved aside
    first and removed only once the new one is in place."""
    old = None
    if os.path.lexists(out):
        old = sibling_path(out, f"old-{os.getpid()}")
        _remove(old)
        os.rename(out, old)
    os.rename(partial, out)
    _fsync_dir(out.parent)
    if old is not None:
        _remove(old)
        _fsync_dir(out.parent)


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def pid_alive(pid: int) -> bool:
    """A live process with this pid on this host (zombies count as dead)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:  # a zombie (killed, not yet reaped) is dead for our purposes
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rfind(b")") + 2:][:1] != b"Z"
    except OSError:
        return True


def read_header_sha256(path: Path) -> str | None:
    """sha256 of a safetensors file's length prefix + header, or None if unreadable."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                return None
            (n,) = struct.unpack("<Q", prefix)
            if n > 100 * 1024 * 1024:
                return None
            header = f.read(n)
            if len(header) != n:
                return None
    except OSError:
        return None
    return hashlib.sha256(prefix + header).hexdigest()


# ---- names beside an output, and outputs apart from inputs -------------------------------------

_NAME_MAX_FALLBACK = 255


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return _NAME_MAX_FALLBACK


def sibling_path(out: Path, suffix: str) -> Path:
    """``out.parent / ".<out.name>.<suffix>"`` (the partial folder, lock, old copy), shortened
    when that name would pass the filesystem's name limit: the output's name is cut and a
    12-hex hash of the whole name keeps siblings of different outputs apart."""
    out = Path(out)
    name = f".{out.name}.{suffix}"
    parent = out.parent
    limit = _name_max(parent if parent.is_dir() else Path("."))
    if len(name.encode()) <= limit:
        return parent / name
    tag = hashlib.sha256(out.name.encode()).hexdigest()[:12]
    room = max(1, limit - len(f".~{tag}.{suffix}".encode()))
    head = out.name.encode()[:room].decode("utf-8", errors="ignore")
    return parent / f".{head}~{tag}.{suffix}"


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_apart(out: Path, inputs: list[tuple[str, Path]]) -> None:
    """Refuse (``MergeError``, exit 2) an output that is, contains or lies inside one of
    ``inputs`` ((label, path) pairs: models, side folders, the recipe, data files), compared
    by real path, so that no flag (``--overwrite`` included) can replace or delete an input.
    Called before anything is written."""

    target = os.path.realpath(out)
    for label, path in inputs:
        real = os.path.realpath(path)
        if target == real:
            how = "is"
        elif _inside(real, target):
            how = "contains"
        elif _inside(target, real):
            how = "lies inside"
        else:
            continue
        raise MergeError(f"output {out} {how} the input {label} ({path}); "
                         "choose an output folder apart from every input")
