"""Per-token metrics of a causal LM, as pure functions of logits and labels.

Alignment: ``logits[b, t]`` is the distribution the model predicts for ``labels[b, t]``; callers
shift (``logits[:, :-1]`` against ``ids[:, 1:]``). All arithmetic is float32 (float64 where a
caller sums many terms), whatever the model dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100
"""Label value of positions that are not scored (padding, the first token)."""


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each label: ``nll[b, t] = -log softmax(logits[b, t])[labels[b, t]]``.

    logits: [B, T, V] float (any dtype; computed in float32). labels: [B, T] int64, IGNORE (-100)
    where not scored. Returns [B, T] float32, 0 at ignored positions.
    """
    b, t, v = logits.shape
    nll = F.cross_entropy(logits.reshape(b * t, v).float(), labels.reshape(b * t),
                          ignore_index=IGNORE, reduction="none")
    return nll.reshape(b, t)


def next_token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each predicted distribution: ``H[b, t] = -Σ_v p log p`` with
    ``log p = log_softmax(logits[b, t])`` (terms with p = 0 count 0).

    logits: [B, T, V] float (computed in float32). Returns [B, T] float32.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1)


def perplexity(total_nll: float, n_tokens: int) -> float:
    """``exp(total_nll / n_tokens)``: the exponential of the mean token NLL (nats)."""
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs at least one scored token, got {n_tokens}")
    return math.exp(total_nll / n_tokens)


def next_token_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The labels of ``logits[:, :-1]`` for a right-padded batch: ``ids[:, 1:]``, IGNORE where
    the target is padding. ids, mask: [B, T] int64 → [B, T-1] int64."""
    return ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
