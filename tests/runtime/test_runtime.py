"""The runtime (mergekit_like.runtime): loading a merge output, metrics by hand, perplexity and
accuracy against unbatched / model.generate references, module replacement, gradient hooks.

Tiny Llama models are built here (seeded) and run in float32 on the CPU.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.helpers import write_recipe

from mergekit_like.cli import main
from mergekit_like.errors import MergeError
from mergekit_like.runtime import (Example, accumulate_gradients, evaluate_accuracy,
                                   evaluate_perplexity, greedy_continuations, load_model,
                                   next_token_entropy, perplexity, read_examples, replace_modules,
                                   restore_modules, token_nll)

transformers = pytest.importorskip("transformers")

from support.tiny_llama import SPECIAL, VOCAB, WORDS, save_tiny_llama, save_word_tokenizer, word_ids, write_jsonl  # noqa: E402,F401


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return save_tiny_llama(root / "a", 0, with_tokenizer=True), save_tiny_llama(root / "b", 1)


@pytest.fixture(scope="module")
def merged(pair, tmp_path_factory):
    a, b = pair
    work = tmp_path_factory.mktemp("merge")
    recipe = write_recipe(work / "linear.yml", {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                   {"model": str(b), "parameters": {"weight": 0.5}}],
        "dtype": "float32"})
    out = work / "out"
    assert main(["merge", str(recipe), str(out), "-q", "--out-shard-size", "20KB"]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(merged):
    return load_model(merged, device="cpu")


def random_sequences(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


# ---- loading --------------------------------------------------------------------------------

def test_merge_output_logits_equal_transformers_loading(merged, loaded):
    assert (merged / "model.safetensors.index.json").is_file()
    assert len(list(merged.glob("model-*.safetensors"))) > 1
    assert loaded.device == torch.device("cpu") and not loaded.model.training
    assert loaded.tokenizer is not None  # copied from the donor (model a)
    direct = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor(random_sequences([7, 7, 7], seed=3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        got = loaded.model(input_ids=ids, attention_mask=mask).logits
        want = direct(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_load_model_errors_and_missing_tokenizer(pair, tmp_path):
    with pytest.raises(MergeError, match=re.escape(f"{tmp_path / 'nope'}: no such model folder")):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="empty: no config.json"):
        load_model(tmp_path / "empty")
    plain = load_model(pair[1], device="cpu")
    assert plain.tokenizer is None and plain.model.dtype == torch.float32


def test_missing_transformers_is_a_one_line_install_hint(pair, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(MergeError, match=re.escape("pip install 'mergekit_like[runtime]'")):
        load_model(pair[0], device="cpu")


# ---- metrics by hand ------------------------------------------------------------------------

def test_metrics_match_hand_computation_on_two_token_vocabulary():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [0.0, -math.inf]]])  # [1, 3, 2]
    labels = torch.tensor([[1, -100, 0]])
    nll = token_nll(logits, labels)
    assert nll.shape == (1, 3)
    torch.testing.assert_close(nll, torch.tensor([[-math.log(0.75), 0.0, 0.0]]))
    h = next_token_entropy(logits)
    h_13 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(h, torch.tensor([[h_13, math.log(2.0), 0.0]]))
    assert perplexity(2 * math.log(2.0), 2) == pytest.approx(2.0)
    assert perplexity(-math.log(0.75), 1) == pytest.approx(4 / 3)
    with pytest.raises(ValueError):
        perplexity(0.0, 0)


def _unbatched_reference(model, seqs):
    """Σ nll, Σ entropy and n over every predicted token, one unpadded sequence at a time."""
    total_nll, total_h, n = 0.0, 0.0, 0
    with torch.no_grad():
        for seq in seqs:
            if len(seq) < 2:
                continue
            logits = model(torch.tensor([seq])).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1)
            total_nll -= logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].sum().item()
            total_h -= (logp.exp() * logp).sum().item()
            n += len(seq) - 1
    return total_nll, total_h, n


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_perplexity_on_padded_batches_equals_unpadded(loaded, batch_size):
    seqs = random_sequences([1, 2, 5, 9, 4, 12, 3])
    examples = [Example(s[:-2], s[-2:], None) if len(s) > 3 else Example(s) for s in seqs]
    done = []
    result = evaluate_perplexity(loaded, examples, batch_size=batch_size, progress=done.append)
    total_nll, total_h, n = _unbatched_reference(loaded.model, seqs)
    assert result.tokens == n == sum(len(s) - 1 for s in seqs)
    assert result.loss == pytest.approx(total_nll / n, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total_nll / n), rel=1e-5)
    assert result.entropy == pytest.approx(total_h / n, rel=1e-5)
    assert done[-1] == len(examples) and done == sorted(done)


def test_perplexity_rejects_out_of_vocabulary_ids_and_empty_work(loaded):
    with pytest.raises(MergeError, match="example 2: token id 48 is out of range"):
        evaluate_perplexity(loaded, [Example([1, 2]), Example([3, 48])])
    with pytest.raises(MergeError, match="nothing to predict"):
        evaluate_perplexity(loaded, [Example([5])])


# ---- accuracy -------------------------------------------------------------------------------

def _generate(model, prompt, n_new):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_continuations_equal_model_generate(loaded):
    prompts = random_sequences([1, 4, 9, 2, 6], seed=5)
    want = [_generate(loaded.model, p, 5) for p in prompts]
    got = greedy_continuations(loaded.model, prompts, 5, loaded.device)
    assert got.shape == (5, 5) and got.tolist() == want


def test_greedy_continuations_with_absolute_positions_equal_model_generate():
    """GPT-2 adds learned absolute position embeddings: left padding must not shift them."""
    torch.manual_seed(4)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=4, bos_token_id=1, eos_token_id=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    prompts = random_sequences([1, 4, 9, 2], seed=6)
    want = [_generate(model, p, 4) for p in prompts]
    assert greedy_continuations(model, prompts, 4, torch.device("cpu")).tolist() == want


def test_accuracy_of_planted_answers(loaded):
    prompts = random_sequences([1, 3, 8, 5, 11, 2], seed=7)
    answers = [_generate(loaded.model, p, k) for p, k in zip(prompts, [1, 2, 3, 4, 2, 1])]
    right = [Example(p, a) for p, a in zip(prompts, answers)]
    wrong = [Example(p, a[:-1] + [(a[-1] + 1) % VOCAB]) for p, a in zip(prompts, answers)]
    for batch_size in (1, 4, 16):
        assert evaluate_accuracy(loaded, right, batch_size=batch_size) == {"all": 1.0, "average": 1.0}
        assert evaluate_accuracy(loaded, wrong, batch_size=batch_size) == {"all": 0.0, "average": 0.0}
    mixed = ([Example(e.input_ids, e.answer_ids, "copy") for e in right[:2]]
             + [Example(e.input_ids, e.answer_ids, "recall") for e in right[2:4] + wrong[4:]]
             + [Example([3, 4, 5], None, "recall")])  # no answer: not scored
    done = []
    scores = evaluate_accuracy(loaded, mixed, batch_size=3, progress=done.append)
    assert scores == {"copy": 1.0, "recall": 0.5, "average": 0.75}
    assert list(scores) == ["copy", "recall", "average"] and done[-1] == 6
    with pytest.raises(MergeError, match="no example has an answer"):
        evaluate_accuracy(loaded, [Example([3, 4])])


# ---- module replacement ---------------------------------------------------------------------

class Doubled(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 2 * self.inner(x)


def test_replace_modules_swaps_mlps_and_restore_gives_identical_logits(merged):
    runner = load_model(merged, device="cpu")
    model = runner.model
    ids = torch.tensor(random_sequences([6, 6], seed=9))
    with torch.no_grad():
        before = model(ids).logits
    is_mlp = lambda name, module: re.fullmatch(r"model\.layers\.\d+\.mlp", name) is not None  # noqa: E731
    originals = replace_modules(model, is_mlp, lambda name, module: Doubled(module))
    assert list(originals) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(isinstance(model.model.layers[i].mlp, Doubled) for i in range(2))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before)
    restore_modules(model, originals)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    # a matched module's children are not offered again
    seen = []

    def layer_0_or_its_mlp(name, module):
        seen.append(name)
        return name in ("model.layers.0", "model.layers.0.mlp")

    nested = replace_modules(model, layer_0_or_its_mlp, lambda n, m: Doubled(m))
    assert list(nested) == ["model.layers.0"] and "model.layers.0.mlp" not in seen
    restore_modules(model, nested)


# ---- gradients ------------------------------------------------------------------------------

def _batch_loss_reference(model, batch):
    """Mean token NLL of a batch, summed over unpadded sequences (independent of the runtime)."""
    total, n = 0.0, 0
    for ex in batch:
        seq = ex.input_ids + (ex.answer_ids or [])
        logits = model(torch.tensor([seq])).logits[0, :-1]
        total = total + F.cross_entropy(logits, torch.tensor(seq[1:]), reduction="sum")
        n += len(seq) - 1
    return total / n


def test_accumulate_gradients_sums_to_autograd_and_frees_each_grad(merged):
    runner = load_model(merged, device="cpu")
    model = runner.model
    named = dict(model.named_parameters())
    chosen = {"model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"}
    examples = [Example(s) for s in random_sequences([3, 7, 2, 5, 9], seed=11)]
    sums: dict[str, torch.Tensor] = {}
    calls = []

    def on_grad(name, param, grad):
        assert param is named[name] and grad.shape == param.shape
        assert all(p.grad is None for n, p in named.items() if n != name)
        sums[name] = sums.get(name, 0) + grad.detach().clone()
        calls.append(name)

    prior = torch.ones_like(named["model.norm.weight"])
    named["model.norm.weight"].grad = prior
    batches = accumulate_gradients(runner, examples, on_grad, batch_size=2,
                                   params=lambda n, p: n in chosen)
    assert batches == 3 and sorted(calls) == sorted(list(chosen) * 3)
    assert named["model.norm.weight"].grad is prior
    assert all(p.requires_grad for p in named.values())
    assert all(p.grad is None for n, p in named.items() if n != "model.norm.weight")

    total = sum(_batch_loss_reference(model, examples[k:k + 2]) for k in (0, 2, 4))
    want = torch.autograd.grad(total, [named[n] for n in sorted(chosen)])
    for name, grad in zip(sorted(chosen), want):
        torch.testing.assert_close(sums[name], grad, rtol=1e-4, atol=1e-6)


def test_accumulate_gradients_over_all_parameters_holds_one_grad_at_a_time(merged):
    runner = load_model(merged, device="cpu")
    named = dict(runner.model.named_parameters())
    seen = []

    def on_grad(name, param, grad):
        assert all(p.grad is None for n, p in named.items() if n != name)
        seen.append(name)

    examples = [Example(s) for s in random_sequences([4, 6, 3, 1, 1], seed=2)]
    assert accumulate_gradients(runner, examples, on_grad, batch_size=2) == 2  # [1], [1]: skipped
    assert sorted(seen) == sorted(list(named) * 2)
    with pytest.raises(MergeError, match="no floating-point parameter"):
        accumulate_gradients(runner, examples, on_grad, params=lambda n, p: False)


# ---- reading examples -----------------------------------------------------------------------

def test_read_examples_text_ids_answers_tasks(pair, tmp_path):
    tok = load_model(pair[0], device="cpu").tokenizer
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "the cat sat", "answer": "on a mat", "task": "story"},
        "",
        {"input_ids": [5, 6, 7], "answer": [8, 9], "id": "ignored"},
        {"text": "red sky", "task": None},
    ])
    got = read_examples(path, tok)
    assert got == [Example([1] + word_ids("the cat sat"), word_ids("on a mat"), "story"),
                   Example([5, 6, 7], [8, 9], None),
                   Example([1] + word_ids("red sky"), None, None)]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"text": "a", "input_ids": [1]}', "exactly one of"),
    ('{"answer": "a"}', "exactly one of"),
    ('{"input_ids": []}', "non-empty list"),
    ('{"input_ids": [1, "2"]}', "non-negative integers"),
    ('{"input_ids": [1, true]}', "non-negative integers"),
    ('{"input_ids": [1], "answer": 3}', "non-empty list"),
    ('{"input_ids": [1], "task": 3}', "\"task\" must be a string"),
    ('{"text": 5}', "must be a string"),
])
def test_read_examples_bad_lines_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, 2]}, line])
    with pytest.raises(MergeError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
        read_examples(path)


def test_read_examples_text_without_tokenizer_and_empty_files(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat"}])
    with pytest.raises(MergeError, match=r"t\.jsonl:1: .*model has no tokenizer.*input_ids"):
        read_examples(path, None)
    with pytest.raises(MergeError, match="no such data file"):
        read_examples(tmp_path / "missing.jsonl")
    with pytest.raises(MergeError, match="no examples"):
        read_examples(write_jsonl(tmp_path / "blank.jsonl", ["", "  "]))
