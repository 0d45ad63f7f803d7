"""Importance masks of the task-vector methods (``mask:`` / ``protect:``): the pure functions of
ops/masks.py, the rules of methods/masks.py, merges re-read and compared with independent
computations, grid memo separation, and every bad input (exit code 2, one line, nothing at OUT)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from support.helpers import expect_merge_error as expect_error
from support.helpers import folder_digest, load_folder, run_cli, write_recipe
from safetensors.torch import save_file

from mergekit_like.demo import LlamaShape, make_family
from mergekit_like.methods import masks as rules
from mergekit_like.methods.base import TensorTask
from mergekit_like.methods.task_arithmetic import TaskArithmetic
from mergekit_like.ops import masks
from mergekit_like.ops.trim import trim_count

SHAPE = LlamaShape(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    make_family(root, SHAPE, n_finetunes=2, dtype=torch.float32, shard_bytes=[None, 20_000, None])
    return root


def write_importance(folder, like: dict[str, torch.Tensor], *, seed: int, votes: bool = False,
                     drop: str | None = None, reshape: str | None = None):
    """A folder of importance tensors keyed like the model: float32 N(0, 1), or int8 votes in
    [0, 4] (many ties). ``drop``: leave that tensor out; ``reshape``: give it another shape."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in like.items():
        if name == drop:
            continue
        shape = (t.numel(),) if name == reshape else t.shape
        out[name] = (torch.randint(0, 5, shape, generator=g).to(torch.int8) if votes
                     else torch.randn(shape, generator=g))
    os.makedirs(folder, exist_ok=True)
    save_file(out, str(folder / "model.safetensors"))
    return out


def models_of(fam):
    return {n: load_folder(fam / n) for n in ("base", "ft1", "ft2")}


def merge(tmp_path, capsys, doc, name="out"):
    recipe = write_recipe(tmp_path / f"{name}.yml", doc)
    out = tmp_path / name
    code, _, err = run_cli(["merge", recipe, out, "-q"], capsys)
    assert code == 0, err
    return out


def recipe(fam, method="task_arithmetic", p1=None, p2=None, top=None):
    return {"merge_method": method, "base_model": str(fam / "base"),
            "models": [{"model": str(fam / "ft1"), "parameters": {"weight": 1.0, **(p1 or {})}},
                       {"model": str(fam / "ft2"), "parameters": {"weight": 0.5, **(p2 or {})}}],
            "parameters": {"lambda": 0.8, **(top or {})}, "dtype": "float32"}


# ---- pure functions -------------------------------------------------------------------------

def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_keep_mask_threshold():
    imp = t([0.5, -1.0, 2.0, 0.0])
    assert masks.keep_mask(imp, threshold=0.0).tolist() == [True, False, True, False]
    assert masks.keep_mask(imp, threshold=0.5).tolist() == [False, False, True, False]
    assert masks.keep_mask(imp, threshold=0.0, protect=True).tolist() == [False, True, False, True]
    votes = t([0, 1, 2, -1, 3], torch.int8)
    assert masks.keep_mask(votes, threshold=1.5).tolist() == [False, False, True, False, True]
    # exact: float32(0.1) = 0.10000000149 > 0.1, though 0.1 rounds to it in float32
    assert masks.keep_mask(t([0.1]), threshold=0.1).tolist() == [True]
    assert masks.keep_mask(t([0.1], torch.float16), threshold=0.1).tolist() == [False]
    assert masks.keep_mask(t([0.1], torch.float64), threshold=0.1).tolist() == [False]


def test_keep_mask_top_with_ties():
    imp = t([1.0, 5.0, 3.0, 5.0, 2.0, 3.0])
    # k = int(0.5·6) = 3; the 3rd largest is 3 and both 3s are protected (4 entries)
    assert masks.important(imp, top=0.5).tolist() == [False, True, True, True, False, True]
    assert masks.keep_mask(imp, top=0.5, protect=True).tolist() == \
        [True, False, False, False, True, False]
    assert masks.important(imp, top=0.01).tolist() == [False, True, False, True, False, False]
    assert masks.important(imp, top=1.0).all()
    assert trim_count(0.2, 10) == 2 and trim_count(0.01, 10) == 1
    assert masks.kth_largest_f32(t([4, 4, 1, 9], torch.int8).reshape(2, 2), 2) == 4.0
    votes = t([[0, 3, 3], [1, 3, 2]], torch.int8)        # k = 1: every 3 is protected
    assert masks.important(votes, top=0.1).tolist() == [[False, True, True], [False, True, False]]
    bf = t([0.25, 1.5, -2.0, 1.5], torch.bfloat16)
    assert masks.important(bf, top=0.25).tolist() == [False, True, False, True]
    g = torch.Generator().manual_seed(0)
    r = torch.randn(1000, generator=g)
    assert masks.kth_largest_f32(r, 37) == float(r.sort(descending=True).values[36])
    assert int(masks.important(r, top=0.037).sum()) == 37


@pytest.mark.parametrize("kind, value, needle", [
    ("mask", {"importance": "x", "threshhold": 0}, "did you mean 'threshold'"),
    ("mask", 3, "mask must be PATH"),
    ("mask", {"threshold": 0.5}, "needs 'importance'"),
    ("mask", {"importance": "x", "threshold": "1e-3"}, "write 1.0e-3"),
    ("mask", {"importance": "x", "threshold": float("nan")}, "finite"),
    ("protect", "x", "not a bare path"),
    ("protect", {"importance": "x"}, "exactly one of 'top' and 'threshold'"),
    ("protect", {"importance": "x", "top": 0.1, "threshold": 1}, "exactly one"),
    ("protect", {"importance": "x", "top": 0}, "(0, 1]"),
    ("protect", {"importance": "x", "top": 1.5}, "(0, 1]"),
    ("protect", {"importance": "x", "top": True}, "must be a number"),
])
def test_parse_rule_errors(kind, value, needle):
    with pytest.raises(rules.RuleError) as exc:
        rules.parse_rule(kind, value)
    assert needle in exc.value.message


def test_parse_rule_forms():
    assert rules.parse_rule("mask", "f") == rules.Rule("mask", "f", 0.0)
    assert rules.parse_rule("mask", {"importance": "f", "threshold": 2}) == \
        rules.Rule("mask", "f", 2.0)
    assert rules.parse_rule("protect", {"importance": "f", "top": 1}) == \
        rules.Rule("protect", "f", None, 1.0)
    assert rules.parse_rule("protect", None) is None


# ---- merges ---------------------------------------------------------------------------------

def test_task_arithmetic_per_model_mask(fam, tmp_path, capsys):
    m = models_of(fam)
    imp = write_importance(tmp_path / "imp", m["base"], seed=1)
    doc = recipe(fam, p1={"mask": {"importance": str(tmp_path / "imp"), "threshold": 0.3}})
    out = merge(tmp_path, capsys, doc)
    got = load_folder(out)
    kept = total = 0
    for name, b in m["base"].items():
        keep = imp[name] > 0.3
        want = b + 0.8 * (1.0 * keep * (m["ft1"][name] - b) + 0.5 * (m["ft2"][name] - b))
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
        unmasked = b + 0.8 * ((m["ft1"][name] - b) + 0.5 * (m["ft2"][name] - b))
        assert not torch.equal(got[name], unmasked)
        kept += int(keep.sum())
        total += keep.numel()
    card = (out / "README.md").read_text()
    assert f"models[0]: mask {tmp_path / 'imp'} (I > 0.3)" in card
    assert f"models[0] {100 * kept / total:.2f}%" in card
    assert "models[1] " not in card.split("weights kept by the masks")[1].split("\n")[0]


def test_ties_top_level_protect(fam, tmp_path, capsys):
    m = models_of(fam)
    imp = write_importance(tmp_path / "votes", m["base"], seed=2, votes=True)
    dens = {"density": 0.5}
    plain = load_folder(merge(tmp_path, capsys, recipe(fam, "ties", dens, dens), "plain"))
    doc = recipe(fam, "ties", dens, dens,
                 top={"protect": {"importance": str(tmp_path / "votes"), "top": 0.2}})
    got = load_folder(merge(tmp_path, capsys, doc, "protected"))
    for name, b in m["base"].items():
        flat = imp[name].reshape(-1).float()
        k = max(1, int(0.2 * flat.numel()))
        v = flat.sort(descending=True).values[k - 1]
        prot = (imp[name].float() >= v)
        assert int(prot.sum()) >= k
        assert torch.equal(got[name][prot], b[prot]), name          # never moved
        assert torch.equal(got[name][~prot], plain[name][~prot]), name
        assert not torch.equal(plain[name][prot], b[prot])          # it would have moved


def test_mask_and_protect_on_one_model_and_bare_string(fam, tmp_path, capsys):
    m = models_of(fam)
    ia = write_importance(tmp_path / "a", m["base"], seed=3)
    ib = write_importance(tmp_path / "b", m["base"], seed=4)
    doc = recipe(fam, p1={"mask": str(tmp_path / "a"),
                          "protect": {"importance": str(tmp_path / "b"), "threshold": 0.5}})
    got = load_folder(merge(tmp_path, capsys, doc))
    for name, b in m["base"].items():
        keep = (ia[name] > 0) & ~(ib[name] > 0.5)
        want = b + 0.8 * (keep * (m["ft1"][name] - b) + 0.5 * (m["ft2"][name] - b))
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)


def test_top_level_mask_with_per_model_null(fam, tmp_path, capsys):
    """Top-level applies to every model; ``mask: null`` under one model switches it off."""
    m = models_of(fam)
    ia = write_importance(tmp_path / "a", m["base"], seed=5)
    doc = recipe(fam, p2={"mask": None}, top={"mask": str(tmp_path / "a")})
    out = merge(tmp_path, capsys, doc)
    got = load_folder(out)
    card = (out / "README.md").read_text()
    assert f"all models: mask {tmp_path / 'a'} (I > 0); models[1]: no mask" in card
    for name, b in m["base"].items():
        keep = ia[name] > 0
        want = b + 0.8 * (keep * (m["ft1"][name] - b) + 0.5 * (m["ft2"][name] - b))
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)


def test_dare_mask_after_l1_rescale(fam, tmp_path, capsys):
    """A top-level mask on dare_linear with "l1": masked entries stay at the base, the rest
    equal the unmasked merge bit for bit (the l1 factors ignore the mask)."""
    m = models_of(fam)
    ia = write_importance(tmp_path / "a", m["base"], seed=6)
    p = {"density": 0.6}
    plain_doc = recipe(fam, "dare_linear", p, p, top={"rescale": "l1"})
    plain = load_folder(merge(tmp_path, capsys, plain_doc, "plain"))
    doc = recipe(fam, "dare_linear", p, p,
                 top={"rescale": "l1",
                      "mask": {"importance": str(tmp_path / "a"), "threshold": -0.2}})
    out = merge(tmp_path, capsys, doc, "masked")
    got = load_folder(out)
    for name, b in m["base"].items():
        keep = ia[name] > -0.2
        assert torch.equal(got[name][~keep], b[~keep]), name
        assert torch.equal(got[name][keep], plain[name][keep]), name
    card = (out / "README.md").read_text()
    assert "splitmix64-v1" in card and "all models: mask" in card


def test_no_mask_is_unchanged_and_grid_memo_keeps_masks_apart(fam, tmp_path):
    """merge_tensor with a memo shared by points that differ in the mask only: each equals
    its own fresh merge; a mask that keeps everything equals no mask at all."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 8, generator=g)
    xs = [base + 0.01 * torch.randn(6, 8, generator=g) for _ in range(2)]
    imp = torch.randn(6, 8, generator=g)
    label = os.path.realpath(str(tmp_path / "imp"))

    def task(rule, memo):
        mp = [{"weight": 1.0, "density": 1.0, "mask": rule}, {"weight": 0.5, "density": 1.0}]
        return TensorTask("w", (6, 8), torch.float32, torch.float32, None, base, list(xs), [0, 1],
                          mp, {"lambda": 1.0, "normalize": False, "rescale": False},
                          side={label: imp}, memo=memo)

    memo: dict = {}
    rules = [None, {"importance": str(tmp_path / "imp"), "threshold": 0.0},
             {"importance": str(tmp_path / "imp"), "threshold": 0.7},
             {"importance": str(tmp_path / "imp"), "threshold": -100.0}]
    shared = [TaskArithmetic().merge_tensor(task(r, memo)) for r in rules]
    fresh = [TaskArithmetic().merge_tensor(task(r, None)) for r in rules]
    for a, b in zip(shared, fresh):
        assert torch.equal(a, b)
    assert not torch.equal(shared[1], shared[2]) and not torch.equal(shared[0], shared[1])
    assert torch.equal(shared[3], shared[0])
    rep = task(rules[2], None)
    TaskArithmetic().merge_tensor(rep)
    assert rep.report == {"mask_kept": {"0": int((imp > 0.7).sum())}, "numel": 48}


def test_spans_and_blocks_do_not_change_the_result(tmp_path):
    """Several worker spans and small engine blocks give the same bytes as one pass, and
    protected entries stay at the base (TIES, int8 votes with ties at v_k)."""
    from mergekit_like.methods.ties import Ties

    g = torch.Generator().manual_seed(9)
    shape = (1040, 512)                           # 3 spans of PIECE-sized pieces
    base = torch.randn(shape, generator=g)
    xs = [base + 0.01 * torch.randn(shape, generator=g) for _ in range(2)]
    votes = torch.randint(0, 7, shape, generator=g).to(torch.int8)
    imp = torch.randn(shape, generator=g).to(torch.bfloat16)
    lv, li = os.path.realpath(str(tmp_path / "v")), os.path.realpath(str(tmp_path / "i"))
    mp = [{"weight": 1.0, "density": 0.5, "mask": {"importance": str(tmp_path / "i")},
           "protect": {"importance": str(tmp_path / "v"), "top": 0.3}},
          {"weight": 0.7, "density": 0.5,
           "protect": {"importance": str(tmp_path / "v"), "top": 0.3}}]

    def run(workers, block):
        task = TensorTask("w", shape, torch.float32, torch.float32, None, base, list(xs), [0, 1],
                          mp, {"lambda": 1.0, "normalize": True, "rescale": False,
                               "trim_scope": "tensor"}, side={lv: votes, li: imp},
                          workers=workers, block_elems=block)
        return Ties().merge_tensor(task), task.report

    one, rep = run(1, 1 << 22)
    many, rep_many = run(3, 1 << 17)
    assert torch.equal(one, many) and rep == rep_many
    v = votes.reshape(-1).float().sort(descending=True).values[int(0.3 * votes.numel()) - 1]
    prot = votes.float() >= v
    assert torch.equal(one[prot], base[prot])
    assert rep["mask_kept"]["1"] == int((~prot).sum())
    assert rep["mask_kept"]["0"] == int(((imp > 0) & ~prot).sum())


def test_grid_points_with_different_protect_are_their_standalone_merges(fam, tmp_path, capsys):
    m = models_of(fam)
    write_importance(tmp_path / "imp", m["base"], seed=8)
    doc = recipe(fam, "ties", {"density": 0.5}, {"density": 0.7},
                 top={"protect": {"importance": str(tmp_path / "imp"), "top": 0.1}})
    doc["grid"] = {"parameters.protect.top": [0.1, 0.5], "parameters.lambda": [0.7, 1.0]}
    path = tmp_path / "grid.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    root = tmp_path / "sweep"
    code, out, err = run_cli(["grid", path, root], capsys)
    assert code == 0, err
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(dirs) == 4
    for d in dirs:
        single = tmp_path / f"single-{d.name}"
        code, _, err = run_cli(["merge", d / "mergekit_config.yml", single, "-q"], capsys)
        assert code == 0, err
        digest = {k: v for k, v in folder_digest(single).items() if k.endswith(".safetensors")}
        assert digest == {k: v for k, v in folder_digest(d).items() if k in digest}, d.name
    rows = [json.loads(x) for f in root.glob("results*.jsonl") for x in f.read_text().splitlines()]
    assert len(rows) == 4 and all(r["status"] == "ok" and r["pass"] == 1 for r in rows)


# ---- bad input ------------------------------------------------------------------------------



def test_folder_without_weights_and_nan_importance(fam, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path, capsys, recipe(fam, p1={"mask": {"importance": str(tmp_path / "empty")}}),
                 "models[0].parameters.mask.importance", "holds no model.safetensors")
    m = models_of(fam)
    imp = write_importance(tmp_path / "imp", m["base"], seed=1)
    name = "model.layers.1.mlp.down_proj.weight"
    imp[name][0, 0] = float("nan")
    save_file(imp, str(tmp_path / "imp" / "model.safetensors"))
    expect_error(tmp_path, capsys, recipe(fam, p1={"mask": str(tmp_path / "imp")}),
                 str(tmp_path / "imp"), f"'{name}'", "NaN")


def test_missing_folder(fam, tmp_path, capsys):
    gone = str(tmp_path / "nowhere")
    expect_error(tmp_path, capsys, recipe(fam, p2={"mask": gone}),
                 "models[1].parameters.mask", "no such folder", gone)
    expect_error(tmp_path, capsys,
                 recipe(fam, "ties", top={"protect": {"importance": gone, "top": 0.1}}),
                 "parameters.protect.importance", "no such folder", gone)


def test_tensor_missing_from_folder(fam, tmp_path, capsys):
    m = models_of(fam)
    name = "model.layers.1.mlp.up_proj.weight"
    write_importance(tmp_path / "imp", m["base"], seed=1, drop=name)
    expect_error(tmp_path, capsys, recipe(fam, p1={"mask": str(tmp_path / "imp")}),
                 "models[0].parameters.mask", str(tmp_path / "imp"), f"no tensor '{name}'")


def test_shape_mismatch(fam, tmp_path, capsys):
    m = models_of(fam)
    name = "model.layers.0.self_attn.q_proj.weight"
    write_importance(tmp_path / "imp", m["base"], seed=1, reshape=name)
    shape = list(m["base"][name].shape)
    expect_error(tmp_path, capsys,
                 recipe(fam, "dare_ties", top={"protect": {"importance": str(tmp_path / "imp"),
                                                           "threshold": 1}}),
                 "parameters.protect", str(tmp_path / "imp"), f"'{name}'",
                 f"shape [{shape[0] * shape[1]}]", f"the model's is {shape}")


@pytest.mark.parametrize("key, value, needles", [
    ("mask", {"threshold": 0, "importanse": "IMP"}, ["models[0].parameters.mask.importanse",
                                                       "unknown key", "did you mean 'importance'"]),
    ("protect", "IMP", ["models[0].parameters.protect", "not a bare path"]),
    ("protect", {"importance": "IMP", "top": 0}, ["models[0].parameters.protect.top", "(0, 1]"]),
    ("protect", {"importance": "IMP", "top": 1.2}, ["models[0].parameters.protect.top", "(0, 1]"]),
])
def test_bad_values(fam, tmp_path, capsys, key, value, needles):
    m = models_of(fam)
    write_importance(tmp_path / "imp", m["base"], seed=1)
    imp = str(tmp_path / "imp")
    value = imp if value == "IMP" else {k: (imp if v == "IMP" else v) for k, v in value.items()}
    expect_error(tmp_path, capsys, recipe(fam, "ties", p1={key: value}), *needles)
