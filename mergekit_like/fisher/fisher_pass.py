"""The statistics pass of Fisher merging (docs/methods/fisher.md §2): the diagonal empirical
Fisher information of one model on its calibration texts,

    F_j = (1/K) Σ_k (∂L_k/∂θ_j)²         L_k: mean token NLL of text k, K texts

one text per forward/backward (``runtime.calibration.gradient_pass``): each parameter's gradient
is squared into a float32 host accumulator in its post-accumulate-grad hook and freed, so memory
is the model, one text's activations, one gradient and 4 B/param of F. The folder (kind
``fisher``) also records ‖F‖, the L2 norm over every tensor, which ``normalize_fisher_weight``
needs at merge time without reading every tensor first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mergekit_like.io.fs import check_output_apart
from mergekit_like.runtime.calibration import (PassSettings, Progress, checkpoint_parameters,
                                               gradient_pass, load_for_pass, model_id)
from mergekit_like.runtime.stats_folder import file_sha256, refuse_existing, write_stats_folder

FISHER_KIND = "fisher"


def fisher_pass(model: Path, data: Path, out: Path, *, settings: PassSettings,
                out_dtype: torch.dtype = torch.float32, progress: Progress | None = None) -> Path:
    """F of every floating parameter of ``model`` on the texts of ``data`` into ``out``."""
    check_output_apart(Path(out), [("--model", Path(model)), ("--data", Path(data))])
    refuse_existing(Path(out), settings.overwrite)
    loaded, examples = load_for_pass(model, settings, data)
    params = checkpoint_parameters(loaded, model)
    acc = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}

    def on_grad(name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        acc[name].add_(grad.detach().to(torch.float32).square().cpu())

    k = gradient_pass(loaded, examples, params, on_grad, progress)
    tensors = {n: a.div_(k).to(out_dtype) for n, a in acc.items()}
    sq = {n: float(t.double().square().sum()) for n, t in tensors.items()}
    meta = {"kind": FISHER_KIND, "fisher_kind": "empirical (squared gradient of each text's "
            "mean token NLL)", "n_examples": k, "max_length": settings.max_length,
            "dtype": str(out_dtype).replace("torch.", ""),
            "fisher_norm": repr(math.sqrt(math.fsum(sq.values()))),
            "models": json.dumps({"model": model_id(model)}),
            "data_sha256": file_sha256(Path(data))}
    info = {"tensors": {n: {"numel": params[n].numel(), "sq_norm": sq[n]} for n in tensors}}
    return write_stats_folder(Path(out), tensors, meta, info, overwrite=settings.overwrite,
                              shard_size=settings.shard_size)
