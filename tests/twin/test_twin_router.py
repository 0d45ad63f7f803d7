"""`mergekit-like train-router` (docs/methods/twin.md §7): a router that tells tasks apart, its file and
twin.json section, determinism, and one-line errors on bad data (before any model load)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from support.helpers import run_cli
from safetensors import safe_open
from safetensors.torch import load_file
from support.twin_fixture import hand_bundle, tiny_family

from mergekit_like.twin.router import stratified_split
from mergekit_like.registry import verify as verify_output

pytest.importorskip("transformers")
TASKS = ["math", "code"]
RANGES = {"math": (3, 30), "code": (34, 63)}  # each task's texts use its own token ids


def labelled(n: int, seed: int = 0, answers: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        task = TASKS[k % 2]
        lo, hi = RANGES[task]
        row = {"input_ids": [rng.randint(lo, hi) for _ in range(rng.randint(3, 9))], "task": task}
        if answers:
            row["answer"] = [rng.randint(lo, hi)]
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("twin_router")
    family = tiny_family(root / "family", n_tasks=2)
    return hand_bundle(root / "bundle", family, TASKS, rank=0.25), family[0]


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine[0], tmp_path / "bundle"))


def train(bundle: Path, data: Path, capsys, *extra) -> tuple[int, str, str]:
    return run_cli(["train-router", bundle, "--data", data, "--epochs", "20", "--batch-size", "16",
                    "--lr", "2e-3", "--device", "cpu", "-q", *extra], capsys)


def test_train_router_then_eval(bundle, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", labelled(120))
    code, out, err = train(bundle, data, capsys)
    assert code == 0, err
    assert "confusion matrix" in out and "validation accuracy" in out
    info = json.loads((bundle / "twin" / "twin.json").read_text())["router"]
    assert info["validation_accuracy"] >= 0.9
    assert f"validation accuracy: {info['validation_accuracy']:.4f}" in out
    assert info["file"] == "router.safetensors" and info["hidden_width"] == 64
    assert info["label_counts"] == {"math": 60, "code": 60} and info["validation_examples"] == 12
    assert info["training"]["epochs"] == 20 and info["training"]["lr"] == 2e-3
    assert len(info["data"]["sha256"]) == 64 and 1 <= info["best_epoch"] <= 20
    with safe_open(str(bundle / "twin" / "router.safetensors"), framework="pt") as f:
        assert f.metadata()["tasks"] == json.dumps(TASKS)
        keys = list(f.keys())
        assert "net.0.weight" in keys and "net.1.running_var" in keys
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float32}
    verify_output(bundle)
    assert sorted(p.name for p in (bundle / "twin").iterdir()) == sorted(
        ["twin.json", "router.safetensors", *TASKS])  # no temporary file left
    evaluation = write_jsonl(tmp_path / "eval.jsonl", labelled(6, seed=1, answers=True))
    code, out, err = run_cli(["eval", bundle, "--data", evaluation, "--metric", "acc",
                              "--device", "cpu", "-q"], capsys)
    assert code == 0, err
    assert "math" in out and "code" in out and "average" in out


def test_routing_follows_the_trained_router(bundle, tmp_path, capsys):
    from mergekit_like.twin.runtime import load_twin

    assert train(bundle, write_jsonl(tmp_path / "t.jsonl", labelled(120)), capsys)[0] == 0
    twin = load_twin(bundle, device="cpu").model
    rows = labelled(40, seed=7)
    for row in rows:
        w = twin.route(torch.tensor([row["input_ids"]]))
        assert w.shape == (1, 2) and abs(float(w.sum()) - 1) < 1e-6
    hits = sum(int(twin.route(torch.tensor([r["input_ids"]])).argmax()) == TASKS.index(r["task"])
               for r in rows)
    assert hits >= 34  # held-out texts: most are routed to their task


def test_same_seed_same_router_and_rerun_replaces(bundle, tmp_path, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", labelled(40))
    router_file, info_file = bundle / "twin" / "router.safetensors", bundle / "twin" / "twin.json"
    assert train(bundle, data, capsys)[0] == 0
    first = load_file(str(router_file)), info_file.read_text()
    assert train(bundle, data, capsys)[0] == 0
    again = load_file(str(router_file))
    assert again.keys() == first[0].keys()
    assert all(torch.equal(again[k], first[0][k]) for k in again)
    assert info_file.read_text() == first[1]
    assert train(bundle, data, capsys, "--seed", "1")[0] == 0
    assert not torch.equal(load_file(str(router_file))["net.0.weight"], first[0]["net.0.weight"])
    assert json.loads(info_file.read_text())["router"]["training"]["seed"] == 1


@pytest.mark.parametrize("rows, message", [
    (labelled(4) + [{"input_ids": [3], "task": "poetry"}], "t.jsonl:5: unknown task 'poetry'"),
    (labelled(4)[:1] + ["", {"input_ids": [3]}], "t.jsonl:3: no \"task\""),
    ([r for r in labelled(6) if r["task"] == "math"], "no line for task 'code'"),
    (["", "  "], "t.jsonl: no examples"),
    (labelled(2) + ["{oops"], "t.jsonl:3: not valid JSON"),
])
def test_bad_data_is_a_one_line_error(bundle, tmp_path, capsys, rows, message):
    code, out, err = train(bundle, write_jsonl(tmp_path / "t.jsonl", rows), capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (bundle / "twin" / "router.safetensors").exists()


def test_small_tasks_warn_and_options_are_checked(bundle, tmp_path, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", labelled(12))
    code, out, err = train(bundle, data, capsys)
    assert code == 0, err
    assert "task 'math' has only 6 line(s)" in err
    code, _, err = train(bundle, data, capsys, "--val-fraction", "1.0")
    assert code == 2 and "--val-fraction" in err
    code, _, err = train(bundle, data, capsys, "--batch-size", "1")
    assert code == 2 and "--batch-size" in err


def test_not_a_bundle(pristine, tmp_path, capsys):
    code, _, err = train(pristine[1], write_jsonl(tmp_path / "t.jsonl", labelled(4)), capsys)
    assert code == 2 and f"{pristine[1]}: not a Twin bundle (no twin/twin.json)" in err


def test_stratified_split_keeps_one_per_task():
    labels = [0] * 9 + [1] * 2 + [2]
    train, val = stratified_split(labels, 3, 0.1, torch.Generator().manual_seed(0))
    assert sorted(train + val) == list(range(12))
    assert sorted(labels[i] for i in val) == [0, 1]  # task 2 has one example: training only


def test_selection_sees_confidence_not_only_accuracy():
    """Two well-separated clusters: validation accuracy is 1.0 after the first epoch, while the
    routing weights keep sharpening. The kept epoch is a later, surer one (the old rule, the
    first epoch at the best accuracy, kept epoch 1)."""
    from mergekit_like.twin.router import fit_router

    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[2.0] * 8, [-2.0] * 8])
    y = torch.arange(200) % 2
    x = centers[y] + 0.3 * torch.randn(200, 8, generator=g)
    kw = dict(lr=1e-2, batch_size=32, seed=1, val_fraction=0.25)
    first = fit_router(x, y, 2, epochs=1, **kw)
    kept = fit_router(x, y, 2, epochs=12, **kw)
    assert first.val_accuracy == 1.0 and kept.val_accuracy == 1.0
    assert kept.best_epoch > 1
    assert kept.val_loss < first.val_loss
    assert kept.right_weight[0] > first.right_weight[0]
    assert 0 < kept.right_weight[1] <= kept.right_weight[0] <= 1
