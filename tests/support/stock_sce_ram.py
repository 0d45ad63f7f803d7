"""Helpers of test_model_stock / test_sce / test_ram: a hand-built TensorTask through a
registered method, a small model family, and bad-recipe checks."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from support.helpers import plan_params

from mergekit_like.demo import LlamaShape, make_family
from mergekit_like.methods.base import TensorTask
from mergekit_like.registry import get_method

F32 = torch.float32
SHAPE = LlamaShape(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2)


def t32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F32)


def merge_one(method: str, base, inputs, params=None, model_params=None, *,
              block_elems: int = 1 << 22, out_dtype=F32) -> torch.Tensor:
    """``method`` on one hand-made tensor (defaults filled in as the plan does)."""
    m = get_method(method)
    full, per_model = plan_params(m, params, model_params or [{} for _ in inputs])
    task = TensorTask(name="model.layers.0.mlp.up_proj.weight", shape=tuple(base.shape),
                      out_dtype=out_dtype, compute_dtype=F32, load_dtype=None, base=base,
                      inputs=list(inputs), input_indices=list(range(len(inputs))),
                      model_params=per_model, params=full, block_elems=block_elems)
    return m.merge(task)[task.name]


def family(root: Path, n_finetunes: int = 3) -> dict[str, Path]:
    """base, ft1 … ftN in float32 (one model.safetensors each)."""
    folders = make_family(root, SHAPE, n_finetunes=n_finetunes, dtype=F32, delta_scale=0.01)
    return {f.name: f for f in folders}


def rewrite(folder: Path, fn) -> None:
    """Replace every tensor t of a family model by fn(name, t)."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    save_file({k: fn(k, v).contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def recipe(method: str, fam: dict[str, Path], names=("ft1", "ft2", "ft3"), params=None) -> dict:
    doc = {"merge_method": method, "base_model": str(fam["base"]),
           "models": [{"model": str(fam[n])} for n in names], "dtype": "float32"}
    if params is not None:
        doc["parameters"] = params
    return doc
