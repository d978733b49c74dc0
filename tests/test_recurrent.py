"""Recurrent ops in the mirror (LSTM, GRU, RNN) against onnxruntime, attribute by attribute
(the onnx package's own node cases run in test_onnx_node_tests)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from onnxqlimit.errors import QLimitError
from onnxqlimit.mirror import Mirror
from onnxqlimit.parity import ort_session

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
SEQ, BATCH, INPUT, HIDDEN = 7, 3, 5, 4


def _model(op: str, direction="forward", layout=0, lens=False, states=False, peepholes=False, **attrs):
    """One recurrent node with random weights as initializers; inputs X (+ sequence_lens,
    initial states), outputs Y and the final state(s)."""
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    inits = [helper.make_tensor(name, TensorProto.FLOAT, shape, rng.normal(0, 0.5, shape).astype(np.float32).ravel())
             for name, shape in (("W", (dirs, g * HIDDEN, INPUT)), ("R", (dirs, g * HIDDEN, HIDDEN)),
                                 ("B", (dirs, 2 * g * HIDDEN)))]
    x_shape = [SEQ, BATCH, INPUT] if layout == 0 else [BATCH, SEQ, INPUT]
    s_shape = [dirs, BATCH, HIDDEN] if layout == 0 else [BATCH, dirs, HIDDEN]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    node_inputs = ["X", "W", "R", "B", "", ""]
    n_states = 2 if op == "LSTM" else 1
    if lens:
        graph_inputs.append(helper.make_tensor_value_info("L", TensorProto.INT32, [BATCH]))
        node_inputs[4] = "L"
    if states:
        for i, name in enumerate(["H0", "C0"][:n_states]):
            graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, s_shape))
            node_inputs[5:] = node_inputs[5:5 + i] + [name]
    if peepholes:
        inits.append(helper.make_tensor("P", TensorProto.FLOAT, (dirs, 3 * HIDDEN),
                                        rng.normal(0, 0.5, (dirs, 3 * HIDDEN)).astype(np.float32).ravel()))
        node_inputs = node_inputs[:5] + (node_inputs[5:] + ["", ""])[:2] + ["P"]
    while node_inputs and node_inputs[-1] == "":
        node_inputs.pop()
    outputs = ["Y", "Y_h", "Y_c"][:1 + n_states]
    node = helper.make_node(op, node_inputs, outputs, hidden_size=HIDDEN, direction=direction, layout=layout, **attrs)
    graph = helper.make_graph([node], "rnn", graph_inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * (4 if o == "Y" else 3))
                               for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    feeds = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.name == "L":
            feeds["L"] = np.array([SEQ, 3, 5][:BATCH], np.int32)
        else:
            feeds[value.name] = rng.normal(0, 1, shape).astype(np.float32)
    return feeds


CASES = [
    ("LSTM", {}),
    ("LSTM", {"direction": "bidirectional", "lens": True, "states": True, "peepholes": True}),
    ("LSTM", {"direction": "reverse", "lens": True, "layout": 1, "states": True}),
    ("LSTM", {"input_forget": 1, "clip": 0.7}),
    ("LSTM", {"activations": ["HardSigmoid", "LeakyRelu", "Tanh"], "activation_alpha": [0.3, 0.2],
              "activation_beta": [0.4]}),
    ("GRU", {"direction": "bidirectional", "lens": True, "states": True}),
    ("GRU", {"linear_before_reset": 1, "direction": "reverse", "layout": 1}),
    ("GRU", {"clip": 0.5, "lens": True}),
    ("RNN", {"direction": "bidirectional", "lens": True, "states": True, "layout": 1}),
    ("RNN", {"activations": ["Relu"]}),
]


@pytest.mark.parametrize("op,options", CASES, ids=[f"{op}-{i}" for i, (op, _) in enumerate(CASES)])
def test_recurrent_op_matches_onnxruntime(op, options):
    model = _model(op, **options)
    onnx.checker.check_model(model)
    feeds = _feeds(model)
    if options.get("layout") == 1:  # onnxruntime runs layout 0 only: the same weights there, axes swapped
        swapped = {k: v if k == "L" else np.swapaxes(v, 0, 1) for k, v in feeds.items()}
        reference = _model(op, **{**options, "layout": 0})
        y, *final = ort_session(reference.SerializeToString()).run(None, swapped)
        expected = [y.transpose(2, 0, 1, 3)] + [np.swapaxes(f, 0, 1) for f in final]
    else:
        expected = ort_session(model.SerializeToString()).run(None, feeds)
    with torch.no_grad():
        got = Mirror(model).run({k: torch.from_numpy(v) for k, v in feeds.items()})
    for name, want in zip([o.name for o in model.graph.output], expected):
        np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_unsupported_recurrent_attributes_are_refused_in_one_line():
    with pytest.raises(QLimitError, match="activation Gelu"):
        Mirror(_model("RNN", activations=["Gelu"]))
    with pytest.raises(QLimitError, match="activations given"):
        Mirror(_model("GRU", activations=["Sigmoid"]))


def _conv_recurrent_model(op: str) -> onnx.ModelProto:
    """x [batch, 4, 40] -> Conv1d -> Relu -> [time, batch, channels] -> op -> final state -> Gemm."""
    rng = np.random.default_rng(2)
    hidden, g = 6, GATES[op]

    def init(name, *shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape, rng.normal(0, 0.4, shape).astype(np.float32).ravel())

    outputs = ["", "h"] + (["c"] if op == "LSTM" else [])
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["conv"], strides=[2]),
             helper.make_node("Relu", ["conv"], ["act"]),
             helper.make_node("Transpose", ["act"], ["seq"], perm=[2, 0, 1]),
             helper.make_node(op, ["seq", "W", "R", "B"], outputs, hidden_size=hidden),
             helper.make_node("Squeeze", ["h", "axes"], ["last"]),
             helper.make_node("Gemm", ["last", "fw", "fb"], ["y"], transB=1)]
    inits = [init("cw", 8, 4, 3), init("cb", 8), init("W", 1, g * hidden, 8), init("R", 1, g * hidden, hidden),
             init("B", 1, 2 * g * hidden), init("fw", 3, hidden), init("fb", 3),
             helper.make_tensor("axes", TensorProto.INT64, [1], [0])]
    graph = helper.make_graph(nodes, "conv_rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 40])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("method", ["rtn", pytest.param("qdrop", marks=pytest.mark.slow)])
def test_a_model_with_a_recurrent_layer_quantizes_around_it_and_its_weights(tmp_path, op, method):
    """W4A8: the Conv and Gemm at 4 bits in integer kernels; the recurrent layer's W and R
    int8 (at least 8 bits by default) with one scale per gate row, dequantized in front
    of it; the file passes the integer parity check against the mirror."""
    from onnx import numpy_helper

    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize

    source = tmp_path / f"{op}.onnx"
    onnx.save(_conv_recurrent_model(op), str(source))
    calib = {"x": np.random.default_rng(3).normal(size=(32, 4, 40)).astype(np.float32)}
    result = quantize(str(source), tmp_path / "q.onnx", calib, QuantConfig.of(wbits=4, abits=8, first_last_bits=None),
                      RunOptions(recon=ReconConfig(method=method, calib_size=32, batch_size=8, iters=20),
                                 progress=False))
    assert all(p["within_one_step"] > 0.99 for p in result.report.parity)
    model = onnx.load(str(result.output_path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    made = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.op_type == op)
    for name in node.input[1:3]:
        dq = made[name]
        assert dq.op_type == "DequantizeLinear" and helper.get_attribute_value(dq.attribute[0]) == 1
        assert inits[dq.input[0]].dtype == np.int8 and inits[dq.input[1]].shape == (GATES[op] * 6,)
    assert str(inits[made[made["conv"].input[1]].input[0]].dtype) == "int4"  # the Conv at 4 bits
    session = ort_session(result.output_path.read_bytes())
    assert session.run(None, {"x": calib["x"][:2]})[0].shape == (2, 3)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_a_recurrent_layer_is_a_block_of_its_own_that_tunes_its_weights(op):
    """At one layer per block the recurrence is a unit of its own, between the Conv's block
    and the Gemm's: its final hidden state is the block's output (the loss), and its W and R
    are the quantizers that block tunes."""
    from onnxqlimit.load import load_model
    from onnxqlimit.mirror import Mirror
    from onnxqlimit.quant.config import QuantConfig
    from onnxqlimit.quant.policy import place
    from onnxqlimit.recon.blocks import BlockConfig, find_blocks
    from onnxqlimit.recon.runner import quantizer_owners

    model = load_model(_conv_recurrent_model(op))
    blocks = find_blocks(model, BlockConfig(granularity="layer"))
    kinds = [[model.graph.node[i].op_type for i in b.node_range] for b in blocks]
    owner = next(i for i, names in enumerate(kinds) if op in names)
    assert "Conv" not in kinds[owner] and "Gemm" not in kinds[owner] and len(blocks) == 3
    assert blocks[owner].loss_outputs == ["last"]  # the final hidden state (its Squeeze joins the block)
    owners, _ = quantizer_owners(Mirror(model), blocks, place(model, QuantConfig.of(wbits=8, abits=8)))
    assert {"W", "R"} == {p.tensor for p in owners[owner] if p.kind == "weight"}
