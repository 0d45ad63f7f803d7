"""Hostile dependencies: whatever transformers release pyproject's ``runtime`` extra admits
(``.ci/run`` runs this module on the newest and on the oldest), WEMoE's ``generate()`` decodes
exactly like a hand-rolled greedy loop with the prompt's routing, and loading, ``eval`` and
``train-router`` hit no deprecation that our own calls cause (a renamed keyword, a deprecated
output field).

Regression record: transformers 5.x renamed the KV cache from ``past_key_values`` to ``cache``;
the WEMoE modeling file only looked at ``past_key_values``, so under ``generate()`` every decode
step re-ran the router on the single new token and generate() returned other tokens than greedy
decoding; the runtime's own decode loop passed ``past_key_values=`` (a FutureWarning per call)."""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from support.helpers import run_cli, write_recipe
from safetensors.torch import load_file, save_file
from support.tiny_llama import save_tiny_llama, write_jsonl
from support.twin_fixture import hand_bundle, tiny_family

import mergekit_like
from mergekit_like.runtime import greedy_continuations, load_model
from mergekit_like.wemoe.runtime import load_wemoe

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 9, 3, 17, 22, 8, 1], [4, 30], [12, 7, 7, 40, 2]]
STEPS = 6
TASKS = ["math", "code"]
ROUTER = "router.safetensors"

DEPRECATION = re.compile(r"deprecat|will be removed|no longer supported", re.IGNORECASE)
OURS = re.compile(r"past_key_values|cache_params|cache_position|torch_dtype|use_return_dict|"
                  r"return_dict|logits_to_keep|position_ids|attention_mask|use_cache|"
                  r"local_files_only|output_loading_info|trust_remote_code|output_hidden_states|"
                  r"weights_only|use_safetensors|wemoe|mergekit", re.IGNORECASE)
"""What a deprecation must mention to be ours: the keywords and fields we use, our names."""
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
PACKAGE = str(Path(mergekit_like.__file__).resolve().parent)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """A plain tiny Llama with a tokenizer, a WEMoE merge output whose routers depend on the
    input, a Twin bundle of the same family, and the family's base."""
    root = tmp_path_factory.mktemp("hostile_deps")
    family = tiny_family(root / "family", n_tasks=2)
    doc = {"merge_method": "wemoe", "base_model": str(family[0]),
           "models": [{"model": str(family[1]), "name": TASKS[0]},
                      {"model": str(family[2]), "name": TASKS[1]}],
           "parameters": {"lambda": 0.3, "router_hidden": 16}, "dtype": "float32",
           "out_dtype": "float32"}
    from mergekit_like.cli import main

    recipe = write_recipe(root / "wemoe.yml", doc)
    assert main(["merge", str(recipe), str(root / "wemoe"), "-q"]) == 0
    _input_dependent_routers(root / "wemoe")
    return {"plain": save_tiny_llama(root / "plain", 0, with_tokenizer=True),
            "wemoe": root / "wemoe", "twin": hand_bundle(root / "twin", family, TASKS, rank=0.25),
            "base": family[0]}


def _input_dependent_routers(folder: Path) -> None:
    """Random fc1/fc2 (the merge's fc2 = 0 routes every input alike, which would hide a decode
    step that re-routes on the new token); same shapes and dtypes, so the file keeps its size."""
    path = folder / ROUTER
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(5)
    for name, t in tensors.items():
        if name.endswith(("fc1.weight", "fc2.weight")):
            tensors[name] = 0.5 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)


def _left_padded(prompts) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, prompts))
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, n - len(p):], mask[b, n - len(p):] = torch.tensor(p), 1
    return ids, mask


def _load(folder: Path, loader: str):
    if loader == "installed":
        return load_wemoe(folder, device="cpu").model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=True, dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.parametrize("loader", ["installed", "remote_code"])
def test_wemoe_generate_equals_greedy_loop_with_prompt_routing(outputs, loader):
    """generate(do_sample=False) on a left-padded batch == per prompt, alone: route once on the
    prompt, then argmax over full re-forwards (no KV cache) with that routing forced."""
    model = _load(outputs["wemoe"], loader)
    want = []
    with torch.no_grad():
        routings = []
        for prompt in PROMPTS:
            seq = torch.tensor([prompt])
            model(input_ids=seq, use_cache=False)
            r = model.routing_weights()
            routings.append(r[:, 0])
            for _ in range(STEPS):
                logits = model(input_ids=seq, use_cache=False, wemoe_routing=r).logits
                token = logits[0, -1].argmax()
                seq = torch.cat([seq, token.view(1, 1)], dim=1)
            want.append(seq[0, len(prompt):].tolist())
        assert (routings[0] - routings[1]).abs().max() > 1e-2  # the routing depends on the prompt
        ids, mask = _left_padded(PROMPTS)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS,
                             do_sample=False, pad_token_id=0)
    assert gen[:, ids.shape[1]:].tolist() == want
    assert greedy_continuations(model, PROMPTS, STEPS, torch.device("cpu")).tolist() == want


@contextmanager
def deprecations_of_ours():
    """Records every warning and every transformers log record (its ``warning_once`` cache
    cleared, so an earlier test cannot have used up the message); yields the list that, after
    the block, holds the deprecations that are ours: a Deprecation/FutureWarning raised from our
    package, or any deprecation (warning or log) naming something in ``OURS``."""
    found: list[str] = []
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    transformers.utils.logging.warning_once.cache_clear()
    handler, logger = Keep(logging.WARNING), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        logger.removeHandler(handler)
    for w in caught:
        text = str(w.message)
        if not issubclass(w.category, DEPRECATIONS):
            continue
        if str(Path(w.filename).resolve()).startswith(PACKAGE) or (DEPRECATION.search(text)
                                                                    and OURS.search(text)):
            found.append(f"{w.category.__name__}: {text} ({w.filename}:{w.lineno})")
    for r in records:
        text = r.getMessage()
        if DEPRECATION.search(text) and OURS.search(text):
            found.append(f"log {r.name}: {text}")


def test_loading_has_no_deprecation_of_ours(outputs):
    with deprecations_of_ours() as found:
        plain = load_model(outputs["plain"], device="cpu")
        greedy_continuations(plain.model, PROMPTS, 3, plain.device)
        wemoe = load_wemoe(outputs["wemoe"], device="cpu").model
        greedy_continuations(wemoe, PROMPTS, 3, torch.device("cpu"))
        ids, mask = _left_padded(PROMPTS)
        with torch.no_grad():
            wemoe.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                           pad_token_id=0)
        remote = _load(outputs["wemoe"], "remote_code")
        greedy_continuations(remote, PROMPTS, 3, torch.device("cpu"))
    assert found == []


def _rows(answers: bool, n: int = 24) -> list[dict]:
    rows = []
    for k in range(n):
        task = TASKS[k % 2]
        lo = 3 if task == "math" else 34
        row = {"input_ids": [lo + (7 * k + j) % 27 for j in range(3 + k % 5)], "task": task}
        if answers:
            row["answer"] = [lo + k % 27, lo + (k + 1) % 27]
        rows.append(row)
    return rows


def test_eval_has_no_deprecation_of_ours(outputs, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat on a mat", "answer": "and"},
                                              {"input_ids": [5, 9, 12], "answer": [3]}])
    ids_only = write_jsonl(tmp_path / "ids.jsonl", _rows(answers=True, n=6))
    with deprecations_of_ours() as found:
        for model, rows in ((outputs["plain"], data), (outputs["wemoe"], ids_only)):
            code, _, err = run_cli(["eval", model, "--data", rows, "--device", "cpu"], capsys)
            assert code == 0, err
    assert found == []


def test_train_router_and_routed_eval_have_no_deprecation_of_ours(outputs, tmp_path, capsys):
    wemoe = Path(shutil.copytree(outputs["wemoe"], tmp_path / "wemoe"))
    twin = Path(shutil.copytree(outputs["twin"], tmp_path / "twin"))
    train = write_jsonl(tmp_path / "train.jsonl", _rows(answers=False, n=40))
    acc = write_jsonl(tmp_path / "acc.jsonl", _rows(answers=True, n=6))
    with deprecations_of_ours() as found:
        code, _, err = run_cli(["train-router", wemoe, "--data", train, "--steps", "3",
                                "--device", "cpu", "-q"], capsys)
        assert code == 0, err
        code, _, err = run_cli(["train-router", twin, "--data", train, "--epochs", "2",
                                "--batch-size", "16", "--device", "cpu", "-q"], capsys)
        assert code == 0, err
        code, _, err = run_cli(["eval", twin, "--data", acc, "--device", "cpu"], capsys)
        assert code == 0, err
    assert found == []


def test_both_cache_names_reach_the_model_alike(outputs):
    """Our forwards (WEMoE, Twin) take the KV cache as ``cache`` or as transformers 5.0's
    ``past_key_values`` and decode alike; both at once is refused."""
    from mergekit_like.runtime.cache import output_cache
    from mergekit_like.twin.runtime import load_twin

    wemoe = load_wemoe(outputs["wemoe"], device="cpu").model
    twin = load_twin(outputs["twin"], device="cpu").model
    ids, mask = _left_padded(PROMPTS)
    step = torch.tensor([[3], [4], [5]])
    step_mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
    for model, extra in ((wemoe, {}), (twin, {"twin_weights": [0.7, 0.3]})):
        got = []
        with torch.no_grad():
            for name in ("cache", "past_key_values"):
                first = model(input_ids=ids, attention_mask=mask, use_cache=True, **extra)
                got.append(model(input_ids=step, attention_mask=step_mask, use_cache=True,
                                 **{name: output_cache(first)}, **extra).logits)
            torch.testing.assert_close(got[0], got[1], rtol=0, atol=0)
            cache = output_cache(model(input_ids=ids, attention_mask=mask, use_cache=True, **extra))
            with pytest.raises(ValueError, match="once"):
                model(input_ids=step, attention_mask=step_mask, cache=cache, past_key_values=cache,
                      **extra)
