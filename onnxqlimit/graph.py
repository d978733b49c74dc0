"""Small ONNX graph utilities shared by the loading and export stages."""
from __future__ import annotations

from collections import defaultdict

import onnx


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> nodes that read it (main graph only)."""
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                users[name].append(node)
    return users


def node_attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute's value (strings as bytes), or `default` where the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder graph.node in place so that every node follows the producers of its inputs.

    Some exporters write nodes out of order; onnx.checker and the mirror both need order.
    Subgraph (If/Loop) references to outer tensors are not considered: such models are
    refused by the mirror anyway.
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        remaining = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):  # a cycle or a dangling input: leave the rest as is
            ordered.extend(remaining)
            break
        pending = remaining
    if [id(n) for n in ordered] != [id(n) for n in graph.node]:
        copies = [onnx.NodeProto() for _ in ordered]
        for copy, node in zip(copies, ordered):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)
