"""The merge engine: one pass of plan → read → merge → write, top to bottom.

1. **plan**   (plan.py) every input's headers checked, every parameter resolved; the output's
              shard layout, side files and resume key (write.py).
2. **read**   (read.py) a background thread reads the next tensor's inputs (one tensor at a
              time, checked finite) while the current one is merged.
3. **merge**  (merge.py) inputs moved to the device and handed to the method as one
              ``TensorTask``; the method computes block by block and casts once.
4. **write**  a writer thread streams each output into its pre-planned shard inside
              ``.OUT.partial/``; each finished shard is fsync'd, checked and marked done
              (resume); then the side files, the check, the manifest and the rename (write.py).

A single merge is a pass of one output; a grid's pass writes several outputs from one read of
the shared inputs (``run_pass``).
"""

from __future__ import annotations

import errno
import math
from collections import deque
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_like.engine.merge import merge_job, threads_for
from mergekit_like.engine.options import MergeOptions
from mergekit_like.engine.plan import MergePlan, SourceOpener, TensorJob, build_plan
from mergekit_like.engine.read import JobInputs, announce_reads, read_ahead, read_job
from mergekit_like.engine.write import (finish_output, jobs_in_write_order, plan_files,
                                        plan_inputs, resume_key)
from mergekit_like.errors import AlreadyComplete, MergeError
from mergekit_like.io.output import OutputFolder
from mergekit_like.io.shards import ShardPlan
from mergekit_like.io.writer import AsyncShardWriter, iter_write_order
from mergekit_like.methods.base import output_key
from mergekit_like.recipe import Recipe


@dataclass
class MergeResult:
    out: Path
    shards: list[ShardPlan]
    skipped_shards: set[str]
    warnings: list[str]
    notes: list[str] = field(default_factory=list)
    already_complete: bool = False
    """OUT already held this very merge (same resume key): nothing was written."""


Progress = Callable[[str, int], None]  # (tensor name, bytes of output produced)


def run_merge(recipe: Recipe, out: Path, options: MergeOptions, open_source: SourceOpener,
              progress: Progress | None = None,
              on_start: Callable[[int], None] | None = None) -> MergeResult:
    """Merge ``recipe`` into ``out``. ``on_start(bytes)`` is called once the work is known,
    ``progress(name, bytes)`` after each output tensor is handed to the writer."""
    plan = build_plan(recipe, open_source)
    try:
        result = run_pass([plan], [Path(out)], options, progress, on_start, isolate=False,
                          accept_complete=True)[0]
    except AlreadyComplete:
        return MergeResult(Path(out), [], set(), list(plan.warnings), already_complete=True)
    finally:
        plan.close()
    assert isinstance(result, MergeResult)
    return result


def run_pass(plans: list[MergePlan], outs: list[Path], options: MergeOptions,
             progress: Progress | None = None, on_start: Callable[[int], None] | None = None,
             *, isolate: bool = True, accept_complete: bool = False,
             extra_files: list[dict[str, str]] | None = None) -> list[MergeResult | BaseException]:
    """Write one output per plan in a single read pass: each input tensor is read once and
    every plan's outputs are computed from it and written right away.

    The plans must share their sources and read the same tensors from them in the same
    order (the grid groups its points so). ``isolate``: an error in one plan's opening (its
    output locked, say), merge or write fails that output only (its partial folder removed)
    and is returned in its place;
    a read error fails them all. Without it (a single merge) errors propagate.
    ``extra_files[k]``: more side files (name → text) for output k, written before its check.
    ``accept_complete``: an output that already holds this run raises ``AlreadyComplete``."""
    threads = torch.get_num_threads()
    points: list[_Point] = []
    slots: list[_Point | Exception] = []    # per plan: its point, or why it could not open
    try:
        for k, (plan, out) in enumerate(zip(plans, outs)):
            try:
                pt = _open_point(plan, Path(out), options, len(plans), accept_complete)
            except Exception as exc:
                if not isolate:
                    raise
                slots.append(exc)              # this output fails alone (locked, say)
                continue
            pt.extra = dict(extra_files[k]) if extra_files else {}
            points.append(pt)
            slots.append(pt)
        for method in {id(pt.plan.method): pt.plan.method for pt in points}.values():
            method.warm_up(options.device)
        if points:
            _stream(points, options, progress, on_start, isolate)
        for pt in points:                       # side files, check, rename into place
            if pt.error is None:
                _guard(pt, isolate, lambda pt=pt: _finish(pt))
    except BaseException as exc:
        for pt in points:
            if pt.error is None:
                pt.error = exc
                _abandon(pt, exc)
        if not isolate or not isinstance(exc, Exception):
            raise
    finally:
        torch.set_num_threads(threads)
    return [pt if isinstance(pt, Exception) else pt.error if pt.error is not None else
            MergeResult(pt.out, pt.groups[""], pt.done,
                        pt.plan.warnings + list(pt.folder.warnings), list(pt.plan.notes))
            for pt in slots]


@dataclass
class _Point:
    """One output of a pass: its plan, output folder, writer and what is left to write."""

    plan: MergePlan
    out: Path
    groups: dict[str, list[ShardPlan]]  # output group ("" = the model) -> its shards
    folder: OutputFolder
    writers: list[tuple[AsyncShardWriter, deque[str]]]  # per group: writer, names it still needs
    done: set[str]                      # shard files finished by an earlier run (resume)
    skipped: set[str]                   # their tensors
    jobs: dict[str, TensorJob]
    threads: tuple[int, int]            # (torch threads, operator workers) for its method
    reports: dict[str, dict] = field(default_factory=dict)  # tensor -> TensorTask.report
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    error: BaseException | None = None

    @property
    def shards(self) -> list[ShardPlan]:
        return [s for shards in self.groups.values() for s in shards]


def _open_point(plan: MergePlan, out: Path, options: MergeOptions, n_points: int,
                accept_complete: bool = False) -> _Point:
    """Plan the output's shard layout and resume key, open its folder and writers."""
    groups = plan_files(plan, options.out_shard_bytes)
    shards = [s for g in groups.values() for s in g]
    folder = OutputFolder(out, overwrite=options.overwrite, resume=options.resume,
                          resume_key=resume_key(plan, shards, options),
                          planned_bytes=sum(s.file_size for s in shards), plans=shards,
                          inputs=plan_inputs(plan), accept_complete=accept_complete)
    done = folder.prepare()
    budget = max(1, options.read_ahead_bytes // (n_points * len(groups)))
    writers = [(AsyncShardWriter(folder, g, skip=done, max_queue_bytes=budget),
                deque(output_key(n, group) for n in iter_write_order(g, done)))
               for group, g in groups.items()]
    return _Point(plan, out, groups, folder, writers, done,
                  {output_key(t.name, group) for group, g in groups.items()
                   for s in g if s.filename in done for t in s.tensors},
                  {job.name: job for job in plan.jobs}, threads_for(plan, options),
                  reports=dict(folder.state_get("reports", {})))


def _stream(points: list[_Point], options: MergeOptions, progress: Progress | None,
            on_start: Callable[[int], None] | None, isolate: bool) -> None:
    """read → merge → write, in the order the (shared) shard layout is laid out."""
    lead = points[0]
    done_everywhere = set.intersection(*(pt.done for pt in points))
    needed = {output_key(n, group) for group, shards in lead.groups.items()
              for n in iter_write_order(shards, done_everywhere)}
    jobs = [job for job in jobs_in_write_order(lead.plan, iter_write_order(lead.groups[""]))
            if any(o.key in needed for o in job.outputs)]
    announce_reads(lead.plan, jobs)
    if on_start:
        on_start(sum(s.data_size for s in lead.shards if s.filename not in lead.done))
    reads = read_ahead(iter(jobs), lambda j: read_job(lead.plan, j, options),
                       size=lambda j: j.read_bytes(lead.plan), budget=options.read_ahead_bytes)
    with closing(reads):   # an error or a signal stops the reader before the plan closes
        for job, inputs in reads:
            alive = sum(pt.error is None for pt in points)
            memo = {} if alive > 1 else None  # what points may share (TensorTask.memo)
            for pt in points:
                if pt.error is None:
                    _guard(pt, isolate, lambda pt=pt, inputs=inputs: _merge_and_submit(
                        pt, pt.jobs[job.name], inputs, options, memo,
                        progress if pt is lead else None))
            del inputs  # released when the next job is asked for (read_ahead's budget)


def _merge_and_submit(pt: _Point, job: TensorJob, inputs: JobInputs, options: MergeOptions,
                      memo: dict | None, progress: Progress | None) -> None:
    compute, workers = pt.threads
    if torch.get_num_threads() != compute:
        torch.set_num_threads(compute)
    reports: dict[str, dict] = {}
    outputs = merge_job(pt.plan, job, inputs, options, workers=workers, memo=memo,
                        reports=reports)
    if reports:
        pt.reports.update(reports)
        pt.folder.state_set("reports", pt.reports)  # kept for a resumed run's side files
    for spec in job.outputs:
        if spec.key not in pt.skipped:
            pt.pending[spec.key] = outputs[spec.key]
    specs = {spec.key: spec for spec in job.outputs}
    for writer, wanted in pt.writers:      # each group's writer takes its tensors in its order
        while wanted and wanted[0] in pt.pending:
            key = wanted.popleft()
            spec = specs[key]
            writer.submit(spec.name, pt.pending.pop(key).cpu())
            if progress:
                progress(spec.name, math.prod(spec.shape) * spec.dtype.itemsize)


def _finish(pt: _Point) -> None:
    if pt.pending:
        raise RuntimeError(f"outputs never written: {sorted(pt.pending)[:3]}")
    for writer, _ in pt.writers:
        writer.close()
    finish_output(pt.plan, pt.folder, pt.groups, pt.reports, pt.extra)


def _guard(pt: _Point, isolate: bool, step: Callable[[], None]) -> None:
    """Run one point's step; with ``isolate`` a failure ends that point only."""
    if not isolate:
        step()
        return
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - recorded as the point's result
        pt.error = exc
        _abandon(pt, exc)


def _abandon(pt: _Point, exc: BaseException) -> None:
    for writer, _ in pt.writers:
        writer.abort()
    pt.folder.abort(keep_partial=_resumable(exc))
    pt.pending.clear()


def _resumable(exc: BaseException) -> bool:
    """Keep the partial folder (for --resume) after interruptions and full disks."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return isinstance(exc, MergeError) and str(exc).startswith("disk full")
