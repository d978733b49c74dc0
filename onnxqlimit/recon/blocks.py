"""Reconstruction blocks found from the ONNX graph.

BRECQ / QDrop tune a model block by block, and ONNX has no modules, so a block here is
a contiguous range of the topologically sorted nodes. A good cut is one few activations
cross: the block's output then carries everything the rest of the network needs from
it, so a loss on that output is a faithful target, and a residual join stays inside the
block that opened it. We therefore cut where the *live set* is smallest.

* A weight layer is a Conv/ConvTranspose/Gemm/MatMul that reads a float initializer
  as its weight, an LSTM/GRU/RNN with float initializer weights, or a control-flow node
  (If, Loop, Scan) with such a layer in a subgraph: a recurrence or a branch is tuned as
  one unit, its outputs (the hidden state, the branch's result) in the block's loss. Tensors downstream of a weight layer are *main-path*; everything else
  (graph inputs, masks, position ids, shape arithmetic) is *context*: it is identical
  in the float and the quantized model, so a block takes it as a fixed input, and it
  does not count as live (one exception below).
* The live set at cut position i (between node i-1 and node i) is the main-path
  tensors produced before i and read at or after i; at the end of the graph it is the
  main-path graph outputs. The network's own data input also counts (a context tensor
  that reaches a weight layer's activation input through layout ops only): a
  Transformer's embedding output feeds Q/K/V and the first residual, and must keep
  that first attention together just as a residual does.
* Granularity "block": from each block start, the cut with the smallest live set among
  those leaving 1..max_layers weight layers in the block. Ties go to the fewest layers
  (the earliest natural boundary) and, among cuts with that many layers, to the latest
  one, so a layer's ReLU, pooling or LayerNorm tail stays with it. Runs of one-layer
  blocks (plain chains) are then merged into groups of up to chain_group layers.
* "layer": at most one layer per block, no grouping. "stage": max_layers * stage_factor
  layers, ties to the latest cut (the largest block). "net": one block.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from itertools import accumulate

import onnx

from ..errors import QLimitError
from ..graph import all_nodes, outer_names, subgraphs
from ..quant.policy import RECURRENT_OPS, float_initializers, weight_input

GRANULARITIES = ("layer", "block", "stage", "net")
# Ops that read only the shape of their input: their outputs do not move when values are quantized.
_SHAPE_ONLY_OPS = ("Shape", "Size")
# Ops that only rearrange their first input: looked through when tracing a layer's data input back.
_LAYOUT_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")


@dataclass
class Block:
    index: int
    start: int  # first node index (inclusive) in model.graph.node
    stop: int  # last node index + 1
    layers: list[str]  # weight-layer node names, in order
    inputs: list[str]  # main-path tensors read here, produced before start
    context: list[str]  # context tensors read here, produced before start or graph inputs
    outputs: list[str]  # tensors produced here, read at >= stop or graph outputs (production order)
    loss_outputs: list[str]  # the main-path subset of outputs: what the reconstruction loss covers

    @property
    def node_range(self) -> range:
        return range(self.start, self.stop)


@dataclass
class BlockConfig:
    granularity: str = "block"
    max_layers: int = 6  # weight layers per block at granularity "block"
    chain_group: int = 3  # consecutive one-layer blocks (plain chains) are merged up to this many layers
    stage_factor: int = 4  # "stage" cap = max_layers * stage_factor

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise QLimitError(f"granularity must be one of {', '.join(GRANULARITIES)} (got {self.granularity!r})")
        for name in ("max_layers", "chain_group", "stage_factor"):
            if getattr(self, name) < 1:
                raise QLimitError(f"{name} must be at least 1 (got {getattr(self, name)})")


@dataclass
class _Flow:
    """Where each tensor is produced and last read, and which tensors are main-path."""

    nodes: list[onnx.NodeProto]
    is_layer: list[bool]
    producer: dict[str, int]  # tensor -> node index; -1 for graph inputs; initializers absent
    last_reader: dict[str, int]  # tensor -> largest index of a node reading it
    main: set[str]
    data_inputs: set[str]  # context tensors that reach a weight layer's activation input via layout ops
    graph_outputs: set[str]


def _flow(model: onnx.ModelProto) -> _Flow:
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    float_inits = float_initializers(graph)
    nodes = list(graph.node)
    is_layer = [_is_layer(node, float_inits) for node in nodes]
    producer = {i.name: -1 for i in graph.input if i.name not in inits}
    last_reader: dict[str, int] = {}
    main: set[str] = set()
    for index, node in enumerate(nodes):
        reads = [t for t in [*node.input, *outer_names(node)] if t and t not in inits]  # (+ subgraphs' reads)
        for t in reads:
            last_reader[t] = index
        if is_layer[index] or (node.op_type not in _SHAPE_ONLY_OPS and any(t in main for t in reads)):
            main.update(o for o in node.output if o)
        for o in node.output:
            if o:
                producer[o] = index
    return _Flow(nodes, is_layer, producer, last_reader, main, _data_inputs(nodes, is_layer, producer, main),
                 {o.name for o in graph.output})


def _is_layer(node: onnx.NodeProto, float_inits: set[str]) -> bool:
    """A layer itself, or a control-flow node with one anywhere inside."""
    def weighted(n: onnx.NodeProto) -> bool:
        if n.op_type in RECURRENT_OPS:
            return any(t in float_inits for t in n.input[1:3])
        return weight_input(n, float_inits) is not None
    return weighted(node) or any(weighted(inner) for sub in subgraphs(node) for inner in all_nodes(sub))


def _data_inputs(nodes: list[onnx.NodeProto], is_layer: list[bool], producer: dict[str, int],
                 main: set[str]) -> set[str]:
    found: set[str] = set()
    for node, flag in zip(nodes, is_layer):
        if not flag:
            continue
        stack = [t for t in node.input[:2] if t in producer and t not in main]
        while stack:
            t = stack.pop()
            found.add(t)
            index = producer[t]
            if index >= 0 and nodes[index].op_type in _LAYOUT_OPS and nodes[index].input[0] in producer:
                stack.append(nodes[index].input[0])
    return found


def weight_layers(model: onnx.ModelProto) -> list[int]:
    """Indices in model.graph.node of the weight layers."""
    return [i for i, flag in enumerate(_flow(model).is_layer) if flag]


def context_tensors(model: onnx.ModelProto) -> set[str]:
    """Computed tensors and real graph inputs that no weight layer lies upstream of."""
    flow = _flow(model)
    return set(flow.producer) - flow.main


def _live_sizes(flow: _Flow) -> list[int]:
    """Live-set size at every cut position 0..n, by a difference array over (producer, last reader)."""
    n = len(flow.nodes)
    diff = [0] * (n + 2)
    for t in flow.main | flow.data_inputs:
        first, last = flow.producer[t] + 1, flow.last_reader.get(t, -1)
        if last >= first:  # live at positions first..last
            diff[first] += 1
            diff[last + 1] -= 1
    live = list(accumulate(diff))[: n + 1]
    live[n] = len(flow.main & flow.graph_outputs)  # what the model hands back must survive the end
    return live


def _cut(flow: _Flow, live: list[int], cap: int, latest: bool) -> list[tuple[int, int]]:
    """Greedy left-to-right min-live cutting with at most `cap` weight layers per block."""
    n = len(flow.nodes)
    count = [0, *accumulate(flow.is_layer)]  # count[i] = weight layers among nodes [0, i)
    if count[n] == 0:
        return [(0, n)] if n else []
    ranges, start = [], 0
    while start < n:
        best, best_key = -1, (0, 0)
        for i in range(start + 1, n + 1):
            layers = count[i] - count[start]
            if layers > cap:
                break
            # Smallest live set; then the fewest layers (unless `latest`); then the latest position.
            key = (live[i], 0 if latest else layers)
            if layers and (best < 0 or key <= best_key):
                best, best_key = i, key
        if count[best] == count[n]:
            best = n  # no weight layer left: the tail joins this block
        ranges.append((start, best))
        start = best
    return ranges


def _group_chains(ranges: list[tuple[int, int]], count: list[int], limit: int) -> list[tuple[int, int]]:
    """Merge runs of one-layer blocks (plain chains) into groups of up to `limit` layers."""
    merged: list[list[int]] = []  # [start, stop, layers, is_chain_group]
    for start, stop in ranges:
        layers = count[stop] - count[start]
        last = merged[-1] if merged else None
        if layers == 1 and last is not None and last[3] and last[2] + 1 <= limit:
            last[1], last[2] = stop, last[2] + 1
        else:
            merged.append([start, stop, layers, int(layers == 1)])
    return [(start, stop) for start, stop, _, _ in merged]


def _make_block(index: int, start: int, stop: int, flow: _Flow) -> Block:
    inputs, context, seen = [], [], set()
    for node in flow.nodes[start:stop]:
        for t in [*node.input, *outer_names(node)]:
            if t in flow.producer and flow.producer[t] < start and t not in seen:
                seen.add(t)
                (inputs if t in flow.main else context).append(t)
    outputs = [o for node in flow.nodes[start:stop] for o in node.output
               if o and (flow.last_reader.get(o, -1) >= stop or o in flow.graph_outputs)]
    layers = [node.name for node, flag in zip(flow.nodes[start:stop], flow.is_layer[start:stop]) if flag]
    return Block(index, start, stop, layers, inputs, context, outputs, [o for o in outputs if o in flow.main])


def find_blocks(model: onnx.ModelProto, config: BlockConfig | None = None) -> list[Block]:
    """Blocks tiling [0, len(model.graph.node)) in order; see the module docstring for the rule."""
    config = config or BlockConfig()
    flow = _flow(model)
    n = len(flow.nodes)
    if config.granularity == "net":
        ranges = [(0, n)] if n else []
    else:
        live = _live_sizes(flow)
        cap = {"layer": 1, "block": config.max_layers, "stage": config.max_layers * config.stage_factor}
        ranges = _cut(flow, live, cap[config.granularity], latest=config.granularity == "stage")
        if config.granularity == "block":
            count = [0, *accumulate(flow.is_layer)]
            ranges = _group_chains(ranges, count, min(config.chain_group, config.max_layers))
    return [_make_block(i, start, stop, flow) for i, (start, stop) in enumerate(ranges)]


def _short(name: str, width: int = 60) -> str:
    """Long names keep their tail, where exporters put the telling part, cut at a '/' when there is one."""
    if len(name) <= width:
        return name
    tail = name[3 - width:]
    return "..." + (tail[tail.index("/"):] if "/" in tail[:-1] else tail)


def _names(names: list[str], shown: int = 3) -> str:
    """'a, b, c, +4 more'; names under one path are written once as 'path/{a, b, c}', so
    the part that tells blocks apart (features.4 vs features.5) is never cut."""
    picked = names[:shown]
    more = [f"+{len(names) - shown} more"] if len(names) > shown else []
    prefix = os.path.commonprefix(picked) if len(picked) > 1 else ""
    prefix = prefix[: prefix.rfind("/") + 1]
    if len(prefix) > 1:
        return prefix + "{" + ", ".join([_short(n[len(prefix):]) for n in picked] + more) + "}"
    return ", ".join([_short(n) for n in picked] + more)


def _runs(counts: list[int]) -> str:
    """'3 3 3 1 2' -> '3*3 1 2': runs of three or more are written once with their length."""
    parts, i = [], 0
    while i < len(counts):
        j = i
        while j < len(counts) and counts[j] == counts[i]:
            j += 1
        parts += [f"{counts[i]}*{j - i}"] if j - i >= 3 else [str(c) for c in counts[i:j]]
        i = j
    return " ".join(parts)


def format_blocks(blocks: list[Block], model: onnx.ModelProto) -> str:
    """One line per block and a summary line, for `onnxqlimit inspect --blocks`."""
    lines = []
    for b in blocks:
        n_layers = len(b.layers)
        line = (f"block {b.index}: nodes {b.start}-{b.stop - 1}, {n_layers} layer{'s' * (n_layers != 1)} "
                f"({_names(b.layers, shown=4)}), in: [{_names(b.inputs)}]")
        if b.context:
            line += f" context: [{_names(b.context)}]"
        line += f" out: [{_names(b.loss_outputs)}]"
        if len(b.outputs) > len(b.loss_outputs):
            line += f" (+{len(b.outputs) - len(b.loss_outputs)} context)"
        lines.append(line)
    counts = [len(b.layers) for b in blocks]
    if counts:
        lines.append(f"{len(blocks)} blocks, {sum(counts)} layers of {len(model.graph.node)} nodes; layers per block: "
                     f"min {min(counts)}, median {statistics.median(counts):g}, max {max(counts)} "
                     f"({_runs(counts)})")
    else:
        lines.append("no blocks (empty graph)")
    return "\n".join(lines)
