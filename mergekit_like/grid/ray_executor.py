"""``--executor ray`` (docs/grid.md §8): each read pass is one Ray task with declared resources
(``--cpus-per-job``, ``--gpus-per-job`` and the pass's memory estimate from
``MergePlan.peak_memory_estimate``). Workers write the points' folders on the shared filesystem
with the engine's atomic per-point folders; the driver gathers each task's outcomes and alone
appends the results lines. A task whose worker dies fails its points with the reason; the other
tasks go on (no retry: ``--resume`` reruns what failed). ray is an optional extra, imported here
only when this executor is used."""

from __future__ import annotations

import os
from typing import Any

from mergekit_like.errors import MergeError
from mergekit_like.grid.executors import (OnDone, OnStart, PassJob, execute_pass,
                                          lost_outcomes, one_line)

EXTRA_HINT = "pip install 'mergekit_like[ray]'"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MergeError(f"--executor ray needs ray: {EXTRA_HINT}") from None
    return ray


class RayExecutor:
    """Passes as Ray tasks. ``address``: a running cluster ("auto", "ray://host:10001", ...);
    None starts a local one (loopback only, no dashboard, no usage report), or reuses the Ray
    this process already initialised."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_job: float = 1.0,
                 gpus_per_job: float = 0.0):
        self.address = address
        self.cpus_per_job = cpus_per_job
        self.gpus_per_job = gpus_per_job
        self._ray: Any = None
        self._started = False

    def check(self) -> None:
        """Connect (or start Ray) and check that some node can hold one task's CPUs and GPUs."""
        ray = import_ray()
        if not ray.is_initialized():
            try:
                if self.address:
                    ray.init(address=self.address, include_dashboard=False)
                else:
                    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = self.address or "a local Ray instance"
                raise MergeError(f"--executor ray: cannot connect to {where}: "
                                 f"{one_line(exc)[:200]}") from None
            self._started = True
        self._ray = ray
        nodes = _alive_nodes(ray)
        for key, want, flag in (("CPU", self.cpus_per_job, "--cpus-per-job"),
                                ("GPU", self.gpus_per_job, "--gpus-per-job")):
            have = max((n.get(key, 0.0) for n in nodes), default=0.0)
            if want > have:
                raise MergeError(f"{flag} {want:g}: no Ray node has that many {key}s "
                                 f"(the largest has {have:g})")

    def run(self, jobs: list[PassJob], on_start: OnStart, on_done: OnDone) -> None:
        ray = self._ray
        if ray is None:
            self.check()
            ray = self._ray
        remote = ray.remote(execute_pass)
        most_memory = max((n.get("memory", 0.0) for n in _alive_nodes(ray)), default=0.0)
        refs: dict[Any, PassJob] = {}
        for job in jobs:
            if most_memory and job.memory_bytes > most_memory:
                reason = (f"pass {job.number} needs about {job.memory_bytes / 1e9:.2f} GB of "
                          f"memory; the largest Ray node offers {most_memory / 1e9:.2f} GB")
                if not on_done(job, lost_outcomes(job, reason)):
                    return
                continue
            ref = remote.options(num_cpus=self.cpus_per_job, num_gpus=self.gpus_per_job,
                                 memory=job.memory_bytes, max_retries=0,
                                 name=f"mergekit-like grid pass {job.number}"
                                 ).remote(job.portable())
            refs[ref] = job
            on_start(job)
        self._gather(ray, refs, on_done)

    def _gather(self, ray: Any, refs: dict[Any, PassJob], on_done: OnDone) -> None:
        """Outcomes in completion order; a failed task's points fail with its reason. When
        ``on_done`` says stop (or on Ctrl-C), the unfinished tasks are cancelled."""
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    job = refs[ref]
                    try:
                        outcomes = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a lost worker, a cancelled task
                        outcomes = lost_outcomes(job, _task_failure(job, exc))
                    if not on_done(job, outcomes):
                        _cancel(ray, pending)
                        pending = []
                        break
        except BaseException:
            _cancel(ray, pending)
            raise

    def close(self) -> None:
        if self._started and self._ray is not None:
            self._ray.shutdown()
        self._started = False


def _alive_nodes(ray: Any) -> list[dict[str, float]]:
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def _task_failure(job: PassJob, exc: BaseException) -> str:
    """One line: which pass, what Ray said (its first line; a task error's cause when it has
    one)."""
    cause = getattr(exc, "cause", None)
    shown = cause if isinstance(cause, BaseException) else exc
    first = (str(shown).strip().splitlines() or [""])[0][:300]
    kind = type(shown).__name__
    if "WorkerCrashed" in kind or "died" in first.lower():
        return f"the Ray worker died during pass {job.number} ({kind}: {first})"
    return f"Ray task of pass {job.number} failed ({kind}: {first})"


def _cancel(ray: Any, refs: list[Any]) -> None:
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - already finished or gone
            pass
