"""`mergekit-like train-router`: train the router of a Twin bundle (docs/methods/twin.md §7) or of a WEMoE
folder (docs/methods/wemoe.md §5).

The command dispatches on what it finds in BUNDLE: a Twin bundle (``twin/twin.json``) is trained
here; a WEMoE folder (config.json ``model_type: "wemoe"``) by ``mergekit_like.wemoe.train``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import torch
import typer

from mergekit_like.errors import MergeError

WARN_BELOW = 32
"""Fewer labelled lines than this for a task draw a warning."""
FEATURE_BATCH = 16
"""Texts per forward pass of the shared model when computing features."""


def _check_router_apart(bundle: Path, data: Path, val_data: Path | None) -> None:
    """The files train-router replaces (the router, twin.json, the manifest) are none of its
    data files: no flag makes it overwrite what it reads."""
    from mergekit_like.io.fs import check_output_apart
    from mergekit_like.io.manifest import MANIFEST
    from mergekit_like.twin.bundle import BUNDLE_DIR, ROUTER_FILE

    inputs = [("--data", data)] + ([("--val-data", val_data)] if val_data is not None else [])
    for written in (bundle / BUNDLE_DIR / ROUTER_FILE, bundle / BUNDLE_DIR / "twin.json",
                    bundle / ROUTER_FILE, bundle / MANIFEST):
        check_output_apart(written, inputs)


def train_router(
    bundle: Path = typer.Argument(..., help="A Twin bundle or a WEMoE folder (the output of a "
                                  "twin or wemoe merge)."),
    data: Path = typer.Option(..., "--data", help="JSON Lines: {\"text\"|\"input_ids\", \"task\"} "
                              "per line (Twin: task labels required; WEMoE: unlabeled, an optional "
                              "task only balances batches)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate; default: Twin 5e-4 "
                                    "(AdamW), WEMoE 1e-4 (Adam)."),
    epochs: int = typer.Option(50, "--epochs", help="Twin: training epochs (the best on "
                               "validation is kept)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size; default: Twin "
                                          "256 (≥ 2), WEMoE 8 texts per micro-batch."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, initialisation, shuffles and "
                             "dropout (Twin) or of the batch order (WEMoE)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Twin: stratified held-out "
                                       "fraction in [0, 1)."),
    steps: int = typer.Option(500, "--steps", help="WEMoE: optimizer steps."),
    max_length: int = typer.Option(512, "--max-length", help="WEMoE: texts are cut to this many "
                                   "tokens."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="WEMoE: micro-batches per step."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="WEMoE: "
                                                "recompute decoder layers in backward (less "
                                                "memory)."),
    reinit: bool = typer.Option(False, "--reinit", help="WEMoE: restart from the initial routers "
                                "(task arithmetic) instead of the ones in the folder."),
    val_data: Path | None = typer.Option(None, "--val-data", help="WEMoE: held-out JSON Lines "
                                         "texts for the perplexity guard."),
    eval_every: int = typer.Option(50, "--eval-every", help="WEMoE: steps between held-out "
                                   "evaluations (with --val-data)."),
    keep: str | None = typer.Option(None, "--keep", help="WEMoE: keep the best (lowest held-out "
                                    "perplexity) or last routers; default: best with "
                                    "--val-data, else last."),
    objective: str = typer.Option("confident", "--objective", help="WEMoE: confident (route "
                                  "each text toward the expert that predicts it best; default) or "
                                  "entropy (the paper's test-time entropy minimisation)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto = CUDA when available)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train the router of BUNDLE: a Twin bundle's task classifier on labelled texts
    (docs/methods/twin.md §7), or a WEMoE folder's per-layer routers on unlabeled texts,
    optionally guarded by held-out perplexity (docs/methods/wemoe.md §5)."""
    from mergekit_like.wemoe.runtime import is_wemoe
    from mergekit_like.twin.bundle import is_bundle

    _check_router_apart(bundle, data, val_data)
    if is_bundle(bundle):
        settings = _twin_settings(lr=lr, epochs=epochs, batch_size=batch_size, seed=seed,
                                  val_fraction=val_fraction)
        _train_twin(bundle, data, settings, device, quiet)
        return
    if is_wemoe(bundle):
        settings = _wemoe_settings(
            lr=lr, steps=steps, max_length=max_length, seed=seed, batch_size=batch_size,
            grad_accum=grad_accum, gradient_checkpointing=gradient_checkpointing, reinit=reinit,
            eval_every=eval_every, keep=keep, objective=objective)
        _train_wemoe(bundle, data, settings, val_data, device, quiet)
        return
    raise MergeError(f"{bundle}: not a Twin bundle (no twin/twin.json) nor a WEMoE folder "
                     "(config.json model_type is not 'wemoe')")


def _twin_settings(*, lr: float | None, epochs: int, batch_size: int | None, seed: int,
                   val_fraction: float) -> dict:
    """The Twin router's training settings (defaults: lr 5e-4, batch size 256), checked; they
    are also recorded in twin.json."""
    settings = {"lr": 5e-4 if lr is None else lr, "epochs": epochs,
                "batch_size": 256 if batch_size is None else batch_size, "seed": seed,
                "val_fraction": val_fraction, "optimizer": "AdamW", "loss": "cross_entropy"}
    _check_settings(settings)
    return settings


def _wemoe_settings(*, lr: float | None, batch_size: int | None, **options):
    """The WEMoE routers' ``WemoeTrainSettings`` (defaults: lr 1e-4, 8 texts per micro-batch);
    ``options`` are its other fields."""
    from mergekit_like.wemoe.train import WemoeTrainSettings

    return WemoeTrainSettings(lr=1e-4 if lr is None else lr,
                              batch_size=8 if batch_size is None else batch_size, **options)


def _train_wemoe(root: Path, data: Path, settings, val_data: Path | None, device: str,
                 quiet: bool) -> None:
    """Train, then report: steps, entropy at step 0 and at the end, the kept step."""
    from mergekit_like.console import err_console
    from mergekit_like.console import out_console
    from mergekit_like.wemoe.train import ROUTER_FILE, train_wemoe_router

    r = train_wemoe_router(root, data, settings, val_data=val_data, device=device, quiet=quiet,
                           console=err_console)
    out_console.print(f"steps: {r.steps}; entropy at step 0: {r.entropy_start:.4f}, at the end: "
                      f"{r.entropy_end:.4f}")
    if r.pseudo_labels:
        shares = ", ".join(f"{t} {n}" for t, n in r.pseudo_labels.items())
        out_console.print(f"objective: confident expert; texts per best-predicting expert: "
                          f"{shares}")
    if r.best_perplexity is not None:
        out_console.print(f"best held-out perplexity: {r.best_perplexity:.4f} (step "
                          f"{min(r.evals, key=lambda e: e[1])[0]}); kept step {r.kept_step}")
    if r.kept_step == 0:
        start = "task arithmetic" if r.start_state == "init" else "the starting routers"
        out_console.print(f"training did not beat {start} on held-out perplexity: kept the "
                          "step-0 routers")
    err_console.print(f"wrote {root}/{ROUTER_FILE}")


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
    from mergekit_like.runtime.data import numbered_lines

    labels = [_line_task(line, where, tasks) for where, line in numbered_lines(path)]
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
    from mergekit_like.runtime.data import json_object

    record = json_object(line, where)
    task = record.get("task")
    if task is None:
        raise MergeError(f"{where}: no \"task\" (router data labels every line with its task)")
    if not isinstance(task, str):
        raise MergeError(f"{where}: \"task\" must be a string, got {type(task).__name__}")
    if task not in tasks:
        raise MergeError(f"{where}: unknown task '{task}' (the bundle's tasks: {', '.join(tasks)})")
    return task


def _train_twin(root: Path, data: Path, settings: dict, device: str, quiet: bool) -> None:
    from mergekit_like.console import err_console, warn
    from mergekit_like.runtime import load_model, read_examples
    from mergekit_like.runtime.data import check_token_ids
    from mergekit_like.runtime.model import require_transformers
    from mergekit_like.twin.bundle import TwinBundle
    from mergekit_like.twin.router import fit_router, save_router

    with TwinBundle(root) as bundle:
        tasks = list(bundle.tasks)
    labels, warnings = read_task_labels(data, tasks)
    warn(warnings)
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
        warn(["no validation example (every task has one line, or --val-fraction 0): "
               "the last epoch is kept"])
    counts = Counter(labels)
    section = {"label_counts": {t: counts[t] for t in tasks},
               "validation_examples": int(fit.confusion.sum()),
               "validation_accuracy": fit.val_accuracy, "best_epoch": fit.best_epoch,
               "validation_loss": fit.val_loss, "selection": "accuracy, then cross-entropy",
               "validation_right_weight": (None if fit.right_weight is None else
                                           {"mean": fit.right_weight[0],
                                            "min": fit.right_weight[1]}),
               "data": {"file": data.name, "sha256": _sha256(data), "examples": len(labels)},
               "training": settings}
    save_router(root, fit.router, tasks, section)
    print_confusion(tasks, fit.confusion, fit.val_accuracy, fit.best_epoch)
    if fit.right_weight is not None:
        from mergekit_like.console import out_console

        out_console.print(f"validation cross-entropy: {fit.val_loss:.4f} (kept: the best "
                          f"accuracy, then the lowest cross-entropy); routing weight on the "
                          f"true task: mean {fit.right_weight[0]:.3f}, min {fit.right_weight[1]:.3f}")
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

    from mergekit_like.console import out_console

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
