"""Evaluation examples: reading them from JSON Lines, and packing token lists into padded batches.

One example per non-blank line, a JSON object with

* either ``"text": str`` (tokenized with the model's tokenizer with its default special tokens,
  i.e. ``tokenizer(text)["input_ids"]``: a Llama tokenizer prepends BOS, exactly as the model saw
  text in training) or ``"input_ids": [int, ...]`` (used as is, nothing added);
* optionally ``"answer"``: a string, tokenized on its own **without** special tokens (include the
  leading space your tokenizer expects, e.g. ``" Paris"``), or a list of token ids;
* optionally ``"task"``: a string naming the example's task (accuracy is reported per task).

Other keys are ignored. Any other shape is a MergeError ``FILE:LINE: …``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from mergekit_like.errors import MergeError


@dataclass
class Example:
    """input_ids: the prompt (or the text) tokens; answer_ids: the expected continuation, or None;
    task: the task name, or None."""

    input_ids: list[int]
    answer_ids: list[int] | None = None
    task: str | None = None

    @property
    def sequence(self) -> list[int]:
        """input_ids + answer_ids: the tokens a perplexity evaluation scores."""
        return self.input_ids + (self.answer_ids or [])


def numbered_lines(path: str | Path) -> Iterator[tuple[str, str]]:
    """(``FILE:LINE``, text) of every non-blank line of a JSON Lines file; a missing file is a
    MergeError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MergeError(f"{path}: no such data file")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield f"{path}:{number}", line


def read_examples(path: str | Path, tokenizer: Any | None = None,
                  text_field: str = "text") -> list[Example]:
    """Every example of the JSON Lines file ``path`` (blank lines skipped), in file order;
    ``text_field`` names the key read instead of ``"text"``."""
    examples = [_parse_line(line, where, tokenizer, text_field)
                for where, line in numbered_lines(path)]
    if not examples:
        raise MergeError(f"{path}: no examples (expected one JSON object per line)")
    return examples


def check_examples(path: str | Path, text_field: str = "text") -> int:
    """Check every line's shape without a tokenizer (before a model is loaded); returns the
    number of examples. The same MergeErrors as ``read_examples``."""
    def placeholder(text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": [0] if text else []}

    return len(read_examples(path, placeholder, text_field))


def json_object(line: str, where: str) -> dict[str, Any]:
    """The JSON object on one line; MergeError ``FILE:LINE: …`` when it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MergeError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(record, dict):
        raise MergeError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _parse_line(line: str, where: str, tokenizer: Any | None, text_field: str = "text") -> Example:
    record = json_object(line, where)
    if (text_field in record) == ("input_ids" in record):
        raise MergeError(f"{where}: give exactly one of \"{text_field}\" or \"input_ids\"")
    if text_field in record:
        input_ids = _tokenize(record[text_field], text_field, where, tokenizer,
                              special_tokens=True)
    else:
        input_ids = _token_list(record["input_ids"], "input_ids", where)
    answer = record.get("answer")
    answer_ids = None
    if isinstance(answer, str):
        answer_ids = _tokenize(answer, "answer", where, tokenizer, special_tokens=False)
    elif answer is not None:
        answer_ids = _token_list(answer, "answer", where)
    task = record.get("task")
    if task is not None and not isinstance(task, str):
        raise MergeError(f"{where}: \"task\" must be a string, got {type(task).__name__}")
    return Example(input_ids=input_ids, answer_ids=answer_ids, task=task)


def _tokenize(text: Any, key: str, where: str, tokenizer: Any | None, special_tokens: bool) -> list[int]:
    if not isinstance(text, str):
        raise MergeError(f"{where}: \"{key}\" must be a string, got {type(text).__name__}")
    if tokenizer is None:
        raise MergeError(f"{where}: \"{key}\" is a string but the model has no tokenizer; "
                         f"give token ids instead (\"input_ids\" / \"answer\" as a list of ints)")
    ids = list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
    if not ids:
        raise MergeError(f"{where}: \"{key}\" tokenizes to no tokens")
    return ids


def _token_list(value: Any, key: str, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise MergeError(f"{where}: \"{key}\" must be a non-empty list of token ids")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise MergeError(f"{where}: \"{key}\" holds {v!r}; token ids are non-negative integers")
    return list(value)


def check_token_ids(examples: Sequence[Example], vocab_size: int) -> None:
    """MergeError naming the first example (1-based, file order) with no input token or holding
    an id outside [0, vocab_size)."""
    for number, ex in enumerate(examples, start=1):
        if not ex.input_ids:
            raise MergeError(f"example {number}: no input tokens")
        if min(ex.sequence) < 0:
            raise MergeError(f"example {number}: negative token id {min(ex.sequence)}")
        top = max(ex.sequence)
        if top >= vocab_size:
            raise MergeError(f"example {number}: token id {top} is out of range for the model's "
                             f"vocabulary of {vocab_size}")


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices 0..n-1 sorted by length (stable), cut into batches of at most batch_size:
    batches of similar lengths waste the least padding."""
    if batch_size < 1:
        raise MergeError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def pad_batch(seqs: Sequence[list[int]], side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack token lists into ``ids`` [B, T] int64 and ``mask`` [B, T] int64 (1 = token, 0 = pad),
    T = the longest sequence; ``side`` "right" puts the tokens first, "left" last."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask
