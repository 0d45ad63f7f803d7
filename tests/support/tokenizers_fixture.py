"""Tiny model folders with their own WordLevel tokenizers, for vocabulary-merge tests.

Each folder holds config.json (vocab_size, hidden_size), model.safetensors (a seeded
``model.embed_tokens.weight`` and ``lm_head.weight``, [vocab_size, HIDDEN] float32) and
tokenizer.json + tokenizer_config.json saved by transformers (PreTrainedTokenizerFast).
Row i of each weight belongs to the token with id i in that model's own tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

transformers = __import__("pytest").importorskip("transformers")

HIDDEN = 8
SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = [f"w{i}" for i in range(13)]  # 3 + 13 = 16 base tokens


def save_tokenizer(folder: Path, words: list[str], added: list[tuple[str, bool]] = (),
                   chat_template: str | None = None) -> None:
    """A whitespace WordLevel tokenizer over SPECIAL + words, then ``added`` tokens appended
    as AddedTokens ((content, special) pairs), saved with save_pretrained."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    for content, special in added:
        fast.add_tokens(AddedToken(content, special=special, normalized=not special))
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    cfg_path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def make_model(folder: Path, seed: int, words: list[str] = WORDS,
               added: list[tuple[str, bool]] = (), vocab_size: int | None = None,
               dtype: torch.dtype = torch.float32, chat_template: str | None = None,
               tokenizer: bool = True) -> Path:
    """A model folder whose weights have ``vocab_size`` rows (default: the tokenizer's size)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_tok = len(SPECIAL) + len(words) + len(added)
    rows = vocab_size if vocab_size is not None else n_tok
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(rows, HIDDEN, generator=g).to(dtype),
               "lm_head.weight": torch.randn(rows, HIDDEN, generator=g).to(dtype)}
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": rows,
        "hidden_size": HIDDEN, "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2))
    if tokenizer:
        save_tokenizer(folder, words, added, chat_template)
    return folder


def own_vocab(folder: Path) -> dict[str, int]:
    """The model's token -> id, read straight from its tokenizer.json (not through the code
    under test): the model vocab plus the added tokens."""
    data = json.loads((Path(folder) / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    for entry in data["added_tokens"]:
        vocab[entry["content"]] = entry["id"]
    return vocab


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))
