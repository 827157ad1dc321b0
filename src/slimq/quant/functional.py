"""Quantization math as free functions on tensors: ULQ, ARQ, IFMR initialisation, searchN.

Modules in ``slimq.quant.quantizers`` only choose arguments; tests call these functions
directly and compare them with numpy re-implementations.

Integer grid (AMCT's): a ``b``-bit signed integer ``q`` in ``[-2^(b-1), 2^(b-1)-1]`` with an
integer offset ``o`` stands for ``(q - o) * s``. Rounding is half-to-even (``torch.round``), as in
numpy and ONNX ``QuantizeLinear``; division by ``s`` (not multiplication by ``1/s``) matches
ONNX Runtime.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


__all__ = [
    "FLT_EPS",
    "qrange",
    "ulq_scale_offset",
    "ulq_fake_quant",
    "arq_scale",
    "fake_quant_weight",
    "ulq_weight_fake_quant",
    "grad_scale",
    "ifmr_candidates",
    "quant_sse",
    "shift_bit_errors",
    "MAX_SHIFT",
]

FLT_EPS = float(torch.finfo(torch.float32).eps)
MAX_SHIFT = 16


def qrange(bits: int) -> Tuple[int, int]:
    """Signed integer range of ``bits``: (-2^(b-1), 2^(b-1)-1)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# --------------------------------------------------------------------------- activations (ULQ)


def ulq_scale_offset(clip_max: Tensor, clip_min: Tensor, bits: int,
                     fp16_scale: bool = False) -> Tuple[Tensor, Tensor]:
    """Scale and offset of the asymmetric ULQ grid for a clip range.

    ``s = (max(clip_max, 0) - min(clip_min, 0)) / (2^b - 1)`` and
    ``o = round(-2^(b-1) - min(clip_min, 0) / s)``; a degenerate range gives ``s = 1``.
    With ``fp16_scale`` the scale is rounded to float16 precision first (FORCE_FP16_QUANT).

    Shapes: any broadcastable shapes; returns float32 tensors of the broadcast shape.
    """
    hi = clip_max.detach().float().clamp(min=0.0)
    lo = clip_min.detach().float().clamp(max=0.0)
    scale = (hi - lo) / float((1 << bits) - 1)
    if fp16_scale:
        scale = scale.half().float()
    scale = torch.where(scale < FLT_EPS, torch.ones_like(scale), scale)
    offset = torch.round(-float(1 << (bits - 1)) - lo / scale)
    return scale, offset


def _ulq_code(x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
    """``(y, code)`` of the ULQ forward: ``y = clamp(round(x/s), lo, hi) * s`` and the one
    tensor the backward needs.

    ``code = round(x/s) - x/s`` (in ``[-0.5, 0.5]``) where ``round(x/s)`` lies in ``[lo, hi]``,
    ``-1`` above the range, ``+1`` below it, NaN where ``x`` is not finite. It is built from
    exact float operations (``r - t`` is exact, ``c - r`` an integer), so the classification is
    the unclamped ``round``'s, ties included. No value is read on the host.
    """
    t = torch.div(x, scale)
    r = torch.round(t)
    code = torch.sub(r, t, out=t)  # the rounding residual, exact
    c = torch.clamp(r, lo, hi)
    d = torch.sub(c, r, out=r)  # 0 inside, <= -1 above, >= 1 below
    code.add_(d, alpha=2.0).clamp_(-1.0, 1.0)  # |residual| <= 0.5 stays, clamped ones become -+1
    return c.mul_(scale), code


class _ULQ(torch.autograd.Function):
    """y = (clamp(round(x/s) + o, qmin, qmax) - o) * s with LSQ-style clip gradients.

    Backward (round treated as identity where it multiplies a learned quantity):
      dy/dx = 1 inside the range, 0 where clamped;
      inside:  dy/dclip_max = (round(x/s) - x/s) / (2^b-1),  dy/dclip_min = -the same;
      above:   dy/dclip_max = 1;   below: dy/dclip_min = 1.

    On CUDA and under torch.compile the forward saves only :func:`_ulq_code`'s ``code`` (fused
    into one kernel when compiled); in eager CPU mode it runs four in-place passes with
    Python-number bounds and saves ``x``, which the backward re-grids (fewer activation-sized
    allocations; faster there). Neither backward synchronises. NaN/Inf in ``x`` or in the gradient makes the
    clip gradients non-finite (every clip-gradient sum covers every element), which is how the
    quantizer's check finds it later (:meth:`slimq.quant.quantizers.ActQuantizer.saw_nonfinite`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, clip_max: Tensor, clip_min: Tensor, bits: int, fixed_min: bool,
                fp16_scale: bool) -> Tensor:
        scale, offset = ulq_scale_offset(clip_max.reshape(()), clip_min.reshape(()), bits, fp16_scale)
        qmin, qmax = qrange(bits)
        lo, hi = qmin - offset, qmax - offset  # bounds of round(x/s), o being an integer
        xf = x if x.dtype == torch.float32 else x.float()
        ctx.bits, ctx.fixed_min = bits, fixed_min
        ctx.clip_shapes = (clip_max.shape, clip_min.shape)
        ctx.bounds = None
        if xf.is_cuda or torch.compiler.is_compiling():
            y, code = _ulq_code(xf, scale, lo, hi)
            ctx.save_for_backward(code)
        else:  # eager CPU: 4 in-place passes, x kept (often alive anyway), Python-number bounds
            ctx.bounds = (float(lo), float(hi))  # a CPU scalar read, not a device sync
            y = torch.div(xf, scale).round_().clamp_(*ctx.bounds).mul_(scale)
            ctx.save_for_backward(xf, scale)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = grad if grad.dtype == torch.float32 else grad.float()
        if ctx.bounds is None:
            gx, err, upper, lower = _ulq_sums_from_code(g, *ctx.saved_tensors, ctx.needs_input_grad[0])
        else:
            gx, err, upper, lower = _ulq_sums_from_x(g, *ctx.saved_tensors, ctx.bounds)
        if gx is not None and gx.dtype != grad.dtype:
            gx = gx.to(grad.dtype)
        n = float((1 << ctx.bits) - 1)
        g_max = err / n + upper
        g_min = torch.zeros_like(g_max) if ctx.fixed_min else lower - err / n
        return (gx, g_max.reshape(ctx.clip_shapes[0]), g_min.reshape(ctx.clip_shapes[1]), None, None, None)


def _total(t: Tensor) -> Tensor:
    """Sum of all elements; on 3+ dims reduced per dim-1 slice first. Under torch.compile that
    reduction shares its loop nest with the per-channel ones around it (BatchNorm's backward)
    instead of a separate serial pass: with flat sums the fused backward kernels of a compiled
    QAT ResNet-18 took 3x longer (221 vs 78 ms per step, benchmarks/bench_qat_step.py)."""
    if t.dim() < 3:
        return t.sum()
    return t.sum(dim=[0] + list(range(2, t.dim()))).sum()


def _ulq_sums_from_code(g: Tensor, code: Tensor, need_gx: bool):
    """``(gx, err, upper, lower)`` of the ULQ backward from :func:`_ulq_code`'s ``code``: the
    in-range gradient, sum(g * (round(x/s) - x/s)) in range, the sums of g above and below."""
    gc = code.abs().floor() * g  # the gradient of clamped elements
    clipped = _total(gc)  # upper + lower
    signed = _total(gc * code)  # lower - upper (code is -1 above, +1 below)
    gx = None
    if need_gx:
        gx = g - gc
        err = _total(gx * code)
    else:
        err = _total(g * code) - signed
    return gx, err, (clipped - signed) * 0.5, (clipped + signed) * 0.5


def _ulq_sums_from_x(g: Tensor, x: Tensor, scale: Tensor, bounds):
    """The same sums recomputed from the saved input (eager CPU), with Python-number bounds.

    Two activation-sized allocations and float arithmetic only, in place: on CPU a fresh
    allocation of that size costs more than a pass over it, and bool masks with
    ``torch.where`` cost several float passes each."""
    blo, bhi = bounds
    r = torch.div(x, scale).round_()
    side = torch.clamp(r, blo, bhi)
    torch.sub(r, side, out=side).clamp_(-1.0, 1.0)  # +1 above, -1 below, 0 inside
    flat_g = g.reshape(-1)
    upper_minus_lower = torch.dot(flat_g, side.reshape(-1))
    gx = side.abs_().sub_(1.0).neg_().mul_(g)  # g where inside, 0 where clamped
    flat_gx = gx.reshape(-1)
    err = torch.dot(flat_gx, r.reshape(-1)) - torch.dot(flat_gx, x.reshape(-1)) / scale
    clipped = flat_g.sum() - flat_gx.sum()  # upper + lower
    upper = (clipped + upper_minus_lower) * 0.5
    return gx, err, upper, clipped - upper


def ulq_fake_quant(x: Tensor, clip_max: Tensor, clip_min: Tensor, bits: int = 8,
                   fixed_min: bool = False, fp16_scale: bool = False) -> Tensor:
    """ULQ activation fake-quant (see :class:`_ULQ` for the gradients).

    Args:
        x: activations, any shape, float32/float16/bfloat16 (computed in float32).
        clip_max, clip_min: one-element tensors (learnable).
        bits: 4, 8 or 16.
        fixed_min: clip_min is pinned (it receives no gradient).
        fp16_scale: FORCE_FP16_QUANT scale rounding.

    Returns:
        Tensor of ``x``'s shape and dtype on the integer grid. NaN/Inf in ``x`` or in the
        gradient shows as non-finite clip gradients (no exception here: raising would need a
        host synchronisation in every backward).
    """
    return _ULQ.apply(x, clip_max, clip_min, bits, fixed_min, fp16_scale)


# --------------------------------------------------------------------------- weights (ARQ / ULQ)


def arq_scale(w2d: Tensor, bits: int, channel_wise: bool, sign: Optional[Tensor] = None) -> Tensor:
    """Symmetric ARQ scale of a weight viewed as ``[C_out, K]``.

    ``s = max|w| / (2^(b-1) - 1)``, except when the largest magnitude is a negative value: then
    ``s = max|w| / 2^(b-1)`` so that it lands exactly on ``-2^(b-1)`` (the "128 case" for INT8).
    ``sign`` (``[C_out]``, +-1) flips channels first; export uses it when a BatchNorm with a
    negative gamma is folded in, so that the folded integers still fit the range.
    An all-zero channel gets ``s = 1``.

    Returns:
        ``[C_out]`` if ``channel_wise`` else ``[1]``, float32.
    """
    w = w2d.detach().float()
    if sign is not None:
        w = w * sign.reshape(-1, 1)
    if channel_wise:
        wmax, wmin = w.amax(dim=1), w.amin(dim=1)
    else:
        wmax, wmin = w.max().reshape(1), w.min().reshape(1)
    neg = wmin.abs() > wmax.abs()
    bound = torch.maximum(wmax.abs(), wmin.abs())
    levels = torch.where(neg, float(1 << (bits - 1)), float((1 << (bits - 1)) - 1))
    scale = bound / levels
    return torch.where(scale < FLT_EPS, torch.ones_like(scale), scale)


class _STEQuant(torch.autograd.Function):
    """Symmetric fake-quant with a given scale; gradient passes straight through to ``w``."""

    @staticmethod
    def forward(ctx, w2d: Tensor, scale: Tensor, bits: int, sign: Optional[Tensor]) -> Tensor:
        return _quant_dequant(w2d, scale, bits, sign)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None, None


def _quant_dequant(w2d: Tensor, scale: Tensor, bits: int, sign: Optional[Tensor]) -> Tensor:
    qmin, qmax = qrange(bits)
    s = scale.reshape(-1, 1)
    if sign is None:
        return torch.div(w2d, s).round_().clamp_(qmin, qmax).mul_(s)
    sg = sign.reshape(-1, 1).to(w2d.dtype)
    return torch.div(w2d * sg, s).round_().clamp_(qmin, qmax).mul_(s * sg)


def fake_quant_weight(w2d: Tensor, scale: Tensor, bits: int, sign: Optional[Tensor] = None) -> Tensor:
    """``clamp(round(w/s), qmin, qmax) * s`` per row of ``w2d`` (``[C_out, K]``), straight-through."""
    return _STEQuant.apply(w2d, scale, bits, sign)


class _ULQWeight(torch.autograd.Function):
    """Symmetric fake-quant with a learned scale (LSQ): grads for both ``w`` and ``s``.

    The scale used is ``|s|`` (kept away from 0). dy/dw = 1 inside the range; dy/d|s| =
    round(w/s) - w/s inside, qmin or qmax where clamped.
    """

    @staticmethod
    def forward(ctx, w2d: Tensor, scale: Tensor, bits: int, sign: Optional[Tensor]) -> Tensor:
        s = scale.detach().float().abs().clamp(min=FLT_EPS).reshape(-1)
        sg = sign.reshape(-1, 1).float() if sign is not None else torch.ones(1, 1, device=w2d.device)
        ctx.save_for_backward(w2d, s, sg, torch.sign(scale.detach()).reshape(-1))
        ctx.bits, ctx.scale_shape = bits, scale.shape
        return _quant_dequant(w2d, s, bits, sign)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w2d, s, sg, raw_sign = ctx.saved_tensors
        qmin, qmax = qrange(ctx.bits)
        t = w2d * sg / s.reshape(-1, 1)
        r = torch.round(t)
        inside = (r >= qmin) & (r <= qmax)
        gw = torch.where(inside, grad, 0.0)
        ds = torch.where(inside, r - t, r.clamp(qmin, qmax)) * sg * grad
        gs = ds.sum(dim=1) if s.numel() > 1 else ds.sum().reshape(1)
        gs = gs * torch.where(raw_sign == 0, 1.0, raw_sign)
        return gw, gs.reshape(ctx.scale_shape), None, None


def ulq_weight_fake_quant(w2d: Tensor, scale: Tensor, bits: int, sign: Optional[Tensor] = None) -> Tensor:
    """Symmetric fake-quant of ``w2d`` (``[C_out, K]``) with the learnable ``scale`` (``[C_out]`` or ``[1]``)."""
    return _ULQWeight.apply(w2d, scale, bits, sign)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """Identity forward, gradient multiplied by ``factor`` (LSQ's step-size gradient scaling)."""
    return _GradScale.apply(x, factor)


# --------------------------------------------------------------------------- initialisation (IFMR)

IFMR_FACTORS = torch.linspace(0.70, 1.30, 61)
IFMR_PERCENTILE = 0.999999


def ifmr_candidates(upper: Tensor, lower: Tensor) -> Tuple[Tensor, Tensor]:
    """Candidate clip pairs ``(f * upper, f * lower)`` for f in 0.70, 0.71, ..., 1.30."""
    f = IFMR_FACTORS.to(upper.device)
    return f * upper.float(), f * lower.float()


def quant_sse(samples: Tensor, clip_max: Tensor, clip_min: Tensor, bits: int) -> Tensor:
    """Sum of squared ULQ errors of ``samples`` for each candidate clip pair.

    Shapes: samples ``[N]``; clip_max, clip_min ``[K]``; returns float64 ``[K]``.
    """
    scale, offset = ulq_scale_offset(clip_max, clip_min, bits)
    qmin, qmax = qrange(bits)
    x = samples.float().reshape(1, -1)
    out = []
    for start in range(0, scale.numel(), 8):  # 8 candidates at a time: bounded temporaries
        s, o = scale[start:start + 8].reshape(-1, 1), offset[start:start + 8].reshape(-1, 1)
        y = torch.div(x, s).round_().add_(o).clamp_(qmin, qmax).sub_(o).mul_(s)
        out.append(y.sub_(x).square_().sum(dim=1, dtype=torch.float64))
    return torch.cat(out)


# --------------------------------------------------------------------------- searchN


def shift_bit_errors(acc: Tensor, channel_dim: Optional[int]) -> Tensor:
    """Squared error of mapping int32 accumulators to int16 with each right shift N = 1..16.

    For every N, ``q = clamp(floor(acc / 2^N), -32768, 32767)`` and the error is
    ``sum((q * 2^N - acc)^2)``, summed per channel (``channel_dim``) or over everything.

    Shapes: acc any shape (integer-valued float); returns float64 ``[C, 16]`` or ``[1, 16]``.
    """
    a = acc.double()
    if channel_dim is None:
        a = a.reshape(1, -1)
    else:
        a = a.movedim(channel_dim, 0).reshape(acc.shape[channel_dim], -1)
    cols = []
    for n in range(1, MAX_SHIFT + 1):
        step = float(1 << n)
        q = torch.floor(a / step).clamp_(-32768, 32767)
        cols.append(((q * step - a) ** 2).sum(dim=1))
    return torch.stack(cols, dim=1)
