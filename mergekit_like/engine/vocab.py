"""The output tokenizer of a vocabulary merge (mergekit ``tokenizer/build.py`` semantics;
docs/tokenizer.md §1–§2).

``build_vocab`` loads every model's tokenizer (from a temporary folder holding copies of its
tokenizer files only — never from, or into, the model's own folder), builds the output
tokenizer for ``tokenizer_source: base | union | <model>``, adds the tokens configured under
``tokenizer.tokens``, and computes for each model the permutation (output id -> the model's
own id, or -1) that ``ops.vocab.align_rows`` turns into aligned embedding / head rows.

Tokens whose id is ≥ the model's ``vocab_size`` (config.json) do not count as that model's:
they are left out of the union, stripped from the tokenizer the output is built from, and
read as absent (-1) in permutations.

``transformers`` is imported inside the functions (an optional extra).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mergekit_like.engine.chat_templates import (  # noqa: F401 - re-exported
    TEMPLATES,
    resolve_chat_template,
    set_chat_template,
)
from mergekit_like.errors import MergeError
from mergekit_like.io.side_files import TOKENIZER_FILES
from mergekit_like.io.source import CheckpointSource
from mergekit_like.ops.vocab import TokenRule

__all__ = ["MODES", "TEMPLATES", "VocabPlan", "build_vocab", "load_tokenizer", "model_vocab_size",
           "resolve_chat_template", "set_chat_template", "usable_vocab"]

MODES = ("base", "union", "model")
_LOAD_KWARGS_LEAKED = ("is_local", "local_files_only")  # load-time kwargs save_pretrained keeps


def _transformers(what: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise MergeError(f"{what} needs transformers "
                         "(pip install 'mergekit_like[runtime]')") from None
    return transformers


@dataclass
class VocabPlan:
    """The merged vocabulary and how each model's rows map onto it.

    vocab: output token -> id (ids 0..n-1). rows: output row count (n, padded up to
    ``pad_to_multiple_of``). permutations: model key -> int64 [n], the model's own id per
    output id or -1. token_rules: the configured tokens (model_token rules resolved to a
    token_id). base: the model key whose rows win for tokens several models share (None:
    no base). tokenizer: the output transformers tokenizer. model_rows: model key -> the
    model's ``vocab_size`` (config.json; the tokenizer's size when absent)."""

    vocab: dict[str, int]
    rows: int
    permutations: dict[str, torch.Tensor]
    token_rules: dict[str, TokenRule]
    base: str | None
    tokenizer: Any
    model_rows: dict[str, int] = field(default_factory=dict)

    def identity(self) -> bool:
        """True when aligning would reproduce every model's rows unchanged: no padding rows,
        every model's vocab_size == rows, every permutation is arange(n), no forced token."""
        n = len(self.vocab)
        if self.rows != n or any(r.force for r in self.token_rules.values()):
            return False
        ar = torch.arange(n, dtype=torch.int64)
        return all(self.model_rows.get(k) == self.rows and torch.equal(p, ar)
                   for k, p in self.permutations.items())

    def files(self, chat_template: str | None) -> dict[str, bytes]:
        """The output tokenizer's files (name -> bytes) as the installed transformers saves
        them, with ``chat_template`` set when given (``set_chat_template``)."""
        with tempfile.TemporaryDirectory(prefix="mergekit_like_tok_") as tmp:
            self.tokenizer.save_pretrained(tmp)
            out = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
        if "tokenizer_config.json" in out:
            cfg = json.loads(out["tokenizer_config.json"])
            if isinstance(cfg, dict) and any(k in cfg for k in _LOAD_KWARGS_LEAKED):
                for key in _LOAD_KWARGS_LEAKED:
                    cfg.pop(key, None)
                out["tokenizer_config.json"] = (json.dumps(cfg, indent=2, ensure_ascii=False)
                                                + "\n").encode("utf-8")
        return set_chat_template(out, chat_template) if chat_template else out


# ---- loading one model's tokenizer -----------------------------------------------------------

def model_vocab_size(source: CheckpointSource) -> int | None:
    """``vocab_size`` of the model's config.json (top level, else ``text_config``), or None."""
    cfg = source.config() or {}
    for node in (cfg, cfg.get("text_config")):
        if isinstance(node, dict) and isinstance(node.get("vocab_size"), int) \
                and not isinstance(node.get("vocab_size"), bool) and node["vocab_size"] > 0:
            return node["vocab_size"]
    return None


def _copy_tokenizer_files(source: CheckpointSource, folder: Path) -> list[str]:
    available = set(source.list_files())
    names = [f for f in TOKENIZER_FILES if f in available]
    if "tokenizer.json" not in names and "tokenizer.model" not in names:
        raise MergeError(f"{source.ref}: no tokenizer files (tokenizer.json or tokenizer.model) "
                         "to merge the vocabulary from")
    for name in names:
        shutil.copyfile(source.fetch_file(name), folder / name)
    return names


def _strip_json(folder: Path, ref: str, limit: int) -> None:
    """Remove every token with id ≥ ``limit`` from the copied tokenizer.json (model vocab and
    BPE merges that use it, added tokens) and tokenizer_config.json's added_tokens_decoder."""
    tj = folder / "tokenizer.json"
    if not tj.exists():
        raise MergeError(f"{ref}: the tokenizer has tokens beyond vocab_size={limit} and no "
                         "tokenizer.json to remove them from")
    data = json.loads(tj.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    vocab = model.get("vocab")
    unused = set()
    if isinstance(vocab, dict):
        unused = {t for t, i in vocab.items() if i >= limit}
        if unused and model.get("type") not in ("BPE", "WordLevel", "WordPiece"):
            raise MergeError(f"{ref}: the tokenizer ({model.get('type')}) has tokens beyond "
                             f"vocab_size={limit}; only BPE, WordLevel and WordPiece ones can "
                             "be stripped")
        model["vocab"] = {t: i for t, i in vocab.items() if i < limit}
    elif isinstance(vocab, list) and len(vocab) > limit:
        raise MergeError(f"{ref}: the tokenizer ({model.get('type')}) has tokens beyond "
                         f"vocab_size={limit}, which cannot be stripped")
    if unused and isinstance(model.get("merges"), list):
        model["merges"] = [m for m in model["merges"]
                           if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    data["added_tokens"] = [a for a in data.get("added_tokens") or [] if a.get("id", 0) < limit]
    tj.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tc = folder / "tokenizer_config.json"
    if tc.exists():
        cfg = json.loads(tc.read_text(encoding="utf-8"))
        dec = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
        if isinstance(dec, dict):
            cfg["added_tokens_decoder"] = {k: v for k, v in dec.items()
                                           if not (str(k).isdigit() and int(k) >= limit)}
            tc.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    added = folder / "added_tokens.json"
    if added.exists():
        table = json.loads(added.read_text(encoding="utf-8"))
        added.write_text(json.dumps({t: i for t, i in table.items() if i < limit}),
                         encoding="utf-8")


def load_tokenizer(source: CheckpointSource, strip: bool = False) -> Any:
    """The model's tokenizer, loaded from a temporary copy of its tokenizer files. With
    ``strip``, tokens with id ≥ the model's vocab_size are removed first (mergekit
    ``get_stripped_tokenizer``)."""
    transformers = _transformers("merging the vocabulary")
    limit = model_vocab_size(source)
    with tempfile.TemporaryDirectory(prefix="mergekit_like_tok_") as tmp:
        folder = Path(tmp)
        _copy_tokenizer_files(source, folder)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(folder))
            if strip and limit is not None and any(i >= limit for i in tok.get_vocab().values()):
                _strip_json(folder, source.ref, limit)
                tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        except MergeError:
            raise
        except Exception as exc:  # noqa: BLE001 - any loader failure is the model's problem
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise MergeError(f"{source.ref}: cannot load its tokenizer ({first})") from None
    return tok


def usable_vocab(tokenizer: Any, limit: int | None) -> dict[str, int]:
    """token -> id of the tokenizer's tokens with id < ``limit`` (all when None)."""
    return {t: i for t, i in tokenizer.get_vocab().items() if limit is None or i < limit}


# ---- the output tokenizer --------------------------------------------------------------------

def _union(base_key: str, toks: dict[str, Any], vocabs: dict[str, dict[str, int]]) -> Any:
    """mergekit ``build_union_tokenizer``: the base tokenizer plus, appended, every other
    model's tokens it lacks — regular tokens first (in model order, each model's tokens by id),
    then added tokens with their settings (the first model's settings win)."""
    base_tok = toks[base_key]
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for key in [base_key] + [k for k in toks if k != base_key]:
        decoder = toks[key].added_tokens_decoder
        for tok, idx in sorted(vocabs[key].items(), key=lambda kv: kv[1]):
            if idx in decoder:
                added.setdefault(decoder[idx].content, decoder[idx])
            else:
                regular.setdefault(tok, None)
    base_vocab = base_tok.get_vocab()
    new_regular = [tok for tok in regular if tok not in base_vocab and tok not in added]
    if new_regular:  # one call: ids follow the list order, as one call per token would give
        base_tok.add_tokens(new_regular)
    new_added = [info for info in added.values() if info.content not in base_vocab]
    if new_added:  # AddedTokens keep their settings (special, strip, normalized)
        base_tok.add_tokens(new_added)
    return base_tok


def _permutation(out_vocab: dict[str, int], own: dict[str, int]) -> torch.Tensor:
    p = torch.full((len(out_vocab),), -1, dtype=torch.int64)
    ids = [(new, own[tok]) for tok, new in out_vocab.items() if tok in own]
    if ids:
        idx = torch.tensor(ids, dtype=torch.int64)
        p[idx[:, 0]] = idx[:, 1]
    return p


def _resolve_rules(tokens: dict[str, TokenRule], sources: dict[str, CheckpointSource],
                   vocabs: dict[str, dict[str, int]]) -> dict[str, TokenRule]:
    out: dict[str, TokenRule] = {}
    for token, rule in tokens.items():
        if rule.kind != "zero" and rule.model not in sources:
            raise MergeError(f"tokenizer.tokens[{token!r}]: model {rule.model!r} is not one of "
                             "the merged models")
        if rule.kind == "model" and token not in vocabs[rule.model]:
            raise MergeError(f"tokenizer.tokens[{token!r}]: {sources[rule.model].ref} does not "
                             "have this token, so it cannot give its row")
        if rule.kind == "model_token" and rule.token_id is None:
            if rule.token is None or rule.token not in vocabs[rule.model]:
                raise MergeError(f"tokenizer.tokens[{token!r}]: token {rule.token!r} is not in "
                                 f"the vocabulary of {sources[rule.model].ref}")
            rule = replace(rule, token_id=vocabs[rule.model][rule.token])
        out[token] = rule
    return out


def _output_tokenizer(mode: str, base_key: str, donor: str | None,
                      sources: dict[str, CheckpointSource], toks: dict[str, Any],
                      vocabs: dict[str, dict[str, int]]) -> Any:
    if mode == "base":
        return load_tokenizer(sources[base_key], strip=True)
    if mode == "model":
        return load_tokenizer(sources[donor], strip=True)
    stripped = dict(toks)
    stripped[base_key] = load_tokenizer(sources[base_key], strip=True)
    return _union(base_key, stripped, vocabs)


def build_vocab(mode: str, sources: dict[str, CheckpointSource], base: str | None,
                donor: str | None, tokens: dict[str, TokenRule],
                pad_to_multiple_of: int | None) -> VocabPlan:
    """The output vocabulary and per-model permutations for ``tokenizer_source`` ``mode``
    ("base" | "union" | "model", with ``donor`` the model key for "model").

    sources: model key -> its CheckpointSource (every model whose rows are aligned, the base
    included). base: the base model's key or None; the output tokenizer of "base"/"union"
    starts from it (from the first source when None, as mergekit does), and it wins the rows
    of shared tokens. tokens: configured tokens, each added to the output vocabulary if
    missing. Raises MergeError (one line, naming the model) on bad input."""
    if mode not in MODES:
        raise MergeError(f"tokenizer source {mode!r} is not one of base, union or a model")
    if not sources:
        raise MergeError("merging the vocabulary needs at least one model")
    if mode == "model" and donor not in sources:
        raise MergeError(f"tokenizer source model {donor!r} is not one of the merged models")
    if base is not None and base not in sources:
        raise MergeError(f"base model {base!r} is not one of the merged models")
    base_key = base if base is not None else next(iter(sources))
    toks = {k: load_tokenizer(s) for k, s in sources.items()}
    limits = {k: model_vocab_size(s) for k, s in sources.items()}
    vocabs = {k: usable_vocab(toks[k], limits[k]) for k in sources}
    rules = _resolve_rules(tokens, sources, vocabs)

    out_tok = _output_tokenizer(mode, base_key, donor, sources, toks, vocabs)
    for token in tokens:
        if token not in out_tok.get_vocab():
            out_tok.add_tokens(token)
    vocab = dict(sorted(out_tok.get_vocab().items(), key=lambda kv: kv[1]))
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise MergeError("the output vocabulary's ids are not 0..n-1 (a tokenizer with gaps "
                         "in its ids cannot be merged)")
    n = len(vocab)
    rows = n
    if pad_to_multiple_of and n % pad_to_multiple_of:
        rows = (n // pad_to_multiple_of + 1) * pad_to_multiple_of
    perms = {k: _permutation(vocab, vocabs[k]) for k in sources}
    model_rows = {k: (limits[k] if limits[k] is not None else len(toks[k].get_vocab()))
                  for k in sources}
    return VocabPlan(vocab=vocab, rows=rows, permutations=perms, token_rules=rules, base=base,
                     tokenizer=out_tok, model_rows=model_rows)
