"""Vocabulary merging end to end (docs/tokenizer.md): ``merge`` with tokenizer_source / the
tokenizer block / chat_template, each output row checked against the rows of the models that
hold its token, looked up here in each model's own tokenizer.json."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.helpers import config_of, expect_merge_error, load_folder, run_cli, \
    write_recipe
from tests.support.tokenizers_fixture import make_model, own_vocab, weights

transformers = pytest.importorskip("transformers")
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return {"base": make_model(root / "base", 0),
            "m1": make_model(root / "m1", 1, added=[("<x>", True), ("<y>", False)]),
            "m2": make_model(root / "m2", 2, added=[("<z>", True)])}


def _ta(fam, **extra):
    return {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["m1"]), "parameters": {"weight": 1.0}},
                       {"model": str(fam["m2"]), "parameters": {"weight": 1.0}}], **extra}


def _merge(tmp_path, capsys, doc):
    write_recipe(tmp_path / "recipe.yml", doc)
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", tmp_path / "recipe.yml", out, "-q"], capsys)
    assert code == 0, err
    return out, err


def _row(folder, token, name=EMBED):
    return weights(folder)[name][own_vocab(folder)[token]]


def test_union_aligns_every_row_by_token(fam, tmp_path, capsys):
    out, _ = _merge(tmp_path, capsys, _ta(fam, tokenizer_source="union"))
    vocab = own_vocab(out)
    assert set(vocab) == set(own_vocab(fam["base"])) | {"<x>", "<y>", "<z>"}
    got = load_folder(out)
    assert got[EMBED].shape == (19, 8) and got["lm_head.weight"].shape == (19, 8)
    assert config_of(out)["vocab_size"] == 19
    for name in (EMBED, "lm_head.weight"):
        for token in ("<unk>", "w0", "w12"):  # in all three: b + (m1 − b) + (m2 − b)
            b, a1, a2 = (_row(fam[k], token, name) for k in ("base", "m1", "m2"))
            torch.testing.assert_close(got[name][vocab[token]], b + (a1 - b) + (a2 - b),
                                       rtol=0, atol=1e-6)
        # only m1 has <x>: its row stands in for every model's, so the merge returns it
        torch.testing.assert_close(got[name][vocab["<x>"]], _row(fam["m1"], "<x>", name),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(got[name][vocab["<z>"]], _row(fam["m2"], "<z>", name),
                                   rtol=0, atol=1e-6)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<z>") == vocab["<z>"]
    code, _, err = run_cli(["verify", out], capsys)
    assert code == 0, err


def test_base_vocabulary_drops_the_added_tokens(fam, tmp_path, capsys):
    out, _ = _merge(tmp_path, capsys, _ta(fam, tokenizer_source="base"))
    got = load_folder(out)
    assert got[EMBED].shape == (16, 8) and own_vocab(out) == own_vocab(fam["base"])
    token = "w5"
    b, a1, a2 = (_row(fam[k], token) for k in ("base", "m1", "m2"))
    torch.testing.assert_close(got[EMBED][own_vocab(out)[token]], a1 + a2 - b, rtol=0,
                               atol=1e-6)


def test_configured_tokens_and_padding(fam, tmp_path, capsys):
    block = {"source": "union", "pad_to_multiple_of": 8,
             "tokens": {"<x>": {"source": {"kind": "zero"}, "force": True},
                        "<new>": {"source": {"kind": "model_token", "model": str(fam["m2"]),
                                             "token": "<z>"}}}}
    out, _ = _merge(tmp_path, capsys, _ta(fam, tokenizer=block))
    got, vocab = load_folder(out), own_vocab(out)
    assert got[EMBED].shape == (24, 8) and config_of(out)["vocab_size"] == 24
    assert torch.count_nonzero(got[EMBED][vocab["<x>"]]) == 0  # forced to zero in every model
    torch.testing.assert_close(got[EMBED][vocab["<new>"]], _row(fam["m2"], "<z>"), rtol=0,
                               atol=1e-6)
    # padding rows: each model's padded rows are the mean of its real rows; merged like rows
    assert torch.allclose(got[EMBED][20], got[EMBED][23])


def test_without_tokenizer_settings_the_common_rows_are_merged(fam, tmp_path, capsys):
    out, err = _merge(tmp_path, capsys, _ta(fam))
    assert "merging the first 16" in err and "tokenizer_source" in err
    got = load_folder(out)
    b, a1, a2 = (weights(fam[k])[EMBED][:16] for k in ("base", "m1", "m2"))
    torch.testing.assert_close(got[EMBED], a1 + a2 - b, rtol=0, atol=1e-6)
    assert config_of(out)["vocab_size"] == 16
    (tmp_path / "strict").mkdir()
    expect_merge_error(tmp_path / "strict", capsys, _ta(fam, vocab_policy="error"),
                       "vocab_policy", "[16, 17, 18] rows")


def test_chat_template_by_name_renders(fam, tmp_path, capsys):
    out, _ = _merge(tmp_path, capsys, _ta(fam, tokenizer_source="base", chat_template="chatml"))
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "yo"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


def test_chat_template_on_copied_tokenizer_files(tmp_path, capsys):
    base = make_model(tmp_path / "fam" / "base", 0, chat_template="{{ 'old' }} {{ messages }}")
    ft = make_model(tmp_path / "fam" / "ft", 3)
    doc = {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 1}},
                                                {"model": str(ft), "parameters": {"weight": 1}}],
           "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                            "{% endfor %}"}
    out, _ = _merge(tmp_path, capsys, doc)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False)
    assert text == "[user] q\n"
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


def test_bad_template_and_unknown_token_model_are_refused(fam, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    expect_merge_error(tmp_path / "a", capsys, _ta(fam, chat_template="chatmll"),
                       "recipe.yml:", "chat_template", "neither a built-in template")
    block = {"tokens": {"<q>": {"source": "org/elsewhere"}}}
    expect_merge_error(tmp_path / "b", capsys, _ta(fam, tokenizer=block),
                       "tokenizer.tokens.<q>.source", "not one of the merged models")


def test_union_of_a_real_llama_loads_and_runs(tmp_path, capsys):
    from tests.support.tiny_llama import save_tiny_llama

    base = save_tiny_llama(tmp_path / "base", seed=0, with_tokenizer=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<think>", "</think>"])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ft = tmp_path / "ft"
    model.save_pretrained(ft)
    tok.save_pretrained(ft)
    doc = {"merge_method": "task_arithmetic", "base_model": str(base), "tokenizer_source": "union",
           "models": [{"model": str(ft), "parameters": {"weight": 0.5}}]}
    out, _ = _merge(tmp_path, capsys, doc)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    out_tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    # the output vocabulary is the tokenizers' (18 words + 2 added); the base's extra unused
    # rows (its config says 48) have no token and are not kept, as in mergekit
    assert merged.config.vocab_size == 20 and len(out_tok) == 20
    ids = out_tok("the cat <think>", return_tensors="pt").input_ids
    assert ids[0, -1].item() == out_tok.convert_tokens_to_ids("<think>")
    logits = merged(ids).logits
    assert logits.shape == (1, ids.shape[1], 20) and torch.isfinite(logits).all()
