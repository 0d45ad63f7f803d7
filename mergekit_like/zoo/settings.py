"""What a zoo is built with: model size, training runs, split sizes, seed; and the two presets.

``FULL`` is the zoo of docs/quality.md's tables (a few minutes on two CPU cores); ``FAST`` the
smallest one that still shows every fine-tune clearly ahead of the base (for CI, under a minute).

The base trains on the ``pretrain`` splits of every task plus the small ``instruct`` splits of the
skill tasks (one mixture, sampled uniformly); every fine-tune draws a ``replay`` share of each
batch from that same mixture, so it learns its task while keeping most of what the base knew, and
the domain fine-tune is a gentle one (few steps, low rate), so that it and the reasoning
fine-tune can share one model (the RCP rows of docs/quality.md §4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mergekit_like.zoo.tasks import INSTRUCT_SPLIT, PRETRAIN_SPLIT, TASK_KIND
from mergekit_like.zoo.train import ModelShape, TrainConfig


@dataclass(frozen=True)
class ZooSettings:
    """shape: the tiny Llama; base: its training on the pretrain splits of every task and the
    instruct splits of the skill tasks; finetune: each skill fine-tune; reasoning_finetune: the
    reasoning fine-tunes (a harder task: more steps, a higher rate); domain_finetune: the domain
    fine-tunes (gentle: fewer steps); each fine-tune's ``replay`` is the share of its batches
    drawn from the base's mixture; split_sizes: examples per task and split, drawn in this
    order (each split disjoint from the ones before; ``instruct`` exists for the skill tasks
    only); seed: data, init and batch order (it replaces the ``seed`` of the training runs:
    base ``seed``, fine-tune i ``seed + i + 1``)."""

    shape: ModelShape
    base: TrainConfig
    finetune: TrainConfig
    reasoning_finetune: TrainConfig
    domain_finetune: TrainConfig
    split_sizes: tuple[tuple[str, int], ...]
    seed: int = 0

    def finetune_config(self, task: str) -> TrainConfig:
        """The training run of ``task``'s fine-tune."""
        return {"skill": self.finetune, "reasoning": self.reasoning_finetune,
                "domain": self.domain_finetune}[TASK_KIND[task]]

    def to_json(self) -> dict:
        """Plain JSON-able dict (the manifest's ``settings``; hashed for the cache)."""
        return dataclasses.asdict(self)


FULL = ZooSettings(
    shape=ModelShape(hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4),
    base=TrainConfig(steps=1500, lr=5e-3),
    finetune=TrainConfig(steps=200, lr=1e-3, replay=0.5),
    reasoning_finetune=TrainConfig(steps=600, lr=5e-3, replay=0.25),
    domain_finetune=TrainConfig(steps=100, lr=1e-3, replay=0.5),
    split_sizes=((INSTRUCT_SPLIT, 40), ("train", 2000), ("validation", 200), ("test", 300),
                 (PRETRAIN_SPLIT, 2000)),
)

FAST = ZooSettings(
    shape=ModelShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4),
    base=TrainConfig(steps=600, lr=5e-3),
    finetune=TrainConfig(steps=200, lr=2e-3, replay=0.5),
    reasoning_finetune=TrainConfig(steps=600, lr=5e-3, replay=0.25),
    domain_finetune=TrainConfig(steps=100, lr=1e-3, replay=0.5),
    split_sizes=((INSTRUCT_SPLIT, 40), ("train", 1000), ("validation", 100), ("test", 200),
                 (PRETRAIN_SPLIT, 1000)),
)

PRESETS = {"full": FULL, "fast": FAST}
DEFAULT_SEEDS = {"full": (0, 1, 2), "fast": (0,)}  # one zoo per seed; tables average over them
DEFAULT_DIRS = {"full": ".zoo", "fast": ".zoo-fast"}  # cache folders, under the repository root
