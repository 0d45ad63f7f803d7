"""Dtype names: safetensors header codes, recipe names, torch dtypes."""

from __future__ import annotations

import torch

# safetensors header code -> torch dtype (the codes the project accepts; F8 and smaller are refused)
ST_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

# recipe `dtype` / `out_dtype` names (optionally prefixed by "torch.")
RECIPE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}
TORCH_TO_NAME: dict[torch.dtype, str] = {v: k for k, v in RECIPE_DTYPES.items()}

FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64"})


def parse_recipe_dtype(name: str) -> torch.dtype | None:
    """'bfloat16' or 'torch.bfloat16' -> torch.bfloat16; anything else -> None."""
    key = name[len("torch."):] if name.startswith("torch.") else name
    return RECIPE_DTYPES.get(key)


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    return ST_TO_TORCH[code].itemsize


def is_float_code(code: str) -> bool:
    return code in FLOAT_CODES
