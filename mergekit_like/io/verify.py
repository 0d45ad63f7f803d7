"""Check that an output folder is a complete, consistent model (``mergekit-like verify``, and the
precondition of ``publish``, docs/hub.md §4).

Checks, each failing with a one-line ``MergeError`` naming the file or tensor:

* no leftover ``.mergekit_like_state/`` (an unfinished merge);
* ``config.json`` present and a JSON object;
* either ``model.safetensors`` alone, or ``model.safetensors.index.json`` plus every shard its
  ``weight_map`` names, and no other ``*.safetensors`` file;
* index ↔ headers agree exactly, and ``metadata.total_size`` equals the sum of tensor data bytes;
* every header valid (``parse_header``: offsets, sizes, dtypes);
* every tensor readable, one at a time (large ones in row blocks), and finite unless allowed
  (skipped with ``read_data=False``);
* ``config.json`` agrees with the tensors: its layer count with the layer stack, its
  ``vocab_size`` with the embedding rows;
* every file ``merge_manifest.json`` lists is there with its recorded size and, when the data is
  read, its sha256 (io/manifest.py): a flipped bit, a truncated shard or an edited index fails.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergekit_like.dtypes import all_finite, ST_TO_TORCH, is_float_code
from mergekit_like.errors import MergeError
from mergekit_like.io.local import read_weight_map
from mergekit_like.io.manifest import check_manifest, read_manifest
from mergekit_like.io.safetensors_header import ParsedHeader, parse_header
from mergekit_like.io.layers import config_num_layers, layer_index, layer_stacks

STATE_DIR = ".mergekit_like_state"
FolderCheck = Callable[..., Any]
"""A method's own check of an output folder it may have written (``Method.check_output``):
called as ``check(folder, read_data=…, allow_nonfinite=…)``; raises MergeError, returns a report
or None when the folder is not its kind. It may name sub-folders that the main check ignores
(``ignore``)."""
BLOCK_BYTES = 256 * 1024 * 1024
"""Tensors larger than this are checked in row blocks of about this size."""


@dataclass
class VerifyReport:
    files: int = 0  # number of weight files
    file_names: list[str] = field(default_factory=list)  # weight files, in shard order
    tensors: int = 0
    total_bytes: int = 0  # tensor data bytes
    dtypes: Counter = field(default_factory=Counter)  # safetensors code -> tensor count
    sharded: bool = False
    headers: dict = field(default_factory=dict)  # weight file -> its parsed header
    extra: list[Any] = field(default_factory=list)  # the folder checks' reports
    hashed: bool = False  # every manifest entry's sha256 was checked


def verify_output(folder: Path, *, allow_nonfinite: bool = False, read_data: bool = True,
                  allow_state_dir: bool = False, manifest: bool | None = None,
                  checks: Sequence[FolderCheck] = (),
                  ignore: tuple[str, ...] = ()) -> VerifyReport:
    """Check ``folder``; ``read_data=False`` skips the tensor reads and the hashes (structure,
    headers and manifest sizes only), ``allow_state_dir=True`` accepts ``.mergekit_like_state/``
    (a partial folder, before cleanup). ``manifest``: True requires ``merge_manifest.json``,
    None checks it when present, False ignores it (a partial folder has none yet). ``checks``
    run after the main model's (a Twin bundle's factors); weight files under the ``ignore``
    sub-folders are theirs to check."""
    folder = Path(folder)
    where = str(folder)
    if not folder.is_dir():
        raise MergeError(f"{where}: output folder does not exist")
    if not allow_state_dir and (folder / STATE_DIR).exists():
        raise MergeError(f"{where}: incomplete output ({STATE_DIR}/ is still there; the merge did "
                         f"not finish — re-run it to resume)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise MergeError(f"{where}: config.json is missing")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MergeError(f"{where}: config.json is not valid JSON "
                         f"({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise MergeError(f"{where}: config.json is not a JSON object")

    if manifest or (manifest is None and read_manifest(folder) is not None):
        check_manifest(folder, where, hashes=read_data)
        report_hashed = read_data
    else:
        report_hashed = False
    report = verify_weights(folder, "model", where, read_data=read_data,
                            allow_nonfinite=allow_nonfinite, ignore=ignore)
    report.hashed = report_hashed
    _check_config(cfg, report.headers, where)
    for check in checks:
        found = check(folder, read_data=read_data, allow_nonfinite=allow_nonfinite)
        if found is not None:
            report.extra.append(found)
    return report


EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                   "embed_in.weight")
"""Suffixes of an input-embedding tensor, whose rows are the vocabulary."""


def _check_config(cfg: dict, headers: dict, where: str) -> None:
    """config.json's layer count against the largest layer stack of the weights, and its
    ``vocab_size`` against the input embedding's rows (each only where both are known)."""
    shapes = {name: e["shape"] for h in headers.values() for name, e in h.tensors.items()}
    layers = config_num_layers(cfg)
    stacks = layer_stacks(shapes)
    if layers is not None and stacks and max(stacks.values()) != layers:
        prefix, found = max(stacks.items(), key=lambda kv: kv[1])
        raise MergeError(f"{where}: config.json says {layers} layers, but the weights hold "
                         f"{found} ({prefix}.0 … {prefix}.{found - 1}); tensors are missing "
                         "or the config is wrong")
    present = {li for li in map(layer_index, shapes) if li is not None}
    for prefix, n in stacks.items():
        hole = next((i for i in range(n) if (prefix, i) not in present), None)
        if hole is not None:
            raise MergeError(f"{where}: the weights hold no tensor of layer {prefix}.{hole} "
                             f"(of {n}); tensors are missing")
    vocab = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size")
                    if isinstance(cfg.get("text_config"), dict) else None)
    if not isinstance(vocab, int) or isinstance(vocab, bool):
        return
    for name, shape in shapes.items():
        if name.endswith(EMBEDDING_NAMES) and len(shape) == 2 and shape[0] != vocab:
            raise MergeError(f"{where}: config.json says vocab_size {vocab}, but '{name}' has "
                             f"{shape[0]} rows")


def verify_weights(folder: Path, stem: str, where: str, *, read_data: bool = True,
                   allow_nonfinite: bool = False, ignore: tuple[str, ...] = ()) -> VerifyReport:
    """Check the weights ``<stem>.safetensors`` or ``<stem>.safetensors.index.json`` + shards in
    ``folder`` (no other ``*.safetensors`` besides those under the ``ignore`` sub-folders)."""
    index_name = f"{stem}.safetensors.index.json"
    index_path = folder / index_name
    present = _present_weight_files(folder, ignore)
    report = VerifyReport(sharded=index_path.is_file())
    if report.sharded:
        weight_map = _sharded_weight_map(folder, stem, where, present)
        files = sorted(set(weight_map.values()))
    else:
        weight_map = None
        files = [_single_weight_file(folder, stem, where, present)]

    headers = {rel: _read_weight_header(folder, rel, weight_map, index_name, where)
               for rel in files}
    for h in headers.values():
        report.tensors += len(h.tensors)
        report.total_bytes += h.data_size
        for e in h.tensors.values():
            report.dtypes[e["dtype"]] += 1
    if not report.tensors:
        raise MergeError(f"{where}: the weights hold no tensors")
    if weight_map is not None:
        _check_total_size(index_path, report.total_bytes, where)

    if read_data:
        for rel in files:
            _check_tensors(folder, rel, headers[rel], where, allow_nonfinite)
    report.files = len(files)
    report.file_names = files
    report.headers = headers
    return report


def _present_weight_files(folder: Path, ignore: tuple[str, ...]) -> list[str]:
    """Every ``*.safetensors`` under ``folder`` (relative POSIX paths, sorted), except those in
    hidden folders and under the ``ignore`` sub-folders."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors")
                  if not any(part.startswith(".") for part in p.relative_to(folder).parts)
                  and p.relative_to(folder).parts[0] not in ignore)


def _sharded_weight_map(folder: Path, stem: str, where: str,
                        present: list[str]) -> dict[str, str]:
    """The index's ``weight_map`` (tensor -> shard) after checking that there is no single file
    beside the index, that every shard it names exists and that no other weight file does."""
    single_name, index_name = f"{stem}.safetensors", f"{stem}.safetensors.index.json"
    if (folder / single_name).is_file():
        raise MergeError(f"{where}: both {single_name} and {index_name}"
                         f" are present (an output is one or the other)")
    weight_map = read_weight_map(folder / index_name, where)
    files = sorted(set(weight_map.values()))
    for rel in files:
        if not (folder / rel).is_file():
            raise MergeError(f"{where}: {rel} is missing ({index_name} lists it)")
    stray = [p for p in present if p not in set(files)]
    if stray:
        raise MergeError(f"{where}: {stray[0]} is not referenced by {index_name}")
    return weight_map


def _single_weight_file(folder: Path, stem: str, where: str, present: list[str]) -> str:
    """``<stem>.safetensors``, after checking that it exists and is the only weight file (there
    is no index)."""
    single_name, index_name = f"{stem}.safetensors", f"{stem}.safetensors.index.json"
    if not (folder / single_name).is_file():
        raise MergeError(f"{where}: no weights ({single_name} or {index_name}) found")
    stray = [p for p in present if p != single_name]
    if stray:
        raise MergeError(f"{where}: {stray[0]} is not part of the model (only "
                         f"{single_name} is, and there is no index)")
    return single_name


def _read_weight_header(folder: Path, rel: str, weight_map: dict[str, str] | None,
                        index_name: str, where: str) -> ParsedHeader:
    """The validated header of weight file ``rel``; with an index, it must hold exactly the
    tensors the index puts in that file."""
    h = parse_header(folder / rel, model=where, name=rel)
    if weight_map is not None:
        listed = {t for t, f in weight_map.items() if f == rel}
        missing = sorted(listed - set(h.tensors))
        if missing:
            raise MergeError(f"{where}: {index_name} puts '{missing[0]}' in "
                             f"{rel}, but that file does not hold it")
        extra = sorted(set(h.tensors) - listed)
        if extra:
            raise MergeError(f"{where}: {rel} holds '{extra[0]}', which "
                             f"{index_name} does not list for that file")
    return h


def _check_total_size(index_path: Path, total_bytes: int, where: str) -> None:
    """The index's ``metadata.total_size`` equals the tensors' data bytes."""
    index_name = index_path.name
    index = json.loads(index_path.read_text(encoding="utf-8"))
    meta = index.get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    if total is None:
        raise MergeError(f"{where}: {index_name} has no metadata.total_size")
    if not isinstance(total, int) or isinstance(total, bool) or total != total_bytes:
        raise MergeError(f"{where}: {index_name} metadata.total_size is {total!r},"
                         f" but the tensors hold {total_bytes} bytes of data")


def _check_tensors(folder: Path, rel: str, header, where: str, allow_nonfinite: bool) -> None:
    """Read every tensor of one file, in storage order, one at a time; check shape and finiteness."""
    order = sorted(header.tensors.items(), key=lambda kv: tuple(kv[1]["data_offsets"]))
    try:
        with safe_open(str(folder / rel), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for name, e in order:
                if name not in keys:
                    raise MergeError(f"{where}: {rel}: tensor '{name}' cannot be opened")
                _check_one(f, name, e, rel, where, allow_nonfinite)
    except MergeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a file safetensors itself rejects
        raise MergeError(f"{where}: {rel} cannot be read by safetensors "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                         ) from None


def _check_one(f, name: str, e: dict, rel: str, where: str, allow_nonfinite: bool) -> None:
    code, shape = e["dtype"], tuple(e["shape"])
    nbytes = e["data_offsets"][1] - e["data_offsets"][0]
    check_finite = is_float_code(code) and not allow_nonfinite
    if nbytes > BLOCK_BYTES and len(shape) >= 1 and shape[0] > 1:
        row_bytes = max(1, nbytes // shape[0])
        step = max(1, BLOCK_BYTES // row_bytes)
        sl = f.get_slice(name)
        for start in range(0, shape[0], step):
            block = sl[start:min(start + step, shape[0])]
            _check_block(block, name, code, shape[1:], rel, where, check_finite)
    else:
        t = f.get_tensor(name)
        if tuple(t.shape) != shape:
            raise MergeError(f"{where}: {rel}: tensor '{name}' reads with shape {list(t.shape)}, "
                             f"header says {list(shape)}")
        _check_block(t, name, code, shape[1:], rel, where, check_finite)


def _check_block(t: torch.Tensor, name: str, code: str, tail: tuple[int, ...], rel: str,
                 where: str, check_finite: bool) -> None:
    if t.dtype != ST_TO_TORCH[code] or tuple(t.shape[1:]) != tail:
        raise MergeError(f"{where}: {rel}: tensor '{name}' reads as {t.dtype} {list(t.shape)}, "
                         f"header says {code}")
    if check_finite and not all_finite(t):
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise MergeError(f"{where}: {rel}: tensor '{name}' has non-finite values ({kind}); "
                         f"pass --allow-nonfinite to accept them")
