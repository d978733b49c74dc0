"""Stage 3: attach quantizers to the mirror where the policy says, and calibrate them.

Weights get their scales from their own values; activations from the float model run
on the calibration batches (observers hooked on the same tensors, quantizers off).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .mirror import Mirror
from .quant.fake_quant import FakeQuantize
from .quant.observers import RangeObserver, weight_qparams
from .quant.policy import QuantConfig, QuantPoint


class _Observe(nn.Module):
    def __init__(self, observer: RangeObserver):
        super().__init__()
        self.observer = observer

    def forward(self, x):
        self.observer.observe(x)
        return x


def attach_quantizers(mirror: Mirror, points: list[QuantPoint]) -> dict[str, FakeQuantize]:
    quantizers = {}
    for point in points:
        channels = 1
        if point.kind == "weight" and point.spec.channel_axis is not None:
            channels = mirror.initializer(point.tensor).shape[point.spec.channel_axis]
        quantizers[point.tensor] = FakeQuantize(point.spec, channels).to(mirror.device)
        mirror.set_hook(point.tensor, quantizers[point.tensor])
    return quantizers


def set_enabled(quantizers: Mapping[str, FakeQuantize], enabled: bool) -> None:
    for q in quantizers.values():
        q.enabled = enabled


def calibrate(mirror: Mirror, points: list[QuantPoint], quantizers: Mapping[str, FakeQuantize],
              batches: Iterable[Mapping[str, np.ndarray]], config: QuantConfig, progress: bool = True) -> None:
    for point in points:
        if point.kind == "weight":
            scale, zero = weight_qparams(mirror.initializer(point.tensor), point.spec, config.weight_init)
            quantizers[point.tensor].set_qparams(scale, zero)
    acts = [p for p in points if p.kind == "activation"]
    observers = {p.tensor: RangeObserver(seed=i) for i, p in enumerate(acts)}
    for name, observer in observers.items():
        mirror.set_hook(name, _Observe(observer))
    try:
        with torch.no_grad():
            for batch in tqdm(list(batches), desc="calibrating", unit="batch", disable=not progress, leave=False):
                mirror.run(batch)
    finally:
        for name in observers:
            mirror.set_hook(name, quantizers[name])
    for point in acts:
        scale, zero = observers[point.tensor].qparams(point.spec, config.act_init, config.percentile)
        quantizers[point.tensor].set_qparams(scale, zero)
