"""Evaluating a loaded causal LM on examples: perplexity (with mean next-token entropy) and
exact-match accuracy of greedy continuations.

Memory is the model plus one batch: batches run under ``torch.inference_mode`` and only running
sums cross batches. Batches are formed from the examples sorted by length (least padding); the
results do not depend on that order beyond floating-point rounding.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from mergekit_like.errors import MergeError
from mergekit_like.runtime.cache import cache_keyword, output_cache
from mergekit_like.runtime.data import Example, check_token_ids, length_sorted_batches, pad_batch
from mergekit_like.runtime.metrics import (IGNORE, next_token_entropy, next_token_labels,
                                           perplexity, token_nll)
from mergekit_like.runtime.model import LoadedModel

Progress = Callable[[int], None]
"""Called after each batch with the number of examples done so far."""

NO_TASK = "all"
"""The task name of examples without a ``task``."""
AVERAGE = "average"
"""The key of the mean over tasks in ``evaluate_accuracy``'s result."""


@dataclass
class PerplexityResult:
    """loss: mean token NLL (nats); perplexity: exp(loss); entropy: mean next-token entropy
    (nats) over the same positions; tokens: how many tokens were predicted."""

    loss: float
    perplexity: float
    entropy: float
    tokens: int


def evaluate_perplexity(loaded: LoadedModel, examples: Sequence[Example], batch_size: int = 16,
                        progress: Progress | None = None) -> PerplexityResult:
    """Score every example's ``input_ids + answer_ids`` as a text: each position after the first
    is predicted from the ones before it (right-padded batches, attention mask, padding never
    scored). loss = Σ nll / n and entropy = Σ H / n over all n predicted tokens of all examples
    (a long example weighs more); sums in float64."""
    model = loaded.model
    check_token_ids(examples, _vocab_size(model))
    seqs = [ex.sequence for ex in examples]
    total_nll, total_entropy, n_tokens, done = 0.0, 0.0, 0, 0
    with torch.inference_mode():
        for batch in length_sorted_batches([len(s) for s in seqs], batch_size):
            ids, mask = (t.to(loaded.device) for t in pad_batch([seqs[i] for i in batch], "right"))
            labels = next_token_labels(ids, mask)
            scored = labels != IGNORE
            if scored.any():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
                total_nll += token_nll(logits, labels).double().sum().item()
                total_entropy += next_token_entropy(logits)[scored].double().sum().item()
                n_tokens += int(scored.sum())
            done += len(batch)
            if progress is not None:
                progress(done)
    if n_tokens == 0:
        raise MergeError("no example has two or more tokens: there is nothing to predict")
    return PerplexityResult(loss=total_nll / n_tokens, perplexity=perplexity(total_nll, n_tokens),
                            entropy=total_entropy / n_tokens, tokens=n_tokens)


def evaluate_accuracy(loaded: LoadedModel, examples: Sequence[Example], batch_size: int = 16,
                      progress: Progress | None = None) -> dict[str, float]:
    """Exact-match accuracy of greedy continuations, per task.

    Only examples with answer_ids count. For each, the model continues input_ids greedily for
    len(answer_ids) tokens (end-of-sequence tokens do not stop it) and the example is correct when
    the continuation equals answer_ids exactly. Returns {task: fraction correct} in order of first
    appearance (examples without a task are task "all"), plus "average": the unweighted mean over
    the tasks.
    """
    answered = [ex for ex in examples if ex.answer_ids]
    if not answered:
        raise MergeError("no example has an answer: accuracy needs an \"answer\" in the examples")
    check_token_ids(answered, _vocab_size(loaded.model))
    tasks = list(dict.fromkeys(_task_name(ex) for ex in answered))
    if AVERAGE in tasks:
        raise MergeError(f"a task may not be named {AVERAGE!r} (reserved for the mean over tasks)")
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    done = 0
    for batch in length_sorted_batches([len(ex.input_ids) for ex in answered], batch_size):
        group = [answered[i] for i in batch]
        steps = max(len(ex.answer_ids) for ex in group)
        continuations = greedy_continuations(loaded.model, [ex.input_ids for ex in group], steps,
                                             loaded.device)
        for ex, row in zip(group, continuations.tolist()):
            total[_task_name(ex)] += 1
            correct[_task_name(ex)] += row[:len(ex.answer_ids)] == ex.answer_ids
        done += len(group)
        if progress is not None:
            progress(done)
    scores = {task: correct[task] / total[task] for task in tasks}
    scores[AVERAGE] = sum(scores.values()) / len(tasks)
    return scores


def greedy_continuations(model: nn.Module, prompts: Sequence[list[int]], steps: int,
                         device: torch.device) -> torch.Tensor:
    """The next ``steps`` greedy (argmax, first index on ties) tokens after each prompt, as
    ``model.generate(do_sample=False)`` would produce them with no stopping criterion.

    Prompts are left-padded into one batch with an attention mask; position ids count only real
    tokens (``cumsum(mask) - 1``), so a padded prompt is positioned as it would be alone; one
    prompt forward fills the KV cache, then one forward per new token. Returns [B, steps] int64.
    """
    ids, mask = (t.to(device) for t in pad_batch(prompts, "left"))
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    keep_last = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache_kw = cache_keyword(model)  # "cache" or, on transformers 5.0, "past_key_values"
    cache, new_tokens = None, []
    with torch.inference_mode():
        for step in range(steps):
            given = {cache_kw: cache} if cache is not None else {}
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                        use_cache=True, **given, **keep_last)
            token = out.logits[:, -1].argmax(dim=-1)
            new_tokens.append(token)
            cache, ids = output_cache(out), token[:, None]
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=-1)
            positions = positions[:, -1:] + 1
    if not new_tokens:
        return torch.zeros((len(prompts), 0), dtype=torch.long, device=device)
    return torch.stack(new_tokens, dim=1)


def _task_name(ex: Example) -> str:
    return NO_TASK if ex.task is None else ex.task


def _vocab_size(model: nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def _accepts(model: nn.Module, keyword: str) -> bool:
    return keyword in inspect.signature(model.forward).parameters
