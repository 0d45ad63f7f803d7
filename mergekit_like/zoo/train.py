"""Tiny Llama models for the zoo: build, train on answer tokens only, save.

Everything runs in float32 on the CPU (bfloat16 kernels are not portable to every CPU). Training
is deterministic for a given seed and thread count: batches are drawn by a seeded
``torch.Generator`` and the model is initialised after ``torch.manual_seed``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from mergekit_like.zoo.tasks import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, TaskExample

IGNORE_INDEX = -100  # label of the tokens that carry no loss (prompt, padding)


@dataclass(frozen=True)
class ModelShape:
    """The tiny Llama's size (vocabulary = the task vocabulary, untied embeddings)."""

    hidden_size: int = 96
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 64


@dataclass(frozen=True)
class TrainConfig:
    """One training run: ``steps`` AdamW updates of ``batch_size`` examples, linear warm-up over
    the first ``warmup`` fraction, then cosine decay to ``final_lr_frac`` × ``lr``. ``replay``:
    the fraction of every batch drawn from a second pool (a fine-tune's "replay" of the data its
    base was trained on), the rest from the run's own examples."""

    steps: int
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 0.01
    warmup: float = 0.05
    final_lr_frac: float = 0.1
    replay: float = 0.0
    seed: int = 0


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (results then do not depend on the
    machine's core count; tiny models gain little from more threads anyway)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_model(shape: ModelShape, seed: int):
    """A freshly initialised ``LlamaForCausalLM`` in float32, its weights drawn after
    ``torch.manual_seed(seed)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32)


def encode_batch(examples: Sequence[TaskExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, labels)``, both int64 ``[len(examples), max_len]``.

    Each row is prompt + answer; labels are -100 on the prompt and on padding, so the loss is
    on the answer tokens only (transformers shifts the labels by one inside the model).
    """
    width = max(len(e.input_ids) + len(e.answer) for e in examples)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        p, a = len(e.input_ids), len(e.answer)
        ids[row, :p + a] = torch.tensor(e.input_ids + e.answer)
        labels[row, p:p + a] = torch.tensor(e.answer)
    return ids, labels


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` (0-based) of the warm-up + cosine schedule."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    floor = cfg.final_lr_frac
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def replay_rows(cfg: TrainConfig, n_replay_pool: int) -> int:
    """How many rows of each batch come from the replay pool (none without a pool)."""
    return round(cfg.batch_size * cfg.replay) if n_replay_pool else 0


def train(model, examples: Sequence[TaskExample], cfg: TrainConfig,
          replay: Sequence[TaskExample] = ()) -> list[float]:
    """Train ``model`` in place on ``examples`` (sampled uniformly with replacement) and, for a
    ``cfg.replay`` share of every batch, on ``replay`` (likewise); returns the loss of every step.
    Right padding needs no attention mask: the model is causal, so padding after a row's answer
    never influences its loss."""
    ids, labels = encode_batch(list(examples) + list(replay))
    n_own, n_replay = len(examples), len(replay)
    k = replay_rows(cfg, n_replay)
    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    model.train()
    losses: list[float] = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        rows = torch.randint(n_own, (cfg.batch_size - k,), generator=gen)
        if k:
            rows = torch.cat([rows, n_own + torch.randint(n_replay, (k,), generator=gen)])
        batch_ids, batch_labels = ids[rows], labels[rows]
        keep = int((batch_labels != IGNORE_INDEX).any(0).nonzero().max()) + 1  # trim the padding
        loss = model(input_ids=batch_ids[:, :keep], labels=batch_labels[:, :keep]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def save_model(model, folder: Path) -> Path:
    """Save as a transformers checkpoint: ``config.json``, ``generation_config.json`` and a
    single float32 ``model.safetensors``."""
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    model.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    return folder
