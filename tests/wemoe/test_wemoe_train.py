"""`mergekit-like train-router` on a WEMoE folder (docs/methods/wemoe.md §5): only router.safetensors changes,
the entropy goes down, runs are deterministic, the held-out guard keeps the best routers, --reinit
rebuilds the merge's initial routers, and bad input is a one-line error before any model load."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from support.helpers import folder_digest, load_folder, run_cli, shard_names, write_recipe
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_like.demo import LlamaShape, make_family, write_checkpoint
from mergekit_like.io.verify import verify_output

pytest.importorskip("transformers")
SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
ROUTER = "router.safetensors"


def peaked_family(root: Path) -> list[Path]:
    """base + 2 fine-tunes whose next-token distributions are far from uniform (lm_head × 30)
    and whose MLPs differ enough (τ ~ 0.3·N(0, 1)) for the routing to matter."""
    folders = make_family(root / "src", SHAPE, n_finetunes=2, delta_scale=0.02)
    config = json.loads((folders[0] / "config.json").read_text())
    base = load_folder(folders[0])
    gen = torch.Generator().manual_seed(1)
    out = []
    for k, folder in enumerate(folders):
        tensors = load_folder(folder)
        if k:
            tensors = {n: base[n] + 0.3 * torch.randn(t.shape, generator=gen) if ".mlp." in n
                       else t for n, t in tensors.items()}
        tensors["lm_head.weight"] = 30 * tensors["lm_head.weight"]
        write_checkpoint(root / f"m{k}", tensors, config)
        out.append(root / f"m{k}")
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def texts(n: int, seed: int, tasks=("a", "b")) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"input_ids": [rng.randint(3, 63) for _ in range(rng.randint(4, 20))]}
            for _ in range(n)]
    for k, row in enumerate(rows):
        if tasks:
            row["task"] = tasks[k % len(tasks)]
    return rows


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wemoe_train")
    family = peaked_family(root)
    doc = {"merge_method": "wemoe", "base_model": str(family[0]),
           "models": [{"model": str(family[1]), "name": "a"},
                      {"model": str(family[2]), "name": "b"}],
           "parameters": {"lambda": 0.3, "router_hidden": 16}, "dtype": "float32",
           "out_dtype": "float32"}
    from mergekit_like.cli import main

    assert main(["merge", str(write_recipe(root / "r.yml", doc)), str(root / "out"), "-q",
                 "--out-shard-size", "60KB"]) == 0
    return {"out": root / "out", "plain": family[0],
            "train": write_jsonl(root / "train.jsonl", texts(40, 0)),
            "val": write_jsonl(root / "val.jsonl", confident_texts(root / "out"))}


def confident_texts(out: Path) -> list[dict]:
    """Held-out texts the untrained model (task arithmetic) predicts well: random 3-token
    prompts continued greedily by it, so wrecking the routers raises their perplexity."""
    from mergekit_like.runtime.evaluate import greedy_continuations
    from mergekit_like.wemoe.runtime import load_wemoe

    loaded = load_wemoe(out, device="cpu")
    prompts = [row["input_ids"][:3] for row in texts(12, 1, tasks=None)]
    tails = greedy_continuations(loaded.model, prompts, 12, loaded.device).tolist()
    return [{"input_ids": p + t} for p, t in zip(prompts, tails)]


@pytest.fixture
def out(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine["out"], tmp_path / "out"))


def train(out: Path, data: Path, capsys, *extra) -> tuple[int, str, str]:
    return run_cli(["train-router", out, "--data", data, "--steps", "10", "--lr", "5e-2",
                    "--device", "cpu", "-q", *extra], capsys)


def metadata(out: Path) -> dict:
    with safe_open(str(out / ROUTER), framework="pt") as f:
        return f.metadata()


def test_only_routers_change_and_entropy_goes_down(pristine, out, capsys):
    before = folder_digest(out)
    code, stdout, err = train(out, pristine["train"], capsys, "--objective", "entropy")
    assert code == 0, err
    after = folder_digest(out)
    assert len(shard_names(out)) >= 2
    changed = (ROUTER, "merge_manifest.json")   # the manifest re-records the new router file
    assert {k: v for k, v in after.items() if k not in changed} == \
        {k: v for k, v in before.items() if k not in changed}
    assert after[ROUTER] != before[ROUTER]
    recorded = json.loads((out / "merge_manifest.json").read_text())["files"][ROUTER]
    assert recorded == {"size": (out / ROUTER).stat().st_size, "sha256": after[ROUTER]}
    assert verify_output(out, manifest=True).hashed
    old, new = load_file(str(pristine["out"] / ROUTER)), load_file(str(out / ROUTER))
    assert {k: (t.shape, t.dtype) for k, t in old.items()} == \
        {k: (t.shape, torch.float32) for k, t in new.items()}
    assert any(not torch.equal(old[k], new[k]) for k in old)
    meta = metadata(out)
    assert meta["state"] == "trained" and meta["steps"] == "10" and float(meta["lr"]) == 5e-2
    assert meta["data_sha256"] == hashlib.sha256(pristine["train"].read_bytes()).hexdigest()
    assert meta["best_perplexity"] == "null"
    assert float(meta["final_entropy"]) < float(meta["initial_entropy"])
    assert f"entropy at step 0: {float(meta['initial_entropy']):.4f}" in stdout
    verify_output(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(before)   # no temporary file left


def test_same_seed_same_routers(pristine, tmp_path, capsys):
    routers = []
    for k, seed in enumerate([3, 3, 4]):
        folder = Path(shutil.copytree(pristine["out"], tmp_path / f"o{k}"))
        code, _, err = train(folder, pristine["train"], capsys, "--seed", seed, "--steps", "3",
                             "--grad-accum", "2", "--batch-size", "4")
        assert code == 0, err
        routers.append(load_file(str(folder / ROUTER)))
    assert all(torch.equal(routers[0][k], routers[1][k]) for k in routers[0])
    assert any(not torch.equal(routers[0][k], routers[2][k]) for k in routers[0])


def test_val_data_keeps_the_best_routers(pristine, out, capsys):
    code, stdout, err = train(out, pristine["train"], capsys, "--val-data", pristine["val"],
                              "--eval-every", "5")
    assert code == 0, err
    meta = metadata(out)
    assert meta["best_perplexity"] != "null" and meta["kept_step"] in ("0", "5", "10")
    assert f"best held-out perplexity: {float(meta['best_perplexity']):.4f}" in stdout


def test_no_progress_keeps_the_start_and_reinit_rebuilds_it(pristine, out, capsys):
    code, _, err = train(out, pristine["train"], capsys)                 # routers now trained
    assert code == 0, err
    # a destructive learning rate: step 0 (the initial routers, i.e. task arithmetic) wins
    code, stdout, err = train(out, pristine["train"], capsys, "--reinit", "--lr", "100",
                              "--steps", "2", "--eval-every", "1", "--val-data", pristine["val"])
    assert code == 0, err
    assert "training did not beat task arithmetic" in stdout
    meta = metadata(out)
    assert meta["kept_step"] == "0" and meta["state"] == "init"
    assert meta["final_entropy"] == meta["initial_entropy"]
    initial, now = load_file(str(pristine["out"] / ROUTER)), load_file(str(out / ROUTER))
    assert all(torch.equal(initial[k], now[k]) for k in initial)


def test_initial_routers_follow_the_recipe_seed_and_weights(pristine, tmp_path, capsys):
    from mergekit_like.wemoe.train import initial_routers

    doc = yaml.safe_load((pristine["out"] / "mergekit_config.yml").read_text())
    doc["seed"] = 7
    doc["models"][0]["parameters"] = {"weight": 0.5}
    out = tmp_path / "seeded"
    code, _, err = run_cli(["merge", write_recipe(tmp_path / "r.yml", doc), out, "-q"], capsys)
    assert code == 0, err
    merged = load_file(str(out / ROUTER))
    rebuilt = initial_routers(out, json.loads((out / "config.json").read_text()),
                              {n: t.shape for n, t in merged.items()})
    assert all(torch.equal(merged[k], rebuilt[k]) for k in merged)
    assert rebuilt["model.layers.0.mlp.router.fc2.bias"].tolist() == pytest.approx([0.15, 0.3])


@pytest.mark.parametrize("case, message", [
    ("empty", "empty.jsonl: no examples"),
    ("missing", "nowhere.jsonl: no such data file"),
    ("empty_val", "empty.jsonl: no examples"),
    ("plain", "not a Twin bundle (no twin/twin.json)"),
    ("keep_best", "--keep best needs --val-data"),
    ("keep_bad", "--keep 'middle': use best or last"),
    ("steps", "--steps 0: must be at least 1"),
    ("lr", "--lr -1.0: must be positive"),
])
def test_bad_input_is_one_line_before_loading(pristine, out, tmp_path, capsys, monkeypatch,
                                              case, message):
    import mergekit_like.wemoe.runtime as runtime_wemoe

    monkeypatch.setattr(runtime_wemoe, "load_wemoe", lambda *a, **k: pytest.fail("loaded"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    folder, data, extra = out, pristine["train"], []
    if case == "empty":
        data = empty
    elif case == "missing":
        data = tmp_path / "nowhere.jsonl"
    elif case == "empty_val":
        extra = ["--val-data", empty]
    elif case == "plain":
        folder = pristine["plain"]
    else:
        extra = {"keep_best": ["--keep", "best"], "keep_bad": ["--keep", "middle"],
                 "steps": ["--steps", "0"], "lr": ["--lr", "-1"]}[case]
    before = folder_digest(out)
    code, _, err = train(folder, data, capsys, *extra)
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert folder_digest(out) == before


def _routing_and_surprisals(folder: Path, rows: list[dict]):
    """Per text: r [L, T] of the trained routers, and the mean surprisal −log p(next token) of
    the text under each expert forced one-hot (computed here from the logits, not by
    train-router's code)."""
    from mergekit_like.wemoe.runtime import load_wemoe

    model = load_wemoe(folder, device="cpu", dtype=torch.float32).model
    routing, entropies = [], []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            model(input_ids=ids, use_cache=False)
            routing.append(model.routing_weights()[:, 0])
            per_expert = []
            for t in range(2):
                forced = torch.zeros(len(model.wemoe_mlps()), 1, 2)
                forced[:, :, t] = 1.0
                logp = model(input_ids=ids, use_cache=False,
                             wemoe_routing=forced).logits[0].log_softmax(-1)
                nll = -logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
                per_expert.append(float(nll.mean()))
            entropies.append(per_expert)
    return torch.stack(routing), torch.tensor(entropies)


def test_confident_objective_routes_each_text_to_the_expert_that_predicts_it(pristine, out,
                                                                            capsys):
    rows = [json.loads(line) for line in pristine["train"].read_text().splitlines()]
    before, surprisals = _routing_and_surprisals(out, rows)
    surest = surprisals.argmin(dim=1)                         # t* by hand
    code, stdout, err = run_cli(["train-router", out, "--data", pristine["train"], "--steps",
                                 "60", "--lr", "1e-2", "--device", "cpu", "-q"], capsys)
    assert code == 0, err
    counts = {"a": int((surest == 0).sum()), "b": int((surest == 1).sum())}
    assert f"texts per best-predicting expert: a {counts['a']}, b {counts['b']}" in stdout
    assert metadata(out)["objective"] == "confident"
    after, _ = _routing_and_surprisals(out, rows)
    goal = torch.nn.functional.one_hot(surest, 2).float()[:, None]      # [N, 1, T]
    dist_before = (before - goal).square().sum(-1).mean()
    dist_after = (after - goal).square().sum(-1).mean()
    assert dist_after < 0.5 * dist_before
    # the largest routing weight now names the surest expert for most of these random texts
    assert float((after.mean(dim=1).argmax(dim=-1) == surest).float().mean()) >= 0.7  # chance: 0.5


def test_answer_positions_pick_the_positions_that_predict_the_answer():
    from mergekit_like.wemoe.confident import answer_positions

    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    got = answer_positions(mask, [2, 0, 5])
    # text 0: 5 real tokens, the last 2 are the answer -> positions 2 and 3 predict them;
    # text 1: no answer -> every real position; text 2: an answer as long as the text -> all
    assert got.tolist() == [[0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
