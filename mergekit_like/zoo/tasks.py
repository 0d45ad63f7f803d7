"""Synthetic sequence tasks over one shared token vocabulary, for the merge-quality zoo.

Every example is ``prompt SEP answer``: the prompt is ``[BOS, <marker>, *body, SEP]`` and the
answer a short list of token ids the model must continue with (greedy, exact match). All tasks
share the vocabulary and that layout; each has its own marker token and body format.

Tasks (kind in parentheses):

* ``copy`` (skill): 2–4 symbols (digits, letters a–h) → the same symbols.
* ``reverse`` (skill): 2–4 symbols → the symbols reversed.
* ``sort`` (skill): 2–4 digits → the digits in ascending order.
* ``increment`` (skill): 2–4 digits → each digit plus one, mod 10.
* ``chain`` (reasoning): a start digit then 3 steps ``op n`` (op in + −, n in 1–9), mod 10 →
  every intermediate value (the last one is the result).
* ``cipher`` (domain): 3–6 letters separated by commas → one digit per letter through a fixed
  table (a memorised "domain fact"; the only comma-separated format).

Each task has two markers: ``<task>`` (the instruction the fine-tunes and every evaluation split
use) and ``<pre:task>`` (used only by the ``pretrain`` split the zoo's base model is trained on).
The base learns the skills under those other prompts, as a pretrained model does, and sees the
instructions only in a small ``instruct`` split of the skill tasks whose bodies are all short
(``INSTRUCT_LENGTH``: 2 symbols; evaluation bodies have 2–4): like a capable base model it then
partly follows the skill instructions (how far it carries them to longer bodies varies by task and
seed), and a fine-tune still has its task's instruction to master. Splits come from disjoint seeds and are deduplicated by
body (the prompt without its marker): no two splits of a task share a body.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

DIGITS = tuple(str(d) for d in range(10))
LETTERS = tuple("abcdefgh")
SYMBOLS = DIGITS + LETTERS
SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>")
OPERATORS = ("+", "-", "*", "=", ",", "?")

SKILL_TASKS = ("copy", "reverse", "sort", "increment")
REASONING_TASKS = ("chain",)
DOMAIN_TASKS = ("cipher",)
ALL_TASKS = SKILL_TASKS + REASONING_TASKS + DOMAIN_TASKS
TASK_KIND = {**{t: "skill" for t in SKILL_TASKS}, **{t: "reasoning" for t in REASONING_TASKS},
             **{t: "domain" for t in DOMAIN_TASKS}}
PRETRAIN_SPLIT = "pretrain"  # the split drawn with the ``<pre:task>`` markers
INSTRUCT_SPLIT = "instruct"  # the base's few instruction examples (skill tasks, short bodies)
INSTRUCT_TASKS = SKILL_TASKS

TOKENS: tuple[str, ...] = (SPECIALS + SYMBOLS + OPERATORS + tuple(f"<{t}>" for t in ALL_TASKS)
                           + tuple(f"<pre:{t}>" for t in ALL_TASKS))
TOKEN_ID: dict[str, int] = {tok: i for i, tok in enumerate(TOKENS)}
VOCAB_SIZE = len(TOKENS)
PAD_ID, BOS_ID, EOS_ID, SEP_ID = (TOKEN_ID[t] for t in SPECIALS)

SKILL_LENGTH = (2, 4)   # symbols per skill-task body (inclusive range)
INSTRUCT_LENGTH = (2, 2)  # the skill-task body lengths of the ``instruct`` split
CHAIN_STEPS = 3
CHAIN_OPS = "+-"
CIPHER_LENGTH = (3, 6)
# the cipher task's fixed letter -> digit table (not derived from any seed: it is the "domain")
CIPHER_TABLE = dict(zip(LETTERS, ("7", "2", "9", "4", "0", "6", "1", "8")))


def encode(tokens: list[str]) -> list[int]:
    """Token strings -> ids (KeyError on a token outside the vocabulary)."""
    return [TOKEN_ID[t] for t in tokens]


def decode(ids: list[int]) -> list[str]:
    """Token ids -> token strings."""
    return [TOKENS[i] for i in ids]


@dataclass(frozen=True)
class TaskExample:
    """One example: ``input_ids`` = [BOS, marker, *body, SEP]; ``answer`` = the ids to generate."""

    task: str
    input_ids: tuple[int, ...]
    answer: tuple[int, ...]

    @property
    def body(self) -> tuple[int, ...]:
        """The prompt without BOS and marker (what the splits are deduplicated on)."""
        return self.input_ids[2:]

    def to_json(self) -> dict:
        """The jsonl record the runtime's ``read_examples`` reads."""
        return {"input_ids": list(self.input_ids), "answer": list(self.answer), "task": self.task}


# ---- body generators: rng -> (body tokens, answer tokens) ------------------------------------

def _symbols(rng: random.Random, pool: tuple[str, ...], length: tuple[int, int]) -> list[str]:
    return [rng.choice(pool) for _ in range(rng.randint(*length))]


Length = Optional[tuple[int, int]]  # a skill body's length range; None: SKILL_LENGTH


def _copy(rng: random.Random, length: Length = None) -> tuple[list[str], list[str]]:
    s = _symbols(rng, SYMBOLS, length or SKILL_LENGTH)
    return s, list(s)


def _reverse(rng: random.Random, length: Length = None) -> tuple[list[str], list[str]]:
    s = _symbols(rng, SYMBOLS, length or SKILL_LENGTH)
    return s, s[::-1]


def _sort(rng: random.Random, length: Length = None) -> tuple[list[str], list[str]]:
    s = _symbols(rng, DIGITS, length or SKILL_LENGTH)
    return s, sorted(s)


def _increment(rng: random.Random, length: Length = None) -> tuple[list[str], list[str]]:
    s = _symbols(rng, DIGITS, length or SKILL_LENGTH)
    return s, [str((int(c) + 1) % 10) for c in s]


def _chain(rng: random.Random, length: Length = None) -> tuple[list[str], list[str]]:
    value = rng.randint(0, 9)
    body, steps = [str(value)], []
    for _ in range(CHAIN_STEPS):
        op, n = rng.choice(CHAIN_OPS), rng.randint(1, 9)
        value = {"+": value + n, "-": value - n, "*": value * n}[op] % 10
        body += [op, str(n)]
        steps.append(str(value))
    return body, steps


def _cipher(rng: random.Random, length: Length = None) -> tuple[list[str], list[str]]:
    s = _symbols(rng, LETTERS, CIPHER_LENGTH)
    body = [tok for c in s for tok in (c, ",")][:-1]
    return body, [CIPHER_TABLE[c] for c in s]


# (rng, skill body length range or None) -> (body, answer); chain and cipher ignore the length
GENERATORS: dict[str, Callable[..., tuple[list[str], list[str]]]] = {
    "copy": _copy, "reverse": _reverse, "sort": _sort, "increment": _increment,
    "chain": _chain, "cipher": _cipher,
}
assert set(GENERATORS) == set(ALL_TASKS)


def make_example(task: str, rng: random.Random, pretrain: bool = False,
                 length: tuple[int, int] | None = None) -> TaskExample:
    """One example of ``task`` drawn from ``rng``; marker ``<pre:task>`` if ``pretrain``;
    ``length``: a skill body's length range (default ``SKILL_LENGTH``)."""
    body, answer = GENERATORS[task](rng, length)
    marker = f"<pre:{task}>" if pretrain else f"<{task}>"
    prompt = [TOKENS[BOS_ID], marker, *body, TOKENS[SEP_ID]]
    return TaskExample(task, tuple(encode(prompt)), tuple(encode(answer)))


def split_rng(task: str, split: str, seed: int) -> random.Random:
    """The generator of one (task, split): seeded by a string, so independent of the hash seed
    and of every other split."""
    return random.Random(f"zoo/{seed}/{task}/{split}")


def draw_unique(task: str, n: int, rng: random.Random, exclude: set[tuple[int, ...]],
                pretrain: bool = False, max_tries_per_example: int = 50,
                length: tuple[int, int] | None = None) -> list[TaskExample]:
    """``n`` examples with distinct bodies, none in ``exclude`` (a set of bodies, updated with
    the drawn ones). Raises ValueError when the task has too few distinct bodies left."""
    out: list[TaskExample] = []
    for _ in range(n * max_tries_per_example):
        if len(out) == n:
            break
        ex = make_example(task, rng, pretrain, length)
        if ex.body not in exclude:
            exclude.add(ex.body)
            out.append(ex)
    if len(out) < n:
        raise ValueError(f"task {task!r}: only {len(out)} distinct new prompts of {n} requested")
    return out


def task_splits(task: str, split_names) -> list[str]:
    """The splits ``task`` has among ``split_names``: all of them, except ``instruct`` outside
    ``INSTRUCT_TASKS``."""
    return [s for s in split_names if s != INSTRUCT_SPLIT or task in INSTRUCT_TASKS]


def make_splits(task: str, sizes: dict[str, int], seed: int) -> dict[str, list[TaskExample]]:
    """Splits of one task, e.g. ``{"instruct": 40, "train": 2000, "validation": 200,
    "test": 300, "pretrain": 2000}``, each drawn from its own seed.

    Drawn in the order of ``sizes``, each excluding every body of the splits before it, so the
    splits are pairwise disjoint by body (hence by prompt). The ``pretrain`` split carries the
    ``<pre:task>`` marker; the ``instruct`` split (skill tasks only, see ``task_splits``) has
    bodies of ``INSTRUCT_LENGTH``. Where a length has few distinct bodies, the first splits take
    them all: ``sort`` has 100 two-digit bodies, so with 40 instruct and 2000 train examples the
    later splits hold three- and four-digit bodies only.
    """
    seen: set[tuple[int, ...]] = set()
    return {split: draw_unique(task, sizes[split], split_rng(task, split, seed), seen,
                               pretrain=split == PRETRAIN_SPLIT,
                               length=INSTRUCT_LENGTH if split == INSTRUCT_SPLIT else None)
            for split in task_splits(task, sizes)}
