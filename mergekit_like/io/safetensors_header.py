"""Our own small safetensors header parser and validator (docs/output_format.md §1–2).

Layout: ``[0:8)`` u64 little-endian N, ``[8:8+N)`` a UTF-8 JSON object (possibly right-padded with
spaces), ``[8+N:end)`` the data buffer. Every check here raises a one-line ``MergeError`` naming
the model and the file, so planning (phase B) fails before any weight byte is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_like.dtypes import ST_TO_TORCH, itemsize
from mergekit_like.errors import MergeError

MAX_HEADER_BYTES = 100_000_000
"""The Rust reader's cap on N (100 MB)."""

METADATA_KEY = "__metadata__"

# Codes of the format we refuse as quantized: F8_E4M3, F8_E5M2, F8_E8M0, F6_E2M3, F6_E3M2, F4,
# E8M0 and any later low-precision float code.
_QUANT_PREFIXES = ("F8", "F6", "F4", "E8M0")


def human_bytes(n: int | float) -> str:
    """Decimal units, two decimals: 4.20 GB, 65.54 KB, 12 B."""
    n = float(n)
    if abs(n) < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        n /= 1000.0
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ParsedHeader:
    """One validated safetensors file: its tensors (file JSON order), metadata and sizes."""

    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape": list, "data_offsets": list}
    metadata: dict[str, str]
    header_len: int  # N
    file_size: int
    data_size: int  # the last `end` (== file_size - 8 - N)
    header_sha256: str  # sha256 of the 8 + N header bytes

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def _fail(model: str, fname: str, what: str) -> MergeError:
    return MergeError(f"{model}: {fname} {what}")


def _no_dup_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_quantized_code(code: str) -> bool:
    return code.upper().startswith(_QUANT_PREFIXES)


def parse_header(path: str | os.PathLike[str], *, model: str,
                 name: str | None = None) -> ParsedHeader:
    """Read and validate the header of ``path``; ``name`` is how errors call the file."""
    path = Path(path)
    fname = name if name is not None else path.name
    file_size, head, raw = _read_header_bytes(path, model, fname)
    obj = _decode_header_json(raw, model, fname)
    metadata = _take_metadata(obj, model, fname)
    tensors = {tname: _check_entry(model, fname, tname, entry) for tname, entry in obj.items()}
    data_size = _tiled_data_size(tensors, model, fname)
    _check_data_size(file_size - 8 - len(raw), data_size, model, fname)
    digest = hashlib.sha256(head + raw).hexdigest()
    return ParsedHeader(tensors=tensors, metadata=dict(metadata), header_len=len(raw),
                        file_size=file_size, data_size=data_size, header_sha256=digest)


def _read_header_bytes(path: Path, model: str, fname: str) -> tuple[int, bytes, bytes]:
    """(file size, the 8 length bytes, the N header bytes) of ``path``, N checked against the
    limit, JSON's minimum and the file size."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _fail(model, fname, f"is not a safetensors file (only {file_size} bytes; "
                                          f"too short for the 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise _fail(model, fname, f"is not a safetensors file (header length {n} bytes "
                                          f"exceeds the {human_bytes(MAX_HEADER_BYTES)} limit)")
            if n < 2:
                raise _fail(model, fname, f"is not a safetensors file (header length {n} is too "
                                          f"small for a JSON object)")
            if 8 + n > file_size:
                raise _fail(model, fname, f"is truncated (header length is {n} bytes, file has "
                                          f"only {file_size} bytes)")
            raw = f.read(n)
    except MergeError:
        raise
    except OSError as e:
        raise _fail(model, fname, f"cannot be read ({e.strerror or e})") from None
    if len(raw) != n:
        raise _fail(model, fname, "changed while being read (short read of the header)")
    return file_size, head, raw


def _decode_header_json(raw: bytes, model: str, fname: str) -> dict[str, Any]:
    """The header's JSON object (UTF-8, starting with '{', no key twice)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(model, fname, "is not a safetensors file (header is not valid UTF-8)") from None
    if not text.startswith("{"):
        raise _fail(model, fname, "is not a safetensors file (header does not start with '{')")
    try:
        obj = json.loads(text, object_pairs_hook=_no_dup_pairs)
    except _DuplicateKey as e:
        raise _fail(model, fname, f"has a bad header (tensor name '{e.key}' appears twice)") from None
    except ValueError as e:
        raise _fail(model, fname, f"is not a safetensors file (header is not valid JSON: "
                                  f"{str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise _fail(model, fname, "is not a safetensors file (header is not a JSON object)")
    return obj


def _take_metadata(obj: dict[str, Any], model: str, fname: str) -> dict[str, str]:
    """Remove ``__metadata__`` from the header object and return it ({} when absent); it must
    map strings to strings."""
    metadata = obj.pop(METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(model, fname, "has a bad header (__metadata__ must map strings to strings)")
    return metadata


def _tiled_data_size(tensors: dict[str, dict[str, Any]], model: str, fname: str) -> int:
    """The data buffer's size (the last ``end``) after checking that the tensors' offsets tile
    ``[0, last_end)`` exactly: contiguous, no holes, no overlaps."""
    spans = sorted((*t["data_offsets"], tname) for tname, t in tensors.items())
    pos = 0
    for b, e, tname in spans:
        if b != pos:
            if b < pos:
                raise _fail(model, fname, f"has a bad header (tensor '{tname}' overlaps the "
                                          f"previous tensor: starts at {b}, previous ends at {pos})")
            raise _fail(model, fname, f"has a bad header (hole in the data buffer before tensor "
                                      f"'{tname}': bytes {pos}..{b} belong to no tensor)")
        pos = e
    return pos


def _check_data_size(actual: int, data_size: int, model: str, fname: str) -> None:
    """The bytes after the header (``actual``) are exactly the declared data."""
    if actual < data_size:
        raise _fail(model, fname, f"is truncated (header declares {human_bytes(data_size)} of "
                                  f"data, file has {human_bytes(actual)})")
    if actual > data_size:
        raise _fail(model, fname, f"is not a valid safetensors file ({actual - data_size} "
                                  f"unexpected bytes after the tensor data; header declares "
                                  f"{human_bytes(data_size)} of data, file has "
                                  f"{human_bytes(actual)})")


def _check_entry(model: str, fname: str, tname: str, entry: Any) -> dict[str, Any]:
    def bad(what: str) -> MergeError:
        return _fail(model, fname, f"has a bad header (tensor '{tname}': {what})")

    if not isinstance(entry, dict):
        raise bad("entry is not a JSON object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise bad(f"missing '{key}'")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise bad("dtype is not a string")
    if dtype not in ST_TO_TORCH:
        if is_quantized_code(dtype):
            raise _fail(model, fname, f"holds tensor '{tname}' in dtype {dtype}: FP8 and "
                                      f"lower-precision (quantized) weights are not supported; "
                                      f"use a BF16/F16/F32 checkpoint")
        raise _fail(model, fname, f"holds tensor '{tname}' in unknown dtype '{dtype}' "
                                  f"(known: {', '.join(ST_TO_TORCH)})")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not a [begin, end] pair of non-negative integers")
    begin, end = offsets
    if end < begin:
        raise bad(f"data_offsets [{begin}, {end}] end before they begin")
    numel = 1
    for s in shape:
        numel *= s
    expect = numel * itemsize(dtype)
    if end - begin != expect:
        raise bad(f"data_offsets [{begin}, {end}] span {end - begin} bytes, but shape "
                  f"{shape} of {dtype} needs {expect}")
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def read_header(path: str | os.PathLike[str], *, model: str,
                name: str | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """``(tensors without __metadata__, metadata, N)`` of a validated safetensors file."""
    h = parse_header(path, model=model, name=name)
    return h.tensors, h.metadata, h.header_len
