"""The statistics pass of RegMean (docs/methods/regmean.md §2): for every linear layer of one
model, the Gram matrix of its inputs on calibration texts, G = Σ_t x_t·x_tᵀ / T over the T tokens
of all texts (x_t: the layer's input at token t, length in_features).

One text per forward (no padding, no gradients). A forward pre-hook on each linear layer takes
its input the moment it arrives, computes that text's xᵀx on the model's device in float32 (one
layer's (in, in) product at a time: q/k/v, or gate/up, which read the same tensor, share one
product), moves it to the host and adds it into a float64 accumulator. The accumulators are
file-backed (``torch.from_file``, in a scratch folder beside the output), so host memory is the
model, one text's activations and the pages the kernel keeps; nothing grows with the texts. The
folder is then written one Gram at a time (float32 by default), keyed by the layer's weight name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergekit_like.errors import MergeError
from mergekit_like.io.fs import check_output_apart, sibling_path
from mergekit_like.io.shards import OutputSpec
from mergekit_like.runtime.calibration import (PassSettings, Progress, checkpoint_parameters,
                                               load_for_pass, model_id)
from mergekit_like.runtime.stats_folder import file_sha256, refuse_existing, stream_stats_folder

GRAM_KIND = "regmean_gram"


def linear_layers(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, tuple[nn.Module, str]]:
    """{weight name: (module, "linear")} for every nn.Linear (weight out × in) whose weight is a checkpoint
    parameter under the module's own name (a head tied to the embeddings is not: its input
    Gram says nothing about an embedding lookup)."""
    found = {}
    for name, module in model.named_modules():
        layout = _layout(module)
        weight = f"{name}.weight" if name else "weight"
        if layout and weight in params and params[weight] is module.weight:
            found[weight] = (module, layout)
    return found


def _layout(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D":
        raise MergeError(f"{type(module).__module__}.Conv1D layers (GPT-2 style, weight stored "
                         "in × out) are not supported by RegMean yet")
    return None


def in_features(weight_shape: tuple[int, ...], layout: str) -> int:
    return int(weight_shape[1] if layout == "linear" else weight_shape[0])


class GramAccumulators:
    """Float64 (in, in) sums of xᵀx per weight name, backed by files in ``scratch``, and the
    token count T each has seen."""

    def __init__(self, layers: dict[str, tuple[nn.Module, str]], scratch: Path):
        self.scratch = scratch
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.layouts: dict[str, str] = {}
        scratch.mkdir(parents=True)
        for k, (name, (module, layout)) in enumerate(layers.items()):
            n = in_features(tuple(module.weight.shape), layout)
            path = scratch / f"{k}.f64"
            with open(path, "wb") as fh:
                fh.truncate(n * n * 8)          # a sparse file of zeros
            self.sums[name] = torch.from_file(str(path), shared=True, size=n * n,
                                              dtype=torch.float64).view(n, n)
            self.tokens[name] = 0
            self.layouts[name] = layout
        self._last: tuple[Any, torch.Tensor] | None = None

    def add(self, name: str, x: torch.Tensor) -> None:
        """Add one text's input ``x`` (…, in) of layer ``name``: Σ x_tᵀx_t over its tokens."""
        rows = math.prod(x.shape[:-1])
        if self._last is not None and self._last[0] is x:   # q/k/v (gate/up) get one tensor
            product = self._last[1]
        else:
            f32 = x.detach().reshape(rows, x.shape[-1]).to(torch.float32)
            product = (f32.T @ f32).to("cpu", torch.float64)
            self._last = (x, product)                        # x kept alive: its id stays its own
        self.sums[name].add_(product)
        self.tokens[name] += rows

    def end_text(self) -> None:
        self._last = None

    def mean(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """G = sum / T in ``dtype`` (zeros when no token reached the layer)."""
        return (self.sums[name] / max(self.tokens[name], 1)).to(dtype)


def gram_pass(model: Path, data: Path, out: Path, *, settings: PassSettings,
              out_dtype: torch.dtype = torch.float32, progress: Progress | None = None) -> Path:
    """The input Gram of every linear layer of ``model`` on the texts of ``data``, into the
    statistics folder ``out`` (kind ``regmean_gram``)."""
    if out_dtype not in (torch.float32, torch.float64):
        raise MergeError("--dtype: Gram matrices are stored as float32 or float64")
    check_output_apart(Path(out), [("--model", Path(model)), ("--data", Path(data))])
    refuse_existing(Path(out), settings.overwrite)
    loaded, examples = load_for_pass(model, _forward_only(settings), data)
    layers = linear_layers(loaded.model, checkpoint_parameters(loaded, model))
    if not layers:
        raise MergeError(f"{model}: no linear layer whose weight is a checkpoint tensor; "
                         "RegMean has nothing to merge")
    scratch = sibling_path(Path(out), f"gram-scratch-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        acc = GramAccumulators(layers, scratch)
        n_texts = _forward_texts(loaded, examples, layers, acc, progress)
        specs = [OutputSpec(name, tuple(acc.sums[name].shape), out_dtype) for name in layers]
        meta = {"kind": GRAM_KIND, "n_examples": n_texts, "max_length": settings.max_length,
                "dtype": str(out_dtype).replace("torch.", ""),
                "accumulation": "float32 per-text products, float64 sums over texts",
                "models": json.dumps({"model": model_id(model)}),
                "data_sha256": file_sha256(Path(data))}
        tensors = {name: {"layout": acc.layouts[name], "in_features": acc.sums[name].shape[0],
                          "tokens": acc.tokens[name]} for name in layers}
        return stream_stats_folder(Path(out), specs, lambda name: acc.mean(name, out_dtype),
                                   meta, lambda: {"tensors": tensors},
                                   overwrite=settings.overwrite, shard_size=settings.shard_size)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _forward_only(settings: PassSettings) -> PassSettings:
    return replace(settings, checkpointing=False)


def _forward_texts(loaded, examples, layers, acc: GramAccumulators,
                   progress: Progress | None) -> int:
    """One forward per text with the hooks on; returns the number of texts that had tokens."""
    def hook_for(name: str):
        def hook(module, args):
            acc.add(name, args[0])
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name))
               for name, (module, _) in layers.items()]
    done = 0
    try:
        with torch.inference_mode():
            for i, ex in enumerate(examples):
                if ex.sequence:
                    ids = torch.tensor([ex.sequence], device=loaded.device)
                    loaded.model(input_ids=ids, use_cache=False)
                    acc.end_text()
                    done += 1
                if progress:
                    progress(i + 1, len(examples))
    finally:
        for h in handles:
            h.remove()
    if done == 0:
        raise MergeError("no calibration text has a token: no Gram to accumulate")
    return done
