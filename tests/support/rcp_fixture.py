"""A tiny RCP family for tests: base, reasoning and domain models (Llama-shaped, float32) and
token-id calibration files whose texts use every token of the vocabulary."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from mergekit_like.demo import LlamaShape, make_family
from support.helpers import run_cli

SHAPE = LlamaShape(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1)


def family(root: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """(base, reasoning, domain) folders; fine-tune deltas of 0.02."""
    base, reasoning, domain = make_family(root, SHAPE, 2, delta_scale=0.02, seed=seed)
    return base, reasoning, domain


def texts(path: Path, n: int, seed: int, length: int = 12, vocab: int = SHAPE.vocab_size) -> Path:
    """n texts of ``length`` token ids; together they contain every id of the vocabulary."""
    rng = random.Random(seed)
    ids = list(range(vocab))
    lines = []
    for k in range(n):
        seq = [rng.randrange(vocab) for _ in range(length)]
        if k == 0:
            seq = ids + seq               # the first text holds the whole vocabulary
        lines.append(json.dumps({"input_ids": seq}))
    path.write_text("\n".join(lines) + "\n")
    return path


def importance(tmp: Path, base: Path, reasoning: Path, domain: Path, lambdas: list[str],
               capsys, *, n_texts: int = 3, zero_grad: str = "merge", extra: list[str] = ()
               ) -> tuple[Path, Path]:
    """Run `importance fisher` and `importance rcp-votes` through the CLI; returns
    (fisher folder, votes stem)."""
    r_data = texts(tmp / "reason.jsonl", n_texts, seed=1)
    d_data = texts(tmp / "domain.jsonl", n_texts, seed=2)
    fisher = tmp / "fisher"
    code, _, err = run_cli(["importance", "fisher", "--model", reasoning, "--data", r_data,
                            "--out", fisher, "--device", "cpu", "-q", *extra], capsys)
    assert code == 0, err
    votes = tmp / "votes"
    args = ["importance", "rcp-votes", "--model", domain, "--reasoning", reasoning,
            "--fisher", fisher, "--data", d_data, "--out", votes, "--zero-grad", zero_grad,
            "--device", "cpu", "-q"]
    for lam in lambdas:
        args += ["--penalty-lambda", lam]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    return fisher, votes


def reference_grads(folder: Path, data: Path) -> list[dict[str, torch.Tensor]]:
    """Per text, ∂(mean token cross-entropy)/∂θ of every parameter, by plain autograd
    (transformers' own loss with labels = input ids), independent of the stage's hooks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    out = []
    for line in data.read_text().splitlines():
        ids = torch.tensor([json.loads(line)["input_ids"]])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        grads = torch.autograd.grad(loss, list(params.values()))
        out.append({n: g.detach() for n, g in zip(params, grads)})
    return out
