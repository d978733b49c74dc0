"""The shipped sample zoo (models/) and the torch reference-model exports (tools/archs.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
sys.path.insert(0, str(ROOT))

from tools import build_zoo  # noqa: E402
from tools.archs import export_reference_models  # noqa: E402


def _zoo() -> dict:
    path = MODELS / "zoo.json"
    return json.loads(path.read_text()) if path.exists() else {"models": []}


ZOO = _zoo()


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_zoo_index_lists_models():
    assert {m["name"] for m in ZOO["models"]} >= {"zoo_resnet", "zoo_mobilenetv2"}, \
        "models/zoo.json missing or incomplete: run `python -m tools.build_zoo`"


@pytest.mark.parametrize("entry", ZOO["models"], ids=lambda e: e["name"])
def test_zoo_model_accuracy_matches_record(entry):
    sess = _session(MODELS / entry["onnx"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == entry["input_name"] and out.name == entry["output_name"]
    assert list(inp.shape[1:]) == entry["input_shape"][1:] and isinstance(inp.shape[0], str)  # dynamic batch
    with np.load(MODELS / entry["val"]) as val:
        x, y = val[entry["input_name"]], val["label"]
    assert x.dtype == np.float32 and x.shape == (entry["num_val"], *entry["input_shape"][1:]) and len(x) >= 2000
    assert 0.0 <= x.min() and x.max() <= 1.0
    acc = build_zoo.ort_top1(MODELS / entry["onnx"], x, y, entry["input_name"])
    assert abs(acc - entry["fp32_top1"]) <= 0.1, (acc, entry["fp32_top1"])
    assert 50.0 < acc < 99.0  # learnt, but not saturated: quantization error must be visible


@pytest.mark.parametrize("entry", ZOO["models"], ids=lambda e: e["name"])
def test_zoo_calibration_set(entry):
    with np.load(MODELS / entry["calib"]) as calib:
        assert list(calib.keys()) == [entry["input_name"]]
        x = calib[entry["input_name"]]
    assert x.dtype == np.float32 and x.shape == (256, *entry["input_shape"][1:])
    # BatchNormalization is left in the graph on purpose: the quantizer folds it.
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(MODELS / entry["onnx"])).graph.node)


def test_zoo_data_is_regenerated_exactly():
    """The procedural generator still reproduces the shipped files bit for bit."""
    if not ZOO["models"]:
        pytest.skip("no zoo built")
    entry = ZOO["models"][0]
    seeds = ZOO["task"]["seeds"]
    x_val, y_val = build_zoo.make_set(build_zoo.N_VAL, seeds["val"])
    x_cal, _ = build_zoo.make_set(build_zoo.N_CALIB, seeds["calib"])
    with np.load(MODELS / entry["val"]) as val, np.load(MODELS / entry["calib"]) as calib:
        np.testing.assert_array_equal(val["input"], build_zoo.to_float(x_val))
        np.testing.assert_array_equal(val["label"], y_val)
        np.testing.assert_array_equal(calib["input"], build_zoo.to_float(x_cal))


def test_models_dir_under_5mb():
    total = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())
    assert total < 5 * 1024 * 1024, f"models/ is {total / 2**20:.2f} MiB"


@pytest.fixture(scope="module", params=[13, 17])
def reference(request, tmp_path_factory):
    return request.param, export_reference_models(tmp_path_factory.mktemp(f"ref{request.param}"), request.param)


@pytest.mark.slow
def test_reference_models_run_with_dynamic_shapes(reference):
    opset, paths = reference
    assert set(paths) == {"resnet18", "mobilenet_v2", "bert"}
    rng = np.random.default_rng(0)
    for name in ("resnet18", "mobilenet_v2"):
        model = onnx.load(str(paths[name]))
        assert model.opset_import[0].version == opset
        assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
        sess = _session(paths[name])
        for batch in (1, 2):
            (logits,) = sess.run(None, {"input": rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)})
            assert logits.shape == (batch, 1000) and np.isfinite(logits).all()
    sess = _session(paths["bert"])
    for batch, seq in ((1, 8), (2, 37)):
        mask = np.ones((batch, seq), np.int64)
        mask[-1, seq // 2:] = 0
        feeds = {"input_ids": rng.integers(0, 1000, (batch, seq)), "attention_mask": mask,
                 "token_type_ids": (np.arange(seq) >= seq // 3).astype(np.int64)[None].repeat(batch, 0)}
        (hidden,) = sess.run(None, feeds)
        assert hidden.shape == (batch, seq, 128) and np.isfinite(hidden).all()


def test_bert_export_matches_torch():
    """The hand-written attention/mask/GELU survive export (padding must change nothing
    for the unpadded positions of another sequence)."""
    import tempfile

    import torch

    from tools.archs import BertEncoder, export_onnx

    torch.manual_seed(0)
    model = BertEncoder(vocab_size=50, hidden=32, layers=1, heads=2, ffn=64, max_len=16).eval()
    ids = torch.randint(0, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.int64)
    mask[1, 6:] = 0
    types = torch.zeros(2, 10, dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, (ids, mask, types), Path(tmp) / "b.onnx", 13, names, ["h"],
                           {n: {0: "b", 1: "s"} for n in names})
        got = _session(path).run(None, {n: t.numpy() for n, t in zip(names, (ids, mask, types))})[0]
    with torch.no_grad():
        ref = model(ids, mask, types).numpy()
        alone = model(ids[1:, :6], mask[1:, :6], types[1:, :6]).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(ref[1, :6], alone[0], atol=1e-4)  # -10000 mask bias ~ removes padded keys
