"""Loading: constants -> initializers, BatchNormalization folding, metadata, opsets, errors."""
from __future__ import annotations

import logging

import onnx
import pytest
from onnx import helper, numpy_helper

from onnxqlimit import LoadConfig, Mirror, QLimitError, load_model
from onnxqlimit.load import default_opset
from onnxqlimit.parity import check_mirror
from tests.onnx_builders import bn_inits, bn_node, if_model, make, rand, tensor


def assert_parity(original: onnx.ModelProto, loaded: onnx.ModelProto, feeds) -> None:
    rows = check_mirror(original, Mirror(loaded), feeds)
    assert all(r.ok for r in rows), rows


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("simplify", [False, True])
def test_constant_weights_become_initializers(simplify):
    weight = numpy_helper.from_array(rand(4, 3, 3, 3), "w_const")
    nodes = [helper.make_node("Constant", [], ["w"], value=weight),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    model = make(nodes, [tensor("x", ["n", 3, 8, 8])], [tensor("y", ["n", 4, 8, 8])])
    loaded = load_model(model, LoadConfig(simplify=simplify))
    assert "Constant" not in op_types(loaded)
    conv = next(n for n in loaded.graph.node if n.op_type == "Conv")
    assert conv.input[1] in {t.name for t in loaded.graph.initializer}
    assert_parity(model, loaded, {"x": rand(2, 3, 8, 8)})


def _conv_bn_model(op: str, group: int = 1, with_bias: bool = True):
    cin, cout = 4, 6
    if op == "Conv":
        w, attrs = rand(cout, cin // group, 3, 3), {"pads": [1, 1, 1, 1], "group": group}
    else:
        w, attrs = rand(cin, cout // group, 3, 3), {"strides": [2, 2], "group": group}
    inits = [("w", w)] + ([("b", rand(cout))] if with_bias else []) + bn_inits("bn", cout)
    nodes = [helper.make_node(op, ["x", "w"] + (["b"] if with_bias else []), ["c"], **attrs),
             bn_node("bn", "c", "y")]
    return make(nodes, [tensor("x", ["n", cin, 5, 5])], [tensor("y", ["n", "c", "h", "w"])], inits)


@pytest.mark.parametrize("op,group,with_bias", [("Conv", 1, True), ("Conv", 2, False),
                                                ("ConvTranspose", 1, False), ("ConvTranspose", 2, True)])
def test_batchnorm_folds_into_conv(op, group, with_bias):
    model = _conv_bn_model(op, group, with_bias)
    loaded = load_model(model, LoadConfig(simplify=False))
    assert op_types(loaded) == [op]
    assert loaded.graph.node[0].output[0] == "y"  # the BN's output name survives
    assert_parity(model, loaded, {"x": rand(2, 4, 5, 5)})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_batchnorm_folds_into_gemm(trans_b):
    w = rand(5, 8) if trans_b else rand(8, 5)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=trans_b, alpha=0.5, beta=2.0),
             bn_node("bn", "g", "y")]
    model = make(nodes, [tensor("x", ["n", 8])], [tensor("y", ["n", 5])], [("w", w), ("b", rand(5))] + bn_inits("bn", 5))
    loaded = load_model(model, LoadConfig(simplify=False))
    assert op_types(loaded) == ["Gemm"]
    assert_parity(model, loaded, {"x": rand(3, 8)})


def test_batchnorm_kept_when_conv_output_is_shared():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("bn", "c", "b"),
             helper.make_node("Add", ["b", "c"], ["y"])]
    model = make(nodes, [tensor("x", [1, 4, 5, 5])], [tensor("y", ["n", "c", "h", "w"])], [("w", rand(6, 4, 1, 1))] + bn_inits("bn", 6))
    loaded = load_model(model, LoadConfig(simplify=False))
    assert "BatchNormalization" in op_types(loaded)
    assert_parity(model, loaded, {"x": rand(1, 4, 5, 5)})


def test_metadata_survives_and_onnxsim_keys_are_dropped():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    meta = {"character": "a\nb\nc", "author": "someone"}
    model = make(nodes, [tensor("x", [1, 3])], [tensor("y", [1, 3])], metadata=meta)
    loaded = load_model(model)
    assert {p.key: p.value for p in loaded.metadata_props} == meta


def test_old_opset_is_raised_to_13():
    nodes = [helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0]), helper.make_node("Relu", ["u"], ["y"])]
    model = make(nodes, [tensor("x", [2, 3])], [tensor("y", [1, 2, 3])], opset=11)
    loaded = load_model(model, LoadConfig(simplify=False))
    assert default_opset(loaded) == 13
    assert_parity(model, loaded, {"x": rand(2, 3)})


def test_unsorted_graph_is_sorted():
    nodes = [helper.make_node("Relu", ["a"], ["y"]), helper.make_node("Neg", ["x"], ["a"])]
    graph = helper.make_graph(nodes, "g", [tensor("x", [2])], [tensor("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    loaded = load_model(model, LoadConfig(simplify=False))
    assert op_types(loaded) == ["Neg", "Relu"]


def test_simplifier_failure_falls_back_with_a_warning(caplog, monkeypatch):
    import onnxsim

    def broken(*args, **kwargs):
        raise RuntimeError("Nodes in a graph must be topologically sorted")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    with caplog.at_level(logging.WARNING, logger="onnxqlimit"):
        loaded = load_model(if_model())
    assert "If" in op_types(loaded)
    assert "onnxsim failed" in caplog.text


def test_missing_and_garbage_files_give_clear_errors(tmp_path):
    with pytest.raises(QLimitError, match="no such model file"):
        load_model(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01this is not a protobuf\xff\xff")
    with pytest.raises(QLimitError):
        load_model(junk)


def test_invalid_model_is_refused():
    graph = helper.make_graph([helper.make_node("Relu", ["missing"], ["y"])], "g", [tensor("x", [2])], [tensor("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(QLimitError, match="invalid ONNX model"):
        load_model(model)


def test_initializers_made_while_loading_are_named_after_their_reader():
    """BatchNorm folding and onnxsim's constant folding make new initializers; their
    generated names (`_v_81`) would map back to nothing in the user's model."""
    from tests.conftest import MODELS

    path = MODELS / "zoo_resnet.onnx"
    original = {t.name for t in onnx.load(str(path)).graph.initializer}
    model = load_model(path)
    nodes = {n.name: n for n in model.graph.node}
    new = [t.name for t in model.graph.initializer if t.name not in original]
    assert new and not [n for n in new if n.startswith("_v_")]
    for name in new:
        node, role = name.rsplit(".", 1)
        assert role in ("weight", "bias") and name in nodes[node].input
