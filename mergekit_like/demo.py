"""Tiny Llama-shaped model families, generated locally (no download), for the example recipes,
the tests and the benchmarks.

A family is a base plus fine-tunes: each fine-tune is base + a small random delta (task vector)
drawn from a generator seeded by (family seed, model index), so a family is reproducible
byte for byte. Every model is a complete transformers checkpoint (config.json,
generation_config.json, safetensors weights, optionally sharded with an index).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes in transformers' LlamaForCausalLM order."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}."
            shapes[p + "self_attn.q_proj.weight"] = (h, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, h)
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, h)
        return shapes

    def num_params(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


def _base_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.02 * torch.randn(shape, generator=gen)
    return 0.02 * torch.randn(shape, generator=gen)


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict,
                     shard_bytes: int | None = None) -> None:
    """Write ``tensors`` as model.safetensors, or as shards of ~shard_bytes plus an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
    if shard_bytes is None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_family(root: Path, shape: LlamaShape = LlamaShape(), n_finetunes: int = 3, *,
                dtype: torch.dtype = torch.float32, delta_scale: float = 0.004, seed: int = 0,
                shard_bytes: list[int | None] | None = None) -> list[Path]:
    """Create ``root/base`` and ``root/ft1`` … ``root/ftN``; returns their folders.

    ``shard_bytes[k]`` (k = 0 for the base) picks each model's shard layout, so tests can give
    models of one family different layouts.
    """
    root = Path(root)
    names = ["base"] + [f"ft{k}" for k in range(1, n_finetunes + 1)]
    layouts = shard_bytes or [None] * len(names)
    gen = torch.Generator().manual_seed(seed)
    base = {n: _base_tensor(n, s, gen) for n, s in shape.tensor_shapes().items()}
    folders = []
    for k, name in enumerate(names):
        if k == 0:
            tensors = base
        else:
            g = torch.Generator().manual_seed(seed * 1000 + k)
            tensors = {n: t + delta_scale * torch.randn(t.shape, generator=g) for n, t in base.items()}
        tensors = {n: t.to(dtype).contiguous() for n, t in tensors.items()}
        write_checkpoint(root / name, tensors, shape.config(dtype), layouts[k])
        folders.append(root / name)
    return folders
