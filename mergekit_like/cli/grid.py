"""`mergekit-like grid`: every point of a parameter grid, reading the inputs once per pass."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mergekit_like.cli.merge import hub_settings
from mergekit_like.console import err_console, out_console
from mergekit_like.errors import MergeError


def grid(
    grid_file: Path = typer.Argument(..., help="Grid file: a recipe plus grid:/zip:/exclude:/label: keys."),
    out_root: Path = typer.Argument(..., help="Folder for every point's output and the results."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted grid (complete points are skipped)."),
    force: bool = typer.Option(False, "--force", help="Recompute every point."),
    skip_failed: bool = typer.Option(False, "--skip-failed", help="With --resume: leave failed points alone."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failed point."),
    strict: bool = typer.Option(False, "--strict", help="An invalid point stops the grid before anything runs."),
    pass_size: int = typer.Option(16, help="Most points sharing one read pass (1: no sharing)."),
    shard: Optional[str] = typer.Option(None, help="Run slice i of n (zero-based), e.g. 2/4."),
    eval_cmd: Optional[str] = typer.Option(None, "--eval", help="Command per point, {out} {id} {label} substituted; its last line is the metric."),
    eval_key: Optional[str] = typer.Option(None, help="The metric's field when --eval prints JSON."),
    eval_timeout: Optional[float] = typer.Option(None, help="Seconds before an --eval run counts as failed."),
    eval_goal: Optional[str] = typer.Option(None, help="min | max (default: min for --eval-ppl, max for --eval)."),
    eval_ppl: Optional[Path] = typer.Option(None, "--eval-ppl", help="Perplexity of each point on this text file (needs transformers)."),
    eval_ctx: Optional[int] = typer.Option(None, help="--eval-ppl window (default min(1024, max positions))."),
    eval_max_tokens: int = typer.Option(65536, help="--eval-ppl token budget."),
    report_only: bool = typer.Option(False, "--report-only", help="Rebuild the table and CSV from the results files."),
    break_lock: bool = typer.Option(False, "--break-lock", help="Take a lock left by another host."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the points and passes; write nothing."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    out_shard_size: str = typer.Option("5GB", help="Max output shard size."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite"),
    seed: Optional[int] = typer.Option(None, help="Seed for random operators (overrides the grid file)."),
    endpoint: Optional[str] = typer.Option(None, help="Hub endpoint."),
    cache_dir: Optional[Path] = typer.Option(None, help="Hub cache."),
    offline: bool = typer.Option(False, "--offline", help="Hub models from the local cache only."),
    executor: str = typer.Option("local", help="Where passes run: local (this process) | ray | slurm (via submitit)."),
    address: Optional[str] = typer.Option(None, help="--executor ray: a running cluster (auto, ray://host:10001); default: start a local Ray."),
    cpus_per_job: int = typer.Option(1, help="ray/slurm: CPUs per pass."),
    gpus_per_job: int = typer.Option(0, help="ray/slurm: GPUs per pass."),
    partition: Optional[str] = typer.Option(None, help="--executor slurm: the partition."),
    time_min: int = typer.Option(60, help="--executor slurm: time limit per array task, minutes."),
    slurm_log_dir: Optional[Path] = typer.Option(None, help="--executor slurm: submitit's folder (default OUT_ROOT/.slurm)."),
    slurm_cluster: str = typer.Option("slurm", help="--executor slurm: slurm | local (the array as local processes) | debug."),
    tasks: Optional[list[Path]] = typer.Option(None, "--tasks", help="--eval lm-eval: a local lm-eval task file (YAML); repeatable."),
    lm_eval_limit: Optional[int] = typer.Option(None, help="--eval lm-eval: at most this many documents per task."),
    lm_eval_batch_size: int = typer.Option(8, help="--eval lm-eval: batch size."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress view on stderr."),
) -> None:
    """Merge every point of GRID_FILE into OUT_ROOT/<id>/, reading the inputs once per pass of
    points that share them; results.jsonl/.csv and a table at the end. Exit 3 if a point failed."""
    from mergekit_like.device import resolve_device
    from mergekit_like.engine import MergeOptions
    from mergekit_like.grid.command import EvalOptions, grid_main, make_executor, parse_shard
    from mergekit_like.grid.run import GridOptions
    from mergekit_like.io.shards import parse_size
    from mergekit_like.engine.sources import source_opener

    if eval_goal not in (None, "min", "max"):
        raise MergeError(f"--eval-goal {eval_goal!r}: expected min or max")
    if eval_cmd is not None and eval_ppl is not None:
        raise MergeError("--eval and --eval-ppl are exclusive; pick one")
    runner = make_executor(executor, out_root, address=address, cpus_per_job=cpus_per_job,
                           gpus_per_job=gpus_per_job, partition=partition, time_min=time_min,
                           slurm_log_dir=slurm_log_dir, slurm_cluster=slurm_cluster)
    remote = runner.name != "local"
    options = GridOptions(resume=resume, force=force, skip_failed=skip_failed, fail_fast=fail_fast,
                          pass_size=pass_size, shard=parse_shard(shard), break_lock=break_lock,
                          worker_device=device if remote else None)
    # a remote pass resolves --device on its worker (the driver may have no GPU)
    merge_options = MergeOptions(device=resolve_device("cpu" if remote else device),
                                 out_shard_bytes=parse_size(out_shard_size),
                                 allow_nonfinite=allow_nonfinite)
    hub = hub_settings(endpoint, cache_dir, offline)
    evals = EvalOptions(command=eval_cmd, key=eval_key, timeout=eval_timeout, goal=eval_goal,
                        ppl_file=eval_ppl, ctx=eval_ctx, max_tokens=eval_max_tokens,
                        task_files=list(tasks or []), lm_limit=lm_eval_limit,
                        lm_batch_size=lm_eval_batch_size)
    code = grid_main(grid_file, out_root, merge_options,
                     source_opener(allow_pickle=allow_pickle, hub=hub), options, evals,
                     seed=seed, strict=strict, dry_run=dry_run, report_only=report_only,
                     out=out_console, err=err_console, executor=runner, quiet=quiet)
    if code:
        raise typer.Exit(code)
