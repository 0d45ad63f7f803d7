"""A tiny seeded Llama (vocab 48, hidden 32) saved with save_pretrained, a whitespace word
tokenizer for it, and JSON Lines writing: the models the runtime, eval and grid tests use."""

from __future__ import annotations

import json
from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 48
WORDS = "the cat sat on a mat dog ran far red blue sky is and".split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def save_tiny_llama(folder: Path, seed: int, with_tokenizer: bool = False) -> Path:
    """A seeded 2-layer Llama (vocab 48, hidden 32) saved with save_pretrained."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    if with_tokenizer:
        save_word_tokenizer(folder)
    return folder


def save_word_tokenizer(folder: Path) -> None:
    """A whitespace word-level tokenizer that prepends <s> (id 1) by default, like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>",
                                                unk_token="<unk>")
    fast.save_pretrained(folder)


def word_ids(text: str) -> list[int]:
    return [len(SPECIAL) + WORDS.index(w) for w in text.split()]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path
