"""RAM and RAM+ tensor-local (docs/methods/ram.md): the adapters of ``ops/ram.py``. An entry
changed (|δ| > ε) by one model takes its change (RAM+: scaled by λ_i), by several their mean.

Block by block, exactly: everything is elementwise except RAM+'s per-model counts, which are
integers summed over the engine's row blocks in a first pass, so the result does not depend on
the cut. Memory: N converted blocks at a time. On CPU with float32 compute and bf16/float32
inputs (``kernels.ram.supported``) each pass is one compiled loop per row span instead,
bit-equal, with no temporaries.
"""

from __future__ import annotations

import torch

from mergekit_like.kernels import ram as fast
from mergekit_like.kernels.tiling import models_against_base
from mergekit_like.methods.base import Method, MethodSpec, ParamSpec, TensorTask
from mergekit_like.ops.ram import active, model_counts, ram_delta, unique_scales


def _block_tvs(task: TensorTask, models: list[int], block) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat base block, task vectors [N, block elements]) in the compute dtype."""
    b = task.load(task.base, block).reshape(-1)
    tvs = torch.stack([task.load(task.inputs[pos], block).reshape(-1) - b for pos in models])
    return b, tvs


class Ram(Method):
    """RAM: unique changes summed, shared changes averaged."""

    spec = MethodSpec(
        name="ram",
        params=(ParamSpec("epsilon", "float", 1e-5),),
        needs_base=True,
    )
    span_parallel = True     # kernels.ram splits each tensor over task.workers threads

    def warm_up(self, device: torch.device) -> None:
        if device.type == "cpu":
            fast.warm_up()

    def merge_tensor(self, task: TensorTask) -> torch.Tensor:
        models, copied = models_against_base(task, self.spec.name)
        if copied is not None:
            return copied
        epsilon = float(task.params["epsilon"])
        scales = self.scales(task, models, epsilon)
        if fast.supported(task, models):
            return fast.ram_task(task, models, epsilon, scales)
        out = task.empty_output()
        for block in task.blocks():
            b, tvs = _block_tvs(task, models, block)
            task.store(out, block, b + ram_delta(tvs, epsilon, scales))
        return out

    def scales(self, task: TensorTask, models: list[int], epsilon: float) -> torch.Tensor | None:
        """The λ_i of the unique entries (None: RAM, no scaling)."""
        return None


class RamPlusTL(Ram):
    """RAM+ tensor-local: the unique changes of model i scaled by
    λ_i = 1 + r·clamp(shared_i / unique_i, 0, α), counts taken over this tensor."""

    spec = MethodSpec(
        name="ramplus_tl",
        params=(ParamSpec("r", "float", 0.1), ParamSpec("alpha", "float", 0.2),
                ParamSpec("epsilon", "float", 1e-5)),
        needs_base=True,
    )

    def scales(self, task: TensorTask, models: list[int], epsilon: float) -> torch.Tensor:
        r, alpha = float(task.params["r"]), float(task.params["alpha"])
        if fast.supported(task, models):
            return unique_scales(*fast.model_counts(task, models, epsilon), r, alpha, epsilon)
        shared = torch.zeros(len(models), dtype=torch.int64, device=task.device)
        unique = torch.zeros_like(shared)
        for block in task.blocks():                        # pass 1: the integer counts
            _, tvs = _block_tvs(task, models, block)
            s, u = model_counts(*active(tvs, epsilon))
            shared += s
            unique += u
        return unique_scales(shared, unique, r, alpha, epsilon)
