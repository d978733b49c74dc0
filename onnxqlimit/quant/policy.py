"""Where quantizers stand: the placement policy, in one place.

Default (docs/quantization.md): the constant weight of every Conv, ConvTranspose, Gemm
and MatMul, and the activation inputs of those ops - of activation-by-activation MatMuls
(attention) only at the width the runtime fuses (8 bits). Flags add residual-Add inputs,
Concat inputs and attention at any width (or keep it float). The runtime's fused form
(runtimes.py) adds output Q/DQ pairs and int32 biases to 8-bit layers, and pairs tied to
their input on data-movement ops; a runtime that runs QDQ node units only (qnn) gets a pair
on every tensor read as data. Otherwise LayerNorm, Softmax, shape ops and graph outputs stay
float. The first and last
compute layers keep 8-bit weights and inputs unless told otherwise, as in the paper.
Tables read by Gather (token and position embeddings) are quantized weight-only, per row,
at `embedding_bits`: they are most of a text encoder's bytes but no multiply reads them.
Each point becomes one FakeQuantize hook in the mirror and one Q/DQ pair in the file.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Container, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import QLimitError
from ..graph import all_graphs, all_nodes, consumers, node_attr, subgraphs
from .config import Placement, QuantConfig, Widths
from .fake_quant import QuantSpec
from .runtimes import profile

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")  # weight-only: W and R (_add_recurrent)
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclass
class QuantPoint:
    tensor: str  # the ONNX tensor the Q/DQ pair stands on
    kind: str  # "weight" | "activation"
    spec: QuantSpec
    consumers: list[str] = field(default_factory=list)  # names of the nodes whose input it is
    fixed: bool = False  # width set by the user (--bits) or the first/last rule: a search keeps it
    table: bool = False  # a constant rounded to nearest, never tuned, fixed width, not in avg_wbits: a Gather
    # table, or (runtimes that quantize every tensor) a constant operand such as a LayerNorm scale
    output_of: str | None = None  # an output Q/DQ that lets the runtime fuse this compute node (fused form)
    bias: tuple[str, str] | None = None  # weight only: (bias, activation input) of its layer, the bias
    # stored as int32 with scale = activation scale x this weight's scale (fused form)
    tied_to: str | None = None  # an output Q/DQ of a data-movement op: its input point's scale and
    # zero point (calibrate.tie_scales), so the runtime drops the pair and moves the integers
    within: float | None = None  # the Clip maximum its Q's range must not pass: the runtime folds
    # Clip -> Q into the Q (and so fuses the layer before it) only while it does (fused form)


def float_initializers(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer if t.data_type in _FLOAT_TYPES}


def weight_input(node: onnx.NodeProto, float_weights: Container[str]) -> int | None:
    """Which input of a compute node is the weight to quantize, the rule every module uses:
    W of a Conv / ConvTranspose, B of a Gemm, either side of a MatMul (B first) - a float
    initializer. None where there is none (a constant A of a Gemm is not a weight)."""
    if node.op_type not in COMPUTE_OPS or node.domain not in ("", "ai.onnx"):
        return None
    for index in (1, 0) if node.op_type == "MatMul" else (1,):
        if index < len(node.input) and node.input[index] in float_weights:
            return index
    return None


def operands(inputs: Sequence[str], kinds: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(weight, activation) quantizers of a compute node's first two `inputs`, by kind (tensor ->
    "weight" | "activation"); of a MatMul of two activations the second plays the weight."""
    quantized = [t for t in inputs[:2] if t in kinds]
    weight = next((t for t in quantized if kinds[t] == "weight"), None)
    acts = [t for t in quantized if kinds[t] == "activation"]
    if weight is None and len(acts) == 2:
        weight, acts = acts[1], acts[:1]
    return weight, acts[0] if acts else None


def _matches(patterns, node: onnx.NodeProto) -> bool:
    names = [node.name, *node.output]
    return any(re.fullmatch(p, n) for p in patterns for n in names if n)


def weight_axis(node: onnx.NodeProto, weight_index: int, rank: int) -> int:
    """The output-channel axis of a weight, for per-channel scales."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = node_attr(node, "transB", 0)
        return 0 if trans_b else 1
    return rank - 1 if weight_index == 1 else rank - 2  # MatMul: the axis that survives in the output


def check_patterns(model: onnx.ModelProto, placement: Placement, widths: Widths) -> None:
    """A --bits or --exclude pattern that matches no node is a typo, not a no-op: name it."""
    names = [n for node in all_nodes(model.graph) for n in (node.name, *node.output) if n]
    for flag, patterns in (("--exclude", placement.exclude), ("--bits", [p for p, *_ in widths.overrides])):
        for pattern in patterns:
            if any(re.fullmatch(pattern, n) for n in names):
                continue
            near = difflib.get_close_matches(pattern, names, n=3, cutoff=0.4)
            examples = near or [n.name for n in all_nodes(model.graph) if n.op_type in COMPUTE_OPS][:3]
            raise QLimitError(f"{flag} {pattern!r} matches no node name or output (patterns match whole names; "
                              f"{'near' if near else 'names look like'}: {', '.join(examples)})")


def place(model: onnx.ModelProto, config: QuantConfig, last: set[str] | None = None) -> list[QuantPoint]:
    """Where quantizers stand and their default widths (BitPlan.of(points) is the default plan).
    `last`: the last compute layers when known element by element (reach.last_layers);
    by default they are read off the graph's tensors."""
    widths, scheme, placement = config.widths, config.scheme, config.placement
    check_patterns(model, placement, widths)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    float_weights = float_initializers(graph)
    # Layers inside If branches and Loop / Scan bodies are placed as any other (their weights
    # were lifted to the main graph at load). No Q/DQ on the model's outputs (a pair would rename
    # them); a subgraph's outputs may carry one (its node reads them by position), and its
    # inputs too (a Loop-carried value that a layer in the body reads: quantized in the body).
    nodes = list(all_nodes(graph))
    inside = {n.name for n in nodes} - {n.name for n in graph.node}
    no_pair = {o.name for o in graph.output}
    float_acts = _float_tensors(model)
    compute = [n for n in nodes if n.op_type in COMPUTE_OPS and not _matches(placement.exclude, n)]
    first, graph_last = _first_and_last(graph)
    # (`last` from reach.last_layers knows the main graph's layers only)
    last = graph_last if last is None else last | (graph_last & inside)

    runtime = profile(config.runtime)

    def bits_for(node) -> tuple[int, int, bool]:
        wbits, abits, fixed = widths.wbits, widths.abits, False
        for pattern, w, a in widths.overrides:
            if _matches([pattern], node):
                wbits, abits, fixed = w, a, True
        if widths.first_last_bits and (node.name in first or node.name in last):
            wbits, abits, fixed = max(wbits, widths.first_last_bits), max(abits, widths.first_last_bits), True
        if node.op_type in COMPUTE_OPS:  # the widths this op runs at on the runtime (runtimes.py)
            wbits, abits = runtime.fit(node.op_type, wbits, abits)
        return wbits, abits, fixed

    weights: dict[str, QuantPoint] = {}
    acts: dict[str, QuantPoint] = {}

    def add_act(tensor: str, bits: int, fixed: bool, node) -> None:
        if tensor in inits or tensor in no_pair or tensor not in float_acts:
            return
        point = acts.get(tensor)
        if point is None:
            acts[tensor] = QuantPoint(tensor, "activation", QuantSpec(bits, scheme.act_symmetric), [node.name], fixed)
        else:  # a tensor read by several quantized ops gets the widest width asked for
            point.consumers.append(node.name)
            point.fixed |= fixed
            if bits > point.spec.bits:
                point.spec = QuantSpec(bits, scheme.act_symmetric)

    for node in compute:
        wbits, abits, fixed = bits_for(node)
        data_inputs = list(node.input[:2])
        weight_index = weight_input(node, float_weights)
        if weight_index is not None:
            name = data_inputs[weight_index]
            rank = len(inits[name].dims)
            axis = weight_axis(node, weight_index, rank) if scheme.weight_per_channel and rank > 1 else None
            block = scheme.weight_block if node.op_type in ("MatMul", "Gemm") and rank == 2 and axis is not None \
                else None  # blocks along K: what MatMulNBits reads (convolutions stay per channel)
            spec = QuantSpec(wbits, scheme.weight_symmetric, axis, block)
            if name in weights:  # shared weight: keep one quantizer, the widest
                weights[name].consumers.append(node.name)
                weights[name].fixed |= fixed
                if wbits > weights[name].spec.bits:
                    weights[name].spec = spec
            else:
                weights[name] = QuantPoint(name, "weight", spec, [node.name], fixed)
        activation_inputs = [t for i, t in enumerate(data_inputs) if i != weight_index and t]
        if node.op_type == "MatMul" and weight_index is None:  # activation x activation (attention)
            wanted = placement.quantize_act_matmul
            if not (wanted or (wanted is None and abits in runtime.fused_bits)):
                continue  # float unless asked for, or where the runtime runs it in an integer kernel
        for tensor in activation_inputs:
            add_act(tensor, abits, fixed, node)

    if widths.embedding_bits:
        for node in graph.node:
            if node.op_type == "Gather" and not _matches(placement.exclude, node):
                bits = next((w for p, w, _ in reversed(widths.overrides) if _matches([p], node)), widths.embedding_bits)
                _add_table(node, inits, weights, scheme.weight_symmetric, bits, scheme.weight_block or TABLE_BLOCK)

    for node in nodes:
        if node.op_type in RECURRENT_OPS and not _matches(placement.exclude, node):
            wbits, _, fixed = bits_for(node)
            named = any(_matches([pattern], node) for pattern, *_ in widths.overrides)
            _add_recurrent(node, inits, weights, scheme.weight_symmetric, wbits if named else max(wbits, 8))

    extra_ops = {"Add"} if placement.quantize_add else set()
    extra_ops |= {"Concat"} if placement.quantize_concat else set()
    for node in nodes:
        if node.op_type in extra_ops and not _matches(placement.exclude, node):
            inputs = [t for t in node.input if t and t not in inits]
            if node.op_type == "Add" and len(inputs) < 2:
                continue  # bias-like Add of a constant is not a join
            _, abits, fixed = bits_for(node)
            for tensor in inputs:
                add_act(tensor, abits, fixed, node)
    outputs_added = _fused_form(graph, compute, weights, acts, float_acts, runtime.fused_bits, scheme.act_symmetric,
                                no_pair)
    points = list(weights.values()) + list(acts.values()) + outputs_added
    if runtime.quantize_all:
        points += _every_tensor(graph, points, float_acts, lambda node: bits_for(node)[1], placement.exclude,
                                scheme.act_symmetric)
    return points


def _single_reader(tensor: str, readers, outputs: set[str], ops: tuple[str, ...]) -> onnx.NodeProto | None:
    after = readers.get(tensor, [])
    ok = tensor not in outputs and len(after) == 1 and after[0].op_type in ops
    return after[0] if ok else None


def _bias_add(node: onnx.NodeProto, readers, inits, outputs: set[str]) -> tuple[onnx.NodeProto, str] | None:
    """A MatMul's bias: the single Add reading its output with a constant operand (onnxruntime
    folds the pair into Gemm), as (the Add, the constant)."""
    add = _single_reader(node.output[0], readers, outputs, ("Add",))
    const = [t for t in add.input if t != node.output[0] and t in inits] if add is not None else []
    return (add, const[0]) if len(const) == 1 and len(add.input) == 2 else None


def _fusion_tail(tensor: str, readers, inits, outputs: set[str]) -> tuple[str, float | None]:
    """Where an output Q belongs for the runtime to fuse the layer producing `tensor`: past a
    Relu / Clip that the runtime folds into the Q, when it is the tensor's single reader; and
    for a Clip from 0 to a constant, that maximum (the Q's range must stay inside the Clip's)."""
    after = _single_reader(tensor, readers, outputs, ("Relu", "Clip"))
    if after is None or after.input[0] != tensor:
        return tensor, None
    if after.op_type == "Relu":
        return after.output[0], None
    bounds = [_constant(inits, after.input[i]) if len(after.input) > i and after.input[i] else None for i in (1, 2)]
    if len(after.input) < 2:  # opset < 11: min/max attributes
        bounds = [node_attr(after, n) for n in ("min", "max")]
    lo, hi = bounds
    if lo is None or hi is None or lo != 0.0:
        return tensor, None  # a Clip the runtime cannot fold into a Q with zero point 0: Q before it
    return after.output[0], hi


def _constant(inits, name: str) -> float | None:
    t = inits.get(name)
    return float(numpy_helper.to_array(t).reshape(-1)[0]) if t is not None and int(np.prod(t.dims)) == 1 else None


def _int32_bias(weight: QuantPoint, act: QuantPoint, bias: str, inits, readers) -> bool:
    """Record `bias` on the weight's point as int32 (scale = act x weight scale) where it can be:
    1-D, one value per output channel, read by this layer alone, the weight not shared."""
    if bias not in inits or len(readers.get(bias, [])) != 1 or act.kind != "activation" or len(weight.consumers) != 1:
        return False
    dims = list(inits[bias].dims)
    channels = dims[0] if len(dims) == 1 else None
    width = inits[weight.tensor].dims[weight.spec.channel_axis] if weight.spec.channel_axis is not None else channels
    if channels is None or width != channels:
        return False  # a grouped ConvTranspose, a broadcast bias: the bias stays float
    weight.bias = (bias, act.tensor)
    return True


def _fused_form(graph, compute, weights: dict[str, QuantPoint], acts: dict[str, QuantPoint], float_acts: set[str],
                fused_bits: tuple[int, ...], act_symmetric: bool, outputs: set[str]) -> list[QuantPoint]:
    """The form a runtime fuses into integer kernels (runtimes.py), for every compute node
    whose data inputs are all quantized at widths in `fused_bits` (`outputs`: the model's,
    which take no Q/DQ pair):

    - its float bias as int32 (recorded on the weight's point): a Conv/ConvTranspose/Gemm's
      C, a MatMul's constant bias Add;
    - a Q/DQ on its output where the runtime needs one to fuse it: after a Conv/ConvTranspose
      (QLinearConv; past a Relu/Clip folded into the Q), and after a MatMul whose bias cannot
      be int32. A Gemm with an int32 (or no) bias runs as QGemm and a MatMul as
      MatMulIntegerToFloat with float outputs: no extra rounding where none is needed (an
      8-bit Q on a projection that feeds a transformer's residual stream costs MiniLM 0.04
      of embedding cosine).
    """
    inits = {t.name: t for t in graph.initializer}
    readers = consumers(graph, inside=True)
    added: dict[str, QuantPoint] = {}
    for node in compute:
        inputs = [t for t in node.input[:2] if t]
        points = [weights.get(t) or acts.get(t) for t in inputs]
        if len(inputs) < 2 or any(p is None or p.spec.bits not in fused_bits or p.spec.block_size for p in points):
            continue  # (no integer kernel takes block-wise weights with quantized activations)
        weight = next((p for p in points if p.kind == "weight"), None)
        act = next(p for p in points if p is not weight)
        tail, within = None, None
        if node.op_type in ("Conv", "ConvTranspose"):
            tail, within = _fusion_tail(node.output[0], readers, inits, outputs)
        if weight is not None and node.op_type != "MatMul" and len(node.input) > 2:
            _int32_bias(weight, act, node.input[2], inits, readers)
        elif weight is not None and node.op_type == "MatMul" and (found := _bias_add(node, readers, inits, outputs)):
            add, bias = found
            if not _int32_bias(weight, act, bias, inits, readers):
                tail = add.output[0]  # a float bias: MatMul + Add fuse only with a Q after the Add
        if tail is not None and tail not in acts and tail not in added and tail not in outputs and tail in float_acts:
            bits = max(p.spec.bits for p in points if p.kind == "activation")
            added[tail] = QuantPoint(tail, "activation", QuantSpec(bits, act_symmetric), [], True, output_of=node.name)
        if within is not None and (acts.get(tail) or added.get(tail)) is not None:
            (acts.get(tail) or added[tail]).within = within
    _integer_elementwise(graph, acts, added, float_acts, outputs, fused_bits, act_symmetric)
    return list(added.values())


# Ops onnxruntime runs on 8-bit integers when every float input comes out of a
# DequantizeLinear and the output goes into a QuantizeLinear (QLinearSigmoid, QLinearMul,
# QLinearConcat, ...), each with scales of its own: with a Q/DQ on their outputs, chains
# such as Conv -> Sigmoid/Mul (SiLU) -> Concat -> Conv never leave the integer domain.
INTEGER_ELEMENTWISE = ("Add", "Mul", "Sigmoid", "LeakyRelu", "Concat", "GlobalAveragePool", "AveragePool")
# Ops that only select or move values: with a Q/DQ of their input's scale and zero point on
# each output, onnxruntime drops the pairs and moves the integers (its quantizer ties them
# the same way), and the Concat or Add after a Split / Resize / MaxPool stays integer too.
# (Resize only in nearest mode: interpolation makes new values.)
DATA_MOVEMENT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Split", "Slice", "Gather", "MaxPool",
                 "Resize", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Identity")


def _moves_values(node: onnx.NodeProto) -> bool:
    if node.op_type == "Resize":
        return node_attr(node, "mode", b"nearest") == b"nearest"
    return node.op_type in DATA_MOVEMENT


def _integer_elementwise(graph, acts: dict[str, QuantPoint], added: dict[str, QuantPoint], float_acts: set[str],
                         outputs: set[str], fused_bits: tuple[int, ...], act_symmetric: bool) -> None:
    """Output Q/DQ pairs (into `added`) for the INTEGER_ELEMENTWISE nodes whose data inputs
    are all quantized at a fused width, and tied ones for DATA_MOVEMENT nodes whose data
    input is, in graph order so that chains qualify one by one. An Add or Mul of a constant
    stays float (its constant is no quantized tensor)."""
    inits = {t.name for t in graph.initializer}
    for node in all_nodes(graph):
        moves = _moves_values(node)
        if not (moves or node.op_type in INTEGER_ELEMENTWISE) or node.domain not in ("", "ai.onnx"):
            continue
        data = [t for t in (node.input if node.op_type in ("Add", "Mul", "Concat") else node.input[:1]) if t]
        if any(t in inits for t in data) or not data:
            continue
        points = [acts.get(t) or added.get(t) for t in data]
        if any(p is None or p.spec.bits not in fused_bits for p in points):
            continue
        bits = max(p.spec.bits for p in points)
        for out in node.output if moves else node.output[:1]:
            if moves and out in acts and acts[out].tied_to is None:
                acts[out].tied_to = data[0]  # a layer's input that a data-movement op wrote: tied too
            if out in acts or out in added or out in outputs or out not in float_acts:
                continue
            added[out] = QuantPoint(out, "activation", QuantSpec(bits, act_symmetric), [], True, output_of=node.name,
                                    tied_to=data[0] if moves else None)


# Inputs that set parameters rather than carry data (onnxruntime's QDQ quantizer leaves them
# float too), readers that look only at a tensor's shape, and ops left out as onnxruntime's
# get_qnn_qdq_config leaves them out.
PARAMETER_INPUTS = {"Resize": (1, 2, 3), "Upsample": (1,), "Clip": (1, 2), "Pad": (1, 2, 3), "Pow": (1,),
                    "Dropout": (1, 2), "Conv": (2,), "ConvTranspose": (2,), "Gemm": (2,)}
UNQUANTIZED_READERS = ("Shape", "Size", "Cast")


def _every_tensor(graph, points: list[QuantPoint], float_acts: set[str], abits, exclude,
                  act_symmetric: bool) -> list[QuantPoint]:
    """Points on every float tensor a node reads as data, beyond `points` (runtimes that run a
    graph only in whole QDQ node units: QNN HTP). Activations at the reader's width (`abits`
    of a node); constant operands (LayerNorm scale and bias, an Add's constant) per tensor at
    the activation width, asymmetric, rounded to nearest, as onnxruntime's QNN configuration
    writes them. Left float: graph outputs (a Q/DQ there would rename them), tensors computed
    from integer inputs alone (an attention mask's arithmetic) and the outputs of nodes that
    read one - a -3.4e38 mask inside a quantized tensor would set every real score to zero -
    and a layer's bias that is not int32."""
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    taken = {p.tensor for p in points} | {p.bias[0] for p in points if p.bias is not None}
    readers = consumers(graph)
    # a Conv's output before the Relu/Clip folded into a quantized output (fused form) stays
    # unquantized, as onnxruntime's quantizer removes such activations
    quantized = {p.tensor for p in points}
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            tail, _ = _fusion_tail(node.output[0], readers, inits, outputs)
            if tail != node.output[0] and tail in quantized:
                taken.add(node.output[0])
    data = {i.name for i in graph.input if i.name in float_acts} | {p.tensor for p in points if p.kind == "weight"}
    masked: set[str] = set()  # data computed with a mask: left float
    new: dict[str, QuantPoint] = {}
    for node in graph.node:
        inputs = [t for t in node.input if t]
        if not any(t in data for t in inputs):
            continue  # no data flows here (shapes, masks)
        mask_fed = any(t in float_acts and t not in data and t not in inits for t in inputs)
        data.update(t for t in node.output if t in float_acts)  # (a Shape of data is no data)
        if mask_fed:
            masked.update(node.output)
        if node.op_type in UNQUANTIZED_READERS or _matches(exclude, node):
            continue
        bits = abits(node)
        for index, tensor in enumerate(node.input):
            if not tensor or tensor in taken or tensor in outputs or index in PARAMETER_INPUTS.get(node.op_type, ()):
                continue
            constant = inits.get(tensor)
            if constant is not None and constant.data_type not in _FLOAT_TYPES:
                continue
            if constant is None and (tensor not in data or tensor in masked or tensor not in float_acts):
                continue
            point = new.get(tensor)
            if point is None:
                kind = "weight" if constant is not None else "activation"
                spec = QuantSpec(bits, False if constant is not None else act_symmetric)
                new[tensor] = QuantPoint(tensor, kind, spec, [node.name], True, table=constant is not None)
            else:
                point.consumers.append(node.name)
                if bits > point.spec.bits:
                    point.spec = QuantSpec(bits, point.spec.symmetric)
    return list(new.values())


# Rows of a table narrower than a byte get one scale per block of this many elements: one
# scale per 384-wide MiniLM row at 4 bits costs 0.02 of embedding cosine (0.9995 -> 0.9777).
TABLE_BLOCK = 32


def _add_table(node: onnx.NodeProto, inits, weights: dict[str, QuantPoint], symmetric: bool, bits: int,
               block: int) -> None:
    """A float table of rank >= 2 gathered by runtime indices: one scale per gathered slice
    (per row for an embedding), so a row's error does not depend on the largest row; below
    8 bits, one per `block` elements of a row of a 2-D table."""
    name = node.input[0]
    table = inits.get(name)
    if table is None or table.data_type not in _FLOAT_TYPES or len(table.dims) < 2 or node.input[1] in inits:
        return
    if name in weights:  # a tied table also read by a MatMul keeps that layer's quantizer
        weights[name].consumers.append(node.name)
        return
    axis = node_attr(node, "axis", 0) % len(table.dims)
    blocked = bits < 8 and len(table.dims) == 2 and axis == 0
    spec = QuantSpec(bits, symmetric, axis, block if blocked else None)
    weights[name] = QuantPoint(name, "weight", spec, [node.name], fixed=True, table=True)


def _add_recurrent(node: onnx.NodeProto, inits, weights: dict[str, QuantPoint], symmetric: bool, bits: int) -> None:
    """W and R of an LSTM / GRU / RNN, [directions, gates x hidden, in]: one scale per gate
    row (axis 1; one DequantizeLinear axis, so the directions share it). At least 8 bits
    unless a --bits pattern names the node: the recurrence feeds each step's rounding
    error back into the next. The activations inside the recurrence stay float."""
    for name in node.input[1:3]:
        tensor = inits.get(name)
        if tensor is None or tensor.data_type not in _FLOAT_TYPES or len(tensor.dims) != 3 or name in weights:
            continue
        weights[name] = QuantPoint(name, "weight", QuantSpec(bits, symmetric, 1), [node.name], fixed=True)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors known (by shape inference) to be float, in subgraphs too; unknown types are left out."""
    typed = [v for g in all_graphs(model.graph) for v in [*g.value_info, *g.input, *g.output]]
    return {v.name for v in typed if v.type.tensor_type.elem_type in _FLOAT_TYPES}


def _first_and_last(graph: onnx.GraphProto) -> tuple[set[str], set[str]]:
    """Compute nodes with no compute node before them / after them on any path, through
    subgraphs too (a model whose layers all sit inside If branches has its first and last)."""
    flow = _data_flow(graph)
    after_compute: dict[str, bool] = {}  # tensor -> some compute node lies upstream
    first = set()
    for name, op_type, inputs, outputs in flow:
        upstream = any(after_compute.get(t, False) for t in inputs)
        if op_type in COMPUTE_OPS and not upstream:
            first.add(name)
        for out in outputs:  # (both branches of an If write its outputs)
            after_compute[out] = after_compute.get(out, False) or upstream or op_type in COMPUTE_OPS
    last = {name for name, op_type, *_ in flow if op_type in COMPUTE_OPS} - feeding_compute(flow)
    return first, last


def _data_flow(graph: onnx.GraphProto) -> list[tuple[str, str, list[str], list[str]]]:
    """(name, op_type, inputs, outputs) of the graph's nodes in order, a control-flow node
    replaced by its subgraphs' nodes between two links: its inputs into each subgraph's
    inputs, and each subgraph's outputs into its outputs (all to all: an over-approximation
    of the positional mapping). Subgraph nodes read outer tensors by name."""
    flow = []
    for node in graph.node:
        subs = subgraphs(node)
        if not subs:
            flow.append((node.name, node.op_type, list(node.input), list(node.output)))
        for sub in subs:
            flow.append(("", "Identity", [t for t in node.input if t], [v.name for v in sub.input]))
            flow += _data_flow(sub)
            flow.append(("", "Identity", [o.name for o in sub.output], [o for o in node.output if o]))
    return flow


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
