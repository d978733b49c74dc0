"""Text encoders: embedding tables quantized weight-only per row, placement in a BERT-style
encoder, export parity, and exported files run at shapes other than the calibration shape."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from onnxqlimit import QuantConfig
from onnxqlimit.pipeline import RunOptions, quantize
from onnxqlimit.quant.policy import place
from onnxqlimit.recon import ReconConfig  # noqa: I001
from tools.archs import BertEncoder, export_onnx

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
VOCAB, HIDDEN, MAX_LEN = 200, 32, 32


def token_feeds(rng, batch: int, seq: int) -> dict[str, np.ndarray]:
    mask = (np.arange(seq)[None] < rng.integers(seq // 2, seq + 1, (batch, 1))).astype(np.int64)
    return {"input_ids": rng.integers(1, VOCAB, (batch, seq)) * mask, "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq), np.int64)}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    net = BertEncoder(vocab_size=VOCAB, hidden=HIDDEN, layers=1, heads=2, ffn=64, max_len=MAX_LEN).eval()
    example = tuple(torch.as_tensor(v) for v in token_feeds(np.random.default_rng(0), 2, 12).values())
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    return export_onnx(net, example, path, 17, NAMES, ["hidden"], {n: {0: "batch", 1: "seq"} for n in NAMES})


def _quantize(encoder, tmp_path, config: QuantConfig, method="rtn", name="q.onnx"):
    calib = token_feeds(np.random.default_rng(1), 16, 12)
    options = RunOptions(recon=ReconConfig(method=method, iters=10, calib_size=16, batch_size=8), parity_samples=4, progress=False, device="cpu")
    quantize(encoder, tmp_path / name, calib, config, options)
    return onnx.load(str(tmp_path / name))


def _word_table(model: onnx.ModelProto):
    """The word table's stored integers and scales, and the node that reads them: a Gather of
    the integer rows (8-bit, and sub-byte rows that pack into bytes: rows dequantized after the
    lookup) or the DequantizeLinear a Gather reads (other sub-byte tables)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    reader = next(n for n in model.graph.node if n.op_type in ("Gather", "DequantizeLinear")
                  and n.input[0] in inits and inits[n.input[0]].shape[0] == VOCAB and n.input[0].endswith("_quantized"))
    name = reader.input[0].removesuffix("_quantized")
    return inits[reader.input[0]], inits[f"{name}_scale"], reader


def test_embedding_tables_are_weight_only_per_row_and_never_tuned(encoder):
    model = onnx.load(str(encoder))
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather"
              and n.input[0] in {t.name for t in model.graph.initializer}}
    assert len(tables) >= 2  # word and position embeddings (token types may fold into a constant)
    points = {p.tensor: p for p in place(model, QuantConfig.of(wbits=4, abits=4))}
    for name in tables:
        point = points[name]
        assert point.kind == "weight" and point.table and point.fixed
        assert point.spec.bits == 8 and point.spec.channel_axis == 0 and point.spec.block_size is None  # one per row
    assert not tables & {p.tensor for p in place(model, QuantConfig.of(embedding_bits=None))}
    narrow = [p.spec for p in place(model, QuantConfig.of(embedding_bits=4, weight_block=16)) if p.table]
    assert {(s.bits, s.channel_axis, s.block_size) for s in narrow} == {(4, 0, 16)}  # blocks along each row


@pytest.mark.parametrize("bits,block,form", [(8, None, "int8 rows"), (4, 16, "packed bytes"),
                                             (4, None, "block DequantizeLinear")])
def test_exported_tables_are_rounded_rows_and_run_at_other_shapes(encoder, tmp_path, bits, block, form):
    config = QuantConfig.of(wbits=8, abits=8, embedding_bits=bits, weight_block=block)
    model = _quantize(encoder, tmp_path, config, method="qdrop")
    ints, scale, reader = _word_table(model)
    if form == "int8 rows":  # the lookup reads the integers; only the gathered rows are dequantized
        assert reader.op_type == "Gather" and scale.shape == (VOCAB, 1) and ints.dtype == np.int8
        assert not any(n.op_type == "DequantizeLinear" and n.input[0] == reader.input[0] for n in model.graph.node)
    elif form == "packed bytes":  # two 4-bit digits a byte, one scale per 16 of a row
        assert reader.op_type == "Gather" and ints.dtype == np.uint8 and ints.shape == (VOCAB, HIDDEN // 2)
        assert scale.shape == (VOCAB, HIDDEN // 16)
        digits = [(ints.astype(np.int64) >> shift) & 15 for shift in (0, 4)]  # low nibble first
        ints = np.stack(digits, -1).reshape(VOCAB, HIDDEN) - 8  # digits are the integers - qmin
    else:  # TABLE_BLOCK 32 = HIDDEN: one block a row, which does not pack into whole bytes
        assert reader.op_type == "DequantizeLinear" and str(ints.dtype) == "int4"
        assert next(a.i for a in reader.attribute if a.name == "block_size") == 32 and scale.shape == (VOCAB, 1)
    table = next(numpy_helper.to_array(t) for t in onnx.load(str(encoder)).graph.initializer
                 if tuple(t.dims) == (VOCAB, HIDDEN))
    per_element = np.repeat(scale, HIDDEN // scale.shape[1], axis=1)
    limit = 2 ** (bits - 1)
    nearest = np.clip(np.round(table / per_element), -limit, limit - 1)
    np.testing.assert_array_equal(ints.astype(np.int64), nearest)  # qdrop ran, yet the table is not tuned
    float_sess = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"])
    quant_sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    for batch, seq in ((1, 5), (3, 12), (2, MAX_LEN)):  # calibrated at 12 tokens, batch 8
        feeds = token_feeds(rng, batch, seq)
        ref, got = float_sess.run(None, feeds)[0], quant_sess.run(None, feeds)[0]
        assert got.shape == ref.shape == (batch, seq, HIDDEN)
        cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
        assert cos.min() > (0.999 if bits == 8 else 0.98), cos.min()


def test_tables_shrink_the_file_and_stay_out_of_average_weight_bits(encoder, tmp_path):
    options = RunOptions(recon=ReconConfig(method="rtn", calib_size=16, batch_size=8), parity_samples=4, progress=False, device="cpu")
    calib = token_feeds(np.random.default_rng(1), 16, 12)
    costs = {}
    for bits in (None, 8):
        config = QuantConfig.of(wbits=4, abits=8, first_last_bits=None, embedding_bits=bits)
        costs[bits] = quantize(encoder, tmp_path / f"q{bits}.onnx", calib, config, options).report.costs
    assert costs[8]["size_bytes"] < 0.6 * costs[None]["size_bytes"]  # the word table is most of this encoder
    assert costs[8]["avg_wbits"] == costs[None]["avg_wbits"] == 4.0  # 8-bit tables do not count as layer bits


def test_qnn_quantizes_every_tensor_but_the_attention_mask(encoder, tmp_path):
    """--runtime qnn: LayerNorm's input, scale and bias all come out of DequantizeLinear (the
    constants as uint16, like activations); the mask arithmetic and the masked scores stay
    float (a -3.4e38 mask in a quantized tensor would zero every real score); the file keeps
    parity and its embedding within 0.999 cosine of float."""
    model = _quantize(encoder, tmp_path, QuantConfig.of(wbits=8, abits=16, runtime="qnn"))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    dequantized = lambda t: t in producer and producer[t].op_type == "DequantizeLinear"
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(dequantized(t) for n in norms for t in n.input)
    assert all(inits[producer[n.input[1]].input[0]].data_type == onnx.TensorProto.UINT16 for n in norms)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax and not any(dequantized(n.input[0]) for n in softmax)  # scores + mask: float
    readers = {t: [r for r in model.graph.node if t in r.input] for n in softmax for t in n.output}
    assert all(r.op_type == "QuantizeLinear" for n in softmax for r in readers[n.output[0]])  # probabilities: uint16
    feeds = token_feeds(np.random.default_rng(4), 2, 12)
    ref = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    assert cos.min() > 0.999, cos.min()


def test_smoothing_keeps_the_float_function_and_flattens_what_is_quantized(encoder):
    from onnxqlimit.load import load_model
    from onnxqlimit.mirror import Mirror
    from onnxqlimit.smooth import candidates, channel_max, smooth

    model = load_model(str(encoder))
    feeds = token_feeds(np.random.default_rng(3), 8, 12)
    mirror = Mirror(model)
    tensors = list(candidates(model))
    assert tensors  # the encoder's linear layers read activations
    act_max = channel_max(mirror, [feeds], tensors)
    smoothed = smooth(model, act_max, 0.8)
    onnx.checker.check_model(smoothed)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(run(smoothed), run(model), rtol=1e-4, atol=1e-4)  # X W = (X / s)(s W)
    new_max = channel_max(Mirror(smoothed), [feeds], [f"{t}_smoothed" for t in tensors])
    spread = lambda m: float(m.max() / np.median(m))
    assert all(spread(new_max[f"{t}_smoothed"]) < 0.9 * spread(act_max[t]) for t in tensors)
    points = {p.tensor for p in place(smoothed, QuantConfig()) if p.kind == "activation"}
    assert {f"{t}_smoothed" for t in tensors} <= points and not set(tensors) & points


def test_a_smoothed_quantized_encoder_keeps_parity_and_smooth_is_validated(encoder, tmp_path):
    _quantize(encoder, tmp_path, QuantConfig.of(wbits=8, abits=8, smooth=0.8), method="qdrop")  # raises on lost parity
    assert any(n.name.endswith("_Smooth") for n in onnx.load(str(tmp_path / "q.onnx")).graph.node)
    from onnxqlimit.errors import QLimitError

    for bad in (1.0, -0.5):
        with pytest.raises(QLimitError, match="--smooth"):
            QuantConfig.of(smooth=bad)
    # tensorrt's symmetric activations smooth at 0.8 by default, other runtimes decide per tensor; 0 turns it off
    assert (QuantConfig.of(runtime="tensorrt").smooth, QuantConfig.of(runtime="tensorrt", smooth=0).smooth) == (0.8, None)
    assert (QuantConfig.of().smooth, QuantConfig.of(smooth=0).smooth) == ("auto", None)
    assert QuantConfig.of(smooth=0.5, runtime="tensorrt").smooth == 0.5


def test_automatic_smoothing_is_per_tensor_deterministic_and_can_be_turned_off(encoder, tmp_path):
    """Smoothing moves error from activations into weights: "auto" (the default) smooths where
    8-bit activations limit, not where 4-bit weights do, and chooses the same way every time."""
    from onnxqlimit.load import load_model
    from onnxqlimit.mirror import Mirror
    from onnxqlimit.smooth import ALPHAS, candidates, smooth_model

    model = load_model(str(encoder))
    mirror, batch = Mirror(model), [token_feeds(np.random.default_rng(1), 16, 12)]
    w8a8 = smooth_model(model, mirror, batch, QuantConfig.of(wbits=8, abits=8))[1]
    assert w8a8 and set(w8a8) < set(candidates(model)) and set(w8a8.values()) <= set(ALPHAS)  # some tensors, not all
    assert smooth_model(model, mirror, batch, QuantConfig.of(wbits=8, abits=8))[1] == w8a8
    assert smooth_model(model, mirror, batch, QuantConfig.of(wbits=4, abits=8, first_last_bits=None))[1] == {}
    # the first layer keeps 8-bit weights by default, so its input may still be smoothed at W4A8
    assert set(smooth_model(model, mirror, batch, QuantConfig.of(wbits=4, abits=8))[1]) <= set(w8a8)
    assert smooth_model(model, mirror, batch, QuantConfig.of(wbits=8, abits=16))[1] == {}  # nothing to flatten
    smoothed = lambda m: {n.input[0] for n in m.graph.node if n.name.endswith("_Smooth")}  # noqa: E731
    assert smoothed(_quantize(encoder, tmp_path, QuantConfig.of(wbits=8, abits=8))) == set(w8a8)
    assert smoothed(_quantize(encoder, tmp_path, QuantConfig.of(wbits=8, abits=8, smooth=0), name="off.onnx")) == set()


@pytest.mark.parametrize("method,wbits", [("rtn", 4), ("qdrop", 4), ("rtn", 2)])
def test_weight_only_block_wise_matmuls_run_as_matmulnbits(encoder, tmp_path, method, wbits):
    """--abits none --weight-block 32: MatMul weights as int4 (int2) with one scale per 32
    inputs of each output channel (DequantizeLinear block_size, opset 21 (25)), activations
    left float, so onnxruntime runs every weight MatMul as MatMulNBits (int2 too: the fusion
    guard stands only beside quantized activations); the file passes parity as written."""
    from onnxqlimit.runtime import check_runtime

    config = QuantConfig.of(wbits=wbits, abits=32, weight_block=32, first_last_bits=None if wbits == 2 else 8)
    model = _quantize(encoder, tmp_path, config, method=method)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # weight-only
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    # (the loader's simplification turns MatMul + bias Add into Gemm; onnxruntime fuses both forms)
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1].endswith("_dequantized")]
    assert len(blocked) == len(matmuls) > 0
    for dq in blocked:
        attrs = {a.name: a.i for a in dq.attribute}
        ints, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert attrs == {"axis": 0, "block_size": 32} and scale.shape == (-(-ints.shape[0] // 32), ints.shape[1])
    feeds = token_feeds(np.random.default_rng(3), 2, 12)
    check = check_runtime(tmp_path / "q.onnx", feeds)
    assert check.kernels.get("MatMulNBits") == len(matmuls), check.kernels
    # onnxruntime's accuracy level 1 (float activations inside MatMulNBits) computes the file as written
    written = ort.InferenceSession(str(tmp_path / "q.onnx"), _options(disable=True), providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(str(tmp_path / "q.onnx"), _options(level=1), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(fused.run(None, feeds)[0], written.run(None, feeds)[0], rtol=1e-4, atol=1e-5)


def _options(disable: bool = False, level: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if disable:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    return options


def test_an_ort_cpu_latency_search_picks_weight_only_w8a8_or_float_per_layer(encoder, tmp_path):
    """--runtime ort-cpu --target-latency: the search's widths are the profile's (weights 4, 8 or
    float, activations 8 or float) and every layer of the plan is one onnxruntime runs as it
    should: W8A8 in an integer kernel, weight-only int4/int8 as MatMulNBits, or float."""
    from onnxqlimit.errors import QLimitError
    from onnxqlimit.mixed.config import MixedConfig, SensitivityConfig, Targets
    from onnxqlimit.quant.runtimes import PROFILES
    from onnxqlimit.runtime import check_runtime

    calib = token_feeds(np.random.default_rng(1), 16, 12)

    def run(latency_ms: float):
        options = RunOptions(recon=ReconConfig(method="rtn", calib_size=16, batch_size=8), parity_samples=4,
                             progress=False, device="cpu", work_dir=str(tmp_path / "work"),
                             mixed=MixedConfig(Targets(latency_ms=latency_ms), SensitivityConfig(samples=8)))
        return quantize(encoder, tmp_path / "q.onnx", calib, QuantConfig.of(runtime="ort-cpu"), options).report

    with pytest.raises(QLimitError, match="smallest reachable") as refused:
        run(1e-4)
    fastest = float(str(refused.value).split("smallest reachable is ")[1].split(" ms")[0])
    report = run(1.05 * fastest)
    model = onnx.load(str(tmp_path / "q.onnx"))
    ops = {n.name: n.op_type for n in model.graph.node}
    # (an attention MatMul has two activation inputs, shown as its abits: the second plays the weight)
    plan = {node: (e.get("wbits", e.get("abits")), e.get("abits", 32)) for node, e in report.plan.items()
            if ops.get(node) in ("MatMul", "Gemm")}
    ort_cpu = PROFILES["ort-cpu"]
    assert plan and all(ort_cpu.runs(ops[n], w, a) for n, (w, a) in plan.items()), plan
    assert {a for _, a in plan.values()} >= {32}  # the fastest plans here leave some activations float
    check = check_runtime(tmp_path / "q.onnx", token_feeds(np.random.default_rng(2), 1, 12))
    quantized = sum(w != 32 for w, _ in plan.values())
    assert check.integer == quantized, (check.kernels, plan)
