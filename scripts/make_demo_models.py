"""Create the tiny demo family the example recipes in recipes/ point at.

    python scripts/make_demo_models.py [--out demo_models] [--dtype bfloat16]

Writes demo_models/base and demo_models/ft1..ft3: Llama-shaped (4 layers, hidden 64), each
fine-tune = base + a small random task vector. ft2 is sharded, so the example merges also
exercise inputs with different shard layouts. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mergekit_like.demo import LlamaShape, make_family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_models"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    folders = make_family(args.out, LlamaShape(), n_finetunes=3, dtype=dtype,
                          shard_bytes=[None, None, 60_000, None])
    for folder in folders:
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
