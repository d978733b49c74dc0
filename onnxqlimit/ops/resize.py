"""Resize and Upsample, computed separably per axis with explicit indices and weights.

F.interpolate is not used: its coordinate conventions cover only some of ONNX's modes,
and nearest-mode ties must resolve exactly as onnxruntime resolves them. So the source
coordinate of every output position is computed here in float32, operation by operation
in onnxruntime's order (upsamplebase.h), on the small per-axis coordinate vectors; the
tensor itself only sees index_select and weighted sums.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from .registry import Node, ints, norm_axis, register

f32 = np.float32
_TRANSFORMS = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners",
               "asymmetric", "tf_crop_and_resize", "tf_half_pixel_for_nn")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
_POLICIES = ("stretch", "not_larger", "not_smaller")


def _source_coords(ctm: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float]) -> np.ndarray:
    """Input coordinate of each output position, in float32 as onnxruntime computes it."""
    x = np.arange(out_len, dtype=f32)
    s, r, n = f32(scale), f32(out_len), f32(in_len)
    if ctm == "asymmetric":
        return x / s
    if ctm == "tf_half_pixel_for_nn":
        return (x + f32(0.5)) / s
    if ctm == "pytorch_half_pixel":
        return (x + f32(0.5)) / s - f32(0.5) if out_len > 1 else np.zeros_like(x)
    if ctm == "align_corners":
        return x * (n - f32(1)) / (r - f32(1)) if out_len > 1 else np.zeros_like(x)
    if ctm == "half_pixel_symmetric":
        adjustment = r / (s * n)
        offset = (n / f32(2)) * (f32(1) - adjustment)
        # onnxruntime does this last step in double (its 0.5 literals are doubles)
        return (np.float64(offset) + (x.astype(np.float64) + 0.5) / np.float64(s) - 0.5).astype(f32)
    if ctm == "tf_crop_and_resize":
        start, end = f32(roi[0]), f32(roi[1])
        if out_len > 1:
            return start * (n - f32(1)) + (x * (end - start) * (n - f32(1))) / (r - f32(1))
        return np.full_like(x, f32(0.5 * np.float64(start + end) * np.float64(n - f32(1))))
    return (x + f32(0.5)) / s - f32(0.5)  # half_pixel


def _round_half_away(v: np.ndarray) -> np.ndarray:  # std::round; exact in float64 for float32 inputs
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _nearest_index(coords: np.ndarray, mode: str, downsampling: bool, in_len: int) -> np.ndarray:
    v = coords.astype(np.float64)
    if mode == "simple":  # Resize-10 / Upsample: truncate when upsampling, ceil when downsampling
        idx = np.ceil(v) if downsampling else np.trunc(v)
    elif mode in ("round_prefer_floor", "round_prefer_ceil"):
        # onnxruntime (>= 1.2x) takes any coordinate within 1e-6 of .5 as a tie, so that
        # float error in the coordinate does not decide it (v - floor(v) is exact here).
        tie = np.abs(v - np.floor(v) - 0.5) <= 1e-6
        idx = np.where(tie, np.floor(v) if mode == "round_prefer_floor" else np.ceil(v), _round_half_away(v))
    elif mode == "floor":
        idx = np.floor(v)
    else:
        idx = np.ceil(v)
    return np.clip(idx, 0, in_len - 1).astype(np.int64)


def _cubic_coeffs(s: np.ndarray, a: float) -> list[np.ndarray]:
    a, one, two = f32(a), f32(1), f32(2)
    s = np.abs(s)
    return [
        ((a * (s + one) - f32(5) * a) * (s + one) + f32(8) * a) * (s + one) - f32(4) * a,
        ((a + two) * s - (a + f32(3))) * s * s + one,
        ((a + two) * (one - s) - (a + f32(3))) * (one - s) * (one - s) + one,
        ((a * (two - s) - f32(5) * a) * (two - s) + f32(8) * a) * (two - s) - f32(4) * a,
    ]


def _axis_taps(coords: np.ndarray, mode: str, in_len: int, cfg: dict, downsampling: bool):
    """(index array, weight array) pairs whose weighted sum gives the resized axis."""
    if mode == "nearest":
        return [(_nearest_index(coords, cfg["nearest_mode"], downsampling, in_len), None)]
    if mode == "linear":
        v = np.clip(coords, f32(0), f32(in_len - 1))
        i1 = np.minimum(v.astype(np.int64), in_len - 1)
        i2 = np.minimum(i1 + 1, in_len - 1)
        d1, d2 = np.abs(v - i1.astype(f32)), np.abs(v - i2.astype(f32))
        same = i1 == i2
        d1, d2 = np.where(same, f32(0.5), d1), np.where(same, f32(0.5), d2)
        return [(i1, d2), (i2, d1)]
    # cubic: four taps around floor(x), clamped to the edge, or dropped with exclude_outside
    base = np.floor(coords)
    coeffs = _cubic_coeffs(coords - base, cfg["cubic_coeff_a"])
    base = base.astype(np.int64)
    taps = [base - 1 + i for i in range(4)]
    if cfg["exclude_outside"]:
        coeffs = [np.where((t < 0) | (t >= in_len), f32(0), c) for t, c in zip(taps, coeffs)]
        total = coeffs[0] + coeffs[1] + coeffs[2] + coeffs[3]
        coeffs = [c / total for c in coeffs]
    return [(np.clip(t, 0, in_len - 1), c) for t, c in zip(taps, coeffs)]


def _ort_linear_axes(rank: int, scales: list[float]) -> list[int] | None:
    """The axes onnxruntime's bilinear/trilinear kernels interpolate (None: layout it rejects)."""
    if rank in (2, 3):
        return list(range(rank))
    if rank == 4 and scales[0] == 1 and scales[1] == 1:
        return [2, 3]
    if rank == 4 and scales[0] == 1 and scales[3] == 1:
        return [1, 2]
    if rank == 5 and scales[0] == 1 and scales[1] == 1:
        return [2, 3, 4]
    return None


def _aa_filter(v: np.ndarray, mode: str, a: float) -> np.ndarray:
    v = np.abs(v)
    if mode == "linear":
        return np.where(v < 1, f32(1) - v, f32(0)).astype(f32)
    a = f32(a)
    near = ((a + f32(2)) * v - (a + f32(3))) * v * v + f32(1)
    far = (((v - f32(5)) * v + f32(8)) * v - f32(4)) * a
    return np.where(v < 1, near, np.where(v < 2, far, f32(0))).astype(f32)


def _aa_taps(centers: np.ndarray, in_len: int, scale: float, cfg: dict):
    """Antialiased (Pillow-style) window weights, as onnxruntime's upsample_aa computes them."""
    support_size = f32(2 if cfg["mode"] == "linear" else 4)
    s = f32(1) / f32(scale)  # > 1 when downsampling: the filter widens by s
    support = support_size * f32(0.5) * s if s >= 1 else support_size * f32(0.5)
    inv = f32(1) / s if s >= 1 else f32(1)
    window = int(np.ceil(support)) * 2 + 1
    lo_real = np.floor((centers - support).astype(np.float64) + 0.5).astype(np.int64)
    hi_real = np.floor((centers + support).astype(np.float64) + 0.5).astype(np.int64)
    lo_cut, hi_cut = np.maximum(lo_real, 0), np.minimum(hi_real, in_len)
    exclude = bool(cfg["exclude_outside"])
    lo, hi = (lo_cut, hi_cut) if exclude else (lo_real, hi_real)
    j = np.arange(window)
    valid = j[None, :] < (hi - lo)[:, None]
    w = _aa_filter(((lo[:, None] + j[None, :]).astype(f32) - centers[:, None] + f32(0.5)) * inv,
                   cfg["mode"], cfg["cubic_coeff_a"])
    w = np.where(valid, w, f32(0))
    total = np.cumsum(w, axis=1, dtype=f32)[:, -1]  # sequential float32 sum, like the C++ loop
    if not exclude:  # fold the weights of taps outside the input onto the edge taps
        for i in range(len(centers)):  # per output position of one axis: a short loop
            neg, over = max(-lo[i], 0), max(hi[i] - in_len, 0)
            n = hi[i] - lo[i]
            for k in range(neg):
                w[i, neg] += w[i, k]
            for k in range(n - over, n):
                w[i, n - over - 1] += w[i, k]
            if neg or over:
                w[i, : hi_cut[i] - lo_cut[i]] = w[i, neg: neg + hi_cut[i] - lo_cut[i]].copy()
    norm = (total != 0) & (total != 1)
    w = np.where(norm[:, None], w / np.where(norm, total, f32(1))[:, None], w).astype(f32)
    used = j[None, :] < (hi_cut - lo_cut)[:, None]
    return [(np.clip(lo_cut + k, 0, in_len - 1), np.where(used[:, k], w[:, k], f32(0))) for k in range(window)]


def _resize(x: torch.Tensor, out_dims: list[int], scales: list[float], roi: list[tuple[float, float]],
            cfg: dict, node: Node):
    mode, ctm = cfg["mode"], cfg["ctm"]
    rank = x.dim()
    if list(x.shape) == list(out_dims):  # onnxruntime copies the input whatever scales and roi say
        return x
    integer = not x.is_floating_point()
    if cfg["antialias"] and x.dtype not in (torch.float32, torch.float64):
        raise node.unsupported(f"antialiased Resize of {x.dtype} (onnxruntime rounds integers its own way)")
    work_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    joint = None  # integer linear: onnxruntime's own term order, so truncation sees the same sums
    if mode == "linear" and integer:
        joint = _ort_linear_axes(rank, scales)
        if joint == [1, 2] and x.dtype in (torch.int8, torch.uint8):
            raise node.unsupported("8-bit NHWC linear Resize (onnxruntime uses fixed-point weights there)")
    y = x if mode == "nearest" else x.to(work_dtype)
    outside = None  # positions whose source lies outside the input (tf_crop_and_resize)
    plans = []
    for axis in reversed(range(rank)):  # innermost first, as onnxruntime's cubic kernel
        in_len, out_len, scale = x.shape[axis], out_dims[axis], scales[axis]
        # onnxruntime treats a scale of exactly 1 as the identity, whatever the transform
        # (except for rank-1 nearest, which always transforms).
        identity = f32(scale) == f32(1) and (mode != "nearest" or rank > 1)
        identity |= bool(cfg["antialias"]) and out_len == in_len  # its antialias kernel: by size
        if identity and not (joint and axis in joint):
            continue
        if identity:
            coords = np.arange(out_len, dtype=f32)
        else:
            coords = _source_coords(ctm, out_len, in_len, scale, roi[axis])
        if ctm == "tf_crop_and_resize":
            out_mask = (coords < 0) | (coords > f32(in_len - 1))
            if out_mask.any():
                m = torch.from_numpy(out_mask).to(x.device).reshape(_view(rank, axis, out_len))
                outside = m if outside is None else outside | m
        if cfg["antialias"]:  # the antialias kernel works on window centres, x + 0.5
            coords = f32(0.5) + coords
        taps = [(torch.from_numpy(i).to(x.device),
                 None if w is None else torch.from_numpy(w).to(x.device, work_dtype).reshape(_view(rank, axis, out_len)))
                for i, w in (_aa_taps(coords, in_len, scale, cfg) if cfg["antialias"]
                             else _axis_taps(coords, mode, in_len, cfg, f32(scale) < f32(1)))]
        plans.append((axis, taps))
    if joint:
        y = _joint_linear(y, plans)
    else:
        for axis, taps in plans:
            acc = None
            for idx, weight in taps:
                picked = torch.index_select(y, axis, idx)
                picked = picked if weight is None else picked * weight
                acc = picked if acc is None else acc + picked
            y = acc
    if outside is not None:
        fill = torch.tensor(cfg["extrapolation_value"], dtype=torch.float32).to(y.dtype).to(x.device)
        y = torch.where(outside.expand(y.shape), fill, y)
    return y.to(x.dtype) if y.dtype != x.dtype else y  # float -> int truncates, like static_cast


def _view(rank: int, axis: int, n: int) -> list[int]:
    view = [1] * rank
    view[axis] = n
    return view


def _joint_linear(y: torch.Tensor, plans) -> torch.Tensor:
    """sum over corners of (w_inner * ... * w_outer) * x_corner, in onnxruntime's order."""
    outer_first = plans[::-1]
    total = None
    for corner in itertools.product(*[taps for _, taps in outer_first]):
        picked, weight = y, None
        for (axis, _), (idx, w) in zip(outer_first, corner):
            picked = torch.index_select(picked, axis, idx)
        for (_, w) in reversed(corner):  # innermost weight first: dx * dy * dz
            weight = w if weight is None else weight * w
        term = weight * picked
        total = term if total is None else total + term
    return total


def _plan(x: torch.Tensor, scales_t, sizes_t, roi_t, axes, cfg):
    """Output dims, per-axis scales and rois, following onnxruntime's reading of the inputs."""
    rank = x.dim()
    raw_axes = list(axes) if axes else None
    axes = [norm_axis(a, rank) for a in axes] if axes else list(range(rank))
    in_dims = list(x.shape)
    out_dims, scales = list(in_dims), [1.0] * rank
    if sizes_t is not None and sizes_t.numel():
        for a, s in zip(axes, ints(sizes_t)):
            out_dims[a] = s
            scales[a] = float(f32(s) / f32(in_dims[a])) if in_dims[a] else 1.0
        policy = cfg["policy"]
        if policy != "stretch":  # one scale for all axes, sizes rounded from it
            # onnxruntime matches axes here without normalizing them: axes given as negative
            # numbers drop out (scale 1, size unchanged). Mirrored as is.
            kept = [a for a in raw_axes if a >= 0] if raw_axes else axes
            pick = min if policy == "not_larger" else max
            scale = pick((f32(scales[a]) for a in kept), default=f32(1))
            for a in range(rank):
                inside = a in kept
                scales[a] = float(scale) if inside else 1.0
                out_dims[a] = int(_round_half_away(np.float64(f32(scale) * f32(in_dims[a])))) if inside else in_dims[a]
    elif scales_t is not None and scales_t.numel():
        values = scales_t.reshape(-1).float().tolist()
        if len(values) != len(axes):
            raise ValueError(f"Resize: {len(values)} scales for {len(axes)} axes")
        for a, s in zip(axes, values):
            scales[a] = s
            out_dims[a] = int(f32(s) * f32(in_dims[a]))  # float32 product, truncated
    else:
        raise ValueError("Resize: one of scales or sizes must be given")
    roi = [(0.0, 1.0)] * rank
    if cfg["ctm"] == "tf_crop_and_resize" and roi_t is not None and roi_t.numel():
        values = roi_t.reshape(-1).float().tolist()
        n = len(values) // 2
        roi_axes = axes if n == len(axes) else list(range(rank))
        for i, a in enumerate(roi_axes):
            roi[a] = (values[i], values[n + i])
    return out_dims, scales, roi


def _config(node: Node, legacy: bool) -> dict:
    mode = node.attr("mode", "nearest")
    if legacy:  # Upsample and Resize-10: asymmetric coordinates, onnxruntime's "simple" rounding
        cfg = dict(mode=mode, ctm="asymmetric", nearest_mode="simple", policy="stretch",
                   cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, antialias=0)
        if mode not in ("nearest", "linear"):
            raise node.unsupported(f"mode={mode}")
        return cfg
    cfg = dict(
        mode=mode,
        ctm=node.attr("coordinate_transformation_mode", "half_pixel"),
        nearest_mode=node.attr("nearest_mode", "round_prefer_floor"),
        policy=node.attr("keep_aspect_ratio_policy", "stretch"),
        cubic_coeff_a=float(node.attr("cubic_coeff_a", -0.75)),
        exclude_outside=int(node.attr("exclude_outside", 0)),
        extrapolation_value=float(node.attr("extrapolation_value", 0.0)),
    )
    if mode not in ("nearest", "linear", "cubic"):
        raise node.unsupported(f"mode={mode}")
    if cfg["ctm"] not in _TRANSFORMS:
        raise node.unsupported(f"coordinate_transformation_mode={cfg['ctm']}")
    if cfg["nearest_mode"] not in _NEAREST:
        raise node.unsupported(f"nearest_mode={cfg['nearest_mode']}")
    if cfg["policy"] not in _POLICIES:
        raise node.unsupported(f"keep_aspect_ratio_policy={cfg['policy']}")
    cfg["antialias"] = int(node.attr("antialias", 0))
    if cfg["antialias"] and mode == "nearest":
        raise node.unsupported("antialias with mode=nearest")
    if cfg["antialias"] and cfg["ctm"] == "tf_crop_and_resize":
        # onnxruntime's antialias kernels place extrapolated values inconsistently (NHWC
        # layouts with several channels, axes kept at their size): not mirrored.
        raise node.unsupported("antialias with tf_crop_and_resize")
    return cfg


@register("Resize")
def resize(node: Node):
    if node.opset < 10:
        raise node.unsupported(f"opset {node.opset}")
    if node.opset == 10:
        cfg = _config(node, legacy=True)
        return lambda x, scales: _resize(x, *_plan(x, scales, None, None, None, cfg), cfg, node)
    cfg = _config(node, legacy=False)
    axes = node.attr("axes")

    def fn(x, roi=None, scales=None, sizes=None):
        return _resize(x, *_plan(x, scales, sizes, roi, axes, cfg), cfg, node)

    return fn


@register("Upsample")
def upsample(node: Node):
    if node.opset < 7:
        raise node.unsupported(f"opset {node.opset} (experimental Upsample)")
    cfg = _config(node, legacy=True)
    if node.opset < 9:
        scales_attr = node.attr("scales")
        if scales_attr is None:
            raise node.unsupported("missing scales attribute")
        scales_t = torch.tensor(list(scales_attr), dtype=torch.float32)
        return lambda x: _resize(x, *_plan(x, scales_t, None, None, None, cfg), cfg, node)
    return lambda x, scales: _resize(x, *_plan(x, scales, None, None, None, cfg), cfg, node)
