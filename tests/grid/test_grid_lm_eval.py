"""`grid --eval lm-eval --tasks TASK.yaml`: the real harness on a local multiple-choice task
(local JSON data, a tiny Llama made here) records the accuracy an independent computation gives,
with every non-loopback connection refused; the offline switches are on during the call; a missing
extra or task file is a one-line error before any merge."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import yaml

from support.helpers import run_cli

transformers = pytest.importorskip("transformers")
from support.tiny_llama import WORDS, save_tiny_llama, word_ids, write_jsonl  # noqa: E402

DOCS = [{"context": " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(4)),
         "choices": [WORDS[(5 * i + 1) % len(WORDS)], WORDS[(7 * i + 2) % len(WORDS)],
                     WORDS[(i + 3) % len(WORDS)]],
         "label": i % 3} for i in range(6)]


def task_file(tmp_path: Path) -> Path:
    data = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    task = {"task": "tiny_mc", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc"}]}
    path = tmp_path / "tasks" / "tiny_mc.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


def grid_file(tmp_path: Path) -> Path:
    a = save_tiny_llama(tmp_path / "a", 1, with_tokenizer=True)
    b = save_tiny_llama(tmp_path / "b", 2, with_tokenizer=True)
    doc = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                      {"model": str(b), "parameters": {"weight": 0.5}}],
           "grid": {"models.0.parameters.weight": [0.1, 0.9]}}
    path = tmp_path / "g.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def reference_acc(folder: Path) -> float:
    """Multiple choice by hand: score each choice by log p(choice words | <s> context words)
    (the harness encodes with the tokenizer's own BOS), pick the best (first on a tie), compare
    to the label."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hits = 0
    for doc in DOCS:
        ctx = [1] + word_ids(doc["context"])
        scores = []
        for choice in doc["choices"]:
            ids = ctx + word_ids(choice)
            with torch.no_grad():
                logp = model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
            cont = ids[len(ctx):]
            scores.append(sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
        hits += int(max(range(len(scores)), key=lambda k: (scores[k], -k)) == doc["label"])
    return hits / len(DOCS)


@pytest.fixture
def loopback_only(monkeypatch):
    """Any TCP connection away from 127.0.0.1/::1 fails the test."""
    real = socket.socket.connect

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"network access to {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def results(root: Path) -> dict[str, dict]:
    rows = {}
    for line in (root / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["id"]] = row
    return rows


def test_lm_eval_task_on_every_point_matches_reference(tmp_path, capsys, loopback_only):
    pytest.importorskip("lm_eval")
    root = tmp_path / "root"
    code, out, err = run_cli(["grid", grid_file(tmp_path), root, "--eval", "lm-eval",
                              "--tasks", task_file(tmp_path)], capsys)
    assert code == 0, err
    rows = results(root)
    assert len(rows) == 2
    for pid, row in rows.items():
        want = reference_acc(root / pid)
        assert row["lm_eval"] == {"tiny_mc": {"acc": pytest.approx(want)}}
        assert row["metric"] == pytest.approx(want) and row["eval"] == {"tiny_mc/acc": row["metric"]}
        assert row["eval_error"] is None
    assert len({r["metric"] for r in rows.values()} | {0.0}) >= 2     # not all zero


def test_harness_boundary_runs_offline_and_fills_rows(tmp_path, capsys, monkeypatch):
    """The adapter with lm_eval.simple_evaluate replaced: the offline switches are set during
    the call (and restored after), its arguments name the point's folder and the task file's
    task, and its results become the row's fields; --eval-key picks the metric."""
    lm_eval = pytest.importorskip("lm_eval")
    import huggingface_hub.constants as hf_constants
    calls = []

    def fake(**kw):
        import os
        calls.append({"env": {k: os.environ.get(k) for k in
                              ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")},
                      "hub_const": hf_constants.HF_HUB_OFFLINE, **kw})
        folder = Path(kw["model_args"]["pretrained"])
        acc = 0.25 if "0.1" in (folder / "mergekit_config.yml").read_text() else 0.75
        return {"results": {"tiny_mc": {"alias": "tiny_mc", "acc,none": acc,
                                        "acc_stderr,none": "N/A", "acc_norm,none": acc / 2}}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    root = tmp_path / "root"
    code, out, err = run_cli(["grid", grid_file(tmp_path), root, "--eval", "lm-eval", "--tasks",
                              task_file(tmp_path), "--eval-key", "acc_norm",
                              "--lm-eval-limit", "3"], capsys)
    assert code == 0, err
    assert len(calls) == 2
    for call in calls:
        assert call["env"] == {k: "1" for k in call["env"]} and call["hub_const"] is True
        assert call["tasks"] == ["tiny_mc"] and call["model"] == "hf" and call["limit"] == 3
        assert (Path(call["model_args"]["pretrained"]) / "grid_point.json").is_file()
    assert hf_constants.HF_HUB_OFFLINE is False                  # restored after the call
    import os
    assert "HF_DATASETS_OFFLINE" not in os.environ
    got = sorted((r["metric"], r["lm_eval"]["tiny_mc"]["acc"]) for r in results(root).values())
    assert got == [(0.125, 0.25), (0.375, 0.75)]
    assert "0.375" in out                                        # the best point, in the table


def test_missing_extra_or_task_file_is_one_line_before_any_merge(tmp_path, capsys, monkeypatch):
    import importlib.util
    path = grid_file(tmp_path)
    code, _, err = run_cli(["grid", path, tmp_path / "r", "--eval", "lm-eval"], capsys)
    assert code == 2 and "--tasks" in err and err.strip().count("\n") == 0
    code, _, err = run_cli(["grid", path, tmp_path / "r", "--eval", "lm-eval", "--tasks",
                            tmp_path / "nope.yaml"], capsys)
    assert code == 2 and "no such file" in err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    code, _, err = run_cli(["grid", path, tmp_path / "r", "--eval", "lm-eval", "--tasks",
                            task_file(tmp_path)], capsys)
    assert code == 2 and "mergekit_like[lm-eval]" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()
