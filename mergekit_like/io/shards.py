"""Output shard planning (docs/output_format.md §3–§4).

Every output tensor's name, shape and dtype is known before any arithmetic, so the whole layout
is fixed up front: which shard each tensor goes to, the final ``-of-N`` file names, each tensor's
byte offsets and each shard's exact header bytes and file size. The streaming writer
(io/writer.py) then only has to emit the header and the tensor bytes in this order.

Shards are contiguous runs of the plan order: a new shard starts when the next tensor would push
the current one over the limit, and a tensor larger than the limit gets a shard of its own.
Within a shard, tensors are written by (itemsize descending, plan order), so every tensor's
offset is a multiple of its itemsize; the header is space-padded so the data starts on an 8-byte
boundary.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import torch
from huggingface_hub import constants as hf_constants

from mergekit_like.dtypes import TORCH_TO_ST
from mergekit_like.errors import MergeError

SINGLE_FILE: str = hf_constants.SAFETENSORS_SINGLE_FILE
INDEX_FILE: str = hf_constants.SAFETENSORS_INDEX_FILE
FILE_PATTERN: str = hf_constants.SAFETENSORS_WEIGHTS_FILE_PATTERN

METADATA = {"format": "pt"}

# ---- --out-shard-size ------------------------------------------------------------------------

_UNITS: dict[str, int] = {
    "": 1,
    # Hugging Face (decimal)
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    # mergekit K/M/B (B = billion); G/T accepted as their decimal meaning
    "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12,
    # binary
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")



@dataclass(frozen=True)
class OutputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    group: str = ""
    """Which weight files hold it: "" the model's (``model*.safetensors``), else a path stem
    inside the output ("twin/math/exclusive" → ``twin/math/exclusive*.safetensors``)."""

    @property
    def key(self) -> str:
        """The output's identity across groups (the key of ``Method.merge``'s result)."""
        return output_key(self.name, self.group)


def output_key(name: str, group: str = "") -> str:
    """``name`` in the model's files, ``group:name`` in another group's (names may repeat
    across groups: every task's file of a Twin bundle holds the same names)."""
    return f"{group}:{name}" if group else name


def parse_size(s: str | int) -> int:
    """``--out-shard-size``: plain bytes, ``5GB``/``500MB`` (decimal), mergekit ``5B``/``500M``
    (B = 10^9), or binary ``2GiB``. Returns a positive byte count."""
    if isinstance(s, bool):
        raise MergeError(f"--out-shard-size: invalid value {s!r} (use e.g. 5GB, 500MB, 2GiB, 5B)")
    if isinstance(s, int):
        value = s
    elif isinstance(s, float):
        if not math.isfinite(s):
            raise MergeError(f"--out-shard-size: invalid value {s!r} (use e.g. 5GB, 500MB, 2GiB)")
        value = int(s)
    else:
        m = _SIZE_RE.match(str(s))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise MergeError(f"--out-shard-size: cannot parse {s!r} "
                             "(use bytes or a size like 5GB, 500MB, 2GiB, 5B)")
        try:
            value = int(Decimal(m.group(1)) * _UNITS[unit])
        except InvalidOperation:  # pragma: no cover - the regex admits only decimals
            raise MergeError(f"--out-shard-size: cannot parse {s!r}") from None
    if value <= 0:
        raise MergeError(f"--out-shard-size: must be positive, got {s!r}")
    return value


def format_bytes(n: int | float) -> str:
    """Human-readable decimal size: ``5.10 GB``."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# ---- the plan --------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def st_dtype(self) -> str:
        return TORCH_TO_ST[self.dtype]


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: list[PlannedTensor]
    """In WRITE order (offset order)."""
    header_bytes: bytes
    """The 8-byte little-endian length followed by the padded JSON header."""
    data_size: int
    file_size: int

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def header_sha256(self) -> str:
        return hashlib.sha256(self.header_bytes).hexdigest()

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def summary(self) -> dict:
        """What state.json records about this shard."""
        return {"file": self.filename, "size": self.file_size,
                "header_sha256": self.header_sha256, "tensors": len(self.tensors)}


def _nbytes(o: OutputSpec) -> int:
    return math.prod(o.shape) * o.dtype.itemsize


def shard_filename(index: int, count: int, group: str = "", numbered: bool = False) -> str:
    """1-based ``index`` of ``count`` shards → ``model-00003-of-00008.safetensors``; in an
    output group (``OutputSpec.group``) its stem: ``twin/math/exclusive-00001-of-00002…``.
    ``numbered``: a single shard is ``-00001-of-00001`` too (an output that always has an index)."""
    stem = group or "model"
    if count == 1 and not numbered:
        return f"{stem}.safetensors"
    return f"{stem}-{index:05d}-of-{count:05d}.safetensors"


def index_filename(group: str = "") -> str:
    """``model.safetensors.index.json``, or the group's (``twin/math/exclusive.safetensors…``)."""
    return f"{group or 'model'}.safetensors.index.json"


def group_of(filename: str) -> str:
    """The output group a shard file name belongs to ("" for the model's own shards)."""
    stem = filename[: -len(".safetensors")]
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", stem)
    return "" if stem == "model" else stem


def build_header(tensors: list[PlannedTensor]) -> bytes:
    """Length prefix + compact JSON header (``__metadata__`` first), space-padded so that
    (8 + N) % 8 == 0."""
    header: dict[str, object] = {"__metadata__": dict(METADATA)}
    for t in tensors:
        header[t.name] = {"dtype": t.st_dtype, "shape": list(t.shape),
                          "data_offsets": [t.begin, t.end]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _layout(filename: str, specs: list[OutputSpec]) -> ShardPlan:
    order = sorted(range(len(specs)), key=lambda i: (-specs[i].dtype.itemsize, i))
    tensors: list[PlannedTensor] = []
    offset = 0
    for i in order:
        o = specs[i]
        n = _nbytes(o)
        tensors.append(PlannedTensor(o.name, tuple(int(d) for d in o.shape), o.dtype,
                                     offset, offset + n))
        offset += n
    header = build_header(tensors)
    return ShardPlan(filename, tensors, header, offset, len(header) + offset)


def plan_shards(outputs: list[OutputSpec], max_shard_bytes: int, group: str = "",
                numbered: bool = False) -> list[ShardPlan]:
    """Split ``outputs`` (in plan order) into contiguous shards of at most ``max_shard_bytes``
    data bytes each (a larger tensor alone), with final names, offsets and headers."""
    if max_shard_bytes <= 0:
        raise MergeError(f"--out-shard-size: must be positive, got {max_shard_bytes}")
    seen: set[str] = set()
    groups: list[list[OutputSpec]] = [[]]
    current = 0
    for o in outputs:
        if o.name in seen:
            raise MergeError(f"output tensor '{o.name}' is planned twice")
        seen.add(o.name)
        if o.dtype not in TORCH_TO_ST:
            raise MergeError(f"output tensor '{o.name}' has dtype {o.dtype}, "
                             "which safetensors cannot store here")
        if any(int(d) < 0 for d in o.shape):
            raise MergeError(f"output tensor '{o.name}' has invalid shape {list(o.shape)}")
        n = _nbytes(o)
        if groups[-1] and current + n > max_shard_bytes:
            groups.append([])
            current = 0
        groups[-1].append(o)
        current += n
    count = len(groups)
    return [_layout(shard_filename(i + 1, count, group, numbered), g)
            for i, g in enumerate(groups)]


def index_json(plans: list[ShardPlan], version: str) -> dict:
    """``model.safetensors.index.json`` content (only written when there are several shards).
    ``weight_map`` keys are sorted by name, as transformers writes them."""
    # file names relative to the index's own folder (a group's index sits beside its shards)
    weight_map = {t.name: p.filename.rsplit("/", 1)[-1] for p in plans for t in p.tensors}
    return {
        "metadata": {
            "total_size": sum(p.data_size for p in plans),
            "total_parameters": sum(p.numel for p in plans),
            "mergekit_like_version": version,
        },
        "weight_map": {k: weight_map[k] for k in sorted(weight_map)},
    }


def index_text(plans: list[ShardPlan], version: str) -> str:
    """The index as written to disk: indent=2 and a trailing newline."""
    return json.dumps(index_json(plans, version), indent=2) + "\n"
