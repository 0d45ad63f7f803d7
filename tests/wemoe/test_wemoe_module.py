"""The WEMoE module and checkpoint format (docs/methods/wemoe.md §1, §3), on hand-written WEMoE folders of a tiny
Llama family: both loaders, exactness vs task arithmetic and vs a fine-tune, the three forward
paths vs a naive per-sample loop, padding invariance, cached generation, save round trip, and the
sparse / low-rank storages."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.func import functional_call

from support.helpers import load_folder
from mergekit_like.demo import LlamaShape, make_family
from mergekit_like.runtime.evaluate import greedy_continuations
from mergekit_like.wemoe.runtime import is_wemoe, load_wemoe
from mergekit_like.wemoe.hf import CODE_FILES, SOURCE_DIR, modeling_sha256

transformers = pytest.importorskip("transformers")

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
LAM, TOL = 0.3, dict(rtol=1e-5, atol=1e-5)
LINEARS = ("gate_proj", "up_proj", "down_proj")
PROMPTS = [[5, 9, 3, 17, 22, 8, 1], [4, 30], [12, 7, 7, 40, 2]]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """(base, [ft1, ft2]) tensors, the base config, and the family root."""
    root = tmp_path_factory.mktemp("wemoe_family")
    folders = make_family(root, SHAPE, n_finetunes=2, delta_scale=0.02)
    tensors = [load_folder(f) for f in folders]
    return tensors[0], tensors[1:], json.loads((folders[0] / "config.json").read_text()), root


def _is_mlp(name: str) -> bool:
    return ".mlp." in name


def write_wemoe(out: Path, family, *, storage="dense", density=None, rank=None, router=None,
                mlp_override=None, forward="auto", bias=False) -> Path:
    """A WEMoE folder per the contract: static TA (θ0 + λ Σ τ) outside the MLPs; MLP θ0 and τ
    stacked (or compressed); routers in router.safetensors (default init: fc1 ~ N(0, 0.01²),
    fc2 = 0, fc2.bias = λ; ``router(layer, tensors)`` may edit them); two shards + an index.
    ``bias`` adds random MLP biases (base and per-task deltas)."""
    base, fts, config, _ = family
    base, fts = dict(base), [dict(ft) for ft in fts]
    if bias:
        g = torch.Generator().manual_seed(7)
        for name in [n for n in base if _is_mlp(n)]:
            b = name.replace(".weight", ".bias")
            base[b] = 0.1 * torch.randn(base[name].shape[0], generator=g)
            for ft in fts:
                ft[b] = base[b] + 0.05 * torch.randn(base[b].shape, generator=g)
    if mlp_override:
        fts = [{**ft, **mlp_override(k, ft)} for k, ft in enumerate(fts)]
    model, routers, tasks = {}, {}, len(fts)
    for name, t0 in base.items():
        taus = [ft[name] - t0 for ft in fts]
        if not _is_mlp(name):
            model[name] = t0 + LAM * sum(taus)
            continue
        prefix, linear, kind = name.rsplit(".", 2)
        model[f"{prefix}.base.{linear}.{kind}"] = t0
        key = f"{prefix}.experts.{linear}.{kind}"
        if kind == "bias" or storage == "dense":
            model[key] = torch.stack(taus)
        elif storage == "sparse":
            k = max(1, math.floor(density * t0.numel()))
            flat = torch.stack(taus).flatten(1)
            idx = flat.abs().topk(k, dim=1).indices.sort(dim=1).values
            model[key + "_values"], model[key + "_indices"] = flat.gather(1, idx), idx.to(torch.int32)
        else:
            r = min(rank, min(t0.shape)) if isinstance(rank, int) else max(1, math.floor(rank * min(t0.shape)))
            u, s, vh = torch.linalg.svd(torch.stack(taus).double(), full_matrices=False)
            model[key + "_A"] = (u[..., :r] * s[:, None, :r]).float().contiguous()
            model[key + "_B"] = vh[:, :r].float().contiguous()
    d = SHAPE.hidden_size
    for layer in range(SHAPE.num_hidden_layers):
        g = torch.Generator().manual_seed(100 + layer)
        p = f"model.layers.{layer}.mlp.router."
        rt = {p + "fc1.weight": 0.01 * torch.randn(d, d, generator=g), p + "fc1.bias": torch.zeros(d),
              p + "fc2.weight": torch.zeros(tasks, d), p + "fc2.bias": torch.full((tasks,), LAM)}
        if router:
            router(layer, rt)
        routers.update(rt)
    out.mkdir(parents=True)
    names = sorted(model)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: model[k].contiguous() for k in keys}, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, fname))
    save_file(routers, str(out / "router.safetensors"), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(routers, "router.safetensors"))
    total = sum(t.numel() * t.element_size() for t in [*model.values(), *routers.values()])
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    for fname in CODE_FILES:
        shutil.copyfile(SOURCE_DIR / fname, out / fname)
    cfg = {**config, "mlp_bias": bias, "model_type": "wemoe", "architectures": ["WEMoEForCausalLM"],
           "auto_map": {"AutoConfig": "configuration_wemoe.WEMoEConfig",
                        "AutoModelForCausalLM": "modeling_wemoe.WEMoEForCausalLM"},
           "base_model_type": "llama", "base_architectures": ["LlamaForCausalLM"],
           "wemoe": {"format_version": 1, "tasks": [f"t{k}" for k in range(tasks)], "lambda": LAM,
                     "router_hidden": d, "expert_storage": storage, "expert_density": density,
                     "expert_rank": rank, "routing": "sample", "forward": forward,
                     "materialize_budget_mb": 1024, "modeling_sha256": modeling_sha256()}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def llama(tensors: dict, config: dict):
    """A LlamaForCausalLM holding ``tensors`` exactly."""
    cfg = transformers.AutoConfig.for_model("llama", **{k: v for k, v in config.items() if k != "model_type"})
    model = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def batch(side="right", prompts=PROMPTS):
    n = max(map(len, prompts))
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for b, p in enumerate(prompts):
        sl = slice(n - len(p), n) if side == "left" else slice(0, len(p))
        ids[b, sl], mask[b, sl] = torch.tensor(p), 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def logits(model, side="right", **kw):
    ids, mask, pos = batch(side)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kw).logits
    return out, mask.bool()


def random_router(layer, rt):
    """A router with non-zero fc2: r of order 1, different per sample."""
    g = torch.Generator().manual_seed(200 + layer)
    p = f"model.layers.{layer}.mlp.router."
    rt[p + "fc1.weight"] = 0.3 * torch.randn(rt[p + "fc1.weight"].shape, generator=g)
    rt[p + "fc2.weight"] = 0.3 * torch.randn(rt[p + "fc2.weight"].shape, generator=g)


def test_both_loaders_agree_and_load_every_key(family, tmp_path):
    out = write_wemoe(tmp_path / "w", family, router=random_router)
    assert is_wemoe(out) and not is_wemoe(family[3] / "base")
    remote, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    names = set(remote.state_dict())
    stored = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert names == stored and not any(n.endswith(("mlp.gate_proj.weight", "mlp.down_proj.weight")) for n in names)
    local = load_wemoe(out, device="cpu").model
    assert type(local).__module__ == "mergekit_like.wemoe.hf.modeling_wemoe"
    assert torch.equal(logits(remote.eval())[0], logits(local)[0])
    assert {p.dtype for p in local.router_parameters()} == {torch.float32}
    assert len(local.router_parameters()) == 4 * SHAPE.num_hidden_layers


def test_untrained_equals_task_arithmetic(family, tmp_path):
    base, fts, config, _ = family
    ta = llama({n: t + LAM * sum(ft[n] - t for ft in fts) for n, t in base.items()}, config)
    model = load_wemoe(write_wemoe(tmp_path / "w", family), device="cpu").model
    got, mask = logits(model)
    want, _ = logits(ta)
    torch.testing.assert_close(got[mask], want[mask], **TOL)


@pytest.mark.parametrize("bias", [False, True])
def test_factored_materialized_and_naive_loop_agree(family, tmp_path, bias):
    model = load_wemoe(write_wemoe(tmp_path / "w", family, router=random_router, bias=bias), device="cpu").model
    results = {}
    # budgets: everything in one chunk; chunks of 2 samples (48·32·4 B each); too small: factored
    for path, budget in (("factored", None), ("materialized", 1024), ("materialized", 0.012),
                         ("materialized", 0.005)):
        model.set_forward_path(path, budget)
        results[(path, budget)] = logits(model)[0]
    mask = logits(model)[1]
    ref = results[("factored", None)]
    for out in results.values():
        torch.testing.assert_close(out[mask], ref[mask], **TOL)
    # one module against a naive loop with explicit per-sample weights
    mlp = model.wemoe_mlps()[1]
    h = torch.randn(3, 5, SHAPE.hidden_size, generator=torch.Generator().manual_seed(3))
    model.wemoe_state.mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    r_tok = mlp.router(h)
    m = model.wemoe_state.mask[..., None].float()
    r = (r_tok * m).sum(1) / m.sum(1)
    assert r.abs().min() > 1e-3 and r.std() > 1e-2
    naive = []
    for b in range(3):
        params = {}
        for lin in LINEARS:
            base = getattr(mlp.base, lin)
            params[f"{lin}.weight"] = base.weight + torch.einsum("t,toi->oi", r[b], mlp.experts[lin].weight)
            if bias:
                params[f"{lin}.bias"] = base.bias + r[b] @ mlp.experts[lin].bias
        naive.append(functional_call(mlp.base, params, (h[b:b + 1],)))
    naive = torch.cat(naive)
    with torch.no_grad():
        for path in ("factored", "materialized"):
            model.set_forward_path(path, 0.012)
            torch.testing.assert_close(mlp(h), naive, **TOL)


def test_one_hot_router_reproduces_each_finetune(family, tmp_path):
    base, fts, config, _ = family
    for t in range(len(fts)):
        def one_hot(layer, rt, t=t):
            rt[f"model.layers.{layer}.mlp.router.fc2.bias"] = torch.eye(len(fts))[t]
        model = load_wemoe(write_wemoe(tmp_path / f"w{t}", family, router=one_hot), device="cpu").model
        ref = {n: fts[t][n] if _is_mlp(n) else x + LAM * sum(ft[n] - x for ft in fts) for n, x in base.items()}
        got, mask = logits(model)
        torch.testing.assert_close(got[mask], logits(llama(ref, config))[0][mask], **TOL)


def test_left_and_right_padding_route_alike(family, tmp_path):
    model = load_wemoe(write_wemoe(tmp_path / "w", family, router=random_router), device="cpu").model
    right, mask = logits(model, "right")
    r_right = model.routing_weights()
    left, _ = logits(model, "left")
    torch.testing.assert_close(model.routing_weights(), r_right, **TOL)
    assert r_right.shape == (SHAPE.num_hidden_layers, len(PROMPTS), 2) and r_right.std() > 1e-2
    torch.testing.assert_close(left[batch("left")[1].bool()], right[mask], **TOL)


def test_greedy_generation_uses_prompt_routing(family, tmp_path):
    loaded = load_wemoe(write_wemoe(tmp_path / "w", family, router=random_router), device="cpu")
    model, steps = loaded.model, 5
    got = greedy_continuations(model, PROMPTS, steps, loaded.device)
    with torch.no_grad():
        for b, prompt in enumerate(PROMPTS):
            seq = torch.tensor([prompt])
            model(input_ids=seq, use_cache=False)
            r = model.routing_weights()
            for _ in range(steps):
                nxt = model(input_ids=seq, use_cache=False, wemoe_routing=r).logits[0, -1].argmax()
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            assert got[b].tolist() == seq[0, len(prompt):].tolist()
        ids, mask, _ = batch("left")
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
        assert torch.equal(gen[:, ids.shape[1]:], got)
        with pytest.raises(ValueError, match="beam"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, num_beams=2)


def test_save_pretrained_round_trips_bit_for_bit(family, tmp_path):
    model = load_wemoe(write_wemoe(tmp_path / "w", family, router=random_router), device="cpu").model
    model.save_pretrained(tmp_path / "saved")
    assert all((tmp_path / "saved" / f).read_bytes() == (SOURCE_DIR / f).read_bytes() for f in CODE_FILES)
    again = load_wemoe(tmp_path / "saved", device="cpu").model
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    assert again.config.wemoe == model.config.wemoe
    assert torch.equal(logits(model)[0], logits(again)[0])


@pytest.mark.parametrize("storage,density,rank", [("sparse", 0.3, None), ("lowrank", None, 0.5),
                                                  ("lowrank", None, 8)])
def test_compressed_storages_match_their_dense_reconstruction(family, tmp_path, storage, density, rank):
    model = load_wemoe(write_wemoe(tmp_path / "c", family, storage=storage, density=density,
                                   rank=rank, router=random_router), device="cpu").model
    dense = load_wemoe(write_wemoe(tmp_path / "d", family, router=random_router), device="cpu").model
    with torch.no_grad():
        for small, big in zip(model.wemoe_mlps(), dense.wemoe_mlps()):
            for lin in LINEARS:
                recon = small.experts[lin].dense()
                if storage == "sparse":
                    k = small.experts[lin].weight_values.shape[1]
                    assert k == math.floor(0.3 * recon[0].numel()) and (recon != 0).sum(dim=(1, 2)).max() <= k
                else:
                    assert small.experts[lin].weight_A.shape[2] == (8 if rank == 8 else 16)
                big.experts[lin].weight.copy_(recon)
    for path in ("factored", "materialized"):
        model.set_forward_path(path)
        dense.set_forward_path(path)
        got, mask = logits(model)
        torch.testing.assert_close(got[mask], logits(dense)[0][mask], **TOL)


def test_tied_embeddings_low_precision_and_refusals(tmp_path):
    shape = LlamaShape(**{**SHAPE.__dict__, "tie_word_embeddings": True})
    folders = make_family(tmp_path / "fam", shape, n_finetunes=2, delta_scale=0.02)
    tensors = [load_folder(f) for f in folders]
    config = json.loads((folders[0] / "config.json").read_text())
    out = write_wemoe(tmp_path / "w", (tensors[0], tensors[1:], config, None))
    loaded = load_wemoe(out, device="cpu")
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ta = llama({n: t + LAM * sum(ft[n] - t for ft in tensors[1:]) for n, t in tensors[0].items()}, config)
    ta.tie_weights()
    got, mask = logits(model)
    torch.testing.assert_close(got[mask], logits(ta)[0][mask], **TOL)
    half = load_wemoe(out, device="cpu", dtype=torch.bfloat16).model
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for p in half.router_parameters()} == {torch.float32}
    cfg = json.loads((out / "config.json").read_text())
    cfg["wemoe"]["modeling_sha256"] = "0" * 64
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="sha256"):
        load_wemoe(out, device="cpu")
    from mergekit_like.errors import MergeError
    with pytest.raises(MergeError, match="not a WEMoE"):
        load_wemoe(folders[0], device="cpu")
    from mergekit_like.wemoe.hf.modeling_wemoe import WEMoEConfig, WEMoEForCausalLM
    gpt2 = WEMoEConfig(base_model_type="gpt2", n_embd=16, n_layer=1, n_head=2, vocab_size=32,
                       n_positions=16, wemoe={**cfg["wemoe"], "router_hidden": 4})
    with pytest.raises(ValueError, match="gpt2"):
        WEMoEForCausalLM(gpt2)


def test_fixed_routing_is_each_finetunes_mlp_until_unset(family, tmp_path):
    """fix_routing(e_t) — the quality table's oracle row — gives fine-tune t's MLPs on every
    sample, generation included; None restores the routers."""
    base, fts, config, _ = family
    loaded = load_wemoe(write_wemoe(tmp_path / "w", family, router=random_router), device="cpu")
    model = loaded.model
    routed, mask = logits(model)
    for t in range(len(fts)):
        model.fix_routing(torch.eye(len(fts))[t])
        ref = {n: fts[t][n] if _is_mlp(n) else x + LAM * sum(ft[n] - x for ft in fts)
               for n, x in base.items()}
        got, _ = logits(model)
        torch.testing.assert_close(got[mask], logits(llama(ref, config))[0][mask], **TOL)
        gen = greedy_continuations(model, PROMPTS, 4, loaded.device)
        assert torch.equal(gen, greedy_continuations(llama(ref, config), PROMPTS, 4, "cpu"))
    model.fix_routing(None)
    torch.testing.assert_close(logits(model)[0], routed, rtol=0, atol=0)
