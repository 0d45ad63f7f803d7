"""Create the tiny demo family the example recipes in recipes/ point at.

    python scripts/make_demo_models.py [--out demo_models] [--dtype bfloat16]

Writes demo_models/base and demo_models/ft1..ft3: Llama-shaped (4 layers, hidden 64), each
fine-tune = base + a small random task vector. ft2 is sharded, so the example merges also
exercise inputs with different shard layouts. Nothing is downloaded.

For recipes/rcp.yml it also writes RCP importance maps with the real commands (needs
transformers, the ``[test]``/``[runtime]`` extra): calibration texts of random token ids
(demo_models/calibration/*.jsonl), ``importance fisher`` on ft1 (the "reasoning" model) and
``importance rcp-votes`` on ft2 (the "domain" model) at λ = 1e3 → demo_models/rcp_votes_1e3.
For recipes/regmean.yml and recipes/fisher.yml, ``stats gram`` and ``stats fisher`` on each
fine-tune with its own texts → demo_models/gram_ftK and demo_models/fisher_stats_ftK.
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
    demo_importance(args.out)


def demo_importance(root: Path, n_texts: int = 8, length: int = 24) -> None:
    import importlib.util
    import json
    import random

    from mergekit_like.cli import main as cli

    if importlib.util.find_spec("transformers") is None:
        print("skipped the RCP importance maps (recipes/rcp.yml): transformers is not installed")
        return
    rng = random.Random(0)
    data = root / "calibration"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("reasoning", "domain", "ft3"):
        lines = [json.dumps({"input_ids": [rng.randrange(LlamaShape().vocab_size)
                                           for _ in range(length)]}) for _ in range(n_texts)]
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    steps = [["importance", "fisher", "--model", root / "ft1", "--data", data / "reasoning.jsonl",
              "--out", root / "fisher_ft1"],
             ["importance", "rcp-votes", "--model", root / "ft2", "--reasoning", root / "ft1",
              "--fisher", root / "fisher_ft1", "--data", data / "domain.jsonl",
              "--out", root / "rcp_votes", "--penalty-lambda", "1e3"]]
    texts = {"ft1": "reasoning", "ft2": "domain", "ft3": "ft3"}
    for model, name in texts.items():
        for stat, out in (("gram", "gram"), ("fisher", "fisher_stats")):
            steps.append(["stats", stat, "--model", root / model, "--data",
                          data / f"{name}.jsonl", "--out", root / f"{out}_{model}"])
    for args in steps:
        if cli([str(a) for a in args] + ["--device", "cpu", "--overwrite", "-q"]) != 0:
            raise SystemExit(f"failed: mergekit-like {' '.join(map(str, args))}")
    print(f"wrote {root / 'fisher_ft1'}, {root / 'rcp_votes_1e3'}, the Gram folders "
          f"{root / 'gram_ft*'} and the Fisher folders {root / 'fisher_stats_ft*'}")


if __name__ == "__main__":
    main()
