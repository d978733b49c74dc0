"""The command line: inspect output, clear one-line refusals, exit codes."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxqlimit.cli import main
from tests.onnx_builders import det_model, loop_model, make, rand, tensor


@pytest.fixture()
def small_model(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1), helper.make_node("Relu", ["g"], ["y"])]
    model = make(nodes, [tensor("x", ["batch", 6])], [tensor("y", ["batch", 4])], [("w", rand(4, 6)), ("b", rand(4))],
                 metadata={"note": "hello"})
    path = tmp_path / "small.onnx"
    onnx.save(model, str(path))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_summary(capsys, small_model):
    code, out, err = run(capsys, "inspect", small_model)
    assert code == 0, err
    assert "input  x: float [batch, 6]" in out
    assert "output y: float [batch, 4]" in out
    assert "opset 17" in out and "parameters: 28" in out
    assert "Gemm" in out and "all ops supported" in out
    assert "metadata: note" in out


def test_inspect_check_random_and_npz(capsys, small_model, tmp_path):
    code, out, err = run(capsys, "inspect", small_model, "--check", "--input-shape", "x=3,6")
    assert code == 0, err
    assert "parity: mirror vs onnxruntime on 3 sample(s)" in out and " yes" in out
    data = tmp_path / "data.npz"
    np.savez(data, x=rand(5, 6))
    code, out, err = run(capsys, "inspect", small_model, "--check", "--data", data, "--samples", "4")
    assert code == 0, err
    assert "on 4 sample(s)" in out


@pytest.mark.parametrize("builder,op", [(det_model, "Det"), (lambda: loop_model("GridSample"), "GridSample")])
def test_unsupported_ops_refused_in_one_line(capsys, tmp_path, builder, op):
    path = tmp_path / f"{op}.onnx"
    onnx.save(builder(), str(path))
    code, out, err = run(capsys, "inspect", path)
    assert code == 0 and f"unsupported: {op} (1)" in out  # plain inspect reports, does not refuse
    code, out, err = run(capsys, "inspect", path, "--check")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("onnxqlimit: error: model cannot be mirrored - unsupported ops: ")
    assert f"{op} (1 node)" in lines[-1]
    assert "Traceback" not in err


def test_bad_inputs_exit_2_with_one_line(capsys, tmp_path, small_model):
    cases = [
        ["inspect", tmp_path / "missing.onnx"],
        ["inspect", small_model, "--check", "--data", tmp_path / "missing.npz"],
    ]
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx file at all")
    cases.append(["inspect", junk])
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, other=rand(2, 6))
    cases.append(["inspect", small_model, "--check", "--data", wrong])
    for argv in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("onnxqlimit: error: "), (argv, err)


def test_bad_option_values_are_usage_errors(capsys, small_model):
    for argv in (["inspect", small_model, "--samples", "0"], ["inspect", small_model, "--input-shape", "x"]):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("onnxqlimit: error: argument"), err


@pytest.mark.slow
def test_module_entry_point(small_model):
    result = subprocess.run([sys.executable, "-m", "onnxqlimit", "inspect", str(small_model)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Gemm" in result.stdout


def test_default_work_dir_is_onnxqlimit_cache(capsys, tmp_path, private_cache):
    """Without --work-dir, the search's tables go to $ONNXQLIMIT_CACHE (here the test's own
    folder, set by conftest for every test), never to ~/.cache/onnxqlimit."""
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["a"], transB=1), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["b"], transB=1), helper.make_node("Relu", ["b"], ["s"]),
             helper.make_node("Gemm", ["s", "w3"], ["y"], transB=1)]
    model = make(nodes, [tensor("x", ["batch", 8])], [tensor("y", ["batch", 4])],
                 [("w1", rand(8, 8)), ("w2", rand(8, 8)), ("w3", rand(4, 8))])
    path, data = tmp_path / "chain.onnx", tmp_path / "calib.npz"
    onnx.save(model, str(path))
    np.savez(data, x=rand(32, 8))
    code, out, err = run(capsys, "quantize", path, "-o", tmp_path / "q.onnx", "--calib", data, "--method", "rtn",
                         "--target-avg-wbits", "6", "--quiet")
    assert code == 0, err
    assert len(list(private_cache.glob("sensitivity-*.json"))) == 1
