"""numba loops behind ``fused_cpu`` (imported on first use: numba's import and, on a fresh
machine, its compilation are paid only by merges that take the fused path).

Arrays are flat; bf16 arrives as uint16 bit patterns. Every loop that matters is a plain
innermost loop over one chunk with selects instead of branches, which LLVM vectorises;
``error_model="numpy"`` keeps division free of Python's zero check (which would stop that).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

from mergekit_like.ops.drop import GOLDEN, MIX1, MIX2, SCALE_BY, SCALE_DIVIDE, U_SHIFT

CHUNK = 512
"""Elements per chunk: the per-model work rows of one chunk stay in L1 cache."""
_JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)
# ops/drop.py's SplitMix64 constants and rescale modes, frozen into the compiled code as uint64 /
# int64 constants (numba reads module globals at compile time). numba's disk cache is keyed on
# this file only: a change there is a new mask scheme (ops.drop.SCHEME) and must touch this file.
_GOLDEN, _MIX1, _MIX2 = np.uint64(GOLDEN), np.uint64(MIX1), np.uint64(MIX2)
_U_SHIFT = np.uint64(U_SHIFT)
_SCALE_BY, _SCALE_DIVIDE = np.int64(SCALE_BY), np.int64(SCALE_DIVIDE)


@intrinsic
def _bits_to_f32(typingctx, v):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.uint32), codegen


@intrinsic
def _f32_to_bits(typingctx, v):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))
    return types.uint32(types.float32), codegen


@intrinsic
def _select(typingctx, cond, a, b):
    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])
    return a(types.boolean, a, a), codegen


def _f32(v):  # pragma: no cover - replaced by the overload inside compiled code
    raise NotImplementedError


@overload(_f32, inline="always")
def _f32_impl(v):
    if isinstance(v, types.Integer):          # bf16 bit pattern: the float32 of equal value
        return lambda v: _bits_to_f32(np.uint32(v) << np.uint32(16))
    return lambda v: np.float32(v)


def _store(out, i, v):  # pragma: no cover
    raise NotImplementedError


@overload(_store, inline="always")
def _store_impl(out, i, v):
    if isinstance(out.dtype, types.Integer):  # bf16: round to nearest, ties to even
        def store_bf16(out, i, v):
            u = _f32_to_bits(v)
            r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            out[i] = np.uint16(_select(v != v, np.uint32(0x7FC0), r))
        return store_bf16
    def store_f32(out, i, v):
        out[i] = v
    return store_f32


@njit(**_JIT)
def _count(x, b, hi, lo, lo_bits, width):
    """#(a > hi), #(a ≥ hi), #(a ≥ lo), #(a in [lo_bits, lo_bits + width] as float bits)."""
    gt = np.int32(0)
    ge_hi = np.int32(0)
    ge_lo = np.int32(0)
    hits = np.int32(0)
    for i in range(x.shape[0]):
        a = abs(_f32(x[i]) - _f32(b[i]))
        gt += np.int32(a > hi)
        ge_hi += np.int32(a >= hi)
        ge_lo += np.int32(a >= lo)
        hits += np.int32(_f32_to_bits(a) - lo_bits <= width)
    return gt, ge_hi, ge_lo, hits


@njit(**_JIT)
def scan(x, b, hi, lo, c_lo, c_hi, collect, offset, piece):
    """One bracket pass over a span: per piece of ``piece`` elements (a multiple of CHUNK),
    the counts #(> hi), #(≥ hi), #(≥ lo) and #collected; and the in-bracket values with their
    flat indices. |δ| ≥ 0, so c_lo ≤ |δ| ≤ c_hi is one unsigned compare on the float bits
    (NaN, whose bits exceed +inf's, is never inside, as with torch's comparisons)."""
    n = x.shape[0]
    lo_bits = _f32_to_bits(c_lo)
    width = _f32_to_bits(c_hi) - lo_bits if collect else np.uint32(0)
    counts = np.zeros(((n + piece - 1) // piece, 4), np.int64)
    cap = 1024
    vals = np.empty(cap, np.float32)
    idx = np.empty(cap, np.int64)
    m = 0
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        g, gh, gl, h = _count(x[s:e], b[s:e], hi, lo, lo_bits, width)
        p = s // piece
        counts[p, 0] += g
        counts[p, 1] += gh
        counts[p, 2] += gl
        if collect and h > 0:
            counts[p, 3] += h
            if m + h > cap:
                cap = max(2 * cap, m + h)
                grown_v = np.empty(cap, np.float32)
                grown_v[:m] = vals[:m]
                vals = grown_v
                grown_i = np.empty(cap, np.int64)
                grown_i[:m] = idx[:m]
                idx = grown_i
            m = _collect(x[s:e], b[s:e], lo_bits, width, vals, idx, m, offset + s)
    return counts, m, vals, idx


@njit(**_JIT)
def _collect(x, b, lo_bits, width, vals, idx, m, offset):
    for i in range(x.shape[0]):
        a = abs(_f32(x[i]) - _f32(b[i]))
        if _f32_to_bits(a) - lo_bits <= width:
            vals[m] = a
            idx[m] = offset + i
            m += 1
    return m


def _drop(d, keys, thresholds, j, flat):  # pragma: no cover
    raise NotImplementedError


@overload(_drop, inline="always")
def _drop_impl(d, keys, thresholds, j, flat):
    """DARE's keep_j (``ops.drop.keep_mask``: SplitMix64 of key + (j+1)·GOLDEN, top 24 bits
    < floor(d·2^24)) times δ; compiled away when ``keys`` is None (no DARE model in the merge)."""
    if isinstance(keys, types.NoneType):
        return lambda d, keys, thresholds, j, flat: d

    def drop(d, keys, thresholds, j, flat):
        z = keys[j] + np.uint64(flat + 1) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return d * _select((z >> _U_SHIFT) < thresholds[j], np.float32(1), np.float32(0))
    return drop


def _row_bits(masks, i):  # pragma: no cover
    raise NotImplementedError


@overload(_row_bits, inline="always")
def _row_bits_impl(masks, i):
    """Entry i's keep bits (bit j: model j keeps it) of the precomputed masks (a tuple of one
    uint8 array per model, at most 32), as uint32; None when there are none. Loaded once per
    entry, outside ``_weighted``: read inside it, the loads made the loop ten times slower."""
    if isinstance(masks, types.NoneType):
        return lambda masks, i: None

    def row_bits(masks, i):
        bits = np.uint32(masks[0][i])
        for j in range(1, len(masks)):
            bits = bits | (np.uint32(masks[j][i]) << np.uint32(j))
        return bits
    return row_bits


def _masked(d, bits, j):  # pragma: no cover
    raise NotImplementedError


@overload(_masked, inline="always")
def _masked_impl(d, bits, j):
    """δ·keep_j with a precomputed keep mask (DELLA's MAGPRUNE): bit j of ``bits``
    (``_row_bits``), as torch's ``δ.mul_(keep)`` (a dropped entry is δ·0 = ±0); compiled away
    when None."""
    if isinstance(bits, types.NoneType):
        return lambda d, bits, j: d

    def masked(d, bits, j):
        keep = (bits >> np.uint32(j)) & np.uint32(1)
        return d * _select(keep != 0, np.float32(1), np.float32(0))
    return masked


def _banded(d, band, j, flat):  # pragma: no cover
    raise NotImplementedError


@overload(_banded, inline="always")
def _banded_impl(d, band, j, flat):
    """δ·(top_hi ∖ top_lo) of the breadcrumbs band, top(v, c) = {|δ| > v} ∪ {|δ| = v at flat
    indices ≤ c} (``kernels.breadcrumbs.top_piece``), as torch's ``δ.mul_(keep)``; ``band`` =
    (v_hi, c_hi, v_lo, c_lo) per-model tuples; compiled away when None."""
    if isinstance(band, types.NoneType):
        return lambda d, band, j, flat: d

    def banded(d, band, j, flat):
        v_hi, c_hi, v_lo, c_lo = band
        a = abs(d)
        hi = (a > v_hi[j]) | ((a == v_hi[j]) & (flat <= c_hi[j]))
        lo = (a > v_lo[j]) | ((a == v_lo[j]) & (flat <= c_lo[j]))
        return d * _select(hi & ~lo, np.float32(1), np.float32(0))
    return banded


@njit(inline="always")
def _weighted(x, bits, i, bb, flat, j, params):
    """W = w·δ̂ of one element of model j: δ = x − b; magnitude trim (value > 0), random drop,
    precomputed keep mask or band; rescale; weight. ``params``: the per-model tuples of
    ``merge``."""
    value, below, cutoff, keys, thresholds, band, mode, scale, w = params
    d = _f32(x[i]) - bb
    t = _select(flat <= cutoff[j], below[j], value[j])
    d = _select((value[j] > np.float32(0)) & (d >= -t) & (d <= t), np.float32(0), d)  # hardshrink
    d = _drop(d, keys, thresholds, j, flat)
    d = _masked(d, bits, j)
    d = _banded(d, band, j, flat)
    d = _select(mode[j] == _SCALE_BY, d * scale[j],
                _select(mode[j] == _SCALE_DIVIDE, d / scale[j], d))
    return d * w[j]


@njit(**_JIT)
def merge(out, keep, b, xs, value, below, cutoff, keys, thresholds, masks, band, mode, scale, w,
          consensus, normalize, norm_div, lam, offset):
    """out = b + λ·Δ over a span (and Δ into ``keep`` unless None); see
    ``fused_cpu.merge_span``. ``xs`` and the per-model
    parameters are tuples whose length is part of the compiled type, so the loops over models
    unroll and the loop over elements vectorises; W_i is recomputed rather than stored."""
    one = np.float32(1.0)
    zero = np.float32(0.0)
    n_models = len(xs)
    params = (value, below, cutoff, keys, thresholds, band, mode, scale, w)
    for i in range(out.shape[0]):
        bb = _f32(b[i])
        bits = _row_bits(masks, i)
        flat = offset + i
        total = _weighted(xs[0], bits, i, bb, flat, 0, params)
        for j in range(1, n_models):
            total = total + _weighted(xs[j], bits, i, bb, flat, j, params)      # S = Σ_i W_i
        if consensus:
            sign = _select(total >= zero, one, -one)                        # S = 0 elects +1
            acc = zero
            denom = zero
            for j in range(n_models):
                v = _weighted(xs[j], bits, i, bb, flat, j, params) * sign
                v = _select(v < zero, zero, v)                              # torch.relu
                agree = _select(v > zero, one, zero)
                if j == 0:
                    acc = v
                    denom = agree * w[j]
                else:
                    acc = acc + v
                    denom = denom + agree * w[j]
            if normalize:
                acc = acc / (denom + _select(denom == zero, one, zero))     # D[D == 0] = 1
            total = acc * sign
        elif normalize:
            total = total / norm_div
        if keep is None:
            _store(out, i, total * lam + bb)
        else:
            keep[i] = total
    if keep is not None:              # a second loop: two outputs in one stop it vectorising
        for i in range(out.shape[0]):
            _store(out, i, keep[i] * lam + _f32(b[i]))
