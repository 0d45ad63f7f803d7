"""Building the zoo: split files, a base model, one fine-tune per task, and a ``zoo.json`` manifest.

Layout of a zoo folder (all paths in the manifest are relative to it)::

    zoo.json                         manifest: settings, their hash, tasks, files, build time
    data/<task>/<split>.jsonl        instruct (skill tasks) / train / validation / test / pretrain
    models/base/                     trained on the base mixture: every pretrain and instruct split
    models/<task>/                   the base fine-tuned on <task>'s train split (with replay of
                                     the base mixture)

A zoo is built in a sibling ``<out>.partial`` folder and renamed into place when complete, so an
interrupted build never leaves a zoo that looks complete. ``build_zoo`` returns at once when
``out`` already holds a complete zoo of the same settings hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Sequence

import torch

from mergekit_like.errors import MergeError
from mergekit_like.zoo import tasks as T
from mergekit_like.zoo.settings import ZooSettings
from mergekit_like.zoo.train import build_model, save_model, single_thread, train

MANIFEST = "zoo.json"
ZOO_FORMAT = 2  # bump when the layout or the training code changes what a setting produces
Log = Callable[[str], None]


def settings_hash(settings: ZooSettings) -> str:
    """sha256 (16 hex digits) of the settings, the task definitions and ZOO_FORMAT: equal hashes
    mean the same zoo (up to floating-point differences between machines)."""
    task_def = {"tokens": T.TOKENS, "skill_length": T.SKILL_LENGTH, "chain_steps": T.CHAIN_STEPS,
                "chain_ops": T.CHAIN_OPS, "cipher_length": T.CIPHER_LENGTH,
                "cipher_table": T.CIPHER_TABLE, "tasks": T.ALL_TASKS,
                "instruct_length": T.INSTRUCT_LENGTH, "instruct_tasks": T.INSTRUCT_TASKS}
    blob = json.dumps({"format": ZOO_FORMAT, "settings": settings.to_json(), "tasks": task_def},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_jsonl(path: Path, examples: list[T.TaskExample]) -> None:
    """One ``TaskExample.to_json()`` object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e.to_json()) + "\n" for e in examples))


def read_task_examples(path: Path) -> list[T.TaskExample]:
    """The inverse of ``write_jsonl`` (for training; evaluation uses the runtime's reader)."""
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        out.append(T.TaskExample(rec["task"], tuple(rec["input_ids"]), tuple(rec["answer"])))
    return out


def load_manifest(zoo_dir: Path) -> dict | None:
    """The manifest of ``zoo_dir`` if it is a complete zoo (manifest present and every file it
    names exists), else None."""
    path = Path(zoo_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    files = [f"{manifest['base']}/config.json", f"{manifest['base']}/model.safetensors"]
    for info in manifest["tasks"].values():
        files += [f"{info['model']}/config.json", f"{info['model']}/model.safetensors"]
        files += list(info["splits"].values())
    return manifest if all((Path(zoo_dir) / f).is_file() for f in files) else None


@dataclass(frozen=True)
class Zoo:
    """A complete zoo on disk: ``root`` and its manifest (see the module docstring)."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: Path) -> "Zoo":
        """The zoo at ``root``; MergeError if it is missing or incomplete."""
        manifest = load_manifest(root)
        if manifest is None:
            raise MergeError(f"{root}: not a complete zoo (build it with scripts/zoo.py)")
        return cls(Path(root), manifest)

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    def tasks_of_kind(self, kind: str) -> list[str]:
        """The tasks of one kind: "skill", "reasoning" or "domain"."""
        return [t for t, info in self.manifest["tasks"].items() if info["kind"] == kind]

    @property
    def base(self) -> Path:
        return self.root / self.manifest["base"]

    def model(self, task: str) -> Path:
        """The folder of ``task``'s fine-tune."""
        return self.root / self.manifest["tasks"][task]["model"]

    def split(self, task: str, split: str) -> Path:
        """The jsonl file of one split of ``task``."""
        return self.root / self.manifest["tasks"][task]["splits"][split]


def _write_splits(root: Path, settings: ZooSettings) -> dict[str, dict[str, str]]:
    """Generate and write every task's splits; returns {task: {split: relative path}}."""
    out: dict[str, dict[str, str]] = {}
    for task in T.ALL_TASKS:
        splits = T.make_splits(task, dict(settings.split_sizes), settings.seed)
        out[task] = {}
        for split, examples in splits.items():
            rel = f"data/{task}/{split}.jsonl"
            write_jsonl(root / rel, examples)
            out[task][split] = rel
    return out


def base_mixture(root: Path, split_files: dict[str, dict[str, str]]) -> list[T.TaskExample]:
    """The base's training data: every task's pretrain split, then the skill tasks' instruct
    splits (the fine-tunes replay it)."""
    names = (T.PRETRAIN_SPLIT, T.INSTRUCT_SPLIT)
    return [e for split in names for task in T.ALL_TASKS if split in split_files[task]
            for e in read_task_examples(root / split_files[task][split])]


def _finetune_job(root: str, base_rel: str, task: str, split_files: dict[str, dict[str, str]],
                  settings: ZooSettings, index: int) -> tuple[str, float, float]:
    """Fine-tune the saved base on one task's train split, replaying the base mixture, and save
    it (runs in a worker process or in the caller). Returns (task, final training loss,
    seconds)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a worker process does not inherit the caller's setting
    start = time.perf_counter()
    rootp = Path(root)
    with single_thread():
        model = AutoModelForCausalLM.from_pretrained(rootp / base_rel, dtype=torch.float32)
        cfg = dataclasses.replace(settings.finetune_config(task), seed=settings.seed + index + 1)
        own = read_task_examples(rootp / split_files[task]["train"])
        replay = base_mixture(rootp, split_files) if cfg.replay else []
        losses = train(model, own, cfg, replay=replay)
        save_model(model, rootp / "models" / task)
    return task, losses[-1], time.perf_counter() - start


def _build(root: Path, settings: ZooSettings, jobs: int, log: Log) -> dict:
    start = time.perf_counter()
    split_files = _write_splits(root, settings)
    log(f"wrote the splits of {len(split_files)} tasks ({time.perf_counter() - start:.1f} s)")
    mixture = base_mixture(root, split_files)
    t0 = time.perf_counter()
    with single_thread():
        base = build_model(settings.shape, settings.seed)
        base_losses = train(base, mixture, dataclasses.replace(settings.base, seed=settings.seed))
        save_model(base, root / "models" / "base")
    log(f"base trained ({settings.base.steps} steps, final loss {base_losses[-1]:.3f}, "
        f"{time.perf_counter() - t0:.1f} s)")
    args = [(str(root), "models/base", task, split_files, settings, i)
            for i, task in enumerate(T.ALL_TASKS)]
    results = {}
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            for task, loss, secs in pool.map(_finetune_job, *zip(*args)):
                results[task] = loss
                log(f"fine-tune {task}: final loss {loss:.3f} ({secs:.1f} s)")
    else:
        for a in args:
            task, loss, secs = _finetune_job(*a)
            results[task] = loss
            log(f"fine-tune {task}: final loss {loss:.3f} ({secs:.1f} s)")
    return {
        "format": ZOO_FORMAT,
        "settings_hash": settings_hash(settings),
        "settings": settings.to_json(),
        "vocab": list(T.TOKENS),
        "base": "models/base",
        "base_final_loss": base_losses[-1],
        "tasks": {task: {"kind": T.TASK_KIND[task], "model": f"models/{task}",
                         "splits": split_files[task], "final_loss": results[task]}
                  for task in T.ALL_TASKS},
        "build_seconds": round(time.perf_counter() - start, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
    }


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _replaceable(folder: Path) -> bool:
    """An existing ``folder`` may be replaced by a build: an empty folder or an earlier zoo."""
    return folder.is_dir() and ((folder / MANIFEST).is_file() or not any(folder.iterdir()))


def quiet(_msg: str) -> None:
    """The default log: nothing."""


def to_stderr(msg: str) -> None:
    """A log to stderr (a module-level function, so worker processes can be given it)."""
    print(msg, file=sys.stderr, flush=True)


def build_zoo(out: Path, settings: ZooSettings, jobs: int = 1, force: bool = False,
              log: Log = quiet) -> dict:
    """Build the zoo of ``settings`` into ``out`` (or reuse the complete one there) and return
    its manifest, with ``"cached": True`` when nothing was built.

    ``jobs`` > 1 runs the fine-tunes in that many worker processes (each single-threaded, so the
    result does not depend on ``jobs``). ``force`` rebuilds even a matching zoo. Log lines are
    prefixed with ``zoo <folder name>:``.
    """
    out = Path(out)
    outer_log = log
    log = lambda msg: outer_log(f"zoo {out.name}: {msg}")  # noqa: E731
    if out.exists() and not _replaceable(out):
        raise MergeError(f"{out} exists and is not a zoo (no {MANIFEST}); refusing to replace it")
    wanted = settings_hash(settings)
    existing = load_manifest(out)
    if existing is not None and existing.get("settings_hash") == wanted and not force:
        log(f"{out} is complete (settings {wanted}); nothing to build")
        return {**existing, "cached": True}
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    manifest = _build(partial, settings, jobs, log)
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    log(f"built {out} in {manifest['build_seconds']:.1f} s (settings {wanted})")
    return {**manifest, "cached": False}


def seed_dir(root: Path, seed: int) -> Path:
    """Where ``build_zoos`` puts the zoo of one seed."""
    return Path(root) / f"seed-{seed}"


def build_zoos(root: Path, settings: ZooSettings, seeds: Sequence[int], jobs: int = 1,
               force: bool = False, log: Log = quiet) -> list[dict]:
    """One zoo per seed (``settings`` with that seed) in ``root/seed-<seed>``; their manifests.

    With ``jobs`` > 1 and several seeds, whole zoos are built in parallel worker processes (then
    ``log`` must be picklable, e.g. ``to_stderr``); with one seed the fine-tunes are.
    """
    runs = [(seed_dir(root, s), dataclasses.replace(settings, seed=s)) for s in seeds]
    if jobs > 1 and len(runs) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(runs)),
                                 mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(build_zoo, out, s, 1, force, log) for out, s in runs]
            return [f.result() for f in futures]
    return [build_zoo(out, s, jobs, force, log) for out, s in runs]
