"""Stage 5: write the quantized mirror back as a standard QDQ ONNX model.

Weights become integer initializers in their narrowest ONNX type (int8; int4/uint4 from
opset 21; int2/uint2 from opset 25; 3 bits in an int4 container, 5-7 in int8, values
restricted to the true range) followed by DequantizeLinear; the bias of a layer with a
quantized weight and input becomes int32 (scale = input scale x weight scale). Activations get a
QuantizeLinear -> DequantizeLinear pair, with a Max/Min clamp to the representable range
first where the container is wider than the bit width (or narrower than 8 bits), so the
file computes exactly what the mirror's FakeQuantize computes. The patterns are qdq.py's.
"""
from __future__ import annotations

import json
from typing import Callable

import onnx

from .graph import innermost_common, outer_names, scoped_nodes, topological_sort
from .mirror import Mirror
from .qdq import (
    dequantize_node,
    gathers_rows,
    insert_activation,
    insert_bias,
    insert_gathered_table,
    insert_weight,
    reads_transposed,
    untranspose,
)
from .quant.fake_quant import BiasQuantize
from .state import QuantState


def _consumers_of(graph: onnx.GraphProto, name: str) -> tuple[list[tuple], onnx.GraphProto]:
    """Every reader as (node, input index, its graph), inside subgraphs too, and the graph the
    Q/DQ nodes go into: the innermost one holding every reader, so that a layer inside an If
    branch or a Loop body has its DequantizeLinear beside it, where the runtime's fusion
    looks. A subgraph that hands the tensor out as its output reads it too, as
    (that output, None, the subgraph). The mirror's quantizer hook changes the tensor for
    all its readers, so the file must rewire them all (ONNX names are unique across scopes:
    a subgraph never shadows one)."""
    scoped = list(scoped_nodes(graph))
    found = [(node, i, chain) for node, chain in scoped for i, t in enumerate(node.input) if t == name]
    inner = {id(chain[-1]): chain for _, chain in scoped if len(chain) > 1}
    found += [(out, None, chain) for chain in inner.values() for out in chain[-1].output if out.name == name]
    home = innermost_common([chain for *_, chain in found]) if found else graph
    return [(reader, i, chain[-1]) for reader, i, chain in found], home


def _rewire(reader: tuple, name: str) -> None:
    node, index, _ = reader
    if index is None:  # a subgraph's output: its node's output is positional, so a new name is fine
        node.name = name
    else:
        node.input[index] = name


def _dequantize_beside(readers, home: onnx.GraphProto, point, dequantized: str) -> None:
    """Rewire an activation's readers to its DequantizeLinear; a reader in a graph nested
    below `home` (a Conv in an If branch reading a tensor of the main graph) gets a
    DequantizeLinear of its own in its graph, of the integers quantized in `home`: onnxruntime
    fuses a layer into an integer kernel only with the DequantizeLinear beside it."""
    copies: dict[int, str] = {}
    for reader in readers:
        scope = reader[2]
        name = dequantized
        if scope is not home:
            if id(scope) not in copies:
                copies[id(scope)] = f"{dequantized}_{len(copies) + 1}"
                scope.node.append(dequantize_node(point.tensor, copies[id(scope)],
                                                  name=f"{copies[id(scope)]}_DequantizeLinear"))
            name = copies[id(scope)]
        _rewire(reader, name)


def _weight_only_gemm(readers, point, quantizers) -> bool:
    """Whether a weight is read only as B of transB=1 Gemms with float activations (see
    qdq.reads_transposed); if so their transB is cleared, and the weight is stored transposed."""
    gemms = [node for node, index, _ in readers if index == 1 and reads_transposed(node)
             and (node.input[0] not in quantizers or quantizers[node.input[0]].spec.is_float)]
    if not gemms or len(gemms) != len(readers) or point.spec.channel_axis is None:
        return False
    for node in gemms:
        untranspose(node)
    return True


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
    quantized_acts = {p.tensor for p in state.points if p.kind == "activation" and not p.spec.is_float}
    for point in state.points:
        if point.spec.is_float:  # an activation the plan leaves float: no Q/DQ
            continue
        quantizer = quantizers[point.tensor]
        gathers = gathers_rows(graph, point) if point.kind == "weight" else []
        if gathers:  # an embedding: rows dequantized after the lookup, no DequantizeLinear of the table
            insert_gathered_table(graph, point, quantizer, mirror.initializer(point.tensor), gathers, store)
            continue
        readers, home = _consumers_of(graph, point.tensor)
        if point.kind == "activation":
            _dequantize_beside(readers, home, point, insert_activation(home, point, quantizer))
            continue
        transpose = _weight_only_gemm(readers, point, quantizers)
        beside = any(t in quantized_acts for node, index, _ in readers if index is not None for t in node.input[:2])
        new_name = insert_weight(home, point, quantizer, mirror.initializer(point.tensor), store, transpose, beside)
        for reader in readers:
            _rewire(reader, new_name)
        bias_hook = mirror.get_hook(point.bias[0]) if point.bias is not None else None
        if isinstance(bias_hook, BiasQuantize) and bias_hook.scale() is not None:
            bias = point.bias[0]
            readers, home = _consumers_of(graph, bias)
            new_name = insert_bias(home, bias, mirror.initializer(bias), bias_hook)
            for reader in readers:
                _rewire(reader, new_name)
    used = {t for n in graph.node for t in [*n.input, *outer_names(n)]} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    topological_sort(graph)
    entry = out.metadata_props.add()
    entry.key, entry.value = "onnxqlimit.bit_plan", json.dumps(dict(state.plan.bits))
    return out
