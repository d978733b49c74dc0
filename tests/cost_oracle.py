"""Costs of a model recomputed from the ONNX file alone, without onnxqlimit's cost model:
shapes from onnx's shape inference at batch 1, bytes from the initializers' element types,
widths from the bit plan the file records. The tests compare the package's numbers with these.

MACs per sample: Conv = output elements x (Cin / groups) x kh x kw (the weight's dims after
the first); Gemm / MatMul = output elements x the reduced dimension. BitOps = MACs x weight
bits x activation bits, a float operand counting 32. avg_wbits weighs layer weights by their
parameter counts; tables read by Gather are left out.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

ELEMENT_BITS = {TensorProto.FLOAT: 32, TensorProto.FLOAT16: 16, TensorProto.DOUBLE: 64, TensorProto.INT64: 64,
                TensorProto.INT32: 32, TensorProto.INT16: 16, TensorProto.UINT16: 16, TensorProto.INT8: 8,
                TensorProto.UINT8: 8, TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT2: 2,
                TensorProto.UINT2: 2, TensorProto.BOOL: 8}
FLOAT_BITS = 32
COMPUTE = ("Conv", "Gemm", "MatMul")


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Every initializer's values, packed as ONNX stores them (int4: two per byte, int2: four)."""
    total = 0
    for t in model.graph.initializer:
        count = int(np.prod(t.dims)) if t.dims else 1
        total += -(-count * ELEMENT_BITS[t.data_type] // 8)
    return total


def _shapes_at_batch_one(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in inits:
            continue
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                if i != 0:
                    raise ValueError(f"{value.name}: only the batch dimension may be symbolic here")
                dim.dim_value = 1
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)  # Shape -> Reshape guards
    shapes = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    for t in model.graph.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def node_macs(model: onnx.ModelProto) -> dict[str, int]:
    """MACs per sample of every Conv / Gemm / MatMul node, by node name."""
    shapes = _shapes_at_batch_one(model)
    macs = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE:
            continue
        out, a, b = (shapes[t] for t in (node.output[0], node.input[0], node.input[1]))
        if node.op_type == "Conv":
            reduced = int(np.prod(b[1:]))  # Cin / groups x kernel
        elif node.op_type == "Gemm":
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            reduced = a[0] if trans_a else a[1]
        else:
            reduced = a[-1]
        macs[node.name] = int(np.prod(out)) * reduced
    return macs


def _source(model: onnx.ModelProto, tensor: str) -> tuple[str, str | None]:
    """What a compute input is: ("weight", name) for dequantized integers, ("activation", name)
    for a Q/DQ pair on an activation (through its Max/Min clip), ("float", None) otherwise."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    node = producer.get(tensor)
    if node is not None and node.op_type == "Reshape":  # the int2 weights' unfusing Reshape
        node = producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        return "float", None
    if node.input[0] in inits:
        return "weight", node.input[0].removesuffix("_quantized")
    quant = producer[node.input[0]]
    source = quant.input[0]
    while source in producer and producer[source].op_type in ("Max", "Min"):
        source = producer[source].input[0]
    return "activation", source


def recorded_plan(model: onnx.ModelProto) -> dict[str, int]:
    return json.loads(next(p.value for p in model.metadata_props if p.key == "onnxqlimit.bit_plan"))


def file_costs(path: str | Path) -> dict:
    """size_bytes, avg_wbits, bitops and each compute node's (macs, wbits, abits) of a QDQ file."""
    model = onnx.load(str(path))
    plan = recorded_plan(model)
    inits = {t.name: t for t in model.graph.initializer}
    macs = node_macs(model)
    nodes = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE:
            continue
        kinds = [_source(model, t) for t in node.input[:2]]
        weight = next((name for kind, name in kinds if kind == "weight"), None)
        acts = [name for kind, name in kinds if kind == "activation"]
        if weight is None and len(acts) == 2:  # activation x activation: the second input plays the weight
            weight, acts = acts[1], acts[:1]
        nodes[node.name] = (macs[node.name], plan[weight] if weight else FLOAT_BITS,
                            plan[acts[0]] if acts else FLOAT_BITS)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    producer = {o: n for n in model.graph.node for o in n.output}
    tables = {producer[t].input[0].removesuffix("_quantized") for t in gathered if t in producer}
    # every dequantized initializer but int32 biases (their scales follow from the layer's)
    layers = {n.input[0].removesuffix("_quantized"): int(np.prod(inits[n.input[0]].dims)) for n in model.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].data_type != onnx.TensorProto.INT32}
    layers = {name: count for name, count in layers.items() if name not in tables}
    return {"size_bytes": initializer_bytes(model),
            "avg_wbits": sum(count * plan[name] for name, count in layers.items()) / sum(layers.values()),
            "bitops": float(sum(m * w * a for m, w, a in nodes.values())),
            "nodes": nodes}
