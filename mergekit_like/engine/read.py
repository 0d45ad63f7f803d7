"""read: each job's inputs from the sources, in the plan's order, checked finite; the next job's
read runs in a background thread while the current one is merged (``read_ahead``)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from mergekit_like.dtypes import all_finite
from mergekit_like.engine.options import MergeOptions
from mergekit_like.engine.jobs import MergePlan, TensorJob
from mergekit_like.errors import MergeError


@dataclass
class JobInputs:
    """One job's tensors as stored (dtype, CPU): the base's, each participant's, the side
    inputs' by label."""

    base: torch.Tensor | None
    inputs: list[torch.Tensor]
    side: dict[str, torch.Tensor] = field(default_factory=dict)


T = TypeVar("T")
R = TypeVar("R")


def read_ahead(jobs: Iterator[T], read: Callable[[T], R], size: Callable[[T], int] | None = None,
               budget: int | None = None) -> Iterator[tuple[T, R]]:
    """Yield (job, read(job)) in order while a background thread reads the jobs ahead.

    A job's inputs are held from the start of its read until the consumer asks for the job
    after it (the consumer drops its reference first). With ``budget`` (bytes, ``size(job)``)
    the reader starts the next read only when nothing is held, or the held bytes and the
    next job's fit the budget, or the held bytes are at most half of it. So small jobs are
    read several ahead (a slow read hides behind a few fast merges), a huge tensor (embeddings,
    head) is read while the small jobs before it merge, and two huge tensors are never held
    together: peak memory stays at about one such tensor's inputs and their merge (plus half
    the budget). Without a budget the reader stays one job ahead. A read error is raised when
    its job's turn comes; closing the iterator stops the reader (after its current read)."""
    ahead = _Reader(jobs, read, size, budget)
    try:
        while True:
            item = ahead.take()
            if item is None:
                return
            job, result, nbytes = item
            del item
            yield job, result
            del result
            ahead.release(nbytes)
    finally:
        ahead.stop()


class _Reader:
    """``read_ahead``'s reader thread: reads jobs in order into a queue while the budget
    allows; ``held`` counts the bytes read (or being read) and not yet released."""

    def __init__(self, jobs: Iterator[T], read: Callable[[T], R],
                 size: Callable[[T], int] | None, budget: int | None):
        self._jobs, self._read, self._size = jobs, read, size
        self._budget = budget if size is not None and budget else None
        self._cond = threading.Condition()
        self._ready: deque[tuple[T, R | None, BaseException | None, int] | None] = deque()
        self._held = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="mergekit-like-read",
                                        daemon=True)
        self._thread.start()

    def _may_start(self, nbytes: int) -> bool:
        if self._stopped:
            return True
        if self._budget is None:
            return not self._ready         # one job ahead
        return self._held + nbytes <= self._budget or 2 * self._held <= self._budget

    def _run(self) -> None:
        try:
            for job in self._jobs:
                nbytes = self._size(job) if self._size is not None else 0
                with self._cond:
                    while not self._may_start(nbytes):
                        self._cond.wait()
                    if self._stopped:
                        return
                    self._held += nbytes
                try:
                    result = self._read(job)
                except BaseException as exc:  # noqa: BLE001 - raised in the consumer's thread
                    self._put((job, None, exc, nbytes))
                    return                     # nothing is read after a failed read
                self._put((job, result, None, nbytes))
                del result
        except BaseException as exc:  # noqa: BLE001 - the job iterator failed
            self._put((None, None, exc, 0))
            return
        self._put(None)

    def _put(self, entry: tuple[T, R | None, BaseException | None, int] | None) -> None:
        with self._cond:
            self._ready.append(entry)
            self._cond.notify_all()

    def take(self) -> tuple[T, R, int] | None:
        """The next job's (job, inputs, bytes), None after the last; raises its read's error."""
        with self._cond:
            while not self._ready:
                self._cond.wait()
            entry = self._ready.popleft()
            self._cond.notify_all()        # without a budget the reader waits for this
        if entry is None:
            return None
        job, result, exc, nbytes = entry
        if exc is not None:
            raise exc
        return job, result, nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self._held -= nbytes
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()


def reads_of(plan: MergePlan, job: TensorJob) -> list[int]:
    """Positions of the sources ``read_job`` reads for ``job``."""
    if job.reads:  # a slice's tensor: read from its own inputs only
        return job.participants if not job.merge else job.read_positions()
    if not job.merge:  # the reference's tensor, and the others' copies compared with it
        return [pos for pos, header in enumerate(plan.headers) if job.name in header]
    return job.read_positions()


def announce_reads(plan: MergePlan, jobs: list[TensorJob]) -> None:
    """Tell each source which of its tensors will be read, in order (Hub: shard order,
    prefetch, and --low-disk deletion once a shard's tensors are all released)."""
    per_source: dict[int, list[str]] = {}
    for job in jobs:
        for pos in reads_of(plan, job):
            per_source.setdefault(id(plan.sources[pos]), []).append(job.read_name(pos))
    for source in {id(s): s for s in plan.sources}.values():
        source.plan_reads(per_source.get(id(source), []))
    for source in plan.side.values():
        source.plan_reads([job.name for job in jobs if job.merge and job.name in source.tensors()])


def read_job(plan: MergePlan, job: TensorJob, options: MergeOptions) -> JobInputs:
    """Read one job's inputs in their stored dtype on CPU, each checked finite. Runs in the
    reader thread, so it uses no multi-threaded torch op (those would fight the merge's
    threads for the cores): file reads and ``all_finite``'s numpy scan only."""
    if not job.merge:
        pos = job.participants[0]
        result = JobInputs(plan.sources[pos].read_tensor(job.read_name(pos)), [])
        if not job.reads:
            _warn_if_buffers_differ(plan, job, result.base)
    else:
        base = None
        if job.base is not None:
            base = _read_checked(plan, job.base, job.read_name(job.base), options)
        inputs = [_read_checked(plan, pos, job.read_name(pos), options)
                  for pos in job.participants]
        side = {label: src.read_tensor(job.name) for label, src in plan.side.items()
                if job.name in src.tensors()}
        result = JobInputs(base, inputs, side)
    for pos in reads_of(plan, job):
        plan.sources[pos].release(job.read_name(pos))
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
