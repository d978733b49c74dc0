"""Measured per-node latency, the cost model behind `--target-latency MS`.

Every compute node (Conv, ConvTranspose, Gemm, MatMul) is cut out as a one-node ONNX
model fed with its real input tensors (one calibration sample), and timed in onnxruntime
as float and once per (wbits, abits) pair, with Q/DQ written by the exporter itself
(`qdq.insert_weight` / `qdq.insert_activation`), so the timed graph is the one a
real export would contain around that node: integer weights -> DequantizeLinear,
activation inputs Q -> DQ, and the node's output Q -> DQ (the next quantized layer reads
it). That output pair is what lets onnxruntime fuse 8/8 into QLinearConv / QLinearMatMul /
QGemm as in a full exported model.

The table measures rather than assumes: onnxruntime 1.32 has no int4/int2 compute
kernels, so sub-byte variants run as DQ -> float op -> Q and are usually *slower* than
float (the extra Q/DQ work is pure overhead); only 8-bit containers can reach integer
kernels. Each entry also includes onnxruntime's fixed per-call overhead (tens of
microseconds), so a sum over nodes overstates the whole-model time (`model_latency_ms`);
the search compares pairs of one node, where that overhead cancels out.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from ..errors import QLimitError
from ..graph import topological_sort
from ..load import default_opset
from ..mirror import Mirror
from ..qdq import insert_activation, insert_weight, reads_transposed, untranspose
from ..quant.fake_quant import FakeQuantize, QuantSpec
from ..quant.observers import qparams_from_range, weight_qparams
from ..quant.policy import (
    COMPUTE_OPS,
    QuantPoint,
    float_initializers,
    weight_axis,
    weight_input,
)
from ..quant.widths import FLOAT_BITS, check_bits, required_opset
from ..runtime import cpu_session
from ..weights import array as tensor_array

FLOAT = "float"
_WARMUP = 3


def pair_key(wbits: int, abits: int) -> str:
    """The table key of a (wbits, abits) pair: "8/8", "4/4", ... (FLOAT for the float node)."""
    return f"{wbits}/{abits}"


def _activation_inputs(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[str]:
    """The node's inputs computed at run time (they become the one-node model's graph inputs)."""
    return list(dict.fromkeys(t for t in node.input if t and t not in inits))


def _output_info(model: onnx.ModelProto, tensor: str, value: np.ndarray | None) -> onnx.ValueInfoProto:
    """The node output as a graph output: type and shape from the real value, else from the model."""
    if value is not None:
        value = np.asarray(value)
        return helper.make_tensor_value_info(tensor, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
    info = onnx.ValueInfoProto()
    typed = next((v for v in [*model.graph.value_info, *model.graph.output] if v.name == tensor), None)
    info.CopyFrom(typed or helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return info


def _find_node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    node = next((n for n in model.graph.node if n.name == name), None)
    if node is None:
        raise QLimitError(f"no node named {name!r} in the model")
    if node.op_type not in COMPUTE_OPS:
        raise QLimitError(f"node {name!r} is a {node.op_type}; latency is measured for {', '.join(COMPUTE_OPS)} only")
    return node


def _median_ms(session: ort.InferenceSession, feeds: dict[str, np.ndarray], repeats: int) -> float:
    for _ in range(_WARMUP):
        session.run(None, feeds)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _activation_quantizer(values: np.ndarray, bits: int) -> FakeQuantize:
    spec = QuantSpec(bits, symmetric=False)
    t = torch.from_numpy(np.asarray(values, np.float32))
    quantizer = FakeQuantize(spec)
    quantizer.set_qparams(*qparams_from_range(t.min(), t.max(), spec))
    return quantizer


def _quantize_weight(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, init: onnx.TensorProto, bits: int,
                     block: int | None, weight_only: bool) -> str:
    """The node's weight as the exporter writes it: per channel (block-wise where the run's
    scheme says so), and for a weight-only Gemm with transB=1 transposed (export.py)."""
    weight = torch.from_numpy(np.array(tensor_array(init), np.float32))
    axis = weight_axis(node, index, weight.dim()) if weight.dim() > 1 else None
    block = block if node.op_type in ("MatMul", "Gemm") and weight.dim() == 2 and axis is not None else None
    spec = QuantSpec(bits, symmetric=True, channel_axis=axis, block_size=block)
    quantizer = FakeQuantize(spec, math.prod(spec.scale_shape(tuple(weight.shape))))
    quantizer.set_qparams(*weight_qparams(weight, spec, "minmax"))
    transpose = weight_only and axis is not None and reads_transposed(node)
    if transpose:
        untranspose(node)
    return insert_weight(graph, QuantPoint(init.name, "weight", spec, [node.name]), quantizer, weight,
                         transpose=transpose, beside_activations=not weight_only)



def single_node_model(model: onnx.ModelProto, node_name: str, inputs: dict[str, np.ndarray],
                      pair: tuple[int, int] | None, block: int | None = None) -> onnx.ModelProto:
    """`node_name` alone as a model: float (`pair` None) or QDQ at (wbits, abits) as exported
    (abits FLOAT_BITS: weight-only, no activation or output Q/DQ; `block`: --weight-block).

    `inputs` holds the real value of every activation input (graph inputs of the result);
    the node's output may be in it too (its range sets the output Q/DQ), else it is computed
    by running the float one-node model.
    """
    node = _find_node(model, node_name)
    inits = {t.name: t for t in model.graph.initializer}
    acts = _activation_inputs(node, inits)
    missing = [t for t in acts if t not in inputs]
    if missing:
        raise QLimitError(f"node {node_name!r}: no value given for input(s) {', '.join(missing)}")
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    out = node.output[0]
    graph = helper.make_graph(
        [copy], f"{node_name}_alone",
        [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(np.asarray(inputs[t]).dtype),
                                       list(np.shape(inputs[t]))) for t in acts],
        [_output_info(model, out, inputs.get(out))],
        [inits[t] for t in dict.fromkeys(node.input) if t in inits])
    opset = default_opset(model)
    if pair is not None:
        wbits, abits = check_bits("weight", pair[0]), check_bits("activation", pair[1])
        opset = max(opset, required_opset({wbits, abits}, block is not None))
    opsets = [helper.make_opsetid("", opset)]
    result = helper.make_model(graph, opset_imports=opsets,
                               ir_version=max(model.ir_version, helper.find_min_ir_version_for(opsets)))
    if pair is None:
        return result
    if out not in inputs:
        inputs = {**inputs, out: cpu_session(result, 1).run([out], {t: inputs[t] for t in acts})[0]}
    graph = result.graph
    renamed: dict[str, str] = {}
    windex = weight_input(node, float_initializers(model.graph))
    weight_only = abits == FLOAT_BITS
    compute = graph.node[0]
    if windex is not None:
        renamed[node.input[windex]] = _quantize_weight(graph, compute, windex, inits[node.input[windex]], wbits, block,
                                                       weight_only)
    for t in dict.fromkeys(node.input[:2]) if not weight_only else ():  # a Gemm's C / a Conv's bias stays float
        if t in acts and np.asarray(inputs[t]).dtype.kind == "f":
            point = QuantPoint(t, "activation", QuantSpec(abits, False), [node.name])
            renamed[t] = insert_activation(graph, point, _activation_quantizer(inputs[t], abits))
    graph.output[0].CopyFrom(_output_info(model, out, np.asarray(inputs[out], np.float32)))
    if not weight_only:
        out_point = QuantPoint(out, "activation", QuantSpec(abits, False), [])
        graph.output[0].name = insert_activation(graph, out_point, _activation_quantizer(inputs[out], abits))
    for i, t in enumerate(compute.input):
        compute.input[i] = renamed.get(t, t)
    used = {t for n in graph.node for t in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    topological_sort(graph)
    return result


def node_latency_table(model: onnx.ModelProto, feeds: dict[str, np.ndarray], nodes: list[str],
                       pairs: list[tuple[int, int]], repeats: int = 30, threads: int = 1,
                       block: int | None = None) -> dict[str, dict[str, float]]:
    """node name -> {FLOAT: ms, "8/8": ms, "4/4": ms, ...}: median milliseconds per run of that node alone in onnxruntime.

    The float model runs once (the mirror) to give every node its real inputs and output.
    """
    inits = {t.name for t in model.graph.initializer}
    found = [_find_node(model, name) for name in nodes]
    wanted = list(dict.fromkeys(t for n in found for t in [*_activation_inputs(n, inits), n.output[0]]))
    values = {name: v.detach().cpu().numpy() for name, v in Mirror(model).run(feeds, outputs=wanted).items()}
    table: dict[str, dict[str, float]] = {}
    for node in found:
        inputs = {t: values[t] for t in [*_activation_inputs(node, inits), node.output[0]]}
        run_feeds = {t: inputs[t] for t in _activation_inputs(node, inits)}
        row: dict[str, float] = {}
        for pair in [None, *(p for p in pairs if p[0] != FLOAT_BITS)]:  # a float weight is the float node
            key = FLOAT if pair is None else pair_key(*pair)
            one = single_node_model(model, node.name, inputs, pair, block)
            try:
                session = cpu_session(one, threads)
            except Exception as err:  # onnxruntime raises its own error types
                raise QLimitError(f"onnxruntime cannot run node {node.name!r} at {key}: {str(err).splitlines()[0]}") from None
            row[key] = _median_ms(session, run_feeds, repeats)
        table[node.name] = row
    return table


def model_latency_ms(model: onnx.ModelProto | bytes | str, feeds: dict[str, np.ndarray], repeats: int = 30,
                     threads: int = 1) -> float:
    """median ms of one whole-model run in onnxruntime (ORT_ENABLE_ALL optimizations, given intra-op threads)."""
    session = cpu_session(model, threads)
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise QLimitError(f"missing model input(s) {', '.join(missing)}")
    return _median_ms(session, {n: feeds[n] for n in names}, repeats)


def nodes_of(model: onnx.ModelProto, ops: Sequence[str] = COMPUTE_OPS) -> list[str]:
    """Names of the model's compute nodes, in graph order (the table's default rows)."""
    return [n.name for n in model.graph.node if n.op_type in ops]
