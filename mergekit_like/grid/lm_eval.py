"""``--eval lm-eval --tasks TASK.yaml`` (docs/grid.md §6): the lm-evaluation-harness on each
finished point. lm_eval's HF model loads the point's folder (float32); the tasks come from local
YAML task files (their folders are the only task index: no built-in task is read), whose data is
local too (e.g. ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``). The call runs
with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE set, in the environment and in
the already-imported libraries' constants, so it never reaches the network. Every numeric metric
lands in the row as ``lm_eval: {task: {metric: value}}``; ``eval`` holds them flat
(``task/metric``) and ``metric`` is ``--eval-key`` or the first task's first metric. lm-eval is
an optional extra, imported only here."""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from mergekit_like.errors import MergeError
from mergekit_like.grid.evaluate import Evaluation

BUILTIN = "lm-eval"                 # the --eval value that selects this evaluator
EXTRA_HINT = "pip install 'mergekit_like[lm-eval]'"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclass
class LmEvalTasks:
    """The task names to run and the folders lm_eval indexes them from."""

    names: list[str]
    folders: list[Path]


def check_lm_eval_extra() -> None:
    """Before any merge: the harness (and its HF model's transformers) must be importable."""
    for module in ("lm_eval", "transformers"):
        if importlib.util.find_spec(module) is None:
            raise MergeError(f"--eval lm-eval needs lm-eval: {EXTRA_HINT}")


def load_task_files(paths: list[Path]) -> LmEvalTasks:
    """Each path a YAML task file with a ``task:`` name (a string); MergeError otherwise."""
    if not paths:
        raise MergeError("--eval lm-eval needs --tasks TASK.yaml (a local lm-eval task file)")
    names: list[str] = []
    for path in paths:
        if not Path(path).is_file():
            raise MergeError(f"--tasks {path}: no such file")
        try:
            doc = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_TaskLoader)
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise MergeError(f"--tasks {path}: not YAML ({str(exc).splitlines()[0]})") from None
        task = doc.get("task") if isinstance(doc, dict) else None
        if not isinstance(task, str) or not task:
            raise MergeError(f"--tasks {path}: no 'task:' name (an lm-eval task file has one)")
        names.append(task)
    folders = list(dict.fromkeys(Path(p).resolve().parent for p in paths))
    return LmEvalTasks(list(dict.fromkeys(names)), folders)


class _TaskLoader(yaml.SafeLoader):
    """lm-eval task files may hold ``!function module.name`` tags: kept as plain strings."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


@contextmanager
def offline() -> Iterator[None]:
    """HF offline switches on for the call (env and the constants libraries read at import),
    restored afterwards."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    patched: list[tuple[Any, str, Any]] = []
    os.environ.update({k: "1" for k in OFFLINE_ENV})
    for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                          ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        mod = _loaded(module)
        for name in names:
            if mod is not None and hasattr(mod, name):
                patched.append((mod, name, getattr(mod, name)))
                setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in reversed(patched):
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _loaded(name: str) -> Any:
    import sys
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def lm_eval_of(folder: Path, tasks: LmEvalTasks, *, device: str = "cpu", batch_size: int = 8,
               limit: int | None = None, key: str | None = None) -> Evaluation:
    """Run the tasks on the model in ``folder``; any harness error is the point's eval error."""
    with offline():
        try:
            import lm_eval
            from lm_eval.tasks import TaskManager

            manager = TaskManager(include_path=[str(f) for f in tasks.folders],
                                  include_defaults=False)
            out = lm_eval.simple_evaluate(
                model="hf", model_args={"pretrained": str(Path(folder).resolve()),
                                        "dtype": "float32", "device": device},
                tasks=list(tasks.names), task_manager=manager, batch_size=batch_size,
                limit=limit, log_samples=False, bootstrap_iters=0)
        except Exception as exc:  # noqa: BLE001 - recorded as the point's eval_error
            text = " ".join(str(exc).split()) or type(exc).__name__
            return Evaluation(None, None, f"lm-eval failed: {text[:300]}")
    return metrics_of(out, tasks.names, key)


def metrics_of(out: Any, names: list[str], key: str | None) -> Evaluation:
    """lm_eval's results → the row: ``{task: {metric: value}}`` (the task's declared numeric
    metrics, stderr and sample counts left out; ``acc,none`` → ``acc``, another filter kept as ``acc,FILTER``), flat ``task/metric``
    fields, and the main metric."""
    results = (out or {}).get("results") if isinstance(out, dict) else None
    if not isinstance(results, dict):
        return Evaluation(None, None, "lm-eval returned no results")
    declared = out.get("higher_is_better") if isinstance(out.get("higher_is_better"), dict) else {}
    nested: dict[str, dict[str, float]] = {}
    for task in [*names, *(t for t in results if t not in names)]:
        values = results.get(task)
        if not isinstance(values, dict):
            continue
        nested[task] = {}
        metrics = declared.get(task) if isinstance(declared.get(task), dict) else None
        for name, value in values.items():
            metric, _, filt = str(name).partition(",")
            if metric.endswith("_stderr") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)) or metric in ("sample_len", "samples") \
                    or (metrics is not None and metric not in metrics):
                continue
            nested[task][metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
    flat = {f"{t}/{m}": v for t, ms in nested.items() for m, v in ms.items()}
    if not flat:
        return Evaluation(None, None, "lm-eval reported no numeric metric", {"lm_eval": nested})
    if key is None:
        return Evaluation(next(iter(flat.values())), flat, None, {"lm_eval": nested})
    wanted = key if key in flat else next((k for k in flat if k.split("/", 1)[1] == key), None)
    if wanted is None:
        return Evaluation(None, flat, f"lm-eval reported no metric '{key}'", {"lm_eval": nested})
    return Evaluation(flat[wanted], flat, None, {"lm_eval": nested})
