"""Uniform affine fake quantization, computed exactly as QuantizeLinear/DequantizeLinear.

q = clamp(round(x / scale) + zero_point, qmin, qmax); x_hat = (q - zero_point) * scale,
with round-half-to-even (torch.round and onnxruntime agree). The order of operations
matches onnxruntime's kernels so the exported file reproduces the mirror bit for bit,
except at rounding ties produced by float summation order (docs/quantization.md).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .widths import ACT_BITS, FLOAT_BITS


@dataclass(frozen=True)
class QuantSpec:
    """What a quantizer represents: bit width, signedness, granularity."""

    bits: int
    symmetric: bool  # symmetric: signed integers, zero point 0; else unsigned with a zero point
    channel_axis: int | None = None  # per-channel along this axis, or per-tensor
    block_size: int | None = None  # 2-D weights: one scale per channel and per block of this many
    # elements along the other (reduction) axis - DequantizeLinear's block_size

    def __post_init__(self):
        if self.bits not in ACT_BITS:  # the widest set; policy and plans check per kind
            raise ValueError(f"bit width must be one of {ACT_BITS}, got {self.bits}")
        if self.block_size is not None and self.channel_axis not in (0, 1):
            raise ValueError("block-wise scales need a per-channel axis of a 2-D weight")

    @property
    def is_float(self) -> bool:
        """A placeholder that quantizes nothing (an activation a plan leaves float)."""
        return self.bits == FLOAT_BITS

    @property
    def block_axis(self) -> int | None:
        """The axis the blocks run along (the reduction axis of a 2-D weight), or None."""
        return None if self.block_size is None else 1 - self.channel_axis

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the scales of a tensor of `shape`, as DequantizeLinear takes them:
        () per tensor, (channels,) per channel, the weight's shape with the block axis
        divided by the block size (rounded up) when block-wise."""
        if self.channel_axis is None:
            return ()
        if self.block_size is None:
            return (shape[self.channel_axis],)
        blocked = list(shape)
        blocked[self.block_axis] = -(-shape[self.block_axis] // self.block_size)
        return tuple(blocked)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


class _RoundSTE(torch.autograd.Function):
    """Round half to even forward, identity backward: one pass each way (the
    `x + (round(x) - x).detach()` idiom costs three forward and two backward)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward (straight-through estimator)."""
    return _RoundSTE.apply(x) if torch.is_grad_enabled() and x.requires_grad else torch.round(x)


def fake_quant_mix(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int,
                   keep: torch.Tensor | None) -> torch.Tensor:
    """(clamp(round(x / s) + z) - z) * s, where `keep` is set (QDrop) or everywhere.

    Division, not multiplication by 1/s, as QuantizeLinear does, so tuning sees the
    integers that will be exported. With a learned `s`, autograd gives LSQ's step-size
    gradient through the straight-through rounding (q - x/s inside the range, the clamp
    bound outside); `scale_gradient` applies LSQ's 1/sqrt(N * Qp) factor.
    """
    x_hat = (torch.clamp(round_ste(x / s) + z, qmin, qmax) - z) * s
    return x_hat if keep is None else mix(x, x_hat, keep)


def mix(other: torch.Tensor, chosen: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`chosen` where keep is 1, `other` where it is 0, exactly (lerp returns its end
    points unchanged), with gradients to both: QDrop's mixing."""
    return torch.lerp(other, chosen, keep)


_kernel = fake_quant_mix  # compile_kernel() may swap in a torch.compile'd version


def compile_kernel(enabled: bool) -> bool:
    """Use torch.compile for fake_quant_mix (fuses its elementwise passes, forward and
    backward); False and one warning where compilation fails. Returns whether it is on."""
    global _kernel
    if not enabled:
        _kernel = fake_quant_mix
        return False
    try:
        compiled = torch.compile(fake_quant_mix, dynamic=True)
        probe = torch.randn(2, 3, requires_grad=True)
        compiled(probe, torch.ones((), requires_grad=True), torch.zeros(()), 0, 15, (probe > 0).float()).sum().backward()
    except Exception as err:  # noqa: BLE001 - any compiler failure means: run eager
        warnings.warn(f"torch.compile is not available here ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
                      "tuning runs eager", stacklevel=2)
        _kernel = fake_quant_mix
        return False
    _kernel = compiled
    return True


def scale_gradient(t: torch.Tensor, factor: float) -> torch.Tensor:
    """`t` forward, gradient times `factor` backward (LSQ's step-size gradient scale)."""
    scaled = t * factor
    return scaled + (t - scaled).detach()


_TINY = torch.finfo(torch.float32).tiny * 2**10
_MASK_POOLS: dict[tuple, torch.Tensor] = {}


def reset_masks() -> None:
    """Forget the mask pools, so a run depends on its seed alone, not on earlier runs."""
    _MASK_POOLS.clear()


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether x is laid out NHWC (reconstruction's layout for convolutional blocks)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def keep_mask(x: torch.Tensor, prob: float) -> torch.Tensor:
    """A Bernoulli(prob) mask shaped like `x`, of 0.0 / 1.0 in x's dtype, for QDrop.

    Drawing a fresh random number per element costs as much as the quantizer itself on
    CPU, so masks are windows at random offsets into a pool drawn once (at least twice
    the tensor's size): each element still sees an independent-looking draw per call.
    The mask is float for `mix`: torch.where with a boolean mask is 10x slower on CPU.
    """
    n, key = x.numel(), (x.device, x.dtype, prob)
    pool = _MASK_POOLS.get(key)
    if pool is None or pool.numel() < 2 * n:
        pool = (torch.rand(max(2 * n, 1 << 20), device=x.device) < prob).to(x.dtype)
        _MASK_POOLS[key] = pool
    start = int(torch.randint(0, pool.numel() - n + 1, ()))
    window = pool[start:start + n]
    if is_channels_last(x):
        n_, c, h, w = x.shape  # same layout as x, so that mixing runs in one dense pass
        return window.view(n_, h, w, c).permute(0, 3, 1, 2)
    return window.view(x.shape)


class FakeQuantize(nn.Module):
    """A quantizer attached to one tensor of the mirror (one Q/DQ pair in the export).

    `scale` is a Parameter: reconstruction learns it (LSQ) when `requires_grad` is set;
    `zero_point` holds integers in a float buffer. `enabled=False` makes it a pass-through
    (float model). `quant_prob` set (QDrop, reconstruction only) keeps each quantized
    element with that probability and lets the float value through otherwise.
    """

    def __init__(self, spec: QuantSpec, channels: int = 1):
        super().__init__()
        self.spec = spec
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.enabled = True
        self.quant_prob: float | None = None
        self.range_max: float | None = None  # the largest value its range may reach (see fit_range)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.data = scale.detach().reshape(-1).float().to(self.scale.device)
            self.zero_point = zero_point.detach().reshape(-1).float().round().to(self.scale.device)
        self.fit_range()

    def fit_range(self) -> None:
        """Shrink the scale so that the top level stays at or below `range_max` (a Clip the
        runtime folds into this Q only then); called after every learned-scale step too."""
        if self.range_max is None or self.spec.is_float:
            return
        with torch.no_grad():
            levels = (self.spec.qmax - self.zero_point).clamp(min=1)
            self.scale.data = torch.minimum(self.scale.data, self.range_max / levels)

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        axis = spec.channel_axis
        if axis is None:
            return t.reshape(())
        if spec.block_size is not None:  # each block's scale repeated over its elements
            k = spec.block_axis
            blocks = t.reshape(spec.scale_shape(tuple(x.shape)))
            return blocks.repeat_interleave(spec.block_size, dim=k).narrow(k, 0, x.shape[k])
        shape = [1] * x.dim()
        shape[axis] = -1
        return t.reshape(shape)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The integers QuantizeLinear would produce (as floats)."""
        s, z = self._view(self.scale, x), self._view(self.zero_point, x)
        return torch.clamp(round_ste(x / s) + z, self.spec.qmin, self.spec.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not x.is_floating_point() or self.spec.is_float:
            return x
        scale = self.scale
        if scale.requires_grad and torch.is_grad_enabled():  # LSQ
            per_channel = x.numel() // scale.numel()
            scale = scale_gradient(scale.clamp(min=_TINY), 1.0 / math.sqrt(per_channel * self.spec.qmax))
        keep = keep_mask(x, self.quant_prob) if self.quant_prob is not None else None
        kernel = _kernel if torch.is_grad_enabled() else fake_quant_mix  # caches and export: eager, exact
        return kernel(x, self._view(scale, x), self._view(self.zero_point, x), self.spec.qmin, self.spec.qmax, keep)

    def extra_repr(self) -> str:
        s = self.spec
        kind = f"per-channel(axis={s.channel_axis})" if s.channel_axis is not None else "per-tensor"
        kind += f", blocks of {s.block_size}" if s.block_size is not None else ""
        return f"bits={s.bits}, {'symmetric' if s.symmetric else 'asymmetric'}, {kind}"


class BiasQuantize(nn.Module):
    """A layer's bias as int32 with scale = input scale x weight scale (per channel) and zero
    point 0 - how integer kernels add it (QLinearConv, QGemm). The scales are read at each
    call from the quantizers as they stand (learned scales, AdaRound modules swapped in); the
    bias stays float while its activation is not quantized (float model, calibration)."""

    # The widest range float32 keeps inside int32: a clamp at 2**31 - 1 rounds up to 2**31 in
    # float32, which the int32 cast then wraps to -2**31 (a flipped bias in the file)
    INT32 = (-(2**31), 2**31 - 128)

    def __init__(self, hooks, quantizers: Mapping[str, FakeQuantize], act: str, weight: str,
                 widths: tuple[int, ...] = (8,)):
        super().__init__()
        self._refs = (hooks, quantizers)  # a tuple: not registered as submodules (they live elsewhere)
        self.act, self.weight = act, weight
        self.widths = widths  # the widths the runtime fuses (runtimes.py): at others the bias stays float

    def scale(self) -> torch.Tensor | None:
        """The bias scale, or None while the activation is not being quantized, or while a plan
        gives the layer widths no integer kernel takes (a uniform run at them keeps it float too)."""
        hooks, quantizers = self._refs
        act, weight = quantizers[self.act], quantizers[self.weight]
        if hooks.get_hook(self.act) is not act or not (act.enabled and weight.enabled) \
                or act.spec.bits not in self.widths or weight.spec.bits not in self.widths:
            return None
        return act.scale.reshape(()) * weight.scale.reshape(-1)

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        scale = self.scale()
        if scale is None:
            return bias
        scale = scale.to(bias.dtype)
        return torch.clamp(torch.round(bias / scale), *self.INT32) * scale


def set_enabled(quantizers: Mapping[str, FakeQuantize], enabled: bool) -> None:
    for q in quantizers.values():
        q.enabled = enabled


@contextlib.contextmanager
def quantizers_disabled(quantizers: Mapping[str, FakeQuantize]) -> Iterator[None]:
    """The float model inside the `with`: every quantizer off, and on again after it, also on error."""
    set_enabled(quantizers, False)
    try:
        yield
    finally:
        set_enabled(quantizers, True)
