"""Changing a loaded model for an experiment and reading its gradients.

* ``replace_modules`` / ``restore_modules``: swap submodules in place (e.g. every
  ``model.layers.N.mlp`` for a mixture of MLPs) and put the originals back.
* ``accumulate_gradients``: forward + backward of the mean token NLL batch by batch, handing each
  selected parameter's gradient of each batch to a callback as soon as autograd has accumulated
  it, then freeing it (``Tensor.register_post_accumulate_grad_hook``): at most one full
  parameter gradient is held at a time beyond what autograd itself needs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn

from mergekit_like.errors import MergeError
from mergekit_like.runtime.data import Example, check_token_ids, pad_batch
from mergekit_like.runtime.metrics import IGNORE, next_token_labels, token_nll
from mergekit_like.runtime.model import LoadedModel

GradCallback = Callable[[str, nn.Parameter, torch.Tensor], None]


def replace_modules(model: nn.Module, match: Callable[[str, nn.Module], bool],
                    build: Callable[[str, nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """Replace every submodule whose (qualified name, module) satisfies ``match`` with
    ``build(name, module)``, in place; returns the replaced originals by name.

    Submodules are visited in ``named_modules()`` order; once a module matches, its descendants
    are not offered to ``match`` (they leave the model with it). The root is never replaced.
    ``build`` must return a module on the model's device and dtype.
    """
    names: list[str] = []
    for name, module in model.named_modules():
        inside_replaced = any(name.startswith(prefix + ".") for prefix in names)
        if name and not inside_replaced and match(name, module):
            names.append(name)
    originals: dict[str, nn.Module] = {}
    for name in names:
        original = model.get_submodule(name)
        model.set_submodule(name, build(name, original))
        originals[name] = original
    return originals


def restore_modules(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put back the modules ``replace_modules`` returned, each at its name."""
    for name, module in originals.items():
        model.set_submodule(name, module)


def accumulate_gradients(loaded: LoadedModel, examples: Sequence[Example], on_grad: GradCallback,
                         batch_size: int = 8,
                         params: Callable[[str, nn.Parameter], bool] | None = None) -> int:
    """Backpropagate the mean token NLL of each batch and hand every gradient to ``on_grad``.

    Batches are consecutive runs of ``batch_size`` examples in the given order, each example's
    tokens being ``input_ids + answer_ids``, right-padded. The loss of a batch is
    ``L = Σ nll / n`` over its n predicted tokens (every position after an example's first);
    a batch with no predicted token is skipped. For each selected parameter p (floating point,
    ``params(name, p)`` true, all when params is None) ``on_grad(name, p, dL/dp)`` is called once
    per batch, right after autograd accumulated it, and ``p.grad`` is then set back to None.
    The gradient tensor is only valid during the call: copy or reduce it there (e.g. grad²).

    During the run the other parameters have ``requires_grad`` False; every parameter's
    ``requires_grad`` and the selected ones' prior ``.grad`` are restored afterwards. The model
    stays in eval mode (no dropout). Returns the number of batches backpropagated.
    """
    model = loaded.model
    named = list(model.named_parameters())
    chosen = [(n, p) for n, p in named if p.is_floating_point() and (params is None or params(n, p))]
    if not chosen:
        raise MergeError("accumulate_gradients: no floating-point parameter is selected")
    if batch_size < 1:
        raise MergeError(f"batch size must be at least 1, got {batch_size}")
    check_token_ids(examples, model.get_input_embeddings().num_embeddings)
    flags = {n: p.requires_grad for n, p in named}
    prior_grads = {n: p.grad for n, p in chosen}
    handles = []
    try:
        for _, p in named:
            p.requires_grad_(False)
        for n, p in chosen:
            p.grad = None
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(_hand_over(n, on_grad)))
        batches = 0
        with torch.enable_grad():
            for start in range(0, len(examples), batch_size):
                loss = batch_mean_nll(model, examples[start:start + batch_size], loaded.device)
                if loss is not None:
                    loss.backward()
                    batches += 1
        return batches
    finally:
        for handle in handles:
            handle.remove()
        for n, p in chosen:
            p.grad = prior_grads[n]
        for n, p in named:
            p.requires_grad_(flags[n])


def batch_mean_nll(model: nn.Module, batch: Sequence[Example], device: torch.device) -> torch.Tensor | None:
    """Scalar float32 mean NLL over the predicted tokens of a right-padded batch (differentiable),
    or None when the batch predicts no token (every sequence is one token long)."""
    ids, mask = pad_batch([ex.sequence for ex in batch], side="right")
    ids, mask = ids.to(device), mask.to(device)
    labels = next_token_labels(ids, mask)
    n_tokens = int((labels != IGNORE).sum())
    if n_tokens == 0:
        return None
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return token_nll(logits[:, :-1], labels).sum() / n_tokens


def _hand_over(name: str, on_grad: GradCallback) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        on_grad(name, param, param.grad)
        param.grad = None
    return hook


def enable_checkpointing(model) -> None:
    """Activation checkpointing of the decoder layers, which transformers applies only to modules
    in training mode: the checkpointed layers alone are flagged training (their children, hence
    dropout and the like, stay in eval mode)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise MergeError(f"gradient checkpointing: {type(model).__name__} does not support it")
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable()
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True
