"""AdaRound: learn, per weight, whether to round down or up (Nagel et al., 2020).

W_q = s * (clamp(floor(W / s) + h(a) + z, qmin, qmax) - z), with the rectified sigmoid
h(a) = clamp(sigmoid(a) * (zeta - gamma) + gamma, 0, 1). `a` starts where h equals the
fractional part of W / s (so training starts from the float weight, not from RTN); a
regulariser pushes h to 0 or 1, and `harden()` fixes the choice (up where a >= 0) and
keeps only the chosen integers, one byte each (not two float32 tensors per weight: on a
model of many GB, the learned state of every finished block must not outgrow the model).

The module is a FakeQuantize: it stands where the weight's quantizer stood, exports the
same way (quantize() returns the chosen integers) and keeps the weight's scale fixed.
"""
from __future__ import annotations

import torch
from torch import nn

from .fake_quant import FakeQuantize

ZETA, GAMMA = 1.1, -0.1


class AdaRoundQuantize(FakeQuantize):
    def __init__(self, base: FakeQuantize, weight: torch.Tensor):
        super().__init__(base.spec, base.scale.numel())
        self.set_qparams(base.scale, base.zero_point)
        self.enabled = base.enabled
        with torch.no_grad():
            scaled = weight.detach().float() / self._view(self.scale, weight)
            floor = torch.floor(scaled)
            rest = scaled - floor  # in [0, 1): h(a) = rest inverts to a finite a
            self.register_buffer("floor", floor)
            self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def soft_rounding(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): zero only when every h is exactly 0 or 1."""
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()

    def harden(self) -> None:
        if self.hard:
            return
        with torch.no_grad():
            z = self._view(self.zero_point, self.floor)
            chosen = torch.clamp(self.floor + (self.alpha >= 0).to(self.floor.dtype) + z, self.spec.qmin, self.spec.qmax)
        del self.alpha, self.floor
        self.register_buffer("chosen", chosen.to(_integer_type(self.spec.qmin, self.spec.qmax)))
        self.hard = True

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        shape = self.chosen.shape if self.hard else self.floor.shape
        if x.shape != shape:
            raise ValueError(f"AdaRound was set up for a weight of shape {tuple(shape)}, got {tuple(x.shape)}")
        if self.hard:
            return self.chosen.to(x.dtype if x.is_floating_point() else torch.float32)
        z = self._view(self.zero_point, x)
        return torch.clamp(self.floor + self.soft_rounding() + z, self.spec.qmin, self.spec.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        z, s = self._view(self.zero_point, x), self._view(self.scale, x)
        return (self.quantize(x) - z) * s


def _integer_type(lo: int, hi: int) -> torch.dtype:
    return torch.int8 if lo >= -128 and hi <= 127 else torch.uint8 if lo >= 0 and hi <= 255 else torch.int16
