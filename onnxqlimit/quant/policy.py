"""Where quantizers stand: the placement policy, in one place.

Default (docs/quantization.md): the constant weight of every Conv, ConvTranspose, Gemm
and MatMul, and the activation inputs of those ops. Flags add residual-Add inputs,
Concat inputs and activation-by-activation MatMuls (attention). Everything else
(LayerNorm, Softmax, Resize, shape ops, graph outputs) stays float. The first and last
compute layers keep 8-bit weights and inputs unless told otherwise, as in the paper.
Tables read by Gather (token and position embeddings) are quantized weight-only, per row,
at `embedding_bits`: they are most of a text encoder's bytes but no multiply reads them.
Each point becomes one FakeQuantize hook in the mirror and one Q/DQ pair in the file.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Sequence

import onnx

from ..errors import QLimitError
from .bits import check_bits
from .fake_quant import QuantSpec

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclass
class QuantConfig:
    wbits: int = 8
    abits: int = 8
    weight_symmetric: bool = True
    weight_per_channel: bool = True
    weight_init: str = "mse"  # mse | minmax
    act_symmetric: bool = False
    act_init: str = "mse"  # mse | minmax | percentile
    percentile: float = 99.99
    first_last_bits: int | None = 8  # None: first/last layers use wbits/abits like the rest
    quantize_add: bool = False  # inputs of Adds of two activations (residual joins)
    quantize_concat: bool = False
    quantize_act_matmul: bool = False  # MatMul of two activations (attention scores/context)
    exclude: tuple[str, ...] = ()  # node names or regexes (full match) left float
    overrides: tuple[tuple[str, int, int], ...] = ()  # (node name or regex, wbits, abits)
    embedding_bits: int | None = 8  # Gather tables, weight-only per row; None: float
    smooth: float | None = None  # SmoothQuant migration strength (alpha) for MatMul/Gemm inputs; None: off

    def __post_init__(self):
        check_bits("weight", self.wbits)
        check_bits("activation", self.abits)
        if self.first_last_bits is not None:
            check_bits("weight", self.first_last_bits, "--first-last-bits")
        if self.smooth is not None and not 0.0 < self.smooth < 1.0:
            raise QLimitError(f"--smooth must be between 0 and 1 (got {self.smooth})")
        if self.embedding_bits is not None:
            check_bits("weight", self.embedding_bits, "--embedding-bits")
        for _, w, a in self.overrides:
            check_bits("weight", w, "--bits wbits")
            check_bits("activation", a, "--bits abits")
        for pattern in self.exclude + tuple(p for p, *_ in self.overrides):
            try:
                re.compile(pattern)
            except re.error as err:
                raise QLimitError(f"bad node pattern {pattern!r}: {err}") from None

    def all_bits(self) -> set[int]:
        """Every width the placement can give a quantizer (the BitPlan's opset floor before a search)."""
        bits = {self.wbits, self.abits} | {b for _, w, a in self.overrides for b in (w, a)}
        bits |= {self.embedding_bits} if self.embedding_bits else set()
        return bits | ({self.first_last_bits} if self.first_last_bits else set())


@dataclass
class QuantPoint:
    tensor: str  # the ONNX tensor the Q/DQ pair stands on
    kind: str  # "weight" | "activation"
    spec: QuantSpec
    consumers: list[str] = field(default_factory=list)  # names of the nodes whose input it is
    fixed: bool = False  # width set by the user (--bits) or the first/last rule: a search keeps it
    table: bool = False  # a Gather table: rounded to nearest, never tuned, fixed width, not in avg_wbits


def _matches(patterns, node: onnx.NodeProto) -> bool:
    names = [node.name, *node.output]
    return any(re.fullmatch(p, n) for p in patterns for n in names if n)


def _weight_axis(node: onnx.NodeProto, weight_index: int, rank: int) -> int:
    """The output-channel axis of a weight, for per-channel scales."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1 if weight_index == 1 else rank - 2  # MatMul: the axis that survives in the output


def check_patterns(model: onnx.ModelProto, config: QuantConfig) -> None:
    """A --bits or --exclude pattern that matches no node is a typo, not a no-op: name it."""
    names = [n for node in model.graph.node for n in (node.name, *node.output) if n]
    for flag, patterns in (("--exclude", config.exclude), ("--bits", [p for p, *_ in config.overrides])):
        for pattern in patterns:
            if any(re.fullmatch(pattern, n) for n in names):
                continue
            near = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
            examples = near or [n.name for n in model.graph.node if n.op_type in COMPUTE_OPS][:3]
            raise QLimitError(f"{flag} {pattern!r} matches no node name or output (patterns match whole names; "
                              f"{'near' if near else 'names look like'}: {', '.join(examples)})")


def place(model: onnx.ModelProto, config: QuantConfig, last: set[str] | None = None) -> list[QuantPoint]:
    """Where quantizers stand and their default widths (BitPlan.of(points) is the default plan).
    `last`: the last compute layers when known element by element (reach.last_layers);
    by default they are read off the graph's tensors."""
    check_patterns(model, config)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    float_acts = _float_tensors(model)
    compute = [n for n in graph.node if n.op_type in COMPUTE_OPS and not _matches(config.exclude, n)]
    first, graph_last = _first_and_last(graph)
    last = graph_last if last is None else last

    def bits_for(node) -> tuple[int, int, bool]:
        wbits, abits, fixed = config.wbits, config.abits, False
        for pattern, w, a in config.overrides:
            if _matches([pattern], node):
                wbits, abits, fixed = w, a, True
        if config.first_last_bits and (node.name in first or node.name in last):
            wbits, abits, fixed = max(wbits, config.first_last_bits), max(abits, config.first_last_bits), True
        return wbits, abits, fixed

    weights: dict[str, QuantPoint] = {}
    acts: dict[str, QuantPoint] = {}

    def add_act(tensor: str, bits: int, fixed: bool, node) -> None:
        if tensor in inits or tensor in outputs or tensor not in float_acts:
            return
        point = acts.get(tensor)
        if point is None:
            acts[tensor] = QuantPoint(tensor, "activation", QuantSpec(bits, config.act_symmetric), [node.name], fixed)
        else:  # a tensor read by several quantized ops gets the widest width asked for
            point.consumers.append(node.name)
            point.fixed |= fixed
            if bits > point.spec.bits:
                point.spec = QuantSpec(bits, config.act_symmetric)

    for node in compute:
        wbits, abits, fixed = bits_for(node)
        data_inputs = list(node.input[:2])
        weight_index = next((i for i in (1, 0) if i < len(data_inputs) and data_inputs[i] in inits
                             and inits[data_inputs[i]].data_type in _FLOAT_TYPES), None)
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and weight_index != 1:
            weight_index = None  # only B/W is a weight for these; a constant A is left alone
        if weight_index is not None:
            name = data_inputs[weight_index]
            rank = len(inits[name].dims)
            axis = _weight_axis(node, weight_index, rank) if config.weight_per_channel and rank > 1 else None
            spec = QuantSpec(wbits, config.weight_symmetric, axis)
            if name in weights:  # shared weight: keep one quantizer, the widest
                weights[name].consumers.append(node.name)
                weights[name].fixed |= fixed
                if wbits > weights[name].spec.bits:
                    weights[name].spec = spec
            else:
                weights[name] = QuantPoint(name, "weight", spec, [node.name], fixed)
        activation_inputs = [t for i, t in enumerate(data_inputs) if i != weight_index and t]
        if node.op_type == "MatMul" and weight_index is None and not config.quantize_act_matmul:
            continue  # activation x activation (attention) stays float unless asked for
        for tensor in activation_inputs:
            add_act(tensor, abits, fixed, node)

    if config.embedding_bits:
        for node in graph.node:
            if node.op_type == "Gather" and not _matches(config.exclude, node):
                bits = next((w for p, w, _ in reversed(config.overrides) if _matches([p], node)), config.embedding_bits)
                _add_table(node, inits, weights, config, bits)

    extra_ops = {"Add"} if config.quantize_add else set()
    extra_ops |= {"Concat"} if config.quantize_concat else set()
    for node in graph.node:
        if node.op_type in extra_ops and not _matches(config.exclude, node):
            inputs = [t for t in node.input if t and t not in inits]
            if node.op_type == "Add" and len(inputs) < 2:
                continue  # bias-like Add of a constant is not a join
            _, abits, fixed = bits_for(node)
            for tensor in inputs:
                add_act(tensor, abits, fixed, node)
    return list(weights.values()) + list(acts.values())


def _add_table(node: onnx.NodeProto, inits, weights: dict[str, QuantPoint], config: QuantConfig, bits: int) -> None:
    """A float table of rank >= 2 gathered by runtime indices: one scale per gathered slice
    (per row for an embedding), so a row's error does not depend on the largest row."""
    name = node.input[0]
    table = inits.get(name)
    if table is None or table.data_type not in _FLOAT_TYPES or len(table.dims) < 2 or node.input[1] in inits:
        return
    if name in weights:  # a tied table also read by a MatMul keeps that layer's quantizer
        weights[name].consumers.append(node.name)
        return
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(table.dims)
    spec = QuantSpec(bits, config.weight_symmetric, axis)
    weights[name] = QuantPoint(name, "weight", spec, [node.name], fixed=True, table=True)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors known (by shape inference) to be float; unknown types are left out."""
    graph = model.graph
    typed = list(graph.value_info) + list(graph.input) + list(graph.output)
    return {v.name for v in typed if v.type.tensor_type.elem_type in _FLOAT_TYPES}


def _first_and_last(graph: onnx.GraphProto) -> tuple[set[str], set[str]]:
    """Compute nodes with no compute node before them / after them on any path."""
    after_compute: dict[str, bool] = {}  # tensor -> some compute node lies upstream
    first = set()
    for node in graph.node:
        upstream = any(after_compute.get(t, False) for t in node.input)
        if node.op_type in COMPUTE_OPS and not upstream:
            first.add(node.name)
        for out in node.output:
            after_compute[out] = upstream or node.op_type in COMPUTE_OPS
    nodes = [(n.name, n.op_type, n.input, n.output) for n in graph.node]
    last = {n.name for n in graph.node if n.op_type in COMPUTE_OPS} - feeding_compute(nodes)
    return first, last


def feeding_compute(nodes: Sequence[tuple[str, str, Sequence[str], Sequence[str]]],
                    stop_ops: tuple[str, ...] = ()) -> set[str]:
    """Compute nodes with a path to another compute node that no op in `stop_ops` interrupts.
    `nodes`: (name, op_type, inputs, outputs) in graph order (ONNX or mirror nodes)."""
    reaches: dict[str, bool] = {}  # tensor -> such a path starts here
    found = set()
    for name, op_type, inputs, outputs in reversed(nodes):
        downstream = any(reaches.get(t, False) for t in outputs if t)
        if op_type in COMPUTE_OPS and downstream:
            found.add(name)
        carries = op_type in COMPUTE_OPS or (downstream and op_type not in stop_ops)
        for t in inputs:
            if t:
                reaches[t] = reaches.get(t, False) or carries
    return found
