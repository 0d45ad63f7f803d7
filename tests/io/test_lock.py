"""io/lock.py: the output lock appears with its pid in it, whatever the filesystem."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from mergekit_like.errors import MergeError
from mergekit_like.io import lock as lock_mod
from mergekit_like.io.lock import OutputLock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_is_never_seen_without_its_pid(tmp_path, monkeypatch):
    """At the moment the lock's name appears (the hard link), it already holds the pid; the
    temporary is gone afterwards."""
    seen = []
    real_link = os.link

    def link(src, dst, *a, **k):
        real_link(src, dst, *a, **k)
        seen.append(open(dst).read())

    monkeypatch.setattr(lock_mod.os, "link", link)
    lock = OutputLock(tmp_path / ".out.lock", tmp_path / "out")
    lock.acquire([])
    assert seen == [f"{os.getpid()}\n"] and lock.held
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]
    lock.release()
    assert not any(tmp_path.iterdir())


def test_without_hard_links_the_lock_is_made_directly(tmp_path, monkeypatch):
    def no_link(*a, **k):
        raise OSError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(lock_mod.os, "link", no_link)
    lock = OutputLock(tmp_path / ".out.lock", tmp_path / "out")
    lock.acquire([])
    assert (tmp_path / ".out.lock").read_text() == f"{os.getpid()}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]


def test_a_dead_process_temporary_is_removed_and_its_lock_taken_over(tmp_path):
    pid = dead_pid()
    (tmp_path / f".out.lock.{pid}.tmp").write_text(f"{pid}\n")     # killed before the link
    (tmp_path / ".out.lock").write_text(f"{pid}\n")                # killed after it
    live = tmp_path / f".out.lock.{os.getppid()}.tmp"             # a live process's attempt
    live.write_text(f"{os.getppid()}\n")
    warnings: list[str] = []
    lock = OutputLock(tmp_path / ".out.lock", tmp_path / "out")
    lock.acquire(warnings)
    assert (tmp_path / ".out.lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / f".out.lock.{pid}.tmp").exists() and live.exists()
    assert any("stale lock" in w for w in warnings)


def test_a_live_owner_keeps_the_lock(tmp_path):
    (tmp_path / ".out.lock").write_text(f"{os.getppid()}\n")
    with pytest.raises(MergeError, match="is locked by process"):
        OutputLock(tmp_path / ".out.lock", tmp_path / "out").acquire([])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]
