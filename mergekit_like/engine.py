"""The merge engine: plan → read → merge → write, top to bottom.

1. **plan**   phase B (plan.py): every input's headers checked, every parameter resolved, the
              output shard layout fixed (io/shards.py) and the resume key computed.
2. **read**   a background thread reads the inputs of the next tensor (safe_open, one tensor at a
              time, checked finite) while the current one is merged.
3. **merge**  inputs moved to the device, handed to the method as one ``TensorTask``; the method
              computes block by block in float32 (float64 if asked) and casts once.
4. **write**  outputs go to a writer thread that streams bytes into pre-planned shards inside
              ``.OUT.partial/``; each finished shard is fsync'd, checked and marked done (resume).
              Side files follow, then the folder is checked and renamed into place. Which
              files each output group gets, the side files and the resume key: output_layout.py.
"""

from __future__ import annotations

import errno
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mergekit_like.dtypes import all_finite
from mergekit_like.errors import AlreadyComplete, MergeError
from mergekit_like.io.output import OutputFolder
from mergekit_like.io.read_ahead import read_ahead
from mergekit_like.io.shards import ShardPlan
from mergekit_like.io.writer import AsyncShardWriter, iter_write_order
from mergekit_like.methods.base import TensorTask, output_key
from mergekit_like.output_layout import (jobs_in_write_order, plan_files, plan_inputs,
                                         resume_key, write_side_files)
from mergekit_like.plan import MergePlan, SourceOpener, TensorJob, build_plan
from mergekit_like.recipe import Recipe
from mergekit_like.verify import verify_output

DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass
class MergeOptions:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    out_shard_bytes: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False
    resume: bool = True
    allow_nonfinite: bool = False
    block_elems: int = 1 << 22
    read_ahead_bytes: int = 256 * 10**6
    """Overlap the next tensor's read only while both tensors' inputs fit in this."""
    workers: int = 1
    """Threads a ``Method.span_parallel`` operator splits each tensor over (run_merge sets it
    from the CPU's threads)."""
    memo: dict | None = None
    """Set by ``run_pass`` per tensor, shared by its points (``TensorTask.memo``)."""


@dataclass
class JobInputs:
    base: torch.Tensor | None
    inputs: list[torch.Tensor]
    side: dict[str, torch.Tensor] = field(default_factory=dict)


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
    order (the grid groups its points so). ``isolate``: an error in one plan's merge or
    write fails that output only (its partial folder removed) and is returned in its place;
    a read error fails them all. Without it (a single merge) errors propagate.
    ``extra_files[k]``: more side files (name → text) for output k, written before its check.
    ``accept_complete``: an output that already holds this run raises ``AlreadyComplete``."""
    threads = torch.get_num_threads()
    points: list[_Point] = []
    try:
        for k, (plan, out) in enumerate(zip(plans, outs)):
            points.append(_open_point(plan, Path(out), options, len(plans), accept_complete))
            points[-1].extra = dict(extra_files[k]) if extra_files else {}
        for method in {id(pt.plan.method): pt.plan.method for pt in points}.values():
            method.warm_up(options.device)
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
    return [pt.error if pt.error is not None else
            MergeResult(pt.out, pt.groups[""], pt.done,
                        pt.plan.warnings + list(pt.folder.warnings), list(pt.plan.notes))
            for pt in points]


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
                  {job.name: job for job in plan.jobs}, _threads_for(plan, options),
                  reports=dict(folder.state_get("reports", {})))


def _threads_for(plan: MergePlan, options: MergeOptions) -> tuple[int, int]:
    """torch threads and operator workers for the plan's method (see ``Method.io_bound`` and
    ``Method.span_parallel``); on CUDA every core stays with torch."""
    threads = torch.get_num_threads()
    compute, workers = threads, 1
    if options.device.type == "cpu":
        if plan.method.io_bound and threads > 1:
            compute = threads - 1            # a core for the reader thread
        if plan.method.span_parallel and compute > 1:
            compute, workers = 1, compute    # the operator's own threads, one span each
    return compute, workers


def _stream(points: list[_Point], options: MergeOptions, progress: Progress | None,
            on_start: Callable[[int], None] | None, isolate: bool) -> None:
    """read → merge → write, in the order the (shared) shard layout is laid out."""
    lead = points[0]
    done_everywhere = set.intersection(*(pt.done for pt in points))
    needed = {output_key(n, group) for group, shards in lead.groups.items()
              for n in iter_write_order(shards, done_everywhere)}
    jobs = [job for job in jobs_in_write_order(lead.plan, iter_write_order(lead.groups[""]))
            if any(o.key in needed for o in job.outputs)]
    _announce_reads(lead.plan, jobs)
    if on_start:
        on_start(sum(s.data_size for s in lead.shards if s.filename not in lead.done))
    reads = read_ahead(iter(jobs), lambda j: read_job(lead.plan, j, options),
                       size=lambda j: j.read_bytes(lead.plan), budget=options.read_ahead_bytes)
    for job, inputs in reads:
        alive = sum(pt.error is None for pt in points)
        memo = {} if alive > 1 else None  # what points may share for this tensor (TensorTask.memo)
        for pt in points:
            if pt.error is None:
                _guard(pt, isolate, lambda pt=pt, inputs=inputs: _merge_and_submit(
                    pt, pt.jobs[job.name], inputs, replace(options, memo=memo),
                    progress if pt is lead else None))
        del inputs  # before the next read starts: at most two jobs' inputs in memory


def _merge_and_submit(pt: _Point, job: TensorJob, inputs: JobInputs, options: MergeOptions,
                      progress: Progress | None) -> None:
    compute, workers = pt.threads
    if torch.get_num_threads() != compute:
        torch.set_num_threads(compute)
    reports: dict[str, dict] = {}
    outputs = merge_job(pt.plan, job, inputs, replace(options, workers=workers), reports=reports)
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
    write_side_files(pt.plan, pt.folder, pt.groups, pt.reports)
    for name, text in {**pt.plan.method.side_files(pt.plan, pt.reports), **pt.extra}.items():
        pt.folder.write_side_file(name, text)
    verify_output(pt.folder.partial, read_data=False, allow_state_dir=True, manifest=False)
    pt.folder.finalize()


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


def _reads_of(plan: MergePlan, job: TensorJob) -> list[int]:
    """Positions of the sources ``read_job`` reads for ``job``."""
    if not job.merge:  # the reference's tensor, and the others' copies compared with it
        return [pos for pos, header in enumerate(plan.headers) if job.name in header]
    return ([plan.base_pos] if plan.base_pos is not None else []) + list(job.participants)


def _announce_reads(plan: MergePlan, jobs: list[TensorJob]) -> None:
    """Tell each source which of its tensors will be read, in order (Hub: shard order,
    prefetch, and --low-disk deletion once a shard's tensors are all released)."""
    per_source: dict[int, list[str]] = {}
    for job in jobs:
        for pos in _reads_of(plan, job):
            per_source.setdefault(pos, []).append(job.name)
    for pos, source in enumerate(plan.sources):
        source.plan_reads(per_source.get(pos, []))
    for source in plan.side.values():
        source.plan_reads([job.name for job in jobs if job.merge and job.name in source.tensors()])


# ---- read ---------------------------------------------------------------------------------

def read_job(plan: MergePlan, job: TensorJob, options: MergeOptions) -> JobInputs:
    """Read one job's inputs in their stored dtype on CPU, each checked finite. Runs in the
    reader thread, so it uses no multi-threaded torch op (those would fight the merge's
    threads for the cores): file reads and ``all_finite``'s numpy scan only."""
    if not job.merge:
        result = JobInputs(plan.reference.read_tensor(job.name), [])
        _warn_if_buffers_differ(plan, job, result.base)
    else:
        base = None
        if plan.base_pos is not None:
            base = _read_checked(plan, plan.base_pos, job.name, options)
        inputs = [_read_checked(plan, pos, job.name, options) for pos in job.participants]
        side = {label: src.read_tensor(job.name) for label, src in plan.side.items()
                if job.name in src.tensors()}
        result = JobInputs(base, inputs, side)
    for pos in _reads_of(plan, job):
        plan.sources[pos].release(job.name)
    for label in result.side:
        plan.side[label].release(job.name)
    return result


def _read_checked(plan: MergePlan, pos: int, name: str, options: MergeOptions) -> torch.Tensor:
    tensor = plan.sources[pos].read_tensor(name)
    if not options.allow_nonfinite and not all_finite(tensor):
        raise MergeError(f"{plan.inputs[pos].ref.display}: tensor '{name}' contains NaN or Inf "
                         "(pass --allow-nonfinite to merge it anyway)")
    return tensor


def _warn_if_buffers_differ(plan: MergePlan, job: TensorJob, ref: torch.Tensor) -> None:
    for pos, header in enumerate(plan.headers):
        if pos == plan.reference_pos or job.name not in header:
            continue
        other = plan.sources[pos].read_tensor(job.name)
        if other.shape != ref.shape or not torch.equal(other, ref):
            plan.warnings.append(f"{plan.inputs[pos].ref.display}: non-floating tensor "
                                 f"'{job.name}' differs from the reference; the reference's is kept")


# ---- merge --------------------------------------------------------------------------------

def merge_job(plan: MergePlan, job: TensorJob, inputs: JobInputs, options: MergeOptions,
              reports: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """Outputs of one job on the compute device, each in its planned dtype (the operator's
    ``TensorTask.report``, if any, goes to ``reports[job.name]``)."""
    if not job.merge:
        return {job.name: inputs.base}
    device = options.device
    task = TensorTask(
        name=job.name,
        shape=tuple(job.info.shape),
        out_dtype=job.outputs[0].dtype,
        compute_dtype=plan.compute_dtype,
        load_dtype=plan.recipe.dtype,
        base=None if inputs.base is None else inputs.base.to(device, non_blocking=True),
        inputs=[t.to(device, non_blocking=True) for t in inputs.inputs],
        input_indices=[plan.inputs[pos].index for pos in job.participants],
        model_params=job.model_params,
        params=job.params,
        seed=plan.recipe.seed,
        t=job.t,
        input_extra=[plan.inputs[pos].extra for pos in job.participants],
        side={label: t.to(device, non_blocking=True) for label, t in inputs.side.items()},
        block_elems=options.block_elems,
        device=device,
        workers=options.workers,
        inputs_finite=not options.allow_nonfinite,
        memo=options.memo,
    )
    outputs = plan.method.merge(task)
    if task.report is not None and reports is not None:
        reports[job.name] = task.report
    for spec in job.outputs:
        got = outputs[spec.key]
        if got.dtype != spec.dtype or tuple(got.shape) != tuple(spec.shape):
            raise RuntimeError(f"{plan.method.spec.name} produced {got.dtype} {list(got.shape)} "
                               f"for '{spec.name}', planned {spec.dtype} {list(spec.shape)}")
    return outputs
