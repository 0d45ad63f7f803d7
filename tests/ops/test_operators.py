"""Merge operators: the worked examples of docs/methods/*.md and properties every operator keeps."""

from __future__ import annotations

import math

import pytest
import torch

from support.helpers import plan_params

from mergekit_like.errors import MergeError
from mergekit_like.kernels import tiling
from mergekit_like.methods.base import REQUIRED, TensorTask
from mergekit_like.ops.linear import linear_combination
from mergekit_like.ops.sign_consensus import sign_consensus
from mergekit_like.ops.slerp import slerp, slerp_coefficients
from mergekit_like.ops.task_vectors import combine_task_vectors
from mergekit_like.registry import get_method

F32 = torch.float32


def t32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F32)


def make_task(base, inputs, model_params, params=None, *, name="model.layers.0.mlp.up_proj.weight",
              indices=None, seed=0, block_elems=1 << 22, out_dtype=F32, workers=1) -> TensorTask:
    ref = base if base is not None else next(x for x in inputs if x is not None)
    return TensorTask(
        name=name, shape=tuple(ref.shape), out_dtype=out_dtype, compute_dtype=F32, load_dtype=None,
        base=base, inputs=list(inputs),
        input_indices=list(indices) if indices is not None else list(range(1, len(inputs) + 1)),
        model_params=[dict(mp) for mp in model_params], params=dict(params or {}), seed=seed,
        block_elems=block_elems, workers=workers)


def merge(method, base, inputs, model_params, params=None, **kw) -> torch.Tensor:
    m = get_method(method)
    full, per_model = plan_params(m, params, model_params)
    return m.merge(make_task(base, inputs, per_model, full, **kw))[kw.get("name", "model.layers.0.mlp.up_proj.weight")]


# ---------------------------------------------------------------------------------------------
# §8 worked examples

TIES_B = [1, -2, 0.5, 0, 3, -1]
TIES_X = [[1.5, -2.25, 0.5, 1, 1, -0.875], [0, -1.5, 0.75, -0.75, 2, -1], [1.25, -1.5, 0, 0, 4, -1]]
TIES_MP = [{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5},
           {"weight": 0.5, "density": 0.7}]


@pytest.mark.parametrize("params, densities, expected", [
    ({}, None, [0, -1.5, 0, 1, 1.5, -1]),
    ({"normalize": False}, None, [0, -1.75, 0.25, 1, 0, -1]),
    ({"lambda": 0.5}, None, [0.5, -1.75, 0.25, 0.5, 2.25, -1]),
    ({}, [1.0, 1.0, 1.0], [0, -1.5, 0.75, 1, 1.5, -0.875]),
])
def test_ties_golden(params, densities, expected):
    mps = [dict(mp) for mp in TIES_MP]
    if densities:
        for mp, d in zip(mps, densities):
            mp["density"] = d
    out = merge("ties", t32(TIES_B), [t32(x) for x in TIES_X], mps, params)
    assert torch.equal(out, t32(expected)), out


def test_ties_golden_trim_and_vote():
    """The trimmed δ̂ (k = 3, 3, 4) and the election S, Δ, D of the table."""
    from mergekit_like.kernels.kth_largest import kth_largest
    from mergekit_like.ops.trim import trim_count, trim_piece_
    b = t32(TIES_B)
    trimmed = []
    for x, mp, k_exp in zip(TIES_X, TIES_MP, (3, 3, 4)):
        d = t32(x) - b
        k = trim_count(mp["density"], 6)
        assert k == k_exp
        kth = kth_largest(lambda d=d: [(0, d.abs())], 6, k, d.abs())
        trimmed.append(trim_piece_(d.clone(), 0, kth.value))
    assert torch.equal(trimmed[0], t32([0.5, 0, 0, 1, -2, 0]))
    assert torch.equal(trimmed[1], t32([-1, 0, 0, -0.75, -1, 0]))
    assert torch.equal(trimmed[2], t32([0.25, 0.5, -0.5, 0, 1, 0]))
    w = [1.0, 1.0, 0.5]
    weighted = [t * c for t, c in zip(trimmed, w)]
    assert torch.equal(sum(weighted), t32([-0.375, 0.25, -0.25, 0.25, -2.5, 0]))
    delta = sign_consensus([t.clone() for t in weighted], w, normalize=False)
    assert torch.equal(delta, t32([-1, 0.25, -0.25, 1, -3, 0]))
    assert torch.equal(sign_consensus([t.clone() for t in weighted], w, normalize=True),
                       t32([-1, 0.5, -0.5, 1, -1.5, 0]))  # D = [1, .5, .5, 1, 2, 1]


TA_B = [1, -2, 0.5, 0]
TA_X = [[1.5, -2, 0, 1], [0.5, -1, 0.5, 2]]
TA_MP = [{"weight": 1.0}, {"weight": 0.5}]


@pytest.mark.parametrize("params, expected", [
    ({}, [1.25, -1.5, 0, 2]),
    ({"lambda": 0.5}, [1.125, -1.75, 0.25, 1]),
    ({"normalize": True}, [1.1666666, -1.6666666, 0.16666666, 1.3333334]),
])
def test_task_arithmetic_golden(params, expected):
    out = merge("task_arithmetic", t32(TA_B), [t32(x) for x in TA_X], TA_MP, params)
    assert torch.equal(out, t32(expected)), out


def test_linear_golden():
    out = merge("linear", None, [t32(x) for x in TA_X], TA_MP)
    assert torch.equal(out, t32([1.1666666, -1.6666666, 0.16666667, 1.3333334])), out
    assert torch.equal(merge("linear", None, [t32(x) for x in TA_X], TA_MP, {"normalize": False}),
                       t32([1.75, -2.5, 0.25, 2.0]))


@pytest.mark.parametrize("v0, v1, expected", [
    ([1, 0], [0, 1], [0.70710678, 0.70710678]),
    ([1, 2], [2, 4], [1.5, 3]),
    ([0, 0], [3, 4], [2.1213203, 2.8284271]),
])
def test_slerp_golden(v0, v1, expected):
    out = merge("slerp", t32(v0), [t32(v1)], [{}], {"t": 0.5})
    torch.testing.assert_close(out, t32(expected), rtol=2e-7, atol=0)
    torch.testing.assert_close(slerp(t32(v0), t32(v1), 0.5), t32(expected), rtol=2e-7, atol=0)


def test_slerp_coefficients_branches():
    assert slerp_coefficients(0.25, 1.0, 1.0, 0.9999) == (0.75, 0.25)   # colinear → lerp
    c0, c1 = slerp_coefficients(0.5, 1.0, 1.0, 0.0)
    assert math.isclose(c0, math.sqrt(0.5)) and math.isclose(c1, math.sqrt(0.5))
    # a zero-norm vector is not normalised: c = dot / (1·‖v1‖)
    assert slerp_coefficients(0.5, 0.0, 5.0, 0.0) == slerp_coefficients(0.5, 1.0, 1.0, 0.0)


# ---------------------------------------------------------------------------------------------
# properties

def _rand(shape, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def test_ties_density_one_single_model_is_task_arithmetic():
    b = _rand((40, 30), 0, 1.0)
    x = b + _rand((40, 30), 1)
    x[3] = b[3]                                             # some δ = 0 entries
    for normalize in (True, False):
        p = {"normalize": normalize, "lambda": 0.8}
        ties = merge("ties", b, [x], [{"weight": 0.7, "density": 1.0}], p)
        ta = merge("task_arithmetic", b, [x], [{"weight": 0.7}], p)
        assert torch.equal(ties, ta)


def test_linear_single_model_is_identity():
    x = _rand((17, 9), 2, 1.0)
    for w in (1.0, 2.0, 0.5):
        assert torch.equal(merge("linear", None, [x], [{"weight": w}]), x)
    assert torch.equal(merge("linear", None, [x], [{"weight": 1.0}], {"normalize": False}), x)


def test_slerp_endpoints_exact():
    v0, v1 = _rand((12, 7), 3, 1.0), _rand((12, 7), 4, 1.0)
    v0[0, 0] = -0.0
    assert torch.equal(merge("slerp", v0, [v1], [{}], {"t": 0.0}), v0)
    assert torch.equal(merge("slerp", v0, [v1], [{}], {"t": 1.0}), v1)
    mid = merge("slerp", v0, [v1], [{}], {"t": 0.3})
    assert not torch.equal(mid, v0) and not torch.equal(mid, v1)
    # colinear inputs take the lerp branch: endpoints exact too
    assert torch.equal(merge("slerp", v0, [2 * v0], [{}], {"t": 0.0}), v0)


TASK_METHODS = [
    ("task_arithmetic", {}, [{"weight": 0.6}, {"weight": 0.9}]),
    ("task_arithmetic", {"normalize": True, "lambda": 0.7}, [{"weight": 0.6}, {"weight": -0.2}]),
    ("ties", {}, [{"weight": 0.6, "density": 0.4}, {"weight": 0.9, "density": 0.7}]),
    ("ties", {"normalize": False, "rescale": True}, [{"weight": 1.0, "density": 0.3},
                                                     {"weight": -0.5, "density": 1.0}]),
    ("ties", {"rescale": "l1"}, [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}]),
    ("dare_ties", {}, [{"weight": 0.6, "density": 0.4}, {"weight": 0.9, "density": 0.7}]),
    ("dare_ties", {"rescale": "l1", "normalize": True}, [{"weight": 1.0, "density": 0.5},
                                                         {"weight": 0.5, "density": 0.2}]),
    ("dare_linear", {}, [{"weight": 0.6, "density": 0.4}, {"weight": 0.9, "density": 0.0}]),
    ("dare_linear", {"rescale": False, "lambda": 1.5}, [{"weight": 0.6, "density": 0.4},
                                                        {"weight": 0.9, "density": 0.9}]),
]


@pytest.mark.parametrize("method, params, mps", TASK_METHODS)
def test_identity_when_all_deltas_zero(method, params, mps):
    b = _rand((9, 13), 5, 1.0)
    out = merge(method, b, [b.clone(), b.clone()], mps, params)
    assert torch.equal(out.view(torch.int32), b.view(torch.int32))


def _blocked_cases():
    for method, params, mps in TASK_METHODS:
        yield method, params, mps, 2
    yield "linear", {}, [{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.25}], 3
    yield "linear", {"normalize": False}, [{"weight": 0.3}, {"weight": -0.5}], 2
    yield "slerp", {"t": 0.3}, [{}], 1


@pytest.mark.parametrize("shape", [(23, 11), (301,), (2, 3, 5)])
@pytest.mark.parametrize("method, params, mps, n_inputs", list(_blocked_cases()))
def test_blocked_equals_unblocked(method, params, mps, n_inputs, shape, monkeypatch):
    base = _rand(shape, 6, 1.0)
    xs = [base + _rand(shape, 7 + i) for i in range(n_inputs)]
    if method == "ties":                                    # heavy ties: trimming cuts through them
        xs[0] = base + torch.round(_rand(shape, 9) * 200) / 256
    if method == "linear":
        b_arg, inputs = None, xs
    else:
        b_arg, inputs = base, xs
    whole = merge(method, b_arg, inputs, mps, params)
    blocked = merge(method, b_arg, inputs, mps, params, block_elems=7)
    monkeypatch.setattr(tiling, "PIECE", 4)                 # pieces of one row inside blocks
    pieced = merge(method, b_arg, inputs, mps, params, block_elems=50)
    threaded = merge(method, b_arg, inputs, mps, params, block_elems=50, workers=3)
    assert torch.equal(whole.view(torch.int32), blocked.view(torch.int32))
    assert torch.equal(whole.view(torch.int32), pieced.view(torch.int32))
    assert torch.equal(whole.view(torch.int32), threaded.view(torch.int32))


@pytest.mark.parametrize("shape, workers", [((23, 11), 3), ((301,), 4), ((2, 3, 5), 3), ((5,), 9),
                                            ((), 2), ((0, 4), 2)])
def test_spans_cover_rows_in_order(shape, workers, monkeypatch):
    monkeypatch.setattr(tiling, "PIECE", 4)
    task = make_task(torch.zeros(shape), [torch.zeros(shape)], [{}], workers=workers)
    got = tiling.spans(task)
    numel, row = task.numel, tiling.row_elems(shape)
    assert got[0][0] == 0 and got[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(got, got[1:]))          # contiguous, in order
    assert all(s % row == 0 and e % row == 0 and e > s for s, e in got) or numel == 0
    rows = shape[0] if shape else 1
    assert len(got) == (1 if numel == 0 else min(workers, rows, math.ceil(numel / 4)))


def test_missing_input_is_left_out():
    b = _rand((6, 5), 10, 1.0)
    x1 = b + _rand((6, 5), 11)
    for method, params in [("task_arithmetic", {"normalize": True}), ("ties", {}),
                           ("dare_linear", {}), ("linear", {})]:
        mps = [{"weight": 0.5, "density": 0.5}, {"weight": 0.8, "density": 0.5}]
        if method == "task_arithmetic" or method == "linear":
            mps = [{"weight": 0.5}, {"weight": 0.8}]
        with_none = merge(method, b, [x1, None], mps, params, indices=[1, 2])
        alone = merge(method, b, [x1], mps[:1], params, indices=[1])
        assert torch.equal(with_none, alone), method


def test_zero_density_model_never_votes_but_counts_in_plain_denominator():
    b = t32([0.0, 0.0])
    x1, x2 = t32([1.0, -1.0]), t32([4.0, 4.0])
    ties = merge("ties", b, [x1, x2], [{"weight": 1.0, "density": 1.0},
                                       {"weight": 1.0, "density": 0.0}])
    assert torch.equal(ties, t32([1.0, -1.0]))
    ta_like = merge("dare_linear", b, [x1, x2], [{"weight": 1.0, "density": 1.0},
                                                 {"weight": 3.0, "density": 0.0}],
                    {"normalize": True})
    assert torch.equal(ta_like, t32([0.25, -0.25]))


def test_ties_rescale_true_divides_kept_entries_by_density():
    b = torch.zeros(10)
    x = t32([0.1, -0.9, 0.3, 0.8, -0.2, 0.05, 0.7, -0.6, 0.4, 0.0])
    out = merge("ties", b, [x], [{"weight": 1.0, "density": 0.3}], {"rescale": True,
                                                                    "normalize": False})
    expected = torch.zeros(10)
    keep = torch.tensor([1, 3, 6])                          # the 3 largest |δ|
    expected[keep] = x[keep] / 0.3
    assert torch.equal(out, expected)


def test_ties_trim_scope_model_refused():
    m = get_method("ties")
    assert m.check_tensor_params("w", [{"weight": 1.0}], {"trim_scope": "model"}) == \
        "trim_scope: model is not supported yet"
    assert m.check_tensor_params("w", [{"weight": 1.0}], {"trim_scope": "tensor"}) is None
    with pytest.raises(MergeError, match="trim_scope: model is not supported yet"):
        merge("ties", t32([0.0]), [t32([1.0])], [{"weight": 1.0}], {"trim_scope": "model"})


def test_linear_zero_weight_sum():
    m = get_method("linear")
    msg = m.check_tensor_params("model.norm.weight", [{"weight": 1.0}, {"weight": -1.0}],
                                {"normalize": True})
    assert msg and "model.norm.weight" in msg
    assert m.check_tensor_params("model.norm.weight", [{"weight": 1.0}, {"weight": -1.0}],
                                 {"normalize": False}) is None
    with pytest.raises(MergeError, match="model.norm.weight"):
        merge("linear", None, [t32([1.0]), t32([2.0])], [{"weight": 1.0}, {"weight": -1.0}],
              name="model.norm.weight")
    with pytest.raises(ZeroDivisionError):
        linear_combination([t32([1.0])], [0.0], normalize=True)


def test_slerp_single_present_input_returned():
    v0 = _rand((4, 3), 13, 1.0)
    assert torch.equal(merge("slerp", v0, [None], [{}], {"t": 0.5}), v0)


def test_out_dtype_cast_once():
    b = _rand((5, 4), 14, 1.0)
    x = b + _rand((5, 4), 15)
    f32 = merge("task_arithmetic", b, [x], [{"weight": 0.5}])
    bf = merge("task_arithmetic", b, [x], [{"weight": 0.5}], out_dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, f32.to(torch.bfloat16))


def test_combine_plain_denominator_guard():
    base = t32([1.0, 2.0])
    out = combine_task_vectors(base, [t32([1.0, 1.0]), t32([1.0, -1.0])], [1.0, -1.0],
                               consensus=False, normalize=True, lam=1.0)
    assert torch.equal(out, t32([3.0, 2.0]))                # |D| < 1e-8 → D = 1


def test_method_specs():
    def defaults(name):
        return {p.name: (p.default, p.per_model, p.effective) for p in get_method(name).spec.params}
    ties = defaults("ties")
    assert ties["normalize"][0] is True and ties["density"] == (1.0, True, True)
    assert ties["trim_scope"][0] == "tensor" and ties["int8_mask"][2] is False
    assert ties["weight"][0] is REQUIRED and ties["rescale"][0] is False
    assert defaults("dare_ties")["normalize"][0] is False and defaults("dare_ties")["rescale"][0] is True
    assert defaults("dare_linear")["rescale"][0] is True
    ta = defaults("task_arithmetic")
    assert ta["density"][2] is False and ta["normalize"][0] is False and ta["lambda"][0] == 1.0
    lin = get_method("linear").spec
    assert not lin.needs_base and lin.base_joins_inputs and lin.param("normalize").default is True
    sl = get_method("slerp").spec
    assert sl.exact_inputs == 2 and sl.param("t").default is REQUIRED and not sl.param("t").per_model


@pytest.mark.parametrize("shape", [(), (0,), (0, 4)])
def test_scalar_and_empty_tensors(shape):
    b = torch.full(shape, 0.5)
    x1, x2 = torch.full(shape, 1.5), torch.full(shape, -0.25)
    for method, mps, params in [
        ("task_arithmetic", [{"weight": 1.0}, {"weight": 0.5}], {}),
        ("ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}], {}),
        ("dare_ties", [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}],
         {"rescale": "l1"}),
        ("dare_linear", [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}], {}),
    ]:
        out = merge(method, b, [x1, x2], mps, params)
        assert out.shape == b.shape and out.dtype == F32
    assert merge("linear", None, [x1, x2], [{"weight": 1.0}, {"weight": 1.0}]).shape == b.shape
    assert merge("slerp", b, [x1], [{}], {"t": 0.5}).shape == b.shape
    if shape == ():
        # one element, density 0.5 → k = max(1, 0) = 1 keeps it; signs +1 and −0.75 → +1 wins
        out = merge("ties", b, [x1, x2], [{"weight": 1.0, "density": 0.5},
                                          {"weight": 0.5, "density": 0.5}])
        assert float(out) == 1.5


def _naive_task_vectors(b, xs, ws, ds, *, trim, consensus, normalize, lam, rescale=False, name="",
                        seed=0):
    """Spec §2–§4 written out on whole tensors (sort-based trim, masks), as a reference."""
    from mergekit_like.ops.drop import keep_mask, mask_key
    weighted = []
    for i, (x, w, d) in enumerate(zip(xs, ws, ds)):
        delta = (x - b).reshape(-1)
        if d <= 0:
            delta = torch.zeros_like(delta)
        elif d < 1:
            if trim == "magnitude":
                k = max(1, int(d * delta.numel()))
                keep = torch.zeros(delta.numel(), dtype=torch.bool)
                keep[torch.sort(-delta.abs(), stable=True).indices[:k]] = True
            else:
                keep = keep_mask(mask_key(seed, i + 1, name), 0, delta.numel(), d)
            delta = torch.where(keep, delta, torch.zeros_like(delta))
            if rescale:
                delta = delta / d
        weighted.append(delta * w)
    W = torch.stack(weighted)
    wt = torch.tensor(ws, dtype=F32)[:, None]
    if consensus:
        s = torch.where(W.sum(0) >= 0, 1.0, -1.0)
        m = torch.sign(W) == s
        delta = (W * m).sum(0)
        D = (m * wt).sum(0)
        D[D == 0] = 1
    else:
        delta = W.sum(0)
        D = torch.full_like(delta, float(sum(ws)))
    if normalize:
        delta = delta / D
    return (b.reshape(-1) + lam * delta).view_as(b)


@pytest.mark.parametrize("method, trim, consensus", [
    ("ties", "magnitude", True), ("dare_ties", "random", True), ("dare_linear", "random", False)])
@pytest.mark.parametrize("normalize", [True, False])
def test_against_naive_reference(method, trim, consensus, normalize):
    b = _rand((64, 48), 20, 1.0)
    xs = [b + _rand((64, 48), 21 + i) for i in range(3)]
    xs[1] = b + torch.round(_rand((64, 48), 30) * 300) / 512          # ties in |δ|
    ws, ds = [1.0, 0.5, -0.3], [0.35, 0.6, 0.9]
    rescale = method != "ties"
    out = merge(method, b, xs, [{"weight": w, "density": d} for w, d in zip(ws, ds)],
                {"normalize": normalize, "lambda": 0.9, "rescale": rescale}, block_elems=500)
    ref = _naive_task_vectors(b, xs, ws, ds, trim=trim, consensus=consensus, normalize=normalize,
                              lam=0.9, rescale=rescale, name="model.layers.0.mlp.up_proj.weight")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # the support of the merged delta agrees exactly
    assert torch.equal(out == b, ref == b)


@pytest.mark.parametrize("method, params, mps, n_inputs", list(_blocked_cases()))
def test_float64_compute_and_bf16_storage(method, params, mps, n_inputs):
    """compute_dtype float64 runs every operator; bf16-stored inputs load through task.load."""
    base = _rand((19, 8), 40, 1.0)
    xs = [base + _rand((19, 8), 41 + i) for i in range(n_inputs)]
    b_arg = None if method == "linear" else base
    ref = merge(method, b_arg, xs, mps, params)
    m = get_method(method)
    task = make_task(None if b_arg is None else b_arg.double(), [x.double() for x in xs],
                     [dict(mp) for mp in mps], {**{p.name: p.default for p in m.spec.params
                                                  if not p.per_model and p.default is not REQUIRED},
                                               **params})
    task.compute_dtype = torch.float64
    out = m.merge(task)[task.name]
    assert out.dtype == F32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # bf16 storage, recipe dtype bfloat16: same as rounding the inputs first
    task = make_task(None if b_arg is None else b_arg.bfloat16(), [x.bfloat16() for x in xs],
                     [dict(mp) for mp in mps], task.params)
    task.load_dtype = torch.bfloat16
    got = m.merge(task)[task.name]
    want = merge(method, None if b_arg is None else b_arg.bfloat16().float(),
                 [x.bfloat16().float() for x in xs], mps, params)
    assert torch.equal(got, want)
