"""Quantizer modules: they own the learnable clips/scales and flags, the math is functional.

All state that must survive ``state_dict``, DDP and restore is a Parameter or a buffer and gets
its final shape in ``__init__``; ``initialized`` flags are uint8 buffers (NCCL has no bool).

Only training forwards change a quantizer. An eval forward reads the clips as they are: before
training has initialised them, they hold the provisional range that create computed from
``input_data`` (:meth:`ActQuantizer.calibrate_`), so an early evaluation is the same every time.
"""
from __future__ import annotations

import logging
import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config.plan import ActQuantSpec, WeightQuantSpec
from ..errors import NumericalError
from . import functional as Fq
from .grid import Grid

__all__ = ["ActQuantizer", "WeightQuantizer", "ShiftBitSearch", "MAX_INIT_SAMPLES"]

log = logging.getLogger("slimq")
MAX_INIT_SAMPLES = 1 << 16  # per batch, taken with a fixed stride (deterministic)


try:  # range initialisation runs eagerly inside torch.compile'd models
    _eager = torch.compiler.disable
except AttributeError:  # pragma: no cover - torch without torch.compiler
    def _eager(fn):
        return fn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _samples(x: Tensor) -> Tensor:
    flat = x.detach().reshape(-1)
    if flat.numel() > MAX_INIT_SAMPLES:
        flat = flat[:: math.ceil(flat.numel() / MAX_INIT_SAMPLES)]
    return flat.float()


Extremes = Tuple[Tensor, Tensor]


def _extremes(samples: Tensor) -> Optional[Extremes]:
    """``(min, max)`` of the 1-D ``samples`` in one pass (NaN and Inf propagate into them);
    None for no samples."""
    return tuple(torch.aminmax(samples)) if samples.numel() else None


def _finite(extremes: Optional[Extremes]) -> bool:
    return extremes is None or all(math.isfinite(float(e)) for e in extremes)


def _kth_smallest(samples: Tensor, k: int, extremes: Optional[Extremes] = None) -> Tensor:
    """The ``k``-th smallest of the 1-D ``samples`` (0-dim, on their device). The extremes, which
    the 99.9999th percentile is below a million samples, are a max/min, not a selection
    (``extremes``: the samples' ``(min, max)`` when already computed)."""
    if k == samples.numel():
        return extremes[1] if extremes is not None else samples.max()
    if k == 1:
        return extremes[0] if extremes is not None else samples.min()
    return torch.kthvalue(samples.cpu(), k).values.to(samples.device)


class ActQuantizer(nn.Module):
    """ULQ fake-quant of an activation with learnable ``clip_max`` / ``clip_min``.

    Without configured clips, the first ``batch_num`` *training* forwards initialise them:
    samples of every batch are kept, and on the last of them an IFMR-style search picks the pair
    ``(f*P_hi, f*P_lo)``, f in 0.70..1.30, that minimises the quantization MSE over all samples,
    where P_hi/P_lo are their 99.9999th/0.0001th percentiles (earlier batches use the
    percentiles as they stand). Under DDP the percentiles and errors are reduced across ranks, so
    every rank gets the same clips. Once ``initialized`` is 1 (also when loaded from a
    checkpoint) nothing re-initialises.

    Eval forwards never change anything: they quantize on the current clips (see the module
    docstring for what those are before training).

    Buffers: ``initialized`` (uint8), ``init_batches`` (int64). After the initialisation the
    training forward and backward never synchronise with the host (torch.compile traces them
    without a graph break). NaN/Inf reaching this quantizer in training is not raised there but
    leaves the clips' gradients (and, after an optimizer step, the clips) non-finite;
    :meth:`saw_nonfinite` reads that, and the record collector raises
    :class:`~slimq.errors.NumericalError` from it at the next eval forward or save.

    Shapes: input any shape; ``clip_max``/``clip_min`` are ``[1]``.
    """

    slimq_float_pass: bool = False  # eval passes values through (create's calibration, nn.replace.calibrate)

    def __init__(self, spec: ActQuantSpec, batch_num: int = 1, layer_name: str = "") -> None:
        super().__init__()
        if spec.fixed_min is None:
            raise ValueError("ActQuantizer needs a resolved fixed_min (True/False)")
        self.bits = spec.bits
        self.fixed_min = bool(spec.fixed_min)
        self.fp16_scale = spec.fp16_scale
        self.batch_num = max(1, int(batch_num))
        self.layer_name = layer_name
        given = spec.clip_max is not None
        self.clip_max = nn.Parameter(torch.tensor([spec.clip_max if given else 1.0]))
        self.clip_min = nn.Parameter(torch.tensor([0.0 if self.fixed_min or not given else spec.clip_min]),
                                     requires_grad=not self.fixed_min)
        self.register_buffer("initialized", torch.tensor([1 if given else 0], dtype=torch.uint8))
        self.register_buffer("init_batches", torch.zeros(1, dtype=torch.int64))
        self._samples: List[Tensor] = []
        self._ready: Optional[bool] = given  # Python mirror of `initialized` (None: read it once)
        self._warn_once = [False]  # shared by every quantizer of a model (nn.replace): one warning

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = None

    def extra_repr(self) -> str:
        s = f"bits={self.bits}, fixed_min={self.fixed_min}"
        if self.fp16_scale:
            s += ", fp16_scale=True"
        return s

    @property
    def is_initialized(self) -> bool:
        """Whether training (or the config, or a checkpoint) has set the clips (syncs once)."""
        if self._ready is None:
            self._ready = bool(self.initialized.item())
        return self._ready

    @torch.no_grad()
    def grid(self) -> Grid:
        """The integer grid of the current clips."""
        return Grid.from_clips(self.clip_max, self.clip_min, self.bits, self.fp16_scale)

    def forward(self, x: Tensor) -> Tensor:
        """Training: fake-quantized ``x``, differentiable in ``x`` and the clips. Eval: ``x`` on
        the current grid, no gradient, no state change."""
        if not self.training:
            return self.eval_quant(x)
        if not self._ready and not self.is_initialized:
            self._init_step(x)
        return Fq.ulq_fake_quant(x, self.clip_max, self.clip_min, self.bits, self.fixed_min,
                                 self.fp16_scale)

    def saw_nonfinite(self) -> Tensor:
        """0-dim bool tensor: NaN/Inf reached this quantizer in training, i.e. its clips or their
        gradients are not finite (see the class docstring). Computed without a host sync."""
        clips = [self.clip_max, self.clip_min]
        state = [t.detach().reshape(-1) for t in clips + [c.grad for c in clips if c.grad is not None]]
        return torch.isfinite(torch.cat(state)).all().logical_not()

    @torch.no_grad()
    def eval_quant(self, x: Tensor) -> Tensor:
        if self.slimq_float_pass:  # create's calibration sees the float model's values
            return x
        self.warn_if_provisional()
        return self.grid().fake_quant(x).to(x.dtype)

    def warn_if_provisional(self) -> None:
        if not self._warn_once[0] and not self.is_initialized:
            self._warn_once[0] = True
            log.warning("slimq: quantizer '%s' (and any other of this model not trained yet) has not been "
                        "initialised by training yet; eval uses the ranges computed at create from input_data",
                        self.layer_name)

    # -- initialisation ------------------------------------------------------------------
    @torch.no_grad()
    def calibrate_(self, x: Tensor) -> None:
        """Provisional clips from one batch (create's ``input_data``), for evals before training:
        the 99.9999th/0.0001th percentiles (training's IFMR search is not worth its cost here).

        ``initialized`` stays 0: the first ``batch_num`` training batches still initialise.
        """
        if self.is_initialized:
            return
        samples = _samples(x)
        extremes = _extremes(samples)
        if not _finite(extremes):
            raise NumericalError(f"NaN or Inf in the input activations of quantized layer "
                                 f"'{self.layer_name}' on input_data")
        hi, lo = self._percentiles(samples, collective=False, extremes=extremes)
        self.clip_max.fill_(float(hi))
        self.clip_min.fill_(float(lo))

    @_eager
    @torch.no_grad()
    def _init_step(self, x: Tensor) -> None:
        """One range-initialisation batch (may synchronise: it runs eagerly, also when compiled)."""
        flat = _samples(x)
        extremes = _extremes(flat)
        if not _finite(extremes):
            raise NumericalError(f"NaN or Inf in the input activations of quantized layer "
                                 f"'{self.layer_name}' while initialising its clip range")
        self._samples.append(flat)
        several = len(self._samples) > 1  # the extremes are of this batch only
        samples = torch.cat(self._samples) if several else flat
        collective = _distributed()
        hi, lo = self._percentiles(samples, collective, None if several else extremes)
        self.init_batches += 1
        if int(self.init_batches) < self.batch_num:  # until the last init batch: the percentiles
            self.clip_max.fill_(float(hi))
            self.clip_min.fill_(float(lo))
            return
        cmax, cmin = self._search(samples, hi, lo, collective)
        self.clip_max.fill_(cmax)
        self.clip_min.fill_(cmin)
        self.initialized.fill_(1)
        self._samples = []
        self._ready = True

    def _search(self, samples: Tensor, hi: Tensor, lo: Tensor, collective: bool) -> Tuple[float, float]:
        cand_max, cand_min = Fq.ifmr_candidates(hi, lo)
        sse = Fq.quant_sse(samples, cand_max, cand_min, self.bits)
        count = torch.tensor([float(samples.numel())], dtype=torch.float64, device=sse.device)
        if collective:
            dist.all_reduce(sse)
            dist.all_reduce(count)
        best = int(torch.argmin(sse / count))
        return float(cand_max[best]), float(cand_min[best])

    def _percentiles(self, samples: Tensor, collective: bool,
                     extremes: Optional[Extremes] = None) -> Tuple[Tensor, Tensor]:
        k = samples.numel()
        hi_k = min(k, max(1, math.ceil(Fq.IFMR_PERCENTILE * k)))
        hi = _kth_smallest(samples, hi_k, extremes).clamp(min=0.0)
        if self.fixed_min:
            lo = torch.zeros((), device=samples.device)
        else:
            lo_k = max(1, min(k, math.floor((1 - Fq.IFMR_PERCENTILE) * k) + 1))
            lo = _kth_smallest(samples, lo_k, extremes).clamp(max=0.0)
        if collective:
            hi_lo = torch.stack([hi, -lo]).reshape(2)
            dist.all_reduce(hi_lo, op=dist.ReduceOp.MAX)
            hi, lo = hi_lo[0], -hi_lo[1]
        if float(hi - lo) <= 0.0:  # all-zero activations: any positive range will do
            hi = torch.ones((), device=samples.device)
        return hi, lo

    def scale_offset(self) -> Tuple[float, int]:
        """Current ``(scale_d, offset_d)`` as the record stores them."""
        return self.grid().as_record()


class WeightQuantizer(nn.Module):
    """Weight fake-quant on the ``[C_out, K]`` view of a weight.

    ``arq``: scale recomputed from max|w| every call, straight-through gradient.
    ``ulq``: ``scale`` is a Parameter (``[C_out]`` or ``[1]``) initialised from ARQ at the first
    training call; LSQ gradients with the usual 1/sqrt(numel * qmax) gradient scaling. Before
    that, eval uses the ARQ scale (nothing changes in eval).
    """

    def __init__(self, spec: WeightQuantSpec, out_channels: int) -> None:
        super().__init__()
        self.algo = spec.algo
        self.bits = spec.bits
        self.channel_wise = spec.channel_wise
        n = out_channels if spec.channel_wise else 1
        if spec.algo == "ulq":
            self.scale = nn.Parameter(torch.ones(n))
            self.register_buffer("initialized", torch.zeros(1, dtype=torch.uint8))
        else:
            self.register_parameter("scale", None)
        self._ready: Optional[bool] = True if spec.algo == "arq" else None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = True if self.algo == "arq" else None

    def extra_repr(self) -> str:
        return f"algo={self.algo}, bits={self.bits}, channel_wise={self.channel_wise}"

    def _learned(self) -> bool:
        if self._ready is None:
            self._ready = bool(self.initialized.item())
        return self._ready

    def forward(self, w2d: Tensor, sign: Optional[Tensor] = None) -> Tensor:
        if self.algo == "arq":
            scale = Fq.arq_scale(w2d, self.bits, self.channel_wise, sign)
            return Fq.fake_quant_weight(w2d, scale.to(w2d.dtype), self.bits, sign)
        if not self._learned():
            if not self.training:
                scale = Fq.arq_scale(w2d, self.bits, self.channel_wise, sign)
                return Fq.fake_quant_weight(w2d, scale.to(w2d.dtype), self.bits, sign)
            with torch.no_grad():
                self.scale.copy_(Fq.arq_scale(w2d, self.bits, self.channel_wise, sign))
                self.initialized.fill_(1)
            self._ready = True
        per = w2d.shape[1] if self.channel_wise else w2d.numel()
        factor = 1.0 / math.sqrt(per * ((1 << (self.bits - 1)) - 1))
        return Fq.ulq_weight_fake_quant(w2d, Fq.grad_scale(self.scale, factor), self.bits, sign)

    @torch.no_grad()
    def current_scale(self, w2d: Tensor, sign: Optional[Tensor] = None) -> Tensor:
        """The scale the forward uses now, float32 ``[C_out]`` or ``[1]``."""
        if self.algo == "arq" or not self._learned():
            return Fq.arq_scale(w2d, self.bits, self.channel_wise, sign)
        return self.scale.detach().float().abs().clamp(min=Fq.FLT_EPS)


class ShiftBitSearch:
    """searchN statistics: accumulates, over eval batches, the int16 mapping error of each
    shift 1..16 (``errors``: ``[C, 16]``, ``C`` = 1 when not channel-wise).

    Transient statistics of this process's own eval data, owned by the record collector: not a
    module, not in the state_dict, never broadcast.
    """

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.errors: Optional[Tensor] = None
        self.batches = 0

    def reset(self) -> None:
        self.errors = None
        self.batches = 0

    @torch.no_grad()
    def observe(self, acc: Tensor, channel_dim: int) -> None:
        """Add one batch of int32 accumulators ``acc`` (integral float, channels at ``channel_dim``)."""
        errs = Fq.shift_bit_errors(acc, channel_dim if self.channels > 1 else None)
        self.errors = errs if self.errors is None else self.errors + errs.to(self.errors.device)
        self.batches += 1

    def best(self) -> Tuple[int, ...]:
        """Best shift per channel (1..16); 0s before any eval batch was observed."""
        if self.errors is None:
            return tuple(0 for _ in range(self.channels))
        return tuple(int(i) + 1 for i in torch.argmin(self.errors, dim=1).tolist())
