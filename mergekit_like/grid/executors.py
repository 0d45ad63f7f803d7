"""Where a grid's read passes run (docs/grid.md §8): the executor interface, the job a pass is
handed as (``PassJob``), what a pass reports back per point (``PointOutcome``), the worker-side
function that runs one pass anywhere (``execute_pass``) and the in-process sequential executor.

The driver (``grid.run.run_grid``) plans every point, skips finished ones, builds one job per pass
and hands the jobs to an executor; the executor calls ``on_done(job, outcomes)`` in the driver's
thread as each pass ends, and only the driver appends to ``results.jsonl``. Remote executors
(``ray_executor``, ``slurm_executor``) ship a job without its plans (open sources do not travel);
``execute_pass`` then re-plans the pass's points on the worker from their recipes, which gives the
same outputs: a point's bytes depend only on its recipe and its inputs.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

from mergekit_like.engine import MergeOptions, run_pass
from mergekit_like.engine.plan import MergePlan, SourceOpener, build_plan
from mergekit_like.grid.expand import GridPoint
from mergekit_like.io.source import CheckpointSource
from mergekit_like.recipe import InputModel

POINT_FILE = "grid_point.json"
CRASH_HOOK_ENV = "MERGEKIT_LIKE_GRID_CRASH_FILE"
"""Test-only: a file holding a point id; the worker running that point's pass removes the file
and dies (``os._exit``) after the pass's first output tensor (a worker lost mid-pass)."""


@dataclass
class PointOutcome:
    """What a pass reports for one of its points: ``error`` is None for an ok point. ``lost``:
    the worker died, so its partial folder may be left and the driver removes it."""

    id: str
    error: str | None
    wall_s: float | None = None
    pass_wall_s: float | None = None
    peak_rss_mb: float | None = None
    started_at: str | None = None
    finished_at: str | None = None
    host: str | None = None
    lost: bool = False


@dataclass
class PassJob:
    """One read pass: its number in the grid, its points, where they go and how they merge.
    ``plans`` (the driver's, sharing its sources) are only used in-process; ``device`` (a
    ``--device`` spec) is resolved on the worker when set, since a driver may have no GPU."""

    number: int
    points: list[GridPoint]
    root: Path
    options: MergeOptions
    opener: SourceOpener
    memory_bytes: int = 0                      # MergePlan.peak_memory_estimate + process base
    device: str | None = None
    plans: list[MergePlan] | None = field(default=None, repr=False)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.points]

    def portable(self) -> "PassJob":
        """This job without its plans, to ship to another process."""
        return replace(self, plans=None)


OnDone = Callable[[PassJob, list[PointOutcome]], bool]   # False: stop (--fail-fast)
OnStart = Callable[[PassJob], None]


class Executor(Protocol):
    """Runs passes. ``check`` (before anything is written) raises MergeError when the executor
    cannot run here (an extra not installed, no cluster); ``run`` runs every job and calls
    ``on_start`` when a job is handed out and ``on_done`` as each one ends; when ``on_done``
    returns False the jobs not yet finished are cancelled and get no outcome; ``close`` releases
    what ``check`` took (a Ray instance it started)."""

    name: str

    def check(self) -> None: ...

    def run(self, jobs: list[PassJob], on_start: OnStart, on_done: OnDone) -> None: ...

    def close(self) -> None: ...


class SequentialExecutor:
    """Today's grid: every pass in this process, one after another, on the driver's plans."""

    name = "local"

    def check(self) -> None:
        return None

    def run(self, jobs: list[PassJob], on_start: OnStart, on_done: OnDone) -> None:
        for job in jobs:
            on_start(job)
            if not on_done(job, execute_pass(job)):
                return

    def close(self) -> None:
        return None


class SharedSources:
    """One source per model reference for the whole grid: headers parsed once, Hub shards
    downloaded once. ``close`` closes them all (plans of the grid never close sources)."""

    def __init__(self, opener: SourceOpener):
        self._opener = opener
        self._open: dict[tuple, CheckpointSource] = {}

    def __call__(self, inp: InputModel) -> CheckpointSource:
        key = inp.ref.key
        if key not in self._open:
            self._open[key] = self._opener(inp)
        src = self._open[key]
        if getattr(src, "sha", None):
            inp.ref.sha = src.sha
        return src

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open.clear()


# ---- the worker side ----------------------------------------------------------------------------

def execute_pass(job: PassJob) -> list[PointOutcome]:
    """Run one pass (in the driver or on any worker): re-plan its points when the job came
    without plans, write each point atomically into ``root/<id>/`` with its grid_point.json, and
    return one outcome per point. A planning error fails every point of the pass."""
    started, t0 = _now(), time.perf_counter()
    sources = None
    plans = job.plans
    options = job.options
    try:
        if job.device is not None:
            from mergekit_like.device import resolve_device
            options = replace(options, device=resolve_device(job.device))
        if plans is None:
            sources = SharedSources(job.opener)
            plans = [build_plan(p.recipe, sources) for p in job.points]
        for pid in job.ids:
            remove_partial(job.root, pid)
        extra = [{POINT_FILE: point_file_text(p)} for p in job.points]
        results = run_pass(plans, [job.root / pid for pid in job.ids],
                           replace(options, overwrite=True, resume=False),
                           _crash_hook(job), extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - the pass's points fail with its reason
        results = [exc] * len(job.points)
    finally:
        if sources is not None:
            sources.close()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return [PointOutcome(pid, one_line(res) if isinstance(res, BaseException) else None,
                         wall_s=wall / len(job.points), pass_wall_s=wall, peak_rss_mb=peak,
                         started_at=started, finished_at=_now(), host=socket.gethostname())
            for pid, res in zip(job.ids, results)]


def lost_outcomes(job: PassJob, reason: str) -> list[PointOutcome]:
    """Every point of a pass whose worker died or never ran it, failed with ``reason``."""
    return [PointOutcome(pid, reason, finished_at=_now(), lost=True) for pid in job.ids]


def point_file_text(point: GridPoint) -> str:
    return json.dumps({"id": point.id, "label": point.label, "values": point.values,
                       "resolved": point.recipe.resolved()}, indent=2, default=str) + "\n"


def remove_partial(root: Path, pid: str) -> None:
    partial = Path(root) / f".{pid}.partial"
    if partial.exists():
        shutil.rmtree(partial, ignore_errors=True)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split("\n"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _crash_hook(job: PassJob) -> Callable[[str, int], None] | None:
    """The test-only worker death (``CRASH_HOOK_ENV``): armed when the file names a point of
    this pass; fires once, after the first output tensor is handed to the writer."""
    path = os.environ.get(CRASH_HOOK_ENV)
    if not path:
        return None
    try:
        target = Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if target not in job.ids:
        return None

    def die(_name: str, _nbytes: int) -> None:
        Path(path).unlink(missing_ok=True)
        os._exit(17)

    return die
