"""The recipe's ``tokenizer:`` block (mergekit ``tokenizer/config.py``; docs/tokenizer.md §6)::

    tokenizer:
      source: union            # base | union | <model reference>; default union
      pad_to_multiple_of: 64   # optional positive integer
      tokens:                  # optional: tokens to add / whose rows to choose
        "<|im_start|>":
          source: org/chat-model                 # that model's own row for the token
          force: true                            # also override models that have the token
        "<pad>":
          source: {kind: zero}                   # a zero row
        "<|im_end|>":
          source: {kind: model_token, model: org/chat-model, token: "</s>"}  # or token_id: 2

Every token listed is added to the output vocabulary when it is missing. mergekit accepts a
token entry without ``source`` but then fails while merging; here that is a recipe error.
Model references are turned into the caller's objects by ``parse_model``. The caller also
refuses ``tokenizer_source`` together with ``tokenizer`` (mergekit does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError

from mergekit_like.recipe.schema import suggest, type_name, unknown_key
from mergekit_like.recipe.yaml_lines import Locator

BLOCK = ("tokenizer",)
BLOCK_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")
KINDS = ("zero", "model_token")
MODEL_TOKEN_KEYS = ("kind", "model", "token", "token_id")


class TokenDoc(BaseModel):
    """One entry of ``tokens`` (``source`` checked by hand: a model reference or a kind map)."""

    model_config = ConfigDict(extra="forbid")
    source: Any = None
    force: StrictBool = False


class TokenizerDoc(BaseModel):
    """The ``tokenizer:`` block; values are checked by ``parse_tokenizer``."""

    model_config = ConfigDict(extra="forbid")
    source: Any = "union"
    tokens: dict[Any, TokenDoc] | None = None
    pad_to_multiple_of: Any = None


@dataclass(frozen=True)
class ParsedToken:
    """A configured token's row source. kind "model": ``model``'s own row; "zero": a zero row;
    "model_token": ``model``'s row for ``token`` (a string in its vocabulary) or ``token_id``
    (exactly one is set). ``model`` is what ``parse_model`` returned."""

    kind: Literal["zero", "model", "model_token"]
    model: Any = None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSettings:
    """The parsed block: ``source`` is "base", "union" or a ``parse_model`` result."""

    source: Any
    tokens: dict[str, ParsedToken]
    pad_to_multiple_of: int | None


def _translate(err: dict, loc: Locator) -> Exception:
    """One pydantic error of TokenizerDoc as a located one-line error."""
    rel = tuple(err["loc"])
    path = BLOCK + rel
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        known = TOKEN_KEYS if len(rel) == 3 and rel[0] == "tokens" else BLOCK_KEYS
        return unknown_key(loc, path, known)
    if rel[-1:] == ("force",):
        return loc.error(path, f"force must be true or false, got {type_name(value)}")
    if rel == ("tokens",):
        return loc.error(path, "expected a map of token string -> {source: ..., force: ...}, "
                               f"got {type_name(value)}")
    if rel[:1] == ("tokens",) and len(rel) == 2:
        return loc.error(path, f"expected a map like {{source: org/name, force: false}}, "
                               f"got {type_name(value)}")
    return loc.error(path, err.get("msg", "invalid value"))  # pragma: no cover - fallback


def _pad(value: Any, loc: Locator) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise loc.error(BLOCK + ("pad_to_multiple_of",),
                        f"must be a positive integer, got {type_name(value)}")
    return value


def _source(value: Any, loc: Locator, parse_model: Callable[[Any, tuple], Any]) -> Any:
    if value in ("base", "union"):
        return value
    if value is None:
        raise loc.error(BLOCK + ("source",), "must be base, union or a model reference, got null")
    return parse_model(value, BLOCK + ("source",))


def _model_token(src: dict, path: tuple, loc: Locator,
                 parse_model: Callable[[Any, tuple], Any]) -> tuple[Any, str | None, int | None]:
    for key in src:
        if key not in MODEL_TOKEN_KEYS:
            raise unknown_key(loc, path + (key,), MODEL_TOKEN_KEYS)
    if src.get("model") is None:
        raise loc.error(path, "kind model_token needs 'model' (the model whose row is copied)")
    has_token, has_id = src.get("token") is not None, src.get("token_id") is not None
    if has_token == has_id:
        raise loc.error(path, "kind model_token needs exactly one of 'token' (a token string) "
                              "or 'token_id' (a row index)" + (", not both" if has_token else ""))
    token, token_id = src.get("token"), src.get("token_id")
    if has_token and (not isinstance(token, str) or not token):
        raise loc.error(path + ("token",), f"expected a token string, got {type_name(token)}")
    if has_id and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise loc.error(path + ("token_id",),
                        f"must be a non-negative integer, got {type_name(token_id)}")
    return parse_model(src["model"], path + ("model",)), token, token_id


def _token(name: Any, doc: TokenDoc, loc: Locator,
           parse_model: Callable[[Any, tuple], Any]) -> ParsedToken:
    path = BLOCK + ("tokens", name)
    if not isinstance(name, str) or not name:
        raise loc.error(path, f"token keys must be non-empty strings, got {type_name(name)}")
    src = doc.source
    spath = path + ("source",)
    if src is None:
        raise loc.error(path, "'source' is required (a model reference, {kind: zero} or "
                              "{kind: model_token, model: ..., token: ...})")
    if isinstance(src, dict) and "kind" in src:
        kind = src["kind"]
        if kind not in KINDS:
            hint = suggest(str(kind), KINDS) if isinstance(kind, str) else ""
            raise loc.error(spath + ("kind",), f"{type_name(kind)} is not a token source kind"
                                               f"{hint} (known: {', '.join(KINDS)})")
        if kind == "zero":
            for key in src:
                if key != "kind":
                    raise unknown_key(loc, spath + (key,), ("kind",))
            return ParsedToken("zero", force=doc.force)
        model, token, token_id = _model_token(src, spath, loc, parse_model)
        return ParsedToken("model_token", model, token, token_id, doc.force)
    return ParsedToken("model", parse_model(src, spath), force=doc.force)


def parse_tokenizer(block: Any, loc: Locator,
                    parse_model: Callable[[Any, tuple], Any]) -> TokenizerSettings | None:
    """The validated ``tokenizer:`` block; None for ``tokenizer: null`` (no block, as in
    mergekit). ``parse_model(value, key_path)`` turns a model reference at ``key_path`` into
    the caller's object and raises its own located error. Every error here is
    ``loc.error(path, message)``: one line naming the recipe line."""
    if block is None:
        return None
    if not isinstance(block, dict):
        raise loc.error(BLOCK, f"expected a map with keys {', '.join(BLOCK_KEYS)}, "
                               f"got {type_name(block)}")
    try:
        doc = TokenizerDoc.model_validate(block)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda e: loc.line(*(BLOCK + tuple(e["loc"]))) or 0)
        raise _translate(errors[0], loc) from None
    source = _source(doc.source, loc, parse_model)
    pad = _pad(doc.pad_to_multiple_of, loc)
    tokens = {name: _token(name, tdoc, loc, parse_model)
              for name, tdoc in (doc.tokens or {}).items()}
    return TokenizerSettings(source=source, tokens=tokens, pad_to_multiple_of=pad)
