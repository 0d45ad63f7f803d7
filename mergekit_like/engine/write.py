"""write: the output's layout and bookkeeping for the engine (run.py): which weight files each
output group gets and the order jobs must run in for their writers, the side files (index,
config, card, recipe, a method's own), the inputs the output must stay apart from, the resume
key, and the finish (side files, check, manifest, rename)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from mergekit_like import __version__
from mergekit_like.io.output import OutputFolder
from mergekit_like.ops.drop import SCHEME as DROP_SCHEME
from mergekit_like.io.shards import ShardPlan, index_filename, index_text, plan_shards
from mergekit_like.io.side_files import (TOKENIZER_FILES, copy_side_files, main_dtype_name,
                                         model_card, updated_config)
from mergekit_like.io.verify import verify_output
from mergekit_like.io.writer import iter_write_order
from mergekit_like.engine.chat_templates import set_chat_template
from mergekit_like.engine.jobs import MergePlan, TensorJob



def plan_files(plan: MergePlan, shard_bytes: int) -> dict[str, list[ShardPlan]]:
    """The shards of every output group (``OutputSpec.group``), the model's ("") first. Other
    groups list their tensors in the order the jobs run (the model's write order), so every
    group's writer receives its tensors in its own planned order."""
    main = plan_shards([o for o in plan.outputs if not o.group], shard_bytes,
                       numbered=bool(plan.method.indexed_groups))
    others: dict[str, list] = {}
    for job in jobs_in_write_order(plan, iter_write_order(main)):
        for o in job.outputs:
            if o.group:
                others.setdefault(o.group, []).append(o)
    return {"": main, **{g: plan_shards(specs, shard_bytes, g) for g, specs in others.items()}}


def jobs_in_write_order(plan: MergePlan, names: Iterable[str]) -> Iterator[TensorJob]:
    """Each job once, when the writer first needs one of its outputs."""
    by_output = {o.name: job for job in plan.jobs for o in job.outputs if not o.group}
    seen: set[int] = set()
    for name in names:
        job = by_output[name]
        if id(job) not in seen:
            seen.add(id(job))
            yield job


def write_side_files(plan: MergePlan, folder: OutputFolder, groups: dict[str, list[ShardPlan]],
                      reports: dict[str, dict]) -> None:
    joint = plan.method.indexed_groups
    for group, shards in groups.items():
        if group in joint:
            continue
        listed = shards + [s for g in joint for s in groups.get(g, [])] if not group else shards
        if len(listed) > 1:
            folder.write_side_file(index_filename(group), index_text(listed, __version__))
    config = plan.config if plan.config is not None else plan.reference.config()
    if config is not None:
        folder.write_side_file("config.json", updated_config(config, main_dtype_name(plan.outputs)))
    write_tokenizer_files(plan, folder)
    recipe = plan.recipe
    models = [inp.ref.display if inp.ref.is_local or not inp.ref.sha
              else f"{inp.ref.path} (commit {inp.ref.sha})" for inp in plan.inputs]
    hub_models = [inp.ref.path for inp in sorted(plan.inputs, key=lambda i: not i.is_base)
                  if not inp.ref.is_local]  # the card's base_model lists Hub ids only
    extra = plan.method.card_extra(plan, reports)
    if recipe.merge_method.startswith("dare"):
        extra = {"seed": recipe.seed, "random mask scheme": DROP_SCHEME, **(extra or {})}
    folder.write_side_file("README.md", model_card(
        method=recipe.merge_method, base_models=hub_models, models=models,
        recipe_text=recipe.text, extra=extra, title=plan.method.card_title))
    folder.write_side_file("mergekit_config.yml", recipe.text)


def write_tokenizer_files(plan: MergePlan, folder: OutputFolder) -> None:
    """The donor's tokenizer files (and the reference's generation/processor configs), or the
    merged vocabulary's (``plan.vocab``); then the recipe's chat template, if any."""
    if plan.vocab is not None:
        plan.warnings.extend(copy_side_files(folder, None, plan.reference))
        for name, data in plan.vocab.files(plan.chat_template).items():
            folder.write_side_file(name, data)
        return
    plan.warnings.extend(copy_side_files(folder, plan.tokenizer, plan.reference))
    if plan.chat_template is None:
        return
    present = {n: (folder.partial / n).read_bytes() for n in TOKENIZER_FILES
               if (folder.partial / n).is_file()}
    updated = set_chat_template(present, plan.chat_template)
    for name in present.keys() - updated.keys():
        (folder.partial / name).unlink()
    for name, data in updated.items():
        if present.get(name) != data:
            folder.write_side_file(name, data)


def finish_output(plan: MergePlan, folder: OutputFolder, groups: dict[str, list[ShardPlan]],
                  reports: dict[str, dict], extra: dict[str, str]) -> None:
    """Once every shard is written: the side files (standard, the method's own, ``extra``),
    the structural check of the partial folder, then the manifest and the rename into place."""
    write_side_files(plan, folder, groups, reports)
    for name, text in {**plan.method.side_files(plan, reports), **extra}.items():
        folder.write_side_file(name, text)
    verify_output(folder.partial, read_data=False, allow_state_dir=True, manifest=False,
                  checks=[plan.method.check_output], ignore=plan.method.output_folders)
    folder.finalize()


def plan_inputs(plan: MergePlan) -> list[tuple[str, Path]]:
    """(label, local path) of everything the plan reads: each model's folder (a Hub model's
    cache folder), side inputs, the tokenizer donor and the recipe file."""
    found: list[tuple[str, Path]] = []
    for inp, source in zip(plan.inputs, plan.sources):
        found.append((f"model {inp.ref.display}", source.local_root()))
    found += [(f"model {source.ref}", source.local_root()) for source in plan.unused]
    found += [(f"side input {label}", src.local_root()) for label, src in plan.side.items()]
    found.append(("tokenizer source", plan.tokenizer.local_root()))
    if plan.recipe.path is not None and Path(plan.recipe.path).is_file():
        found.append(("recipe file", Path(plan.recipe.path)))
    return [(label, path) for label, path in found if path is not None]


def resume_key(plan: MergePlan, shards: list[ShardPlan], options) -> str:
    """sha256 of everything that decides the output bytes (docs/output_format.md §6)."""
    payload = {
        "recipe": plan.recipe.resolved(),
        "inputs": [s.identity() for s in plan.sources],
        "side": {label: s.identity() for label, s in plan.side.items()},
        "shards": [[s.filename, [[t.name, str(t.dtype), list(t.shape)] for t in s.tensors]]
                   for s in shards],
        "out_shard_bytes": options.out_shard_bytes,
        "seed": plan.recipe.seed,
        "mask_scheme": DROP_SCHEME,
        "version": __version__,
        "device": options.device.type,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
