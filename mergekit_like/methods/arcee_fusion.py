"""Arcee Fusion (docs/methods/arcee_fusion.md): the adapter of ``ops/arcee_fusion.py``, a = the
base, b = the other model, out = a + (b − a)·[imp ≥ τ].

Two passes over the engine's row blocks. Pass 1 computes the importance (``fusion_importance``:
a softmax over the last dim, so a block of whole dim-0 rows holds whole softmax rows) into one
compute-dtype tensor of the full shape, whose exact quartiles give τ (``fusion_threshold``;
``kernels/arcee_fusion.py`` selects them by one bracketed selection, the same value).
Pass 2 reloads a and b per block and applies ``fuse``. A 0-d or 1-d tensor is one softmax row
and is done whole. A tensor only the base has is the base's, copied.

On CPU (``kernels.arcee_fusion.supported``) both passes are ``kernels.arcee_fusion.
fused_passes``: torch's softmax / log / KL row sums, |b − a|·KL and the whole of pass 2 as
compiled loops over the stored bytes, the same bits. ``MERGEKIT_LIKE_FUSED=0`` takes the
torch path below.
"""

from __future__ import annotations

import torch

from mergekit_like.kernels.tiling import copy_of, other_of_pair
from mergekit_like.methods.base import Method, MethodSpec, TensorTask
from mergekit_like.kernels.arcee_fusion import fused_passes, fusion_threshold, supported, \
    warm_up
from mergekit_like.ops.arcee_fusion import fuse, fusion_importance


class ArceeFusion(Method):
    spec = MethodSpec(
        name="arcee_fusion",
        params=(),
        needs_base=True,
        exact_inputs=2,
    )
    span_parallel = True     # kernels.arcee_fusion.fused_passes splits blocks over task.workers

    def warm_up(self, device: torch.device) -> None:
        if device.type == "cpu":
            warm_up()

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        other = other_of_pair(task, "arcee_fusion")
        if other is None or task.numel == 0:            # only the base has it, or nothing to do
            return copy_of(task, task.base)
        a, b = task.base, other
        out = task.empty_output()
        if supported(task, a, b) and fused_passes(task, a, b, out):
            return out
        if len(task.shape) < 2:                         # one softmax row: whole
            a32, b32 = task.cast(a, copy=True), task.cast(b, copy=True)
            imp = fusion_importance(a32, b32)
            out.copy_(fuse(a32, b32, imp >= fusion_threshold(imp)))
            return out
        imp = torch.empty(task.shape, dtype=task.compute_dtype, device=task.device)
        for block in task.blocks():                     # pass 1: importance
            imp[block.rows] = fusion_importance(task.load(a, block), task.load(b, block))
        tau = fusion_threshold(imp)
        for block in task.blocks():                     # pass 2: the masked delta
            keep = imp[block.rows] >= tau
            task.store(out, block, fuse(task.load(a, block), task.load(b, block), keep))
        return out
