"""The reader interface: where a model's tensors, config and side files come from.

The engine only ever talks to a ``CheckpointSource``. ``LocalSource`` (io/local.py) reads
local folders; ``HubSource`` (hub/source.py) implements the same methods, downloading shards
as ``read_tensor`` first needs them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_like.dtypes import ST_TO_TORCH, itemsize


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its safetensors header describes it (no data read)."""

    name: str
    dtype: str  # safetensors code: "BF16", "F32", "I64", …
    shape: tuple[int, ...]
    file: str  # weight file name relative to the model folder
    data_offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_TO_TORCH[self.dtype]


class CheckpointSource(ABC):
    """A model the merge reads from. ``ref`` is how errors name it (the recipe's string)."""

    ref: str

    @abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """Every weight tensor, in storage order (file order, then offset). Header reads only."""

    @abstractmethod
    def config(self) -> dict[str, Any] | None:
        """The parsed config.json, or None when the model has none."""

    @abstractmethod
    def list_files(self) -> list[str]:
        """Names (relative paths) of the non-weight files the model has (tokenizer, configs …)."""

    @abstractmethod
    def fetch_file(self, name: str) -> Path:
        """A local path to one of ``list_files()`` (the Hub source downloads it first)."""

    @abstractmethod
    def read_tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor's data in its stored dtype (a fresh tensor; never a view of a file)."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What pins this model's bytes for the resume key (local: sizes + header hashes)."""

    def local_root(self) -> Path | None:
        """The local folder this model's files live in (a Hub model: its cache folder), which a
        run's output must stay apart from; None when there is none."""
        return None

    def weight_bytes(self) -> int:
        """Bytes of tensor data the model holds."""
        return sum(t.nbytes for t in self.tensors().values())

    def plan_reads(self, names: list[str]) -> None:  # noqa: B027 - optional hook
        """The tensors the engine will read from this source, in order (before the first)."""

    def release(self, name: str) -> None:  # noqa: B027 - optional hook
        """The engine has consumed ``name``; sources may drop caches (Hub ``--low-disk``)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open handles."""
