"""Element-wise ONNX ops: arithmetic, comparisons, logic, activations, casts."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .registry import Node, register, torch_dtype

# ------------------------------------------------------------------ arithmetic


@register("Add")
def _add(node: Node):
    return torch.add


@register("Sub")
def _sub(node: Node):
    return torch.sub


@register("Mul")
def _mul(node: Node):
    return torch.mul


@register("Div")
def _div(node: Node):
    def run(a, b):
        # ONNX integer division truncates toward zero (C semantics), not floor.
        if a.is_floating_point():
            return a / b
        return torch.div(a, b, rounding_mode="trunc")

    return run


@register("Mod")
def _mod(node: Node):
    # fmod=1: sign of the dividend (C fmod); fmod=0: sign of the divisor (Python %).
    return torch.fmod if node.attr("fmod", 0) else torch.remainder


@register("Pow")
def _pow(node: Node):
    def run(base, exponent):
        if base.is_floating_point() and exponent.dtype != base.dtype:
            exponent = exponent.to(base.dtype)
        return torch.pow(base, exponent).to(base.dtype)  # ONNX: result has the base's type

    return run


def _variadic(fn):
    return lambda *xs: functools.reduce(fn, xs)


@register("Sum")
def _sum(node: Node):
    return _variadic(torch.add)


@register("Mean")
def _mean(node: Node):
    return lambda *xs: functools.reduce(torch.add, xs) / len(xs)


@register("Max")
def _max(node: Node):
    return _variadic(torch.maximum)


@register("Min")
def _min(node: Node):
    return _variadic(torch.minimum)


class _Sqrt(torch.autograd.Function):
    """torch.sqrt whose gradient at 0 is 0, not infinity: a magnitude sqrt(re^2 + im^2) of a
    quantized silent frame is exactly 0, and one infinite gradient turns a whole block's
    reconstruction into NaN (Silero VAD's STFT). The values are torch.sqrt's."""

    @staticmethod
    def forward(ctx, x):
        y = torch.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, grad / (2 * y), torch.zeros_like(grad))


_UNARY = {
    "Sqrt": _Sqrt.apply,
    "Exp": torch.exp,
    "Log": torch.log,
    "Erf": torch.erf,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # round half to even, as ONNX
    "Reciprocal": torch.reciprocal,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Sign": torch.sign,
    "IsNaN": torch.isnan,
    "Not": torch.logical_not,
    "Softsign": F.softsign,
}


def _unary_converter(fn):
    return lambda node: fn


for _op, _fn in _UNARY.items():
    register(_op)(_unary_converter(_fn))


@register("IsInf")
def _isinf(node: Node):
    detect_neg, detect_pos = node.attr("detect_negative", 1), node.attr("detect_positive", 1)
    return lambda x: (torch.isneginf(x) & bool(detect_neg)) | (torch.isposinf(x) & bool(detect_pos))


# ------------------------------------------------------------------ activations


@register("Relu")
def _relu(node: Node):
    return lambda x: torch.clamp_min(x, 0)


@register("LeakyRelu")
def _leaky_relu(node: Node):
    alpha = node.attr("alpha", 0.01)
    return lambda x: F.leaky_relu(x, alpha)


@register("PRelu")
def _prelu(node: Node):
    # ONNX broadcasts slope numpy-style (aligned at the last axis), unlike F.prelu. Adding
    # an exact zero keeps it exact; torch.where with a mask is ~10x slower on CPU.
    return lambda x, slope: torch.clamp_min(x, 0) + torch.clamp_max(x, 0) * slope


@register("Elu")
def _elu(node: Node):
    alpha = node.attr("alpha", 1.0)
    return lambda x: torch.where(x < 0, alpha * torch.expm1(x), x)


@register("Celu")
def _celu(node: Node):
    alpha = node.attr("alpha", 1.0)
    return lambda x: F.celu(x, alpha)


@register("Selu")
def _selu(node: Node):
    alpha = node.attr("alpha", 1.67326319217681884765625)
    gamma = node.attr("gamma", 1.05070102214813232421875)
    return lambda x: gamma * torch.where(x <= 0, alpha * torch.expm1(x), x)


@register("ThresholdedRelu")
def _thresholded_relu(node: Node):
    alpha = node.attr("alpha", 1.0)
    return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))


@register("HardSigmoid")
def _hard_sigmoid(node: Node):
    alpha, beta = node.attr("alpha", 0.2), node.attr("beta", 0.5)
    return lambda x: torch.clamp(x * alpha + beta, 0, 1)


@register("HardSwish")
def _hard_swish(node: Node):
    # onnxruntime evaluates x * max(0, min(1, x/6 + 0.5)); F.hardswish rounds differently.
    return lambda x: x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0, 1)


@register("Softplus")
def _softplus(node: Node):
    return lambda x: torch.log1p(torch.exp(-x.abs())) + torch.clamp_min(x, 0)


@register("Mish")
def _mish(node: Node):
    return F.mish


@register("Gelu")
def _gelu(node: Node):
    approximate = node.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise node.unsupported(f"approximate={approximate!r}")
    if approximate == "tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return lambda x: 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


@register("Clip")
def _clip(node: Node):
    if node.opset < 11:  # bounds were attributes before opset 11
        lo, hi = node.attr("min", -3.4028234663852886e38), node.attr("max", 3.4028234663852886e38)
        return lambda x: torch.clamp(x, lo, hi)

    def run(x, lo=None, hi=None):
        if lo is None and hi is None:
            return x
        # ONNX: when min > max every element becomes max; torch.clamp does the same.
        return torch.clamp(x, lo, hi)

    return run


# ------------------------------------------------------------------ comparison and logic

_BINARY_BOOL = {
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}

for _op, _fn in _BINARY_BOOL.items():
    register(_op)(_unary_converter(_fn))


@register("Where")
def _where(node: Node):
    return lambda cond, x, y: torch.where(cond.bool(), x, y)


# ------------------------------------------------------------------ casts


@register("Cast")
def _cast(node: Node):
    dtype = torch_dtype(node.attr("to"), node)
    return lambda x: x.to(dtype)


@register("CastLike")
def _cast_like(node: Node):
    return lambda x, like: x.to(like.dtype)
