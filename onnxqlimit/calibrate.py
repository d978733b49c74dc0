"""Stage 2: attach quantizers to the mirror where the policy says, and calibrate them.

Weights get their scales from their own values; activations from the model run on the
calibration batches with its weights quantized (observers hooked where the activation
quantizers stand). The observers are kept, so activation scales for any other width (a
mixed-precision search tries several) come without running the model again.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .mirror import Mirror
from .progress import progress_bar
from .quant.config import Scheme
from .quant.fake_quant import BiasQuantize, FakeQuantize
from .quant.observers import RangeObserver, weight_qparams
from .quant.policy import QuantPoint
from .quant.widths import FLOAT_BITS


class _Observe(nn.Module):
    def __init__(self, observer: RangeObserver):
        super().__init__()
        self.observer = observer

    def forward(self, x):
        self.observer.observe(x)
        return x


def attach_quantizers(mirror: Mirror, points: list[QuantPoint], fused_bits: tuple[int, ...] = (8,)
                      ) -> dict[str, FakeQuantize]:
    """A fake-quant module on every point; int32 biases (where placed) at the widths in `fused_bits`."""
    quantizers = {}
    for point in points:
        channels = 1
        if point.kind == "weight":
            channels = math.prod(point.spec.scale_shape(tuple(mirror.initializer(point.tensor).shape)))
        quantizers[point.tensor] = FakeQuantize(point.spec, channels).to(mirror.device)
        quantizers[point.tensor].range_max = point.within
        mirror.set_hook(point.tensor, quantizers[point.tensor])
    for point in points:  # int32 biases read the scales of their layer's quantizers
        if point.bias is not None:
            bias, act = point.bias
            mirror.set_hook(bias, BiasQuantize(mirror, quantizers, act, point.tensor, fused_bits))
    return quantizers


class Calibration:
    """Scale and zero point of every quantizer at any width, computed once per (tensor, width)."""

    def __init__(self, mirror: Mirror, observers: Mapping[str, RangeObserver], scheme: Scheme):
        self.mirror, self.observers, self.scheme = mirror, observers, scheme
        self.unobserved: list[str] = []  # activations no calibration sample reached: left float
        self._memo: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def qparams(self, point: QuantPoint, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (point.tensor, bits)
        if key not in self._memo:
            spec, scheme = replace(point.spec, bits=bits), self.scheme
            if point.kind == "weight":
                self._memo[key] = weight_qparams(self.mirror.initializer(point.tensor), spec, scheme.weight_init)
            else:
                self._memo[key] = self.observers[point.tensor].qparams(spec, scheme.act_init, scheme.percentile)
        return self._memo[key]


def calibrate(mirror: Mirror, points: list[QuantPoint], quantizers: Mapping[str, FakeQuantize],
              batches: Iterable[Mapping[str, np.ndarray]], scheme: Scheme, progress: bool = True,
              previous: Calibration | None = None) -> Calibration:
    """Weight scales at the points' widths, then activation ranges observed on the model with
    those weights quantized (as BRECQ / QDrop initialise them): call again after a bit plan
    changes weight widths, so the activation ranges follow (`previous`: its weight scales are
    reused, they depend on the weights alone)."""
    acts = [p for p in points if p.kind == "activation"]
    observers = {p.tensor: RangeObserver(seed=i) for i, p in enumerate(acts)}
    calibration = Calibration(mirror, observers, scheme)
    if previous is not None:
        weights = {p.tensor for p in points if p.kind == "weight"}
        calibration._memo.update({k: v for k, v in previous._memo.items() if k[0] in weights})
    weights = [p for p in points if p.kind == "weight"]  # the range search takes minutes on a model of GBs
    for point in progress_bar(progress, weights, desc="weight ranges", unit="weight", leave=False):
        quantizers[point.tensor].set_qparams(*calibration.qparams(point, point.spec.bits))
    for name, observer in observers.items():
        mirror.set_hook(name, _Observe(observer))
    try:
        with torch.no_grad():
            for batch in progress_bar(progress, list(batches), desc="calibrating", unit="batch", leave=False):
                mirror.run(batch)
    finally:
        for name in observers:
            mirror.set_hook(name, quantizers[name])
    for point in acts:
        if not observers[point.tensor].samples:  # computed in a branch no sample took: no range
            point.spec, point.fixed = replace(point.spec, bits=FLOAT_BITS), True
            quantizers[point.tensor].spec = point.spec
            calibration.unobserved.append(point.tensor)
        quantizers[point.tensor].set_qparams(*calibration.qparams(point, point.spec.bits))
    derive_scales(points, quantizers, mirror)
    return calibration


def derive_scales(points: list[QuantPoint], quantizers: Mapping[str, FakeQuantize], mirror: Mirror) -> None:
    """The scales that follow others once those are set (after calibration and every plan):
    tied pairs take their source's, then weight scales rise where an int32 bias would not fit."""
    tie_scales(points, quantizers)
    fit_bias_scales(points, quantizers, mirror)


def tie_scales(points: list[QuantPoint], quantizers: Mapping[str, FakeQuantize]) -> None:
    """A data-movement op's output quantizer takes its input's scale and zero point (at equal
    widths; a plan that changed one keeps the other's own calibration): its values are already
    on that grid, so the pair is exact and the runtime drops it. In placement order, so a
    chain (Split -> Reshape) follows its first link."""
    for point in points:
        if point.tied_to is None or point.tied_to not in quantizers:
            continue
        source, tied = quantizers[point.tied_to], quantizers[point.tensor]
        if (source.spec.bits, source.spec.symmetric) == (tied.spec.bits, tied.spec.symmetric):
            tied.set_qparams(source.scale.detach().clone(), source.zero_point.detach().clone())


# An int32 bias (scale = activation x weight scale) overflows where a weight channel is dead
# (all zeros get the smallest scale, 1e-35) or nearly so, or the activation is 16-bit:
# PP-OCRv4 rec saturated 23 of 16669 bias channels at W8A8, 34 at A16W8. The weight scale of
# such a channel is raised until its bias fits with a 2x margin (for activation scales learned
# later), as onnxruntime's quantizer does; the channel's weights then round to ~0, as they are.
BIAS_LIMIT = 2.0 ** 30


def fit_bias_scales(points: list[QuantPoint], quantizers: Mapping[str, FakeQuantize], mirror: Mirror) -> int:
    """Raise weight scales where the layer's int32 bias would overflow; the channels raised."""
    raised = 0
    for point in points:
        if point.bias is None or point.bias[1] not in quantizers:
            continue
        weight, act = quantizers[point.tensor], quantizers[point.bias[1]]
        if weight.spec.is_float or act.spec.is_float:
            continue
        bias = mirror.initializer(point.bias[0]).detach().float().abs().reshape(-1).to(weight.scale.device)
        floor = bias / (act.scale.detach().reshape(()) * BIAS_LIMIT)
        scale = weight.scale.detach()
        floor = floor if scale.numel() == floor.numel() else floor.max().reshape(1)
        low = floor > scale
        if low.any():
            raised += int(low.sum())
            weight.set_qparams(torch.maximum(scale, floor), weight.zero_point)
    return raised
