"""The Twin runtime (docs/methods/twin.md §8): routed logits equal the materialized checkpoint's, per sample;
a one-hot router decodes as the task's own model; padding does not move the routing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.helpers import run_cli
from safetensors.torch import load_file, save_file
from support.twin_fixture import hand_bundle, tiny_family

from mergekit_like.demo import LlamaShape
from mergekit_like.errors import MergeError
from mergekit_like.runtime import Example, evaluate_accuracy, greedy_continuations, load_model
from mergekit_like.runtime.data import pad_batch
from mergekit_like.twin.bundle import TwinBundle
from mergekit_like.twin.router import TwinRouter, save_router

pytest.importorskip("transformers")
TASKS = ["alpha", "beta", "gamma"]
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("twin_rt")
    family = tiny_family(root / "family", n_tasks=3)
    return hand_bundle(root / "bundle", family, TASKS, rank=0.25, dense_small=True)


def materialized(root: Path, w: list[float]):
    """The shared model with W += Σ_t w_t A_t B_t (lowrank) or Σ_t w_t δ_t (dense), in memory."""
    loaded = load_model(root, device="cpu")
    with TwinBundle(root) as tb, torch.no_grad():
        for name, entry in tb.entries.items():
            parts = [tb.exclusive(t, name) for t in tb.tasks]
            if entry.kind == "lowrank":
                delta = sum(wt * (a @ b) for wt, (a, b) in zip(w, parts))
            elif entry.kind == "dense":
                delta = sum(wt * d for wt, (d,) in zip(w, parts))
            else:
                continue
            loaded.model.get_parameter(name).add_(delta)
    return loaded


def with_router(root: Path, favourite: int | None, seed: int = 0) -> Path:
    """Save a router: random (favourite None) or with logits = one-hot · 100 (w one-hot)."""
    torch.manual_seed(seed)
    router = TwinRouter(32, len(TASKS)).eval()
    if favourite is not None:
        with torch.no_grad():
            router.net[8].weight.zero_()
            router.net[8].bias.copy_(100.0 * torch.eye(len(TASKS))[favourite])
    save_router(root, router, TASKS, {})
    return root


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    import shutil
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


IDS = torch.tensor([[5, 9, 12, 3, 7, 30], [40, 2, 8, 17, 21, 60]])


@pytest.mark.parametrize("w", [[0.6, 0.3, 0.1], [1.5, -0.4, 0.0]])
def test_fixed_weights_equal_materialized_checkpoint(bundle, w):
    from mergekit_like.twin.runtime import load_twin

    twin = load_twin(bundle, device="cpu")
    with torch.no_grad():
        got = twin.model(input_ids=IDS, twin_weights=torch.tensor(w)).logits
        want = materialized(bundle, w).model(input_ids=IDS).logits
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, load_model(bundle, device="cpu").model(input_ids=IDS).logits,
                              atol=1e-4)  # the corrections matter


def test_per_sample_weights_equal_separate_runs(bundle):
    from mergekit_like.twin.runtime import load_twin

    twin = load_twin(bundle, device="cpu").model
    prompts = [[5, 9, 12, 3, 7, 30], [40, 2, 8], [11, 13]]
    w = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    ids, mask = pad_batch(prompts, "right")
    with torch.no_grad():
        batched = twin(input_ids=ids, attention_mask=mask, twin_weights=w).logits
        for b, prompt in enumerate(prompts):
            alone = twin(input_ids=torch.tensor([prompt]), twin_weights=w[b]).logits[0]
            torch.testing.assert_close(batched[b, :len(prompt)], alone, **TOL)
        twin.set_weights({"beta": 1.0})  # fixed weights, by task name
        fixed = twin(input_ids=ids, attention_mask=mask).logits
        twin.set_weights(None)
    onehot = twin(input_ids=ids, attention_mask=mask, weights=[0.0, 1.0, 0.0]).logits
    torch.testing.assert_close(fixed, onehot)


def test_one_hot_router_decodes_as_the_task_model(bundle_copy):
    from mergekit_like.twin.runtime import load_twin

    with_router(bundle_copy, favourite=1)
    twin = load_twin(bundle_copy, device="cpu")
    task_model = materialized(bundle_copy, [0.0, 1.0, 0.0])
    prompts = [[5, 9, 12], [40, 2, 8, 17, 21], [11], [60, 61, 3, 3]]
    want = greedy_continuations(task_model.model, prompts, 5, torch.device("cpu"))
    got = greedy_continuations(twin.model, prompts, 5, torch.device("cpu"))
    assert torch.equal(got, want)
    torch.testing.assert_close(twin.model.last_weights, torch.eye(3)[[1] * 4])
    examples = [Example(p, a, task="beta") for p, a in zip(prompts, want.tolist())]
    assert evaluate_accuracy(twin, examples, batch_size=3)["beta"] == 1.0
    other = greedy_continuations(materialized(bundle_copy, [1.0, 0, 0]).model, prompts, 5,
                                 torch.device("cpu"))
    assert not torch.equal(other, want)  # the router's choice is visible


def test_left_padding_does_not_change_routing(bundle_copy):
    from mergekit_like.twin.runtime import load_twin

    with_router(bundle_copy, favourite=None)
    twin = load_twin(bundle_copy, device="cpu").model
    prompts = [[7, 8, 9], [1, 20, 30, 40, 50, 60, 3]]
    ids, mask = pad_batch(prompts, "left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batched = twin.route(ids, mask, positions)
    for b, prompt in enumerate(prompts):
        alone = twin.route(torch.tensor([prompt]))
        torch.testing.assert_close(batched[b], alone[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[0], batched[1])  # a real, input-dependent router


def test_without_router_needs_weights(bundle, tmp_path, capsys):
    from mergekit_like.twin.runtime import load_twin

    twin = load_twin(bundle, device="cpu").model
    with pytest.raises(MergeError, match="bundle has no router; run train-router or pass weights"):
        twin(input_ids=IDS)
    with pytest.raises(MergeError, match="unknown task 'delta'"):
        twin(input_ids=IDS, twin_weights={"delta": 1.0})
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input_ids": [5, 6], "answer": [7]}) + "\n")
    code, _, err = run_cli(["eval", bundle, "--data", data, "--metric", "acc", "--device", "cpu",
                            "-q"], capsys)
    assert code == 2 and "error: bundle has no router" in err and "Traceback" not in err


def _add_part(root: Path, name: str, kind: str, parts: list[dict], shape, rank=None) -> None:
    for task, tensors in zip(TASKS, parts):
        path = root / "twin" / task / "exclusive.safetensors"
        save_file({**load_file(str(path)), **tensors}, str(path))
    info_file = root / "twin" / "twin.json"
    info = json.loads(info_file.read_text())
    info["tensors"][name] = {"kind": kind, "shape": list(shape), "rank": rank}
    info_file.write_text(json.dumps(info))


def test_unsupported_exclusive_part_is_refused_by_name(bundle_copy):
    from mergekit_like.twin.runtime import load_twin

    name = "model.embed_tokens.weight"
    _add_part(bundle_copy, name, "dense", [{name + ".twin_delta": torch.zeros(64, 32)}] * 3,
              (64, 32))
    with pytest.raises(MergeError, match=f"cannot apply the dense exclusive part of tensor '{name}'"):
        load_twin(bundle_copy, device="cpu")


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_factors_equal_materialized(tmp_path, tied):
    from mergekit_like.twin.runtime import load_twin

    shape = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    root = hand_bundle(tmp_path / "b", tiny_family(tmp_path / "f", 3, shape=shape), TASKS)
    gen = torch.Generator().manual_seed(1)
    name = "model.embed_tokens.weight"
    parts = [{name + ".twin_A": torch.randn(64, 4, generator=gen),
              name + ".twin_B": 0.05 * torch.randn(4, 32, generator=gen)} for _ in TASKS]
    _add_part(root, name, "lowrank", parts, (64, 32), rank=4)
    w = [0.2, 0.5, 0.3]
    with torch.no_grad():
        got = load_twin(root, device="cpu").model(input_ids=IDS, twin_weights=w).logits
        want = materialized(root, w).model(input_ids=IDS).logits
    torch.testing.assert_close(got, want, **TOL)
