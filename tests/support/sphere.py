"""Shared by the nuslerp / multislerp / karcher tests: a small model family, a merge runner, a
TensorTask builder, and plain float64 reference implementations written from the equations of
docs/methods/{nuslerp,multislerp,karcher}.md, vector by vector and element by element (they
share no code with mergekit_like.ops)."""

from __future__ import annotations

import math

import torch
from support.helpers import SMALL_SHAPE, load_folder, plan_params, run_cli, write_recipe

from mergekit_like.methods.base import TensorTask
from mergekit_like.registry import get_method

F32, F64 = torch.float32, torch.float64
SHAPE = SMALL_SHAPE
NAME = "model.layers.0.mlp.up_proj.weight"


def merged(tmp_path, capsys, doc) -> dict[str, torch.Tensor]:
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", write_recipe(tmp_path / "r.yml", doc), out, "-q"], capsys)
    assert code == 0, err
    return load_folder(out)


def run_method(method: str, inputs, model_params=(), params=None, *, base=None,
               block_elems: int = 1 << 22) -> torch.Tensor:
    """The registered adapter on one hand-made tensor (float32 compute and output)."""
    m = get_method(method)
    full, per_model = plan_params(m, params, [dict(mp) for mp in model_params] or
                                  [{} for _ in inputs])
    ref = base if base is not None else inputs[0]
    task = TensorTask(name=NAME, shape=tuple(ref.shape), out_dtype=F32, compute_dtype=F32,
                      load_dtype=None, base=base, inputs=list(inputs),
                      input_indices=list(range(len(inputs))), model_params=per_model,
                      params=full, block_elems=block_elems)
    return m.merge(task)[NAME]


def t32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F32)


def rand(shape, seed, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(F32)


# ---- references (float64, plain loops) -----------------------------------------------------

def ref_slerp_pair(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One pair of 1-d float64 vectors, NuSLERP's rule."""
    na = max(math.sqrt(float((a * a).sum())), 1e-7)
    nb = max(math.sqrt(float((b * b).sum())), 1e-7)
    cos = min(1.0, max(-1.0, float((a * b).sum()) / (na * nb)))
    theta = math.acos(cos)
    if abs(math.sin(theta)) < 1e-8:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def ref_nuslerp(w1, w2, v0, v1, *, row_wise=False, flatten=True, base=None) -> torch.Tensor:
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    a, b = v0.double(), v1.double()
    if base is not None:
        a, b = a - base.double(), b - base.double()
    shape = a.shape
    if flatten or a.dim() <= 1:
        out = ref_slerp_pair(t, a.reshape(-1), b.reshape(-1)).reshape(shape)
    else:
        if row_wise:                                    # vectors along dim 0
            a, b = a.movedim(0, -1), b.movedim(0, -1)
        moved = a.shape
        rows = [ref_slerp_pair(t, x, y) for x, y in zip(a.reshape(-1, moved[-1]),
                                                        b.reshape(-1, moved[-1]))]
        out = torch.stack(rows).reshape(moved)
        if row_wise:
            out = out.movedim(-1, 0)
    return out + base.double() if base is not None else out


def ref_multislerp(xs, weights, *, base=None, normalize_weights=True, eps=1e-8):
    if len(xs) == 1:
        return xs[0].double()
    vs = [x.double().reshape(-1) - (base.double().reshape(-1) if base is not None else 0)
          for x in xs]
    w = [float(x) for x in weights]
    if normalize_weights:
        w = [x / sum(w) for x in w]
    norms = [float(v.norm()) for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    m = sum(wi * u for wi, u in zip(w, units))
    if float(m.norm()) < eps:
        assert len(xs) == 2
        res = w[0] * vs[0] + w[1] * vs[1]
    else:
        mean = m / m.norm()
        tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
        tn = float(tangent.norm()) + eps
        res = (mean * math.cos(tn) + tangent * (math.sin(tn) / tn)) * sum(
            wi * n for wi, n in zip(w, norms))
    res = res.reshape(xs[0].shape)
    return res + base.double() if base is not None else res


def ref_karcher(xs, *, max_iter=10, tol=1e-5):
    if len(xs) == 1:
        return xs[0].double()
    vs = [x.double().reshape(-1) for x in xs]
    alphas = [1.0 / len(vs)] * len(vs)
    norms = [float(v.norm()) for v in vs]
    units = [v / n if n > 0 else torch.zeros_like(v) for v, n in zip(vs, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(xs[0].shape, dtype=F64)
    beta = [alphas[i] / sum(alphas[j] for j in valid) for i in valid]
    us = [units[i] for i in valid]
    u = sum(b * ui for b, ui in zip(beta, us))
    u = us[0].clone() if float(u.norm()) < tol else u / u.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for b, ui in zip(beta, us):
            dot = min(1.0, max(-1.0, float(u @ ui)))
            theta = math.acos(dot)
            if theta >= tol:
                tangent = tangent + b * (theta / math.sin(theta)) * (ui - dot * u)
        tn = float(tangent.norm())
        if tn < tol:
            break
        u = math.cos(tn) * u + math.sin(tn) * tangent / tn
        if float(u.norm()) > tol:
            u = u / u.norm()
    return (sum(a * n for a, n in zip(alphas, norms)) * u).reshape(xs[0].shape)
