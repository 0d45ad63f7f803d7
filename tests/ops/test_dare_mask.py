"""DARE: the counter-based SplitMix64 mask (docs/methods/dare.md §2 goldens) and the drop's
properties (dare.md §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergekit_like.methods.base import TensorTask
from mergekit_like.ops import drop as D
from mergekit_like.registry import get_method

F32 = torch.float32
NAME = "model.layers.0.mlp.up_proj.weight"
M64 = (1 << 64) - 1


def u64(t: torch.Tensor) -> list[int]:
    return [int(v) & M64 for v in t]


def bits(mask: torch.Tensor) -> str:
    return "".join("1" if bool(b) else "0" for b in mask)


def numpy_reference(key: int, start: int, n: int) -> np.ndarray:
    """SplitMix64 in numpy uint64, straight from the spec (full outputs)."""
    with np.errstate(over="ignore"):
        j = np.arange(start + 1, start + 1 + n, dtype=np.uint64)
        z = np.uint64(key) + j * np.uint64(D.GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(D.MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(D.MIX2)
        return z ^ (z >> np.uint64(31))


# ---------------------------------------------------------------------------------------------
# §4 golden values

def test_splitmix64_check_values():
    assert u64(D.splitmix64(0, 0, 2)) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


def test_key_and_u():
    key = D.mask_key(0, 1, NAME)
    assert key == 0xB81314DBD78A88D8
    assert [v >> 40 for v in u64(D.splitmix64(key, 0, 8))] == \
        [5474049, 3809574, 5133781, 6043529, 14487315, 6336603, 16693616, 5869828]


def test_keep_bits_and_counts():
    key = D.mask_key(0, 1, NAME)
    assert D.keep_threshold(0.5) == 8388608 and D.keep_threshold(0.3) == 5033164
    assert bits(D.keep_mask(key, 0, 16, 0.5)) == "1111010100010110"
    assert bits(D.keep_mask(key, 0, 16, 0.3)) == "0100000000000110"
    assert int(D.keep_mask(key, 0, 1_000_000, 0.5).sum()) == 500983
    assert int(D.keep_mask(key, 0, 1_000_000, 0.3).sum()) == 300432


def test_model_index_two():
    key = D.mask_key(0, 2, NAME)
    assert key == 0x74D2C9A7A8AF469F
    assert bits(D.keep_mask(key, 0, 16, 0.5)) == "1111001001111001"


@pytest.mark.parametrize("start", [0, 12345, (1 << 40) + 3, (1 << 63) - 5000])
def test_matches_numpy_reference(start):
    key = D.mask_key(7, 3, "x")
    n = 3000
    ref = numpy_reference(key, start, n)
    assert u64(D.splitmix64(key, start, n)) == [int(v) for v in ref]
    for d in (0.1, 0.5, 0.77, 0.999999):
        expected = (ref >> np.uint64(40)) < np.uint64(D.keep_threshold(d))
        got = D.keep_mask(key, start, n, d).numpy()
        assert np.array_equal(got, expected)
        assert np.array_equal(D.keep_mask(key, start, n, d, dtype=F32).numpy(), expected.astype(np.float32))


def test_chunking_is_invisible(monkeypatch):
    key = D.mask_key(1, 0, "y")
    whole = D.keep_mask(key, 0, 5000, 0.4)
    monkeypatch.setattr(D, "MASK_CHUNK", 64)
    monkeypatch.setattr(D, "_STEPS", {})
    assert torch.equal(D.keep_mask(key, 0, 5000, 0.4), whole)
    assert torch.equal(D.keep_mask(key, 1234, 700, 0.4), whole[1234:1934])


# ---------------------------------------------------------------------------------------------
# §8 properties


def task(base, inputs, mps, params, *, name=NAME, indices=None, seed=0, block_elems=1 << 22):
    return TensorTask(name=name, shape=tuple(base.shape), out_dtype=F32, compute_dtype=F32,
                      load_dtype=None, base=base, inputs=list(inputs),
                      input_indices=list(indices or range(1, len(inputs) + 1)),
                      model_params=mps, params=params, seed=seed, block_elems=block_elems)


DEFAULTS = {"normalize": False, "lambda": 1.0, "rescale": True, "int8_mask": False}


def run(method, base, inputs, mps, params=None, **kw):
    return get_method(method).merge_tensor(task(base, inputs, mps, {**DEFAULTS, **(params or {})}, **kw))


def _rand(shape, seed, scale=0.01):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_p1_kept_entries_are_delta_over_d():
    delta = _rand((300, 40), 1)
    d = 0.3
    out = run("dare_linear", torch.zeros_like(delta), [delta], [{"weight": 1.0, "density": d}])
    keep = D.keep_mask(D.mask_key(0, 1, NAME), 0, delta.numel(), d).view_as(delta)
    assert torch.equal(out[keep], delta[keep] / d)
    assert torch.count_nonzero(out[~keep]) == 0
    assert torch.equal(D.random_drop_(delta.clone().view(-1), 0, D.mask_key(0, 1, NAME), d),
                       torch.where(keep, delta, torch.zeros_like(delta)).view(-1))


def test_p2_mask_through_the_adapter_uses_model_index_and_name():
    ones = torch.ones(16)
    out = run("dare_linear", torch.zeros(16), [ones, ones], [{"weight": 1.0, "density": 0.5}] * 2,
              indices=[1, 2], params={"rescale": False})
    both = (D.keep_mask(D.mask_key(0, 1, NAME), 0, 16, 0.5).to(F32)
            + D.keep_mask(D.mask_key(0, 2, NAME), 0, 16, 0.5).to(F32))
    assert torch.equal(out, both)
    assert bits(D.keep_mask(D.mask_key(0, 1, NAME), 0, 16, 0.5)) == "1111010100010110"


def test_p3_kept_fraction():
    n, d = 1_000_000, 0.3
    frac = float(D.keep_mask(D.mask_key(5, 0, "w"), 0, n, d).sum()) / n
    assert abs(frac - d) <= 5 * math.sqrt(d * (1 - d) / n)


def test_p4_masks_uncorrelated():
    n = 100_000
    m = D.keep_mask(D.mask_key(0, 1, NAME), 0, n, 0.5)
    other_name = D.keep_mask(D.mask_key(0, 1, NAME.replace("up", "down")), 0, n, 0.5)
    other_model = D.keep_mask(D.mask_key(0, 2, NAME), 0, n, 0.5)
    other_seed = D.keep_mask(D.mask_key(1, 1, NAME), 0, n, 0.5)
    for o in (other_name, other_model, other_seed):
        assert abs(float((m == o).float().mean()) - 0.5) <= 0.01


def test_p5_order_and_blocking_independent():
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    bases = [_rand((30, 20), 10, 1.0), _rand((25, 20), 11, 1.0)]
    xs = [b + _rand(b.shape, 12 + i) for i, b in enumerate(bases)]
    mp = [{"weight": 0.7, "density": 0.4}]

    def one(i, **kw):
        return run("dare_ties", bases[i], [xs[i]], mp, name=names[i], **kw)

    forward = [one(0), one(1)]
    backward = [one(1), one(0)][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))
    assert torch.equal(one(0, block_elems=7), forward[0])
    key = D.mask_key(0, 1, names[0])
    assert torch.equal(D.keep_mask(key, 100, 50, 0.4), D.keep_mask(key, 0, 600, 0.4)[100:150])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_p5_cpu_equals_cuda():
    key = D.mask_key(0, 1, NAME)
    for start, n in [(0, 1_000_000), ((1 << 40) + 17, 3_000_001)]:
        cpu = D.keep_mask(key, start, n, 0.3)
        gpu = D.keep_mask(key, start, n, 0.3, device="cuda")
        assert torch.equal(cpu, gpu.cpu())
    base = _rand((64, 33), 20, 1.0)
    x = base + _rand((64, 33), 21)
    mp = [{"weight": 0.7, "density": 0.4}]
    cpu = run("dare_linear", base, [x], mp)
    t = task(base.cuda(), [x.cuda()], mp, DEFAULTS)
    t.device = torch.device("cuda")
    gpu = get_method("dare_linear").merge_tensor(t)
    assert torch.equal(cpu, gpu.cpu())


def test_p6_l1_rescale_preserves_l1_norm():
    delta = _rand((200, 50), 2)
    out = run("dare_linear", torch.zeros_like(delta), [delta], [{"weight": 1.0, "density": 0.3}],
              params={"rescale": "l1"})
    torch.testing.assert_close(out.abs().double().sum(), delta.abs().double().sum(), rtol=1e-5, atol=0)
    by_d = run("dare_linear", torch.zeros_like(delta), [delta], [{"weight": 1.0, "density": 0.3}])
    assert not torch.equal(out, by_d)                        # L1 matching is not exactly 1/d


def test_p7_average_over_seeds_approaches_task_arithmetic():
    base = _rand((40, 25), 3, 1.0)
    xs = [base + _rand((40, 25), 4), base + _rand((40, 25), 5)]
    mps = [{"weight": 0.6, "density": 0.5}, {"weight": 0.9, "density": 0.5}]
    ta = get_method("task_arithmetic").merge_tensor(task(base, xs, mps, DEFAULTS))
    runs = torch.stack([run("dare_linear", base, xs, mps, seed=s) for s in range(200)])
    err_mean = (runs.mean(0) - ta).abs().mean()
    err_one = (runs[0] - ta).abs().mean()
    assert err_mean < 0.12 * err_one                         # ~ 1/sqrt(200) of a single draw
    assert err_mean < 0.1 * (ta - base).abs().mean()


@pytest.mark.parametrize("normalize", [True, False])
def test_p8_dare_ties_density_one_is_ties(normalize):
    base = _rand((20, 30), 6, 1.0)
    xs = [base + _rand((20, 30), 7 + i) for i in range(3)]
    mps = [{"weight": w, "density": 1.0} for w in (1.0, 0.5, -0.3)]
    params = {"normalize": normalize}
    dt = run("dare_ties", base, xs, mps, params)
    ti = get_method("ties").merge_tensor(task(base, xs, mps, {**DEFAULTS, **params,
                                                              "rescale": False,
                                                              "trim_scope": "tensor"}))
    assert torch.equal(dt, ti)


def test_density_extremes():
    assert bool(D.keep_mask(3, 0, 100, 1.0).all()) and not bool(D.keep_mask(3, 0, 100, 0.0).any())
    assert bool(D.keep_mask(3, 0, 100, 1.0, dtype=F32).eq(1).all())
    delta = _rand((10, 10), 8)
    zero = torch.zeros_like(delta)
    assert torch.equal(run("dare_linear", zero, [delta], [{"weight": 1.0, "density": 1.0}]), delta)
    assert torch.equal(run("dare_linear", zero, [delta], [{"weight": 1.0, "density": 0.0}]), zero)
    assert torch.equal(D.random_drop_(delta.clone(), 0, 1, 0.0), zero)
