"""Importance masks (docs/methods/rcp.md §9): which entries of a task vector a rule keeps.

I is an importance tensor of the merged tensor's shape (any numeric dtype: float importances,
int8 votes …); a rule selects entries of it::

    threshold X:  [I > X]                  X a double; compared exactly for every stored dtype
    top F:        [f32(I) ≥ v_k]           0 < F ≤ 1, k = trim_count(F, numel) (ops/trim.py),
                                           v_k the k-th largest of f32(I): ties at v_k are in
    mask:    keep = selected               M_i = [I > X]
    protect: keep = not selected           R_i = [I > X] or the top fraction F
    keep_i = M_i ∧ ¬R_i                    (a rule not given is all-true / all-false)

``top`` ranks I rounded to float32 (exact for every dtype but float64). Pure functions on
tensors; the recipe rules and their application to a merge are ``methods/masks.py``.
"""

from __future__ import annotations

import torch

from mergekit_like.ops.trim import trim_count

NATIVE_F32 = (torch.float16, torch.bfloat16, torch.float32)
"""Dtypes whose values are float32 values: ``top`` compares them as stored."""


def kth_largest_f32(importance: torch.Tensor, k: int) -> float:
    """The k-th largest value (1-based, with multiplicity) of the importance rounded to float32,
    exactly (``torch.kthvalue``, no sort)."""
    flat = importance.reshape(-1).to(torch.float32)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} outside [1, {n}]")
    return float(torch.kthvalue(flat, n - k + 1).values)


def above(values: torch.Tensor, threshold: float, out: torch.Tensor | None = None,
          work: torch.Tensor | None = None) -> torch.Tensor:
    """[values > threshold], exact for any stored dtype (threshold a double). Compares in the
    stored dtype when it holds the threshold exactly, else in float64 (``work``: a float64
    buffer of the same length)."""
    if not holds_exactly(values.dtype, threshold):
        values = values.to(torch.float64) if work is None else work.copy_(values.reshape(-1))
    return torch.gt(values, threshold, out=out)


def at_least_f32(values: torch.Tensor, v: float, out: torch.Tensor | None = None,
                 work: torch.Tensor | None = None) -> torch.Tensor:
    """[f32(values) ≥ v] for a float32 value v (``work``: a float32 buffer)."""
    if values.dtype not in NATIVE_F32:
        values = values.to(torch.float32) if work is None else work.copy_(values.reshape(-1))
    return torch.ge(values, v, out=out)


def important(importance: torch.Tensor, *, threshold: float | None = None,
              top: float | None = None) -> torch.Tensor:
    """The entries a rule selects: [I > threshold], or the top fraction ``top`` of I
    ([f32(I) ≥ v_k], k = trim_count(top, numel)): every entry tied with the k-th is in)."""
    if (threshold is None) == (top is None):
        raise ValueError("give exactly one of threshold and top")
    if top is not None:
        k = trim_count(top, importance.numel())
        return at_least_f32(importance, kth_largest_f32(importance, k))
    return above(importance, threshold)


def keep_mask(importance: torch.Tensor, *, threshold: float | None = None,
              top: float | None = None, protect: bool = False) -> torch.Tensor:
    """keep of one rule: a mask keeps what it selects ([I > X]); ``protect`` keeps the rest."""
    chosen = important(importance, threshold=threshold, top=top)
    return chosen.logical_not_() if protect else chosen


def holds_exactly(dtype: torch.dtype, x: float) -> bool:
    """Whether ``dtype`` represents the double x exactly (then comparing in it is exact)."""
    if not dtype.is_floating_point:
        return False
    return dtype == torch.float64 or float(torch.tensor(x, dtype=dtype)) == x
