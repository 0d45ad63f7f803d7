"""Streaming shard writer (docs/output_format.md §4).

``ShardWriter`` writes one pre-planned shard: the header first, then each tensor's bytes in the
plan's write order (hashed on the way, for the manifest), then ``finish()`` flushes, fsyncs,
checks the size, re-opens the file with ``safe_open`` and returns the completion marker.

``AsyncShardWriter`` runs the shard writers in one background thread behind a small bounded
queue, so writing overlaps compute while at most a couple of tensors wait in memory. Errors in
the thread are re-raised in the caller's thread (on the next ``submit`` or on ``close``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergekit_like.errors import MergeError
from mergekit_like.io.manifest import Hasher
from mergekit_like.io.shards import METADATA, PlannedTensor, ShardPlan

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
WRITEBACK_BYTES = 64 << 20
"""Bytes a shard writer lets pile up in the page cache before it starts their write-back."""


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` from ``offset`` of ``fd`` to disk now, without
    waiting (a hint; no-op where ``posix_fadvise`` is missing). Otherwise a model-sized output
    sits dirty in the page cache until the shard's fsync, which then waits for all of it at the
    end of the merge (≈ 2 s per GB on a VM disk) instead of overlapping the merge. Linux starts
    the write-back of dirty pages for DONTNEED and drops only the clean ones, which a writer
    never reads again."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None or nbytes <= 0:
        return
    try:
        advise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def _is_disk_full(exc: OSError) -> bool:
    code = exc.errno if exc.errno is not None else (exc.args[0] if exc.args else None)
    return code in _DISK_FULL


def disk_full_error(filename: str) -> MergeError:
    return MergeError(f"disk full while writing {filename}; free space and re-run to resume")


def iter_write_order(plans: list[ShardPlan], skip: Iterable[str] = ()) -> Iterator[str]:
    """Output names in the order the engine must submit them (shards in ``skip`` left out)."""
    skip = set(skip)
    for plan in plans:
        if plan.filename not in skip:
            for t in plan.tensors:
                yield t.name


def _check_tensor(expected: PlannedTensor, name: str, tensor: torch.Tensor, where: str) -> None:
    if name != expected.name:
        raise ValueError(f"{where}: got tensor '{name}', expected '{expected.name}' "
                         "(tensors must arrive in the planned write order)")
    if tuple(tensor.shape) != expected.shape:
        raise ValueError(f"{where}: tensor '{name}' has shape {list(tensor.shape)}, "
                         f"planned {list(expected.shape)}")
    if tensor.dtype != expected.dtype:
        raise ValueError(f"{where}: tensor '{name}' has dtype {tensor.dtype}, "
                         f"planned {expected.dtype}")


class ShardWriter:
    """Writes one planned shard at ``path``; the header goes out on construction."""

    def __init__(self, path: str | os.PathLike, plan: ShardPlan):
        if sys.byteorder != "little":  # pragma: no cover - no big-endian hosts to test on
            raise MergeError("writing safetensors needs a little-endian host")
        self.path = Path(path)
        self.plan = plan
        self._next = 0
        self._f = None
        self._synced = 0                     # bytes whose write-back has been started
        self._hasher = Hasher()  # the whole file's sha256, for the manifest (io/manifest.py)
        try:
            self._f = open(self.path, "wb")
            self._raw_write(plan.header_bytes)
        except OSError as exc:
            self.close()
            if _is_disk_full(exc):
                raise disk_full_error(plan.filename) from exc
            raise

    def _raw_write(self, data: Any) -> None:
        self._f.write(data)
        self._hasher.update(data)
        written = self._hasher.size
        if written - self._synced >= WRITEBACK_BYTES:
            self._f.flush()
            start_writeback(self._f.fileno(), self._synced, written - self._synced)
            self._synced = written

    @property
    def expected_name(self) -> str | None:
        return self.plan.tensors[self._next].name if self._next < len(self.plan.tensors) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._f is None:
            raise ValueError(f"{self.plan.filename}: writer is closed")
        if self._next >= len(self.plan.tensors):
            raise ValueError(f"{self.plan.filename}: got tensor '{name}' after the shard's last "
                             "tensor")
        expected = self.plan.tensors[self._next]
        _check_tensor(expected, name, tensor, self.plan.filename)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != expected.nbytes:  # pragma: no cover - implied by shape and dtype
            raise ValueError(f"{self.plan.filename}: tensor '{name}' has {data.nbytes} bytes, "
                             f"planned {expected.nbytes}")
        try:
            if data.nbytes:
                self._raw_write(memoryview(data))
        except OSError as exc:
            if _is_disk_full(exc):
                raise disk_full_error(self.plan.filename) from exc
            raise
        self._next += 1

    def finish(self) -> dict:
        """Flush, fsync, check size and re-read the header; returns the completion marker."""
        plan = self.plan
        if self._next != len(plan.tensors):
            missing = plan.tensors[self._next].name
            raise ValueError(f"{plan.filename}: finished before all tensors were written "
                             f"(next expected '{missing}')")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            size = self._f.tell()
        except OSError as exc:
            if _is_disk_full(exc):
                raise disk_full_error(plan.filename) from exc
            raise
        finally:
            self.close()
        if size != plan.file_size:
            raise MergeError(f"{plan.filename}: wrote {size} bytes, planned {plan.file_size}")
        with safe_open(str(self.path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            metadata = f.metadata()
            shapes = {n: tuple(f.get_slice(n).get_shape()) for n in keys}
        if keys != set(plan.names):
            raise MergeError(f"{plan.filename}: re-read tensor names differ from the plan")
        if metadata != METADATA:
            raise MergeError(f"{plan.filename}: re-read metadata {metadata!r} differs from "
                             f"{METADATA!r}")
        if any(shapes[t.name] != t.shape for t in plan.tensors):
            raise MergeError(f"{plan.filename}: re-read tensor shapes differ from the plan")
        with open(self.path, "rb") as f:
            header_sha = hashlib.sha256(f.read(len(plan.header_bytes))).hexdigest()
        if header_sha != plan.header_sha256:
            raise MergeError(f"{plan.filename}: re-read header differs from the plan")
        return {"file": plan.filename, "size": size, "header_sha256": header_sha,
                "sha256": self._hasher.entry()["sha256"]}

    def close(self) -> None:
        """Close the file without finishing (abort); idempotent."""
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


_END = object()


class AsyncShardWriter:
    """One background thread writing ``plans`` (minus ``skip``) into ``folder``.

    ``submit`` tensors in ``iter_write_order(plans, skip)`` order; each finished shard is marked
    done in the folder. ``close`` waits for the thread and re-raises its error; ``abort`` stops it
    without finishing the current shard. A submitted tensor must not be modified afterwards.
    """

    def __init__(self, folder: Any, plans: list[ShardPlan], skip: Iterable[str] = (), *,
                 max_queue_tensors: int = 2, max_queue_bytes: int = 1 << 30):
        self.folder = folder
        skip = set(skip)
        self.plans = [p for p in plans if p.filename not in skip]
        self._expected = [t for p in self.plans for t in p.tensors]
        self._submitted = 0
        self._max_tensors = max(1, max_queue_tensors)
        self._max_bytes = max_queue_bytes
        self._queue: deque = deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = False
        self._closed = False
        self.markers: list[dict] = []
        self._thread = threading.Thread(target=self._run, name="mergekit-like-writer", daemon=True)
        self._thread.start()

    # ---- caller side ------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise ValueError("writer is closed")
        self._raise_if_failed()
        if self._submitted >= len(self._expected):
            raise ValueError(f"got tensor '{name}' after the last planned tensor")
        _check_tensor(self._expected[self._submitted], name, tensor, "writer")
        nbytes = tensor.numel() * tensor.element_size()
        with self._cond:
            while (self._error is None and not self._stop and self._queue
                   and (len(self._queue) >= self._max_tensors
                        or self._queued_bytes + nbytes > self._max_bytes)):
                self._cond.wait()
            self._raise_if_failed()
            if self._stop:
                raise ValueError("writer was aborted")
            self._queue.append((name, tensor, nbytes))
            self._queued_bytes += nbytes
            self._submitted += 1
            self._cond.notify_all()

    def close(self) -> None:
        """All tensors submitted: wait for the last shard to be finished; re-raise errors."""
        if not self._closed:
            self._closed = True
            with self._cond:
                self._queue.append((_END, None, 0))
                self._cond.notify_all()
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop the thread without finishing the shard in progress; never raises."""
        self._closed = True
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._queued_bytes = 0
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> AsyncShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---- writer thread ----------------------------------------------------------------------

    def _take(self) -> tuple[Any, torch.Tensor | None]:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return _END, None
            name, tensor, nbytes = self._queue.popleft()
            self._queued_bytes -= nbytes
            self._cond.notify_all()
            return name, tensor

    def _run(self) -> None:
        writer: ShardWriter | None = None
        current = ""
        try:
            for plan in self.plans:
                current = plan.filename
                writer = ShardWriter(self.folder.shard_path(plan.filename), plan)
                for _ in plan.tensors:
                    name, tensor = self._take()
                    if name is _END:
                        if self._stop:
                            return
                        raise ValueError(f"writer closed before all tensors were submitted "
                                         f"(next expected '{writer.expected_name}' of "
                                         f"{plan.filename})")
                    writer.write(name, tensor)
                    del tensor
                marker = writer.finish()
                writer = None
                self.folder.mark_done(marker)
                self.markers.append(marker)
            name, _ = self._take()
            if name is not _END:
                raise ValueError(f"got tensor '{name}' after the last planned tensor")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            if isinstance(exc, OSError) and _is_disk_full(exc):
                mapped = disk_full_error(current or "the output")
                mapped.__cause__ = exc
                exc = mapped
            with self._cond:
                self._error = exc
                self._queue.clear()
                self._queued_bytes = 0
                self._cond.notify_all()
        finally:
            if writer is not None:
                writer.close()
