"""arcee_fusion (docs/methods/arcee_fusion.md): a = the base, b = the other model,
imp = |b − a|·KL(softmax(b) + 1e-8 ‖ softmax(a) + 1e-8) per last-dim row, τ = Q2 + 1.5·(Q3 − Q1)
with lower quantiles, out = a + (b − a)·[imp ≥ τ]. The expected tensors are computed here with
torch.nn.functional.softmax and torch.quantile(interpolation="lower") on whole tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.helpers import (SMALL_SHAPE, expect_merge_error, load_folder, run_cli, small_family,
                             write_recipe)

from mergekit_like.methods.base import TensorTask
from mergekit_like.registry import get_method

SHAPE = SMALL_SHAPE


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return small_family(tmp_path_factory.mktemp("fam"))


def recipe(fam, *, models=("ft1",), base="base", params: str = "") -> str:
    text = "merge_method: arcee_fusion\n"
    if base:
        text += f"base_model: {fam / base}\n"
    text += "models:\n" + "".join(f"  - model: {fam / m}\n" for m in models)
    return text + params + "dtype: float32\n"


def ref_fusion(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float32, whole tensor, as docs/methods/arcee_fusion.md §1 writes it."""
    p = F.softmax(b, dim=-1) + 1e-8
    q = F.softmax(a, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1)
    imp = (b - a).abs() * kl.unsqueeze(-1)
    flat = imp.reshape(-1)
    q1, q2, q3 = (torch.quantile(flat, q, interpolation="lower") for q in (0.25, 0.5, 0.75))
    tau = q2 + 1.5 * (q3 - q1)
    return a + (b - a) * (imp >= tau).float()


def test_golden_against_reference(fam, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(["merge", write_recipe(tmp_path / "r.yml", recipe(fam)), out_dir,
                            "-q"], capsys)
    assert code == 0, err
    out = load_folder(out_dir)
    base, ft1 = load_folder(fam / "base"), load_folder(fam / "ft1")
    changed = 0
    for k in base:
        assert torch.equal(out[k], ref_fusion(base[k], ft1[k])), k
        assert (out[k] != base[k]).float().mean().item() < 0.5, k   # outliers only
        changed += int((out[k] != base[k]).sum())
    assert changed > 0


def task(a, b, block_elems=1 << 22, out_dtype=torch.float32):
    return TensorTask(name="w", shape=tuple(a.shape), out_dtype=out_dtype,
                      compute_dtype=torch.float32, load_dtype=None, base=a, inputs=[b],
                      input_indices=[1], model_params=[{}], params={}, block_elems=block_elems)


@pytest.mark.parametrize("shape", [(41, 6), (5, 4, 3), (50,)])
def test_blocked_equals_whole(shape):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(*shape, generator=gen)
    b = a + 0.05 * torch.randn(*shape, generator=gen)
    m = get_method("arcee_fusion")
    whole = m.merge(task(a, b))["w"]
    assert torch.equal(whole, ref_fusion(a, b))
    assert torch.equal(m.merge(task(a, b, block_elems=7))["w"], whole)
    assert torch.equal(m.merge(task(a, b, out_dtype=torch.bfloat16))["w"], whole.bfloat16())


def test_identities():
    m = get_method("arcee_fusion")
    a = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m.merge(task(a, a.clone()))["w"], a)               # equal models
    only_base = task(a, a)
    only_base.inputs = [None]
    assert torch.equal(m.merge(only_base)["w"], a)                         # only the base has it
    empty = torch.zeros(0, 4)
    assert m.merge(task(empty, empty))["w"].shape == (0, 4)


@pytest.mark.parametrize("kw, needles", [
    ({"models": ("ft1", "ft2")}, ("arcee_fusion takes exactly 2 models (base included), got 3",)),
    ({"models": ("ft1",), "base": None}, ("'arcee_fusion' needs base_model",)),
    ({"params": "parameters:\n  t: 0.5\n"}, ("unknown parameter for method 'arcee_fusion'",)),
])
def test_bad_recipes(fam, tmp_path, capsys, kw, needles):
    expect_merge_error(tmp_path, capsys, recipe(fam, **kw), *needles)
