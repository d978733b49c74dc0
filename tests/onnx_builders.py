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
