"""The `mergekit-like` command: merge, inspect, verify, publish, eval.

Every user error is a ``MergeError``: printed as one line ``error: …`` on stderr, exit code 2,
no traceback.
"""

from __future__ import annotations

import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from mergekit_like import __version__
from mergekit_like.cli_tables import (fmt_bytes, out_console, print_accuracy, print_perplexity,
                                      print_plan, print_summary)
from mergekit_like.errors import MergeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Streaming, memory-bounded model merging (mergekit-compatible recipes).")
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _warn(messages: list[str]) -> None:
    for m in dict.fromkeys(messages):
        err_console.print(f"[yellow]warning:[/yellow] {m}", markup=True)


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit format)."),
    out: Path = typer.Argument(..., help="Output folder (created atomically)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; write nothing."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto = CUDA when available)."),
    out_shard_size: str = typer.Option("5GB", help="Max shard size: bytes, 5GB, 500MB, 2GiB, 5B (mergekit)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="Continue an interrupted merge of the same recipe (default on)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Load pickle .bin checkpoints (weights_only)."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite",
                                         help="Merge inputs that contain NaN/Inf."),
    seed: Optional[int] = typer.Option(None, help="Seed for random operators (overrides the recipe)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    endpoint: Optional[str] = typer.Option(None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Hub cache (default: HF_HUB_CACHE or HF_HOME/hub)."),
    offline: bool = typer.Option(False, "--offline", help="Hub models from the local cache only (also HF_HUB_OFFLINE=1)."),
    low_disk: bool = typer.Option(False, "--low-disk",
                                  help="Download Hub shards one at a time into a private cache and delete each once read."),
    publish_to: Optional[str] = typer.Option(None, "--publish", help="After the merge, publish OUT to this Hub repo (org/name)."),
    private: bool = typer.Option(False, "--private", help="With --publish: create the repo private."),
) -> None:
    """Merge the models of RECIPE into OUT."""
    from mergekit_like.device import resolve_device
    from mergekit_like.engine import MergeOptions, run_merge
    from mergekit_like.io.manifest import MANIFEST
    from mergekit_like.io.shards import parse_size
    from mergekit_like.plan import build_plan
    from mergekit_like.recipe import load_recipe
    from mergekit_like.sources import source_opener

    loaded = load_recipe(recipe, seed=seed)
    _warn(loaded.warnings)
    options = MergeOptions(device=resolve_device(device), out_shard_bytes=parse_size(out_shard_size),
                           overwrite=overwrite, resume=resume, allow_nonfinite=allow_nonfinite)
    hub = _hub_settings(endpoint, cache_dir, offline, low_disk)
    if publish_to is not None and not hub.token:  # fail before the merge, not after it
        raise MergeError("publishing needs a token; set HF_TOKEN")
    opener = source_opener(allow_pickle=allow_pickle, hub=hub)
    if dry_run:
        plan = build_plan(loaded, opener)
        try:
            _warn(plan.warnings)
            print_plan(plan, out, options)
        finally:
            plan.close()
        return
    if out.exists() and not overwrite and not (out / MANIFEST).is_file():
        # fails fast; an OUT with a manifest may hold this very merge (checked after planning)
        raise MergeError(f"output folder exists: {out} (pass --overwrite to replace it)")
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                  disable=quiet, transient=False) as bar:
        task = bar.add_task("planning", total=None)

        def on_tensor(name: str, nbytes: int) -> None:
            bar.update(task, advance=nbytes, description=name[-48:])

        def start(total: int) -> None:
            bar.update(task, total=total, description="merging")

        result = run_merge(loaded, out, options, opener, progress=on_tensor, on_start=start)
        bar.update(task, description="done")
    _warn(result.warnings)
    if result.already_complete:
        err_console.print(f"already complete: {out}", markup=False)
    else:
        _print_written(result, out)
    if publish_to is not None:
        _publish(out, publish_to, hub, private=private, revision=None, create_pr=False,
                 message=None)


def _print_written(result, out: Path) -> None:
    resumed = f", {len(result.skipped_shards)} resumed" if result.skipped_shards else ""
    err_console.print(f"wrote {out} ({len(result.shards)} shard(s){resumed})")
    for note in result.notes:
        err_console.print(note, markup=False)


def _hub_settings(endpoint: Optional[str], cache_dir: Optional[Path], offline: bool,
                  low_disk: bool = False):
    from mergekit_like.hub.settings import quiet_hub, resolve_settings

    quiet_hub()
    return resolve_settings(endpoint=endpoint, cache_dir=cache_dir, offline=offline,
                            low_disk=low_disk)


def _publish(out: Path, repo_id: str, hub, **kw) -> None:
    from mergekit_like.hub.publish import publish as publish_folder

    err_console.print(f"publishing {out} to {repo_id} …")
    done = publish_folder(out, repo_id, hub, **kw)
    _warn(done.warnings)
    out_console.print(done.url)


@app.command()
def publish(
    out: Path = typer.Argument(..., help="A finished merge output folder."),
    repo_id: str = typer.Argument(..., help="Hub repo to publish to (namespace/name)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    revision: Optional[str] = typer.Option(None, help="Branch to commit to (default main)."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing."),
    message: Optional[str] = typer.Option(None, "--message", "--commit-message", help="Commit message."),
    endpoint: Optional[str] = typer.Option(None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)."),
) -> None:
    """Upload OUT to the Hub in one commit (verified first; stale shards removed). The token
    comes from HF_TOKEN or the stored login."""
    hub = _hub_settings(endpoint, None, False)
    _publish(out, repo_id, hub, private=private, revision=revision, create_pr=create_pr,
             message=message)


@app.command()
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
    from mergekit_like.inspect_model import describe
    from mergekit_like.sources import open_ref

    hub = None if Path(model).is_dir() else _hub_settings(endpoint, cache_dir, offline)
    source = open_ref(model, allow_pickle=allow_pickle, hub=hub)
    try:
        summary = describe(source)
    finally:
        source.close()
    print_summary(model, summary, tensors)


@app.command()
def verify(
    out: Path = typer.Argument(..., help="A merge output folder."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Accept NaN/Inf values."),
    no_manifest: bool = typer.Option(False, "--no-manifest",
                                     help="Check a folder without merge_manifest.json (structure and tensors only, no hashes)."),
) -> None:
    """Check that OUT is complete and uncorrupted: every file's sha256 against
    merge_manifest.json, index ↔ files ↔ headers, config ↔ tensors, every tensor readable."""
    from mergekit_like.verify import verify_output

    report = verify_output(out, allow_nonfinite=allow_nonfinite, manifest=not no_manifest)
    hashed = ", sha256 of every file checked" if report.hashed else ""
    out_console.print(f"ok: {out}: {report.tensors} tensors in {report.files} file(s), "
                      f"{fmt_bytes(report.total_bytes)}{hashed}")


@app.command(name="eval")
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
            from mergekit_like.runtime.twin import load_twin
            return load_twin(model, device=device)
        from mergekit_like.runtime.wemoe import is_wemoe, load_wemoe
        if is_wemoe(model):
            return load_wemoe(model, device=device)
        return load_model(model, device=device, allow_pickle=allow_pickle)
    except (pickle.UnpicklingError, EOFError) as exc:  # a weights-only load refused the pickle
        raise pickle_error(model, pickled, exc) from None


@app.command()
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
) -> None:
    """Merge every point of GRID_FILE into OUT_ROOT/<id>/, reading the inputs once per pass of
    points that share them; results.jsonl/.csv and a table at the end. Exit 3 if a point failed."""
    from mergekit_like.device import resolve_device
    from mergekit_like.engine import MergeOptions
    from mergekit_like.grid.command import EvalOptions, grid_main, parse_shard
    from mergekit_like.grid.run import GridOptions
    from mergekit_like.io.shards import parse_size
    from mergekit_like.sources import source_opener

    if eval_goal not in (None, "min", "max"):
        raise MergeError(f"--eval-goal {eval_goal!r}: expected min or max")
    if eval_cmd is not None and eval_ppl is not None:
        raise MergeError("--eval and --eval-ppl are exclusive; pick one")
    options = GridOptions(resume=resume, force=force, skip_failed=skip_failed, fail_fast=fail_fast,
                          pass_size=pass_size, shard=parse_shard(shard), break_lock=break_lock)
    merge_options = MergeOptions(device=resolve_device(device),
                                 out_shard_bytes=parse_size(out_shard_size),
                                 allow_nonfinite=allow_nonfinite)
    hub = _hub_settings(endpoint, cache_dir, offline)
    evals = EvalOptions(command=eval_cmd, key=eval_key, timeout=eval_timeout, goal=eval_goal,
                        ppl_file=eval_ppl, ctx=eval_ctx, max_tokens=eval_max_tokens)
    code = grid_main(grid_file, out_root, merge_options,
                     source_opener(allow_pickle=allow_pickle, hub=hub), options, evals,
                     seed=seed, strict=strict, dry_run=dry_run, report_only=report_only,
                     out=out_console, err=err_console)
    if code:
        raise typer.Exit(code)


@app.command()
def version() -> None:
    """Print the version."""
    out_console.print(__version__)


from mergekit_like.cli_router import train_router  # noqa: E402 - after app is defined
from mergekit_like.cli_importance import importance_app  # noqa: E402
from mergekit_like.cli_twin import twin_app  # noqa: E402

app.add_typer(twin_app, name="twin")
app.add_typer(importance_app, name="importance")
app.command(name="train-router")(train_router)


def main(argv: list[str] | None = None) -> int:
    global _signal_name
    _signal_name = "interrupted"
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding host): leave SIGTERM alone
        previous = None
    try:
        code = app(args=argv, standalone_mode=False)
        if code == 130:  # typer turns a KeyboardInterrupt into Exit(130), silently
            return _interrupted()
        if isinstance(code, int) and code:
            return code  # a command that ends with typer.Exit(code) (grid: 3)
    except MergeError as exc:
        err_console.print(f"error: {exc}", markup=False)
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except SystemExit as exc:  # typer/click exits (--help, usage errors)
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        # click usage errors (typer vendors its own click, so match by shape, not by class)
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        if type(exc).__name__ == "Abort":  # click's wrapping of a KeyboardInterrupt
            return _interrupted() if isinstance(exc.__context__, KeyboardInterrupt) else 1
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _on_sigterm(signum, frame) -> None:
    global _signal_name
    _signal_name = "terminated"
    raise KeyboardInterrupt


_signal_name = "interrupted"


def _interrupted() -> int:
    """Ctrl-C or SIGTERM: say whether a partial output was kept for a resume; 130 / 143."""
    from mergekit_like.io.output import KEPT_PARTIALS

    kept = [p for p in KEPT_PARTIALS if p.exists()]
    what = ("run the same command again to resume" if kept else "nothing written")
    err_console.print(f"{_signal_name}; {what}", markup=False)
    return 143 if _signal_name == "terminated" else 130


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
