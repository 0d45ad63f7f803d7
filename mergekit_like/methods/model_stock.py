"""Model Stock (docs/methods/model_stock.md): the adapter of ``ops.model_stock.model_stock``,
out = t·mean(models) + (1 − t)·base with t from the models' pairwise task-vector cosines.

Without ``filter_wise`` the cosines need every model's whole tensor at once, so each input is
converted once to the compute dtype (with the recipe dtype's load rounding) and the result is
cast once to the output dtype; memory: the N converted inputs plus a few temporaries. With
``filter_wise`` (≥ 2 dims) each row along the last dim has its own t, so the same functions run
on blocks of dim-0 rows (``row_blocks``), each converted and stored alone: torch reduces each
output row of a multi-row reduction serially, so a block gives the whole tensor's bits as long
as it holds at least two rows (one row would be a single-output reduction, which torch splits
over threads). Memory: the N converted blocks plus a few temporaries of that size.
"""

from __future__ import annotations

import torch

from mergekit_like.errors import MergeError
from mergekit_like.kernels.tiling import models_against_base
from mergekit_like.methods.base import Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.ops.model_stock import model_ratio, model_stock


class ModelStock(Method):
    spec = MethodSpec(
        name="model_stock",
        params=(ParamSpec("filter_wise", "bool", False),),
        needs_base=True,
        min_inputs=2,
    )

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        models, copied = models_against_base(task, 'model_stock')
        if copied is not None:
            return copied
        if len(models) < 2:
            raise MergeError(f"model_stock: tensor '{task.name}' is in only {len(models)} "
                             "model besides the base; model_stock needs at least 2")
        filter_wise = bool(task.params["filter_wise"])
        out = task.empty_output()
        if filter_wise and len(task.shape) >= 2:
            for rows in row_blocks(task):
                base = task.cast(task.base[rows], copy=True)
                xs = [task.cast(task.inputs[pos][rows], copy=True) for pos in models]
                ratio = _check_ratio(task, model_ratio(base, xs, filter_wise=True))
                out[rows].copy_(model_stock(base, xs, filter_wise=True, ratio=ratio))
            return out
        base = task.cast(task.base)
        xs = [task.cast(task.inputs[pos]) for pos in models]
        ratio = _check_ratio(task, model_ratio(base, xs, filter_wise=filter_wise))
        out.copy_(model_stock(base, xs, filter_wise=filter_wise, ratio=ratio))
        return out


def row_blocks(task: TensorTask) -> list[slice]:
    """Dim-0 row blocks of about ``task.block_elems`` elements and at least two rows each (a
    tensor of one row is one block)."""
    rows, row = task.shape[0], task.numel // max(1, task.shape[0])
    step = max(2, task.block_elems // max(1, row))
    cuts = list(range(0, rows, step)) + [rows]
    if len(cuts) > 2 and cuts[-1] - cuts[-2] == 1:
        del cuts[-2]
    return [slice(a, b) for a, b in zip(cuts, cuts[1:])]


def _check_ratio(task: TensorTask, ratio: torch.Tensor) -> torch.Tensor:
    """``ratio`` itself, after refusing a non-finite t."""
    if not bool(torch.isfinite(ratio).all()):
        raise MergeError(f"model_stock: the task vectors of tensor '{task.name}' cancel "
                         "out (mean cosine −1/(N−1)), so t = N·cos/(1+(N−1)·cos) is "
                         "undefined")
    return ratio
