"""`twin materialize` (docs/methods/twin.md §6): a standard checkpoint from a Twin bundle and task weights.

For every tensor of the shared model ``s`` (shape S, stored dtype D), with one real weight
``w_t`` per bundle task t (tasks with w_t = 0 are not read):

    lowrank:      W = s + Σ_t w_t · (A_t @ B_t)     A_t [out, r], B_t [r, in], reshaped to S
    dense:        W = s + Σ_t w_t · δ_t             δ_t of shape S
    shared_only:  W = s                             (also any tensor twin.json does not list)

computed in float32 (float64 if s is stored in float64) and cast once to the output dtype:
``--out-dtype``, else twin.json's ``out_dtype``, else D. Non-float tensors are copied as stored.
One tensor is resident at a time; the writer thread streams it into ``.OUT.partial/``, which is
renamed to OUT only when the weights, config, tokenizer files and card are complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from mergekit_like import __version__
from mergekit_like.dtypes import RECIPE_DTYPES, all_finite, parse_recipe_dtype
from mergekit_like.errors import MergeError
from mergekit_like.io.output import OutputFolder
from mergekit_like.io.shards import INDEX_FILE, ShardPlan, index_text, plan_shards
from mergekit_like.io.side_files import copy_side_files, main_dtype_name, model_card, updated_config
from mergekit_like.io.writer import AsyncShardWriter, iter_write_order
from mergekit_like.methods.base import OutputSpec
from mergekit_like.twin.bundle import TwinBundle
from mergekit_like.io.verify import verify_output

DEFAULT_SHARD_BYTES = 5 * 10**9
WEIGHTS_SYNTAX = "--weights a=0.7,b=0.3"
Progress = Callable[[str, int], None]  # (tensor name, bytes of output handed to the writer)


@dataclass
class MaterializeResult:
    out: Path
    shards: list[ShardPlan]
    weights: dict[str, float]
    warnings: list[str]


# ---- the weights -----------------------------------------------------------------------------

def parse_weights(text: str) -> dict[str, float]:
    """``"a=0.7,b=0.3"`` → {"a": 0.7, "b": 0.3}: finite reals, each name once."""
    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        try:
            number = float(value) if sep and name else None
        except ValueError:
            number = None
        if number is None:
            raise MergeError(f"--weights: cannot parse {text!r} (expected NAME=NUMBER pairs "
                             f"separated by commas, e.g. {WEIGHTS_SYNTAX.split()[1]})")
        if not math.isfinite(number):
            raise MergeError(f"--weights: the weight of '{name}' is not finite ({value})")
        if name in out:
            raise MergeError(f"--weights: task '{name}' is given twice in {text!r}")
        out[name] = number
    return out


def task_weights(bundle: TwinBundle, *, task: str | None, weights: str | None) -> dict[str, float]:
    """One weight per bundle task, in the bundle's order: one-hot for ``task``, else the parsed
    ``weights`` with 0 for the tasks not named. Exactly one of the two must be given."""
    if (task is None) == (weights is None):
        raise MergeError(f"give exactly one of --task NAME or {WEIGHTS_SYNTAX}")
    given = {task: 1.0} if task is not None else parse_weights(weights)
    for name in given:
        bundle.check_task(name)
    return {t: given.get(t, 0.0) for t in bundle.tasks}


def weight_warnings(weights: dict[str, float]) -> list[str]:
    total = sum(weights.values())
    if abs(total - 1.0) > 1e-6:
        return [f"the task weights sum to {total:g}, not 1"]
    return []


# ---- one tensor ------------------------------------------------------------------------------

def output_dtype(bundle: TwinBundle, override: str | None) -> torch.dtype | None:
    """The float output dtype: ``override``, else twin.json's ``out_dtype``, else None (= each
    shared tensor's stored dtype)."""
    stored = bundle.info.get("out_dtype")
    for name, what in ((override, "--out-dtype"), (stored, "twin.json out_dtype")):
        if name is None:
            continue
        dtype = parse_recipe_dtype(str(name))
        if dtype is None:
            raise MergeError(f"{what}: {name!r} is not one of {', '.join(RECIPE_DTYPES)}")
        return dtype
    return None


def plan_outputs(bundle: TwinBundle, dtype: torch.dtype | None) -> list[OutputSpec]:
    """One output per shared-model tensor, same name and shape; float ones in ``dtype``."""
    specs = []
    for name, info in bundle.shared.tensors().items():
        stored = info.torch_dtype
        out = dtype if dtype is not None and stored.is_floating_point else stored
        specs.append(OutputSpec(name, tuple(info.shape), out))
    return specs


def materialize_tensor(bundle: TwinBundle, name: str, weights: dict[str, float],
                       dtype: torch.dtype) -> torch.Tensor:
    """W = s + Σ_{t: w_t ≠ 0} w_t · (A_t @ B_t | δ_t) for shared tensor ``name``, in ``dtype``
    (see the module docstring). Non-float tensors: s as stored; shared-only tensors and
    all-zero weights: s cast to ``dtype`` (bit for bit when it is s's dtype)."""
    s = bundle.shared.read_tensor(name)
    live = {t: w for t, w in weights.items() if w != 0.0}
    entry = bundle.entries.get(name)
    if not s.is_floating_point():
        return s
    if entry is None or entry.kind == "shared_only" or not live:
        return s.to(dtype)
    compute = torch.promote_types(s.dtype, torch.float32)
    acc = s.to(compute, copy=True)
    if entry.kind == "lowrank":
        acc = acc.reshape(s.shape[0], -1)                  # a view: [out, in]
    for task, w in live.items():
        part = [p.to(compute) for p in bundle.exclusive(task, name)]
        if entry.kind == "lowrank":
            acc.addmm_(part[0], part[1], alpha=w)          # [out, r] @ [r, in]
        else:
            acc.add_(part[0], alpha=w)
    result = acc.reshape(s.shape).to(dtype).contiguous()
    if not all_finite(result):
        raise MergeError(f"{bundle.root}: materialized tensor '{name}' contains NaN or Inf "
                         f"(weights {weights_text(weights)})")
    return result


# ---- the output folder -----------------------------------------------------------------------

def materialize(bundle: TwinBundle, out: Path, weights: dict[str, float], *,
                out_dtype: str | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                overwrite: bool = False, progress: Progress | None = None,
                on_start: Callable[[int], None] | None = None) -> MaterializeResult:
    """Write the checkpoint for ``weights`` (one per bundle task) to ``out``, all or nothing.
    ``on_start(bytes)`` once the layout is known, ``progress(name, bytes)`` per tensor."""
    out = Path(out)
    _check_out(bundle, out)
    if bundle.shared.config() is None:
        raise MergeError(f"{bundle.root}: the shared model has no config.json")
    outputs = plan_outputs(bundle, output_dtype(bundle, out_dtype))
    shards = plan_shards(outputs, shard_bytes)
    folder = OutputFolder(out, overwrite=overwrite, resume=False,
                          resume_key=_run_key(bundle, weights, shards),
                          planned_bytes=sum(s.file_size for s in shards), plans=shards,
                          inputs=[("bundle", Path(bundle.root))])
    folder.prepare()
    writer = None
    try:
        writer = AsyncShardWriter(folder, shards)
        if on_start:
            on_start(sum(s.data_size for s in shards))
        dtypes = {o.name: o.dtype for o in outputs}
        for name in iter_write_order(shards):
            tensor = materialize_tensor(bundle, name, weights, dtypes[name])
            writer.submit(name, tensor)
            if progress:
                progress(name, tensor.numel() * tensor.element_size())
            del tensor
        writer.close()
        warnings = _write_side_files(bundle, folder, shards, outputs, weights)
        verify_output(folder.partial, read_data=False, allow_state_dir=True)
        folder.finalize()
    except BaseException:
        if writer is not None:
            writer.abort()
        folder.abort(keep_partial=False)
        raise
    return MaterializeResult(out, shards, dict(weights), warnings + list(folder.warnings))


def _check_out(bundle: TwinBundle, out: Path) -> None:
    """OUT must not be the bundle, nor inside it (--overwrite would destroy the input)."""
    root, target = os.path.realpath(bundle.root), os.path.realpath(out)
    if target == root or target.startswith(root + os.sep):
        raise MergeError(f"output folder {out} is the bundle {bundle.root} or inside it")


def _run_key(bundle: TwinBundle, weights: dict[str, float], shards: list[ShardPlan]) -> str:
    payload = {"bundle": os.path.realpath(bundle.root), "weights": weights,
               "shards": [s.summary() for s in shards], "version": __version__}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _write_side_files(bundle: TwinBundle, folder: OutputFolder, shards: list[ShardPlan],
                      outputs: list[OutputSpec], weights: dict[str, float]) -> list[str]:
    """Index (several shards), config.json with the output dtype, the tokenizer and generation
    files of the bundle root (never twin/, its README.md or mergekit_config.yml), the card."""
    if len(shards) > 1:
        folder.write_side_file(INDEX_FILE, index_text(shards, __version__))
    folder.write_side_file("config.json",
                           updated_config(bundle.shared.config(), main_dtype_name(outputs)))
    warnings = copy_side_files(folder, bundle.shared, bundle.shared)
    folder.write_side_file("README.md", _card(bundle, weights, main_dtype_name(outputs)))
    return warnings


def weights_text(weights: dict[str, float]) -> str:
    return ", ".join(f"{t}={w:g}" for t, w in weights.items())


def _card(bundle: TwinBundle, weights: dict[str, float], dtype: str) -> str:
    """README.md: the source bundle, its tasks and the weights used."""
    description = {"materialize": {"bundle": str(bundle.root), "tasks": list(bundle.tasks),
                                   "weights": dict(weights), "out_dtype": dtype}}
    models = [f"{bundle.root} (Twin-Merging bundle; tasks: {', '.join(bundle.tasks)})"]
    return model_card(method="twin", base_models=[], models=models,
                      recipe_text=yaml.safe_dump(description, sort_keys=False),
                      extra={"materialized from bundle": str(bundle.root),
                             "task weights": weights_text(weights)},
                      title="Materialized Twin-Merging model")
