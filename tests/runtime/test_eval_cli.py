"""`mergekit-like eval MODEL --data FILE.jsonl`: the perplexity and accuracy tables, and its
one-line errors."""

from __future__ import annotations

import pytest
from support.helpers import run_cli
from support.tiny_llama import save_tiny_llama, word_ids, write_jsonl

from mergekit_like.runtime import evaluate_perplexity, greedy_continuations, load_model, read_examples

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return save_tiny_llama(root / "tok", 0, with_tokenizer=True), save_tiny_llama(root / "ids", 1)


def _table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the table row starting with first_cell (rich box characters stripped)."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.replace("│", "|").replace("┃", "|").split("|")]
        cells = [c for c in cells if c]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def test_eval_ppl_prints_tokens_loss_perplexity_entropy(models, tmp_path, capsys):
    model = models[0]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat on a mat"},
                                              {"text": "a dog ran far", "answer": "and far"},
                                              {"input_ids": [5, 9, 12]}])
    code, out, err = run_cli(["eval", model, "--data", data, "--device", "cpu",
                              "--batch-size", "2"], capsys)
    assert code == 0, err
    loaded = load_model(model, device="cpu")
    want = evaluate_perplexity(loaded, read_examples(data, loaded.tokenizer))
    assert want.tokens == 6 + 6 + 2  # BOS + words (+ answer), minus the first token of each
    header = _table_row(out, "tokens")
    assert header == ["tokens", "loss", "perplexity", "mean entropy"]
    assert _table_row(out, str(want.tokens)) == [str(want.tokens), f"{want.loss:.4f}",
                                                 f"{want.perplexity:.4f}", f"{want.entropy:.4f}"]
    assert "eval ppl" in err and "3/3" in err  # progress goes to stderr, not stdout
    assert "eval ppl" not in out


def test_eval_acc_prints_one_row_per_task_and_the_average(models, tmp_path, capsys):
    model = models[1]  # no tokenizer: token ids only
    loaded = load_model(model, device="cpu")
    prompts = [[5, 6, 7], [9], [11, 12, 13, 14, 15]]
    greedy = greedy_continuations(loaded.model, prompts, 2, loaded.device).tolist()
    records = [{"input_ids": prompts[0], "answer": greedy[0], "task": "math"},
               {"input_ids": prompts[1], "answer": greedy[1], "task": "code"},
               {"input_ids": prompts[2], "answer": [(greedy[2][0] + 1) % 48, greedy[2][1]],
                "task": "code"},
               {"input_ids": [3, 4]}]  # no answer: not scored
    data = write_jsonl(tmp_path / "acc.jsonl", records)
    code, out, err = run_cli(["eval", model, "--data", data, "--metric", "acc", "-q"], capsys)
    assert code == 0, err
    assert _table_row(out, "math") == ["math", "1", "1.0000"]
    assert _table_row(out, "code") == ["code", "2", "0.5000"]
    assert _table_row(out, "average") == ["average", "3", "0.7500"]
    assert err == ""  # --quiet


def _one_line_error(code: int, err: str) -> str:
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ")
    return err.strip()


def test_eval_errors_are_one_line_exit_2(models, tmp_path, capsys):
    tok_model, ids_model = models
    good = write_jsonl(tmp_path / "good.jsonl", [{"input_ids": [5, 6, 7]}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [5, 6]}, "{oops"])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the cat"}])
    cases = [
        (["eval", tmp_path / "missing", "--data", good], "no such model folder"),
        (["eval", tok_model, "--data", tmp_path / "nope.jsonl"], "no such data file"),
        (["eval", tok_model, "--data", bad], f"{bad}:2: not valid JSON"),
        (["eval", tok_model, "--data", good, "--metric", "acc"], "--metric acc needs answers"),
        (["eval", tok_model, "--data", good, "--metric", "bleu"], "--metric 'bleu': use ppl or acc"),
        (["eval", tok_model, "--data", good, "--batch-size", "0"], "--batch-size 0"),
        (["eval", ids_model, "--data", text], "model has no tokenizer"),
        (["eval", tok_model, "--data", write_jsonl(tmp_path / "v.jsonl", [{"input_ids": [1, 99]}])],
         "token id 99 is out of range"),
    ]
    for args, message in cases:
        code, out, err = run_cli([*args, "-q"], capsys)
        assert message in _one_line_error(code, err), (args, err)
        assert out == ""


def test_word_tokenizer_round_trip(models):
    """The test tokenizer prepends <s> to text and nothing to answers (read_examples' choice)."""
    tok = load_model(models[0], device="cpu").tokenizer
    assert tok("a dog")["input_ids"] == [1] + word_ids("a dog")
    assert tok("a dog", add_special_tokens=False)["input_ids"] == word_ids("a dog")
