"""The quantization state: one object that every stage after calibration takes.

It holds where the quantizers stand (the policy's points), the quantizer modules (scales,
zero points, learned rounding) and the calibration that gives scales at any width, so a
bit plan can be applied at any time before reconstruction fixes the rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .calibrate import Calibration, derive_scales
from .quant.adaround import AdaRoundQuantize
from .quant.bits import BitPlan
from .quant.fake_quant import FakeQuantize
from .quant.policy import QuantPoint


@dataclass
class QuantState:
    points: list[QuantPoint]
    quantizers: dict[str, FakeQuantize]
    calibration: Calibration

    @property
    def plan(self) -> BitPlan:
        return BitPlan.of(self.points)

    def apply(self, plan: BitPlan) -> None:
        """Give every quantizer its width in `plan`, with the calibrated scales for that width."""
        for point in self.points:
            bits = plan.bits.get(point.tensor, point.spec.bits)
            if bits == point.spec.bits:
                continue
            quantizer = self.quantizers[point.tensor]
            if isinstance(quantizer, AdaRoundQuantize):
                raise RuntimeError(f"{point.tensor}: learned rounding is tied to its width; apply plans before reconstruction")
            point.spec = replace(point.spec, bits=bits)
            quantizer.spec = point.spec
            quantizer.set_qparams(*self.calibration.qparams(point, bits))
        derive_scales(self.points, self.quantizers, self.calibration.mirror)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor | int | bool]]:
        """Per quantized tensor: width, scale, zero point and (after AdaRound) the rounding choice."""
        state = {}
        for point in self.points:
            q = self.quantizers[point.tensor]
            entry = {"bits": point.spec.bits, "scale": q.scale.detach().cpu().clone(),
                     "zero_point": q.zero_point.detach().cpu().clone()}
            if isinstance(q, AdaRoundQuantize):
                learned = q.chosen if q.hard else q.alpha
                entry.update({"chosen" if q.hard else "alpha": learned.detach().cpu().clone(), "hard": q.hard})
            state[point.tensor] = entry
        return state
