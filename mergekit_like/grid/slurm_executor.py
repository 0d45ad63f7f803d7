"""``--executor slurm`` (docs/grid.md §8): the passes as one Slurm job array through submitit
(``AutoExecutor.map_array``), one array task per read pass. The driver waits, gathers each task's
outcomes and alone appends the results lines; re-running the same command resumes (finished
points are skipped whatever made them). submitit keeps its pickles and logs in
``--slurm-log-dir`` (default OUT_ROOT/.slurm). ``--slurm-cluster local`` runs the same array as
local processes (submitit's LocalExecutor: a machine without Slurm, and the tests). submitit is
an optional extra, imported here only when this executor is used."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

from mergekit_like.errors import MergeError
from mergekit_like.grid.executors import (OnDone, OnStart, PassJob, execute_pass,
                                          lost_outcomes, one_line)

EXTRA_HINT = "pip install 'mergekit_like[slurm]'"
CLUSTERS = ("slurm", "local", "debug")


def import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise MergeError(f"--executor slurm needs submitit: {EXTRA_HINT}") from None
    return submitit


class SlurmExecutor:
    """Passes as a submitit job array. Memory per task: the largest pass's estimate (one array
    has one set of parameters), rounded up to whole GB."""

    name = "slurm"

    def __init__(self, log_dir: Path, *, partition: str | None = None, gpus_per_job: int = 0,
                 cpus_per_job: int = 1, time_min: int = 60, cluster: str = "slurm",
                 poll_s: float | None = None):
        self.log_dir = Path(log_dir)
        self.partition = partition
        self.gpus_per_job = gpus_per_job
        self.cpus_per_job = cpus_per_job
        self.time_min = time_min
        self.cluster = cluster
        self.poll_s = poll_s if poll_s is not None else (0.2 if cluster != "slurm" else 5.0)

    def check(self) -> None:
        import_submitit()
        if self.cluster not in CLUSTERS:
            raise MergeError(f"--slurm-cluster {self.cluster!r}: expected one of "
                             f"{', '.join(CLUSTERS)}")
        if self.cluster == "slurm" and shutil.which("sbatch") is None:
            raise MergeError("--executor slurm: no sbatch on PATH (not a Slurm login node); "
                             "--slurm-cluster local runs the array as local processes")
        for flag, value in (("--cpus-per-job", self.cpus_per_job),
                            ("--gpus-per-job", self.gpus_per_job), ("--time-min", self.time_min)):
            if value < (1 if flag != "--gpus-per-job" else 0):
                raise MergeError(f"{flag} {value}: too small")

    def run(self, jobs: list[PassJob], on_start: OnStart, on_done: OnDone) -> None:
        if not jobs:
            return
        submitit = import_submitit()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        executor = submitit.AutoExecutor(folder=self.log_dir, cluster=self.cluster)
        params: dict[str, Any] = {
            "name": "mergekit-like-grid", "timeout_min": self.time_min,
            "cpus_per_task": self.cpus_per_job, "gpus_per_node": self.gpus_per_job,
            "mem_gb": max(1, math.ceil(max(j.memory_bytes for j in jobs) / 1e9))}
        if self.partition:
            params["slurm_partition"] = self.partition
        executor.update_parameters(**params)
        try:
            array = executor.map_array(execute_pass, [j.portable() for j in jobs])
        except Exception as exc:  # noqa: BLE001 - sbatch refused, a bad partition...
            raise MergeError(f"--executor slurm: submitting the job array failed: "
                             f"{one_line(exc)[:300]}") from None
        if self.cluster != "slurm":
            for sjob in array:  # local files: no network-filesystem lag to wait out for a
                if hasattr(sjob, "_results_timeout_s"):  # dead task's missing result (15 s)
                    sjob._results_timeout_s = 1
        for job in jobs:
            on_start(job)
        self._gather(list(zip(array, jobs)), on_done)

    def _gather(self, pairs: list[tuple[Any, PassJob]], on_done: OnDone) -> None:
        """Poll until every array task ends; a task that failed or died fails its points.
        When ``on_done`` says stop (or on Ctrl-C) the unfinished tasks are cancelled."""
        pending = list(pairs)
        try:
            while pending:
                finished = [(s, j) for s, j in pending if s.done()]
                if not finished:
                    time.sleep(self.poll_s)
                    continue
                pending = [pair for pair in pending if pair not in finished]
                for sjob, job in finished:
                    try:
                        outcomes = sjob.result()
                    except Exception as exc:  # noqa: BLE001 - the task died or raised
                        outcomes = lost_outcomes(job, _task_failure(sjob, job, exc))
                    if not on_done(job, outcomes):
                        _cancel(pending)
                        return
        except BaseException:
            _cancel(pending)
            raise

    def close(self) -> None:
        return None


def _task_failure(sjob: Any, job: PassJob, exc: BaseException) -> str:
    """One line naming the array task, the pass and submitit's first line about it."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = (lines or [type(exc).__name__])[0][:300]
    return (f"the Slurm task {getattr(sjob, 'job_id', '?')} of pass {job.number} ended without "
            f"a result ({type(exc).__name__}: {first})")


def _cancel(pairs: list[tuple[Any, PassJob]]) -> None:
    for sjob, _ in pairs:
        try:
            sjob.cancel(check=False)
        except Exception:  # noqa: BLE001 - already finished or gone
            pass
