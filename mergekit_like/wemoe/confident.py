"""The confident-expert objective of WEMoE's ``train-router`` (docs/methods/wemoe.md §5.2): the
default, in place of the paper's entropy minimisation.

For a text x (positions P: those predicting its answer when the data gives one, else every
real position) and each task t, route every layer one-hot to t (the oracle a
labelled example would get: the MLPs of fine-tune t, the shared weights as merged) and take

    S_t(x) = −(1/|P|) Σ_{n∈P} log p_t(x_{n+1} | x_≤n)     surprisal of the text under expert t
    t*(x)  = argmin_t S_t(x)                              the expert that predicts it best

once, before training (no label is read). Each step then regresses every layer's routing
weights r_l(x) [T] (the masked mean over x's tokens of the router outputs) toward one-hot(t*):

    L = (1/B) Σ_b (1/L) Σ_l ‖r_l(x_b) − e_{t*(x_b)}‖²

Why not the paper's objective: minimising the entropy of every position also rewards confident
guesses of tokens that no model can predict (the prompt of a task), and drives all routing
toward whichever expert is most peaked — on the zoo it collapses and loses accuracy. Picking,
per text, the expert under which the text itself is most likely and copying that choice uses
the same unlabeled texts, and lets the router generalise it to texts it never saw. (The
entropy of the expert's own predictions, tried first, is a weaker judge: a wrong expert can be
confidently wrong.)
"""

from __future__ import annotations

from typing import Sequence

import torch

from mergekit_like.runtime.data import pad_batch


@torch.no_grad()
def pseudo_labels(model, dev, seqs: Sequence[list[int]], n_tasks: int, layers: int,
                  batch_size: int, entropy_of) -> torch.Tensor:
    """t*(x) [N] int64 for every text (see the module doc); ``entropy_of(model, ids, mask,
    routing, first)`` gives the per-sample score S [B] (lower: the expert fits the text better)
    under forced ``routing`` [L, B, T] of the batch whose first text is text ``first``."""
    out = []
    for k in range(0, len(seqs), batch_size):
        ids, mask = (t.to(dev) for t in pad_batch(list(seqs[k:k + batch_size]), "right"))
        per_task = []
        for t in range(n_tasks):
            routing = torch.zeros(layers, ids.shape[0], n_tasks, device=dev)
            routing[:, :, t] = 1.0
            per_task.append(entropy_of(model, ids, mask, routing, k))
        out.append(torch.stack(per_task, dim=1).argmin(dim=1).cpu())
    return torch.cat(out)


def routing_loss(model, ids: torch.Tensor, mask: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """L of one batch (scalar, float32): ids, mask [B, N]; targets [B] the texts' t*."""
    model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    r = torch.stack([mlp.live_r for mlp in model.wemoe_mlps()])        # [L, B, T]
    goal = torch.nn.functional.one_hot(targets, r.shape[-1]).to(r.dtype)
    return (r - goal[None]).square().sum(dim=-1).mean()


def label_counts(labels: torch.Tensor, tasks: Sequence[str]) -> dict[str, int]:
    """How many texts each expert predicted best."""
    return {t: int((labels == i).sum()) for i, t in enumerate(tasks)}


def sample_surprisal(model, ids: torch.Tensor, mask: torch.Tensor, routing: torch.Tensor,
                     score: torch.Tensor) -> torch.Tensor:
    """S [B] float32: the mean −log p(next token) over the positions ``score`` [B, N] marks,
    under forced ``routing`` [L, B, T]."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False,
                   wemoe_routing=routing).logits[:, :-1].float()
    nll = -logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]     # [B, N − 1]
    where = (score[:, :-1] * mask[:, 1:]).to(nll.dtype)
    return (nll * where).sum(dim=1) / where.sum(dim=1).clamp(min=1)


def confident_targets(model, dev, seqs: Sequence[list[int]], answers: Sequence[list[int]],
                      batch_size: int) -> tuple[torch.Tensor, dict[str, int]]:
    """(t* of every text on ``dev``, texts per expert); a text with an answer is judged on the
    positions that predict its answer."""
    tasks = list(model.config.wemoe["tasks"])
    lengths = [len(a) for a in answers]

    def entropy_of(m, ids, mask, routing, first):
        score = answer_positions(mask, lengths[first:first + len(ids)])
        return sample_surprisal(m, ids, mask, routing, score)

    labels = pseudo_labels(model, dev, seqs, len(tasks), len(model.wemoe_mlps()), batch_size,
                           entropy_of)
    return labels.to(dev), label_counts(labels, tasks)


def answer_positions(mask: torch.Tensor, answer_lengths: list[int]) -> torch.Tensor:
    """[B, N] mask of the positions whose next token is an answer token (the last real
    positions but one); every real position for a text without an answer."""
    score = mask.clone()
    n_real = mask.sum(dim=1).tolist()
    for b, (n, k) in enumerate(zip(n_real, answer_lengths)):
        if 0 < k < n:
            score[b] = 0
            score[b, n - 1 - k:n - 1] = 1
    return score
