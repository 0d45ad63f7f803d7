"""`mergekit-like grid`: the command's flow (load → lock → run passes → evaluate → report)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mergekit_like.engine import MergeOptions
from mergekit_like.errors import MergeError
from mergekit_like.grid import lm_eval
from mergekit_like.grid.evaluate import check_ppl_extra, perplexity_of, run_eval_command
from mergekit_like.grid.executors import Executor, SequentialExecutor
from mergekit_like.grid.expand import Grid, load_grid, short_keys
from mergekit_like.grid.locks import acquire_lock
from mergekit_like.grid.progress import GridProgress
from mergekit_like.grid.results import (ResultLog, atomic_write, csv_text, latest, read_results)
from mergekit_like.grid.run import (GridOptions, SharedSources, group_passes, plan_points,
                                    run_grid, select_shard)
from mergekit_like.io.fs import check_output_apart
from mergekit_like.engine.plan import SourceOpener

EXIT_POINT_FAILED = 3


@dataclass
class EvalOptions:
    command: str | None = None
    key: str | None = None
    timeout: float | None = None
    goal: str | None = None            # "min" | "max"; default per kind
    ppl_file: Path | None = None
    ctx: int | None = None
    max_tokens: int = 65536
    task_files: list[Path] | None = None      # --eval lm-eval --tasks
    lm_limit: int | None = None
    lm_batch_size: int = 8
    lm_tasks: lm_eval.LmEvalTasks | None = None  # the task files, read before anything runs

    @property
    def lm(self) -> bool:
        return self.command == lm_eval.BUILTIN


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise MergeError(f"--shard {text!r}: expected i/n, e.g. 2/4") from None
    if n < 1 or not 0 <= i < n:
        raise MergeError(f"--shard {text!r}: need 0 ≤ i < n")
    return i, n


EXECUTORS = ("local", "ray", "slurm")


def make_executor(name: str, root: Path, *, address: str | None = None, cpus_per_job: int = 1,
                  gpus_per_job: int = 0, partition: str | None = None, time_min: int = 60,
                  slurm_log_dir: Path | None = None, slurm_cluster: str = "slurm") -> Executor:
    """The executor ``--executor NAME`` selects (its extra is checked later, by ``check``)."""
    if name not in EXECUTORS:
        raise MergeError(f"--executor {name!r}: expected one of {', '.join(EXECUTORS)}")
    if address is not None and name != "ray":
        raise MergeError("--address is for --executor ray")
    if (partition is not None or slurm_log_dir is not None) and name != "slurm":
        raise MergeError("--partition and --slurm-log-dir are for --executor slurm")
    if cpus_per_job < 1 or gpus_per_job < 0:
        raise MergeError("--cpus-per-job must be ≥ 1 and --gpus-per-job ≥ 0")
    if name == "ray":
        from mergekit_like.grid.ray_executor import RayExecutor
        return RayExecutor(address, cpus_per_job, gpus_per_job)
    if name == "slurm":
        from mergekit_like.grid.slurm_executor import SlurmExecutor
        return SlurmExecutor(slurm_log_dir or root / ".slurm", partition=partition,
                             gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job,
                             time_min=time_min, cluster=slurm_cluster)
    return SequentialExecutor()


def holds_grid(root: Path) -> bool:
    return (root / "points.json").exists() or any(root.glob("results*.jsonl"))


def grid_main(grid_path: Path, root: Path, merge_options: MergeOptions, opener: SourceOpener,
              options: GridOptions, evals: EvalOptions, *, seed: int | None, strict: bool,
              dry_run: bool, report_only: bool, out: Console, err: Console,
              executor: Executor | None = None, quiet: bool = False) -> int:
    if report_only:
        grid = load_grid(grid_path, seed=seed, strict=False)
        _check_root_apart(grid, root, evals)
        rows = list(latest(read_results(root)).values())
        _report(root, grid, rows, evals, out)
        return EXIT_POINT_FAILED if _any_failed(rows) else 0
    if evals.ppl_file is not None:
        check_ppl_extra()
        if not evals.ppl_file.is_file():
            raise MergeError(f"--eval-ppl {evals.ppl_file}: no such file")
    _check_lm_eval(evals)
    executor = executor or SequentialExecutor()
    grid = load_grid(grid_path, seed=seed, strict=strict)
    _check_root_apart(grid, root, evals)
    for w in dict.fromkeys([*grid.warnings, *(w for p in grid.points for w in p.recipe.warnings)]):
        err.print(f"[yellow]warning:[/yellow] {w}", markup=True)
    if dry_run:
        _print_expansion(grid, opener, options, out)
        return 0
    if root.exists() and holds_grid(root) and not (options.resume or options.force):
        raise MergeError(f"{root} already holds a grid: pass --resume to finish it or --force "
                         "to redo every point")
    executor.check()
    try:
        return _run_locked(grid, root, merge_options, opener, options, evals, executor,
                           out, err, quiet)
    finally:
        executor.close()


def _run_locked(grid: Grid, root: Path, merge_options: MergeOptions, opener: SourceOpener,
                options: GridOptions, evals: EvalOptions, executor: Executor, out: Console,
                err: Console, quiet: bool) -> int:
    """Take the lock, run the grid on ``executor``, evaluate, report; the lock goes at the end."""
    root.mkdir(parents=True, exist_ok=True)
    lock, warnings = acquire_lock(root, options.shard, options.break_lock)
    for w in warnings:
        err.print(f"[yellow]warning:[/yellow] {w}", markup=True)
    try:
        atomic_write(root / "grid.yml", grid.text)
        log = ResultLog(root, options.shard)
        for ip in grid.invalid_points:
            err.print(f"point {ip.label} is invalid: {ip.message}", markup=False)

        def evaluate(rows: list[dict[str, Any]]) -> None:
            _evaluate(root, [r for r in rows if r["status"] == "ok"], evals, log, err,
                      merge_options)

        progress = GridProgress(err if err.is_terminal and not quiet else None, executor.name)
        run = run_grid(grid, root, merge_options, opener, options, log, on_pass=evaluate,
                       executor=executor, progress=progress)
        for w in run.warnings[len(grid.warnings):]:
            err.print(f"[yellow]warning:[/yellow] {w}", markup=True)
        pending = [r for r in run.rows if r["status"] == "skipped" and r.get("metric") is None]
        evaluate([{**r, "status": "ok"} for r in pending])
        ran = {r["id"] for r in run.rows}             # this run's (or slice's) points
        rows = [r for r in latest(read_results(root)).values() if r["id"] in ran]
        _report(root, grid, rows, evals, out)
        return EXIT_POINT_FAILED if _any_failed(rows) else 0
    finally:
        lock.unlink(missing_ok=True)


def _check_lm_eval(evals: EvalOptions) -> None:
    """--eval lm-eval: the extra installed and the task files read, before anything runs."""
    if evals.task_files and not evals.lm:
        raise MergeError(f"--tasks is for --eval {lm_eval.BUILTIN}")
    if evals.lm:
        lm_eval.check_lm_eval_extra()
        evals.lm_tasks = lm_eval.load_task_files(list(evals.task_files or []))


def _check_root_apart(grid: Grid, root: Path, evals: EvalOptions) -> None:
    """OUT_ROOT is not, does not hold and does not lie inside the grid file, a local model of
    any point or the --eval-ppl text (each point's own folder is checked again when opened)."""
    inputs = [("grid file", grid.path)]
    if evals.ppl_file is not None:
        inputs.append(("--eval-ppl file", evals.ppl_file))
    inputs += [("--tasks file", Path(t)) for t in evals.task_files or []]
    for point in grid.points:
        inputs += [(f"model {ref.display}", Path(ref.path))
                   for ref in point.recipe.all_refs() if ref.is_local]
    check_output_apart(root, list(dict.fromkeys(inputs)))


def _any_failed(rows: list[dict[str, Any]]) -> bool:
    return any(r.get("status") == "failed" or r.get("eval_error") for r in rows)


def _evaluate(root: Path, rows: list[dict[str, Any]], evals: EvalOptions, log: ResultLog,
              err: Console, merge_options: MergeOptions) -> None:
    if evals.command is None and evals.ppl_file is None:
        return
    device = "cpu" if merge_options.device.type == "cpu" else str(merge_options.device)
    for row in rows:
        folder = root / row["id"]
        if evals.lm and evals.lm_tasks is not None:
            res = lm_eval.lm_eval_of(folder, evals.lm_tasks, device=device,
                                     batch_size=evals.lm_batch_size, limit=evals.lm_limit,
                                     key=evals.key)
        elif evals.command is not None:
            res = run_eval_command(evals.command, folder, row["id"], row["label"], cwd=root,
                                   key=evals.key, timeout=evals.timeout)
        else:
            res = perplexity_of(folder, evals.ppl_file, ctx=evals.ctx,
                                max_tokens=evals.max_tokens, device=device)
        if res.error:
            err.print(f"eval of {row['label']}: {res.error}", markup=False)
        log.record({**row, "metric": res.metric, "eval": res.fields, "eval_error": res.error,
                    **(res.extra or {})})


def _goal(evals: EvalOptions) -> str:
    return evals.goal or ("min" if evals.ppl_file is not None else "max")


def _report(root: Path, grid: Grid, rows: list[dict[str, Any]], evals: EvalOptions,
            out: Console) -> None:
    """results.csv (atomically), the rich table (best metric first and in bold), one line per
    failed point with its reason, and the summary counts."""
    order = {p.id: k for k, p in enumerate([*grid.points, *grid.invalid_points])}
    rows = sorted(rows, key=lambda r: order.get(r["id"], len(order)))
    metrics = [r["metric"] for r in rows if isinstance(r.get("metric"), (int, float))
               and math.isfinite(r["metric"])]
    if metrics:
        sign = 1 if _goal(evals) == "min" else -1
        rows.sort(key=lambda r: (r.get("metric") is None, sign * (r.get("metric") or 0)))
    best = (min(metrics) if _goal(evals) == "min" else max(metrics)) if metrics else None
    atomic_write(root / "results.csv", csv_text(rows, grid.varied))
    keys = short_keys(grid.varied)
    table = Table(title=f"grid {grid.path.name} → {root}")
    for col in ["id", "label", *[keys[p] for p in grid.varied], "status", "wall s", "peak MB",
                "metric"]:
        table.add_column(col)
    for r in rows:
        values = r.get("values") or {}
        metric = r.get("metric")
        shown = "" if metric is None else f"{metric:.6g}"
        if best is not None and metric == best:
            shown = f"[bold]{shown}[/bold]"
        table.add_row(r["id"], r.get("label", ""), *[json.dumps(values.get(p)) for p in grid.varied],
                      r["status"] + (" (eval failed)" if r.get("eval_error") else ""),
                      "" if r.get("wall_s") is None else f"{r['wall_s']:.2f}",
                      "" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}", shown)
    out.print(table)
    for r in rows:  # the reasons, one line each (a table cell would wrap them)
        if r["status"] == "failed":
            reason = r.get("error") or "no reason recorded"
            out.print(f"failed {r.get('label', '')} ({r['id']}): {reason}", markup=False,
                      highlight=False)
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "failed", "skipped")}
    out.print(f"{len(rows)} points: {counts['ok']} ok, {counts['failed']} failed, "
              f"{counts['skipped']} skipped")


def _print_expansion(grid: Grid, opener: SourceOpener, options: GridOptions, out: Console) -> None:
    sources = SharedSources(opener)
    try:
        planned = plan_points(grid, sources)
        valid = [p for p in planned if p.error is None]
        passes = select_shard(group_passes(valid, options.pass_size), options.shard)
        pass_of = {p.id: k for k, group in enumerate(passes, 1) for p in group}
        table = Table(title=f"grid {grid.path.name} (dry run, nothing written)")
        for col in ("id", "label", "pass", "status"):
            table.add_column(col)
        for p in planned:
            table.add_row(p.id, p.point.label, str(pass_of.get(p.id, "-")),
                          "invalid: " + p.error if p.error else "ok")
        for ip in grid.invalid_points:
            table.add_row(ip.id, ip.label, "-", "invalid: " + ip.message)
        out.print(table)
        est = max((p.plan.peak_memory_estimate(1 << 22) for p in valid), default=0)
        total = len(planned) + len(grid.invalid_points)
        out.print(f"{total} points in {len(passes)} pass(es); peak memory estimate "
                  f"{est / 1e9 + 0.35:.2f} GB (one merge's peak; points of a pass share it)")
    finally:
        sources.close()
