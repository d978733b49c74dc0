"""Parity of tensor.py / indexing.py / resize.py with onnxruntime where it departs from onnx's
reference (the backend node tests cannot see those cases): nearest-mode ties, scale-1 and
same-size axes, antialias windows, integer rounding, Slice/Pad edge rules, Range rounding."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper

from onnxqlimit.errors import QLimitError
from onnxqlimit.mirror import Mirror

_OPTS = ort.SessionOptions()
_OPTS.log_severity_level = 3
_OPTS.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def _model(node, opset, feeds, inits=()):
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for k, v in feeds.items()]
    outputs = [onnx.ValueInfoProto(name=o) for o in node.output if o]
    graph = helper.make_graph([node], "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _check(node, opset, feeds, inits=()):
    model = _model(node, opset, feeds, inits)
    ref = ort.InferenceSession(model.SerializeToString(), _OPTS, providers=["CPUExecutionProvider"]).run(None, feeds)
    got = Mirror(model).run(feeds)
    for name, want in zip([o for o in node.output if o], ref):
        have = got[name].numpy()
        assert have.shape == want.shape and have.dtype == want.dtype, (name, have.shape, want.shape)
        if want.dtype.kind == "f":
            np.testing.assert_allclose(have, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max(initial=0))))
        else:
            np.testing.assert_array_equal(have, want)


def _resize(opset, attrs, x, scales=None, sizes=None, roi=None):
    inits, names = [], ["x"]
    for name, values, dtype in (("roi", roi, TP.FLOAT), ("scales", scales, TP.FLOAT), ("sizes", sizes, TP.INT64)):
        if values is None and not (name != "sizes" and opset < 13):
            names.append("")
            continue
        values = [] if values is None else values
        inits.append(helper.make_tensor(name, dtype, [len(values)], values))
        names.append(name)
    while names[-1] == "":
        names.pop()
    _check(helper.make_node("Resize", names, ["y"], **attrs), opset, {"x": x}, inits)


def _ramp(*shape, dtype=np.float32):
    return (np.arange(int(np.prod(shape))) ** 1.3).astype(dtype).reshape(shape)


@pytest.mark.parametrize("ctm,nearest,w,out", [
    ("half_pixel", "round_prefer_ceil", 20, 6),    # 14.499999 in float32 is a tie for onnxruntime
    ("asymmetric", "round_prefer_ceil", 7, 8),     # 3.4999998 likewise
    ("asymmetric", "round_prefer_floor", 7, 8),
    ("align_corners", "floor", 5, 9),
])
def test_resize_nearest_ties(ctm, nearest, w, out):
    _resize(13, dict(mode="nearest", coordinate_transformation_mode=ctm, nearest_mode=nearest),
            _ramp(1, 1, 2, w), sizes=[1, 1, 2, out])


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_resize_same_shape_is_a_copy_but_same_size_axis_is_not(mode):
    _resize(13, dict(mode=mode), _ramp(1, 1, 3, 7), scales=[1, 1, 1, 1.1])        # 7 -> 7: copy
    _resize(13, dict(mode=mode), _ramp(1, 1, 6, 6), scales=[1, 1, 0.34, 1.1])     # W kept, scale 1.1 used


@pytest.mark.parametrize("mode", ["linear", "cubic"])
@pytest.mark.parametrize("scales", [[1, 1, 0.6, 0.45], [1, 1, 1.1, 0.5], [1, 1, 1.7, 2.5]])
def test_resize_antialias(mode, scales):
    _resize(18, dict(mode=mode, antialias=1), _ramp(2, 1, 6, 9), scales=scales)
    _resize(18, dict(mode=mode, antialias=1, exclude_outside=1), _ramp(2, 1, 6, 9), scales=scales)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32])
def test_resize_integer_linear_truncates_like_onnxruntime(dtype):
    x = (np.random.default_rng(0).standard_normal((2, 3, 5, 7)) * 40 + 60).astype(dtype)
    _resize(13, dict(mode="linear"), x, scales=[1, 1, 1.7, 0.6])


def test_resize_8bit_nhwc_linear_is_refused():
    model = _model(helper.make_node("Resize", ["x", "", "s"], ["y"], mode="linear"), 13,
                   {"x": np.zeros((1, 4, 4, 3), np.uint8)}, [helper.make_tensor("s", TP.FLOAT, [4], [1, 2, 2, 1])])
    with pytest.raises(QLimitError):
        Mirror(model).run({"x": np.zeros((1, 4, 4, 3), np.uint8)})


def test_resize_legacy_forms():
    _check(helper.make_node("Resize", ["x", "s"], ["y"], mode="nearest"), 10, {"x": _ramp(1, 1, 5, 7)},
           [helper.make_tensor("s", TP.FLOAT, [4], [1, 1, 0.6, 1.7])])
    x = _ramp(1, 2, 3, 4)
    _check(helper.make_node("Upsample", ["x"], ["y"], mode="linear", scales=[1, 1, 2, 1.5]), 7, {"x": x})
    _check(helper.make_node("Upsample", ["x", "s"], ["y"], mode="nearest"), 9, {"x": x},
           [helper.make_tensor("s", TP.FLOAT, [4], [1, 1, 2.5, 3])])


def test_resize_axes_policy_and_crop():
    x = _ramp(2, 3, 5, 7)
    _resize(18, dict(mode="nearest", axes=[3, 2], keep_aspect_ratio_policy="not_larger"), x, sizes=[10, 9])
    _resize(18, dict(mode="linear", axes=[-2, 3], keep_aspect_ratio_policy="not_smaller"), x, sizes=[8, 9])
    _resize(18, dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize", axes=[2, 3],
                     extrapolation_value=-1.0), x, sizes=[6, 4], roi=[-0.2, 0.1, 0.9, 1.3])


def _randomized_resize_cases(n=120, seed=0):
    rng = np.random.default_rng(seed)
    transforms = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_crop_and_resize",
                  "half_pixel_symmetric"]
    for _ in range(n):
        mode = str(rng.choice(["nearest", "linear", "cubic"]))
        attrs = dict(mode=mode, coordinate_transformation_mode=str(rng.choice(transforms)))
        if mode == "nearest":
            attrs["nearest_mode"] = str(rng.choice(["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]))
        if mode == "cubic":
            attrs.update(cubic_coeff_a=float(rng.choice([-0.75, -0.5])), exclude_outside=int(rng.integers(2)))
        shape = [1, 2, int(rng.integers(1, 9)), int(rng.integers(1, 9))]
        scales = [1.0, 1.0] + [float(rng.choice([0.45, 0.6, 0.75, 8 / 7, 1.3, 1.5, 2.0, 2.5, 1 / 3])) for _ in range(2)]
        roi = [0, 0, *rng.uniform(-0.3, 0.5, 2), 1, 1, *rng.uniform(0.5, 1.3, 2)]
        yield attrs, shape, scales, [float(r) for r in roi]


@pytest.mark.parametrize("attrs,shape,scales,roi", list(_randomized_resize_cases()))
def test_resize_randomized(attrs, shape, scales, roi):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    _resize(19, attrs, x, scales=scales, roi=roi if attrs["coordinate_transformation_mode"] == "tf_crop_and_resize" else None)


def _i64(name, values):
    return helper.make_tensor(name, TP.INT64, [len(values)], values)


@pytest.mark.parametrize("starts,ends,steps", [
    ([10], [2**63 - 1], [-3]),       # INT64_MAX end with a negative step runs to the start
    ([-2**63], [2**63 - 1], [-1]),
    ([-7], [100], [2]),
    ([2], [0], [1]),                 # empty
])
def test_slice_clamping(starts, ends, steps):
    _check(helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"]), 13, {"x": _ramp(3, 5)},
           [_i64("s", starts), _i64("e", ends), _i64("a", [1]), _i64("t", steps)])


@pytest.mark.parametrize("mode,pads", [
    ("wrap", [-1, 2, 2, -1]),        # crops first, then wraps the cropped axis
    ("reflect", [-1, 2, 1, -2]),
    ("edge", [2, -1, -2, 3]),
    ("constant", [2, -1, -4, 3]),    # a crop wider than the axis eats into the padding
])
def test_pad_negative_pads(mode, pads):
    _check(helper.make_node("Pad", ["x", "p", "c"], ["y"], mode=mode), 19, {"x": _ramp(4, 5)},
           [_i64("p", pads), helper.make_tensor("c", TP.FLOAT, [], [2.5])])


def test_range_accumulates_in_float32():
    feeds = {"a": np.array(0.1, np.float32), "b": np.array(1000.3, np.float32), "c": np.array(0.1, np.float32)}
    _check(helper.make_node("Range", ["a", "b", "c"], ["y"]), 11, feeds)


@pytest.mark.parametrize("opset", [7, 10, 12, 13])
def test_dropout_mask(opset):
    _check(helper.make_node("Dropout", ["x"], ["y", "m"]), opset, {"x": _ramp(2, 3)})


@pytest.mark.parametrize("reduction", ["add", "mul", "max", "min"])
def test_scatter_reductions_with_duplicates(reduction):
    x = _ramp(4, 3)
    idx = np.array([[1], [1], [3], [1]], np.int64)
    upd = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    _check(helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction=reduction), 18, {"x": x, "i": idx, "u": upd})
    idx2 = np.array([[0, 2, 0], [2, 0, -1]], np.int64)
    _check(helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], axis=1, reduction=reduction), 18,
           {"x": x, "i": idx2, "u": upd[:2]})
