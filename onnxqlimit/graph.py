"""Small ONNX graph utilities shared by the loading and export stages."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator

import onnx


def consumers(graph: onnx.GraphProto, inside: bool = False) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> nodes that read it (in the main graph; `inside`: in subgraphs too)."""
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in all_nodes(graph) if inside else graph.node:
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
    """Reorder graph.node in place so that every node follows the producers of its inputs,
    in the graphs inside its nodes too.

    Some exporters write nodes out of order; onnx.checker and the mirror both need order.
    A control-flow node also follows the producers of what its subgraphs read (outer_names).
    Names no node of the graph produces (inputs, initializers, an outer scope's tensors)
    are there from the start.
    """
    produced = {o for node in graph.node for o in node.output if o}
    available: set[str] = set()
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        remaining = []
        for node in pending:
            if all(name not in produced or name in available for name in [*node.input, *outer_names(node)]):
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):  # a cycle: leave the rest as is
            ordered.extend(remaining)
            break
        pending = remaining
    if [id(n) for n in ordered] != [id(n) for n in graph.node]:
        copies = [onnx.NodeProto() for _ in ordered]
        for copy, node in zip(copies, ordered):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)
    for node in graph.node:
        for sub in subgraphs(node):
            topological_sort(sub)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a control-flow node holds (If branches, Loop / Scan bodies)."""
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of the graph and, depth first, of the graphs inside its nodes."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from all_nodes(sub)


def all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """The graph and, depth first, every graph nested inside its nodes."""
    return [graph] + [g for node in graph.node for sub in subgraphs(node) for g in all_graphs(sub)]


def all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The initializers of the graph and of the graphs inside its nodes (an exported layer
    inside an If branch keeps its integer weight there)."""
    for g in all_graphs(graph):
        yield from g.initializer


def outer_names(node: onnx.NodeProto) -> list[str]:
    """Tensors a control-flow node's subgraphs read from the scopes around the node (ONNX
    lets a subgraph use any tensor visible where its node stands, without declaring it)."""
    def reads(graph: onnx.GraphProto) -> list[str]:
        defined = {v.name for v in graph.input} | {t.name for t in graph.initializer} \
            | {o for n in graph.node for o in n.output}
        found = [name for n in graph.node for name in [*n.input, *(x for g in subgraphs(n) for x in reads(g))]]
        return [name for name in found if name and name not in defined]
    return list(dict.fromkeys(name for graph in subgraphs(node) for name in reads(graph)))


def scoped_nodes(graph: onnx.GraphProto, chain: tuple = ()) -> Iterator[tuple[onnx.NodeProto, tuple]]:
    """Every node as all_nodes gives it, with the graphs from `graph` down to the one holding it."""
    chain = (*chain, graph)
    for node in graph.node:
        yield node, chain
        for sub in subgraphs(node):
            yield from scoped_nodes(sub, chain)


def innermost_common(chains: list[tuple]) -> onnx.GraphProto:
    """The innermost graph that holds every one of several nodes, given their scoped_nodes chains."""
    common = chains[0][0]
    for level in zip(*chains):
        if any(g is not level[0] for g in level):
            break
        common = level[0]
    return common
