"""Tiny hand-built ONNX graphs for loader and CLI tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def rand(*shape, low=-1.0, high=1.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


def make(nodes, inputs, outputs, inits=(), opset=17, metadata=None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


def tensor(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def bn_inits(prefix: str, channels: int) -> list[tuple[str, np.ndarray]]:
    return [(f"{prefix}_scale", rand(channels, low=0.5, high=1.5)), (f"{prefix}_bias", rand(channels)),
            (f"{prefix}_mean", rand(channels)), (f"{prefix}_var", rand(channels, low=0.2, high=2.0))]


def bn_node(prefix: str, x: str, y: str):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")], [y])


def det_model() -> onnx.ModelProto:
    """A matrix determinant: an op the mirror has no converter for."""
    nodes = [helper.make_node("Det", ["x"], ["d"]), helper.make_node("Relu", ["d"], ["y"])]
    return make(nodes, [tensor("x", [2, 3, 3])], [tensor("y", [2])])


def if_model() -> onnx.ModelProto:
    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_out"])], name, [], [tensor(f"{name}_out", [2, 3])])

    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch("then", "Relu"), else_branch=branch("else", "Neg")),
             helper.make_node("Sigmoid", ["y"], ["z"])]
    return make(nodes, [tensor("x", [2, 3])], [tensor("z", [2, 3])], [("zero", np.array(0, np.float32))])


def loop_model(op: str = "Add") -> onnx.ModelProto:
    """A Loop applying `op` (v, one) to a tensor three times and scanning its values; the
    outer tensor `one` is read by the body undeclared."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node(op, ["v_in", "one"], ["v_out"]),
         helper.make_node("Identity", ["v_out"], ["scan"])],
        "body", [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("v_in", [2, 3])],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("v_out", [2, 3]), tensor("scan", [2, 3])])
    nodes = [helper.make_node("Loop", ["trips", "yes", "x"], ["y", "steps"], body=body),
             helper.make_node("Relu", ["y"], ["z"])]
    return make(nodes, [tensor("x", [2, 3])], [tensor("z", [2, 3]), tensor("steps", [3, 2, 3])],
                [("trips", np.array(3, np.int64)), ("yes", np.array(True)), ("one", np.array(1, np.float32))])


def vad_model(sr_input: bool = True) -> onnx.ModelProto:
    """A streaming-VAD-shaped graph: x [batch, 4, 40] and an int64 scalar `sr`; a Conv
    front-end; an If on sr == 16000 whose then-branch holds a nested If (on the front-end's
    sign) and an LSTM over the conv features; the branches read outer tensors (conv output,
    initializers) without declaring them; a Gemm head after the If. sr_input=False: the
    outer condition is computed from x instead (its largest value above 3)."""
    rng = np.random.default_rng(4)
    hidden = 6

    def init(name, *shape):
        return (name, rng.normal(0, 0.4, shape).astype(np.float32))

    inner = helper.make_graph(  # nested If: read 'seq' from two scopes out
        [helper.make_node("Relu", ["seq"], ["pos"])], "inner_then", [], [tensor("pos", [None] * 3)])
    inner_else = helper.make_graph([helper.make_node("Neg", ["seq"], ["neg"])], "inner_else", [],
                                   [tensor("neg", [None] * 3)])
    then = helper.make_graph(
        [helper.make_node("ReduceMean", ["seq"], ["m"], keepdims=0),
         helper.make_node("Greater", ["m", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["chosen"], then_branch=inner, else_branch=inner_else),
         helper.make_node("LSTM", ["chosen", "W", "R", "B"], ["", "h_then"], hidden_size=hidden)],
        "sr16k", [], [tensor("h_then", [None] * 3)])
    other = helper.make_graph(
        [helper.make_node("ReduceMean", ["seq"], ["h_else0"], axes=[0], keepdims=1),
         helper.make_node("MatMul", ["h_else0", "proj"], ["h_else"])], "sr8k", [], [tensor("h_else", [None] * 3)])
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["conv"], strides=[2]),
             helper.make_node("Relu", ["conv"], ["act"]),
             helper.make_node("Transpose", ["act"], ["seq"], perm=[2, 0, 1]),
             helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]) if sr_input else
             helper.make_node("Greater", ["xmax", "three"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["h"], then_branch=then, else_branch=other),
             helper.make_node("Squeeze", ["h", "axes0"], ["last"]),
             helper.make_node("Gemm", ["last", "fw", "fb"], ["y"], transB=1)]
    inits = [init("cw", 8, 4, 3), init("cb", 8), init("W", 1, 4 * hidden, 8), init("R", 1, 4 * hidden, hidden),
             init("B", 1, 8 * hidden), init("proj", 8, hidden), init("fw", 3, hidden), init("fb", 3),
             ("axes0", np.array([0], np.int64)), ("zero", np.array(0, np.float32)),
             ("sr16k", np.array(16000, np.int64)), ("three", np.array(3, np.float32))]
    inputs = [tensor("x", ["b", 4, 40])]
    if sr_input:
        inputs.append(tensor("sr", [], onnx.TensorProto.INT64))
    else:
        nodes.insert(0, helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0))
    return make(nodes, inputs, [tensor("y", ["b", 3])], inits)


def stateful_model(batch: str | int = "b") -> onnx.ModelProto:
    """A streaming step: x [batch, 4, 40] and state [2, batch, 6] (the LSTM's h and c) in;
    y [batch, 3] and the next state [2, batch, 6] out. batch=1: every dimension fixed, as a
    model exported at batch 1 declares them."""
    rng = np.random.default_rng(5)
    hidden = 6

    def init(name, *shape):
        return (name, rng.normal(0, 0.4, shape).astype(np.float32))

    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["conv"], strides=[2]),
             helper.make_node("Relu", ["conv"], ["act"]),
             helper.make_node("Transpose", ["act"], ["seq"], perm=[2, 0, 1]),
             helper.make_node("Split", ["state", "halves"], ["h0", "c0"], axis=0),
             helper.make_node("LSTM", ["seq", "W", "R", "B", "", "h0", "c0"], ["", "h", "c"], hidden_size=hidden),
             helper.make_node("Concat", ["h", "c"], ["state_out"], axis=0),
             helper.make_node("Squeeze", ["h", "axes0"], ["last"]),
             helper.make_node("Gemm", ["last", "fw", "fb"], ["y"], transB=1)]
    inits = [init("cw", 8, 4, 3), init("cb", 8), init("W", 1, 4 * hidden, 8), init("R", 1, 4 * hidden, hidden),
             init("B", 1, 8 * hidden), init("fw", 3, hidden), init("fb", 3), ("halves", np.array([1, 1], np.int64)),
             ("axes0", np.array([0], np.int64))]
    return make(nodes, [tensor("x", [batch, 4, 40]), tensor("state", [2, batch, hidden])],
                [tensor("y", [batch, 3]), tensor("state_out", [2, batch, hidden])], inits)


def layers_in_subgraphs_model() -> onnx.ModelProto:
    """Compute layers inside control flow: x [batch, 4, 16] -> Conv -> Relu -> an If on the
    batch's largest value (> 3) whose branches each hold a Conv (the then-branch's weight in a
    Constant node of the branch) -> a Loop of two steps whose body runs Relu -> MatMul ->
    Add -> a Gemm head, y [batch, 3]."""
    rng = np.random.default_rng(6)

    def weight(*shape):
        return rng.normal(0, 0.3, shape).astype(np.float32)

    then = helper.make_graph(
        [helper.make_node("Constant", [], ["tw"], value=onnx.numpy_helper.from_array(weight(8, 8, 3), "tw")),
         helper.make_node("Conv", ["feat", "tw", "tb"], ["then_conv"]),
         helper.make_node("Relu", ["then_conv"], ["then_out"])], "large", [], [tensor("then_out", ["b", 8, 12])])
    other = helper.make_graph(
        [helper.make_node("Conv", ["feat", "ew"], ["else_conv"]),
         helper.make_node("Sigmoid", ["else_conv"], ["else_out"])], "small", [], [tensor("else_out", ["b", 8, 12])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Relu", ["v_in"], ["v_pos"]),
         helper.make_node("MatMul", ["v_pos", "lw"], ["v_mm"]),
         helper.make_node("Add", ["v_mm", "v_in"], ["v_out"]),
         helper.make_node("Identity", ["v_out"], ["v_scan"])],
        "step", [tensor("i", [], TensorProto.INT64), tensor("cond_in", [], TensorProto.BOOL), tensor("v_in", ["b", 8, 12])],
        [tensor("cond_out", [], TensorProto.BOOL), tensor("v_out", ["b", 8, 12]), tensor("v_scan", ["b", 8, 12])])
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["conv"]),
             helper.make_node("Relu", ["conv"], ["feat"]),
             helper.make_node("ReduceMax", ["x"], ["xmax"], keepdims=0),
             helper.make_node("Greater", ["xmax", "three"], ["large"]),
             helper.make_node("If", ["large"], ["branch"], then_branch=then, else_branch=other),
             helper.make_node("Loop", ["trips", "yes", "branch"], ["looped", "steps"], body=body),
             helper.make_node("Flatten", ["looped"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fw", "fb"], ["y"], transB=1)]
    inits = [("cw", weight(8, 4, 3)), ("cb", weight(8)), ("tb", weight(8)), ("ew", weight(8, 8, 3)),
             ("lw", weight(12, 12)), ("fw", weight(3, 96)), ("fb", weight(3)), ("three", np.array(3, np.float32)),
             ("trips", np.array(2, np.int64)), ("yes", np.array(True))]
    return make(nodes, [tensor("x", ["b", 4, 16])], [tensor("y", ["b", 3])], inits)
