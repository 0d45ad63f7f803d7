"""Running a grid (docs/grid.md §2–§5, §7): plan every point, group the points that read the same
inputs into passes, run each pass as one read (``engine.run_pass``), log every attempt.

    OUT_ROOT/grid.yml, points.json, <id>/ (a complete merge output + grid_point.json; none for a
    point that failed validation, which is only a failed row),
    .<id>.partial/ (only while it is written), results.jsonl (+ results.<i>-of-<n>.jsonl),
    results.csv, .grid.lock
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from mergekit_like import __version__
from mergekit_like.engine import MergeOptions
from mergekit_like.errors import MergeError
from mergekit_like.grid.executors import (POINT_FILE, Executor, PassJob, PointOutcome,  # noqa: F401
                                          SharedSources,
                                          SequentialExecutor, remove_partial)
from mergekit_like.grid.expand import Grid, GridPoint, InvalidPoint, partition
from mergekit_like.grid.progress import GridProgress
from mergekit_like.grid.results import ResultLog, atomic_write
from mergekit_like.engine.plan import MergePlan, SourceOpener, build_plan
from mergekit_like.registry import verify as verify_output

PROCESS_BASE_BYTES = 350 * 10**6   # a worker process's own memory, beside one merge's peak


@dataclass
class GridOptions:
    resume: bool = False
    force: bool = False
    skip_failed: bool = False
    fail_fast: bool = False
    pass_size: int = 16
    shard: tuple[int, int] | None = None        # (i, n)
    break_lock: bool = False
    worker_device: str | None = None            # a --device spec resolved on each worker


@dataclass
class PlannedPoint:
    point: GridPoint
    plan: MergePlan | None = None
    error: str | None = None                    # invalid at plan time (phase B)
    signature: tuple = ()

    @property
    def id(self) -> str:
        return self.point.id


@dataclass
class GridRun:
    """What ``run_grid`` did: the results written in this run, in point order."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(r["status"] == "failed" or r.get("eval_error") for r in self.rows)


# ---- shared sources -----------------------------------------------------------------------------

def read_signature(plan: MergePlan) -> tuple:
    """Points with equal signatures read the same tensors from the same sources in the same
    order and lay out the same output shards: they can share a pass."""
    return (tuple(id(s) for s in plan.sources), plan.base_pos, tuple(sorted(plan.side)),
            tuple((o.name, tuple(o.shape), str(o.dtype)) for o in plan.outputs),
            tuple((j.name, j.merge, tuple(j.participants), j.base, tuple(sorted(j.reads.items())))
                  for j in plan.jobs))


def group_passes(points: list[PlannedPoint], pass_size: int) -> list[list[PlannedPoint]]:
    """Consecutive runs of at most ``pass_size`` points per read signature, in first-seen order."""
    groups: dict[tuple, list[PlannedPoint]] = {}
    for p in points:
        groups.setdefault(p.signature, []).append(p)
    size = max(1, pass_size)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def pass_cost(group: list[PlannedPoint]) -> float:
    """Bytes read once + bytes written per point (docs/grid.md §7)."""
    plan = group[0].plan
    assert plan is not None
    written = sum(o.dtype.itemsize * _numel(o.shape) for o in plan.outputs)
    return float(plan.read_bytes + len(group) * written)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- the run --------------------------------------------------------------------------------

def plan_points(grid: Grid, sources: SharedSources) -> list[PlannedPoint]:
    """Phase B for every point (headers only); an invalid point keeps its error."""
    planned = []
    for point in grid.points:
        try:
            plan = build_plan(point.recipe, sources)
            planned.append(PlannedPoint(point, plan, None, read_signature(plan)))
        except MergeError as exc:
            planned.append(PlannedPoint(point, None, str(exc)))
    return planned


def select_shard(passes: list[list[PlannedPoint]], shard: tuple[int, int] | None
                 ) -> list[list[PlannedPoint]]:
    """The passes of slice i of n (deterministic; every pass in exactly one slice). When n
    exceeds the passes, the largest are split into contiguous runs of points first."""
    if shard is None:
        return passes
    i, n = shard
    passes = list(passes)
    while len(passes) < n and any(len(p) > 1 for p in passes):
        big = max(range(len(passes)), key=lambda k: (len(passes[k]), -k))
        half = (len(passes[big]) + 1) // 2
        passes[big:big + 1] = [passes[big][:half], passes[big][half:]]
    slices = partition([pass_cost(p) for p in passes], n)
    return [passes[k] for k in sorted(slices[i])] if i < len(slices) else []


def point_complete(root: Path, point: GridPoint) -> bool:
    """Cheap verification of a finished point folder (docs/grid.md §4): no data hashed."""
    folder = root / point.id
    try:
        meta = json.loads((folder / POINT_FILE).read_text(encoding="utf-8"))
        if meta.get("id") != point.id:
            return False
        if (folder / "mergekit_config.yml").read_text(encoding="utf-8") != point.text:
            return False
        verify_output(folder, read_data=False)
    except (OSError, ValueError, MergeError):
        return False
    return True


def run_grid(grid: Grid, root: Path, merge_options: MergeOptions, opener: SourceOpener,
             options: GridOptions, log: ResultLog,
             on_pass: Callable[[list[dict[str, Any]]], None] | None = None,
             executor: Executor | None = None, progress: GridProgress | None = None) -> GridRun:
    """Run the grid's points into ``root`` on ``executor`` (default: this process, pass after
    pass); returns this run's result rows. Only this driver appends to the results log."""
    run = GridRun(warnings=list(grid.warnings))
    executor = executor or SequentialExecutor()
    progress = progress or GridProgress(None)
    sources = SharedSources(opener)
    try:
        planned = _unique(plan_points(grid, sources), run.warnings)
        run.rows.extend(_record_invalid(grid, options, log))
        for p in planned:
            if p.error is not None:
                run.rows.append(log.record(_row(p, "failed", error=p.error)))
        valid = [p for p in planned if p.error is None]
        passes = select_shard(group_passes(valid, options.pass_size), options.shard)
        _write_points_json(root, planned, passes, grid.invalid_points)
        jobs, by_pass = _pass_jobs(root, passes, merge_options, opener, options, log, run)
        progress.begin(sum(len(g) for g in passes), skipped=len(run.rows))

        def on_done(job: PassJob, outcomes: list[PointOutcome]) -> bool:
            rows = _record_pass(root, job.number, by_pass[job.number], outcomes, log)
            run.rows.extend(rows)
            progress.finished(rows)
            if on_pass:
                on_pass(rows)
            return not (options.fail_fast and any(r["status"] == "failed" for r in rows))

        executor.run(jobs, progress.started, on_done)
    finally:
        progress.end()
        sources.close()
    return run


def _pass_jobs(root: Path, passes: list[list[PlannedPoint]], merge_options: MergeOptions,
               opener: SourceOpener, options: GridOptions, log: ResultLog, run: GridRun
               ) -> tuple[list[PassJob], dict[int, list[PlannedPoint]]]:
    """One job per pass with points left to merge: a complete point is recorded ``skipped``
    (unless --force), one that failed last time is left alone under --skip-failed."""
    previously_failed = log.failed_ids()
    jobs: list[PassJob] = []
    by_pass: dict[int, list[PlannedPoint]] = {}
    for number, group in enumerate(passes, 1):
        todo: list[PlannedPoint] = []
        for p in group:
            remove_partial(root, p.id)
            if not options.force and point_complete(root, p.point):
                run.rows.append(log.record(_row(p, "skipped", pass_no=number,
                                                last=log.last_ok(p.id))))
            elif not (options.skip_failed and p.id in previously_failed):
                todo.append(p)
        if todo:
            by_pass[number] = todo
            memory = max(p.plan.peak_memory_estimate(merge_options.block_elems) for p in todo)
            jobs.append(PassJob(number, [p.point for p in todo], root, merge_options, opener,
                                memory_bytes=memory + PROCESS_BASE_BYTES,
                                device=options.worker_device, plans=[p.plan for p in todo]))
    return jobs, by_pass


def _record_pass(root: Path, number: int, group: list[PlannedPoint],
                 outcomes: list[PointOutcome], log: ResultLog) -> list[dict[str, Any]]:
    """The results lines of one finished pass (a lost worker's partial folders removed)."""
    by_id = {o.id: o for o in outcomes}
    rows = []
    for p in group:
        o = by_id.get(p.id) or PointOutcome(p.id, "the executor returned no result for it")
        if o.lost:
            remove_partial(root, p.id)
        rows.append(log.record(_row(p, "failed" if o.error else "ok", error=o.error,
                                    pass_no=number, wall_s=o.wall_s,
                                    pass_wall_s=o.pass_wall_s, peak_rss_mb=o.peak_rss_mb,
                                    started_at=o.started_at, finished_at=o.finished_at,
                                    host=o.host)))
    return rows


def _record_invalid(grid: Grid, options: GridOptions, log: ResultLog) -> list[dict[str, Any]]:
    """A failed row per point that failed validation (no folder is made for it). Slice 0 of a
    sharded grid records them; --skip-failed leaves one whose last row is failed alone."""
    if options.shard is not None and options.shard[0] != 0:
        return []
    previously_failed = log.failed_ids()
    return [log.record(_row(ip, "failed", error=ip.message))
            for ip in grid.invalid_points
            if not (options.skip_failed and ip.id in previously_failed)]


def _unique(planned: list[PlannedPoint], warnings: list[str]) -> list[PlannedPoint]:
    """Points that became equal once Hub revisions were pinned (org/a@main and org/a@<sha>)
    run once; different recipes sharing a 12-digit id are an error."""
    seen: dict[str, PlannedPoint] = {}
    out = []
    for p in planned:
        first = seen.get(p.id)
        if first is None:
            seen[p.id] = p
            out.append(p)
        elif first.point.recipe.resolved_json() == p.point.recipe.resolved_json():
            warnings.append(f"points '{first.point.label}' and '{p.point.label}' pin to the same "
                            f"recipe; '{p.point.label}' is merged into it")
        else:
            raise MergeError(f"points '{first.point.label}' and '{p.point.label}' share the id "
                             f"{p.id} (a sha256 prefix collision); change one of them")
    return out


def _row(p: PlannedPoint | InvalidPoint, status: str, *, error: str | None = None,
         pass_no: int | None = None, wall_s: float | None = None,
         pass_wall_s: float | None = None, peak_rss_mb: float | None = None,
         started_at: str | None = None, finished_at: str | None = None,
         host: str | None = None, last: dict[str, Any] | None = None) -> dict[str, Any]:
    """One results.jsonl line for a point (an invalid point has no inputs to name)."""
    if isinstance(p, InvalidPoint):
        label, values, inputs = p.label, p.values, {}
    else:
        label, values = p.point.label, p.point.values
        inputs = {inp.ref.display: (inp.ref.sha or inp.ref.revision or "local")
                  for inp in p.point.recipe.inputs}
    row = {
        "id": p.id, "label": label, "values": values, "status": status,
        "wall_s": wall_s, "peak_rss_mb": peak_rss_mb, "peak_gpu_mb": None, "pass": pass_no,
        "pass_wall_s": pass_wall_s, "metric": None, "eval": None, "eval_error": None,
        "error": error,
        "inputs": inputs,
        "started_at": started_at or _now(), "finished_at": finished_at or _now(),
        "tool_version": __version__, "shard": None, "host": host or socket.gethostname(),
    }
    if last:  # a skipped point keeps the metric of its last ok run
        for key in ("metric", "eval", "lm_eval", "wall_s", "peak_rss_mb"):
            if key not in last and key not in row:
                continue
            row[key] = last.get(key)
    return row


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_points_json(root: Path, planned: list[PlannedPoint],
                       passes: list[list[PlannedPoint]], invalid: list[InvalidPoint]) -> None:
    """points.json: id -> label, values and pass of every point (an invalid one: no pass, and
    its validation error)."""
    pass_of = {p.id: k for k, group in enumerate(passes, 1) for p in group}
    doc = {p.id: {"label": p.point.label, "values": p.point.values, "pass": pass_of.get(p.id)}
           for p in planned}
    for ip in invalid:
        doc[ip.id] = {"label": ip.label, "values": ip.values, "pass": None, "error": ip.message}
    atomic_write(root / "points.json", json.dumps(doc, indent=2, default=str) + "\n")
