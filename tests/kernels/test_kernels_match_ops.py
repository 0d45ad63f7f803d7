"""The fast paths give the bits of the paper-shaped equations of ops/.

A task-vector merge through the adapter (fused CPU loops, then the torch steps on pieces with the
streaming k-th-largest search) equals, float bit for float bit (−0.0 ≠ +0.0), the same merge
written with the whole-tensor functions of ops/: ``trim.magnitude_trim`` (a stable sort),
``drop.random_drop`` (full SplitMix64 outputs), ``drop.l1_norm``, ``task_vectors.task_vector``
and ``task_vectors.combine_task_vectors`` (``sign_consensus.sign_consensus``), cast once to the
output dtype. Inputs hit the edge cases: bf16 deltas with many ties at v_k, exact zeros, ±0.0 in
the base, negative and zero weights, density 0, every rescale, several spans.
"""

from __future__ import annotations

import pytest
import torch
from support.helpers import plan_params

from mergekit_like.kernels import fused_cpu, tiling
from mergekit_like.methods.base import TensorTask
from mergekit_like.ops.drop import l1_factor, l1_norm, mask_key, random_drop
from mergekit_like.ops.task_vectors import combine_task_vectors, task_vector
from mergekit_like.ops.trim import magnitude_trim
from mergekit_like.registry import get_method

BF16, F32 = torch.bfloat16, torch.float32
NAME = "model.layers.3.self_attn.o_proj.weight"
SEED = 11
SPARSIFY = {"ties": "trim", "dare_ties": "drop", "dare_linear": "drop", "task_arithmetic": None}
CONSENSUS = {"ties": True, "dare_ties": True, "dare_linear": False, "task_arithmetic": False}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def family(shape, n_models, seed, dtype=BF16):
    """A base with ±0.0 entries and fine-tunes on bf16's coarse grid (many ties in |δ|), 30 %
    of each model's entries equal to the base."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    base.view(-1)[::97] = 0.0
    base.view(-1)[1::97] = -0.0
    xs = []
    for _ in range(n_models):
        x = (base.float() + torch.randn(shape, generator=g) * 0.01).to(dtype)
        same = torch.rand(shape, generator=g) < 0.3
        x[same] = base[same]
        xs.append(x)
    return base, xs


def reference(method, base, xs, mps, params, out_dtype):
    """The merge as ops/ writes it, on whole float32 tensors."""
    b = base.float()
    weighted, weights = [], []
    for index, (x, mp) in enumerate(zip(xs, mps)):
        w, d = float(mp["weight"]), float(mp["density"]) if SPARSIFY[method] else 1.0
        weights.append(w)
        if d <= 0.0:
            weighted.append(None)
            continue
        delta = task_vector(x.float(), b)
        if 0.0 < d < 1.0:
            if SPARSIFY[method] == "trim":
                kept = magnitude_trim(delta, d)
            else:
                kept = random_drop(delta, mask_key(SEED, index, NAME), d)
            if params["rescale"] == "l1":
                r = l1_factor(l1_norm(delta), l1_norm(kept))
                kept = kept * r if r != 1.0 else kept
            elif params["rescale"] is True:
                kept = kept / d
            delta = kept
        weighted.append(delta * w)
    out = combine_task_vectors(b, weighted, weights, consensus=CONSENSUS[method],
                               normalize=params["normalize"], lam=params["lambda"])
    return out.to(out_dtype)


def adapter(method, base, xs, mps, params, out_dtype, workers=3):
    m = get_method(method)
    full, per_model = plan_params(m, params, mps)
    task = TensorTask(name=NAME, shape=tuple(base.shape), out_dtype=out_dtype,
                      compute_dtype=F32, load_dtype=None, base=base, inputs=list(xs),
                      input_indices=list(range(len(xs))), model_params=per_model, params=full,
                      seed=SEED, workers=workers, inputs_finite=True)
    return m.merge_tensor(task), full


CASES = [
    ("ties", [0.5, 0.5, 0.3], [1.0, 1.0, 1.0], {}),
    ("ties", [0.2, 0.9, 0.5], [0.7, -0.4, 0.0], {"normalize": False, "lambda": 0.6}),
    ("ties", [0.37, 1.0], [-1.0, -0.5], {"rescale": "l1"}),
    ("ties", [0.999, 0.001, 0.6], [1.0, 2.0, 0.5], {"rescale": True}),
    ("ties", [0.5, 0.0], [1.0, 1.0], {}),                        # density 0: never votes
    ("dare_ties", [0.5, 0.5, 0.3], [1.0, 1.0, 1.0], {}),
    ("dare_ties", [0.1, 1.0, 0.9], [0.5, 1.0, -0.7], {"rescale": "l1", "normalize": True}),
    ("dare_linear", [0.3, 1e-9], [1.0, 2.0], {"lambda": 0.8}),
    ("dare_linear", [0.6, 0.4], [1.0, 1.0], {"rescale": False, "normalize": True}),
    ("task_arithmetic", [1.0] * 3, [0.5, -1.0, 1.5], {}),
    ("task_arithmetic", [1.0] * 2, [0.3, 0.3], {"normalize": True, "lambda": 0.9}),
]


@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("out_dtype", [BF16, F32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_adapter_equals_ops_equations_bit_for_bit(monkeypatch, case, out_dtype, fused):
    monkeypatch.setenv("MERGEKIT_LIKE_FUSED", fused)
    monkeypatch.setattr(tiling, "PIECE", 1 << 14)               # many pieces per span
    method, dens, weights, params = CASES[case]
    base, xs = family((301, 257), len(dens), seed=case)
    mps = [{"weight": w, "density": d} for w, d in zip(weights, dens)]
    got, full = adapter(method, base, xs, mps, params, out_dtype)
    want = reference(method, base, xs, mps, full, out_dtype)
    assert got.dtype == want.dtype == out_dtype
    assert torch.equal(bits(got), bits(want))


def test_fused_loops_really_ran(monkeypatch):
    """The fused half of the comparison above is not vacuous."""
    calls = []
    real = fused_cpu.merge_span
    monkeypatch.setattr(fused_cpu, "merge_span", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("MERGEKIT_LIKE_FUSED", "1")
    base, xs = family((64, 33), 2, seed=1)
    adapter("ties", base, xs, [{"weight": 1.0, "density": 0.4}] * 2, {}, BF16)
    assert calls
