"""Grid results (docs/grid.md §5): an append-only, fsynced ``results.jsonl`` (one line per finished
attempt; ``results.<i>-of-<n>.jsonl`` per slice) and ``results.csv`` rebuilt from the latest
line per point."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def results_name(shard: tuple[int, int] | None) -> str:
    return "results.jsonl" if shard is None else f"results.{shard[0]}-of-{shard[1]}.jsonl"


class ResultLog:
    """The results file of this run (or slice); earlier lines are read for resume."""

    def __init__(self, root: Path, shard: tuple[int, int] | None = None):
        self.root = Path(root)
        self.shard = shard
        self.path = self.root / results_name(shard)
        self.previous = read_results(self.root)

    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append one line with a single write, then flush and fsync; returns the row."""
        if self.shard is not None:
            row = {**row, "shard": f"{self.shard[0]}/{self.shard[1]}"}
        line = json.dumps(row, sort_keys=False, default=str, allow_nan=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self.previous.append(row)
        return row

    def failed_ids(self) -> set[str]:
        return set(latest(self.previous, "failed"))

    def last_ok(self, pid: str) -> dict[str, Any] | None:
        for row in reversed(self.previous):
            if row.get("id") == pid and row.get("status") == "ok":
                return row
        return None


def read_results(root: Path) -> list[dict[str, Any]]:
    """Every line of every results*.jsonl in ``root`` (a torn last line is skipped)."""
    rows: list[dict[str, Any]] = []
    for path in sorted(Path(root).glob("results*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "id" in row:
                rows.append(row)
    return rows


def latest(rows: list[dict[str, Any]], status: str | None = None) -> dict[str, dict[str, Any]]:
    """The last line per id (optionally only ids whose last line has ``status``)."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        last[row["id"]] = row
    return {k: v for k, v in last.items() if status is None or v.get("status") == status}


CSV_FIELDS = ["id", "label", "status", "metric", "wall_s", "peak_rss_mb", "peak_gpu_mb", "pass",
              "pass_wall_s", "eval_error", "error", "started_at", "finished_at", "tool_version",
              "shard", "host"]


def csv_text(rows: list[dict[str, Any]], varied: list[str]) -> str:
    """One CSV row per point (the latest line per id), varied paths as full dotted columns."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "label", *varied, *CSV_FIELDS[2:]])
    for row in rows:
        values = row.get("values") or {}
        writer.writerow([row.get("id"), row.get("label"),
                         *[json.dumps(values.get(p)) if isinstance(values.get(p), (list, dict))
                           else values.get(p) for p in varied],
                         *[row.get(f) for f in CSV_FIELDS[2:]]])
    return out.getvalue()


def parse_metric(stdout: str, key: str | None) -> tuple[float | None, dict[str, float] | None, str | None]:
    """docs/grid.md §6: the last non-empty stdout line is a number (the metric) or a JSON object
    (its numeric fields; the metric is ``key`` or the first numeric field). Returns
    (metric, eval fields, error)."""
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        return None, None, "the evaluation printed nothing"
    last = lines[-1]
    try:
        value = float(last)
        return value, {"metric": value}, None
    except ValueError:
        pass
    try:
        obj = json.loads(last)
    except ValueError:
        return None, None, f"the evaluation's last line is not a number or a JSON object: {last[:80]!r}"
    if not isinstance(obj, dict):
        return None, None, f"the evaluation's last line is not a number or a JSON object: {last[:80]!r}"
    numbers = {k: float(v) for k, v in obj.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not numbers:
        return None, None, "the evaluation's JSON has no numeric field"
    if key is not None:
        if key not in numbers:
            return None, numbers, f"the evaluation's JSON has no numeric field '{key}'"
        return numbers[key], numbers, None
    return next(iter(numbers.values())), numbers, None
