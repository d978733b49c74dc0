"""Layer ONNX ops: convolutions, matrix products, pooling, normalisation, softmax."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import Node, ints, norm_axis, register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _torch_pad(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX per-axis (begin..., end...) -> F.pad's reversed (last-axis-first) pairs."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


class _Window:
    """Spatial window attributes shared by Conv and the pools (strides, dilations, pads)."""

    def __init__(self, node: Node):
        self.node = node
        self.auto_pad = node.attr("auto_pad", "NOTSET")
        if self.auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
            raise node.unsupported(f"auto_pad={self.auto_pad!r}")
        self.kernel = ints(node.attr("kernel_shape"))
        self.strides = ints(node.attr("strides"))
        self.dilations = ints(node.attr("dilations"))
        self.pads = ints(node.attr("pads"))

    def resolve(self, spatial: list[int], kernel: list[int]):
        nd = len(spatial)
        if nd not in _CONV:
            raise ValueError(f"{self.node.op_type} '{self.node.name}': {nd}-D windows are not supported")
        strides = self.strides or [1] * nd
        dil = self.dilations or [1] * nd
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begins, ends = [], []
            for n, k, s, d in zip(spatial, kernel, strides, dil):
                total = max(0, (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n)
                small, large = total // 2, total - total // 2
                begins.append(small if self.auto_pad == "SAME_UPPER" else large)
                ends.append(large if self.auto_pad == "SAME_UPPER" else small)
        elif self.auto_pad == "VALID" or not self.pads:
            begins, ends = [0] * nd, [0] * nd
        else:
            begins, ends = self.pads[:nd], self.pads[nd:]
        return strides, dil, begins, ends


@register("Conv")
def _conv(node: Node):
    window = _Window(node)
    group = node.attr("group", 1)

    def run(x, w, b=None):
        strides, dil, begins, ends = window.resolve(list(x.shape[2:]), list(w.shape[2:]))
        conv = _CONV[len(strides)]
        if begins == ends:
            return conv(x, w, b, strides, begins, dil, group)
        x = F.pad(x, _torch_pad(begins, ends))
        return conv(x, w, b, strides, 0, dil, group)

    return run


@register("ConvTranspose")
def _conv_transpose(node: Node):
    window = _Window(node)
    group = node.attr("group", 1)
    output_padding = ints(node.attr("output_padding"))
    output_shape = ints(node.attr("output_shape"))

    def run(x, w, b=None):
        spatial = list(x.shape[2:])
        nd = len(spatial)
        kernel = list(w.shape[2:])
        strides = window.strides or [1] * nd
        dil = window.dilations or [1] * nd
        out_pad = output_padding or [0] * nd
        # Full transposed conv without padding, then crop/extend per the spec; this covers
        # asymmetric pads, auto_pad and output_shape with one code path.
        y = _CONV_T[nd](x, w, None, strides, 0, 0, group, dil)
        full = [(n - 1) * s + (k - 1) * d + 1 for n, s, k, d in zip(spatial, strides, kernel, dil)]
        if output_shape or window.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = output_shape[-nd:] if output_shape else [n * s for n, s in zip(spatial, strides)]
            total = [f + op - t for f, op, t in zip(full, out_pad, target)]
            # onnxruntime's rule (checked against it): a shortfall is zero-filled at the end;
            # an odd excess is cropped more at the start except for SAME_UPPER.
            upper = window.auto_pad == "SAME_UPPER"
            begins = [max(t, 0) // 2 if upper else max(t, 0) - max(t, 0) // 2 for t in total]
            ends = [t - bg for t, bg in zip(total, begins)]
        elif window.pads and window.auto_pad != "VALID":
            begins, ends = window.pads[:nd], window.pads[nd:]
        else:
            begins, ends = [0] * nd, [0] * nd
        # F.pad with negative amounts crops; output_padding adds zeros at the end.
        y = F.pad(y, _torch_pad([-v for v in begins], [op - e for op, e in zip(out_pad, ends)]))
        if b is not None:
            y = y + b.reshape([1, -1] + [1] * nd)
        return y

    return run


@register("Gemm")
def _gemm(node: Node):
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    trans_a, trans_b = node.attr("transA", 0), node.attr("transB", 0)

    def run(a, b, c=None):
        y = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c if beta == 1.0 else beta * c)
        return y

    return run


@register("MatMul")
def _matmul(node: Node):
    return torch.matmul


@register("Einsum")
def _einsum(node: Node):
    equation = node.attr("equation").replace(" ", "")
    return lambda *xs: torch.einsum(equation, *xs)


# ------------------------------------------------------------------ pooling


def _pool_geometry(window: _Window, spatial, ceil_mode):
    """Explicit pads plus the extra end padding that ceil_mode needs, per axis."""
    strides, dil, begins, ends = window.resolve(spatial, window.kernel)
    extra = []
    for n, k, s, d, b, e in zip(spatial, window.kernel, strides, dil, begins, ends):
        span = n + b + e - ((k - 1) * d + 1)
        out = span // s + 1
        if ceil_mode:
            out = -(-span // s) + 1
            if (out - 1) * s >= n + b:  # the last window must start inside the input or left pad
                out -= 1
        extra.append(max(0, (out - 1) * s + (k - 1) * d + 1 - (n + b + e)))
    return strides, dil, begins, ends, extra


@register("MaxPool")
def _max_pool(node: Node):
    window = _Window(node)
    ceil_mode = node.attr("ceil_mode", 0)
    if node.needs_output(1):
        raise node.unsupported("the Indices output")
    if node.attr("storage_order", 0):
        raise node.unsupported("storage_order=1")

    def run(x):
        strides, dil, begins, ends, extra = _pool_geometry(window, list(x.shape[2:]), ceil_mode)
        dtype = x.dtype
        if not x.is_floating_point():  # torch pools floats only; int8/uint8 values are exact in float
            x = x.float()
        if any(begins) or any(ends) or any(extra):
            x = F.pad(x, _torch_pad(begins, [e + x_ for e, x_ in zip(ends, extra)]), value=float("-inf"))
        y = _MAX_POOL[len(strides)](x, window.kernel, strides, 0, dil)
        return y.to(dtype)

    return run


@register("AveragePool")
def _avg_pool(node: Node):
    window = _Window(node)
    ceil_mode = node.attr("ceil_mode", 0)
    count_pads = node.attr("count_include_pad", 0)
    if any(d != 1 for d in window.dilations):
        raise node.unsupported("dilations other than 1")

    def run(x):
        strides, _, begins, ends, extra = _pool_geometry(window, list(x.shape[2:]), ceil_mode)
        pool = _AVG_POOL[len(strides)]
        if not (any(begins) or any(ends) or any(extra)):
            return pool(x, window.kernel, strides)
        # Sum over the window, divided by the number of elements that count: the input, plus
        # the explicit pads when count_include_pad; never the ceil_mode overhang.
        size = math.prod(window.kernel)
        pad_all = _torch_pad(begins, [e + x_ for e, x_ in zip(ends, extra)])
        total = pool(F.pad(x, pad_all), window.kernel, strides) * size
        ones = torch.ones([1, 1] + list(x.shape[2:]), dtype=x.dtype, device=x.device)
        if count_pads:
            ones = F.pad(ones, _torch_pad(begins, ends), value=1.0)
            mask = F.pad(ones, _torch_pad([0] * len(extra), extra))
        else:
            mask = F.pad(ones, pad_all)
        count = pool(mask, window.kernel, strides) * size
        return total / count

    return run


@register("GlobalAveragePool")
def _global_avg_pool(node: Node):
    return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def _global_max_pool(node: Node):
    return lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ------------------------------------------------------------------ normalisation


@register("BatchNormalization")
def _batch_norm(node: Node):
    if node.attr("training_mode", 0) or node.needs_output(1):
        raise node.unsupported("training mode")
    if node.opset < 9 and node.attr("spatial", 1) == 0:
        raise node.unsupported("spatial=0")
    eps = node.attr("epsilon", 1e-5)

    def run(x, scale, bias, mean, var):
        shape = [1, -1] + [1] * (x.dim() - 2)
        factor = scale * torch.rsqrt(var + eps)
        return x * factor.reshape(shape) + (bias - mean * factor).reshape(shape)

    return run


@register("InstanceNormalization")
def _instance_norm(node: Node):
    eps = node.attr("epsilon", 1e-5)
    return lambda x, scale, bias: F.instance_norm(x, weight=scale, bias=bias, eps=eps)


@register("LayerNormalization")
def _layer_norm(node: Node):
    axis, eps = node.attr("axis", -1), node.attr("epsilon", 1e-5)

    def run(x, scale, bias=None):
        dims = tuple(range(norm_axis(axis, x.dim()), x.dim()))
        dtype = x.dtype
        xf = x.float()
        mean = xf.mean(dims, keepdim=True)
        inv_std = torch.rsqrt((xf - mean).pow(2).mean(dims, keepdim=True) + eps)
        y = ((xf - mean) * inv_std).to(dtype) * scale
        if bias is not None:
            y = y + bias
        return y, mean, inv_std

    return run


@register("RMSNormalization")
def _rms_norm(node: Node):
    # onnxsim fuses ReduceMean(x^2)/Sqrt/Div patterns into this op at opset >= 23.
    axis, eps = node.attr("axis", -1), node.attr("epsilon", 1e-5)

    def run(x, scale):
        dims = tuple(range(norm_axis(axis, x.dim()), x.dim()))
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
        return y.to(x.dtype) * scale

    return run


@register("GroupNormalization")
def _group_norm(node: Node):
    eps, groups = node.attr("epsilon", 1e-5), node.attr("num_groups")

    def run(x, scale, bias):
        channels = x.shape[1]
        if node.opset < 21 and scale.numel() == groups:  # opset 18: one scale per group
            scale = scale.repeat_interleave(channels // groups)
            bias = bias.repeat_interleave(channels // groups)
        return F.group_norm(x, groups, scale, bias, eps)

    return run


@register("LpNormalization")
def _lp_norm(node: Node):
    axis, p = node.attr("axis", -1), node.attr("p", 2)
    def run(x):
        norm = torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)
        return torch.where(norm == 0, torch.zeros_like(x), x / norm)  # zero vectors stay zero

    return run


# ------------------------------------------------------------------ softmax family


def _softmax_like(node: Node, fn):
    if node.opset < 13:  # old semantics: flatten to 2-D at `axis`, normalise the second dim
        axis = node.attr("axis", 1)

        def run(x):
            a = norm_axis(axis, x.dim())
            rows = math.prod(x.shape[:a])
            return fn(x.reshape(rows, -1), 1).reshape(x.shape)

        return run
    axis = node.attr("axis", -1)
    return lambda x: fn(x, axis)


def _hardmax(x, dim):
    return F.one_hot(x.argmax(dim), x.shape[dim]).movedim(-1, dim).to(x.dtype)


@register("Softmax")
def _softmax(node: Node):
    return _softmax_like(node, lambda x, d: torch.softmax(x, d))


@register("LogSoftmax")
def _log_softmax(node: Node):
    return _softmax_like(node, lambda x, d: torch.log_softmax(x, d))


@register("Hardmax")
def _hardmax_op(node: Node):
    return _softmax_like(node, _hardmax)


# ------------------------------------------------------------------ reductions


def _reduce_max_min(fn, largest: bool):
    def reduce(x, dims, keepdim):
        if any(x.shape[d] == 0 for d in dims):  # torch refuses; ONNX yields the identity
            shape = [1 if d in dims else n for d, n in enumerate(x.shape)]
            if x.dtype == torch.bool:
                empty_value = not largest
            elif x.is_floating_point():
                empty_value = float("-inf") if largest else float("inf")
            else:
                empty_value = torch.iinfo(x.dtype).min if largest else torch.iinfo(x.dtype).max
            out = torch.full(shape, empty_value, dtype=x.dtype, device=x.device)
            return out if keepdim else out.reshape([n for d, n in enumerate(x.shape) if d not in dims])
        return fn(x, dims, keepdim)

    return reduce


def _prod(x, dims, keepdim):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keepdim)
    return x


def _mean(x, dims, keepdim):
    if x.is_floating_point():
        return torch.mean(x, dims, keepdim)
    count = math.prod(x.shape[d] for d in dims)
    return torch.div(torch.sum(x, dims, keepdim), count, rounding_mode="trunc").to(x.dtype)


_REDUCE = {
    "ReduceSum": lambda x, d, k: torch.sum(x, d, k, dtype=x.dtype),
    "ReduceMean": _mean,
    "ReduceMax": _reduce_max_min(torch.amax, largest=True),
    "ReduceMin": _reduce_max_min(torch.amin, largest=False),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: torch.sum(x.abs(), d, k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, d, k),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, d, k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, k),
}


def _reduce_converter(fn):
    def convert(node: Node):
        keepdims = bool(node.attr("keepdims", 1))
        noop_empty = node.attr("noop_with_empty_axes", 0)
        attr_axes = node.attr("axes")

        def run(x, axes=None):
            axes_list = ints(attr_axes) if attr_axes is not None else ints(axes)
            if not axes_list and noop_empty:
                return x
            dims = [norm_axis(a, x.dim()) for a in axes_list] or list(range(x.dim()))
            if not dims:  # rank-0 input: nothing to reduce
                return x
            return fn(x, dims, keepdims)

        return run

    return convert


for _op, _fn in _REDUCE.items():
    register(_op)(_reduce_converter(_fn))


def _arg_converter(largest: bool):
    def convert(node: Node):
        axis, keepdims = node.attr("axis", 0), bool(node.attr("keepdims", 1))
        last = node.attr("select_last_index", 0)
        pick = torch.argmax if largest else torch.argmin

        def run(x):
            a = norm_axis(axis, x.dim())
            if last:  # torch returns the first extreme; flip to find the last one
                idx = x.shape[a] - 1 - pick(x.flip(a), a, keepdim=keepdims)
            else:
                idx = pick(x, a, keepdim=keepdims)
            return idx.to(torch.int64)

        return run

    return convert


register("ArgMax")(_arg_converter(True))
register("ArgMin")(_arg_converter(False))


@register("TopK")
def _topk(node: Node):
    axis, largest = node.attr("axis", -1), bool(node.attr("largest", 1))
    attr_k = node.attr("k")

    def run(x, k=None):
        count = int(attr_k) if node.opset < 10 else ints(k)[0]
        # A stable sort keeps equal values in index order, as the spec asks.
        values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
        return values.narrow(axis, 0, count), indices.narrow(axis, 0, count)

    return run
