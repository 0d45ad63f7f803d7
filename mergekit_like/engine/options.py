"""How a merge runs: device, shard size, overwrite/resume, block and read-ahead sizes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass(frozen=True)
class MergeOptions:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    out_shard_bytes: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False
    resume: bool = True
    allow_nonfinite: bool = False
    block_elems: int = 1 << 22
    """Elements an operator converts to the compute dtype at a time (``TensorTask.blocks``)."""
    read_ahead_bytes: int = 256 * 10**6
    """Overlap the next tensor's read only while both tensors' inputs fit in this."""
