"""`mergekit-like stats …`: the calibration passes of RegMean (``gram``, docs/methods/regmean.md
§2) and Fisher merging (``fisher``, docs/methods/fisher.md §2), one statistics folder per model."""

from __future__ import annotations

from pathlib import Path

import typer

from mergekit_like.rcp.cli import (DEVICE, MODEL_DTYPE, NO_CKPT, OVERWRITE, QUIET, SHARD,
                                   TEXT_FIELD, run_pass)

stats_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Per-model statistics from unlabeled calibration texts (RegMean, Fisher merging).")

_MODEL = typer.Option(..., "--model", help="The model (local folder).")
_DATA = typer.Option(..., "--data", help="Calibration texts, JSON Lines ({\"text\": …} or {\"input_ids\": […]}).")
_OUT = typer.Option(..., "--out", help="Output folder (written atomically).")
_MAX_LEN = typer.Option(1024, "--max-length", help="Tokens kept per text.")


@stats_app.command()
def gram(
    model: Path = _MODEL, data: Path = _DATA, out: Path = _OUT, max_length: int = _MAX_LEN,
    dtype: str = typer.Option("float32", "--dtype", help="Stored dtype of G: float32 | float64 (sums are float64 either way)."),
    text_field: str = TEXT_FIELD, device: str = DEVICE, model_dtype: str = MODEL_DTYPE,
    out_shard_size: str = SHARD, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
) -> None:
    """G = XᵀX / T of every linear layer's inputs (RegMean's statistics)."""
    from mergekit_like.regmean.gram_pass import gram_pass
    from mergekit_like.runtime.calibration import PassSettings

    settings = PassSettings(max_length, text_field, device, model_dtype, False, out_shard_size,
                            overwrite)
    run_pass("gram", quiet, out, dtype, lambda out_dtype, progress: gram_pass(
        model, data, out, settings=settings, out_dtype=out_dtype, progress=progress))


@stats_app.command()
def fisher(
    model: Path = _MODEL, data: Path = _DATA, out: Path = _OUT, max_length: int = _MAX_LEN,
    dtype: str = typer.Option("float32", "--dtype", help="Stored dtype of F: float32 | bfloat16."),
    text_field: str = TEXT_FIELD, device: str = DEVICE, model_dtype: str = MODEL_DTYPE,
    no_checkpointing: bool = NO_CKPT, out_shard_size: str = SHARD,
    overwrite: bool = OVERWRITE, quiet: bool = QUIET,
) -> None:
    """F = mean over texts of g² (diagonal empirical Fisher; Fisher merging's statistics)."""
    from mergekit_like.fisher.fisher_pass import fisher_pass
    from mergekit_like.runtime.calibration import PassSettings

    settings = PassSettings(max_length, text_field, device, model_dtype, not no_checkpointing,
                            out_shard_size, overwrite)
    run_pass("fisher", quiet, out, dtype, lambda out_dtype, progress: fisher_pass(
        model, data, out, settings=settings, out_dtype=out_dtype, progress=progress))
