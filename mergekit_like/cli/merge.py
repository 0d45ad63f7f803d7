"""`mergekit-like merge` and `publish`: a recipe into an output folder, and that folder to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from mergekit_like.cli.tables import print_plan
from mergekit_like.console import err_console, out_console, warn
from mergekit_like.errors import MergeError


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
    from mergekit_like.engine import MergeOptions
    from mergekit_like.io.shards import parse_size
    from mergekit_like.registry import load_recipe
    from mergekit_like.engine.sources import source_opener

    loaded = load_recipe(recipe, seed=seed)
    warn(loaded.warnings)
    options = MergeOptions(device=resolve_device(device), out_shard_bytes=parse_size(out_shard_size),
                           overwrite=overwrite, resume=resume, allow_nonfinite=allow_nonfinite)
    hub = hub_settings(endpoint, cache_dir, offline, low_disk)
    if publish_to is not None and not hub.token:  # fail before the merge, not after it
        raise MergeError("publishing needs a token; set HF_TOKEN")
    opener = source_opener(allow_pickle=allow_pickle, hub=hub)
    if dry_run:
        _print_dry_run(loaded, out, options, opener)
        return
    _refuse_existing_output(out, overwrite)
    result = _run_with_progress(loaded, out, options, opener, quiet=quiet)
    warn(result.warnings)
    if result.already_complete:
        err_console.print(f"already complete: {out}", markup=False)
    else:
        print_written(result, out)
    if publish_to is not None:
        publish_output(out, publish_to, hub, private=private, revision=None, create_pr=False,
                 message=None)


def _print_dry_run(loaded, out: Path, options, opener) -> None:
    """Plan the merge of recipe ``loaded`` and print its warnings and the plan; write nothing."""
    from mergekit_like.engine.plan import build_plan

    plan = build_plan(loaded, opener)
    try:
        warn(plan.warnings)
        print_plan(plan, out, options)
    finally:
        plan.close()


def _refuse_existing_output(out: Path, overwrite: bool) -> None:
    """Fail fast on an existing OUT without ``--overwrite``; an OUT with a manifest may hold
    this very merge, which the engine checks after planning."""
    from mergekit_like.io.manifest import MANIFEST

    if out.exists() and not overwrite and not (out / MANIFEST).is_file():
        raise MergeError(f"output folder exists: {out} (pass --overwrite to replace it)")


def _run_with_progress(loaded, out: Path, options, opener, *, quiet: bool):
    """Run the merge into ``out`` under a progress bar on stderr (none with ``quiet``); returns
    the engine's result."""
    from mergekit_like.engine import run_merge

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
    return result


def print_written(result, out: Path) -> None:
    resumed = f", {len(result.skipped_shards)} resumed" if result.skipped_shards else ""
    err_console.print(f"wrote {out} ({len(result.shards)} shard(s){resumed})")
    for note in result.notes:
        err_console.print(note, markup=False)


def hub_settings(endpoint: Optional[str], cache_dir: Optional[Path], offline: bool,
                  low_disk: bool = False):
    from mergekit_like.hub.settings import quiet_hub, resolve_settings

    quiet_hub()
    return resolve_settings(endpoint=endpoint, cache_dir=cache_dir, offline=offline,
                            low_disk=low_disk)


def publish_output(out: Path, repo_id: str, hub, **kw) -> None:
    from mergekit_like.hub.publish import publish as publish_folder

    err_console.print(f"publishing {out} to {repo_id} …")
    from mergekit_like.registry import verify

    done = publish_folder(out, repo_id, hub, check=lambda o: verify(o, read_data=False), **kw)
    warn(done.warnings)
    out_console.print(done.url)


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
    hub = hub_settings(endpoint, None, False)
    publish_output(out, repo_id, hub, private=private, revision=revision, create_pr=create_pr,
             message=message)
