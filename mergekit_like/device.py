"""The compute device: ``--device auto|cpu|cuda|cuda:N``."""

from __future__ import annotations

import torch

from mergekit_like.errors import MergeError


def resolve_device(spec: str) -> torch.device:
    """auto = the current CUDA device when one is available, else the CPU."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise MergeError(f"--device {spec}: CUDA is not available on this machine "
                             "(use --device cpu or auto)")
        index = spec.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise MergeError(f"--device {spec}: no such CUDA device "
                             f"({torch.cuda.device_count()} available)")
        return torch.device(spec)
    raise MergeError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")
