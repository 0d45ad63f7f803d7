"""engine.vocab: the output tokenizer, permutations and aligned rows for base / union / model,
configured tokens, padding, and chat templates (docs/tokenizer.md)."""

import json
import sys

import pytest
import torch

from mergekit_like.engine.chat_templates import TEMPLATES, resolve_chat_template, \
    set_chat_template
from mergekit_like.engine.vocab import build_vocab
from mergekit_like.errors import MergeError
from mergekit_like.io.local import LocalSource
from mergekit_like.ops.vocab import TokenRule, align_rows
from support.tokenizers_fixture import WORDS, make_model, own_vocab, weights

transformers = pytest.importorskip("transformers")

CHAT = [("<|im_start|>", True), ("<|im_end|>", True)]
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return {
        "base": make_model(root / "base", 1),
        "chat": make_model(root / "chat", 2, added=CHAT),
        "tool": make_model(root / "tool", 3, words=WORDS[:5] + ["zz"], added=[("<tool>", True)]),
        "twin": make_model(root / "twin", 4),
        # like mergekit's model_padded: 4 added tokens beyond vocab_size (unused rows)
        "padded": make_model(root / "padded", 5, added=[(f"<U{i}>", True) for i in range(4)],
                             vocab_size=16),
    }


def sources(folders, *keys):
    return {k: LocalSource(folders[k], f"org/{k}") for k in keys}


def aligned(plan, folders, name=EMBED):
    tensors = {k: weights(folders[k])[name] for k in plan.permutations}
    return align_rows(tensors, plan.permutations, plan.vocab, plan.rows, plan.token_rules,
                      plan.base)


def row_of(folders, key, token, name=EMBED):
    """Token's row in model ``key``, looked up in its own tokenizer.json (None: absent)."""
    vocab = own_vocab(folders[key])
    return None if token not in vocab else weights(folders[key])[name][vocab[token]]


def test_union_vocabulary_and_rows(folders):
    plan = build_vocab("union", sources(folders, "base", "chat", "tool"), "base", None, {}, None)
    base_vocab = own_vocab(folders["base"])
    expected = dict(base_vocab)
    for tok in ["zz", "<|im_start|>", "<|im_end|>", "<tool>"]:  # regular first, then added
        expected[tok] = len(expected)
    assert plan.vocab == expected and plan.rows == 20
    assert plan.tokenizer.get_vocab() == expected
    assert plan.permutations["chat"].tolist() == list(range(16)) + [-1, 16, 17, -1]
    tool = own_vocab(folders["tool"])
    assert plan.permutations["tool"].tolist() == list(range(8)) + [-1] * 8 + [
        tool["zz"], -1, -1, tool["<tool>"]] and tool["zz"] == 8
    assert not plan.identity()
    for name in (EMBED, "lm_head.weight"):
        out = aligned(plan, folders, name)
        for key in ("base", "chat", "tool"):
            assert out[key].shape == (20, 8)
            for tok, t in plan.vocab.items():
                own = row_of(folders, key, tok, name)
                holders = [k for k in ("base", "chat", "tool") if row_of(folders, k, tok, name)
                           is not None]
                if own is not None:
                    want = own
                elif "base" in holders:
                    want = row_of(folders, "base", tok, name)
                else:
                    assert len(holders) == 1, tok
                    want = row_of(folders, holders[0], tok, name)
                assert torch.equal(out[key][t], want), (key, tok)
    saved = plan.files(None)
    assert json.loads(saved["tokenizer.json"])["added_tokens"][-1]["content"] == "<tool>"


def test_union_leaves_out_tokens_beyond_vocab_size(folders):
    plan = build_vocab("union", sources(folders, "base", "padded", "chat"), "base", None, {},
                       None)
    assert len(plan.vocab) == 18 and not any(t.startswith("<U") for t in plan.vocab)
    assert plan.permutations["padded"].tolist() == list(range(16)) + [-1, -1]
    added = {a.content for a in plan.tokenizer.added_tokens_decoder.values()}
    assert added == {"<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"}


def test_base_mode_drops_other_models_tokens(folders):
    plan = build_vocab("base", sources(folders, "base", "chat"), "base", None, {}, None)
    assert plan.vocab == own_vocab(folders["base"]) and plan.rows == 16
    assert plan.permutations["chat"].tolist() == list(range(16))
    out = aligned(plan, folders)
    assert torch.equal(out["chat"], weights(folders["chat"])[EMBED][:16])


def test_base_mode_strips_the_base_itself(folders):
    plan = build_vocab("base", sources(folders, "padded", "base"), "padded", None, {}, None)
    assert len(plan.vocab) == 16 and "<U0>" not in plan.tokenizer.get_vocab()


def test_model_mode(folders):
    srcs = sources(folders, "base", "chat")
    plan = build_vocab("model", srcs, "base", "chat", {}, None)
    assert plan.vocab == own_vocab(folders["chat"]) and plan.rows == 18
    out = aligned(plan, folders)
    base_w, chat_w = weights(folders["base"])[EMBED], weights(folders["chat"])[EMBED]
    assert torch.equal(out["base"][:16], base_w)
    assert torch.equal(out["base"][16:], chat_w[16:])  # donated by the only holder


def test_identity(folders):
    plan = build_vocab("base", sources(folders, "base", "twin"), "base", None, {}, None)
    assert plan.identity()
    assert not build_vocab("base", sources(folders, "base", "twin"), "base", None, {}, 32) \
        .identity()
    forced = {"w3": TokenRule("model", "twin", force=True)}
    assert not build_vocab("base", sources(folders, "base", "twin"), "base", None, forced,
                           None).identity()


def test_configured_tokens(folders):
    rules = {"w3": TokenRule("model", "chat", force=True),
             "w4": TokenRule("zero", force=True),
             "<new>": TokenRule("model_token", "chat", token="<|im_end|>"),
             "w5": TokenRule("model_token", "base", token_id=1, force=True),
             "w6": TokenRule("model", "chat")}
    plan = build_vocab("base", sources(folders, "base", "chat"), "base", None, rules, None)
    assert plan.vocab["<new>"] == 16 and len(plan.vocab) == 17
    assert plan.token_rules["<new>"].token_id == own_vocab(folders["chat"])["<|im_end|>"]
    out = aligned(plan, folders)
    for key in ("base", "chat"):
        assert torch.equal(out[key][plan.vocab["w3"]], row_of(folders, "chat", "w3"))
        assert torch.count_nonzero(out[key][plan.vocab["w4"]]) == 0
        assert torch.equal(out[key][16], row_of(folders, "chat", "<|im_end|>"))
        assert torch.equal(out[key][plan.vocab["w5"]], row_of(folders, "base", "<s>"))
        assert torch.equal(out[key][plan.vocab["w6"]], row_of(folders, key, "w6"))  # no force


def test_pad_to_multiple_of(folders):
    plan = build_vocab("union", sources(folders, "base", "chat"), "base", None, {}, 8)
    assert len(plan.vocab) == 18 and plan.rows == 24
    out = aligned(plan, folders)
    for t in out.values():
        assert torch.allclose(t[18:], t[:18].mean(dim=0).expand(6, 8))
        assert not torch.equal(t[18], t[17])


def test_errors_name_the_model(tmp_path, folders):
    bare = make_model(tmp_path / "bare", 9, tokenizer=False)
    srcs = {"base": LocalSource(folders["base"], "org/base"), "bare": LocalSource(bare, "org/bare")}
    with pytest.raises(MergeError, match=r"^org/bare: no tokenizer files \(tokenizer.json or "
                                         r"tokenizer.model\)"):
        build_vocab("union", srcs, "base", None, {}, None)
    srcs = sources(folders, "base", "chat")
    with pytest.raises(MergeError, match="'<nope>' is not in the vocabulary of org/chat"):
        build_vocab("base", srcs, "base", None,
                    {"x": TokenRule("model_token", "chat", token="<nope>")}, None)
    with pytest.raises(MergeError, match="org/base does not have this token"):
        build_vocab("base", srcs, "base", None, {"<|im_end|>": TokenRule("model", "base")}, None)
    with pytest.raises(MergeError, match="not one of the merged models"):
        build_vocab("model", srcs, "base", "other", {}, None)


def test_missing_transformers_is_a_merge_error(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MergeError, match=r"needs transformers \(pip install "
                                         r"'mergekit_like\[runtime\]'\)"):
        build_vocab("base", sources(folders, "base"), "base", None, {}, None)


def test_never_writes_into_model_folders(folders):
    before = {k: sorted(p.name for p in f.iterdir()) for k, f in folders.items()}
    build_vocab("union", sources(folders, "base", "chat", "padded"), "base", None, {}, None)
    assert {k: sorted(p.name for p in f.iterdir()) for k, f in folders.items()} == before


# ---- chat templates ----------------------------------------------------------------------------

CONV = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


def render(files, tmp_path, **kw):
    out = tmp_path / "tok"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    return tok.apply_chat_template(CONV, tokenize=False, **kw)


def test_chatml_by_name_renders(folders, tmp_path):
    plan = build_vocab("union", sources(folders, "base", "chat"), "base", None, {}, None)
    files = plan.files(resolve_chat_template("chatml", {}))
    assert render(files, tmp_path, add_generation_prompt=True) == (
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>assistant\n")


@pytest.mark.parametrize("name, want", [
    ("llama3", "<s><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\n"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\n"),
    ("mistral", "<s> [INST] Hi there [/INST] Hello!</s>"),
    ("alpaca", "### Instruction:\nHi there\n\n### Response:\nHello!"),
    ("exaone", "[|system|][|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n"),
])
def test_other_templates_render(folders, tmp_path, name, want):
    plan = build_vocab("base", sources(folders, "base"), "base", None, {}, None)
    assert render(plan.files(resolve_chat_template(name, {})), tmp_path) == want


def test_literal_and_bad_templates():
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(literal, {}) == literal
    with pytest.raises(MergeError, match="'chatmlx' is neither a built-in template"):
        resolve_chat_template("chatmlx", {})
    with pytest.raises(MergeError, match="neither"):
        resolve_chat_template("no braces here, just a long sentence", {})
    assert set(TEMPLATES) == {"alpaca", "chatml", "llama3", "mistral", "exaone"}


def test_auto_picks_the_most_common_template(tmp_path):
    a, b = "{{ 'A' }}{% for m in messages %}{{ m['content'] }}{% endfor %}", "B {{ messages }}"
    srcs = {}
    for i, tmpl in enumerate([b, a, a, None]):
        srcs[f"m{i}"] = LocalSource(make_model(tmp_path / f"m{i}", i, chat_template=tmpl), f"m{i}")
    assert resolve_chat_template("auto", srcs) == a
    assert resolve_chat_template("auto", {"m3": srcs["m3"]}) is None
    # a template kept in tokenizer_config.json (the legacy place) counts too
    folder = make_model(tmp_path / "legacy", 7)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = b + "\n"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    srcs2 = {"legacy": LocalSource(folder, "legacy"), "m1": srcs["m1"], "m0": srcs["m0"]}
    assert resolve_chat_template("auto", srcs2) == b


def test_set_chat_template_overrides_stale_files(folders, tmp_path):
    donor = folders["base"]
    files = {n: (donor / n).read_bytes() for n in ("tokenizer.json", "tokenizer_config.json")}
    cfg = json.loads(files["tokenizer_config.json"])
    cfg["chat_template"] = "OLD {{ messages }}"
    files["tokenizer_config.json"] = json.dumps(cfg).encode()
    files["chat_template.jinja"] = b"STALE {{ messages }}"
    files["chat_template.json"] = json.dumps({"chat_template": "STALE2"}).encode()
    new = set_chat_template(files, TEMPLATES["chatml"])
    assert "chat_template.json" not in new
    assert "chat_template" not in json.loads(new["tokenizer_config.json"])
    assert new["tokenizer.json"] == files["tokenizer.json"]
    assert render(new, tmp_path).startswith("<|im_start|>user\nHi there<|im_end|>\n")
