"""read: each job's inputs from the sources, in the plan's order, checked finite; the next job's
read runs in a background thread while the current one is merged (``read_ahead``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
    """Yield (job, read(job)) while the next job's read runs in a background thread.

    At most two jobs' inputs exist at once (the one yielded and the one being read; the
    consumer drops its reference before asking for the next). When the two together exceed
    ``budget`` bytes (``size(job)``), the next read waits until the consumer is done with the
    current job: huge tensors (embeddings) are not overlapped, which keeps peak memory at about
    one such tensor's inputs."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergekit-like-read") as pool:
        current = next(jobs, None)
        future = pool.submit(read, current) if current is not None else None
        while current is not None:
            result = future.result()
            nxt = next(jobs, None)
            overlap = nxt is not None and not (
                size and budget and size(current) + size(nxt) > budget)
            future = pool.submit(read, nxt) if overlap else None
            yield current, result
            del result
            if nxt is not None and future is None:
                future = pool.submit(read, nxt)
            current = nxt


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
