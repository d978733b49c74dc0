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
    graph = helper.make_graph([node], "rnn", graph_inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * (4 if o == "Y" else 3))
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
