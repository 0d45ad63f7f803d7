"""`mergekit-like inspect`, `verify` and `eval`: what a model folder holds, whether an output is
whole, and how a model scores on data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from contextlib import nullcontext

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from mergekit_like.cli.merge import hub_settings
from mergekit_like.cli.tables import fmt_bytes, print_accuracy, print_perplexity, print_summary
from mergekit_like.console import err_console, out_console
from mergekit_like.errors import MergeError


def inspect(
    model: str = typer.Argument(..., help="A local model folder, or a Hub repo org/name[@revision]."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
    tensors: bool = typer.Option(False, "--tensors", help="List every tensor."),
    endpoint: Optional[str] = typer.Option(None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Hub cache (default: HF_HUB_CACHE or HF_HOME/hub)."),
    offline: bool = typer.Option(False, "--offline", help="Hub models from the local cache only."),
) -> None:
    """Show a model's tensors, shapes, dtypes, shards and total size (headers only: a Hub
    model's shard headers are read over HTTP ranges, no shard is downloaded)."""
    from mergekit_like.io.inspect import describe
    from mergekit_like.engine.sources import open_ref

    hub = None if Path(model).is_dir() else hub_settings(endpoint, cache_dir, offline)
    source = open_ref(model, allow_pickle=allow_pickle, hub=hub)
    try:
        summary = describe(source)
    finally:
        source.close()
    print_summary(model, summary, tensors)


def verify(
    out: Path = typer.Argument(..., help="A merge output folder."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Accept NaN/Inf values."),
    no_manifest: bool = typer.Option(False, "--no-manifest",
                                     help="Check a folder without merge_manifest.json (structure and tensors only, no hashes)."),
) -> None:
    """Check that OUT is complete and uncorrupted: every file's sha256 against
    merge_manifest.json, index ↔ files ↔ headers, config ↔ tensors, every tensor readable."""
    from mergekit_like.registry import verify as verify_output

    report = verify_output(out, allow_nonfinite=allow_nonfinite, manifest=not no_manifest)
    hashed = ", sha256 of every file checked" if report.hashed else ""
    out_console.print(f"ok: {out}: {report.tensors} tensors in {report.files} file(s), "
                      f"{fmt_bytes(report.total_bytes)}{hashed}")


def eval_model(
    model: Path = typer.Argument(..., help="A model folder (a merge output or any transformers checkpoint)."),
    data: Path = typer.Option(..., "--data", help="JSON Lines: {\"text\"|\"input_ids\", \"answer\"?, \"task\"?} per line."),
    metric: str = typer.Option("ppl", "--metric", help="ppl (perplexity, loss, entropy) | acc (greedy exact match per task)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples per forward pass."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto = CUDA when available)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Load pickle pytorch_model.bin weights (weights_only)."),
) -> None:
    """Evaluate MODEL on the examples of --data: perplexity or per-task accuracy (float32)."""
    from mergekit_like.runtime import evaluate_accuracy, evaluate_perplexity, read_examples
    from mergekit_like.runtime.model import require_transformers

    if metric not in ("ppl", "acc"):
        raise MergeError(f"--metric {metric!r}: use ppl or acc")
    if batch_size < 1:
        raise MergeError(f"--batch-size {batch_size}: must be at least 1")
    if not data.is_file():  # before the (possibly long) model load
        raise MergeError(f"{data}: no such data file")
    require_transformers().utils.logging.disable_progress_bar()  # ours is on stderr below
    with err_console.status(f"loading {model} …") if not quiet else nullcontext():
        loaded = _load_for_eval(model, device, allow_pickle)
    examples = read_examples(data, loaded.tokenizer)
    if metric == "acc":
        examples = [ex for ex in examples if ex.answer_ids]
        if not examples:
            raise MergeError(f"{data}: no example has an \"answer\"; --metric acc needs answers")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                  disable=quiet, transient=False) as bar:
        task = bar.add_task(f"eval {metric}", total=len(examples))

        def on_done(n_done: int) -> None:
            bar.update(task, completed=n_done)

        if metric == "ppl":
            result = evaluate_perplexity(loaded, examples, batch_size=batch_size, progress=on_done)
        else:
            scores = evaluate_accuracy(loaded, examples, batch_size=batch_size, progress=on_done)
    if metric == "ppl":
        print_perplexity(model, len(examples), result)
    else:
        print_accuracy(model, examples, scores)


def _load_for_eval(model: Path, device: str, allow_pickle: bool = False):
    """A Twin bundle loads routed per sample (runtime/twin.py), a WEMoE output with the
    package's own modeling code (runtime/wemoe.py); anything else as a plain model. Pickle-only
    weights are refused unless ``allow_pickle``, and then loaded weights-only (as in merge)."""
    import pickle

    from mergekit_like.runtime import load_model
    from mergekit_like.runtime.model import check_pickle, pickle_error
    from mergekit_like.twin.bundle import is_bundle

    pickled = check_pickle(model, allow_pickle)
    try:
        if is_bundle(model):
            from mergekit_like.twin.runtime import load_twin
            return load_twin(model, device=device)
        from mergekit_like.wemoe.runtime import is_wemoe, load_wemoe
        if is_wemoe(model):
            return load_wemoe(model, device=device)
        return load_model(model, device=device, allow_pickle=allow_pickle)
    except (pickle.UnpicklingError, EOFError) as exc:  # a weights-only load refused the pickle
        raise pickle_error(model, pickled, exc) from None
