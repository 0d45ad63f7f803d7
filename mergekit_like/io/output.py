"""The output folder: lock, free-space check, partial folder, resume, atomic finalize
(docs/output_format.md §5–§6).

::

    parent/
      OUT/                              appears only when complete (one rename)
      .OUT.partial/                     shards and side files are written here
         .mergekit_like_state/state.json          resume key + shard plan summary
         .mergekit_like_state/done/<shard>.json   per-shard completion markers
      .OUT.lock                         O_CREAT|O_EXCL, holds the pid; stale if that pid is dead
                                        (io/lock.py)

(Sibling names too long for the filesystem are shortened with a hash: ``fs.sibling_path``.)
A finished OUT holds ``merge_manifest.json`` (io/manifest.py): every file's size and sha256 and
the resume key, so running the same merge again finds it complete. An output that is, holds or
lies inside one of the run's inputs is refused before anything is touched.

The engine holds one ``OutputFolder`` for a run: ``prepare()`` (returns the shards a resumed run
may skip), ``shard_path``/``mark_done`` for the writer, ``write_side_file`` for the rest, then
``finalize()``, or ``abort(keep_partial=…)`` on failure.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from mergekit_like import __version__
from mergekit_like.errors import AlreadyComplete, MergeError
from mergekit_like.io.fs import _fsync_dir, _remove, _tree_bytes, read_header_sha256
from mergekit_like.io.fs import check_output_apart, replace_dir, sibling_path
from mergekit_like.io.local import safe_relpath
from mergekit_like.io.lock import OutputLock
from mergekit_like.io.manifest import MANIFEST, Hasher, manifest_text, read_manifest
from mergekit_like.io.shards import ShardPlan, format_bytes
from mergekit_like.io.writer import _is_disk_full, disk_full_error

STATE_DIR = ".mergekit_like_state"
STATE_FILE = "state.json"
DONE_DIR = "done"
FREE_SPACE_MARGIN = 1.02
KEPT_PARTIALS: list[Path] = []
"""Partial folders this process left for a resume (the CLI's interrupt message reads it)."""


def _marker_name(shard: str) -> str:
    """The completion marker's file name of shard ``shard`` (``twin/a/x.safetensors`` →
    ``twin%a%x.safetensors.json``: markers sit flat in ``done/``)."""
    return shard.replace("/", "%") + ".json"


def _prune(root: Path, folder: Path, kept: set[str]) -> None:
    """Remove everything under ``folder`` but the state folder and the ``kept`` shard files
    (paths relative to ``root``) and the folders leading to them."""
    for entry in folder.iterdir():
        rel = entry.relative_to(root).as_posix()
        if rel == STATE_DIR or rel in kept:
            continue
        if entry.is_dir() and not entry.is_symlink() and any(k.startswith(rel + "/") for k in kept):
            _prune(root, entry, kept)
        else:
            _remove(entry)


class OutputFolder:
    def __init__(self, out: str | os.PathLike, *, overwrite: bool, resume: bool, resume_key: str,
                 planned_bytes: int, plans: list[ShardPlan] | None = None,
                 inputs: list[tuple[str, Path]] = (), accept_complete: bool = False):
        """``inputs``: (label, path) of everything the run reads, which OUT must stay apart
        from; ``accept_complete``: an OUT whose manifest holds this ``resume_key`` makes
        ``prepare`` raise ``AlreadyComplete`` instead of "output folder exists"."""
        self.out = Path(os.path.abspath(out))
        if not self.out.name or self.out.name in (".", ".."):
            raise MergeError(f"invalid output folder: {out}")
        self.parent = self.out.parent
        self.partial = sibling_path(self.out, "partial")
        self.lock_path = sibling_path(self.out, "lock")
        self._lock = OutputLock(self.lock_path, self.out)
        self.inputs = list(inputs)
        self.accept_complete = accept_complete
        self.state_dir = self.partial / STATE_DIR
        self.done_dir = self.state_dir / DONE_DIR
        self.overwrite = overwrite
        self.resume = resume
        self.resume_key = resume_key
        self.planned_bytes = int(planned_bytes)
        self.plans = plans
        self.warnings: list[str] = []
        self._prepared = False
        self._finished = False
        self._written: set[str] = set()
        self._entries: dict[str, dict[str, Any]] = {}  # file -> {size, sha256} for the manifest
        self._state: dict[str, Any] = {}

    # ---- prepare ----------------------------------------------------------------------------

    def prepare(self) -> set[str]:
        """Check and lock; set up ``.OUT.partial/``. Returns the completed shard file names a
        resumed run keeps (empty on a fresh start)."""
        check_output_apart(self.out, self.inputs)
        if os.path.lexists(self.out) and not self.overwrite:
            if self.accept_complete and self._is_complete():
                raise AlreadyComplete(self.out)
            raise MergeError(f"output folder exists: {self.out} (pass --overwrite to replace it)")
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MergeError(f"cannot create {self.parent}: {exc.strerror or exc}") from None
        try:
            self._lock.acquire(self.warnings)
        except OSError as exc:  # read-only filesystem, no permission, name too long
            raise MergeError(f"cannot write the output {self.out}: {exc.strerror or exc} "
                             f"({exc.filename or self.lock_path})") from None
        try:
            mode, kept = self._inspect_partial()
            self._check_free_space(mode, kept)
            self._setup_partial(mode, kept)
        except OSError as exc:
            self._lock.release()
            raise MergeError(f"cannot write the output {self.out}: {exc.strerror or exc} "
                             f"({exc.filename or self.partial})") from None
        except BaseException:
            self._lock.release()
            raise
        self._prepared = True
        self._written = set(kept)
        self._entries = {fn: {"size": size, "sha256": sha} for fn, (size, sha) in kept.items()}
        return set(kept)

    def _is_complete(self) -> bool:
        """OUT's manifest records this run's resume key and OUT's files have their sizes."""
        try:
            doc = read_manifest(self.out)
        except MergeError:
            return False
        if doc is None or doc.get("resume_key") != self.resume_key:
            return False
        for name, entry in doc["files"].items():
            path = self.out / name
            if not path.is_file() or path.stat().st_size != entry["size"]:
                return False
        return True

    def _inspect_partial(self) -> tuple[str, dict[str, tuple[int, str]]]:
        """Read-only look at an existing partial folder: ('none'|'fresh'|'mismatch'|'resume',
        {kept shard: (size, file sha256)})."""
        if not os.path.lexists(self.partial):
            return "none", {}
        if not self.resume:
            return "fresh", {}
        try:
            state = json.loads((self.state_dir / STATE_FILE).read_text(encoding="utf-8"))
            key = state.get("resume_key")
        except (OSError, ValueError, AttributeError):
            key = None
        if key != self.resume_key:
            return "mismatch", {}
        self._state = state
        planned = {p.filename: p for p in self.plans} if self.plans is not None else None
        kept: dict[str, tuple[int, str]] = {}
        for marker_path in sorted(self.done_dir.glob("*.json")) if self.done_dir.is_dir() else []:
            try:
                marker = json.loads(marker_path.read_text(encoding="utf-8"))
                fn, size, sha = marker["file"], int(marker["size"]), marker["header_sha256"]
                file_sha = str(marker["sha256"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not isinstance(fn, str) or marker_path.name != _marker_name(fn) \
                    or safe_relpath(fn) != fn:
                continue
            if planned is not None and (fn not in planned or planned[fn].file_size != size
                                        or planned[fn].header_sha256 != sha):
                continue
            path = self.partial / fn
            if not path.is_file() or path.is_symlink() or path.stat().st_size != size:
                continue
            if read_header_sha256(path) != sha:
                continue
            kept[fn] = (size, file_sha)
        return "resume", kept

    def _check_free_space(self, mode: str, kept: dict[str, tuple[int, str]]) -> None:
        kept_bytes = sum(size for size, _ in kept.values())
        still_needed = max(0, self.planned_bytes - kept_bytes)
        required = int(still_needed * FREE_SPACE_MARGIN)
        free = shutil.disk_usage(self.parent).free
        if mode != "none":  # files of the old partial that will be deleted
            free += max(0, _tree_bytes(self.partial) - kept_bytes)
        if free < required:
            raise MergeError(
                f"not enough free space in {self.parent}: the output needs "
                f"{format_bytes(required)} ({required} bytes, planned output + 2%), only "
                f"{format_bytes(free)} ({free} bytes) available")

    def _setup_partial(self, mode: str, kept: dict[str, tuple[int, str]]) -> None:
        if mode == "mismatch":
            self.warnings.append(f"{self.partial}: partial output from a different "
                                 "recipe/input; starting over")
        if mode in ("fresh", "mismatch"):
            _remove(self.partial)
        if mode == "resume":
            _prune(self.partial, self.partial, set(kept))
            for entry in self.state_dir.iterdir():
                if entry.name not in (DONE_DIR, STATE_FILE):
                    _remove(entry)
            if self.done_dir.is_dir():
                markers = {_marker_name(fn) for fn in kept}
                for entry in self.done_dir.iterdir():
                    if entry.name not in markers:
                        _remove(entry)
        else:
            self._state = {}
        self.done_dir.mkdir(parents=True, exist_ok=True)
        values = self._state.get("values") if isinstance(self._state.get("values"), dict) else {}
        self._state = {
            "resume_key": self.resume_key,
            "mergekit_like_version": __version__,
            "shards": [p.summary() for p in self.plans] if self.plans is not None else None,
            "values": values,
        }
        self._write_state()
        _fsync_dir(self.partial)
        _fsync_dir(self.parent)

    # ---- writing ----------------------------------------------------------------------------

    def _atomic_write(self, path: Path, data: bytes, shown_name: str) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            if _is_disk_full(exc):
                raise disk_full_error(shown_name) from exc
            raise
        _fsync_dir(path.parent)

    def _require_prepared(self) -> None:
        if not self._prepared or self._finished:
            raise RuntimeError("output folder is not prepared (call prepare() first)")

    def shard_path(self, name: str) -> Path:
        """Where shard ``name`` (a relative path: groups live in sub-folders) is written."""
        path = self.partial.joinpath(*PurePosixPath(name).parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def mark_done(self, marker: dict) -> None:
        """Record a finished, fsync'd and verified shard (its marker: file, size, header_sha256)."""
        self._require_prepared()
        name = marker["file"]
        self._atomic_write(self.done_dir / _marker_name(name),
                           json.dumps(marker, sort_keys=True).encode("utf-8"), name)
        self._written.add(name)
        self._entries[name] = {"size": int(marker["size"]), "sha256": marker["sha256"]}

    def write_side_file(self, name: str, data: bytes | str) -> Path:
        """Write ``name`` (a relative path) into the partial folder via a temp file."""
        self._require_prepared()
        rel = PurePosixPath(name)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts or rel.parts[0] == STATE_DIR:
            raise ValueError(f"invalid side file name: {name!r}")
        if str(rel) == MANIFEST:
            raise ValueError(f"{MANIFEST} is written by finalize()")
        path = self.partial.joinpath(*rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        self._atomic_write(path, blob, name)
        self._written.add(str(rel))
        hasher = Hasher()
        hasher.update(blob)
        self._entries[str(rel)] = hasher.entry()
        return path

    @property
    def written_files(self) -> list[str]:
        """Every file this run put in the output (kept shards, new shards, side files)."""
        return sorted(self._written)

    # ---- extra resume state (e.g. per-model TIES thresholds) ---------------------------------

    def state_get(self, key: str, default: Any = None) -> Any:
        return self._state.get("values", {}).get(key, default)

    def state_set(self, key: str, value: Any) -> None:
        """Store a JSON value in state.json (kept across a resume with the same key)."""
        self._require_prepared()
        self._state.setdefault("values", {})[key] = value
        self._write_state()

    def _write_state(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._atomic_write(self.state_dir / STATE_FILE,
                           (json.dumps(self._state, indent=2, sort_keys=True) + "\n").encode(),
                           STATE_FILE)

    # ---- finish -----------------------------------------------------------------------------

    def finalize(self) -> Path:
        """Write the manifest, publish the partial folder as OUT (atomic rename) and release
        the lock."""
        self._require_prepared()
        _remove(self.state_dir)
        self._atomic_write(self.partial / MANIFEST,
                           manifest_text(self._entries, self.resume_key, __version__).encode(),
                           MANIFEST)
        _fsync_dir(self.partial)
        if os.path.lexists(self.out) and not self.overwrite:
            raise MergeError(f"output folder exists: {self.out} "
                             "(pass --overwrite to replace it)")
        replace_dir(self.partial, self.out)
        self._finished = True
        self._lock.release()
        return self.out

    def abort(self, keep_partial: bool) -> None:
        """Give up: release the lock; delete the partial folder unless ``keep_partial`` and it
        holds something a resume can use (a finished shard, a stored value). Idempotent; never
        touches OUT or a partial folder this object did not prepare."""
        if self._prepared and not self._finished:
            if keep_partial and self._has_progress():
                KEPT_PARTIALS.append(self.partial)
            else:
                shutil.rmtree(self.partial, ignore_errors=True)
        self._finished = self._finished or self._prepared
        self._lock.release()

    def _has_progress(self) -> bool:
        try:
            return any(self.done_dir.iterdir()) or bool(self._state.get("values"))
        except OSError:
            return False

    def __enter__(self) -> OutputFolder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finished:
            keep = self.done_dir.is_dir() and any(self.done_dir.iterdir())
            self.abort(keep_partial=keep)
