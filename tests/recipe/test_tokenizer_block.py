"""recipe.tokenizer.parse_tokenizer: the ``tokenizer:`` block and its one-line errors."""

import textwrap

import pytest

from mergekit_like.errors import MergeError
from mergekit_like.recipe.tokenizer import ParsedToken, TokenizerSettings, parse_tokenizer
from mergekit_like.recipe.yaml_lines import Locator, load_yaml


def parse_model(value, path):
    """Stand-in for the validator's model parser: strings only, tagged with their path."""
    if not isinstance(value, str):
        raise MergeError(f"bad model at {'.'.join(map(str, path))}")
    return ("ref", value)


def parse(text):
    data, lines = load_yaml(textwrap.dedent(text), "recipe.yml")
    return parse_tokenizer(data.get("tokenizer"), Locator("recipe.yml", lines), parse_model)


def test_full_block():
    got = parse("""\
        merge_method: linear
        tokenizer:
          source: org/chat
          pad_to_multiple_of: 64
          tokens:
            "<|im_start|>":
              source: org/chat
              force: true
            "<pad>":
              source: {kind: zero}
            "<|im_end|>":
              source: {kind: model_token, model: org/base, token: "</s>"}
            "<x>":
              source: {kind: model_token, model: org/base, token_id: 7}
        """)
    assert got == TokenizerSettings(
        source=("ref", "org/chat"), pad_to_multiple_of=64,
        tokens={"<|im_start|>": ParsedToken("model", ("ref", "org/chat"), force=True),
                "<pad>": ParsedToken("zero"),
                "<|im_end|>": ParsedToken("model_token", ("ref", "org/base"), token="</s>"),
                "<x>": ParsedToken("model_token", ("ref", "org/base"), token_id=7)})


def test_defaults_and_literals():
    assert parse("tokenizer: {}\n") == TokenizerSettings("union", {}, None)
    assert parse("tokenizer: {source: base}\n").source == "base"
    assert parse("tokenizer: {source: union}\n").source == "union"
    assert parse("tokenizer: null\n") is None


BAD = [
    ("tokenizer:\n  sorce: base\n", "recipe.yml:2 tokenizer.sorce: unknown key; did you mean "
                                     "'source'?"),
    ("tokenizer: [base]\n", "recipe.yml:1 tokenizer: expected a map"),
    ("tokenizer:\n  pad_to_multiple_of: 0\n",
     "recipe.yml:2 tokenizer.pad_to_multiple_of: must be a positive integer, got 0"),
    ("tokenizer:\n  pad_to_multiple_of: true\n",
     "recipe.yml:2 tokenizer.pad_to_multiple_of: must be a positive integer, got true"),
    ("tokenizer:\n  pad_to_multiple_of: 8.5\n",
     "recipe.yml:2 tokenizer.pad_to_multiple_of: must be a positive integer, got 8.5"),
    ("tokenizer:\n  source: null\n", "recipe.yml:2 tokenizer.source: must be base, union"),
    ("tokenizer:\n  tokens: [a]\n", "recipe.yml:2 tokenizer.tokens: expected a map of token"),
    ("tokenizer:\n  tokens:\n    a: org/x\n", "recipe.yml:3 tokenizer.tokens.a: expected a map"),
    ("tokenizer:\n  tokens:\n    a:\n      source: org/x\n      forse: true\n",
     "recipe.yml:5 tokenizer.tokens.a.forse: unknown key; did you mean 'force'?"),
    ("tokenizer:\n  tokens:\n    a:\n      source: org/x\n      force: yes please\n",
     "recipe.yml:5 tokenizer.tokens.a.force: force must be true or false, got 'yes please'"),
    ("tokenizer:\n  tokens:\n    a:\n      force: true\n",
     "recipe.yml:3 tokenizer.tokens.a: 'source' is required"),
    ("tokenizer:\n  tokens:\n    a:\n      source: {kind: zeros}\n",
     "recipe.yml:4 tokenizer.tokens.a.source.kind: 'zeros' is not a token source kind; did you "
     "mean 'zero'?"),
    ("tokenizer:\n  tokens:\n    a:\n      source: {kind: zero, model: org/x}\n",
     "recipe.yml:4 tokenizer.tokens.a.source.model: unknown key"),
    ("tokenizer:\n  tokens:\n    a:\n      source: {kind: model_token, token: b}\n",
     "recipe.yml:4 tokenizer.tokens.a.source: kind model_token needs 'model'"),
    ("tokenizer:\n  tokens:\n    a:\n      source: {kind: model_token, model: m}\n",
     "recipe.yml:4 tokenizer.tokens.a.source: kind model_token needs exactly one of 'token'"),
    ("tokenizer:\n  tokens:\n    a:\n      source:\n        kind: model_token\n        model: m\n"
     "        token: b\n        token_id: 3\n",
     "recipe.yml:4 tokenizer.tokens.a.source: kind model_token needs exactly one of 'token' "
     "(a token string) or 'token_id' (a row index), not both"),
    ("tokenizer:\n  tokens:\n    a:\n      source:\n        kind: model_token\n        model: m\n"
     "        token_id: -1\n",
     "recipe.yml:7 tokenizer.tokens.a.source.token_id: must be a non-negative integer, got -1"),
    ("tokenizer:\n  tokens:\n    a:\n      source:\n        kind: model_token\n        model: m\n"
     "        token_id: true\n",
     "recipe.yml:7 tokenizer.tokens.a.source.token_id: must be a non-negative integer, got true"),
    ("tokenizer:\n  tokens:\n    a:\n      source:\n        kind: model_token\n        model: m\n"
     "        token: 5\n",
     "recipe.yml:7 tokenizer.tokens.a.source.token: expected a token string, got 5"),
    ("tokenizer:\n  tokens:\n    a:\n      source:\n        kind: model_token\n        model: m\n"
     "        tokn: b\n",
     "recipe.yml:7 tokenizer.tokens.a.source.tokn: unknown key; did you mean 'token'?"),
    ("tokenizer:\n  tokens:\n    12:\n      source: org/x\n",
     "recipe.yml:3 tokenizer.tokens[12]: token keys must be non-empty strings, got 12"),
]


@pytest.mark.parametrize("text, needle", BAD)
def test_bad_blocks_give_one_located_line(text, needle):
    with pytest.raises(MergeError) as exc:
        parse(text)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(needle), msg


def test_model_errors_come_from_parse_model():
    with pytest.raises(MergeError, match=r"^bad model at tokenizer.tokens.a.source$"):
        parse("tokenizer:\n  tokens:\n    a:\n      source: [x]\n")
    with pytest.raises(MergeError, match=r"^bad model at tokenizer.tokens.a.source.model$"):
        parse("tokenizer:\n  tokens:\n    a:\n      source: {kind: model_token, model: [x], "
              "token: b}\n")
    with pytest.raises(MergeError, match=r"^bad model at tokenizer.source$"):
        parse("tokenizer:\n  source: 7\n")
