"""Control flow in the mirror (If, nested, reading outer tensors) and quantization around it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from onnxqlimit.errors import QLimitError
from onnxqlimit.graph import all_nodes
from onnxqlimit.mirror import Mirror
from onnxqlimit.parity import ort_session
from tests.onnx_builders import layers_in_subgraphs_model, loop_model, make, tensor, vad_model


@pytest.mark.parametrize("sr", [16000, 8000])
@pytest.mark.parametrize("sign", [1, -1])
def test_nested_if_with_an_lstm_in_a_branch_matches_onnxruntime(sr, sign):
    """Each of the three branches is taken on some input (the outer If on the scalar sr, the
    inner one on the sign of the features), and every branch reads tensors of the scopes
    around it that it never declares."""
    model = vad_model()
    x = np.random.default_rng(0).normal(size=(3, 4, 40)).astype(np.float32) * sign
    feeds = {"x": x, "sr": np.array(sr, np.int64)}
    want = ort_session(model.SerializeToString()).run(None, feeds)[0]
    with torch.no_grad():
        got = Mirror(model).run({k: torch.from_numpy(v) for k, v in feeds.items()})["y"].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["rtn", pytest.param("qdrop", marks=pytest.mark.slow)])
def test_a_model_with_nested_if_quantizes_around_it_and_passes_parity(tmp_path, method):
    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize

    source = tmp_path / "vad.onnx"
    onnx.save(vad_model(sr_input=False), str(source))
    calib = {"x": np.random.default_rng(1).normal(size=(32, 4, 40)).astype(np.float32)}
    result = quantize(str(source), tmp_path / "q.onnx", calib, QuantConfig.of(wbits=8, abits=8),
                      RunOptions(recon=ReconConfig(method=method, calib_size=32, batch_size=8, iters=20),
                                 progress=False))
    assert all(p["within_one_step"] > 0.99 for p in result.report.parity)
    model = onnx.load(str(result.output_path))
    onnx.checker.check_model(model)
    node = next(n for n in model.graph.node if n.op_type == "If")
    assert {a.name for a in node.attribute} == {"then_branch", "else_branch"}
    assert any(n.op_type == "DequantizeLinear" and n.input[0] == "cw_quantized" for n in model.graph.node)
    session = ort_session(result.output_path.read_bytes())
    for scale in (1.0, 0.3):  # both outer branches (the condition is the input's largest value above 3)
        assert session.run(None, {"x": calib["x"][:2] * scale})[0].shape == (2, 3)


def test_an_unsupported_op_inside_a_branch_is_refused_in_one_line():
    branch = helper.make_graph([helper.make_node("Det", ["x"], ["d"])], "then", [], [tensor("d", [2])])
    other = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["s"], axes=[1, 2], keepdims=0)], "else", [],
                              [tensor("s", [2])])
    model = make([helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
                  helper.make_node("Greater", ["m", "zero"], ["c"]),
                  helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
                 [tensor("x", [2, 3, 3])], [tensor("y", [2])], [("zero", np.array(0, np.float32))], opset=13)
    with pytest.raises(QLimitError, match=r"unsupported ops: Det \(1 node\)"):
        Mirror(model)


def test_a_scalar_input_calibrates_from_one_value_or_one_per_sample(tmp_path):
    """sr, an int64 scalar: a 0-d value serves every sample, (N,) gives one per sample (a
    batch shares one); mixed values in a batch and a wrong rank are refused in one line."""
    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
    from onnxqlimit.data import load_npz

    source = tmp_path / "vad.onnx"
    onnx.save(vad_model(), str(source))
    x = np.random.default_rng(1).normal(size=(16, 4, 40)).astype(np.float32)
    options = RunOptions(recon=ReconConfig(method="rtn", calib_size=16), progress=False, overwrite=True)
    outputs = {}
    for sr in (np.array(16000, np.int64), np.full(16, 8000, np.int64)):
        result = quantize(str(source), tmp_path / "q.onnx", {"x": x, "sr": sr}, QuantConfig.of(wbits=8, abits=8),
                          options)
        assert all(p["within_one_step"] > 0.99 for p in result.report.parity)
        session = ort_session(result.output_path.read_bytes())
        outputs[int(sr.reshape(-1)[0])] = session.run(None, {"x": x[:2], "sr": np.array(int(sr.reshape(-1)[0]))})[0]
    assert not np.allclose(outputs[16000], outputs[8000])  # the two calibrations took different branches
    for bad, message in ((np.array([16000, 8000] * 8, np.int64), "samples of a batch must share its value"),
                         (np.full((16, 1), 16000, np.int64), "give one 0-d value for every sample")):
        with pytest.raises(QLimitError, match=message):
            quantize(str(source), tmp_path / "bad.onnx", {"x": x, "sr": bad}, QuantConfig.of(wbits=8, abits=8), options)
        assert not (tmp_path / "bad.onnx").exists()
    path = tmp_path / "calib.npz"
    np.savez(path, x=x, sr=np.array(16000, np.int64))
    assert load_npz(path, ["x", "sr"])["sr"].shape == ()


@pytest.mark.parametrize("method", ["rtn", pytest.param("qdrop", marks=pytest.mark.slow)])
def test_a_state_input_batched_along_a_later_axis_calibrates_from_stacked_samples(tmp_path, method):
    """state [2, batch, 6]: samples stacked on a new first axis (N x 2 x 1 x 6) are joined
    along the batch axis where the model runs (mirror, reconstruction caches, onnxruntime)."""
    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
    from tests.onnx_builders import stateful_model

    source = tmp_path / "step.onnx"
    onnx.save(stateful_model(), str(source))
    rng = np.random.default_rng(1)
    calib = {"x": rng.normal(size=(16, 4, 40)).astype(np.float32),
             "state": rng.normal(0, 0.3, size=(16, 2, 1, 6)).astype(np.float32)}
    result = quantize(str(source), tmp_path / "q.onnx", calib, QuantConfig.of(wbits=8, abits=8),
                      RunOptions(recon=ReconConfig(method=method, calib_size=16, batch_size=8, iters=20),
                                 progress=False))
    assert {p["output"] for p in result.report.parity} == {"y", "state_out"}
    assert all(p["within_one_step"] > 0.99 for p in result.report.parity)
    # The file takes the state as the model declares it: one call for 3 samples
    state = np.concatenate(list(calib["state"][:3]), axis=1)
    y, state_out = ort_session(result.output_path.read_bytes()).run(None, {"x": calib["x"][:3], "state": state})
    assert y.shape == (3, 3) and state_out.shape == (2, 3, 6)


def test_a_state_of_a_model_exported_at_batch_1_joins_samples_along_its_axis_of_size_1(tmp_path):
    """Every dimension fixed (x [1, 4, 40], state [2, 1, 6]): stacked samples are joined along
    the state's axis of size 1 in the mirror, and onnxruntime runs them one at a time."""
    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
    from onnxqlimit.data import model_feeds
    from tests.onnx_builders import stateful_model

    source = tmp_path / "step.onnx"
    onnx.save(stateful_model(batch=1), str(source))
    rng = np.random.default_rng(2)
    calib = {"x": rng.normal(size=(16, 4, 40)).astype(np.float32),
             "state": rng.normal(0, 0.3, size=(16, 2, 1, 6)).astype(np.float32)}
    joined = model_feeds({"x": calib["x"][:5], "state": calib["state"][:5]}, {"x": [1, 4, 40], "state": [2, 1, 6]})
    assert joined["state"].shape == (2, 5, 6)
    np.testing.assert_array_equal(joined["state"][:, 3], calib["state"][3, :, 0])
    result = quantize(str(source), tmp_path / "q.onnx", calib, QuantConfig.of(wbits=8, abits=8),
                      RunOptions(recon=ReconConfig(method="rtn", calib_size=16, batch_size=8), progress=False))
    assert all(p["within_one_step"] > 0.99 for p in result.report.parity)


def test_a_branch_no_calibration_sample_takes_is_named(tmp_path, caplog):
    import logging

    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize

    source = tmp_path / "vad.onnx"
    onnx.save(vad_model(), str(source))
    calib = {"x": np.random.default_rng(1).normal(size=(8, 4, 40)).astype(np.float32), "sr": np.array(16000)}
    with caplog.at_level(logging.WARNING, logger="onnxqlimit"):
        quantize(str(source), tmp_path / "q.onnx", calib, QuantConfig.of(wbits=8, abits=8),
                 RunOptions(recon=ReconConfig(method="rtn", calib_size=8), progress=False))
    untaken = sorted(r.getMessage() for r in caplog.records if "not taken" in r.getMessage())
    # sr 16000 takes the outer then-branch; its features are ReLU outputs, so the inner If's
    # condition (their mean > 0) always holds
    assert len(untaken) == 2 and "else_branch was not taken" in untaken[0]
    assert any("then_branch > If" in m and m.endswith("else_branch was not taken on any calibration sample")
               for m in untaken)


def test_a_loop_with_scan_outputs_and_an_outer_read_matches_onnxruntime():
    model = loop_model()
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    want = ort_session(model.SerializeToString()).run(None, {"x": x})
    with torch.no_grad():
        got = Mirror(model).run({"x": torch.from_numpy(x)})
    for name, value in zip(("z", "steps"), want):
        np.testing.assert_allclose(got[name].numpy(), value, rtol=1e-6)


def test_a_scan_over_a_later_axis_in_reverse_matches_onnxruntime():
    """Running sum over axis 1, read backwards, written out along axis 1; the body reads
    an outer tensor (`scale`)."""
    body = helper.make_graph(
        [helper.make_node("Add", ["sum_in", "x_t"], ["sum_raw"]),
         helper.make_node("Mul", ["sum_raw", "scale"], ["sum_out"]),
         helper.make_node("Identity", ["sum_out"], ["y_t"])], "body",
        [tensor("sum_in", [2]), tensor("x_t", [2])], [tensor("sum_out", [2]), tensor("y_t", [2])])
    node = helper.make_node("Scan", ["init", "x"], ["total", "y"], body=body, num_scan_inputs=1,
                            scan_input_axes=[1], scan_input_directions=[1], scan_output_axes=[1])
    model = make([node], [tensor("init", [2]), tensor("x", [2, 5])], [tensor("total", [2]), tensor("y", [2, 5])],
                 [("scale", np.array(0.9, np.float32))], opset=17)
    feeds = {"init": np.ones(2, np.float32), "x": np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)}
    want = ort_session(model.SerializeToString()).run(None, feeds)
    with torch.no_grad():
        got = Mirror(model).run({k: torch.from_numpy(v) for k, v in feeds.items()})
    for name, value in zip(("total", "y"), want):
        np.testing.assert_allclose(got[name].numpy(), value, rtol=1e-6)


def _subgraph_ops(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Op types in each subgraph, by '<node> <attribute>'."""
    found = {}
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found[f"{node.op_type} {attr.name}"] = [n.op_type for n in attr.g.node]
    return found


def _both_branches_calibration() -> dict[str, np.ndarray]:
    """Half the samples below the If's threshold (the else-branch), half above it."""
    x = np.random.default_rng(1).normal(size=(32, 4, 16)).astype(np.float32)
    x[:16] *= 0.2
    x[16:] *= 3
    return {"x": x}


@pytest.mark.parametrize("method", ["rtn", pytest.param("qdrop", marks=pytest.mark.slow)])
def test_layers_inside_branches_and_a_loop_body_get_their_own_qdq_and_integer_kernels(tmp_path, method, caplog):
    """Each branch's Conv and the Loop body's MatMul are quantized in their own subgraph (the
    then-branch's weight came from a Constant node there), the integer check reaches the
    tensors inside them, and onnxruntime runs those layers in integer kernels."""
    import logging

    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize

    source = tmp_path / "m.onnx"
    onnx.save(layers_in_subgraphs_model(), str(source))
    calib = _both_branches_calibration()
    with caplog.at_level(logging.WARNING, logger="onnxqlimit"):
        result = quantize(str(source), tmp_path / "q.onnx", calib, QuantConfig.of(wbits=8, abits=8),
                          RunOptions(recon=ReconConfig(method=method, calib_size=32, batch_size=8, iters=20),
                                     progress=False))
    assert not [r for r in caplog.records if "not taken" in r.getMessage()]
    model = onnx.load(str(result.output_path))
    onnx.checker.check_model(model)
    ops = _subgraph_ops(model)
    for name in ("If then_branch", "If else_branch", "Loop body"):
        assert ops[name].count("DequantizeLinear") >= 2, (name, ops[name])  # the weight's and the input's
    assert "QuantizeLinear" in ops["Loop body"]
    # the integer check covered the subgraphs' activations: v_pos twice per sample (two
    # Loop steps) and the branch Convs' outputs, beyond the main graph's x, feat and flat
    main_only = 2 * (4 * 16 + 8 * 14 + 96)
    assert result.report.integer_parity["elements"] > main_only
    assert result.report.integer_parity["flipped"] == 0
    options = onnxruntime_options(tmp_path / "opt.onnx")
    import onnxruntime as ort

    ort.InferenceSession(str(result.output_path), options, providers=["CPUExecutionProvider"])
    optimized = _subgraph_ops(onnx.load(str(tmp_path / "opt.onnx")))
    assert "QLinearConv" in optimized["If then_branch"] and "QLinearConv" in optimized["If else_branch"]
    assert "MatMulIntegerToFloat" in optimized["Loop body"]
    float_session, session = ort_session(str(source)), ort_session(str(result.output_path))
    for x in (calib["x"][:4], calib["x"][-4:]):  # each branch, against the float model
        want, got = float_session.run(None, {"x": x})[0], session.run(None, {"x": x})[0]
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def onnxruntime_options(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    return options


def test_a_branch_is_one_block_owning_the_quantizers_inside_it():
    """At one layer per block the main Conv, the If, the Loop and the head are blocks of their
    own; the If's block tunes every quantizer inside its branches and takes the outer `feat`
    in quantized on entry, though it reads it only from inside the branches."""
    from onnxqlimit.load import load_model
    from onnxqlimit.quant.config import QuantConfig
    from onnxqlimit.quant.policy import place
    from onnxqlimit.recon.blocks import BlockConfig, find_blocks
    from onnxqlimit.recon.runner import quantizer_owners

    model = load_model(layers_in_subgraphs_model())
    blocks = find_blocks(model, BlockConfig(granularity="layer"))
    ops = [[model.graph.node[i].op_type for i in b.node_range] for b in blocks]
    owner = next(b.index for b, names in zip(blocks, ops) if "If" in names)
    assert "Conv" not in ops[owner] and any("Loop" in names for names in ops[owner + 1:])
    points = place(model, QuantConfig.of(wbits=8, abits=8))
    owners, on_entry = quantizer_owners(Mirror(model), blocks, points)
    tuned_by_if = {p.tensor for p in owners[owner]}
    branch_conv = next(n for n in all_nodes(model.graph) if n.op_type == "Conv" and "then_conv" in n.output)
    assert {branch_conv.input[1], "ew", "feat", "then_out"} <= tuned_by_if  # (tw, named after its reader at load)
    assert "feat" in on_entry and "lw" not in tuned_by_if


def test_constants_inside_branches_move_to_the_main_graph_unless_their_name_is_reused():
    """Both branches of this If hold a Constant named `k` (sibling scopes may reuse a name):
    those stay where they are; the then-branch's `w` is lifted and read from the outer scope.
    The loaded model still passes the checker and computes what the original did."""
    from onnxqlimit.load import load_model

    def branch(name, scale):
        return helper.make_graph(
            [helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(np.array(scale, np.float32))),
             *([helper.make_node("Constant", [], ["w"], value=onnx.numpy_helper.from_array(
                 np.full((3, 3), 0.5, np.float32)))] if name == "then" else []),
             helper.make_node("Mul", ["x", "k"], [f"{name}_scaled"]),
             helper.make_node("MatMul", [f"{name}_scaled", "w" if name == "then" else "v"], [f"{name}_out"])],
            name, [], [tensor(f"{name}_out", [2, 3])])

    model = make([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                  helper.make_node("Greater", ["s", "zero"], ["c"]),
                  helper.make_node("If", ["c"], ["y"], then_branch=branch("then", 2.0), else_branch=branch("else", 3.0))],
                 [tensor("x", [2, 3])], [tensor("y", [2, 3])],
                 [("zero", np.array(0, np.float32)), ("v", np.full((3, 3), 0.25, np.float32))])
    loaded = load_model(model)
    onnx.checker.check_model(loaded)
    assert "w" in {t.name for t in loaded.graph.initializer}
    node = next(n for n in loaded.graph.node if n.op_type == "If")
    for attr in node.attribute:
        assert [n.op_type for n in attr.g.node if n.op_type == "Constant"] == ["Constant"]  # `k` stays
    for sign in (1, -1):
        x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32) ** 2 * sign
        want = ort_session(model.SerializeToString()).run(None, {"x": x})[0]
        got = ort_session(loaded.SerializeToString()).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-6)
        with torch.no_grad():
            np.testing.assert_allclose(Mirror(loaded).run({"x": torch.from_numpy(x)})["y"].numpy(), want, rtol=1e-5)


def test_constants_of_nested_branches_are_lifted_once_and_weights_behind_unsqueeze_folded():
    """An If inside an If branch whose LSTM reads W and R through Unsqueeze nodes of Constants
    (as torch exports an LSTM inside control flow): after loading, the Constants are main-graph
    initializers (each once: the model stays in SSA form), the Unsqueezes are folded into
    initializers of their output names, and the policy quantizes W and R."""
    from onnxqlimit.load import load_model
    from onnxqlimit.quant.config import QuantConfig
    from onnxqlimit.quant.policy import place

    rng = np.random.default_rng(7)

    def constant(name, *shape):
        return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(
            rng.normal(0, 0.4, shape).astype(np.float32), name))

    inner = helper.make_graph(
        [constant("w2d", 12, 2), constant("r2d", 12, 3),
         helper.make_node("Unsqueeze", ["w2d", "axis0"], ["w3d"]), helper.make_node("Unsqueeze", ["r2d", "axis0"], ["r3d"]),
         helper.make_node("LSTM", ["x", "w3d", "r3d"], ["", "h"], hidden_size=3)],
        "inner_then", [], [tensor("h", [1, None, 3])])
    inner_else = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
                                    helper.make_node("MatMul", ["m", "proj"], ["p"])], "inner_else", [],
                                   [tensor("p", [1, None, 3])])
    outer = helper.make_graph([helper.make_node("If", ["c"], ["inner_out"], then_branch=inner, else_branch=inner_else)],
                              "outer_then", [], [tensor("inner_out", [1, None, 3])])
    outer_else = helper.make_graph([helper.make_node("ReduceMax", ["x"], ["mx"], axes=[0], keepdims=1),
                                    helper.make_node("MatMul", ["mx", "proj"], ["q"])], "outer_else", [],
                                   [tensor("q", [1, None, 3])])
    model = make([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                  helper.make_node("Greater", ["s", "zero"], ["c"]),
                  helper.make_node("If", ["c"], ["y"], then_branch=outer, else_branch=outer_else)],
                 [tensor("x", [4, "b", 2])], [tensor("y", [1, "b", 3])],
                 [("zero", np.array(0, np.float32)), ("axis0", np.array([0], np.int64)),
                  ("proj", rng.normal(size=(2, 3)).astype(np.float32))])
    loaded = load_model(model)
    onnx.checker.check_model(loaded, full_check=True)
    names = [t.name for t in loaded.graph.initializer]
    assert {"w2d", "r2d", "w3d", "r3d"} <= set(names) and len(names) == len(set(names))
    weights = {p.tensor for p in place(loaded, QuantConfig.of(wbits=8, abits=8)) if p.kind == "weight"}
    assert {"w3d", "r3d", "proj"} <= weights
    x = np.abs(np.random.default_rng(0).normal(size=(4, 2, 2)).astype(np.float32))
    for sample in (x, -x):
        want = ort_session(model.SerializeToString()).run(None, {"x": sample})[0]
        np.testing.assert_allclose(ort_session(loaded.SerializeToString()).run(None, {"x": sample})[0], want, rtol=1e-6)
        with torch.no_grad():
            got = Mirror(loaded).run({"x": torch.from_numpy(sample)})["y"].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_gradient_of_sqrt_at_zero_is_zero_not_infinite():
    """A magnitude sqrt(re^2 + im^2) of a silent (quantized to 0) frame must not turn a
    reconstruction into NaN; the values stay torch.sqrt's."""
    from onnxqlimit.ops import get_converter
    from onnxqlimit.ops.registry import Node

    sqrt = get_converter("Sqrt", "")(Node("Sqrt", "s", ("x",), ("y",)))
    x = torch.tensor([0.0, 0.25, 4.0], requires_grad=True)
    y = sqrt(x)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.sqrt(x.detach()))
    assert torch.allclose(x.grad, torch.tensor([0.0, 1.0, 0.25]))


def test_first_and_last_layers_are_found_inside_branches_when_the_main_graph_has_none():
    """Every layer of this model sits in an If branch (as in a VAD that branches on the sample
    rate first): the first and last layers of each branch keep 8 bits at W4A4, the middle one
    of the then-branch takes 4."""
    from onnxqlimit.load import load_model
    from onnxqlimit.quant.config import QuantConfig
    from onnxqlimit.quant.policy import place

    rng = np.random.default_rng(8)
    then = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["t1"], name="then_first"), helper.make_node("Relu", ["t1"], ["t1r"]),
         helper.make_node("Conv", ["t1r", "w2"], ["t2"], name="then_middle"), helper.make_node("Relu", ["t2"], ["t2r"]),
         helper.make_node("Conv", ["t2r", "w3"], ["t3"], name="then_last")], "then", [], [tensor("t3", ["b", 4, 10])])
    other = helper.make_graph([helper.make_node("Conv", ["x", "w4"], ["e1"], name="else_only", pads=[2, 2])], "else", [],
                              [tensor("e1", ["b", 4, 14])])
    model = make([helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
                  helper.make_node("Greater", ["m", "zero"], ["c"]),
                  helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                 [tensor("x", ["b", 2, 16])], [tensor("y", ["b", 4, None])],
                 [("zero", np.array(0, np.float32)), ("w1", rng.normal(size=(4, 2, 3)).astype(np.float32)),
                  ("w2", rng.normal(size=(4, 4, 2)).astype(np.float32)),
                  ("w3", rng.normal(size=(4, 4, 2)).astype(np.float32)),
                  ("w4", rng.normal(size=(4, 2, 7)).astype(np.float32))])
    points = {p.tensor: p for p in place(load_model(model), QuantConfig.of(wbits=4, abits=4))}
    assert {name: points[name].spec.bits for name in ("w1", "w2", "w3", "w4")} == {"w1": 8, "w2": 4, "w3": 8, "w4": 8}
    assert points["x"].spec.bits == 8 and points["t2r"].spec.bits == 8 and points["t1r"].spec.bits == 4


def test_a_main_graph_constant_also_read_inside_a_branch_keeps_one_name_for_both():
    """Loading names a lifted constant after its single reader; a constant read once in the
    main graph and again inside a branch has two readers and keeps its name (renaming it for
    the main reader left the branch reading a tensor that no longer existed)."""
    from onnxqlimit.load import load_model

    then = helper.make_graph([helper.make_node("Add", ["x", "k"], ["t"])], "then", [], [tensor("t", [2, 3])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [tensor("e", [2, 3])])
    model = make([helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(np.float32(2.0))),
                  helper.make_node("Mul", ["x", "k"], ["xk"]),
                  helper.make_node("ReduceSum", ["xk"], ["s"], keepdims=0),
                  helper.make_node("Greater", ["s", "zero"], ["c"]),
                  helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                 [tensor("x", [2, 3])], [tensor("y", [2, 3])], [("zero", np.array(0, np.float32))])
    loaded = load_model(model)
    onnx.checker.check_model(loaded, full_check=True)
    x = np.abs(np.random.default_rng(0).normal(size=(2, 3))).astype(np.float32)
    want = ort_session(model.SerializeToString()).run(None, {"x": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(Mirror(loaded).run({"x": torch.from_numpy(x)})["y"].numpy(), want)


class _Scripted(torch.nn.Module):
    """Data-dependent control flow as torch.jit.script exports it: a Loop whose body Conv reads
    the carried value, an If on a tensor's mean, a GRU."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.refine = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.gru = torch.nn.GRU(8, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x, steps: torch.Tensor):
        h = torch.relu(self.conv(x))
        for _ in range(int(steps)):
            h = h + torch.relu(self.refine(h))
        if bool(h.mean() > 0):
            h = h * 2
        y, _ = self.gru(h.transpose(1, 2))
        return self.head(y[:, -1])


def test_a_torchscript_export_with_a_loop_an_if_and_a_gru_quantizes_into_integer_kernels(tmp_path):
    """The Loop body's Conv reads the Loop-carried value: its activation quantizer stands on the
    body's input, in the body, so onnxruntime runs it as QLinearConv like the layers outside."""
    import warnings

    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
    from onnxqlimit.runtime import compute_kernels

    torch.manual_seed(0)
    source = tmp_path / "scripted.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(_Scripted().eval()), (torch.randn(2, 4, 20), torch.tensor(3)), str(source),
                          dynamo=False, opset_version=17, input_names=["x", "steps"], output_names=["y"],
                          dynamic_axes={"x": {0: "b", 2: "t"}})
    ops = {n.op_type for n in all_nodes(onnx.load(str(source)).graph)}
    assert {"Loop", "If", "GRU"} <= ops
    calib = {"x": np.random.default_rng(0).normal(size=(32, 4, 20)).astype(np.float32), "steps": np.array(3)}
    result = quantize(str(source), tmp_path / "q.onnx", calib, QuantConfig.of(wbits=8, abits=8),
                      RunOptions(recon=ReconConfig(method="rtn", calib_size=32), progress=False))
    assert result.report.integer_parity["flipped"] == 0
    kinds, floats = compute_kernels(str(result.output_path))
    assert kinds["QLinearConv"] == 2 and kinds["QGemm"] == 1 and not floats


def _large_then_small(n: int = 32) -> dict[str, np.ndarray]:
    """Batches of 8 (the tests' reconstruction batch) that take the then-branch, then batches
    that take the else-branch (the If's condition is the batch's largest value above 3)."""
    x = _both_branches_calibration()["x"]
    return {"x": np.concatenate([x[16:16 + n // 2], x[:n // 2]])}


def test_bitops_count_a_loop_body_layer_per_iteration_and_the_branch_a_sample_takes(tmp_path):
    """Per sample at W8A8 (the first sample takes the then-branch): Conv_0 112 outputs x 12,
    the then-branch Conv 96 x 24, the Loop body's MatMul 96 x 12 twice (two iterations), the
    Gemm 3 x 96: 6240 MACs x 8 x 8."""
    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize

    source = tmp_path / "m.onnx"
    onnx.save(layers_in_subgraphs_model(), str(source))
    result = quantize(str(source), tmp_path / "q.onnx", _large_then_small(), QuantConfig.of(wbits=8, abits=8),
                      RunOptions(recon=ReconConfig(method="rtn", calib_size=32, batch_size=8), progress=False))
    assert result.report.costs["bitops"] == (112 * 12 + 96 * 24 + 2 * 96 * 12 + 3 * 96) * 64


@pytest.mark.slow
def test_a_size_budget_varies_layers_inside_branches_and_loop_bodies_but_not_in_an_untaken_branch(tmp_path):
    from onnxqlimit import MixedConfig, QuantConfig, ReconConfig, RunOptions, Targets, quantize
    from tests import cost_oracle

    source = tmp_path / "m.onnx"
    onnx.save(layers_in_subgraphs_model(), str(source))

    def run(calib, name, size):
        return quantize(str(source), tmp_path / f"{name}.onnx", calib, QuantConfig.of(wbits=8, abits=8),
                        RunOptions(recon=ReconConfig(method="rtn", calib_size=32, batch_size=8), progress=False,
                                   mixed=MixedConfig(targets=Targets(size_bytes=size))))

    both = run(_large_then_small(), "both", 1300)
    plan = cost_oracle.recorded_plan(onnx.load(str(both.output_path)))
    assert {plan[t] for t in ("tw", "ew", "lw")} - {8}, plan  # a layer in a branch or the body below 8 bits
    assert both.report.costs["size_bytes"] == both.report.costs["planned_size_bytes"] <= 1300
    # calibrated on the then-branch only: the else-branch's Conv keeps its width, so the same
    # budget cannot be met (no sample says what narrowing it would cost)
    with pytest.raises(QLimitError, match="cannot be met"):
        run({"x": _large_then_small()["x"][:16]}, "then_only", 1300)
