"""tools/streaming_models.py: the hand-built VAD (LSTM inside an If) and GRU-KWS graphs
against their torch models, the unrolled GRU against the op, and the recorded calibration
states (no training: random weights, tiny sizes)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tools import audio_data as A
from tools import streaming_models as S

HIDDEN = 8


def _vad(seed: int = 0) -> S.VadNet:
    torch.manual_seed(seed)
    return S.VadNet(hidden=HIDDEN, ch=4).eval()


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return S.session(model).run(None, feeds)


@pytest.mark.parametrize("sr", [16000, 8000])
def test_vad_graph_matches_torch_at_both_rates(sr):
    net = _vad()
    model = S.vad_onnx(net)
    assert [n.op_type for n in model.graph.node if n.op_type == "If"] == ["If"]
    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.3, (3, S.CHUNK)).astype(np.float32)
    state = rng.normal(0, 0.5, (2, 3, HIDDEN)).astype(np.float32)
    prob, state_n = _run(model, {"input": x, "state": state, "sr": np.array(sr, np.int64)})
    with torch.no_grad():
        logits, want_state = net(torch.from_numpy(x)[:, None], torch.from_numpy(state), sr == 16000)
    np.testing.assert_allclose(prob, torch.sigmoid(logits).numpy(), atol=1e-5)
    np.testing.assert_allclose(state_n, want_state.numpy(), atol=1e-5)
    assert prob.shape == (3, 1) and state_n.shape == (2, 3, HIDDEN)


def test_vad_branches_differ_and_streaming_equals_one_window():
    """sr picks a branch (outputs differ); running chunk by chunk carrying the state in
    onnxruntime equals the torch model's one call over the whole window."""
    net = _vad()
    model = S.vad_onnx(net)
    audio = np.random.default_rng(2).normal(0, 0.3, (2, 5 * S.CHUNK)).astype(np.float32)
    p16, p8 = S.stream_probs(model, audio, 16000), S.stream_probs(model, audio, 8000)
    assert p16.shape == (2, 5) and not np.allclose(p16, p8)
    with torch.no_grad():
        logits, _ = net(torch.from_numpy(audio).reshape(2, 5, S.CHUNK), torch.zeros(2, 2, HIDDEN), True)
    np.testing.assert_allclose(p16, torch.sigmoid(logits).numpy(), atol=1e-5)


def test_record_states_uses_the_stacked_state_convention(tmp_path):
    model = S.vad_onnx(_vad())
    path = tmp_path / "vad.onnx"
    onnx.save(model, str(path))
    audio = np.random.default_rng(3).normal(0, 0.3, 3 * S.CHUNK + 100).astype(np.float32)
    feeds = S.record_states(path, audio, 16000)
    assert feeds["input"].shape == (3, S.CHUNK) and feeds["state"].shape == (3, 2, 1, HIDDEN)
    assert feeds["sr"].shape == () and feeds["sr"].dtype == np.int64 and int(feeds["sr"]) == 16000
    assert not feeds["state"][0].any()  # a stream starts from a zero state
    # each chunk's state is the one the model returned for the chunk before
    _, state1 = _run(model, {"input": feeds["input"][:1], "state": np.zeros((2, 1, HIDDEN), np.float32),
                             "sr": feeds["sr"]})
    np.testing.assert_allclose(feeds["state"][1], state1, atol=1e-6)
    two = S.record_states(path, np.stack([audio, audio[::-1].copy()]), 8000)
    assert two["input"].shape == (6, S.CHUNK) and two["state"].shape == (6, 2, 1, HIDDEN)
    np.testing.assert_array_equal(two["input"][:3], feeds["input"])  # stream 0's chunks first
    picked = S.subsample(two, 4, 0)
    assert picked["state"].shape == (4, 2, 1, HIDDEN) and picked["sr"].shape == ()
    # onnxruntime's reader gets one sample at a time in the declared form
    reader = S.ort_calib(feeds)
    assert len(reader["state"]) == 3 and reader["state"][1:2].shape == (2, 1, HIDDEN)
    assert reader["sr"][0:1].shape == ()


def test_kws_graph_and_its_unrolled_gru_match_torch():
    torch.manual_seed(0)
    net = S.KwsNet(hidden=HIDDEN, ch=6, mels=5, classes=3).eval()
    x = np.random.default_rng(4).normal(size=(4, 9, 5)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    op, unrolled = S.kws_onnx(net, frames=9), S.kws_onnx(net, frames=9, unrolled=True)
    assert [n.op_type for n in op.graph.node].count("GRU") == 1
    gru = next(n for n in op.graph.node if n.op_type == "GRU")
    assert onnx.helper.get_attribute_value(next(a for a in gru.attribute if a.name == "linear_before_reset")) == 1
    assert not any(n.op_type == "GRU" for n in unrolled.graph.node)
    assert sum(n.op_type == "Tanh" for n in unrolled.graph.node) == 5  # (9 - 1) // 2 + 1 steps
    got_op, got_unrolled = _run(op, {"feats": x})[0], _run(unrolled, {"feats": x})[0]
    np.testing.assert_allclose(got_op, want, atol=1e-5)
    np.testing.assert_allclose(got_unrolled, got_op, atol=1e-5)


def test_generated_audio_and_features_have_the_declared_shapes():
    audio, labels = A.vad_streams(2, 3.0, 8000, 0, A.GEN["eval"])
    assert audio.shape == (2, 46 * S.CHUNK) and labels.shape == (2, 46) and audio.dtype == np.float32
    assert np.abs(audio).max() <= 1.0
    feats, y = A.kws_dataset(16, 0, A.GEN["train"])
    assert feats.shape == (16, A.FRAMES, A.MELS) and np.isfinite(feats).all()
    assert set(y.tolist()) == set(range(len(A.KWS_CLASSES)))


def test_recorded_states_calibrate_the_quantizer_and_onnxruntime(tmp_path):
    """The recorded feeds (state [N, 2, 1, H], a 0-d sr) go to onnxqlimit as they are, and to
    quantize_static one sample at a time in the declared form; both files stream."""
    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
    from tools.ort_baseline import quantize_with_ort

    src = tmp_path / "vad.onnx"
    onnx.save(S.vad_onnx(_vad()), str(src))
    audio = np.random.default_rng(5).normal(0, 0.3, (2, 16 * S.CHUNK)).astype(np.float32)
    calib = S.record_states(src, audio, 16000)
    quantize(str(src), tmp_path / "q.onnx", calib, QuantConfig.of(wbits=8, abits=8),
             RunOptions(recon=ReconConfig(method="rtn", calib_size=32), progress=False, threads=1))
    quantize_with_ort(src, S.ort_calib(calib), tmp_path / "ort.onnx", 8, 8)
    for path in (tmp_path / "q.onnx", tmp_path / "ort.onnx"):
        assert S.stream_probs(path, audio[:, :4 * S.CHUNK], 16000).shape == (2, 4)
    # onnxqlimit's file: the shared LSTM's W and R dequantized once in the main graph (both
    # branches read them), each branch's Conv weight inside its branch
    model = onnx.load(str(tmp_path / "q.onnx"))
    main = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert {"lstm_W_dequantized", "lstm_R_dequantized"} <= main
    branches = {a.g.name: {n.output[0] for n in a.g.node if n.op_type == "DequantizeLinear"}
                for n in model.graph.node if n.op_type == "If" for a in n.attribute}
    assert "conv16_w_dequantized" in branches["conv16"] and "conv8_w_dequantized" in branches["conv8"]


def test_the_keyword_spotter_quantizes_with_its_gru_weights_kept_at_8_bits(tmp_path):
    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize

    torch.manual_seed(0)
    src = tmp_path / "kws.onnx"
    onnx.save(S.kws_onnx(S.KwsNet(hidden=HIDDEN, ch=6, mels=5, classes=3).eval(), frames=9), str(src))
    feats = np.random.default_rng(6).normal(size=(16, 9, 5)).astype(np.float32)
    result = quantize(str(src), tmp_path / "q.onnx", {"feats": feats}, QuantConfig.of(wbits=4, abits=8),
                      RunOptions(recon=ReconConfig(method="rtn", calib_size=16), progress=False, threads=1))
    types = {t.name: t.data_type for t in onnx.load(str(result.output_path)).graph.initializer}
    assert types["gru_W_quantized"] == types["gru_R_quantized"] == onnx.TensorProto.INT8
    assert types["conv2_w_quantized"] == onnx.TensorProto.INT4  # (the first and last layers stay at 8)
