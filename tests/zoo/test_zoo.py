"""The merge-quality zoo: task generators, splits, training helpers (replay included), the built
FAST zoo (a base that partly follows the skill instructions, every fine-tune clearly ahead of it on
its own task while keeping most of the rest), the manifest and its cache."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from support.helpers import run_cli
from support.zoo_fixture import fast_zoo  # noqa: F401  (session fixture)

from mergekit_like.errors import MergeError
from mergekit_like.zoo import FAST, build_zoo, load_manifest, settings_hash
from mergekit_like.zoo import tasks as T
from mergekit_like.zoo.build import read_task_examples
from mergekit_like.zoo.train import (IGNORE_INDEX, ModelShape, TrainConfig, build_model,
                                     encode_batch, lr_at, replay_rows, train)

MARGIN = 0.20  # accuracy points a fine-tune must gain over the base on its own task
SIZES = {"instruct": 30, "train": 300, "validation": 50, "test": 50, "pretrain": 300}


def reference_answer(task: str, body: list[str]) -> list[str]:
    """Each task's answer, recomputed from the decoded body independently of the generators."""
    if task == "copy":
        return body
    if task == "reverse":
        return body[::-1]
    if task == "sort":
        return sorted(body, key=int)
    if task == "increment":
        return [str((int(c) + 1) % 10) for c in body]
    if task == "chain":
        value, out = int(body[0]), []
        for op, n in zip(body[1::2], body[2::2]):
            value = (value + int(n) if op == "+" else value - int(n)) % 10
            out.append(str(value))
        return out
    if task == "cipher":
        letters = body[0::2]
        assert body[1::2] == [","] * (len(letters) - 1)
        return [dict(zip("abcdefgh", "72940618"))[c] for c in letters]
    raise AssertionError(task)


def bodies(examples) -> set[tuple[int, ...]]:
    return {e.input_ids[2:] for e in examples}


# ---- tasks ---------------------------------------------------------------------------------

def test_vocabulary_ids_are_distinct_and_dense():
    assert len(set(T.TOKENS)) == len(T.TOKENS) == T.VOCAB_SIZE
    assert [T.TOKEN_ID[t] for t in T.TOKENS] == list(range(T.VOCAB_SIZE))
    assert len({T.PAD_ID, T.BOS_ID, T.EOS_ID, T.SEP_ID}) == 4
    tokens = ["<bos>", "<copy>", "a", "7", "<sep>"]
    assert T.decode(T.encode(tokens)) == tokens


@pytest.mark.parametrize("task", T.ALL_TASKS)
def test_examples_have_the_layout_and_the_right_answer(task):
    rng = random.Random(5)
    for _ in range(200):
        ex = T.make_example(task, rng)
        tokens = T.decode(list(ex.input_ids))
        assert tokens[0] == "<bos>" and tokens[1] == f"<{task}>" and tokens[-1] == "<sep>"
        assert T.decode(list(ex.answer)) == reference_answer(task, tokens[2:-1])
    pre = T.make_example(task, random.Random(5), pretrain=True)
    assert T.decode(list(pre.input_ids))[1] == f"<pre:{task}>"
    assert pre.body == T.make_example(task, random.Random(5)).body


@pytest.mark.parametrize("task", T.ALL_TASKS)
def test_splits_are_deterministic_disjoint_and_sized(task):
    first = T.make_splits(task, SIZES, seed=3)
    assert first == T.make_splits(task, SIZES, seed=3)
    assert first["train"] != T.make_splits(task, SIZES, seed=4)["train"]
    expected = {s: n for s, n in SIZES.items() if s != "instruct" or T.TASK_KIND[task] == "skill"}
    assert {s: len(v) for s, v in first.items()} == expected
    for split, examples in first.items():
        assert len(bodies(examples)) == len(examples), f"duplicate body in {split}"
    names = list(first)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not bodies(first[a]) & bodies(first[b]), f"{task}: {a} and {b} overlap"
    assert all(T.decode(list(e.input_ids))[1] == f"<pre:{task}>" for e in first["pretrain"])
    assert all(T.decode(list(e.input_ids))[1] == f"<{task}>" for e in first["test"])


@pytest.mark.parametrize("task", T.SKILL_TASKS)
def test_instruct_split_is_short_instructions_with_right_answers(task):
    instruct = T.make_splits(task, SIZES, seed=3)["instruct"]
    low, high = T.INSTRUCT_LENGTH
    for ex in instruct:
        tokens = T.decode(list(ex.input_ids))
        assert tokens[1] == f"<{task}>" and low <= len(tokens) - 3 <= high
        assert T.decode(list(ex.answer)) == reference_answer(task, tokens[2:-1])
    lengths = {len(e.body) - 1 for e in T.make_splits(task, SIZES, seed=3)["test"]}
    assert max(lengths) > high  # the evaluation splits hold longer bodies than the base's


def test_too_small_a_task_space_is_an_error(monkeypatch):
    monkeypatch.setattr(T, "SKILL_LENGTH", (1, 1))  # ten distinct digit bodies in all
    with pytest.raises(ValueError, match="only 10 distinct"):
        T.make_splits("sort", {"train": 11}, seed=0)


# ---- training helpers ----------------------------------------------------------------------

def test_batches_carry_loss_on_answer_tokens_only():
    a = T.TaskExample("copy", (1, 30, 5, 3), (5,))
    b = T.TaskExample("copy", (1, 30, 5, 6, 7, 3), (5, 6, 7))
    ids, labels = encode_batch([a, b])
    assert ids.tolist() == [[1, 30, 5, 3, 5, 0, 0, 0, 0], [1, 30, 5, 6, 7, 3, 5, 6, 7]]
    n = IGNORE_INDEX
    assert labels.tolist() == [[n, n, n, n, 5, n, n, n, n], [n, n, n, n, n, n, 5, 6, 7]]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=0.1, final_lr_frac=0.1)
    rates = [lr_at(s, cfg) for s in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(rates[9:], rates[10:]))
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)


def test_training_is_deterministic_and_lowers_the_loss():
    examples = T.make_splits("copy", {"train": 64}, seed=0)["train"]
    shape = ModelShape(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2)
    cfg = TrainConfig(steps=30, lr=1e-2, batch_size=16)
    runs = []
    for _ in range(2):
        model = build_model(shape, seed=1)
        losses = train(model, examples, cfg)
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert sum(runs[0][0][-5:]) < sum(runs[0][0][:5])


def test_replay_draws_its_share_of_each_batch_from_the_pool():
    own = T.make_splits("copy", {"train": 64}, seed=0)["train"]
    pool = T.make_splits("sort", {"train": 64}, seed=0)["train"]
    shape = ModelShape(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2)
    cfg = TrainConfig(steps=10, lr=1e-2, batch_size=16)
    assert replay_rows(dataclasses.replace(cfg, replay=0.25), 64) == 4
    assert replay_rows(dataclasses.replace(cfg, replay=0.25), 0) == 0

    def losses(examples, config, replay=()):
        return train(build_model(shape, seed=1), examples, config, replay=replay)

    plain = losses(own, cfg)
    assert losses(own, cfg, replay=pool) == plain  # replay 0: the pool is never drawn
    # replay 1: every row comes from the pool, as if it were the training set
    assert losses(own, dataclasses.replace(cfg, replay=1.0), replay=pool) == losses(pool, cfg)
    assert losses(own, dataclasses.replace(cfg, replay=0.5), replay=pool) != plain


# ---- the built fast zoo --------------------------------------------------------------------

def test_manifest_names_every_file_and_the_settings_hash(fast_zoo):
    manifest = json.loads((fast_zoo.root / "zoo.json").read_text())
    assert manifest["settings_hash"] == settings_hash(FAST)
    assert manifest["settings"]["base"]["steps"] == FAST.base.steps
    assert list(manifest["tasks"]) == list(T.ALL_TASKS)
    assert {t: i["kind"] for t, i in manifest["tasks"].items()} == T.TASK_KIND
    assert manifest["vocab"] == list(T.TOKENS)
    for task in T.ALL_TASKS:
        assert (fast_zoo.model(task) / "model.safetensors").is_file()
        splits = {s for s, _ in FAST.split_sizes} - ({"instruct"} if task in ("chain", "cipher")
                                                     else set())
        assert set(manifest["tasks"][task]["splits"]) == splits


def test_zoo_split_files_are_disjoint_and_held_out(fast_zoo):
    for task in T.ALL_TASKS:
        sizes = {s: n for s, n in FAST.split_sizes if s in T.task_splits(task, [s])}
        split = {s: read_task_examples(fast_zoo.split(task, s)) for s in sizes}
        assert {s: len(v) for s, v in split.items()} == sizes
        for other in set(sizes) - {"test"}:
            assert not bodies(split["test"]) & bodies(split[other]), f"{task}: test in {other}"
        assert not bodies(split["validation"]) & bodies(split["train"])


def test_a_complete_zoo_is_reused_and_a_broken_one_is_not(fast_zoo, tmp_path):
    weights = fast_zoo.model("copy") / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = build_zoo(fast_zoo.root, FAST)
    assert again["cached"] is True and weights.stat().st_mtime_ns == before
    assert settings_hash(dataclasses.replace(FAST, seed=1)) != settings_hash(FAST)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "zoo.json").write_text((fast_zoo.root / "zoo.json").read_text())
    assert load_manifest(broken) is None  # manifest without its model and split files
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("x")
    with pytest.raises(MergeError, match="not a zoo"):
        build_zoo(tmp_path / "precious", FAST)


def test_every_fine_tune_beats_the_base_on_its_own_task(fast_zoo):
    from mergekit_like.runtime import evaluate_accuracy, load_model, read_examples

    test = [e for t in fast_zoo.tasks for e in read_examples(fast_zoo.split(t, "test"))]
    base = evaluate_accuracy(load_model(fast_zoo.base, device="cpu"), test, batch_size=64)
    for task in fast_zoo.tasks:
        own = read_examples(fast_zoo.split(task, "test"))
        tuned = evaluate_accuracy(load_model(fast_zoo.model(task), device="cpu"), own,
                                  batch_size=64)[task]
        assert tuned - base[task] >= MARGIN, f"{task}: tuned {tuned:.2f}, base {base[task]:.2f}"


def test_models_load_with_transformers_and_inspect(fast_zoo, capsys):
    from transformers import AutoModelForCausalLM

    for folder in (fast_zoo.base, fast_zoo.model("sort")):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.vocab_size == T.VOCAB_SIZE
        assert model.config.tie_word_embeddings is False
        assert model.config.hidden_size == FAST.shape.hidden_size
        assert model.lm_head.weight.dtype == torch.float32
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
        code, out, _ = run_cli(["inspect", folder], capsys)
        n_params = sum(p.numel() for p in model.parameters())
        assert code == 0 and f"parameters: {n_params:,}" in out and "F32" in out


def test_split_files_run_through_the_eval_command(fast_zoo, capsys):
    from mergekit_like.runtime import evaluate_accuracy, load_model, read_examples

    data = fast_zoo.split("increment", "test")
    expected = evaluate_accuracy(load_model(fast_zoo.model("increment"), device="cpu"),
                                 read_examples(data))["increment"]
    code, out, _ = run_cli(["eval", fast_zoo.model("increment"), "--data", data, "--metric", "acc",
                            "-q", "--device", "cpu"], capsys)
    assert code == 0 and f"{expected:.4f}" in out and "increment" in out


# ---- the fast zoo looks like fine-tunes of a capable base ------------------------------------

def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def matrix(fast_zoo):
    from mergekit_like.zoo.matrix import accuracy_matrix

    return accuracy_matrix([fast_zoo])


def test_matrix_has_the_base_and_every_fine_tune_on_every_task(matrix, fast_zoo):
    from mergekit_like.runtime import evaluate_accuracy, load_model, read_examples
    from mergekit_like.zoo.matrix import format_matrix

    assert list(matrix) == ["base", *T.ALL_TASKS]
    assert all(list(row) == list(T.ALL_TASKS) for row in matrix.values())
    own = read_examples(fast_zoo.split("sort", "test"))
    direct = evaluate_accuracy(load_model(fast_zoo.model("sort"), device="cpu"), own)["sort"]
    assert matrix["sort"]["sort"] == pytest.approx(direct)
    lines = format_matrix(matrix, T.ALL_TASKS).splitlines()
    assert lines[0] == "| model | " + " | ".join(T.ALL_TASKS) + " | avg others |"
    others = mean(v for t, v in matrix["copy"].items() if t != "copy")
    assert lines[3] == ("| fine-tune: copy | " + " | ".join(f"{v:.2f}" for v in
                        matrix["copy"].values()) + f" | {others:.2f} |")


def test_the_base_partly_follows_the_skill_instructions(matrix):
    skills = mean(matrix["base"][t] for t in T.SKILL_TASKS)
    assert 0.15 <= skills <= 0.75, f"base skill accuracy {skills:.2f}"
    assert all(matrix[t][t] >= 0.8 for t in T.SKILL_TASKS), matrix  # FULL: >= 0.95


def test_skill_fine_tunes_keep_most_of_the_base_on_the_other_skills(matrix):
    for task in T.SKILL_TASKS:
        others = [t for t in T.SKILL_TASKS if t != task]
        kept, base = mean(matrix[task][t] for t in others), mean(matrix["base"][t] for t in others)
        assert kept >= 0.7 * base, f"{task}: {kept:.2f} on the other skills, base {base:.2f}"


def test_reasoning_plus_domain_vector_keeps_part_of_both(fast_zoo, tmp_path):
    """θ_chain + δ_cipher (task arithmetic with the reasoning model as the start) keeps most of
    the reasoning fine-tune's chain accuracy and adds domain accuracy to it."""
    from safetensors.torch import load_file, save_file

    from mergekit_like.runtime import evaluate_accuracy, load_model, read_examples

    def weights(folder):
        return load_file(str(folder / "model.safetensors"))

    base, chain, cipher = (weights(f) for f in (fast_zoo.base, fast_zoo.model("chain"),
                                                fast_zoo.model("cipher")))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text((fast_zoo.base / "config.json").read_text())
    save_file({k: chain[k] + cipher[k] - base[k] for k in base}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    test = [e for t in ("chain", "cipher") for e in read_examples(fast_zoo.split(t, "test"))]
    merged = evaluate_accuracy(load_model(out, device="cpu"), test, batch_size=64)
    start = evaluate_accuracy(load_model(fast_zoo.model("chain"), device="cpu"), test,
                              batch_size=64)
    assert merged["chain"] >= 0.75 * start["chain"] and start["chain"] >= 0.8, (merged, start)
    assert merged["cipher"] >= start["cipher"] + 0.15, (merged, start)
