"""Independent numpy re-implementations of slimq's quantization formulas (SPEC section 5).

Written from the formulas, not from slimq's code: float32 arithmetic where slimq computes in
float32, float64 where an exact reference is wanted.
"""
from __future__ import annotations

import math

import numpy as np

F32 = np.float32
EPS = float(np.finfo(np.float32).eps)


def ulq_params(clip_max: float, clip_min: float, bits: int, fp16: bool = False):
    hi = F32(max(clip_max, 0.0))
    lo = F32(min(clip_min, 0.0))
    s = F32((hi - lo) / F32(2 ** bits - 1))
    if fp16:
        s = F32(np.float16(s))
    if s < EPS:
        s = F32(1.0)
    o = np.round(F32(-(2 ** (bits - 1))) - lo / s)
    return s, int(o)


def ulq_forward(x: np.ndarray, clip_max: float, clip_min: float, bits: int, fp16: bool = False):
    s, o = ulq_params(clip_max, clip_min, bits, fp16)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = np.clip(np.round(x.astype(F32) / s) + o, qmin, qmax)
    return ((q - o) * s).astype(F32)


def ulq_backward(x: np.ndarray, g: np.ndarray, clip_max: float, clip_min: float, bits: int,
                 fixed_min: bool = False):
    """Straight-through for x inside the range; LSQ-style gradients for the clips."""
    s, o = ulq_params(clip_max, clip_min, bits)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    t = x.astype(F32) / s
    r = np.round(t)
    inside = (r + o >= qmin) & (r + o <= qmax)
    upper, lower = r + o > qmax, r + o < qmin
    n = 2 ** bits - 1
    err = np.sum(g64 * inside * (r.astype(np.float64) - x64 / float(s)))
    gx = np.where(inside, g, 0.0).astype(F32)
    gmax = err / n + np.sum(g64 * upper)
    gmin = 0.0 if fixed_min else -err / n + np.sum(g64 * lower)
    return gx, gmax, gmin


def ulq_ste_surrogate(x, g, clip_max, clip_min, bits, frozen_err):
    """Loss sum(g * y) with round() frozen as the constant ``round(x/s0) - x/s0`` of the point of
    evaluation: the function whose exact derivative the straight-through gradients are."""
    n = 2 ** bits - 1
    hi, lo = max(clip_max, 0.0), min(clip_min, 0.0)
    s = (hi - lo) / n
    y = np.where(frozen_err["inside"], x + s * frozen_err["c"],
                 np.where(frozen_err["upper"], hi, lo))
    return float(np.sum(g * y))


def arq(w: np.ndarray, bits: int, channel_wise: bool):
    """Symmetric ARQ: returns (scale per channel, integer weights, dequantized weights)."""
    w2 = w.reshape(w.shape[0], -1).astype(F32)
    if not channel_wise:
        w2 = w2.reshape(1, -1)
    wmax, wmin = w2.max(axis=1), w2.min(axis=1)
    neg = np.abs(wmin) > np.abs(wmax)
    bound = np.maximum(np.abs(wmax), np.abs(wmin))
    levels = np.where(neg, 2 ** (bits - 1), 2 ** (bits - 1) - 1).astype(F32)
    s = (bound / levels).astype(F32)
    s = np.where(s < EPS, F32(1.0), s).astype(F32)
    s_rows = np.repeat(s, w.shape[0]) if not channel_wise else s
    q = np.clip(np.round(w.reshape(w.shape[0], -1) / s_rows[:, None]), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return s, q.reshape(w.shape), (q * s_rows[:, None]).reshape(w.shape).astype(F32)


def ifmr(samples: np.ndarray, bits: int, fixed_min: bool):
    """Best (clip_max, clip_min) among f * (P99.9999, P0.0001), f = 0.70, 0.71, ..., 1.30."""
    x = np.sort(samples.astype(F32))
    k = x.size
    hi = max(float(x[min(k, max(1, math.ceil(0.999999 * k))) - 1]), 0.0)
    lo = 0.0 if fixed_min else min(float(x[max(1, min(k, math.floor(1e-6 * k) + 1)) - 1]), 0.0)
    best, best_err = None, np.inf
    for f in np.linspace(0.70, 1.30, 61).astype(F32):
        cmax, cmin = float(F32(f) * F32(hi)), float(F32(f) * F32(lo))
        err = np.sum((ulq_forward(x, cmax, cmin, bits).astype(np.float64) - x) ** 2)
        if err < best_err:
            best, best_err = (cmax, cmin), err
    return best


def search_n(acc: np.ndarray, channel_axis=None):
    """Best right shift N (1..16) mapping int32 accumulators to int16 by floor(acc / 2^N)."""
    a = acc.astype(np.float64)
    a = a.reshape(1, -1) if channel_axis is None else np.moveaxis(a, channel_axis, 0).reshape(a.shape[channel_axis], -1)
    errs = []
    for n in range(1, 17):
        q = np.clip(np.floor(a / 2 ** n), -32768, 32767)
        errs.append(((q * 2 ** n - a) ** 2).sum(axis=1))
    return np.argmin(np.stack(errs, axis=1), axis=1) + 1
