"""The unit of work the engine hands an operator: one reference tensor's inputs, resolved
parameters and compute settings (``TensorTask``), and the row blocks it is converted in
(``Block``). The method adapters (methods/) and the fast paths (kernels/) both read it, so it
sits below them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch


@dataclass(frozen=True)
class Block:
    """A contiguous run of rows (dim 0) of a tensor; ``flat_offset`` is the row-major index of its
    first element in the whole tensor (DARE keys its mask on the global flat index)."""

    rows: slice
    flat_offset: int
    numel: int


@dataclass
class TensorTask:
    """All inputs of one reference tensor, ready to merge.

    ``base`` and ``inputs`` are whole tensors in their stored dtype on the compute device.
    ``inputs[i]`` is None when that model lacks the tensor (``on_missing_tensor: skip``).
    ``model_params[i]`` are the per-model parameters resolved for this tensor and layer;
    ``params`` the method-wide ones. ``input_indices[i]`` is the model's 0-based position in
    ``models`` as written (an appended base gets ``len(models)``).
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    compute_dtype: torch.dtype
    load_dtype: torch.dtype | None
    base: torch.Tensor | None
    inputs: list[torch.Tensor | None]
    input_indices: list[int]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    seed: int = 0
    t: float = 0.0
    """The tensor's layer position in [0, 1] (for settings a method resolves itself)."""
    input_extra: list[dict[str, Any]] = field(default_factory=list)
    """Each input's own recipe entry keys (``Method.entry_keys``: twin's task ``name``)."""
    block_elems: int = 1 << 22
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    workers: int = 1
    """Threads an operator may split its pieces over (``tiling.spans``); the engine sets it
    on CPU for ``Method.span_parallel`` methods and runs torch ops single-threaded then."""
    report: dict | None = None
    """An operator may put JSON-able facts about this tensor here (Twin: the energy kept);
    the engine hands every tensor's report to ``Method.side_files`` at the end."""
    side: dict[str, torch.Tensor] = field(default_factory=dict)
    """This tensor's entry in each side input (``Method.side_inputs``) that has it, by label, in
    its stored dtype on the compute device (RCP: the domain model's votes)."""
    inputs_finite: bool = False
    """The engine checked every input free of NaN/Inf (no --allow-nonfinite)."""
    memo: dict | None = None
    """Shared by the points of a grid pass for this tensor only: operators may cache results
    that depend on the inputs and their own key alone (TIES thresholds), never the output."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def blocks(self) -> Iterator[Block]:
        """Row blocks of at most ~block_elems elements (a 0-d or 1-row tensor is one block)."""
        if len(self.shape) == 0 or self.numel == 0:
            yield Block(slice(None), 0, self.numel)
            return
        rows = self.shape[0]
        row_elems = max(1, self.numel // rows)
        step = max(1, self.block_elems // row_elems)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            yield Block(slice(start, stop), start * row_elems, (stop - start) * row_elems)

    def load_rounding(self, stored: torch.dtype) -> torch.dtype | None:
        """The load-rounding rule, the one place it is written: mergekit loads every tensor in
        the recipe ``dtype``, so a tensor stored as ``stored`` is first rounded to ``load_dtype``
        when that is a real step (not already the stored dtype, not the compute dtype, which
        the next cast reaches anyway). That dtype, or None when no such step applies."""
        if self.load_dtype in (None, stored, self.compute_dtype):
            return None
        return self.load_dtype

    def cast(self, t: torch.Tensor, *, copy: bool = False) -> torch.Tensor:
        """Any slice of an input in the compute dtype, rounded through ``load_rounding`` first.
        Without ``copy`` it may be ``t`` itself (no conversion applies): treat as read-only."""
        via = self.load_rounding(t.dtype)
        if via is not None:
            t = t.to(via)
        return t.to(self.compute_dtype, copy=copy)

    def load(self, t: torch.Tensor, block: Block) -> torch.Tensor:
        """Rows of ``t`` as ``cast`` converts them. Returns a new tensor, never a view of ``t``."""
        return self.cast(t if len(self.shape) == 0 else t[block.rows], copy=True)

    def empty_output(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.out_dtype, device=self.device)

    def store(self, out: torch.Tensor, block: Block, value: torch.Tensor) -> None:
        """Cast ``value`` (compute dtype) once to the output dtype into ``out``'s rows."""
        if len(self.shape) == 0:
            out.copy_(value.reshape(()))
        else:
            out[block.rows].copy_(value.reshape(out[block.rows].shape))
