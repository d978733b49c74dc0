"""Shape and layout ops: Concat, Split, Slice, Reshape, Transpose, Pad, Constant...

Shape operands (Reshape's shape, Slice's starts...) are read with `ints`, so they may be
initializers or computed tensors. Gather/Scatter-like ops live in `indexing.py`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .registry import Node, as_tensor, ints, norm_axis, register, torch_dtype

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1


def const_tensor(array: np.ndarray, node: Node) -> torch.Tensor:
    """A tensor attribute as torch; bfloat16 comes from numpy as ml_dtypes, which torch cannot read."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.array(array).view(np.uint16).copy()).view(torch.bfloat16)
    if array.dtype == object or array.dtype.kind in "SUcV" or array.dtype.name.startswith(("float8", "int4", "uint4", "float4", "int2", "uint2")):
        raise node.unsupported(f"constant of type {array.dtype}")
    return as_tensor(array)


def _split_sizes(dim: int, n: int, ceil: bool) -> list[int]:
    """Equal split; opset 18's num_outputs lets the last chunk be smaller."""
    if ceil:
        size = -(-dim // n)
        return [min(size, max(dim - i * size, 0)) for i in range(n)]
    if dim % n:
        raise ValueError(f"cannot split dimension {dim} into {n} equal parts")
    return [dim // n] * n


# ---------------------------------------------------------------- joining and splitting


@register("Concat")
def concat(node: Node):
    axis = node.attr("axis", 1 if node.opset < 4 else None)
    if axis is None:
        raise node.unsupported("missing axis attribute")
    return lambda *xs: torch.cat([x for x in xs if x is not None], dim=norm_axis(axis, xs[0].dim()))


@register("Split")
def split(node: Node):
    axis = node.attr("axis", 0)
    n_out = len(node.outputs)
    attr_split = node.attr("split")
    num_outputs = node.attr("num_outputs")
    if node.opset >= 18 and attr_split is None and len(node.inputs) < 2 and num_outputs is None:
        raise node.unsupported("neither split input nor num_outputs given")
    if num_outputs is not None and num_outputs != n_out:
        raise node.unsupported(f"num_outputs={num_outputs} but {n_out} outputs")

    def fn(x, split_t=None):
        dim = norm_axis(axis, x.dim())
        sizes = ints(split_t) if split_t is not None else (list(attr_split) if attr_split else None)
        if not sizes:
            sizes = _split_sizes(x.shape[dim], n_out, ceil=node.opset >= 18)
        return tuple(torch.split(x, sizes, dim=dim))

    return fn


@register("Slice")
def slice_(node: Node):
    if node.opset < 10:
        starts_a, ends_a, axes_a = node.attr("starts"), node.attr("ends"), node.attr("axes")
        if starts_a is None or ends_a is None:
            raise node.unsupported("missing starts/ends attributes")
        return lambda x: _slice(x, list(starts_a), list(ends_a), axes_a and list(axes_a), None)
    return lambda x, starts, ends, axes=None, steps=None: _slice(
        x, ints(starts), ints(ends), ints(axes) if axes is not None else None,
        ints(steps) if steps is not None else None)


def _slice(x, starts, ends, axes, steps):
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = norm_axis(axis, x.dim())
        dim = x.shape[axis]
        if step == 0:
            raise ValueError("Slice step cannot be 0")
        # Clamping rules of the ONNX spec: negative values count from the end, then
        # [0, dim] for positive steps and [0, dim-1] / [-1, dim-1] for negative ones.
        if end in (INT32_MAX, INT64_MAX):  # "to the end" in the slicing direction (onnxruntime)
            end = dim if step > 0 else -1
        elif end < 0:
            end += dim
        start = start + dim if start < 0 else start
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index = [slice(None)] * axis + [slice(start, end, step)]
            x = x[tuple(index)]
        else:  # torch has no negative-step views: gather the indices explicitly
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            count = max(0, -(-(end - start) // step))  # ceil((end - start) / step)
            idx = start + step * torch.arange(count, device=x.device)
            x = torch.index_select(x, axis, idx)
    return x


# ---------------------------------------------------------------- reshaping


@register("Reshape")
def reshape(node: Node):
    allowzero = node.attr("allowzero", 0)
    attr_shape = node.attr("shape")
    if node.opset < 5 and attr_shape is None:
        raise node.unsupported("missing shape attribute")

    def fn(x, shape_t=None):
        shape = ints(shape_t) if shape_t is not None else list(attr_shape)
        if not allowzero:  # 0 copies the input dimension at the same position
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)

    return fn


@register("Flatten")
def flatten(node: Node):
    axis = node.attr("axis", 1)

    def fn(x):
        a = norm_axis(axis, x.dim())
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return fn


@register("Transpose")
def transpose(node: Node):
    perm = node.attr("perm")
    return lambda x: x.permute(list(perm) if perm is not None else list(range(x.dim() - 1, -1, -1)))


@register("Squeeze")
def squeeze(node: Node):
    attr_axes = node.attr("axes")

    def fn(x, axes_t=None):
        axes = ints(axes_t) if axes_t is not None else attr_axes
        if axes is None:  # all dimensions of size 1
            return x.reshape([d for d in x.shape if d != 1])
        axes = {norm_axis(a, x.dim()) for a in axes}
        if any(x.shape[a] != 1 for a in axes):
            raise ValueError(f"cannot squeeze axes {sorted(axes)} of shape {tuple(x.shape)}")
        return x.reshape([d for i, d in enumerate(x.shape) if i not in axes])

    return fn


@register("Unsqueeze")
def unsqueeze(node: Node):
    attr_axes = node.attr("axes")
    if node.opset < 13 and attr_axes is None:
        raise node.unsupported("missing axes attribute")

    def fn(x, axes_t=None):
        axes = ints(axes_t) if axes_t is not None else list(attr_axes)
        rank = x.dim() + len(axes)
        axes = {norm_axis(a, rank) for a in axes}  # negative axes count in the output rank
        dims = iter(x.shape)
        return x.reshape([1 if i in axes else next(dims) for i in range(rank)])

    return fn


@register("Shape")
def shape(node: Node):
    start, end = node.attr("start", 0), node.attr("end")

    def fn(x):
        dims = list(x.shape)
        s = min(max(start + len(dims) if start < 0 else start, 0), len(dims))
        e = len(dims) if end is None else min(max(end + len(dims) if end < 0 else end, 0), len(dims))
        return torch.tensor(dims[s:e], dtype=torch.int64, device=x.device)

    return fn


@register("Size")
def size(node: Node):
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@register("Expand")
def expand(node: Node):
    # Bidirectional (numpy) broadcast: the shape operand may also have 1s where x does not.
    return lambda x, shape_t: x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(ints(shape_t))))


@register("Tile")
def tile(node: Node):
    if node.opset < 6:  # Tile-1: inputs (x, tiles, axis), repeat one axis
        def fn1(x, tiles, axis):
            reps = [1] * x.dim()
            reps[norm_axis(ints(axis)[0], x.dim())] = ints(tiles)[0]
            return x.repeat(reps)
        return fn1
    return lambda x, repeats: x.repeat(ints(repeats)) if x.dim() else x.clone()


@register("DepthToSpace")
def depth_to_space(node: Node):
    b, mode = node.attr("blocksize"), node.attr("mode", "DCR")
    if b is None or mode not in ("DCR", "CRD"):
        raise node.unsupported(f"blocksize={b}, mode={mode}")

    def fn(x):
        n, c, h, w = x.shape
        if mode == "DCR":
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // (b * b), h * b, w * b)

    return fn


@register("SpaceToDepth")
def space_to_depth(node: Node):
    b, mode = node.attr("blocksize"), node.attr("mode", "DCR")  # mode: opset 25
    if b is None or mode not in ("DCR", "CRD"):
        raise node.unsupported(f"blocksize={b}, mode={mode}")
    perm = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)

    def fn(x):
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b).permute(perm)
        return y.reshape(n, c * b * b, h // b, w // b)

    return fn


# ---------------------------------------------------------------- producing tensors


@register("Constant")
def constant(node: Node):
    attrs = node.attrs
    if "value" in attrs:
        value = const_tensor(attrs["value"], node)
    elif "value_float" in attrs:
        value = torch.tensor(attrs["value_float"], dtype=torch.float32)
    elif "value_floats" in attrs:
        value = torch.tensor(list(attrs["value_floats"]), dtype=torch.float32)
    elif "value_int" in attrs:
        value = torch.tensor(attrs["value_int"], dtype=torch.int64)
    elif "value_ints" in attrs:
        value = torch.tensor(list(attrs["value_ints"]), dtype=torch.int64)
    else:  # sparse_value, value_string(s)
        raise node.unsupported(f"constant given as {', '.join(attrs) or 'nothing'}")
    return lambda: value


@register("ConstantOfShape")
def constant_of_shape(node: Node):
    value = node.attr("value")
    fill = const_tensor(value, node).reshape(()) if value is not None else torch.tensor(0.0)

    def fn(shape_t):
        return fill.to(shape_t.device).expand(ints(shape_t)).clone()

    return fn


@register("Range")
def range_(node: Node):
    def fn(start, limit, delta):
        s, l, d = start.item(), limit.item(), delta.item()
        n = max(math.ceil((l - s) / d), 0)  # the count is computed in double, as onnxruntime does
        if start.dtype not in (torch.float32, torch.float64):  # onnxruntime: no 16-bit floats
            return torch.arange(n, dtype=start.dtype, device=start.device) * delta + start
        # onnxruntime accumulates (v += delta) in the tensor's type: float error grows along
        # the range, so mirror the running sum (numpy's cumsum is sequential in float32).
        steps = np.full(n, delta.cpu().numpy(), dtype=delta.cpu().numpy().dtype)
        if n:
            steps[0] = start.cpu().numpy()
        return torch.from_numpy(np.cumsum(steps, dtype=steps.dtype)).to(start.device)

    return fn


@register("EyeLike")
def eye_like(node: Node):
    k = node.attr("k", 0)
    dtype = torch_dtype(node.attr("dtype"), node) if node.attr("dtype") is not None else None

    def fn(x):
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        cols = torch.arange(x.shape[1], device=x.device)[None, :]
        return (cols - rows == k).to(dtype or x.dtype)

    return fn


@register("Identity")
def identity(node: Node):
    return lambda x: x


@register("Dropout")
def dropout(node: Node):
    # Before opset 7 `is_test` chose the mode; inference runtimes ignore it (they drop the
    # node), so it is treated as inference here too.
    ratio_attr = node.attr("ratio", 0.5)

    def fn(x, ratio=None, training_mode=None):
        if training_mode is not None and bool(training_mode.item()):
            # Random masks cannot be mirrored; with ratio 0 nothing is dropped.
            r = float(ratio.item()) if ratio is not None else ratio_attr
            if r != 0.0:
                raise node.unsupported("training_mode=True with a non-zero ratio")
        if not node.needs_output(1):
            return x
        # onnxruntime's inference mask: all True from opset 12, all zeros (False) before.
        fill = torch.ones if node.opset >= 12 else torch.zeros
        return x, fill(x.shape, dtype=torch.bool if node.opset >= 10 else x.dtype, device=x.device)

    return fn


# ---------------------------------------------------------------- Pad


_PAD_MODES = ("constant", "reflect", "edge", "wrap")


@register("Pad")
def pad(node: Node):
    mode = node.attr("mode", "constant")
    if mode not in _PAD_MODES or (mode == "wrap" and node.opset < 19):
        raise node.unsupported(f"mode={mode}")
    if node.opset < 11:
        pads_attr = node.attr("pads", node.attr("paddings"))
        if pads_attr is None:
            raise node.unsupported("missing pads attribute")
        value = float(node.attr("value", 0.0))
        return lambda x: _pad(x, list(pads_attr), None, mode, value)

    def fn(x, pads, constant_value=None, axes=None):
        value = constant_value.reshape(()) if constant_value is not None and constant_value.numel() else 0
        return _pad(x, ints(pads), ints(axes) if axes is not None else None, mode, value)

    return fn


def _pad(x, pads, axes, mode, value):
    rank = x.dim()
    axes = [norm_axis(a, rank) for a in axes] if axes is not None else list(range(rank))
    if len(pads) != 2 * len(axes):
        raise ValueError(f"pads has {len(pads)} values for {len(axes)} axes")
    out_shape = list(x.shape)
    for i, axis in enumerate(axes):
        out_shape[axis] += pads[i] + pads[i + len(axes)]
    if min(out_shape, default=1) <= 0 or x.numel() == 0:  # nothing to read: onnxruntime short-cuts
        if min(out_shape, default=1) > 0 and mode != "constant":
            raise ValueError(f"Pad {mode}: empty input")
        return _fill(value, [max(d, 0) for d in out_shape], x.dtype, x.device)
    out = x
    for i, axis in enumerate(axes):
        begin, end = pads[i], pads[i + len(axes)]
        # Negative pads crop first (onnxruntime: wrap/reflect then see the cropped axis); a
        # crop larger than the axis eats into the other side's padding.
        if begin < 0 or end < 0:
            crop_b, crop_e = max(-begin, 0), max(-end, 0)
            n = out.shape[axis]
            if crop_b + crop_e > n:
                if mode != "constant":
                    raise ValueError(f"Pad {mode}: pads crop the whole axis {axis}")
                shape = list(out.shape)
                shape[axis] = max(n + begin + end, 0)
                out = _fill(value, shape, out.dtype, x.device)
                continue
            out = out.narrow(axis, crop_b, n - crop_b - crop_e)
            begin, end = max(begin, 0), max(end, 0)
        if begin == 0 and end == 0:
            continue
        n = out.shape[axis]
        idx = torch.arange(-begin, n + end, device=x.device)  # source index of each output position
        if n == 0:
            if mode != "constant":
                raise ValueError(f"Pad {mode}: empty axis {axis}")
            shape = list(out.shape)
            shape[axis] = idx.numel()
            out = _fill(value, shape, out.dtype, x.device)
            continue
        if mode == "constant":
            inside = (idx >= 0) & (idx < n)
            src = idx.clamp(0, n - 1)
        elif mode == "edge":
            src = idx.clamp(0, n - 1)
        elif mode == "wrap":
            src = idx.remainder(n)
        else:  # reflect (mirror without repeating the edge), period 2(n-1)
            period = max(2 * (n - 1), 1)
            m = idx.remainder(period)
            src = torch.where(m < n, m, period - m)
        picked = torch.index_select(out, axis, src)
        if mode == "constant":
            view = [1] * rank
            view[axis] = -1
            picked = torch.where(inside.reshape(view), picked, _fill(value, (), out.dtype, x.device))
        out = picked
    return out


def _fill(value, shape, dtype, device) -> torch.Tensor:
    v = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return v.to(device=device, dtype=dtype).expand(shape).clone()

