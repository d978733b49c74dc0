"""What a run tells the user about quality: the end-of-run comparison on held-back samples
and `onnxqlimit eval` (accuracy with labels, agreement / SQNR against a float model)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from onnxqlimit.cli import main
from tests.conftest import MODELS

MODEL, CALIB, VAL = (MODELS / f"zoo_resnet{s}" for s in (".onnx", "_calib.npz", "_val.npz"))


@pytest.mark.slow
def test_run_ends_with_quality_on_held_back_samples_and_eval_agrees(tmp_path, capsys):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", str(MODEL), "-o", str(out), "--calib", str(CALIB), "--method", "rtn", "--wbits", "4",
                 "--calib-size", "64", "--report", str(report), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "quality, float model vs this file in onnxruntime on 32 held-back samples: logits: SQNR " in text
    assert "not a quality measure" in text
    quality = json.loads(report.read_text())["quality"]
    assert quality["held_back"] and quality["samples"] == 32
    row = quality["outputs"][0]
    assert 5 < row["sqnr_db"] < 60 and 0.5 < row["top1_agreement"] <= 1.0

    assert main(["eval", str(out), "--data", str(VAL), "--labels", "label", "--reference", str(MODEL)]) == 0
    line = capsys.readouterr().out
    val = np.load(VAL)
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": val["input"]})[0]
    ref = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).run(None, {"input": val["input"]})[0]
    assert f"accuracy {np.mean(logits.argmax(1) == val['label']):.2%}" in line
    assert f"top-1 agreement {np.mean(logits.argmax(1) == ref.argmax(1)):.2%}" in line
    sqnr = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((logits - ref.astype(np.float64)) ** 2).sum())
    assert f"SQNR {sqnr:.1f} dB" in line


def test_without_spare_samples_quality_is_said_to_be_on_calibration_data(tmp_path, capsys):
    small = tmp_path / "c.npz"
    np.savez(small, input=np.load(CALIB)["input"][:16])
    assert main(["quantize", str(MODEL), "-o", str(tmp_path / "q.onnx"), "--calib", str(small), "--method", "rtn",
                 "--quiet"]) == 0
    assert "on 16 calibration samples (none held back)" in capsys.readouterr().out


def test_eval_needs_labels_or_a_reference(tmp_path, capsys):
    assert main(["eval", str(MODEL), "--data", str(VAL)]) == 2
    assert "eval needs --labels KEY" in capsys.readouterr().err
    assert main(["eval", str(MODEL), "--data", str(VAL), "--labels", "nope"]) == 2
    assert "no array 'nope' for --labels (file has: input, label)" in capsys.readouterr().err


def test_plot_writes_a_png_of_widths_and_sqnr(tmp_path, capsys):
    png = tmp_path / "p.png"
    assert main(["quantize", str(MODEL), "-o", str(tmp_path / "q.onnx"), "--calib", str(CALIB), "--method", "rtn",
                 "--wbits", "4", "--quiet", "--plot", str(png)]) == 0
    assert f"plot: {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_quality_measurement_that_fails_costs_its_line_not_the_run(tmp_path, capsys, monkeypatch, caplog):
    import sys

    def broken(*args, **kwargs):
        raise RuntimeError("onnxruntime cannot run the float model")

    monkeypatch.setattr(sys.modules["onnxqlimit.evaluate"], "compare", broken)
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(MODEL), "-o", str(out), "--calib", str(CALIB), "--method", "rtn", "--quiet"]) == 0
    assert out.exists() and "quality, float model" not in capsys.readouterr().out
    assert "quality not measured: onnxruntime cannot run the float model" in caplog.text


def _top1(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0].argmax(1)


def test_target_metric_with_eval_labels_is_accuracy_relative_to_float(tmp_path, capsys):
    """--eval DATA.npz with 'labels': the metric is the file's top-1 accuracy as a fraction of
    the float model's, on that data (not top-1 agreement with the float model). Both are
    computed here with onnxruntime and the labels."""
    val = np.load(VAL)
    x, labels = val["input"][:300], val["label"][:300]
    eval_file = tmp_path / "eval.npz"
    np.savez(eval_file, input=x, labels=labels)
    out, report_file = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", str(MODEL), "-o", str(out), "--calib", str(CALIB), "--method", "rtn", "--calib-size", "64",
                 "--sens-samples", "16", "--target-avg-wbits", "4", "--target-metric", "0.9", "--eval", str(eval_file),
                 "--report", str(report_file), "--quiet"]) == 0
    report = json.loads(report_file.read_text())
    float_top1, quant_top1 = _top1(MODEL, x), _top1(out, x)
    accuracy_ratio = np.mean(quant_top1 == labels) / np.mean(float_top1 == labels)
    agreement = np.mean(quant_top1 == float_top1)
    assert abs(accuracy_ratio - agreement) > 2 / len(x)  # the data tells the two metrics apart
    # the float mirror may flip a tie: one sample moves the ratio by 1 / (samples the float model gets right)
    assert report["metric"] == pytest.approx(accuracy_ratio, abs=1 / np.sum(float_top1 == labels) + 1e-9)
    assert report["metric"] >= 0.9
    assert f"metric on the exported file: {report['metric']:.4f} of float (target 0.9)" in capsys.readouterr().out


def test_eval_labels_of_the_wrong_length_are_one_line_and_exit_2(tmp_path, capsys):
    x = np.load(VAL)["input"][:20]
    eval_file = tmp_path / "eval.npz"
    np.savez(eval_file, input=x, labels=np.zeros(19, np.int64))
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(MODEL), "-o", str(out), "--calib", str(CALIB), "--method", "rtn", "--quiet",
                 "--target-metric", "0.9", "--eval", str(eval_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"onnxqlimit: error: {eval_file}: 'labels' must hold one label per sample"
    assert not out.exists()


def test_top1_agreement_only_for_class_outputs():
    """Probabilities and logits are class scores; non-negative coordinates (a face-landmark
    head, [N, 2K]) and unit-length embeddings are not, so they get SQNR alone."""
    from onnxqlimit.evaluate import compare, is_class_output

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 10)).astype(np.float32)
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    landmarks = rng.uniform(0, 48, size=(16, 136)).astype(np.float32)
    embeddings = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    assert is_class_output(logits) and is_class_output(probabilities)
    assert not is_class_output(landmarks) and not is_class_output(embeddings)
    assert not is_class_output(logits[:, :1]) and not is_class_output(logits[0])
    outputs = {"logits": logits, "landmarks": landmarks, "embeddings": embeddings}
    rows = {r.name: r for r in compare({k: v + 0.01 for k, v in outputs.items()}, outputs)}
    assert rows["logits"].top1_agreement == 1.0
    assert rows["landmarks"].top1_agreement is None and rows["landmarks"].sqnr_db > 30
    assert rows["embeddings"].top1_agreement is None

