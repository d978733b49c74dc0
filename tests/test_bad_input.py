"""Bad input to `onnxqlimit quantize` is refused before any work: one line on stderr, exit
code 2, no output file, the input model untouched (issue 12). docs/errors.md lists the
same cases with their messages."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from onnxqlimit.cli import main
from onnxqlimit.errors import QLimitError
from onnxqlimit.load import load_model
from onnxqlimit.mirror import Mirror
from onnxqlimit.recon import ReconConfig  # noqa: I001
from tests.conftest import MODELS

MODEL = MODELS / "zoo_resnet.onnx"  # input [batch, 3, 32, 32] float


def _images(n: int = 4, shape=(3, 32, 32), dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).random((n, *shape)).astype(dtype)


def _npz(path, array):
    np.savez(path, input=array)
    return path


# (case id, extra argv, builder of the calibration source in tmp_path or None, expected message part)
CASES = [
    ("rank", [], lambda d: _npz(d / "c.npz", _images(shape=(32, 32))),
     "calibration input 'input': arrays of rank 3 (4, 32, 32), the model takes rank 4 [batch,3,32,32]"),
    ("dtype uint8", [], lambda d: _npz(d / "c.npz", (_images() * 255).astype(np.uint8)),
     "calibration input 'input': uint8 data for a float32 input"),
    ("channels last", [], lambda d: _npz(d / "c.npz", _images(shape=(32, 32, 3))),
     "at axis 1 (32 where the model fixes 3) (the data looks channels-last; the model takes NCHW)"),
    ("spatial size", [], lambda d: _npz(d / "c.npz", _images(shape=(3, 64, 64))),
     "shape (4, 3, 64, 64) contradicts the model's [batch,3,32,32] at axis 2 (64 where the model fixes 32)"),
    ("image folder size", ["--preprocess", "size=224,224;mean=0,0,0;std=1,1,1"], lambda d: _folder(d),
     "(for an image folder, set --preprocess size=H,W to the model's)"),
    ("extra array", [], lambda d: _npz2(d / "c.npz", input=_images(), inptu=_images()),
     "array(s) inptu match no model input (inputs: input; label/labels may sit beside them)"),
    ("zero samples", [], lambda d: _npz(d / "c.npz", _images(0)), "holds no samples"),
    ("--bits no match", ["--bits", "nomatch=4/4"], None, "--bits 'nomatch' matches no node name or output"),
    ("--exclude no match", ["--exclude", "Conv_99x"], None, "--exclude 'Conv_99x' matches no node name or output"),
    ("output under a file", ["-o", "{tmp}/ok.npz/q.onnx"], None, "cannot write there ("),
    ("output is a folder", ["-o", "{tmp}"], None, "is a folder; -o takes the path of the model file to write"),
    ("bad --preprocess", ["--preprocess", "size=32,32;bogus=1"], None, "--preprocess: unknown or malformed item"),
    ("--wbits 1", ["--wbits", "1"], None, "argument --wbits: invalid choice: 1 (choose from 2, 3, 4, 5, 6, 7, 8)"),
    ("--method typo", ["--method", "qdorp"], None, "argument --method: invalid choice: 'qdorp'"),
    ("missing value", ["--iters"], None, "argument --iters: expected one argument"),
]


def _npz2(path, **arrays):
    np.savez(path, **arrays)
    return path


def _folder(d):
    folder = d / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((_images(1, (40, 40, 3))[0] * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_with_nothing_written(case, tmp_path, capsys):
    _, argv, build, message = case
    calib = build(tmp_path) if build else _npz(tmp_path / "ok.npz", _images())
    before = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    out = tmp_path / "q.onnx"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(["quantize", str(MODEL), "-o", str(out), "--calib", str(calib), "--method", "rtn", "--quiet", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == before


def test_same_kind_dtypes_are_cast_not_refused(tmp_path, capsys):
    """float64 images (numpy's default) are calibration data, not an error."""
    calib = _npz(tmp_path / "c.npz", _images(8).astype(np.float64))
    assert main(["quantize", str(MODEL), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib), "--method", "rtn",
                 "--quiet"]) == 0, capsys.readouterr().err


def test_mirror_run_names_an_unknown_tensor():
    mirror = Mirror(load_model(MODEL))
    with pytest.raises(QLimitError, match="no tensor named 'conv1_out' in the model"):
        mirror.run({"input": _images(1)}, outputs=["conv1_out"])


def test_a_nan_while_tuning_keeps_round_to_nearest_and_says_so(tmp_path, monkeypatch, caplog):
    """A block whose tuning ends in NaN is put back to round to nearest, named in a warning,
    and no NaN reaches the file."""
    import sys

    import onnx
    from onnx import numpy_helper

    from onnxqlimit.pipeline import RunOptions, quantize

    recon_module = sys.modules["onnxqlimit.recon.reconstruct"]  # the package re-exports a function of that name

    original = recon_module.tune_block

    def poisoned(*args):
        stats = original(*args)
        block, tuned, runner = args[1], args[3], args[0]
        if block.index == 1:
            for point in tuned:
                if point.kind == "activation":
                    runner.quantizers[point.tensor].scale.data.fill_(float("nan"))
        return stats

    monkeypatch.setattr(recon_module, "tune_block", poisoned)
    out = tmp_path / "q.onnx"
    report = quantize(MODEL, out, {"input": _images(16)}, options=RunOptions(recon=ReconConfig(iters=5, calib_size=16), progress=False)).report
    assert "block 2 (nodes" in caplog.text and "the loss became nan while tuning" in caplog.text
    assert report.reconstruction["blocks"][1]["kept_rtn"]
    for init in onnx.load(str(out)).graph.initializer:
        assert np.isfinite(numpy_helper.to_array(init).astype(np.float64)).all(), init.name


def _truncated(d):
    path = d / "m.onnx"
    path.write_bytes(MODEL.read_bytes()[:5000])
    return path


def _invalid(d):
    import onnx

    model = onnx.load(str(MODEL))
    model.graph.node[0].input[0] = "nowhere"  # reads a tensor nothing produces
    path = d / "m.onnx"
    onnx.save(model, str(path))
    return path


def _unsupported(d):
    import onnx

    from tests.onnx_builders import det_model

    path = d / "m.onnx"
    onnx.save(det_model(), str(path))
    return path


MODEL_CASES = [
    ("missing", lambda d: d / "none.onnx", "no such model file"),
    ("truncated", _truncated, "not a readable ONNX model"),
    ("invalid graph", _invalid, "invalid ONNX model: Nodes in a graph must be topologically sorted, however input "
                                "'nowhere' of node: name: "),
    ("unsupported ops", _unsupported, "model cannot be mirrored - unsupported ops: Det (1 node)"),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_files_refused_in_one_line(case, tmp_path, capsys):
    _, build, message = case
    src = build(tmp_path)
    before = src.read_bytes() if src.exists() else None
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(src), "-o", str(out), "--calib", str(_npz(tmp_path / "c.npz", _images())), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and (src.read_bytes() if src.exists() else None) == before
