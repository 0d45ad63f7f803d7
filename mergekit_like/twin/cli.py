"""`mergekit-like twin …`: commands on Twin bundles (docs/methods/twin.md §6)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

twin_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="Twin-Merging bundles: materialize a task's model.")


@twin_app.command()
def materialize(
    bundle: Path = typer.Argument(..., help="A Twin bundle (the output of a twin merge)."),
    out: Path = typer.Argument(..., help="Output folder (created atomically)."),
    task: Optional[str] = typer.Option(None, "--task", help="Materialize this task's model (one-hot weights)."),
    weights: Optional[str] = typer.Option(None, "--weights",
                                          help="Task weights, e.g. math=0.7,code=0.3 (tasks not named get 0)."),
    out_dtype: Optional[str] = typer.Option(None, "--out-dtype",
                                            help="bfloat16 | float16 | float32 | float64 (default: the bundle's out_dtype)."),
    out_shard_size: str = typer.Option("5GB", help="Max shard size: bytes, 5GB, 500MB, 2GiB, 5B (mergekit)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write OUT = shared + Σ_t w_t · (task t's exclusive part), a standard checkpoint."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    from mergekit_like.console import err_console, warn
    from mergekit_like.errors import MergeError
    from mergekit_like.io.shards import parse_size
    from mergekit_like.twin import materialize as mat
    from mergekit_like.twin.bundle import TwinBundle

    shard_bytes = parse_size(out_shard_size)
    if (task is None) == (weights is None):
        raise MergeError(f"give exactly one of --task NAME or {mat.WEIGHTS_SYNTAX}")
    if weights is not None:
        mat.parse_weights(weights)  # syntax errors before the bundle is opened
    if out.exists() and not overwrite:  # checked again under the lock; this fails fast
        raise MergeError(f"output folder exists: {out} (pass --overwrite to replace it)")
    with TwinBundle(bundle) as tb:
        w = mat.task_weights(tb, task=task, weights=weights)
        warn(mat.weight_warnings(w))
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                      disable=quiet, transient=False) as bar:
            bar_task = bar.add_task("planning", total=None)

            def on_tensor(name: str, nbytes: int) -> None:
                bar.update(bar_task, advance=nbytes, description=name[-48:])

            def start(total: int) -> None:
                bar.update(bar_task, total=total, description="materializing")

            result = mat.materialize(tb, out, w, out_dtype=out_dtype, shard_bytes=shard_bytes,
                                     overwrite=overwrite, progress=on_tensor, on_start=start)
            bar.update(bar_task, description="done")
    warn(result.warnings)
    err_console.print(f"wrote {out} ({len(result.shards)} shard(s); weights "
                      f"{mat.weights_text(result.weights)})")
