"""`mergekit-like train-router`: train the router of a Twin bundle (twin.md §6).

The command dispatches on what it finds in BUNDLE: a Twin bundle (``twin/twin.json``) is the only
kind so far; WEMoE routers will join at the marked dispatch point in ``train_router``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import torch
import typer

from mergekit_like.errors import MergeError

WARN_BELOW = 32
"""Fewer labelled lines than this for a task draw a warning."""
FEATURE_BATCH = 16
"""Texts per forward pass of the shared model when computing features."""


def train_router(
    bundle: Path = typer.Argument(..., help="A Twin bundle (the output of a twin merge)."),
    data: Path = typer.Option(..., "--data", help="JSON Lines: {\"text\"|\"input_ids\", \"task\"} per line."),
    lr: float = typer.Option(5e-4, "--lr", help="AdamW learning rate."),
    epochs: int = typer.Option(50, "--epochs", help="Training epochs (the best on validation is kept)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Router training batch size (≥ 2)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, initialisation, shuffles and dropout."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Stratified held-out fraction in [0, 1)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto = CUDA when available)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train the router of BUNDLE on labelled texts (stage 2)."""
    from mergekit_like.twin.bundle import is_bundle

    settings = {"lr": lr, "epochs": epochs, "batch_size": batch_size, "seed": seed,
                "val_fraction": val_fraction, "optimizer": "AdamW", "loss": "cross_entropy"}
    _check_settings(settings)
    if is_bundle(bundle):
        _train_twin(bundle, data, settings, device, quiet)
        return
    # Dispatch point: other router kinds (WEMoE) are recognised and trained here.
    raise MergeError(f"{bundle}: not a Twin bundle (no twin/twin.json)")


def _check_settings(s: dict) -> None:
    if not s["lr"] > 0:
        raise MergeError(f"--lr {s['lr']}: must be positive")
    if s["epochs"] < 1:
        raise MergeError(f"--epochs {s['epochs']}: must be at least 1")
    if s["batch_size"] < 2:
        raise MergeError(f"--batch-size {s['batch_size']}: must be at least 2 (BatchNorm)")
    if not 0 <= s["val_fraction"] < 1:
        raise MergeError(f"--val-fraction {s['val_fraction']}: must be in [0, 1)")


def read_task_labels(path: Path, tasks: list[str]) -> tuple[list[str], list[str]]:
    """The ``task`` of every non-blank line of ``path`` in file order, checked against the
    bundle's ``tasks`` before any model is loaded; returns (labels, warnings). A line that is not
    a JSON object, has no string ``task``, or names an unknown task is an error ``FILE:LINE: …``;
    a task without any line is an error naming the task; fewer than 32 lines draw a warning."""
    if not path.is_file():
        raise MergeError(f"{path}: no such data file")
    labels = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                labels.append(_line_task(line, f"{path}:{number}", tasks))
    if not labels:
        raise MergeError(f"{path}: no examples (expected one JSON object per line)")
    counts = Counter(labels)
    for task in tasks:
        if not counts[task]:
            raise MergeError(f"{path}: no line for task '{task}' (every bundle task needs at "
                             "least one labelled text)")
    warnings = [f"{path}: task '{t}' has only {counts[t]} line(s); {WARN_BELOW} or more are "
                "recommended" for t in tasks if counts[t] < WARN_BELOW]
    return labels, warnings


def _line_task(line: str, where: str, tasks: list[str]) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MergeError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(record, dict):
        raise MergeError(f"{where}: expected a JSON object, got {type(record).__name__}")
    task = record.get("task")
    if task is None:
        raise MergeError(f"{where}: no \"task\" (router data labels every line with its task)")
    if not isinstance(task, str):
        raise MergeError(f"{where}: \"task\" must be a string, got {type(task).__name__}")
    if task not in tasks:
        raise MergeError(f"{where}: unknown task '{task}' (the bundle's tasks: {', '.join(tasks)})")
    return task


def _train_twin(root: Path, data: Path, settings: dict, device: str, quiet: bool) -> None:
    from mergekit_like.cli import _warn, err_console
    from mergekit_like.runtime import load_model, read_examples
    from mergekit_like.runtime.data import check_token_ids
    from mergekit_like.runtime.model import require_transformers
    from mergekit_like.twin.bundle import TwinBundle
    from mergekit_like.twin.router import fit_router, save_router

    with TwinBundle(root) as bundle:
        tasks = list(bundle.tasks)
    labels, warnings = read_task_labels(data, tasks)
    _warn(warnings)
    require_transformers().utils.logging.disable_progress_bar()
    loaded = load_model(root, device=device)
    examples = read_examples(data, loaded.tokenizer)
    check_token_ids(examples, loaded.model.get_input_embeddings().num_embeddings)
    features = compute_features(loaded, [ex.input_ids for ex in examples], quiet, err_console)
    y = torch.tensor([tasks.index(t) for t in labels], dtype=torch.long, device=features.device)
    fit = fit_router(features, y, len(tasks), lr=settings["lr"], epochs=settings["epochs"],
                     batch_size=settings["batch_size"], seed=settings["seed"],
                     val_fraction=settings["val_fraction"])
    if fit.val_accuracy is None:
        _warn(["no validation example (every task has one line, or --val-fraction 0): "
               "the last epoch is kept"])
    counts = Counter(labels)
    section = {"label_counts": {t: counts[t] for t in tasks},
               "validation_examples": int(fit.confusion.sum()),
               "validation_accuracy": fit.val_accuracy, "best_epoch": fit.best_epoch,
               "data": {"file": data.name, "sha256": _sha256(data), "examples": len(labels)},
               "training": settings}
    save_router(root, fit.router, tasks, section)
    print_confusion(tasks, fit.confusion, fit.val_accuracy, fit.best_epoch)
    err_console.print(f"wrote {root}/twin/router.safetensors")


def compute_features(loaded, prompts: list[list[int]], quiet: bool, console) -> torch.Tensor:
    """Features [N, d] float32 of every prompt (file order), on the model's device, from the
    shared model with no correction (``mean_features``), batches of similar lengths."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mergekit_like.runtime.data import length_sorted_batches, pad_batch
    from mergekit_like.twin.router import mean_features

    out: list[torch.Tensor | None] = [None] * len(prompts)
    batches = length_sorted_batches([len(p) for p in prompts], FEATURE_BATCH)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console, disable=quiet) as bar, torch.inference_mode():
        job = bar.add_task("features", total=len(prompts))
        for batch in batches:
            ids, mask = (t.to(loaded.device) for t in pad_batch([prompts[i] for i in batch], "right"))
            for i, f in zip(batch, mean_features(loaded.model, ids, mask)):
                out[i] = f
            bar.update(job, advance=len(batch))
    return torch.stack(out).clone()  # a normal tensor (inference tensors cannot be trained on)


def print_confusion(tasks: list[str], confusion: torch.Tensor, accuracy: float | None,
                    best_epoch: int) -> None:
    """The validation confusion matrix (rows: true task, columns: predicted) and accuracy."""
    from rich.table import Table

    from mergekit_like.cli_tables import out_console

    if accuracy is None:
        out_console.print("validation accuracy: n/a (no validation examples)")
        return
    table = Table(title="router: validation confusion matrix (rows: true task, columns: predicted)")
    table.add_column("true \\ predicted")
    for t in tasks:
        table.add_column(t, justify="right")
    for t, row in zip(tasks, confusion.tolist()):
        table.add_row(t, *(str(v) for v in row))
    out_console.print(table)
    out_console.print(f"validation accuracy: {accuracy:.4f} ({int(confusion.trace())}/"
                      f"{int(confusion.sum())}), best epoch {best_epoch}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
