"""ops.vocab.align_rows against a token-by-token reference of mergekit's rule (embed.py)."""

import pytest
import torch

from mergekit_like.ops.vocab import TokenRule, align_rows

H = 4


def reference(tensors, perms, vocab, rows, rules, base):
    """mergekit PermutedEmbeddings, one token at a time, in plain Python."""
    keys = list(tensors)
    dtype = tensors[keys[0]].dtype
    default = {}
    for tok, t in vocab.items():
        holders = [k for k in keys if int(perms[k][t]) >= 0]
        rule = rules.get(tok)
        if rule is not None:
            if rule.kind == "zero":
                row = torch.zeros(H, dtype=dtype)
            elif rule.kind == "model":
                row = tensors[rule.model][int(perms[rule.model][t])]
            else:
                row = tensors[rule.model][rule.token_id]
        elif not holders:
            row = torch.zeros(H, dtype=dtype)
        elif len(holders) == 1:
            row = tensors[holders[0]][int(perms[holders[0]][t])]
        elif base is not None and base in holders:
            row = tensors[base][int(perms[base][t])]
        else:
            row = torch.zeros(H, dtype=dtype)
            for k in holders:
                row = row + tensors[k][int(perms[k][t])]
            row = row / len(holders)
        default[tok] = row
    out = {}
    for k in keys:
        new = torch.zeros(rows, H, dtype=dtype)
        for tok, t in vocab.items():
            force = tok in rules and rules[tok].force
            if int(perms[k][t]) >= 0 and not force:
                new[t] = tensors[k][int(perms[k][t])]
            else:
                new[t] = default[tok]
        if rows > len(vocab):
            new[len(vocab):] = torch.mean(new[: len(vocab)], dim=0)
        out[k] = new
    return out


def setup(dtype=torch.float32):
    # output tokens: 0 a (all), 1 b (base, m1), 2 c (m1, m2 only), 3 d (m2 only),
    # 4 e (nobody), 5 f (base only), 6 g (all)
    vocab = {tok: i for i, tok in enumerate("abcdefg")}
    g = torch.Generator().manual_seed(0)
    tensors = {"base": torch.randn(5, H, generator=g).to(dtype),
               "m1": torch.randn(6, H, generator=g).to(dtype),
               "m2": torch.randn(4, H, generator=g).to(dtype)}
    perms = {"base": torch.tensor([0, 1, -1, -1, -1, 2, 4]),
             "m1": torch.tensor([5, 0, 2, -1, -1, -1, 1]),
             "m2": torch.tensor([3, -1, 0, 1, -1, -1, 2])}
    return tensors, perms, vocab


def test_default_rules_by_hand():
    tensors, perms, vocab = setup()
    out = align_rows(tensors, perms, vocab, 7, {}, "base")
    b, m1, m2 = tensors["base"], tensors["m1"], tensors["m2"]
    for k in out:
        assert out[k].shape == (7, H) and out[k].dtype == torch.float32
    # own rows where present
    assert torch.equal(out["m1"][0], m1[5]) and torch.equal(out["m2"][6], m2[2])
    # b: m2 lacks it; base has it -> base row
    assert torch.equal(out["m2"][1], b[1])
    # c: base lacks it; m1 and m2 have it -> the base gets the mean
    assert torch.allclose(out["base"][2], (m1[2] + m2[0]) / 2)
    # d: only m2 -> donated to base and m1
    assert torch.equal(out["base"][3], m2[1]) and torch.equal(out["m1"][3], m2[1])
    # e: nobody -> zero
    assert torch.count_nonzero(out["m1"][4]) == 0
    # f: base only
    assert torch.equal(out["m2"][5], b[2])


def test_without_base_shared_tokens_are_averaged():
    tensors, perms, vocab = setup()
    out = align_rows(tensors, perms, vocab, 7, {}, None)
    b, m1 = tensors["base"], tensors["m1"]
    assert torch.allclose(out["m2"][1], (b[1] + m1[0]) / 2)  # b: base + m1, no base preference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base", ["base", None])
def test_matches_reference_bit_for_bit(dtype, base):
    tensors, perms, vocab = setup(dtype)
    rules = {"a": TokenRule("model", "m2", force=True), "e": TokenRule("zero"),
             "g": TokenRule("model_token", "m1", token="x", token_id=3, force=True),
             "c": TokenRule("model", "m1")}
    got = align_rows(tensors, perms, vocab, 16, rules, base)
    want = reference(tensors, perms, vocab, 16, rules, base)
    for k in tensors:
        assert got[k].dtype == dtype
        assert torch.equal(got[k], want[k]), k


def test_force_and_rules_by_hand():
    tensors, perms, vocab = setup()
    rules = {"a": TokenRule("model", "m2", force=True),
             "b": TokenRule("model_token", "m2", token_id=3),
             "g": TokenRule("zero", force=True)}
    out = align_rows(tensors, perms, vocab, 7, rules, "base")
    m2 = tensors["m2"]
    for k in out:
        assert torch.equal(out[k][0], m2[3])          # forced: m2's row for 'a' everywhere
        assert torch.count_nonzero(out[k][6]) == 0    # forced zero
    assert torch.equal(out["m2"][1], m2[3])            # not forced: m2 lacks 'b' -> rule row
    assert torch.equal(out["m1"][1], tensors["m1"][0])  # m1 has 'b': keeps its own row


def test_padding_rows_are_the_mean_of_real_rows():
    tensors, perms, vocab = setup()
    out = align_rows(tensors, perms, vocab, 12, {}, "base")
    for k, t in out.items():
        mean = t[:7].mean(dim=0)
        assert torch.allclose(t[7:], mean.expand(5, H))
        assert torch.equal(t[:7], align_rows(tensors, perms, vocab, 7, {}, "base")[k])


@pytest.mark.parametrize("rules, needle", [
    ({"zz": TokenRule("zero")}, "not in the output vocabulary"),
    ({"d": TokenRule("model", "base")}, "not in the vocabulary of 'base'"),
    ({"a": TokenRule("model_token", "m2", token_id=4)}, "out of range"),
    ({"a": TokenRule("model_token", "m2", token="w")}, "no resolved token_id"),
    ({"a": TokenRule("model", "other")}, "not part of the merge"),
])
def test_bad_rules(rules, needle):
    tensors, perms, vocab = setup()
    with pytest.raises(ValueError, match=needle):
        align_rows(tensors, perms, vocab, 7, rules, "base")


def test_bad_shapes():
    tensors, perms, vocab = setup()
    with pytest.raises(ValueError, match="less than"):
        align_rows(tensors, perms, vocab, 6, {}, None)
    with pytest.raises(ValueError, match="points at row"):
        align_rows(tensors, {**perms, "m2": torch.tensor([9, -1, 0, 1, -1, -1, 2])}, vocab, 7,
                   {}, None)
    with pytest.raises(ValueError, match="base model"):
        align_rows(tensors, perms, vocab, 7, {}, "nope")
    with pytest.raises(ValueError, match="hidden size"):
        align_rows({**tensors, "m2": torch.zeros(4, H + 1)}, perms, vocab, 7, {}, None)
    with pytest.raises(ValueError):
        TokenRule("model")
    with pytest.raises(ValueError):
        TokenRule("ones")
