"""nearswap (docs/methods/nearswap.md): a = the base, b = the other model,
w = clamp(t / max(|a − b|, 1e-6), 0, 1), out = w·b + (1 − w)·a. Expected tensors are computed
here with numpy float64 from that equation, or are the inputs themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.helpers import (SMALL_SHAPE, expect_merge_error, load_folder, run_cli, small_family,
                             write_recipe)

from mergekit_like.methods.base import TensorTask
from mergekit_like.registry import get_method

SHAPE = SMALL_SHAPE


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return small_family(tmp_path_factory.mktemp("fam"))


def recipe(fam, t, *, models=("ft1",), base="base", dtype="float32") -> str:
    text = "merge_method: nearswap\n"
    if base:
        text += f"base_model: {fam / base}\n"
    text += "models:\n" + "".join(f"  - model: {fam / m}\n" for m in models)
    if t is not None:
        text += f"parameters:\n  t: {t}\n"
    return text + f"dtype: {dtype}\n"


def merged(tmp_path, capsys, text) -> dict[str, torch.Tensor]:
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", write_recipe(tmp_path / "r.yml", text), out, "-q"], capsys)
    assert code == 0, err
    return load_folder(out)


def ref(a: torch.Tensor, b: torch.Tensor, t: float) -> np.ndarray:
    a64, b64 = a.double().numpy(), b.double().numpy()
    w = np.clip(t / np.maximum(np.abs(a64 - b64), 1e-6), 0.0, 1.0)
    return w * b64 + (1.0 - w) * a64


def test_golden_against_numpy(fam, tmp_path, capsys):
    out = merged(tmp_path, capsys, recipe(fam, 0.003))
    base, ft1 = load_folder(fam / "base"), load_folder(fam / "ft1")
    moved = 0
    for k in base:
        np.testing.assert_allclose(out[k].numpy(), ref(base[k], ft1[k], 0.003), rtol=1e-6,
                                   atol=1e-7, err_msg=k)
        moved += int((out[k] != base[k]).sum())
    assert moved > 0


def test_t_follows_a_gradient(fam, tmp_path, capsys):
    """t: [0, 1] over two layers: layer 0 (t = 0) is the base, layer 1 (t = 1 ≫ |δ|) is ft1."""
    out = merged(tmp_path, capsys, recipe(fam, "[0.0, 1.0]"))
    base, ft1 = load_folder(fam / "base"), load_folder(fam / "ft1")
    for k in base:
        if ".layers.0." in k:
            assert torch.equal(out[k], base[k]), k
        elif ".layers.1." in k:
            assert torch.equal(out[k], ft1[k]), k


@pytest.mark.parametrize("t, want", [(0.0, "base"), (-0.5, "base"), (100.0, "ft1")])
def test_identities(fam, tmp_path, capsys, t, want):
    out = merged(tmp_path, capsys, recipe(fam, t))
    expect = load_folder(fam / want)
    assert all(torch.equal(out[k], expect[k]) for k in expect)


def test_only_the_base_has_it_and_blocks():
    m = get_method("nearswap")
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(29, 3, generator=gen)
    b = a + 0.01 * torch.randn(29, 3, generator=gen)

    def task(inputs, block_elems=1 << 22):
        return TensorTask(name="w", shape=(29, 3), out_dtype=torch.float32,
                          compute_dtype=torch.float32, load_dtype=None, base=a, inputs=inputs,
                          input_indices=[1], model_params=[{}], params={"t": 0.004},
                          block_elems=block_elems)
    assert torch.equal(m.merge(task([None]))["w"], a)
    whole, blocked = m.merge(task([b]))["w"], m.merge(task([b], 5))["w"]
    assert torch.equal(whole, blocked)
    np.testing.assert_allclose(whole.numpy(), ref(a, b, 0.004), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw, needles", [
    ({"t": None}, ("'nearswap' requires 't'",)),
    ({"t": "near"}, ("parameters.t", "expected a number")),
    ({"t": ".inf"}, ("not a finite number",)),
    ({"t": 0.1, "models": ("ft1", "ft2")}, ("nearswap takes exactly 2 models (base included), "
                                            "got 3",)),
    ({"t": 0.1, "models": ("ft1", "ft2"), "base": None}, ("'nearswap' needs base_model",)),
])
def test_bad_recipes(fam, tmp_path, capsys, kw, needles):
    kw = dict(kw)
    expect_merge_error(tmp_path, capsys, recipe(fam, kw.pop("t"), **kw), *needles)
