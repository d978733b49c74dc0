"""The Q/DQ patterns the exporter writes, in one place: a weight as integer initializer ->
DequantizeLinear, an activation as (Max/Min clip ->) QuantizeLinear -> DequantizeLinear,
and the bytes each takes. export.py writes them for a whole model, mixed/latency.py
around one node to time it, mixed/costs.py counts their bytes.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .graph import node_attr
from .quant.fake_quant import BiasQuantize, FakeQuantize, QuantSpec
from .quant.policy import QuantPoint
from .quant.widths import container_bits, container_dtype


def needs_clip(spec: QuantSpec) -> bool:
    """Activations get a Max/Min clip where the container is wider than the width (see below)."""
    if spec.is_float:
        return False
    return spec.bits < container_bits(spec.bits) or container_bits(spec.bits) < 8


def needs_fusion_guard(spec: QuantSpec, beside_activations: bool) -> bool:
    """Whether onnxruntime 1.32 would fuse this weight's DequantizeLinear into an integer kernel
    that cannot take it, making the file fail: DQ(weight) -> Conv/Gemm/MatMul with 8-bit
    activations becomes QLinearConv & co. without a check of the weight type (int2: session
    creation fails with INVALID_GRAPH) or of its scales' shape (block-wise int8:
    MatMulIntegerToFloat fails at run time). Weight-only (no quantized activations beside
    it), the weight stays free to fuse into MatMulNBits."""
    container = container_bits(spec.bits)
    return beside_activations and (container == 2 or (container == 8 and spec.block_size is not None))


def weight_storage_bytes(spec: QuantSpec, shape: tuple[int, ...]) -> int:
    """What insert_weight stores for a weight: packed integers, float32 scales, zero points."""
    numel = int(np.prod(shape))
    if spec.is_float:  # a layer left float keeps its float32 initializer
        return 4 * numel
    container = container_bits(spec.bits)
    channels = int(np.prod(spec.scale_shape(tuple(shape))))  # scales (and zero points)
    return -(-numel * container // 8) + 4 * channels + -(-channels * container // 8)


def activation_storage_bytes(spec: QuantSpec) -> int:
    """What insert_activation stores: scale, zero point and, where clipped, the two bounds
    (nothing for an activation left float)."""
    if spec.is_float:
        return 0
    return 4 + -(-container_bits(spec.bits) // 8) + (8 if needs_clip(spec) else 0)





def _qparam_arrays(quantizer: FakeQuantize, per_channel: bool, shape: tuple[int, ...] | None = None):
    """Scale and zero point as stored: one number, a vector per channel, or (with the weight's
    `shape`) the block grid of a block-wise weight."""
    scale = quantizer.scale.detach().float().cpu().numpy()
    zero = quantizer.zero_point.detach().cpu().numpy()
    if not per_channel:
        scale, zero = scale.reshape(()), zero.reshape(())
    elif shape is not None:
        scale, zero = scale.reshape(quantizer.spec.scale_shape(shape)), zero.reshape(quantizer.spec.scale_shape(shape))
    return scale.astype(np.float32), zero.astype(container_dtype(quantizer.spec.bits, quantizer.spec.symmetric))


def _integers(quantizer: FakeQuantize, weight) -> np.ndarray:
    """A weight's integers (rounded as the quantizer rounds, learned or not) in their container type."""
    spec = quantizer.spec
    return quantizer.quantize(weight.detach()).cpu().numpy().astype(np.int32).astype(container_dtype(spec.bits, spec.symmetric))


def _store_weight(graph, base: str, ints, scale, zero, store) -> None:
    """The integers (through `store` for a model kept on disk), scales and zero points of a weight."""
    stored = numpy_helper.from_array(ints, f"{base}_quantized")
    graph.initializer.extend([store(stored) if store is not None else stored,
                              numpy_helper.from_array(scale, f"{base}_scale"),
                              numpy_helper.from_array(zero, f"{base}_zero_point")])


def reads_transposed(node) -> bool:
    """A Gemm reading its weight transposed (transB=1). onnxruntime fuses a weight-only Gemm
    into MatMulNBits only untransposed, so the exporter then stores the weight transposed
    (insert_weight's `transpose`) and clears transB (untranspose): the same product."""
    return node.op_type == "Gemm" and node_attr(node, "transB", 0) == 1


def untranspose(node) -> None:
    next(a for a in node.attribute if a.name == "transB").i = 0


def insert_weight(graph, point: QuantPoint, quantizer: FakeQuantize, weight, store=None,
                  transpose: bool = False, beside_activations: bool = False) -> str:
    """`transpose`: store a 2-D weight transposed (integers, scales, axes), for a reader that
    then reads it untransposed (see export's weight-only Gemm). `beside_activations`: a reader
    has quantized activations (needs_fusion_guard)."""
    spec = point.spec
    ints = _integers(quantizer, weight)
    scale, zero = _qparam_arrays(quantizer, spec.channel_axis is not None, tuple(ints.shape))
    if transpose:
        ints, scale, zero = ints.T, scale.T, zero.T  # (.T of a vector or a scalar is itself)
        spec = replace(spec, channel_axis=None if spec.channel_axis is None else 1 - spec.channel_axis)
    base = point.tensor
    _store_weight(graph, base, ints, scale, zero, store)
    attrs = {"axis": spec.channel_axis} if spec.channel_axis is not None else {}
    if spec.block_size is not None:  # blocks along the reduction axis (opset 21)
        attrs = {"axis": spec.block_axis, "block_size": spec.block_size}
    graph.node.append(dequantize_node(base, f"{base}_dequantized", **attrs))
    if needs_fusion_guard(spec, beside_activations):
        # A Reshape to its own shape between the DQ and its readers is exact and stops the
        # match; the shape comes from a Shape node, so the guard stores no bytes.
        graph.node.extend([
            helper.make_node("Shape", [f"{base}_dequantized"], [f"{base}_shape"], name=f"{base}_Shape"),
            helper.make_node("Reshape", [f"{base}_dequantized", f"{base}_shape"], [f"{base}_unfused"],
                             name=f"{base}_Reshape")])
        return f"{base}_unfused"
    return f"{base}_dequantized"


def _packs(spec: QuantSpec, dims) -> bool:
    """A sub-byte table whose rows pack whole blocks into whole bytes (integers and zero points):
    insert_gathered_table's packed form then stores exactly the bytes insert_weight does."""
    per_byte = 8 // container_bits(spec.bits)
    if per_byte == 1 or spec.block_size is None or len(dims) != 2:
        return False
    width, block = dims[1], spec.block_size
    return width % block == 0 and width % per_byte == 0 and (width // block) % per_byte == 0


def gathers_rows(graph, point: QuantPoint) -> list:
    """The Gather nodes of a table whose rows insert_gathered_table can dequantize after the
    lookup: every reader gathers along axis 0, and the integers are bytes or pack into bytes
    (onnxruntime's Gather takes no int4/int2). [] where the table keeps DequantizeLinear in
    front of its readers."""
    readers = [n for n in graph.node if point.tensor in n.input]
    rows = [n for n in readers if n.op_type == "Gather" and n.input[0] == point.tensor
            and node_attr(n, "axis", 0) == 0]
    spec = point.spec
    dims = next((list(t.dims) for t in graph.initializer if t.name == point.tensor), [])
    bytes_ok = (container_bits(spec.bits) == 8 and spec.block_size is None) or _packs(spec, dims)
    ok = point.table and spec.channel_axis == 0 and bytes_ok
    return rows if ok and rows and len(rows) == len(readers) else []


def insert_gathered_table(graph, point: QuantPoint, quantizer: FakeQuantize, weight, gathers: list, store=None) -> None:
    """A table read only by Gather: the integer rows are gathered, then dequantized with their
    own gathered scales (Cast, - zero point, x scale - what DequantizeLinear computes), so an
    inference touches only the rows it looks up instead of dequantizing the whole table.
    8-bit: per-row scales and zero points stored as [rows, 1] columns that broadcast over the
    gathered rows; the bytes are insert_weight's. Sub-byte: see _insert_packed_table."""
    if container_bits(point.spec.bits) != 8:
        _insert_packed_table(graph, point, quantizer, weight, gathers, store)
        return
    base = point.tensor
    scale, zero = _qparam_arrays(quantizer, per_channel=True)
    _store_weight(graph, base, _integers(quantizer, weight), scale.reshape(-1, 1), zero.reshape(-1, 1), store)
    for gather in gathers:
        out, ids = gather.output[0], gather.input[1]
        gather.input[0], gather.output[0] = f"{base}_quantized", f"{out}_quantized_rows"
        # (q - zero point) x scale, as DequantizeLinear computes it; the zero point is kept even
        # when symmetric (all zeros): the file then holds exactly the bytes insert_weight's does
        graph.node.extend([
            helper.make_node("Gather", [f"{base}_scale", ids], [f"{out}_row_scale"], name=f"{out}_GatherScale"),
            helper.make_node("Cast", [f"{out}_quantized_rows"], [f"{out}_integer_rows"], name=f"{out}_Cast",
                             to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [f"{base}_zero_point", ids], [f"{out}_row_zero"], name=f"{out}_GatherZero"),
            helper.make_node("Cast", [f"{out}_row_zero"], [f"{out}_row_zero_float"], name=f"{out}_CastZero",
                             to=onnx.TensorProto.FLOAT),
            helper.make_node("Sub", [f"{out}_integer_rows", f"{out}_row_zero_float"], [f"{out}_centered_rows"],
                             name=f"{out}_Sub"),
            helper.make_node("Mul", [f"{out}_centered_rows", f"{out}_row_scale"], [out], name=f"{out}_Dequantize")])


def _pack(digits: np.ndarray, bits: int) -> np.ndarray:
    """[rows, n] unsigned digits below 2**bits -> [rows, n / per byte] uint8, lowest digit first."""
    per_byte = 8 // bits
    grouped = digits.astype(np.uint8).reshape(digits.shape[0], -1, per_byte)
    return sum(grouped[..., k] << np.uint8(bits * k) for k in range(per_byte)).astype(np.uint8)


def packed_integers(packed: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """The integers of a packed table's bytes (the inverse of _insert_packed_table's packing)."""
    bits = container_bits(spec.bits)
    digits = [(packed.astype(np.int32) >> (bits * k)) & (2 ** bits - 1) for k in range(8 // bits)]
    return np.stack(digits, -1).reshape(packed.shape[0], -1) + spec.qmin


def _unpack(graph, base: str, name: str, packed: str, bits: int) -> str:
    """Nodes turning gathered bytes [..., n] into their digits [..., n, per byte] (float):
    each digit is r - 2^bits floor(r / 2^bits), exact in float32 for bytes."""
    graph.node.extend([
        helper.make_node("Cast", [packed], [f"{name}_bytes"], name=f"{name}_Cast", to=onnx.TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [f"{name}_bytes", f"{base}_last_axis"], [f"{name}_r0"],
                         name=f"{name}_Unsqueeze")])
    digits, rest = [], f"{name}_r0"
    for k in range(8 // bits):
        high, digit = f"{name}_r{k + 1}", f"{name}_d{k}"
        graph.node.extend([
            helper.make_node("Mul", [rest, f"{base}_radix_inverse"], [f"{name}_shifted{k}"], name=f"{name}_Shift{k}"),
            helper.make_node("Floor", [f"{name}_shifted{k}"], [high], name=f"{name}_Floor{k}"),
            helper.make_node("Mul", [high, f"{base}_radix"], [f"{name}_high{k}"], name=f"{name}_High{k}"),
            helper.make_node("Sub", [rest, f"{name}_high{k}"], [digit], name=f"{name}_Digit{k}")])
        digits.append(digit)
        rest = high
    graph.node.append(helper.make_node("Concat", digits, [f"{name}_digits"], name=f"{name}_Digits", axis=-1))
    return f"{name}_digits"


def _insert_packed_table(graph, point: QuantPoint, quantizer: FakeQuantize, weight, gathers: list, store) -> None:
    """A 4-/2-bit table with block-wise scales along its rows, as bytes that Gather reads.
    Each row's digits (integer - qmin) are packed two (four) to a byte, the blocks' zero
    points likewise (as zero point - qmin); after the lookup the bytes are unpacked with
    float arithmetic and each block is (digit - zero digit) x its scale, which equals
    DequantizeLinear's (q - zero point) x scale. Stored bytes equal insert_weight's."""
    spec, base = point.spec, point.tensor
    bits = container_bits(spec.bits)
    ints = _integers(quantizer, weight).astype(np.int32)
    rows, width = ints.shape
    blocks = width // spec.block_size
    scale, zero = _qparam_arrays(quantizer, True, (rows, width))
    _store_weight(graph, base, _pack(ints - spec.qmin, bits), scale,
                  _pack(zero.astype(np.int32) - spec.qmin, bits), store)
    graph.initializer.extend([
        numpy_helper.from_array(np.array(2.0 ** bits, np.float32), f"{base}_radix"),
        numpy_helper.from_array(np.array(2.0 ** -bits, np.float32), f"{base}_radix_inverse"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{base}_last_axis"),
        numpy_helper.from_array(np.array([width], np.int64), f"{base}_width"),
        numpy_helper.from_array(np.array([-1, blocks, spec.block_size], np.int64), f"{base}_block_grid"),
        numpy_helper.from_array(np.array([-1, blocks, 1], np.int64), f"{base}_block_column")])
    for gather in gathers:
        out, ids = gather.output[0], gather.input[1]
        gather.input[0], gather.output[0] = f"{base}_quantized", f"{out}_packed_rows"
        graph.node.append(helper.make_node("Gather", [f"{base}_zero_point", ids], [f"{out}_packed_zero"],
                                           name=f"{out}_GatherZero"))
        digits = _unpack(graph, base, f"{out}_rows", f"{out}_packed_rows", bits)
        zeros = _unpack(graph, base, f"{out}_zero", f"{out}_packed_zero", bits)
        graph.node.extend([
            helper.make_node("Reshape", [digits, f"{base}_block_grid"], [f"{out}_blocks"], name=f"{out}_Blocks"),
            helper.make_node("Reshape", [zeros, f"{base}_block_column"], [f"{out}_block_zero"],
                             name=f"{out}_BlockZero"),
            helper.make_node("Gather", [f"{base}_scale", ids], [f"{out}_row_scale"], name=f"{out}_GatherScale"),
            helper.make_node("Reshape", [f"{out}_row_scale", f"{base}_block_column"], [f"{out}_block_scale"],
                             name=f"{out}_BlockScale"),
            helper.make_node("Sub", [f"{out}_blocks", f"{out}_block_zero"], [f"{out}_centered"], name=f"{out}_Sub"),
            helper.make_node("Mul", [f"{out}_centered", f"{out}_block_scale"], [f"{out}_values"],
                             name=f"{out}_Dequantize"),
            helper.make_node("Shape", [ids], [f"{out}_ids_shape"], name=f"{out}_IdsShape"),
            helper.make_node("Concat", [f"{out}_ids_shape", f"{base}_width"], [f"{out}_shape"], name=f"{out}_Shape",
                             axis=0),
            helper.make_node("Reshape", [f"{out}_values", f"{out}_shape"], [out], name=f"{out}_Rows")])


def insert_bias(graph, bias: str, values, quantizer: BiasQuantize) -> str:
    """A bias as int32 -> DequantizeLinear (no zero point: 0), the form onnxruntime folds
    into QLinearConv / QGemm; the integers are the mirror's. The scale is per output
    channel where the weight's is, else one number."""
    scale = quantizer.scale().detach().float().cpu()
    ints = torch.clamp(torch.round(values.detach().float().cpu() / scale), *BiasQuantize.INT32)
    per_channel = scale.numel() > 1
    scale = scale if per_channel else scale.reshape(())
    graph.initializer.extend([numpy_helper.from_array(ints.numpy().astype(np.int32), f"{bias}_quantized"),
                              numpy_helper.from_array(scale.numpy().astype(np.float32), f"{bias}_scale")])
    graph.node.append(helper.make_node("DequantizeLinear", [f"{bias}_quantized", f"{bias}_scale"],
                                       [f"{bias}_dequantized"], name=f"{bias}_DequantizeLinear",
                                       **({"axis": 0} if per_channel else {})))
    return f"{bias}_dequantized"


def bias_storage_bytes(scales: int) -> int:
    """What insert_bias adds to the float bias it replaces (int32 takes the float's 4 bytes): its scales."""
    return 4 * scales


def insert_activation(graph, point: QuantPoint, quantizer: FakeQuantize) -> str:
    spec = point.spec
    base = point.tensor
    scale, zero = _qparam_arrays(quantizer, per_channel=False)
    graph.initializer.extend([numpy_helper.from_array(scale, f"{base}_scale"),
                              numpy_helper.from_array(zero, f"{base}_zero_point")])
    source = base
    if needs_clip(spec):
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
    graph.node.append(dequantize_node(base, f"{base}_dequantized"))
    return f"{base}_dequantized"


def dequantize_node(base: str, output: str, name: str | None = None, **attrs):
    """The DequantizeLinear of the integers, scale and zero point stored under `base`."""
    return helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
                            [output], name=name or f"{base}_DequantizeLinear", **attrs)
