"""A model on the Hugging Face Hub as a ``CheckpointSource`` (docs/hub.md §2).

Construction costs metadata only: the revision is resolved to one commit sha (every later
request uses it), config.json and the index are downloaded, and every shard's safetensors
header is read over HTTP Range by ``HfApi.get_safetensors_metadata``. The recipe is validated
against those headers before any shard is fetched. Shards are downloaded into the
huggingface_hub cache when ``read_tensor`` first needs them, in the order ``plan_reads`` gave,
with the next one prefetched in a background thread. With ``low_disk`` the shards go to a
private cache, one at a time, and each is deleted once every planned tensor in it has been
released.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE

from mergekit_like.errors import MergeError
from mergekit_like.hub.errors import NO_SAFETENSORS, hub_call
from mergekit_like.hub.settings import HubSettings
from mergekit_like.io.containment import contained_file
from mergekit_like.io.local import (NEVER_LISTED, is_weight_file, parse_config, pread_bytes,
                                    read_weight_map, safe_relpath)
from mergekit_like.io.safetensors_header import parse_header
from mergekit_like.io.source import CheckpointSource, TensorInfo

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg")


class HubSource(CheckpointSource):
    """Hub repo ``repo`` at ``revision`` (default main), pinned to its commit ``sha``."""

    def __init__(self, repo: str, revision: str | None, ref: str, settings: HubSettings):
        self.repo, self.revision, self.ref = repo, revision, ref
        self.settings = settings
        self.api = HfApi(endpoint=settings.endpoint, token=settings.token)
        with self._call():
            info = self.api.model_info(repo, revision=revision)
        self.sha: str = info.sha
        self.siblings = sorted(s.rfilename for s in (info.siblings or []))
        _remember_revision(settings.cache_dir, repo, revision or "main", self.sha)
        self._lock = threading.Lock()
        self._cache = Path(tempfile.mkdtemp(prefix="mergekit-like-low-disk-")) \
            if settings.low_disk else settings.cache_dir
        self._local: dict[str, Path] = {}            # shard -> downloaded path
        self._data_start: dict[str, int] = {}
        self._pending: dict[str, Future] = {}
        self._order: list[str] = []                  # shards in the order the plan reads them
        self._left: dict[str, Counter[str]] = {}         # low_disk: planned tensors not yet released
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-prefetch")
        self._config = (parse_config(self._side_file("config.json"), ref)
                        if "config.json" in self.siblings else None)
        self.files, weight_map = self._layout()
        self._tensors = self._read_headers(weight_map)

    # ---------------------------------------------------------------- metadata
    def _at(self) -> str:
        return f"{self.repo}@{self.sha[:7]}" if getattr(self, "sha", None) else self.repo

    def _call(self, filename: str | None = None):
        return hub_call(repo=self.repo, endpoint=self.settings.endpoint,
                        revision=getattr(self, "sha", None) if filename else self.revision,
                        filename=filename, cache_dir=self.settings.cache_dir)

    def _layout(self) -> tuple[list[str], dict[str, str] | None]:
        if SAFETENSORS_SINGLE_FILE in self.siblings:
            return [SAFETENSORS_SINGLE_FILE], None
        if SAFETENSORS_INDEX_FILE not in self.siblings:
            raise MergeError(NO_SAFETENSORS.format(repo=self.repo))
        wm = read_weight_map(self._download(SAFETENSORS_INDEX_FILE), self.ref)
        files = sorted(set(wm.values()))
        for rel in files:
            if rel not in self.siblings:
                raise MergeError(f"{self._at()} has no file '{rel}' (listed in "
                                 f"{SAFETENSORS_INDEX_FILE})")
        return files, wm

    def _read_headers(self, weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
        with self._call():
            meta = self.api.get_safetensors_metadata(self.repo, revision=self.sha)
        infos: dict[str, TensorInfo] = {}
        for rel in self.files:
            fm = meta.files_metadata.get(rel)
            if fm is None:
                raise MergeError(f"{self._at()}: no safetensors header for {rel}")
            if weight_map is not None:
                listed = {t for t, f in weight_map.items() if f == rel}
                if listed != set(fm.tensors):
                    odd = sorted(listed ^ set(fm.tensors))[0]
                    raise MergeError(f"{self._at()}: {SAFETENSORS_INDEX_FILE} and the header of "
                                     f"{rel} disagree about tensor '{odd}'")
            for name, t in sorted(fm.tensors.items(), key=lambda kv: tuple(kv[1].data_offsets)):
                infos[name] = TensorInfo(name=name, dtype=t.dtype, shape=tuple(t.shape),
                                         file=rel, data_offsets=tuple(t.data_offsets))
        if not infos:
            raise MergeError(f"{self._at()}: the weights hold no tensors")
        return infos

    # ---------------------------------------------------------------- downloads
    def _download(self, filename: str, cache_dir: Path | None = None) -> Path:
        with self._call(filename):
            path = hf_hub_download(self.repo, filename, revision=self.sha,
                                   cache_dir=cache_dir or self.settings.cache_dir,
                                   endpoint=self.settings.endpoint, token=self.settings.token)
        return Path(path)

    def _fetch_shard(self, rel: str) -> Path:
        """Download one shard and check it against the header the plan was built from."""
        try:
            path = self._download(rel, self._cache)
        except OSError as exc:  # the library's size consistency check
            raise MergeError(f"{self._at()}: truncated download of {rel} ({exc})") from None
        try:
            header = parse_header(path, model=self.ref, name=rel)
        except MergeError as exc:
            _remove_cached(path)
            raise MergeError(f"{self._at()}: truncated download of {rel} ({exc})") from None
        for name, e in header.tensors.items():
            info = self._tensors.get(name)
            if info is None or info.file != rel or info.dtype != e["dtype"] \
                    or info.shape != tuple(e["shape"]) \
                    or info.data_offsets != tuple(e["data_offsets"]):
                _remove_cached(path)
                raise MergeError(f"{self._at()}: downloaded {rel} does not match the header read "
                                 f"before the merge (tensor '{name}'); checksum or size mismatch")
        self._data_start[rel] = header.data_start
        return path

    def _ensure(self, rel: str) -> Path:
        with self._lock:
            path = self._local.get(rel)
            if path is not None:
                return path
            fut = self._pending.pop(rel, None)
        path = fut.result() if fut is not None else self._fetch_shard(rel)
        with self._lock:
            self._local[rel] = path
        self._prefetch_after(rel)
        return path

    def _prefetch_after(self, rel: str) -> None:
        order = self._order or self.files
        if self.settings.low_disk or rel not in order:  # low disk: one shard at a time
            return
        with self._lock:
            for nxt in order[order.index(rel) + 1:]:
                if nxt not in self._local and nxt not in self._pending:
                    self._pending[nxt] = self._pool.submit(self._fetch_shard, nxt)
                    return
                if nxt in self._pending:
                    return

    def download_bytes(self) -> int:
        """Bytes of weight shards not in the cache yet (``--dry-run``; sizes from the repo tree)."""
        from huggingface_hub import try_to_load_from_cache

        with self._call():
            sizes = {e.path: e.size for e in self.api.list_repo_tree(
                self.repo, revision=self.sha, recursive=True) if hasattr(e, "size")}
        return sum(sizes.get(rel, 0) for rel in self.files
                   if not isinstance(try_to_load_from_cache(self.repo, rel, cache_dir=self._cache,
                                                            revision=self.sha), str))

    # ---------------------------------------------------------------- CheckpointSource API
    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._tensors)

    def config(self) -> dict[str, Any] | None:
        return self._config

    def list_files(self) -> list[str]:
        return [f for f in self.siblings
                if f not in NEVER_LISTED and not is_weight_file(f)
                and not f.startswith("original/") and not f.lower().endswith(IMAGE_SUFFIXES)
                and safe_relpath(f) is not None]

    def fetch_file(self, name: str) -> Path:
        if name not in self.list_files():
            raise MergeError(f"{self._at()} has no file '{name}'")
        return self._side_file(name)

    def _side_file(self, name: str) -> Path:
        """Download ``name`` (shared cache) and return its real path, which must be a regular
        file inside this repo's cache folder: a cache entry linked elsewhere is refused."""
        from huggingface_hub.file_download import repo_folder_name

        path = self._download(name)
        repo_cache = Path(self.settings.cache_dir) / repo_folder_name(repo_id=self.repo,
                                                                      repo_type="model")
        return contained_file(path, Path(os.path.realpath(repo_cache)),
                              "the model's Hub cache folder", self._at(), name)

    def plan_reads(self, names: Iterable[str]) -> None:
        order: list[str] = []
        left: dict[str, Counter[str]] = {}  # a slice recipe may read a tensor twice
        for name in names:
            info = self._tensors.get(name)
            if info is None:
                continue
            if info.file not in left:
                order.append(info.file)
                left[info.file] = Counter()
            left[info.file][name] += 1
        self._order, self._left = order, left
        if order and not self.settings.low_disk:  # fetch the first shard while the engine sets up
            with self._lock:
                if order[0] not in self._local and order[0] not in self._pending:
                    self._pending[order[0]] = self._pool.submit(self._fetch_shard, order[0])

    def read_tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        info = self._tensors.get(name)
        if info is None:
            raise MergeError(f"{self.ref}: has no tensor '{name}'")
        path = self._ensure(info.file)
        buf = pread_bytes(path, self._data_start[info.file] + info.data_offsets[0], info.nbytes,
                          f"{self._at()}: {info.file} ended while reading tensor '{name}'")
        t = buf.view(info.torch_dtype).reshape(info.shape)
        return t if torch.device(device).type == "cpu" else t.to(device)

    def release(self, name: str) -> None:
        """``--low-disk``: delete a shard once every planned tensor in it was read."""
        if not self.settings.low_disk:
            return
        info = self._tensors.get(name)
        if info is None:
            return
        with self._lock:
            left = self._left.get(info.file)
            if left is None:
                return
            if left[name] > 1:
                left[name] -= 1
                return
            left.pop(name, None)
            if left:
                return
            del self._left[info.file]
            path = self._local.pop(info.file, None)
        if path is not None:
            _remove_cached(path)

    def identity(self) -> dict[str, Any]:
        return {"kind": "hub", "repo": self.repo, "sha": self.sha}

    def local_root(self) -> Path | None:
        return Path(self._cache) / f"models--{self.repo.replace('/', '--')}"

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.settings.low_disk:
            shutil.rmtree(self._cache, ignore_errors=True)

    def __repr__(self) -> str:
        return f"HubSource({self.repo!r}@{self.sha[:7]}, {len(self.files)} file(s))"


def _remember_revision(cache_dir: Path, repo: str, revision: str, sha: str) -> None:
    """Write ``refs/<revision>`` in the cache (downloads pinned to a sha do not), so a later
    offline run can resolve the same revision name to this commit (docs/hub.md §5)."""
    if revision == sha:
        return
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(cache_dir) / repo_folder_name(repo_id=repo, repo_type="model") / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)  # no trailing newline: the library's lookup reads it verbatim
    except OSError:
        pass  # only an offline convenience


def _remove_cached(path: Path) -> None:
    """Delete a downloaded file: the snapshot link and the blob it points to."""
    try:
        target = path.resolve()
        path.unlink(missing_ok=True)
        if target != path:
            os.unlink(target)
    except OSError:
        pass
