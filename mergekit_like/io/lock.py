"""The output folder's lock, ``.OUT.lock`` beside OUT (docs/output_format.md §5): it holds the
owner's pid; a lock whose process is dead is stale and taken over.

The lock appears with its pid already in it: the pid is written to ``.OUT.lock.<pid>.tmp``,
which is then hard-linked as the lock (the link fails if a lock exists) and removed. A process
killed at any point therefore leaves either no lock or one naming it, never an empty lock that
a resume started right after would have to take as held. Where the filesystem has no hard
links (or room for the temporary's longer name), the lock is created with O_CREAT|O_EXCL and
the pid written after (an empty lock younger than ``_FRESH_LOCK_S`` is then taken as being
written). A ``.tmp`` left by a killed process is removed by the next ``acquire``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mergekit_like.errors import MergeError
from mergekit_like.io.fs import pid_alive

_FRESH_LOCK_S = 10.0  # an unreadable lock younger than this is taken as held (being written)


class OutputLock:
    """The lock file ``path`` of output folder ``out`` (named in messages); ``held`` is True
    from a successful ``acquire`` until ``release``."""

    def __init__(self, path: Path, out: Path):
        self.path = path
        self.out = out
        self.held = False

    def owner(self) -> int | None:
        """The pid written in the lock file; None when it is missing or unreadable."""
        try:
            return int(self.path.read_text(encoding="utf-8").split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def acquire(self, warnings: list[str]) -> None:
        """Create the lock holding this process's pid, taking over a stale one (noted in
        ``warnings``). A lock a live process holds is a MergeError; an OSError creating the file
        (read-only filesystem, no permission, name too long) propagates."""
        self._remove_dead_temps()
        for _ in range(3):
            try:
                self._create()
            except FileExistsError:
                self._remove_if_stale(warnings)
                continue
            if self.owner() != os.getpid():  # pragma: no cover - lost a takeover race
                raise MergeError(f"output {self.out} is locked by another process ({self.path})")
            self.held = True
            return
        raise MergeError(f"could not take the lock {self.path}")

    def _temp(self, pid: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{pid}.tmp")

    def _create(self) -> None:
        """Make the lock file holding this pid (FileExistsError when a lock exists)."""
        temp = self._temp(os.getpid())
        try:
            self._write_pid(os.open(temp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644))
        except OSError:          # e.g. a name at the length limit: no temp, the direct way
            temp = None
        if temp is not None:
            try:
                os.link(temp, self.path)
                return
            except FileExistsError:
                raise
            except OSError:      # no hard links here: the direct way
                pass
            finally:
                temp.unlink(missing_ok=True)
        self._write_pid(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))

    def _remove_dead_temps(self) -> None:
        """Remove the ``.tmp`` files of lock attempts whose process is dead."""
        for temp in self.path.parent.glob(f"{self.path.name}.*.tmp"):
            pid = temp.name[len(self.path.name) + 1:-len(".tmp")]
            if pid.isdigit() and not pid_alive(int(pid)):
                temp.unlink(missing_ok=True)

    def _remove_if_stale(self, warnings: list[str]) -> None:
        """Remove the existing lock file unless it is held (its pid alive, or unreadable and
        younger than ``_FRESH_LOCK_S``), which is a MergeError. A lock that vanished meanwhile is
        left for the next try."""
        pid = self.owner()
        if pid is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            held = age < _FRESH_LOCK_S
        else:
            held = pid_alive(pid)
        if held:
            who = f"process {pid}" if pid is not None else "another process"
            raise MergeError(f"output {self.out} is locked by {who} ({self.path}); "
                             "wait for it to finish, or remove the lock if it is stale")
        warnings.append(f"removed stale lock {self.path} (process {pid} is not running)")
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def _write_pid(fd: int) -> None:
        """Write this process's pid into the newly created file ``fd`` and fsync it."""
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
            f.flush()
            os.fsync(f.fileno())

    def release(self) -> None:
        """Remove the lock file if this object holds it and it still names this process."""
        if self.held:
            self.held = False
            if self.owner() == os.getpid():
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
