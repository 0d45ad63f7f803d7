"""Reading a local model folder (docs/output_format.md §2–3): layout detection, header validation,
tensor reads by positional reads of the validated header offsets (pickle through ``torch.load``).

Layouts, in the order transformers prefers them:

* ``model.safetensors`` (one file);
* ``model.safetensors.index.json`` + the shards its ``weight_map`` names;
* pickle ``pytorch_model.bin`` / ``pytorch_model.bin.index.json`` + shards — refused unless
  ``allow_pickle``, then loaded with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from huggingface_hub.constants import PYTORCH_WEIGHTS_NAME

from mergekit_like.dtypes import TORCH_TO_ST
from mergekit_like.errors import MergeError
from mergekit_like.io.containment import contained_file, containment_root
from mergekit_like.io.safetensors_header import parse_header
from mergekit_like.io.source import CheckpointSource, TensorInfo

PYTORCH_INDEX_FILE = PYTORCH_WEIGHTS_NAME + ".index.json"  # pytorch_model.bin.index.json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5",
                   ".onnx", ".pkl", ".pickle", ".npz", ".npy", ".ot", ".tflite", ".keras")
"""Files that are weights in some format: never listed as side files, never copied."""

NEVER_LISTED = frozenset({"README.md", ".gitattributes"})

MAX_OPEN_HANDLES = 2


def is_weight_file(rel: str) -> bool:
    """True for weights of any format and their index files (``*.safetensors.index.json`` …)."""
    low = rel.lower()
    if low.endswith(".index.json"):
        low = low[: -len(".index.json")]
    return low.endswith(WEIGHT_SUFFIXES)


def safe_relpath(rel: Any) -> str | None:
    """``rel`` as a clean relative posix path inside its folder, or None if it could escape it."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return None
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", "") for part in p.parts) or ":" in p.parts[0]:
        return None
    return p.as_posix()


def load_json(path: Path, what: str, ref: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise MergeError(f"{ref}: cannot read {what} ({e})") from None
    except ValueError as e:
        raise MergeError(f"{ref}: {what} is not valid JSON ({str(e).splitlines()[0]})") from None


def read_weight_map(index_path: Path, ref: str) -> dict[str, str]:
    """The ``weight_map`` of an index file, validated (names → safe relative file names)."""
    index = load_json(index_path, index_path.name, ref)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise MergeError(f"{ref}: {index_path.name} has no 'weight_map' (or it is empty)")
    out: dict[str, str] = {}
    for tname, fname in wm.items():
        rel = safe_relpath(fname)
        if rel is None:
            raise MergeError(f"{ref}: {index_path.name} maps '{tname}' to {fname!r}, which is not "
                             f"a file inside the model folder")
        out[tname] = rel
    return out


class LocalSource(CheckpointSource):
    """A model in a local folder. Headers (and the layout) are validated on construction."""

    def __init__(self, folder: Path, ref: str, *, allow_pickle: bool = False, stem: str = "model"):
        self.folder = Path(folder)
        self.ref = ref
        self.allow_pickle = allow_pickle
        self.single_file = f"{stem}.safetensors"   # ``stem``: "exclusive" in a Twin bundle's
        self.index_file = f"{stem}.safetensors.index.json"  # twin/<task>/ folders
        self._lock = threading.RLock()
        self._handles: OrderedDict[str, Any] = OrderedDict()  # pickle file -> state dict
        self._identity: dict[str, dict[str, Any]] = {}
        self._data_start: dict[str, int] = {}  # safetensors file -> byte offset of its data
        self._side_files: list[str] | None = None
        if not self.folder.is_dir():
            raise MergeError(f"{ref}: model folder does not exist ({self.folder})")
        self._root = containment_root(self.folder)  # side files must resolve inside it
        self._config = self._read_config()
        self.layout, self.files = self._detect_layout()
        self._tensors = self._read_headers() if self.layout in ("single", "sharded") \
            else self._read_pickles()

    # ---------------------------------------------------------------- construction helpers
    def _read_config(self) -> dict[str, Any] | None:
        path = self.folder / "config.json"
        if not path.is_file():
            return None
        # re-emitted into the output: a link to a file elsewhere is refused, not followed
        return parse_config(contained_file(path, *self._root, self.ref, "config.json"), self.ref)

    def _detect_layout(self) -> tuple[str, list[str]]:
        f = self.folder
        if (f / self.single_file).is_file():
            return "single", [self.single_file]
        if (f / self.index_file).is_file():
            wm = read_weight_map(f / self.index_file, self.ref)
            self._weight_map = wm
            return "sharded", self._check_listed_files(wm, self.index_file)
        pickle_layout: tuple[str, list[str]] | None = None
        if (f / PYTORCH_WEIGHTS_NAME).is_file():
            pickle_layout = ("pickle", [PYTORCH_WEIGHTS_NAME])
        elif (f / PYTORCH_INDEX_FILE).is_file():
            wm = read_weight_map(f / PYTORCH_INDEX_FILE, self.ref)
            self._weight_map = wm
            pickle_layout = ("pickle-sharded", self._check_listed_files(wm, PYTORCH_INDEX_FILE))
        if pickle_layout is not None:
            if not self.allow_pickle:
                shown = PYTORCH_WEIGHTS_NAME if pickle_layout[0] == "pickle" else PYTORCH_INDEX_FILE
                raise MergeError(f"{self.ref}: only pickle weights ({shown}); pickle can run code "
                                 f"when loaded — convert to safetensors or pass --allow-pickle")
            return pickle_layout
        present = sorted(p.name for p in f.iterdir() if p.is_file() and is_weight_file(p.name))
        if any(n.endswith(".safetensors") for n in present):
            raise MergeError(f"{self.ref}: no {self.single_file} or {self.index_file}"
                             f" (found {', '.join(present)}); sharded weights need their index")
        found = f" (found only {', '.join(present)})" if present else ""
        raise MergeError(f"{self.ref}: no model weights in {f}: expected {self.single_file}"
                         f" or {self.index_file}{found}")

    def _check_listed_files(self, wm: dict[str, str], index_name: str) -> list[str]:
        files = sorted(set(wm.values()))
        for rel in files:
            if not (self.folder / rel).is_file():
                raise MergeError(f"{self.ref}: {index_name} lists {rel}, which is missing")
        return files

    def _read_headers(self) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for rel in self.files:
            h = parse_header(self.folder / rel, model=self.ref, name=rel)
            self._identity[rel] = {"size": h.file_size, "header_sha256": h.header_sha256}
            self._data_start[rel] = h.data_start
            if self.layout == "sharded":
                self._match_index(rel, set(h.tensors))
            for tname, e in sorted(h.tensors.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
                if tname in infos:  # only possible without an index; kept for safety
                    raise MergeError(f"{self.ref}: tensor '{tname}' is stored in both "
                                     f"{infos[tname].file} and {rel}")
                infos[tname] = TensorInfo(name=tname, dtype=e["dtype"], shape=tuple(e["shape"]),
                                          file=rel, data_offsets=tuple(e["data_offsets"]))
        if not infos:
            raise MergeError(f"{self.ref}: the weights hold no tensors")
        return infos

    def _match_index(self, rel: str, in_header: set[str]) -> None:
        listed = {t for t, f in self._weight_map.items() if f == rel}
        missing = sorted(listed - in_header)
        if missing:
            raise MergeError(f"{self.ref}: {self.index_file} puts '{missing[0]}' in {rel}, "
                             f"but that file does not hold it"
                             + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = sorted(in_header - listed)
        if extra:
            raise MergeError(f"{self.ref}: {rel} holds '{extra[0]}', which "
                             f"{self.index_file} does not list for that file"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))

    def _load_pickle(self, rel: str) -> dict[str, torch.Tensor]:
        path = self.folder / rel
        kw = dict(weights_only=True, map_location="cpu")
        try:
            try:
                sd = torch.load(path, mmap=True, **kw)
            except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, **kw)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad input
            raise MergeError(f"{self.ref}: cannot load {rel} as a weights-only state dict "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                             ) from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
            raise MergeError(f"{self.ref}: {rel} is not a state dict of named tensors")
        return sd

    def _read_pickles(self) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for rel in self.files:
            sd = self._load_pickle(rel)
            st = (self.folder / rel).stat()
            self._identity[rel] = {"size": st.st_size}
            if self.layout == "pickle-sharded":
                self._match_index(rel, set(sd))
            for tname, t in sd.items():
                code = TORCH_TO_ST.get(t.dtype)
                if code is None:
                    raise MergeError(f"{self.ref}: {rel} holds tensor '{tname}' in dtype "
                                     f"{t.dtype}, which is not supported (quantized or unusual)")
                if tname in infos:
                    raise MergeError(f"{self.ref}: tensor '{tname}' is stored in both "
                                     f"{infos[tname].file} and {rel}")
                nbytes = t.numel() * t.element_size()
                infos[tname] = TensorInfo(name=tname, dtype=code, shape=tuple(t.shape), file=rel,
                                          data_offsets=(0, nbytes))
            del sd
        if not infos:
            raise MergeError(f"{self.ref}: the weights hold no tensors")
        return infos

    # ---------------------------------------------------------------- CheckpointSource API
    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._tensors)

    def config(self) -> dict[str, Any] | None:
        return self._config

    def list_files(self) -> list[str]:
        if self._side_files is None:
            out = []
            for p in self.folder.rglob("*"):
                rel = p.relative_to(self.folder).as_posix()
                parts = rel.split("/")
                if any(part.startswith(".") for part in parts) or parts[0] == "original":
                    continue
                # non-regular entries are listed too: fetch_file refuses them, by name
                if p.is_dir() or rel in NEVER_LISTED or is_weight_file(rel):
                    continue
                out.append(rel)
            self._side_files = sorted(out)
        return list(self._side_files)

    def fetch_file(self, name: str) -> Path:
        rel = safe_relpath(name)
        if rel is None or rel not in self.list_files():
            raise MergeError(f"{self.ref}: has no file '{name}'")
        return contained_file(self.folder / rel, *self._root, self.ref, rel)

    def _handle(self, rel: str) -> dict[str, torch.Tensor]:
        """A loaded (memory-mapped) pickle state dict, LRU of MAX_OPEN_HANDLES."""
        h = self._handles.get(rel)
        if h is not None:
            self._handles.move_to_end(rel)
            return h
        while len(self._handles) >= MAX_OPEN_HANDLES:
            self._handles.popitem(last=False)
        h = self._handles[rel] = self._load_pickle(rel)
        return h

    def _info(self, name: str) -> TensorInfo:
        info = self._tensors.get(name)
        if info is None:
            raise MergeError(f"{self.ref}: has no tensor '{name}'")
        return info

    def read_tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        info = self._info(name)
        if info.file in self._data_start:
            t = self._pread(info, 0, info.nbytes).view(info.torch_dtype).reshape(info.shape)
            return t if torch.device(device).type == "cpu" else t.to(device)
        with self._lock:  # pickle: the memory-mapped state dict
            t = _check_read(self.ref, info, self._handle(info.file)[name])
            return _own(t, device)  # a fresh tensor, never a view of the file

    def _pread(self, info: TensorInfo, skip: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of a tensor's data from byte ``skip`` on, into a fresh buffer.

        Header offsets were validated when the source opened. A positional read rather than
        safe_open's memory map: mapped pages stay resident (and counted in RSS) while a handle
        is open, which over a 5 GB shard defeats the memory bound; pread copies once from the
        page cache and leaves nothing mapped.
        """
        offset = self._data_start[info.file] + info.data_offsets[0] + skip
        return pread_bytes(self.folder / info.file, offset, nbytes,
                           f"{self.ref}: {info.file} ended while reading tensor '{info.name}' "
                           "(file truncated?)")

    def read_rows(self, name: str, start: int, stop: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor (first dimension) without reading the rest."""
        info = self._info(name)
        if info.file in self._data_start and info.shape:
            row = info.nbytes // info.shape[0] if info.shape[0] else 0
            start, stop = max(0, start), min(info.shape[0], max(start, stop))
            t = self._pread(info, start * row, (stop - start) * row)
            t = t.view(info.torch_dtype).reshape((stop - start, *info.shape[1:]))
            return t if torch.device(device).type == "cpu" else t.to(device)
        with self._lock:
            return _own(self._handle(info.file)[name][start:stop], device)

    def local_root(self) -> Path | None:
        return self.folder

    def identity(self) -> dict[str, Any]:
        files: dict[str, dict[str, Any]] = {}
        for rel in self.files:
            ident = self._identity[rel]
            if self.layout.startswith("pickle") and "sha256" not in ident:
                # Pickle has no header to hash: hash the whole file, once.
                dig = hashlib.sha256()
                with open(self.folder / rel, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 24), b""):
                        dig.update(block)
                ident["sha256"] = dig.hexdigest()
            # mtime too: a folder re-saved with new values but the same shapes keeps its headers
            files[rel] = {**ident, "mtime_ns": (self.folder / rel).stat().st_mtime_ns}
        return {"kind": "local", "files": files}

    def close(self) -> None:
        with self._lock:
            self._handles.clear()

    def __repr__(self) -> str:
        return f"LocalSource({self.ref!r}, {self.layout}, {len(self.files)} file(s))"


def pread_bytes(path: Path, offset: int, nbytes: int, short_read: str) -> torch.Tensor:
    """``nbytes`` of ``path`` from ``offset`` into a fresh uint8 tensor by positional reads;
    a file that ends early raises ``MergeError(short_read)``."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise MergeError(short_read)
            done += n
    finally:
        os.close(fd)
    return buf


def parse_config(path: Path, ref: str) -> dict[str, Any]:
    """config.json as a dict; quantized checkpoints are refused."""
    cfg = load_json(path, "config.json", ref)
    if not isinstance(cfg, dict):
        raise MergeError(f"{ref}: config.json is not a JSON object")
    for where, sub in [("", cfg)] + [(f"{k}.", v) for k, v in cfg.items() if isinstance(v, dict)]:
        q = sub.get("quantization_config")
        if q is not None:
            method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
            raise MergeError(f"{ref}: quantized checkpoint (config.json has "
                             f"{where}quantization_config, quant_method={method}); quantized "
                             f"inputs are not supported, use the unquantized model")
    return cfg


def _own(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    if torch.device(device).type == "cpu":
        return t.clone(memory_format=torch.contiguous_format)
    return t.to(device, copy=True).contiguous()


def _check_read(ref: str, info: TensorInfo, t: torch.Tensor) -> torch.Tensor:
    if t.dtype != info.torch_dtype or tuple(t.shape) != info.shape:
        raise MergeError(f"{ref}: tensor '{info.name}' in {info.file} read as {t.dtype} "
                         f"{list(t.shape)}, header says {info.dtype} {list(info.shape)}")
    return t


def open_source(ref_path: str, display: str, *, allow_pickle: bool = False) -> CheckpointSource:
    """The source for a resolved model reference (local folders now; the Hub plugs in here)."""
    return LocalSource(Path(ref_path), display, allow_pickle=allow_pickle)
