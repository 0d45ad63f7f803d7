"""Build (or reuse) the merge-quality zoo: per seed, a tiny base model and one fine-tune per task.

    python scripts/zoo.py [--fast] [--out DIR] [--seeds S ...] [--jobs N] [--force] [--matrix]

Writes DIR/seed-<S>/ for every seed (DIR default .zoo/, or .zoo-fast/ with --fast, at the
repository root; seeds default 0 1 2, or 0 with --fast): the task splits (jsonl), models/base and
models/<task> (transformers checkpoints, float32 safetensors) and a zoo.json manifest. A complete
zoo built with the same settings is reused, not rebuilt. ``--matrix`` then prints the test
accuracy of the base and of every fine-tune on every task, averaged over the seeds (markdown).
CPU only, nothing is downloaded; see docs/quality.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mergekit_like.zoo import PRESETS
from mergekit_like.zoo.build import build_zoos, seed_dir, to_stderr
from mergekit_like.zoo.script_args import add_zoo_arguments, zoo_request

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_zoo_arguments(parser, "--out")
    parser.add_argument("--force", action="store_true", help="rebuild even a matching zoo")
    parser.add_argument("--matrix", action="store_true",
                        help="print every model's test accuracy on every task")
    args = parser.parse_args(argv)
    preset, folder, seeds = zoo_request(args, REPO)
    manifests = build_zoos(folder, PRESETS[preset], seeds, jobs=args.jobs, force=args.force,
                           log=to_stderr)
    for seed, manifest in zip(seeds, manifests):
        state = "reused" if manifest["cached"] else f"built in {manifest['build_seconds']:.1f} s"
        print(f"{seed_dir(folder, seed)}: {preset} zoo {manifest['settings_hash']} ({state}); "
              f"tasks: {', '.join(manifest['tasks'])}")
    if args.matrix:
        from mergekit_like.zoo.build import Zoo
        from mergekit_like.zoo.matrix import accuracy_matrix, format_matrix

        zoos = [Zoo.open(seed_dir(folder, s)) for s in seeds]
        print()
        print(format_matrix(accuracy_matrix(zoos), zoos[0].tasks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
