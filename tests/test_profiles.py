"""Runtime profiles (quant/runtimes.py), checked on the files they write: integer types, zero
points, which tensors carry Q/DQ, int32 biases - and the widths each profile refuses."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from onnxqlimit.cli import main
from onnxqlimit.runtime import check_runtime

MODELS = Path(__file__).resolve().parent.parent / "models"
COMPUTE = ("Conv", "Gemm", "MatMul")


def _quantize(tmp_path: Path, *flags: str) -> onnx.ModelProto:
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(MODELS / "zoo_resnet.onnx"), "-o", str(out), "--calib",
                 str(MODELS / "zoo_resnet_calib.npz"), "--method", "rtn", "--calib-size", "16", "--quiet",
                 *flags]) == 0
    return onnx.load(str(out))


def _walk(model: onnx.ModelProto):
    """(weight DQs, bias DQs, activation Qs) of a file as (node, integers-or-zero-point, scale) rows."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    weights, biases, acts = [], [], []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            (biases if inits[node.input[0]].data_type == TensorProto.INT32 else weights).append(node)
        elif node.op_type == "QuantizeLinear":
            acts.append(node)
    return inits, producer, weights, biases, acts


def _zero_points(inits, nodes) -> list[np.ndarray]:
    return [numpy_helper.to_array(inits[n.input[2]]) for n in nodes if len(n.input) > 2]


def _fed_by(producer, tensor: str, op: str) -> bool:
    return tensor in producer and producer[tensor].op_type == op


@pytest.mark.parametrize("runtime", ["generic", "ort-cpu"])
def test_w8a8_is_written_in_the_form_onnxruntime_fuses(tmp_path, runtime):
    model = _quantize(tmp_path, "--runtime", runtime)
    inits, producer, weights, biases, acts = _walk(model)
    # uint8 activations with zero points, int8 symmetric per-channel weights (U8S8), int32 biases
    assert {inits[n.input[2]].data_type for n in acts} == {TensorProto.UINT8}
    assert {inits[n.input[0]].data_type for n in weights} == {TensorProto.INT8}
    assert all(not z.any() for z in _zero_points(inits, weights))
    assert all(numpy_helper.to_array(inits[n.input[1]]).ndim == 1 for n in weights)  # per channel
    compute = [n for n in model.graph.node if n.op_type in COMPUTE]
    assert len(biases) == len(compute)  # every Conv/Gemm of this net has a bias: all int32 now
    for node in compute:  # every input of every compute node comes out of a DequantizeLinear
        assert all(_fed_by(producer, t, "DequantizeLinear") for t in node.input)
    # ... and every compute output reaches a QuantizeLinear, directly or through the Relu the
    # runtime folds into it - unless it is the graph's output (the Gemm, QGemm with float output)
    readers = {t: [n for n in model.graph.node if t in n.input] for n in compute for t in n.output}
    outputs = {o.name for o in model.graph.output}
    for node in compute:
        out = node.output[0]
        if out in outputs:
            continue
        after = readers[out]
        if len(after) == 1 and after[0].op_type == "Relu":
            after = [n for n in model.graph.node if after[0].output[0] in n.input]
        assert any(n.op_type == "QuantizeLinear" for n in after), node.name
    check = check_runtime(tmp_path / "q.onnx", {"input": np.zeros((1, 3, 32, 32), np.float32)})
    assert check.integer == check.compute == len(compute), check.kernels


def test_tensorrt_files_have_zero_points_zero_and_int8_only(tmp_path):
    model = _quantize(tmp_path, "--runtime", "tensorrt")
    inits, _, weights, biases, acts = _walk(model)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    types = {inits[n.input[2]].data_type for n in qdq if len(n.input) > 2}
    types |= {inits[n.input[0]].data_type for n in weights + biases}
    assert types == {TensorProto.INT8, TensorProto.INT32}
    assert all(not z.any() for z in _zero_points(inits, qdq))
    assert acts and biases


@pytest.mark.parametrize("wbits,weight_type", [(8, TensorProto.INT8), (4, TensorProto.INT4)])
def test_qnn_a16_files_hold_uint16_activations_and_symmetric_weights(tmp_path, wbits, weight_type):
    model = _quantize(tmp_path, "--runtime", "qnn", "--abits", "16", "--wbits", str(wbits))
    inits, _, weights, biases, acts = _walk(model)
    act_types = {inits[n.input[2]].data_type for n in acts}
    assert act_types == {TensorProto.UINT16}  # first/last layers take max(16, 8)
    assert {inits[n.input[0]].data_type for n in weights} == {weight_type, TensorProto.INT8}  # first/last: int8
    assert all(not z.any() for z in _zero_points(inits, weights))
    assert len(biases) == sum(n.op_type in COMPUTE for n in model.graph.node)  # A16W4 / A16W8: int32 biases


def test_qnn_files_quantize_every_tensor_a_node_reads_as_data(tmp_path):
    """HTP runs QDQ node units: every float input of every node comes out of a DequantizeLinear
    (residual Adds, pooling, Flatten too), parameters and int32 biases aside - and the Relu
    a Conv's output Q absorbs, whose output is quantized instead."""
    from onnxqlimit.quant.policy import PARAMETER_INPUTS, UNQUANTIZED_READERS

    model = _quantize(tmp_path, "--runtime", "qnn", "--abits", "16")
    inits, producer, _, _, _ = _walk(model)
    checked = 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", *UNQUANTIZED_READERS):
            continue
        for index, tensor in enumerate(node.input):
            if node.op_type == "Relu" and _fed_by(producer, tensor, "Conv"):
                assert any(r.op_type == "QuantizeLinear" for r in model.graph.node if node.output[0] in r.input)
            elif tensor and index not in PARAMETER_INPUTS.get(node.op_type, ()):
                assert _fed_by(producer, tensor, "DequantizeLinear"), (node.name, tensor)
                checked += 1
    assert checked > 3 * sum(n.op_type in COMPUTE for n in model.graph.node)
    generic = {n.input[0] for n in _quantize(tmp_path, "--abits", "16").graph.node if n.op_type == "QuantizeLinear"}
    qnn = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert generic < qnn  # the generic profile quantizes only where a runtime fuses


def test_data_movement_outputs_share_their_input_scales_so_a_concat_after_split_stays_integer(tmp_path):
    """A C2f-style block: Conv -> Split -> Concat(split halves, Conv of one). Each Split output
    gets a Q/DQ with its input's scale and zero point (onnxruntime drops such pairs), so the
    Concat runs as QLinearConcat instead of float between DequantizeLinear and QuantizeLinear."""
    import onnxruntime as ort

    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize

    h, rng = onnx.helper, np.random.default_rng(0)
    weight = lambda name, *shape: numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)
    graph = h.make_graph(
        [h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c1"], ["r1"]),
         h.make_node("Split", ["r1"], ["a", "b"], axis=1, num_outputs=2),
         h.make_node("Conv", ["b", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c2"], ["r2"]),
         h.make_node("Concat", ["a", "b", "r2"], ["cat"], axis=1), h.make_node("Conv", ["cat", "w3", "b3"], ["y"])],
        "c2f", [h.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8, 8])],
        [weight("w1", 8, 3, 3, 3), weight("b1", 8), weight("w2", 4, 4, 3, 3), weight("b2", 4),
         weight("w3", 4, 12, 1, 1), weight("b3", 4)])
    src, out = tmp_path / "c2f.onnx", tmp_path / "q.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)]), str(src))
    calib = {"x": rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32)}
    quantize(src, out, calib, QuantConfig.of(first_last_bits=None),
             RunOptions(recon=ReconConfig(method="rtn", calib_size=16), progress=False, parity_samples=4))
    model = onnx.load(str(out))
    inits, producer, _, _, acts = _walk(model)
    split = next(n for n in model.graph.node if n.op_type == "Split")
    source = producer[split.input[0]]
    assert source.op_type == "DequantizeLinear"
    for q in (n for n in acts if n.input[0] in split.output):
        for i in (1, 2):
            np.testing.assert_array_equal(numpy_helper.to_array(inits[q.input[i]]),
                                          numpy_helper.to_array(inits[source.input[i]]))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    kernels = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "QLinearConcat" in kernels and "Concat" not in kernels, kernels


def test_qnn_leaves_a_where_built_mask_and_the_masked_scores_float():
    """transformers builds the mask as Where(Expand(mask, Shape(hidden)), 0, -3.4e38): a Shape of
    data is no data, so the mask stays float, and so does scores + mask; Softmax's output is
    quantized again."""
    from onnxqlimit import QuantConfig
    from onnxqlimit.quant.policy import place

    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Shape", ["x"], ["s"]), h.make_node("Expand", ["m", "s"], ["e"]),
         h.make_node("Where", ["e", "zero", "low"], ["mask"]), h.make_node("MatMul", ["x", "w"], ["y"]),
         h.make_node("Add", ["y", "mask"], ["z"]), h.make_node("Softmax", ["z"], ["p"]),
         h.make_node("MatMul", ["p", "w"], ["out"])],
        "masked", [h.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                   h.make_tensor_value_info("m", TensorProto.BOOL, [1, 4])],
        [h.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
         numpy_helper.from_array(np.zeros((), np.float32), "zero"),
         numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "low")])
    model = onnx.shape_inference.infer_shapes(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    points = {p.tensor for p in place(model, QuantConfig.of(runtime="qnn", abits=16))}
    assert {"x", "y", "p", "w"} <= points and not {"mask", "z", "zero", "low"} & points


@pytest.mark.parametrize("abits,runtime", [(8, "generic"), (16, "qnn")])
def test_int32_biases_of_dead_channels_do_not_overflow(tmp_path, abits, runtime):
    """A weight channel of zeros gets the smallest scale; its bias over (activation x that
    scale) would saturate int32 (and a clamp at 2**31 - 1 in float32 wraps to -2**31). The
    weight scale is raised until the bias fits: every bias is stored to within half a step."""
    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    weight[1] = 0.0  # dead
    weight[2] *= 1e-12  # nearly dead
    bias = np.array([0.1, 2.0, -1.5, 0.3], np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         onnx.helper.make_node("Relu", ["c"], ["r"]),
         onnx.helper.make_node("Conv", ["r", "w2", "b2"], ["y"])],
        "dead", [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 8, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"),
         numpy_helper.from_array(rng.normal(0, 0.3, (2, 4, 1, 1)).astype(np.float32), "w2"),
         numpy_helper.from_array(np.zeros(2, np.float32), "b2")])
    src = tmp_path / "dead.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), str(src))
    calib = {"x": rng.normal(0, 1, (16, 3, 8, 8)).astype(np.float32)}
    quantize(src, tmp_path / "q.onnx", calib, QuantConfig.of(wbits=8, abits=abits, first_last_bits=None, runtime=runtime),
             RunOptions(recon=ReconConfig(method="rtn", calib_size=16), progress=False, parity_samples=4))
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    stored, scale = inits["b_quantized"].astype(np.float64), inits["b_scale"].astype(np.float64)
    assert np.all(np.abs(stored) < 2 ** 31 - 128)
    assert np.all(np.abs(stored * scale - bias) <= np.maximum(scale / 2, 1e-6 * np.abs(bias)))  # (float32 rounding)


@pytest.mark.parametrize("runtime,flags,message", [
    ("ort-cpu", ["--wbits", "4"], "runtime profile 'ort-cpu' cannot run W4A8"),
    ("tensorrt", ["--abits", "4"], "runtime profile 'tensorrt' cannot run W8A4"),
    ("tensorrt", ["--wbits", "4", "--abits", "none"], "'tensorrt' runs weight-only layers block-wise only"),
    ("qnn", ["--wbits", "2"], "runtime profile 'qnn' cannot run W2A8"),
    ("qnn", ["--abits", "none"], "runtime profile 'qnn' cannot run W8Afloat"),
    ("qnn", ["--act-symmetric"], "runtime profile 'qnn' needs act symmetric = False"),
    ("tensorrt", ["--bits", "conv.*=8/4"], "--bits conv.*=8/4: runtime profile 'tensorrt' cannot run W8A4"),
    ("generic", ["--per-tensor", "--weight-block", "32"], "--weight-block gives each output channel its own scales"),
])
def test_a_width_the_runtime_cannot_run_is_refused_in_one_line(tmp_path, capsys, runtime, flags, message):
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(MODELS / "zoo_resnet.onnx"), "-o", str(out), "--calib",
                 str(MODELS / "zoo_resnet_calib.npz"), "--runtime", runtime, *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_ort_cpu_weight_only_keeps_convolutions_at_w8a8(tmp_path):
    """ort-cpu runs 4-bit weights only as weight-only MatMul/Gemm: asked for W4 weight-only, the
    convolutions of a CNN stay W8A8 (the form onnxruntime fuses) and the classifier Gemm - the
    last layer, 8-bit weights - runs weight-only (MatMulNBits)."""
    model = _quantize(tmp_path, "--runtime", "ort-cpu", "--wbits", "4", "--abits", "none")
    inits, producer, weights, _, _ = _walk(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert all(_fed_by(producer, n.input[0], "DequantizeLinear") for n in convs)
    assert all(inits[producer[n.input[1]].input[0]].data_type == TensorProto.INT8 for n in convs)
    assert not _fed_by(producer, gemm.input[0], "DequantizeLinear")  # float activations: weight-only
    check = check_runtime(tmp_path / "q.onnx", {"input": np.zeros((1, 3, 32, 32), np.float32)})
    assert check.integer == check.compute, check.kernels


@pytest.mark.slow
def test_learned_scales_keep_relu6_folded_so_every_conv_stays_fused(tmp_path):
    """onnxruntime folds Clip(0, 6) -> QuantizeLinear into the Q (and so fuses the conv
    before it) only while the Q's range stays within [0, 6]: QDrop's learned scales are held
    there, and the qdrop file runs every conv in an integer kernel, as the rtn one does."""
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(MODELS / "zoo_mobilenetv2.onnx"), "-o", str(out), "--calib",
                 str(MODELS / "zoo_mobilenetv2_calib.npz"), "--method", "qdrop", "--iters", "40", "--calib-size", "32",
                 "--quiet"]) == 0
    model = onnx.load(str(out))
    inits, producer, _, _, acts = _walk(model)
    after_clip = [n for n in acts if n.input[0] in producer and producer[n.input[0]].op_type == "Clip"]
    assert after_clip
    for q in after_clip:
        scale, zero = (float(numpy_helper.to_array(inits[t])) for t in q.input[1:3])
        assert zero == 0 and scale * 255 <= 6.0 * (1 + 1e-6), (q.name, scale)
    check = check_runtime(out, {"input": np.zeros((1, 3, 32, 32), np.float32)})
    assert check.integer == check.compute, check.kernels
