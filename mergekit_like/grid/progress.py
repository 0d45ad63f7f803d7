"""The grid's live progress view (docs/grid.md §8): one rich progress bar on stderr counting the
points done, running (handed to a worker, which may still queue them) and failed, across every
worker of the executor. Shown only on a terminal and never with ``--quiet``; without a console
every call is a no-op."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class GridProgress:
    """Counts per point; the driver calls ``begin`` once, ``started`` per job handed out,
    ``finished`` per pass's rows and ``end`` at the end (also after an error)."""

    def __init__(self, console: Console | None, executor: str = "local"):
        self.console = console
        self.executor = executor
        self.total = self.done = self.running = self.failed = self.skipped = 0
        self._bar: Progress | None = None
        self._task: Any = None

    def begin(self, total: int, skipped: int = 0) -> None:
        self.total, self.skipped = total, skipped
        if self.console is None:
            return
        self._bar = Progress(TextColumn("[bold]grid[/bold] ({task.fields[executor]})"),
                             BarColumn(), TextColumn("{task.completed}/{task.total} points"),
                             TextColumn("{task.fields[counts]}"), TimeElapsedColumn(),
                             console=self.console, transient=False)
        self._task = self._bar.add_task("grid", total=max(total, 1), executor=self.executor,
                                        counts=self.counts())
        self._bar.start()
        self._refresh()

    def started(self, job: Any) -> None:
        self.running += len(job.points)
        self._refresh()

    def finished(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.running = max(0, self.running - 1)
            if row["status"] == "failed":
                self.failed += 1
            elif row["status"] == "skipped":
                self.skipped += 1
            else:
                self.done += 1
        self._refresh()

    def counts(self) -> str:
        return (f"done {self.done} · running {self.running} · failed {self.failed}"
                + (f" · skipped {self.skipped}" if self.skipped else ""))

    def end(self) -> None:
        if self._bar is not None:
            self._refresh()
            self._bar.stop()
            self._bar = None

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done + self.failed + self.skipped,
                             counts=self.counts(), refresh=True)
