"""A Twin bundle built directly from docs/methods/twin.md's equations, with plain torch (the test oracle).

``hand_bundle`` writes the layout of docs/methods/twin.md §5 for a tiny Llama family: the shared model
s = b + λ Σ_t (x_t − b) (task arithmetic), and per task, for every 2-D tensor inside a
transformer block, v_t = x_t − s truncated to rank r by exact SVD: A = U diag(σ) [out, r],
B = Vᵀ [r, in]. Tests of materialize and the runtime use it; the merge's own output is
compared with it in test_twin_merge.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergekit_like.demo import LlamaShape, make_family, write_checkpoint
from support.helpers import load_folder

BLOCK = re.compile(r"\.layers\.\d+\.")


def rank_for(fraction: float, shape: tuple[int, ...]) -> int:
    return max(1, math.floor(fraction * min(shape[0], math.prod(shape[1:]))))


def hand_bundle(root: Path, family: list[Path], tasks: list[str], *, rank: float = 0.5,
                lam: float = 0.3, dense_small: bool = False, router: bool = False) -> Path:
    """Bundle at ``root`` from ``family`` = [base, ft_1 … ft_T] (float32 everywhere)."""
    base = load_folder(family[0])
    fts = [load_folder(f) for f in family[1:]]
    assert len(fts) == len(tasks)
    shared = {n: b + lam * sum(ft[n] - b for ft in fts) for n, b in base.items()}
    config = json.loads((family[0] / "config.json").read_text())
    write_checkpoint(root, {n: t.contiguous() for n, t in shared.items()}, config)
    entries, parts = {}, {t: {} for t in tasks}
    for name, s in shared.items():
        in_block = BLOCK.search(name) is not None
        if in_block and s.ndim == 2:
            r = rank_for(rank, tuple(s.shape))
            energy = {}
            for task, ft in zip(tasks, fts):
                v = ft[name] - s
                u, sig, vh = torch.linalg.svd(v, full_matrices=False)
                parts[task][name + ".twin_A"] = (u[:, :r] * sig[:r]).contiguous()
                parts[task][name + ".twin_B"] = vh[:r].contiguous()
                total = float((sig ** 2).sum())
                energy[task] = float((sig[:r] ** 2).sum()) / total if total > 0 else 1.0
            entries[name] = {"kind": "lowrank", "shape": list(s.shape), "rank": r,
                             "energy": energy, "svd": "exact"}
        elif in_block and dense_small:
            for task, ft in zip(tasks, fts):
                parts[task][name + ".twin_delta"] = (ft[name] - s).contiguous()
            entries[name] = {"kind": "dense", "shape": list(s.shape)}
        else:
            entries[name] = {"kind": "shared_only", "shape": list(s.shape)}
    for task in tasks:
        folder = root / "twin" / task
        folder.mkdir(parents=True)
        save_file(parts[task], str(folder / "exclusive.safetensors"), metadata={"format": "pt"})
    info = {"format": "mergekit_like.twin", "format_version": 1, "tasks": list(tasks),
            "base_model": str(family[0]), "models": [str(f) for f in family[1:]],
            "shared": {"merge_method": "task_arithmetic", "parameters": {"lambda": lam}},
            "rank": rank, "dense_small": dense_small, "include_embeddings": False,
            "svd": "exact", "out_dtype": "float32",
            "factor_layout": "delta = A @ B; A = U diag(S) [out, r]; B = V^T [r, in]",
            "tensors": entries, "summary": {}, "router": None}
    (root / "twin" / "twin.json").write_text(json.dumps(info, indent=2) + "\n")
    return root


def tiny_family(root: Path, n_tasks: int = 2, seed: int = 0,
                shape: LlamaShape = LlamaShape(vocab_size=64, hidden_size=32,
                                               intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2)
                ) -> list[Path]:
    """base + n_tasks fine-tunes (float32) with deltas large enough to matter (0.02)."""
    return make_family(root, shape, n_tasks, delta_scale=0.02, seed=seed)
