"""Uniform affine fake quantization, computed exactly as QuantizeLinear/DequantizeLinear.

q = clamp(round(x / scale) + zero_point, qmin, qmax); x_hat = (q - zero_point) * scale,
with round-half-to-even (torch.round and onnxruntime agree). The order of operations
matches onnxruntime's kernels so the exported file reproduces the mirror bit for bit,
except at rounding ties produced by float summation order (docs/quantization.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .bits import ACT_BITS


@dataclass(frozen=True)
class QuantSpec:
    """What a quantizer represents: bit width, signedness, granularity."""

    bits: int
    symmetric: bool  # symmetric: signed integers, zero point 0; else unsigned with a zero point
    channel_axis: int | None = None  # per-channel along this axis, or per-tensor

    def __post_init__(self):
        if self.bits not in ACT_BITS:  # the widest set; policy and plans check per kind
            raise ValueError(f"bit width must be one of {ACT_BITS}, got {self.bits}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


_TINY = torch.finfo(torch.float32).tiny * 2**10
_MASK_POOLS: dict[tuple, torch.Tensor] = {}


def reset_masks() -> None:
    """Forget the mask pools, so a run depends on its seed alone, not on earlier runs."""
    _MASK_POOLS.clear()


def keep_mask(x: torch.Tensor, prob: float) -> torch.Tensor:
    """A Bernoulli(prob) mask shaped like `x`, for QDrop.

    Drawing a fresh random number per element costs as much as the quantizer itself on
    CPU, so masks are windows at random offsets into a pool drawn once (at least twice
    the tensor's size): each element still sees an independent-looking draw per call.
    """
    n, key = x.numel(), (x.device, prob)
    pool = _MASK_POOLS.get(key)
    if pool is None or pool.numel() < 2 * n:
        pool = torch.rand(max(2 * n, 1 << 20), device=x.device) < prob
        _MASK_POOLS[key] = pool
    start = int(torch.randint(0, pool.numel() - n + 1, ()))
    return pool[start:start + n].view(x.shape)


class FakeQuantize(nn.Module):
    """A quantizer attached to one tensor of the mirror (one Q/DQ pair in the export).

    `scale` is a Parameter: reconstruction learns it (LSQ) when `requires_grad` is set;
    `zero_point` holds integers in a float buffer. `enabled=False` makes it a pass-through
    (float model). `drop_prob` set (QDrop, reconstruction only) keeps each quantized
    element with that probability and lets the float value through otherwise.
    """

    def __init__(self, spec: QuantSpec, channels: int = 1):
        super().__init__()
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.enabled = True
        self.drop_prob: float | None = None

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
        if self.spec.channel_axis is None and torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad):
            # Tuning (LSQ, step-size gradient scaled by 1/sqrt(N * Qp)): torch's fused kernel. It
            # multiplies by 1/scale, so it may differ from the exported division at exact ties;
            # the caches and the export use the exact path. Only per-tensor scales are learned.
            factor = 1.0 / math.sqrt(x.numel() * self.spec.qmax) if self.scale.requires_grad else 1.0
            x_hat = torch._fake_quantize_learnable_per_tensor_affine(
                x, self.scale.clamp(min=_TINY), self.zero_point, self.spec.qmin, self.spec.qmax, factor)
        else:
            s, z = self._view(self.scale, x), self._view(self.zero_point, x)
            x_hat = (torch.clamp(round_ste(x / s) + z, self.spec.qmin, self.spec.qmax) - z) * s
        if self.drop_prob is not None:
            return torch.where(keep_mask(x, self.drop_prob), x_hat, x)
        return x_hat

    def extra_repr(self) -> str:
        s = self.spec
        kind = f"per-channel(axis={s.channel_axis})" if s.channel_axis is not None else "per-tensor"
        return f"bits={s.bits}, {'symmetric' if s.symmetric else 'asymmetric'}, {kind}"
