"""Per-node latency table (mixed/latency.py): complete, positive, QDQ written as exported,
8/8 fused by onnxruntime, opset raised for sub-byte pairs."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxqlimit.data import load_npz
from onnxqlimit.errors import QLimitError
from onnxqlimit.load import LoadConfig, default_opset, load_model
from onnxqlimit.mirror import Mirror
from onnxqlimit.mixed.latency import (FLOAT, model_latency_ms, node_latency_table, nodes_of, pair_key,
                                      single_node_model)
from tests.conftest import MODELS
from tests.onnx_builders import make, rand, tensor

PAIRS = [(8, 8), (4, 8), (4, 4), (2, 4)]


@pytest.fixture(scope="module")
def zoo():
    model = load_model(MODELS / "zoo_resnet.onnx", LoadConfig(min_opset=25))
    feeds = {k: v[:1] for k, v in load_npz(MODELS / "zoo_resnet_calib.npz", ["input"]).items()}
    return model, feeds


def _inputs_of(model: onnx.ModelProto, feeds: dict, node: onnx.NodeProto) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    names = [t for t in node.input if t and t not in inits] + [node.output[0]]
    return {k: v.numpy() for k, v in Mirror(model).run(feeds, outputs=names).items()}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimized: str | None = None) -> np.ndarray:
    """Run with onnxruntime: optimized (and saved) when `optimized` is given, else as written.

    Numbers are checked on the unoptimized graph: on AVX2 CPUs without VNNI onnxruntime's
    fused u8s8 kernels saturate int16 pair sums, so a fused result depends on the machine.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = optimized
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def test_pair_key():
    assert pair_key(8, 8) == "8/8" and pair_key(4, 4) == "4/4" and pair_key(2, 4) == "2/4"
    assert FLOAT == "float"


def test_zoo_table_is_complete_and_positive(zoo):
    model, feeds = zoo
    nodes = nodes_of(model)
    assert len(nodes) >= 10
    table = node_latency_table(model, feeds, nodes, PAIRS, repeats=3)
    assert list(table) == nodes
    for row in table.values():
        assert set(row) == {FLOAT} | {pair_key(*p) for p in PAIRS}
        assert all(math.isfinite(ms) and ms > 0 for ms in row.values()), row


def test_zoo_conv_8_8_fuses_to_qlinearconv(zoo, tmp_path):
    model, feeds = zoo
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    inputs = _inputs_of(model, feeds, conv)
    qdq = single_node_model(model, conv.name, inputs, (8, 8))
    ops = [n.op_type for n in qdq.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 3  # input, weight, output
    optimized = tmp_path / "opt.onnx"
    _run(qdq, inputs, str(optimized))
    assert "QLinearConv" in {n.op_type for n in onnx.load(str(optimized)).graph.node}
    out, ref = _run(qdq, inputs), inputs[conv.output[0]]
    assert np.abs(out - ref).max() <= 0.05 * (ref.max() - ref.min())  # QDQ computes the same conv


def test_zoo_model_latency(zoo):
    model, feeds = zoo
    ways = [model_latency_ms(m, feeds, repeats=5) for m in (model, model.SerializeToString(), str(MODELS / "zoo_resnet.onnx"))]
    assert max(ways) < 1000 and max(ways) < 5 * min(ways), ways  # one model passed three ways: the same order
    # a timer, not a constant: 64 samples in one run take far longer than one (about 65x here)
    many = model_latency_ms(model, {k: np.repeat(v, 64, axis=0) for k, v in feeds.items()}, repeats=3)
    assert many > 8 * ways[0], (many, ways)


def _tiny() -> onnx.ModelProto:
    """Opset 13: Gemm (transB), MatMul with a constant A, ConvTranspose."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="gemm", transB=1),
             helper.make_node("MatMul", ["a", "g"], ["m"], name="matmul"),
             helper.make_node("Reshape", ["m", "shape"], ["r"], name="reshape"),
             helper.make_node("ConvTranspose", ["r", "k"], ["y"], name="deconv")]
    inits = [("w", rand(8, 6)), ("b", rand(8)), ("a", rand(5, 4)), ("shape", np.array([1, 5, 2, 4], np.int64)),
             ("k", rand(5, 3, 2, 2))]
    return make(nodes, [tensor("x", [4, 6])], [tensor("y", [1, 3, 3, 5])], inits, opset=13)


def test_tiny_model_layout_and_opset():
    model = _tiny()
    feeds = {"x": rand(4, 6)}
    values = {k: v.numpy() for k, v in Mirror(model).run(feeds, outputs=["x", "g", "m", "r", "y"]).items()}
    axes = {"gemm": ("w", 0), "matmul": ("a", 0), "deconv": ("k", 1)}
    for name, (weight, axis) in axes.items():
        node = next(n for n in model.graph.node if n.name == name)
        inputs = {t: values[t] for t in [*node.input, node.output[0]] if t in values}
        assert default_opset(single_node_model(model, name, inputs, None)) == 13
        for pair, opset, wtype in [((8, 8), 13, TensorProto.INT8), ((4, 4), 21, TensorProto.INT4),
                                   ((2, 4), 25, TensorProto.INT2)]:
            qdq = single_node_model(model, name, inputs, pair)
            onnx.checker.check_model(qdq)
            assert default_opset(qdq) == opset
            inits = {t.name: t for t in qdq.graph.initializer}
            assert inits[f"{weight}_quantized"].data_type == wtype
            dq = next(n for n in qdq.graph.node if n.name == f"{weight}_DequantizeLinear")
            assert next(a.i for a in dq.attribute if a.name == "axis") == axis
            assert qdq.graph.output[0].name == f"{node.output[0]}_dequantized"
            ref = values[node.output[0]]
            out = _run(qdq, inputs)
            assert out.shape == ref.shape
            if pair == (8, 8):
                assert np.abs(out - ref).max() <= 0.05 * (ref.max() - ref.min())
    table = node_latency_table(model, feeds, ["gemm", "matmul", "deconv"], [(8, 8), (3, 3)], repeats=2)
    assert all(ms > 0 for row in table.values() for ms in row.values())


def test_bad_requests_are_one_line_errors(zoo):
    model, feeds = zoo
    conv = next(n for n in model.graph.node if n.op_type == "Conv").name
    with pytest.raises(QLimitError, match="no node named"):
        node_latency_table(model, feeds, ["nope"], [(8, 8)])
    relu = next(n for n in model.graph.node if n.op_type == "Relu").name
    with pytest.raises(QLimitError, match="latency is measured for"):
        node_latency_table(model, feeds, [relu], [(8, 8)])
    with pytest.raises(QLimitError, match="wbits"):
        node_latency_table(model, feeds, [conv], [(1, 8)])
