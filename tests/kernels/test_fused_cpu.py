"""The fused CPU loops (kernels/fused_cpu.py) give the torch path's bits.

Each case runs the same TensorTask twice, with MERGEKIT_LIKE_FUSED=0 (the torch functions that
define the math) and =1, and compares outputs bit for bit (float bits, so −0.0 ≠ +0.0), after
checking that the fused loops really ran. Inputs are built to hit every branch: bf16 deltas
with many exact ties at the threshold (partial ties), exact zeros, sizes that are not multiples
of the loops' chunk, several spans, negative and zero weights, both rescales, both output
dtypes, a float32 base under bf16 models, DARE's counter-based drops, and the grid memo's kept Δ.
"""

from __future__ import annotations

import pytest
import torch

from kernel_family import BF16, F32, bits, family
from support.helpers import plan_params

from mergekit_like.kernels import fused_cpu
from mergekit_like.kernels import kth_largest as K
from mergekit_like.kernels.tiling import Scratch
from mergekit_like.methods import ties as T
from mergekit_like.methods.base import TensorTask
from mergekit_like.ops import drop
from mergekit_like.ops.trim import next_float, trim_count
from mergekit_like.registry import get_method

def make_task(method, base, xs, model_params, params, *, out_dtype=BF16, workers=1, memo=None,
              finite=True):
    m = get_method(method)
    full, per_model = plan_params(m, params, model_params)
    return m, TensorTask(
        name="model.layers.0.mlp.up_proj.weight", shape=tuple(base.shape), out_dtype=out_dtype,
        compute_dtype=F32, load_dtype=None, base=base, inputs=list(xs),
        input_indices=list(range(len(xs))), model_params=per_model, params=full,
        workers=workers, memo=memo, inputs_finite=finite)


class Spy:
    def __init__(self, monkeypatch):
        self.calls = {"merge_span": 0, "scan_abs_delta": 0}
        for name in self.calls:
            real = getattr(fused_cpu, name)

            def counted(*a, _real=real, _name=name, **kw):
                self.calls[_name] += 1
                return _real(*a, **kw)
            monkeypatch.setattr(fused_cpu, name, counted)


def both_paths(monkeypatch, method, base, xs, model_params, params, **kw):
    """(torch output, fused output, spy call counts, [torch memo, fused memo])."""
    outs, memos = [], []
    spy = Spy(monkeypatch)
    for flag in ("0", "1"):
        monkeypatch.setenv("MERGEKIT_LIKE_FUSED", flag)
        memo = {} if kw.get("memo") is not None else None
        m, task = make_task(method, base, xs, model_params, params, **{**kw, "memo": memo})
        outs.append(m.merge_tensor(task))
        memos.append(memo)
        if flag == "0":
            assert spy.calls == {"merge_span": 0, "scan_abs_delta": 0}
    return outs[0], outs[1], spy.calls, memos


CASES = [
    # method, n models, densities, weights, params
    ("ties", 3, [0.5, 0.5, 0.3], [1.0, 1.0, 1.0], {}),
    ("ties", 3, [0.2, 0.9, 0.5], [0.7, -0.4, 1.3], {"normalize": False, "lambda": 0.6}),
    ("ties", 2, [0.5, 1.0], [1.0, 0.0], {"lambda": 1.7}),                # one model untrimmed
    ("ties", 1, [0.37], [1.0], {}),
    ("ties", 2, [0.5, 0.6], [-1.0, -0.5], {}),                        # −0.0 terms everywhere
    ("ties", 4, [0.1, 0.3, 0.6, 0.999], [1.0, 2.0, 0.5, 1.0], {"rescale": "l1"}),
    ("ties", 3, [0.5, 0.25, 0.8], [1.0, 1.0, 1.0], {"rescale": True}),
    ("dare_ties", 3, [0.5, 0.5, 0.3], [1.0, 1.0, 1.0], {}),
    ("dare_ties", 3, [0.1, 1.0, 0.9], [0.5, 1.0, -0.7], {"rescale": "l1", "normalize": True}),
    ("dare_linear", 2, [0.3, 1e-9], [1.0, 2.0], {"lambda": 0.8}),      # 1e-9: drops everything
    ("dare_linear", 2, [0.6, 0.4], [1.0, 1.0], {"rescale": False}),
    ("task_arithmetic", 3, [1.0] * 3, [0.5, -1.0, 1.5], {}),
    ("task_arithmetic", 2, [1.0] * 2, [0.3, 0.3], {"normalize": True, "lambda": 0.9}),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("out_dtype", [BF16, F32])
def test_fused_merge_equals_torch_path_bit_for_bit(monkeypatch, case, out_dtype):
    method, n, dens, weights, params = CASES[case]
    base, xs = family((601, 1399), n, seed=case)      # 840 799: 3 spans, not a chunk multiple
    mps = [{"weight": w, "density": d} for w, d in zip(weights, dens)]
    ref, got, calls, _ = both_paths(monkeypatch, method, base, xs, mps, params,
                                    out_dtype=out_dtype, workers=3)
    assert calls["merge_span"] == 3                               # one call per span
    if method == "ties":
        assert calls["scan_abs_delta"] >= 3 * sum(d < 1 for d in dens)
    assert got.dtype == ref.dtype == out_dtype
    assert torch.equal(bits(got), bits(ref))
    assert not torch.equal(got.float(), base.float())            # the merge did something


def test_fused_merge_f32_base_under_bf16_models_and_grid_memo(monkeypatch):
    base, xs = family((700, 800), 3, seed=11, base_dtype=F32)
    mps = [{"weight": 1.0, "density": d} for d in (0.4, 0.6, 0.5)]
    ref, got, calls, memos = both_paths(monkeypatch, "ties", base, xs, mps, {}, workers=2,
                                        memo={})
    assert calls["merge_span"] == 2
    assert torch.equal(bits(got), bits(ref))
    kept = [[v for k, v in memo.items() if isinstance(k, tuple) and k[0] == "delta"]
            for memo in memos]
    assert len(kept[0]) == len(kept[1]) == 1
    assert torch.equal(bits(kept[0][0]), bits(kept[1][0]))      # Δ before λ, for λ-only points


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("density", [0.001, 0.3, 0.5, 0.77, 0.999])
@pytest.mark.parametrize("zeros", [0.0, 0.6])
def test_fused_scan_finds_the_same_threshold(monkeypatch, dtype, density, zeros):
    """MagnitudeTrim's v_k, counts and partial-tie cutoff from the fused scan equal the torch
    scan's, over three spans of a tensor of 800 003 entries (spans and pieces cut mid-way)."""
    base, (x,) = family((800_003,), 1, seed=int(density * 1e3), dtype=dtype, zeros=zeros)
    found = []
    spy = Spy(monkeypatch)
    for flag in ("0", "1"):
        monkeypatch.setenv("MERGEKIT_LIKE_FUSED", flag)
        _, task = make_task("ties", base, [x], [{"weight": 1.0, "density": density}], {},
                            workers=3)
        trim = T.MagnitudeTrim(task, 0, density, Scratch(F32, task.device))
        found.append((trim.kth.value, trim.kth.above, trim.kth.equal, trim.cutoff))
    assert spy.calls["scan_abs_delta"] >= 3
    assert found[0] == found[1]
    d = (x.float() - base.float()).abs()
    assert found[1][0] == float(torch.topk(d, trim_count(density, d.numel())).values[-1])


def test_fused_scan_counts_open_and_closed_ends():
    """scan_abs_delta returns what kth_largest.scan_pass returns over the same span, for brackets
    with open ends (counted atoms), closed ends, no collection and a lower end below zero."""
    base, (x,) = family((70_001,), 1, seed=3)
    a = (x.float() - base.float()).abs()
    vals = torch.unique(a)
    mid, nxt = float(vals[len(vals) // 2]), float(vals[len(vals) // 2 + 3])
    span = (1_000, 69_000)

    def torch_scan(*args):
        def pieces():
            for s in range(span[0], span[1], 4099):
                yield s, a[s:min(s + 4099, span[1])].clone()
        return K.scan_pass(pieces, None, *args)

    for args in [(mid, nxt, mid, nxt, False, False, True),
                 (mid, nxt, next_float(mid, 1.0, F32), next_float(nxt, 0.0, F32), True, True, True),
                 (-float("inf"), mid, -float("inf"), mid, False, False, True),
                 (mid, float("inf"), mid, float("inf"), False, False, True),
                 (mid, nxt, mid, nxt, True, True, False),
                 (0.0, 0.0, 0.0, 0.0, True, False, True)]:
        got = fused_cpu.scan_abs_delta(x, base, span, *args)
        ref = torch_scan(*args)
        assert got[:3] == ref[:3], args
        for g, r in ((got[3], ref[3]), (got[4], ref[4])):
            g = torch.cat(g) if g else torch.empty(0)
            r = torch.cat(r) if r else torch.empty(0)
            assert torch.equal(g.to(r.dtype), r), args
        for g, r in ((got[5], ref[5]), (got[6], ref[6])):
            assert sum(c for *_, c in g) == sum(c for *_, c in r), args


def test_torch_path_when_fused_loops_do_not_apply(monkeypatch):
    base, xs = family((40, 129), 2, seed=5)
    mps = [{"weight": 1.0, "density": 0.5}] * 2
    spy = Spy(monkeypatch)
    monkeypatch.setenv("MERGEKIT_LIKE_FUSED", "1")
    m, task = make_task("ties", base, xs, mps, {}, finite=False)          # --allow-nonfinite
    m.merge_tensor(task)
    assert spy.calls["merge_span"] == 0 and spy.calls["scan_abs_delta"] > 0
    half = [x.to(torch.float16) for x in xs]                              # no fused float16
    m, task = make_task("ties", base.to(torch.float16), half, mps, {})
    m.merge_tensor(task)
    assert spy.calls["merge_span"] == 0
    m, task = make_task("ties", base, [xs[0], xs[1].float()], mps, {})    # models' dtypes differ
    m.merge_tensor(task)
    assert spy.calls["merge_span"] == 0
    m, task = make_task("ties", base, xs, mps, {})
    task.load_dtype = BF16                                                # stored bf16: no-op
    m.merge_tensor(task)
    assert spy.calls["merge_span"] == 1
    m, task = make_task("ties", base.float(), [x.float() for x in xs], mps, {})
    task.load_dtype = BF16                                                # a real rounding step
    m.merge_tensor(task)
    assert spy.calls["merge_span"] == 1


def test_fused_drop_at_the_exact_threshold(monkeypatch):
    """An entry whose 24-bit draw equals floor(d·2^24) is dropped (keep ⇔ u < threshold)."""
    base, (x,) = family((1000,), 1, seed=8, zeros=0.0)
    key = drop.mask_key(0, 0, "model.layers.0.mlp.up_proj.weight")
    u = (int(drop.splitmix64(key, 0, 1)[0]) & ((1 << 64) - 1)) >> 40   # entry 0's draw
    density = (u + 0.5) / (1 << 24)
    assert drop.keep_threshold(density) == u
    mps = [{"weight": 1.0, "density": density}]
    ref, got, calls, _ = both_paths(monkeypatch, "dare_linear", base, [x], mps, {"rescale": False})
    assert calls["merge_span"] == 1
    assert got[0] == base[0] != x[0]                                       # entry 0 dropped
    assert torch.equal(bits(got), bits(ref))
