"""Index-driven ops: Gather*, Scatter*, NonZero, OneHot, CumSum, Trilu.

ONNX indices may be negative (counted from the end of the axis); torch's are not, so
every converter normalizes them first with `_wrap`.
"""
from __future__ import annotations

import math

import torch

from .registry import Node, ints, norm_axis, register

_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


# torch lacks most kernels for uint16/32/64; data movement is exact on a same-width signed view.
_SIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def _signed(t: torch.Tensor) -> torch.Tensor:
    return t.view(_SIGNED[t.dtype]) if t.dtype in _SIGNED else t


def _restore(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.view(dtype) if dtype in _SIGNED else t


def _order_key(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Flip the sign bit of unsigned data viewed as signed: keeps max/min order (an involution)."""
    return t ^ torch.iinfo(t.dtype).min if dtype in _SIGNED else t


def _wrap(idx: torch.Tensor, dim: int | torch.Tensor) -> torch.Tensor:
    idx = idx.long()
    return torch.where(idx < 0, idx + dim, idx)


def _reduction(node: Node) -> str:
    reduction = node.attr("reduction", "none")
    allowed = ("none",) if node.opset < 16 else ("none", "add", "mul") if node.opset < 18 else ("none", *_REDUCE)
    if reduction not in allowed:
        raise node.unsupported(f"reduction={reduction}")
    return reduction


def _flat_index(indices: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Row-major linear index of the last-axis coordinate tuples of `indices` into `dims`."""
    lin = torch.zeros(indices.shape[:-1], dtype=torch.long, device=indices.device)
    for j, d in enumerate(dims):
        lin = lin * d + _wrap(indices[..., j], d)
    return lin


@register("Gather")
def gather(node: Node):
    axis = node.attr("axis", 0)

    def fn(x, indices):
        a = norm_axis(axis, x.dim())
        flat = torch.index_select(x, a, _wrap(indices, x.shape[a]).reshape(-1))
        return flat.reshape(x.shape[:a] + indices.shape + x.shape[a + 1:])

    return fn


@register("GatherElements")
def gather_elements(node: Node):
    axis = node.attr("axis", 0)

    def fn(x, indices):
        a = norm_axis(axis, x.dim())
        return _restore(torch.gather(_signed(x), a, _wrap(indices, x.shape[a])), x.dtype)

    return fn


@register("GatherND")
def gather_nd(node: Node):
    b = node.attr("batch_dims", 0)

    def fn(x, indices):
        k = indices.shape[-1]
        batch = x.shape[:b]
        nb = math.prod(batch)
        # (batch, linearized indexed dims, rest) <- (batch, positions) linear indices
        data = x.reshape((nb, math.prod(x.shape[b:b + k])) + x.shape[b + k:])
        lin = _flat_index(indices.reshape(nb, -1, k), tuple(x.shape[b:b + k]))
        out = data[torch.arange(nb, device=x.device)[:, None], lin]
        return out.reshape(indices.shape[:-1] + x.shape[b + k:])

    return fn


@register("ScatterND")
def scatter_nd(node: Node):
    reduction = _reduction(node)

    def fn(x, indices, updates):
        k = indices.shape[-1]
        rest = x.shape[k:]
        key = reduction in ("max", "min")  # unsigned data compares through an order key
        prep = (lambda t: _order_key(_signed(t), x.dtype)) if key else _signed
        out = prep(x).clone().reshape((math.prod(x.shape[:k]),) + rest)
        upd = prep(updates.to(x.dtype)).reshape((-1,) + rest)
        lin = _flat_index(indices, tuple(x.shape[:k])).reshape(-1)
        if reduction == "none":
            out[lin] = upd
        else:  # add/mul wrap identically on the signed view
            index = lin.reshape((-1,) + (1,) * len(rest)).expand(upd.shape)
            out.scatter_reduce_(0, index, upd, _REDUCE[reduction], include_self=True)
        return _restore((_order_key(out, x.dtype) if key else out).reshape(x.shape), x.dtype)

    return fn


@register("ScatterElements", "Scatter")
def scatter_elements(node: Node):
    axis = node.attr("axis", 0)
    reduction = _reduction(node)

    def fn(x, indices, updates):
        a = norm_axis(axis, x.dim())
        idx = _wrap(indices, x.shape[a])
        key = reduction in ("max", "min")  # unsigned data compares through an order key
        prep = (lambda t: _order_key(_signed(t), x.dtype)) if key else _signed
        data, upd = prep(x), prep(updates.to(x.dtype))
        if reduction == "none":
            return _restore(data.scatter(a, idx, upd), x.dtype)
        out = data.scatter_reduce(a, idx, upd, _REDUCE[reduction], include_self=True)
        return _restore(_order_key(out, x.dtype) if key else out, x.dtype)

    return fn


@register("NonZero")
def nonzero(node: Node):
    # A 0-d input is treated as shape (1,), as onnxruntime does.
    return lambda x: torch.nonzero(_signed(x).reshape(1) if x.dim() == 0 else _signed(x)).t().contiguous()


@register("OneHot")
def one_hot(node: Node):
    axis = node.attr("axis", -1)

    def fn(indices, depth, values):
        d = int(depth.reshape(-1)[0].item())  # depth may be a float tensor
        a = norm_axis(axis, indices.dim() + 1)
        # Indices in [-depth, depth) select a class (negatives wrap); others select none.
        idx = indices.long() if not indices.is_floating_point() else indices.trunc().long()
        idx = _wrap(idx, d).unsqueeze(a)
        view = [1] * (indices.dim() + 1)
        view[a] = d
        hot = idx == torch.arange(d, device=indices.device).reshape(view)
        vals = values.reshape(-1)
        return torch.where(hot, vals[1], vals[0])

    return fn


@register("CumSum")
def cumsum(node: Node):
    exclusive, reverse = node.attr("exclusive", 0), node.attr("reverse", 0)

    def fn(x, axis_t):
        a = norm_axis(ints(axis_t)[0], x.dim())
        if x.shape[a] == 0:
            return x.clone()
        y = x.flip(a) if reverse else x
        if exclusive:  # shift by one along the axis, a zero entering first
            zero = torch.zeros_like(y.narrow(a, 0, 1))
            y = torch.cat([zero, y.narrow(a, 0, y.shape[a] - 1)], dim=a)
        y = torch.cumsum(y, dim=a).to(x.dtype)  # torch promotes ints to int64
        return y.flip(a) if reverse else y

    return fn


@register("Trilu")
def trilu(node: Node):
    upper = node.attr("upper", 1)

    def fn(x, k=None):
        kk = ints(k)[0] if k is not None else 0
        if x.numel() == 0:
            return x.clone()
        return _restore(torch.triu(_signed(x), kk) if upper else torch.tril(_signed(x), kk), x.dtype)

    return fn
