"""`grid --eval-ppl`: the built-in perplexity equals an independent computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from support.helpers import run_cli

transformers = pytest.importorskip("transformers")
from support.tiny_llama import WORDS, save_tiny_llama  # noqa: E402


def reference_ppl(folder, text: str, ctx: int) -> float:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nll, n = 0.0, 0
    for i in range(0, len(ids), ctx):
        seq = torch.tensor([[tok.bos_token_id] + ids[i:i + ctx]])
        with torch.no_grad():
            logp = model(seq).logits[0, :-1].double().log_softmax(-1)
        nll -= logp.gather(1, seq[0, 1:, None]).sum().item()
        n += seq.shape[1] - 1
    return math.exp(nll / n)


def test_eval_ppl_matches_independent_computation(tmp_path, capsys):
    a = save_tiny_llama(tmp_path / "a", 1, with_tokenizer=True)
    b = save_tiny_llama(tmp_path / "b", 2, with_tokenizer=True)
    grid = {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                       {"model": str(b), "parameters": {"weight": 0.5}}],
            "grid": {"models.0.parameters.weight": [0.2, 0.8]}}
    path = tmp_path / "g.yml"
    path.write_text(yaml.safe_dump(grid))
    text = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(37))
    (tmp_path / "val.txt").write_text(text)
    root = tmp_path / "root"
    code, out, err = run_cli(["grid", path, root, "--eval-ppl", tmp_path / "val.txt",
                              "--eval-ctx", "8"], capsys)
    assert code == 0, err
    rows = {}
    for line in (root / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["id"]] = row
    assert len(rows) == 2
    for pid, row in rows.items():
        want = reference_ppl(root / pid, text, 8)
        assert row["metric"] == pytest.approx(want, rel=1e-6)  # float32 logits
        assert row["eval"]["ppl"] == row["metric"]
    best = min(r["metric"] for r in rows.values())
    assert f"{best:.6g}" in out
