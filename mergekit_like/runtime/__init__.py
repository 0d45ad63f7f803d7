"""Running models for evaluation and experiments (the ``[runtime]`` extra: transformers).

* ``load_model(path, device="auto", dtype=torch.float32) -> LoadedModel`` (model, tokenizer, device)
* ``read_examples(path, tokenizer=None) -> list[Example]`` from JSON Lines
* ``evaluate_perplexity(...) -> PerplexityResult`` and ``evaluate_accuracy(...) -> {task: acc}``
* metrics: ``token_nll``, ``next_token_entropy``, ``perplexity``
* ``replace_modules`` / ``restore_modules`` and ``accumulate_gradients`` for experiments

transformers is imported only when a model is loaded; importing this package needs torch only.
"""

from mergekit_like.runtime.data import Example, read_examples
from mergekit_like.runtime.evaluate import (PerplexityResult, evaluate_accuracy,
                                            evaluate_perplexity, greedy_continuations)
from mergekit_like.runtime.hooks import accumulate_gradients, replace_modules, restore_modules
from mergekit_like.runtime.metrics import next_token_entropy, perplexity, token_nll
from mergekit_like.runtime.model import LoadedModel, load_model

__all__ = [
    "Example", "LoadedModel", "PerplexityResult", "accumulate_gradients", "evaluate_accuracy",
    "evaluate_perplexity", "greedy_continuations", "load_model", "next_token_entropy",
    "perplexity", "read_examples", "replace_modules", "restore_modules", "token_nll",
]
