"""Calibration passes over a model (docs/methods/rcp.md §3, docs/methods/regmean.md §2): the
settings every statistics command takes, loading the model and its texts, checking that its
parameters are keyed like its checkpoint, and the one-text-at-a-time gradient loop.

Shared by RCP's importance passes and the RegMean/Fisher statistics passes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mergekit_like.device import resolve_device
from mergekit_like.dtypes import RECIPE_DTYPES, parse_recipe_dtype
from mergekit_like.errors import MergeError
from mergekit_like.io.local import LocalSource
from mergekit_like.runtime.data import Example, check_examples, read_examples
from mergekit_like.runtime.hooks import accumulate_gradients, enable_checkpointing
from mergekit_like.runtime.model import load_model, require_transformers
from mergekit_like.runtime.stats_folder import file_sha256

Progress = Callable[[int, int], None]


@dataclass
class PassSettings:
    """max_length: tokens kept per text; text_field: the JSON key of the text; device:
    auto|cpu|cuda[:N]; dtype: the weights' dtype during the pass ("auto": stored dtype on CUDA,
    float32 on CPU); checkpointing: activation checkpointing of the decoder layers."""

    max_length: int
    text_field: str = "text"
    device: str = "auto"
    dtype: str = "auto"
    checkpointing: bool = True
    shard_size: str = "5GB"
    overwrite: bool = False


def parse_dtype(name: str, option: str) -> torch.dtype:

    dtype = parse_recipe_dtype(name)
    if dtype is None:
        raise MergeError(f"{option} {name!r}: use one of {', '.join(RECIPE_DTYPES)}")
    return dtype


def model_id(folder: Path) -> dict[str, str]:
    """A local model's path and the sha256 of its weight files' bytes (docs/methods/rcp.md §3 metadata;
    fine-tunes of one family share their headers, so a header hash would not tell them apart)."""
    src = LocalSource(Path(folder), str(folder))
    try:
        files = {rel: file_sha256(Path(folder) / rel) for rel in src.files}
    finally:
        src.close()
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"path": str(Path(folder).resolve()), "weights_sha256": digest}


def load_for_pass(folder: Path, settings: PassSettings, data: Path):
    """Check the data's shape (no model needed), load the model, read and truncate the texts."""

    if settings.max_length < 2:
        raise MergeError(f"--max-length {settings.max_length}: must be at least 2")
    check_examples(data, settings.text_field)
    require_transformers().utils.logging.disable_progress_bar()
    dtype = pass_dtype(folder, settings)
    loaded = load_model(folder, device=settings.device, dtype=dtype)
    examples = read_examples(data, loaded.tokenizer, settings.text_field)
    examples = [Example(ex.sequence[: settings.max_length]) for ex in examples]
    if settings.checkpointing and getattr(loaded.model, "supports_gradient_checkpointing", False):
        enable_checkpointing(loaded.model)
    return loaded, examples


def pass_dtype(folder: Path, settings: PassSettings) -> torch.dtype:

    if settings.dtype != "auto":
        return parse_dtype(settings.dtype, "--dtype")
    if resolve_device(settings.device).type != "cuda":
        return torch.float32
    src = LocalSource(Path(folder), str(folder))
    try:
        stored = [i.torch_dtype for i in src.tensors().values() if i.torch_dtype.is_floating_point]
    finally:
        src.close()
    return stored[0] if stored else torch.float32


def checkpoint_parameters(loaded, folder: Path) -> dict[str, torch.nn.Parameter]:
    """The model's floating parameters, whose names must be the checkpoint's keys."""
    params = {n: p for n, p in loaded.model.named_parameters() if p.is_floating_point()}
    src = LocalSource(Path(folder), str(folder))
    try:
        header = src.tensors()
    finally:
        src.close()
    bad = [n for n in params if n not in header or tuple(header[n].shape) != tuple(params[n].shape)]
    if bad:
        raise MergeError(f"{folder}: {len(bad)} parameter(s) of the loaded model are not "
                         f"checkpoint tensors of the same shape (first: '{bad[0]}'); the "
                         "importance maps must be keyed like the checkpoint")
    return params


def gradient_pass(loaded, examples, params: dict, on_grad, progress: Progress | None) -> int:

    names = set(params)
    done = 0
    for i, ex in enumerate(examples):
        done += accumulate_gradients(loaded, [ex], on_grad, batch_size=1,
                                     params=lambda n, p: n in names)
        if progress:
            progress(i + 1, len(examples))
    if done == 0:
        raise MergeError("no calibration text has two or more tokens: nothing to differentiate")
    return done


