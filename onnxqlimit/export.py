"""Stage 6: write the quantized mirror back as a standard QDQ ONNX model.

Weights become integer initializers in their narrowest ONNX type (int8; int4/uint4 from
opset 21; int2/uint2 from opset 25; 3 bits in an int4 container, 5-7 in int8, values
restricted to the true range) followed by DequantizeLinear. Activations get a
QuantizeLinear -> DequantizeLinear pair, with a Clip to the representable range first
where the container is wider than the bit width, so the file computes exactly what the
mirror's FakeQuantize computes.
"""
from __future__ import annotations

import json
from typing import Callable

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import topological_sort
from .mirror import Mirror
from .quant.fake_quant import FakeQuantize, QuantSpec
from .quant.policy import QuantPoint
from .state import QuantState

# (container bits, signed) -> (numpy dtype, opset that first allows it in Q/DQ)
_CONTAINERS = {
    (2, True): (ml_dtypes.int2, 25), (2, False): (ml_dtypes.uint2, 25),
    (4, True): (ml_dtypes.int4, 21), (4, False): (ml_dtypes.uint4, 21),
    (8, True): (np.int8, 13), (8, False): (np.uint8, 13),
    (16, True): (np.int16, 21), (16, False): (np.uint16, 21),
}


def container_bits(bits: int) -> int:
    return next(c for c in (2, 4, 8, 16) if bits <= c)


def required_opset(bits: set[int]) -> int:
    """The lowest opset whose Q/DQ types hold every bit width used (13 at least: `axis`)."""
    return max([13] + [_CONTAINERS[(container_bits(b), True)][1] for b in bits])


def _dtype(spec: QuantSpec):
    return _CONTAINERS[(container_bits(spec.bits), spec.symmetric)][0]


def _needs_clip(spec: QuantSpec) -> bool:
    """Activations get a Max/Min clip where the container is wider than the width (see below)."""
    return spec.bits < container_bits(spec.bits) or container_bits(spec.bits) < 8


_ELEMENT_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT2: 2, onnx.TensorProto.UINT2: 2}


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes an initializer's values take as ONNX stores them (int4 packs two per byte, int2 four)."""
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    bits = _ELEMENT_BITS.get(tensor.data_type) or 8 * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return -(-count * bits // 8)


def _needs_fusion_guard(spec: QuantSpec) -> bool:
    return container_bits(spec.bits) == 2


def weight_storage_bytes(spec: QuantSpec, shape: tuple[int, ...]) -> int:
    """What _insert_weight stores for a weight: packed integers, float32 scales, zero points
    (and, for int2, the fusion guard's shape)."""
    container = container_bits(spec.bits)
    numel = int(np.prod(shape))
    channels = shape[spec.channel_axis] if spec.channel_axis is not None else 1
    guard = 8 * len(shape) if _needs_fusion_guard(spec) else 0
    return -(-numel * container // 8) + 4 * channels + -(-channels * container // 8) + guard


def activation_storage_bytes(spec: QuantSpec) -> int:
    """What _insert_activation stores: scale, zero point and, where clipped, the two bounds."""
    return 4 + -(-container_bits(spec.bits) // 8) + (8 if _needs_clip(spec) else 0)


def _consumers_of(graph: onnx.GraphProto, name: str):
    return [(node, i) for node in graph.node for i, t in enumerate(node.input) if t == name]


def export_qdq(model: onnx.ModelProto, mirror: Mirror, state: QuantState,
               store: Callable[[onnx.TensorProto], onnx.TensorProto] | None = None) -> onnx.ModelProto:
    """A copy of `model` (the graph the mirror was built from) with Q/DQ nodes inserted.

    The bit plan is recorded in the metadata (`onnxqlimit.bit_plan`, tensor -> width): a
    3-bit weight in an int4 container cannot be told from a 4-bit one by its type alone.
    `store` (weights.DataFile.move_out, for a model of many GB) takes each integer weight
    as it is made, so that the file's weights are never all in memory.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    quantizers = state.quantizers
    for point in state.points:
        quantizer = quantizers[point.tensor]
        readers = _consumers_of(graph, point.tensor)
        if point.kind == "weight":
            new_name = _insert_weight(graph, point, quantizer, mirror.initializer(point.tensor), store)
        else:
            new_name = _insert_activation(graph, point, quantizer)
        for node, index in readers:
            node.input[index] = new_name
    used = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    topological_sort(graph)
    entry = out.metadata_props.add()
    entry.key, entry.value = "onnxqlimit.bit_plan", json.dumps(dict(state.plan.bits))
    return out


def _qparam_arrays(quantizer: FakeQuantize, per_channel: bool):
    scale = quantizer.scale.detach().float().cpu().numpy()
    zero = quantizer.zero_point.detach().cpu().numpy()
    if not per_channel:
        scale, zero = scale.reshape(()), zero.reshape(())
    return scale.astype(np.float32), zero.astype(_dtype(quantizer.spec))


def _insert_weight(graph, point: QuantPoint, quantizer: FakeQuantize, weight, store=None) -> str:
    spec = point.spec
    ints = quantizer.quantize(weight.detach()).cpu().numpy().astype(np.int32).astype(_dtype(spec))
    scale, zero = _qparam_arrays(quantizer, spec.channel_axis is not None)
    base = point.tensor
    stored = numpy_helper.from_array(ints, f"{base}_quantized")
    graph.initializer.extend([store(stored) if store is not None else stored,
                              numpy_helper.from_array(scale, f"{base}_scale"),
                              numpy_helper.from_array(zero, f"{base}_zero_point")])
    attrs = {"axis": spec.channel_axis} if spec.channel_axis is not None else {}
    graph.node.append(helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
                                       [f"{base}_dequantized"], name=f"{base}_DequantizeLinear", **attrs))
    if _needs_fusion_guard(spec):
        # onnxruntime 1.32 fuses DQ(weight) -> Conv/Gemm/MatMul with 8-bit activations into
        # QLinearConv & co. without checking the weight type, and an int2 weight then makes
        # session creation fail (INVALID_GRAPH) at the default optimization level. A
        # same-shape Reshape between the DQ and its readers is exact and stops the match.
        graph.initializer.append(numpy_helper.from_array(np.array(ints.shape, np.int64), f"{base}_shape"))
        graph.node.append(helper.make_node("Reshape", [f"{base}_dequantized", f"{base}_shape"], [f"{base}_unfused"],
                                           name=f"{base}_Reshape"))
        return f"{base}_unfused"
    return f"{base}_dequantized"


def _insert_activation(graph, point: QuantPoint, quantizer: FakeQuantize) -> str:
    spec = point.spec
    base = point.tensor
    scale, zero = _qparam_arrays(quantizer, per_channel=False)
    graph.initializer.extend([numpy_helper.from_array(scale, f"{base}_scale"),
                              numpy_helper.from_array(zero, f"{base}_zero_point")])
    source = base
    if _needs_clip(spec):
        # Clamp to the true range, so a container wider than the bit width cannot use its
        # extra levels (clamp(x) / s rounds to the same integer bound). For 2/4-bit
        # containers the clamp is a numerical no-op that keeps onnxruntime 1.32 running: its
        # Clip/Relu -> QuantizeLinear fusion aborts session creation on sub-byte zero
        # points, and a Max/Min pair (not a Clip) in between is never matched by it.
        s, z = float(scale), float(zero)
        lo = np.array((spec.qmin - z) * s, np.float32)
        hi = np.array((spec.qmax - z) * s, np.float32)
        graph.initializer.extend([numpy_helper.from_array(lo, f"{base}_range_min"),
                                  numpy_helper.from_array(hi, f"{base}_range_max")])
        graph.node.append(helper.make_node("Max", [base, f"{base}_range_min"], [f"{base}_above_min"], name=f"{base}_Max"))
        graph.node.append(helper.make_node("Min", [f"{base}_above_min", f"{base}_range_max"], [f"{base}_in_range"],
                                           name=f"{base}_Min"))
        source = f"{base}_in_range"
    graph.node.append(helper.make_node("QuantizeLinear", [source, f"{base}_scale", f"{base}_zero_point"],
                                       [f"{base}_quantized"], name=f"{base}_QuantizeLinear"))
    graph.node.append(helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
                                       [f"{base}_dequantized"], name=f"{base}_DequantizeLinear"))
    return f"{base}_dequantized"
