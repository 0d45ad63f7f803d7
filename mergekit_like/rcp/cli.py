"""`mergekit-like importance …`: the gradient passes of RCP-Merging (docs/methods/rcp.md §3)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

importance_app = typer.Typer(add_completion=False, no_args_is_help=True,
                             help="Importance maps from calibration data (RCP-Merging).")

DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.")
MODEL_DTYPE = typer.Option("auto", "--model-dtype",
                      help="Weights' dtype during the pass: auto (stored dtype on CUDA, float32 on CPU) | bfloat16 | float16 | float32.")
TEXT_FIELD = typer.Option("text", "--text-field", help="JSON key holding each text.")
NO_CKPT = typer.Option(False, "--no-checkpointing", help="Keep activations (faster, more memory).")
SHARD = typer.Option("5GB", "--out-shard-size", help="Max shard size of the output folder.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace existing output folders.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")


def progress_bar(quiet: bool, what: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mergekit_like.console import err_console

    bar = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=err_console, disable=quiet)
    task = bar.add_task(what, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def run_pass(what: str, quiet: bool, out: Path, dtype: str, call) -> None:
    """``call(out_dtype, progress)`` under a progress bar (``--dtype`` parsed first, so a bad
    one is refused before any model loads), then "wrote OUT"."""
    from mergekit_like.console import err_console
    from mergekit_like.runtime.calibration import parse_dtype

    out_dtype = parse_dtype(dtype, "--dtype")
    bar, progress = progress_bar(quiet, what)
    with bar:
        call(out_dtype, progress)
    err_console.print(f"wrote {out}")


@importance_app.command()
def fisher(
    model: Path = typer.Option(..., "--model", help="The reasoning model (local folder)."),
    data: Path = typer.Option(..., "--data", help="Reasoning texts, JSON Lines ({\"text\": …} or {\"input_ids\": […]})."),
    out: Path = typer.Option(..., "--out", help="Output folder (written atomically)."),
    kind: str = typer.Option("grad_x_weight_sq", "--kind", help="grad_x_weight_sq (the official code's) | grad_sq (diagonal Fisher)."),
    max_length: int = typer.Option(2048, "--max-length", help="Tokens kept per text."),
    dtype: str = typer.Option("float32", "--dtype", help="Stored dtype of F: float32 | bfloat16."),
    text_field: str = TEXT_FIELD, device: str = DEVICE, model_dtype: str = MODEL_DTYPE,
    no_checkpointing: bool = NO_CKPT, out_shard_size: str = SHARD,
    overwrite: bool = OVERWRITE, quiet: bool = QUIET,
) -> None:
    """F_j = mean over texts of (g·θ)² (or g²): the reasoning prior."""
    from mergekit_like.rcp.importance import PassSettings, fisher_pass

    settings = PassSettings(max_length, text_field, device, model_dtype, not no_checkpointing,
                            out_shard_size, overwrite)
    run_pass("fisher", quiet, out, dtype, lambda out_dtype, progress: fisher_pass(
        model, data, out, kind=kind, settings=settings, out_dtype=out_dtype, progress=progress))


@importance_app.command(name="rcp-votes")
def rcp_votes(
    model: Path = typer.Option(..., "--model", help="The domain model (local folder)."),
    reasoning: Path = typer.Option(..., "--reasoning", help="The reasoning model (local folder)."),
    fisher_dir: Path = typer.Option(..., "--fisher", help="Its Fisher folder (importance fisher)."),
    data: Path = typer.Option(..., "--data", help="Domain texts, JSON Lines."),
    out: Path = typer.Option(..., "--out", help="Output stem: one folder OUT_<λ> per λ."),
    penalty_lambda: List[float] = typer.Option([1000.0], "--penalty-lambda", help="λ (repeat for several; inf allowed)."),
    zero_grad: str = typer.Option("merge", "--zero-grad", help="merge (code-faithful) | keep (texts with C = 0 abstain)."),
    max_length: int = typer.Option(1024, "--max-length", help="Tokens kept per text."),
    text_field: str = TEXT_FIELD, device: str = DEVICE, model_dtype: str = MODEL_DTYPE,
    no_checkpointing: bool = NO_CKPT, out_shard_size: str = SHARD,
    overwrite: bool = OVERWRITE, quiet: bool = QUIET,
) -> None:
    """v_j = Σ_k ±1 by the sign of C = g·θ_t + λ·F·(θ_r − θ_t)², per λ."""
    from mergekit_like.console import err_console, warn
    from mergekit_like.rcp.importance import PassSettings, votes_pass

    settings = PassSettings(max_length, text_field, device, model_dtype, not no_checkpointing,
                            out_shard_size, overwrite)
    bar, progress = progress_bar(quiet, "rcp-votes")
    with bar:
        result = votes_pass(model, reasoning, fisher_dir, data, out, penalty_lambda,
                            zero_grad=zero_grad, settings=settings, progress=progress)
    warn(result.warnings)
    for folder in result.folders:
        err_console.print(f"wrote {folder}")
