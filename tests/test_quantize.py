"""Quantize and write back: QDQ files onnxruntime runs, parity with the quantized mirror,
real low-bit types, accuracy at W8A8, calibration sources, bad input."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from onnxqlimit import QuantConfig
from onnxqlimit.cli import main
from onnxqlimit.parity import ort_session
from onnxqlimit.pipeline import RunOptions, quantize
from onnxqlimit.recon import ReconConfig  # noqa: I001
from tests.conftest import MODELS
from tools.synthetic import paddle_text_image

BITS = [(8, 8), (4, 4), (3, 3), (2, 4)]
FAST = RunOptions(recon=ReconConfig(method="rtn", calib_size=16, batch_size=8), parity_samples=8, progress=False)


def zoo_calib(name: str) -> str:
    return str(MODELS / f"{name}_calib.npz")


def assert_parity_report(report: dict) -> None:
    """quantize() refuses a file whose outputs or activation integers leave parity.py's
    thresholds, so repeating those thresholds here could not fail. What can: a vacuous check,
    with no output compared or fewer integers counted than there are activation quantizers."""
    assert report.parity and report.integer_parity["elements"] >= report.quantizers["activations"] > 0


def weight_types(path) -> dict[str, int]:
    model = onnx.load(str(path))
    return {t.name: t.data_type for t in model.graph.initializer if t.name.endswith("_quantized")}


@pytest.mark.parametrize("wbits,abits", BITS)
@pytest.mark.parametrize("name", ["zoo_resnet", "zoo_mobilenetv2"])
def test_zoo_parity_at_every_width(tmp_path, name, wbits, abits):
    out = tmp_path / "q.onnx"
    result = quantize(MODELS / f"{name}.onnx", out, zoo_calib(name), QuantConfig.of(wbits=wbits, abits=abits), FAST)
    assert_parity_report(result.report)
    ort_session(str(out), optimize=True)  # loads with onnxruntime's default optimisations too
    expected = {2: TensorProto.INT2, 3: TensorProto.INT4, 4: TensorProto.INT4, 8: TensorProto.INT8}[wbits]
    types = set(weight_types(out).values())
    assert expected in types  # inner layers at the asked width; first/last stay 8-bit
    # Sizes are whole files: on these 0.3 MB nets the tensor names (weights are named after
    # their node since issue 12, e.g. /features/features.4/conv/conv.0/conv.0.0/Conv.weight)
    # take ~4% of the file, and at 8 bits the fused form adds an output Q/DQ pair and a bias
    # scale per layer; the weights alone are a quarter / an eighth of float.
    assert result.report.size_bytes["ratio"] < (0.40 if wbits == 8 else 0.28)
    # (int32 biases carry a float32 scale per channel: 27.6% on MobileNetV2 at 8 bits)
    assert result.report.costs["size_bytes"] < (0.28 if wbits == 8 else 0.2) * result.report.size_bytes["float"]


def test_three_bit_weights_use_only_eight_levels(tmp_path):
    out = tmp_path / "q.onnx"
    quantize(MODELS / "zoo_resnet.onnx", out, zoo_calib("zoo_resnet"), QuantConfig.of(wbits=3, abits=3), FAST)
    model = onnx.load(str(out))
    values = np.concatenate([onnx.numpy_helper.to_array(t).astype(np.int64).ravel() for t in model.graph.initializer
                             if t.name.endswith("_quantized") and t.data_type == TensorProto.INT4])
    assert values.min() >= -4 and values.max() <= 3
    assert any(n.op_type == "Min" and n.name.endswith("_Min") for n in model.graph.node)  # activation clamp


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zoo_resnet", "zoo_mobilenetv2"])
def test_w8a8_within_one_point_of_float(tmp_path, name):
    import json

    entry = next(m for m in json.loads((MODELS / "zoo.json").read_text())["models"] if m["name"] == name)
    out = tmp_path / "q.onnx"
    quantize(MODELS / f"{name}.onnx", out, zoo_calib(name), QuantConfig.of(wbits=8, abits=8), RunOptions(recon=ReconConfig(method="rtn"), progress=False))
    val = np.load(MODELS / f"{name}_val.npz")
    session = ort_session(str(out), optimize=True)
    logits = np.concatenate([session.run(None, {"input": val["input"][i:i + 500]})[0] for i in range(0, len(val["label"]), 500)])
    top1 = 100 * float((logits.argmax(1) == val["label"]).mean())
    assert top1 >= entry["fp32_top1"] - 1.0, (top1, entry["fp32_top1"])


PPOCR_SHAPES = {"det": (2, 3, 320, 320), "rec": (4, 3, 48, 320), "cls": (4, 3, 48, 192)}


@pytest.mark.parametrize("name,wbits,abits", [  # det and rec take 3-4 s each: cls keeps PP-OCR in the fast tier
    pytest.param(name, w, a, marks=() if name == "cls" else pytest.mark.slow) for name in ("det", "rec", "cls")
    for w, a in BITS])
def test_ppocr_parity(tmp_path, ppocr, name, wbits, abits):
    shape = PPOCR_SHAPES[name]
    calib = {"x": paddle_text_image(shape[0], *shape[2:], seed=1)}
    out = tmp_path / "q.onnx"
    result = quantize(ppocr[name], out, calib, QuantConfig.of(wbits=wbits, abits=abits), FAST)
    assert_parity_report(result.report)
    if name == "rec":  # the character dictionary must survive into the quantized file
        assert "character" in {p.key for p in onnx.load(str(out)).metadata_props}


@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    from tools.archs import export_reference_models

    return export_reference_models(tmp_path_factory.mktemp("ref"), 17)


@pytest.mark.slow
@pytest.mark.parametrize("wbits,abits", BITS)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "bert"])
def test_torch_model_parity(tmp_path, torch_models, name, wbits, abits):
    rng = np.random.default_rng(0)
    if name == "bert":
        mask = np.ones((8, 24), np.int64)
        mask[::2, 16:] = 0
        calib = {"input_ids": rng.integers(0, 1000, (8, 24)), "attention_mask": mask,
                 "token_type_ids": np.zeros((8, 24), np.int64)}
    else:
        calib = {"input": rng.standard_normal((4, 3, 224, 224)).astype(np.float32)}
    result = quantize(torch_models[name], tmp_path / "q.onnx", calib, QuantConfig.of(wbits=wbits, abits=abits),
                      RunOptions(recon=ReconConfig(method="rtn", calib_size=8, batch_size=4), parity_samples=4, progress=False))
    assert_parity_report(result.report)


class _Reader:
    """The onnxruntime.quantization.CalibrationDataReader protocol: get_next() -> dict | None."""

    def __init__(self, arrays):
        self.items = iter([{"input": a[None]} for a in arrays])

    def get_next(self):
        return next(self.items, None)


def test_calibration_data_reader_is_accepted(tmp_path):
    data = np.load(zoo_calib("zoo_resnet"))["input"][:16]
    result = quantize(MODELS / "zoo_resnet.onnx", tmp_path / "q.onnx", _Reader(data), QuantConfig(), FAST)
    assert_parity_report(result.report)


@pytest.mark.slow
def test_image_folder_calibration_via_cli(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(MODELS / "zoo_resnet.onnx"), "-o", str(out), "--calib", str(folder), "--quiet",
                 "--preprocess", "size=32,32;mean=0,0,0;std=1,1,1;scale=255", "--wbits", "4", "--abits", "8"])
    assert code == 0, capsys.readouterr().err
    assert out.is_file()


def test_exclude_and_bit_overrides_reach_the_report(tmp_path):
    model = onnx.load(str(MODELS / "zoo_resnet.onnx"))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    config = QuantConfig.of(wbits=4, abits=4, exclude=(convs[3],), overrides=((convs[5], 6, 6),))
    report = quantize(MODELS / "zoo_resnet.onnx", tmp_path / "q.onnx", zoo_calib("zoo_resnet"), config, FAST).report
    by_node = {n["node"]: n for n in report.nodes}
    assert convs[3] not in by_node
    assert by_node[convs[5]]["weight"]["bits"] == 6
    assert by_node[convs[0]]["weight"]["bits"] == 8  # first layer kept at 8 bits
    assert all("output_sqnr_db" in n for n in report.nodes)


@pytest.mark.parametrize("argv,message", [
    (["--wbits", "9"], "argument --wbits: invalid choice: 9"),
    (["--bits", "conv=4"], "--bits"),
    (["--bits", "conv=4/12"], "abits must be"),
    (["--exclude", "("], "bad node pattern"),
    (["--device", "tpu"], "--device"),
    (["--first-last-bits", "x"], "--first-last-bits"),
    (["--method", "magic"], "--method"),
    (["--preset", "huge"], "--preset"),
    (["--loss", "l1"], "--loss"),
    (["--granularity", "module"], "--granularity"),
    (["--quant-prob", "0"], "--quant-prob"),
    (["--tile", "3"], "--tile"),
    (["--calib", "/nonexistent.npz"], "no such data file"),
    (["--preprocess", "size=1"], None),
])
def test_bad_quantize_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "q.onnx"
    base = ["quantize", str(MODELS / "zoo_resnet.onnx"), "-o", str(out), "--quiet"]
    if "--calib" not in argv:
        base += ["--calib", str(tmp_path) if "--preprocess" in argv else zoo_calib("zoo_resnet")]
    code = main(base + argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("onnxqlimit: error: ")
    if message:
        assert message in err
    assert not out.exists() and not list(tmp_path.glob(".q.onnx.*"))


def test_a_model_calibrated_at_one_image_size_runs_at_others(tmp_path):
    """Dynamic batch / height / width survive quantization: calibrated at 16x16, the file
    runs at 24x24, 9x13 and batch 3 and stays close to the float model there."""
    from onnx import helper

    from tests.onnx_builders import make, rand, tensor

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1)]
    inits = [("w1", rand(8, 3, 3, 3)), ("b1", rand(8)), ("w2", rand(8, 8, 3, 3)), ("b2", rand(8)),
             ("w3", rand(5, 8)), ("b3", rand(5))]
    model = make(nodes, [tensor("x", ["batch", 3, "height", "width"])], [tensor("y", ["batch", 5])], inits)
    src = tmp_path / "cnn.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(0)
    calib = {"x": rng.uniform(0, 1, (16, 3, 16, 16)).astype(np.float32)}
    quantize(src, tmp_path / "q.onnx", calib, QuantConfig.of(wbits=8, abits=8),
             RunOptions(recon=ReconConfig(method="qdrop", iters=10, calib_size=16, batch_size=8), parity_samples=4, progress=False))
    float_sess, quant_sess = ort_session(str(src)), ort_session(str(tmp_path / "q.onnx"))
    assert [d.dim_param for d in onnx.load(str(tmp_path / "q.onnx")).graph.input[0].type.tensor_type.shape.dim] \
        == ["batch", "", "height", "width"]
    for shape in ((1, 3, 24, 24), (3, 3, 9, 13), (2, 3, 16, 16)):
        x = rng.uniform(0, 1, shape).astype(np.float32)
        ref, got = float_sess.run(None, {"x": x})[0], quant_sess.run(None, {"x": x})[0]
        assert got.shape == ref.shape == (shape[0], 5)
        sqnr = 10 * np.log10((ref ** 2).sum() / ((got - ref) ** 2).sum())
        assert sqnr > 25, (shape, sqnr)


def test_the_input_model_is_never_overwritten_unless_asked_and_output_is_world_readable(tmp_path, capsys):
    import os
    import shutil

    src = tmp_path / "m.onnx"
    shutil.copy(MODELS / "zoo_resnet.onnx", src)
    before = src.read_bytes()
    args = ["quantize", str(src), "--calib", zoo_calib("zoo_resnet"), "--method", "rtn", "--calib-size", "8", "--quiet"]
    for target in (src, tmp_path / "." / "m.onnx"):
        assert main(args + ["-o", str(target)]) == 2
        err = capsys.readouterr().err
        assert "the output is the input model" in err and len(err.strip().splitlines()) == 1
        assert src.read_bytes() == before
    umask = os.umask(0o022)
    try:
        assert main(args + ["-o", str(tmp_path / "q.onnx")]) == 0
        assert main(args + ["-o", str(src), "--overwrite"]) == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "q.onnx").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert src.read_bytes() != before and onnx.load(str(src)).graph.node


def test_a_nan_in_the_calibration_data_is_named_before_calibration(tmp_path, capsys):
    data = dict(np.load(zoo_calib("zoo_resnet")))
    name = next(iter(data))
    data[name] = data[name].astype(np.float32)
    data[name][3, 0, 1, 2] = np.nan
    bad = tmp_path / "nan.npz"
    np.savez(bad, **data)
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(MODELS / "zoo_resnet.onnx"), "-o", str(out), "--calib", str(bad), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"calibration input '{name}' holds NaN or Inf (first at sample 3, index (3, 0, 1, 2))" in err
    assert not out.exists()


def test_external_data_in_external_data_out(tmp_path):
    """A model whose weights sit in a data file is read whole and written the same way."""
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(MODELS / "zoo_resnet.onnx")), str(src), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    out = tmp_path / "out" / "q.onnx"
    assert main(["quantize", str(src), "-o", str(out), "--calib", zoo_calib("zoo_resnet"), "--method", "rtn",
                 "--quiet"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx", "q.onnx.data"]  # no temporary left
    assert (out.parent / "q.onnx.data").stat().st_size > 2 * out.stat().st_size  # the weights are in the data file
    x = np.load(zoo_calib("zoo_resnet"))["input"][:4]
    got = ort_session(str(out)).run(None, {"input": x})[0]
    ref = ort_session(str(src)).run(None, {"input": x})[0]
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75


def test_end_to_end_parity_fails_what_moves_every_sample_not_one_near_tie():
    """The quantized output guard (parity.ok_quantized) judges the typical sample: one sample
    whose decision flips (a tie upstream) passes, a shift of every sample fails."""
    from onnxqlimit.mirror import Mirror
    from onnxqlimit.parity import check_mirror
    from tests.onnx_builders import make, tensor

    io = ([tensor("x", ["n", 2])], [tensor("y", ["n", 2])])
    same = make([onnx.helper.make_node("Identity", ["x"], ["y"])], *io)
    # moves only the elements above 1: y = x + 10 * relu(x - 1)
    moved = make([onnx.helper.make_node("Sub", ["x", "one"], ["d"]), onnx.helper.make_node("Relu", ["d"], ["r"]),
                  onnx.helper.make_node("Mul", ["r", "ten"], ["m"]), onnx.helper.make_node("Add", ["x", "m"], ["y"])],
                 *io, [("one", np.float32(1.0)), ("ten", np.float32(10.0))])
    x = np.random.default_rng(0).uniform(0, 1, (8, 2)).astype(np.float32)
    one_sample = x.copy()
    one_sample[3, 0] = 1.2
    [row] = check_mirror(same, Mirror(moved), {"x": one_sample})
    assert row.mean_abs_diff > 0.01 * row.ref_range and row.ok_quantized  # the mean alone would have failed it
    [row] = check_mirror(same, Mirror(moved), {"x": x + 1.0})
    assert not row.ok_quantized
