"""Command-line options shared by scripts/zoo.py and scripts/quality.py."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mergekit_like.zoo.settings import DEFAULT_DIRS, DEFAULT_SEEDS


def add_zoo_arguments(parser: argparse.ArgumentParser, folder_flag: str) -> None:
    """--fast, ``folder_flag`` (the zoo folder, stored as ``zoo``), --seeds, --jobs."""
    parser.add_argument("--fast", action="store_true", help="the small CI zoo (under a minute)")
    parser.add_argument(folder_flag, dest="zoo", type=Path, default=None,
                        help="zoo folder (default .zoo/ or .zoo-fast/ at the repository root)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="one zoo per seed (default 0 1 2, or 0 with --fast)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel worker processes for building (default: up to 2)")


def zoo_request(args: argparse.Namespace, repo: Path) -> tuple[str, Path, list[int]]:
    """(preset name, zoo folder, seeds) from the parsed options; the default folder is in
    ``repo`` (the repository root)."""
    preset = "fast" if args.fast else "full"
    return (preset, args.zoo or Path(repo) / DEFAULT_DIRS[preset],
            list(args.seeds or DEFAULT_SEEDS[preset]))
