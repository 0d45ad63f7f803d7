"""Phase A of the recipe's tokenizer settings (docs/tokenizer.md): ``tokenizer_source``, the
``tokenizer:`` block and ``chat_template``, checked from the recipe alone.

mergekit's rule: setting either ``tokenizer_source`` or ``tokenizer`` (never both) builds an
output tokenizer (``base``, ``union`` of every model's vocabulary, or one model's) and aligns
every model's embedding and head rows to it by token; with neither, the base's (else the first
model's) tokenizer is copied and embeddings are merged row for row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mergekit_like.recipe.checker import show as _show
from mergekit_like.recipe.model import InputModel
from mergekit_like.recipe.refs import ModelRef, parse_ref
from mergekit_like.recipe.schema import RecipeDoc
from mergekit_like.recipe.tokenizer import ParsedToken, parse_tokenizer
from mergekit_like.recipe.yaml_lines import Locator


@dataclass(frozen=True)
class VocabSpec:
    """How the output vocabulary is built: ``mode`` "base" | "union" | "model" (``donor`` the
    model), configured ``tokens`` (their models are input ``ModelRef`` objects), optional
    padding of the row count to a multiple."""

    mode: str
    donor: ModelRef | None = None
    tokens: dict[str, ParsedToken] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None

    def resolved(self) -> dict[str, Any]:
        """Canonical form for the resume key."""
        tokens = {name: {"kind": t.kind, "model": t.model.resolved() if t.model else None,
                         "token": t.token, "token_id": t.token_id, "force": t.force}
                  for name, t in sorted(self.tokens.items())}
        return {"mode": self.mode, "donor": self.donor.resolved() if self.donor else None,
                "tokens": tokens, "pad_to_multiple_of": self.pad_to_multiple_of}


def tokenizer_settings(doc: RecipeDoc, loc: Locator, base: ModelRef | None,
                       inputs: list[InputModel], warnings: list[str]
                       ) -> tuple[VocabSpec | None, ModelRef | None]:
    """(the vocabulary spec, or None when neither key is set; the model whose tokenizer files
    the output starts from, None meaning the base, else the first model)."""
    _check_chat_template(doc, loc)
    refs = {m.ref.key: m.ref for m in inputs}

    def model(value: Any, path: tuple) -> ModelRef:
        ref = parse_ref(value, loc, path, warnings)
        return refs.get(ref.key, ref)

    if doc.tokenizer_source is not None and doc.tokenizer is not None:
        raise loc.error(("tokenizer",), "set either tokenizer_source or tokenizer, not both "
                                        "(tokenizer.source replaces tokenizer_source)")
    if doc.tokenizer is not None:
        block = parse_tokenizer(doc.tokenizer, loc, model)
        if block is None:
            return None, None
        spec = _spec(block.source, base, loc, ("tokenizer", "source"), warnings)
        for name, tok in block.tokens.items():
            if tok.model is not None and tok.model.key not in refs:
                raise loc.error(("tokenizer", "tokens", name, "source"),
                                f"'{tok.model.display}' is not one of the merged models")
        spec = replace(spec, tokens=dict(block.tokens),
                       pad_to_multiple_of=block.pad_to_multiple_of)
        return spec, spec.donor
    if doc.tokenizer_source is None:
        return None, None
    value = doc.tokenizer_source
    source = value if value in ("base", "union") else model(value, ("tokenizer_source",))
    spec = _spec(source, base, loc, ("tokenizer_source",), warnings)
    return spec, spec.donor


def _spec(source: Any, base: ModelRef | None, loc: Locator, path: tuple,
          warnings: list[str]) -> VocabSpec:
    if source == "base":
        if base is None:
            warnings.append(f"{loc.where(*path)}: 'base' but there is no base_model; the first "
                            "model's tokenizer is used")
        return VocabSpec("base")
    if source == "union":
        return VocabSpec("union")
    return VocabSpec("model", donor=source)


def _check_chat_template(doc: RecipeDoc, loc: Locator) -> None:
    """A string: a template name, 'auto' or Jinja text (its content is checked in phase B)."""
    value = doc.chat_template
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise loc.error(("chat_template",), f"expected a template name (chatml, llama3, …), "
                                            f"'auto' or a Jinja template, got {_show(value)}")
