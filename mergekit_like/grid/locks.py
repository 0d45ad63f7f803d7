"""The grid lock (docs/grid.md §4): ``.grid.lock`` (``.grid.<i>-of-<n>.lock`` per slice) holds
the driver's pid, host and start time, created exclusively."""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from mergekit_like.errors import MergeError
from mergekit_like.io.fs import pid_alive


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def lock_path(root: Path, shard: tuple[int, int] | None) -> Path:
    return root / (".grid.lock" if shard is None else f".grid.{shard[0]}-of-{shard[1]}.lock")


def acquire_lock(root: Path, shard: tuple[int, int] | None, break_lock: bool) -> tuple[Path, list[str]]:
    """Create the grid lock exclusively (docs/grid.md §4); returns it and any warning."""
    path = lock_path(root, shard)
    host = socket.gethostname()
    warnings: list[str] = []
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                held = {}
            if held.get("host") == host and isinstance(held.get("pid"), int) \
                    and pid_alive(held["pid"]):
                raise MergeError(f"{root}: another grid run (pid {held.get('pid')}) holds "
                                 f"{path.name}") from None
            if held.get("host") not in (None, host) and not break_lock:
                raise MergeError(f"{root}: {path.name} is held by {held.get('host')} (pass "
                                 "--break-lock if that run is dead)") from None
            warnings.append(f"removed a stale lock {path.name} (pid {held.get('pid')})")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump({"pid": os.getpid(), "host": host, "started": _now()}, fh)
        return path, warnings
    raise MergeError(f"{root}: cannot take {path.name}")
