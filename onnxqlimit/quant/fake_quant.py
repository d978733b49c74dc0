"""Uniform affine fake quantization, computed exactly as QuantizeLinear/DequantizeLinear.

q = clamp(round(x / scale) + zero_point, qmin, qmax); x_hat = (q - zero_point) * scale,
with round-half-to-even (torch.round and onnxruntime agree). The order of operations
matches onnxruntime's kernels so the exported file reproduces the mirror bit for bit,
except at rounding ties produced by float summation order (docs/quantization.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class QuantSpec:
    """What a quantizer represents: bit width, signedness, granularity."""

    bits: int
    symmetric: bool  # symmetric: signed integers, zero point 0; else unsigned with a zero point
    channel_axis: int | None = None  # per-channel along this axis, or per-tensor

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bit width must be 2..16, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class FakeQuantize(nn.Module):
    """A quantizer attached to one tensor of the mirror (one Q/DQ pair in the export).

    `scale` is a Parameter so reconstruction can learn it (LSQ); `zero_point` holds
    integers in a float buffer. `enabled=False` makes it a pass-through (float model).
    """

    def __init__(self, spec: QuantSpec, channels: int = 1):
        super().__init__()
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.enabled = True

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.data = scale.detach().reshape(-1).float().to(self.scale.device)
            self.zero_point = zero_point.detach().reshape(-1).float().round().to(self.scale.device)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        axis = self.spec.channel_axis
        if axis is None:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[axis] = -1
        return t.reshape(shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The integers QuantizeLinear would produce (as floats)."""
        s, z = self._view(self.scale, x), self._view(self.zero_point, x)
        return torch.clamp(round_ste(x / s) + z, self.spec.qmin, self.spec.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not x.is_floating_point():
            return x
        s, z = self._view(self.scale, x), self._view(self.zero_point, x)
        return (self.quantize(x) - z) * s

    def extra_repr(self) -> str:
        s = self.spec
        kind = f"per-channel(axis={s.channel_axis})" if s.channel_axis is not None else "per-tensor"
        return f"bits={s.bits}, {'symmetric' if s.symmetric else 'asymmetric'}, {kind}"
