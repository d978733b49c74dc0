"""How onnxruntime runs a file (runtime.py): compute nodes counted by the kernel onnxruntime's
optimized graph gives them, on tiny QDQ graphs whose fusion is known."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxqlimit.cli import main
from onnxqlimit.runtime import check_runtime, compute_kernels, format_runtime
from tests.conftest import MODELS
from tests.onnx_builders import tensor

RNG = np.random.default_rng(0)


def _qdq_conv(path, output_qdq: bool) -> None:
    """x -> Q/DQ (uint8) -> Conv (int8 weight, per channel, no bias) [-> Q/DQ] -> y."""
    w = RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_z"),
             numpy_helper.from_array(np.array(0.02, np.float32), "x_s"),
             numpy_helper.from_array(np.array(128, np.uint8), "x_z"),
             numpy_helper.from_array(np.array(0.05, np.float32), "y_s"),
             numpy_helper.from_array(np.array(128, np.uint8), "y_z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], axis=0),
             helper.make_node("Conv", ["x_dq", "w"], ["c" if output_qdq else "y"], name="conv", pads=[1, 1, 1, 1])]
    if output_qdq:
        nodes += [helper.make_node("QuantizeLinear", ["c", "y_s", "y_z"], ["c_q"]),
                  helper.make_node("DequantizeLinear", ["c_q", "y_s", "y_z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def _int4_matmul(path) -> None:
    """A weight-only int4 MatMul, blocks of 16 along K: onnxruntime makes it MatMulNBits."""
    w = RNG.integers(-8, 8, (32, 8)).astype(ml_dtypes.int4)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full((2, 8), 0.1, np.float32), "w_s")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=0, block_size=16),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")]
    graph = helper.make_graph(nodes, "g", [tensor("x", [1, 32])], [tensor("y", [1, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def test_a_conv_between_qdq_pairs_runs_in_an_integer_kernel(tmp_path):
    _qdq_conv(tmp_path / "fused.onnx", output_qdq=True)
    _qdq_conv(tmp_path / "float.onnx", output_qdq=False)  # no Q after the Conv: nothing to fuse with
    kinds, floats = compute_kernels(tmp_path / "fused.onnx")
    assert dict(kinds) == {"QLinearConv": 1} and floats == []
    kinds, floats = compute_kernels(tmp_path / "float.onnx")
    assert sum(kinds.values()) == 1 and "QLinearConv" not in kinds and len(floats) == 1


def test_a_weight_only_int4_matmul_runs_as_matmulnbits(tmp_path):
    _int4_matmul(tmp_path / "q4.onnx")
    check = check_runtime(tmp_path / "q4.onnx", {"x": RNG.random((1, 32), np.float32)})
    assert (check.integer, check.compute, check.kernels) == (1, 1, {"MatMulNBits": 1})
    assert format_runtime(check).startswith("onnxruntime CPU: 1/1 compute nodes in integer kernels (MatMulNBits 1)")


def test_every_run_reports_how_onnxruntime_runs_its_file(tmp_path, capsys):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", str(MODELS / "zoo_resnet.onnx"), "-o", str(out), "--calib",
                 str(MODELS / "zoo_resnet_calib.npz"), "--method", "rtn", "--wbits", "4", "--abits", "4",
                 "--calib-size", "16", "--quiet", "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    runtime = json.loads(report.read_text())["runtime"]
    convs = sum(n.op_type in ("Conv", "Gemm") for n in onnx.load(str(MODELS / "zoo_resnet.onnx")).graph.node)
    # onnxruntime 1.32 has no 4-bit convolution kernel: the W4A4 layers run as float after
    # DequantizeLinear; the last layer (kept W8A8, int32 bias) runs as QGemm. The first conv
    # (W8A8 too) feeds a 4-bit Q: no 8-bit output, no QLinearConv.
    assert runtime["kernels"]["QGemm"] == 1 and sum(runtime["kernels"].values()) == convs
    assert (runtime["integer"], runtime["compute"], len(runtime["float_nodes"])) == (1, convs, convs - 1)
    assert runtime["ms"] > 0 and runtime["float_ms"] > 0 and runtime["batch"] == 1
    assert f"onnxruntime CPU: 1/{convs} compute nodes in integer kernels" in printed
    assert main(["inspect", str(out), "--runtime-check"]) == 0
    assert capsys.readouterr().out.startswith(f"onnxruntime CPU: 1/{convs} compute nodes")


def test_runtime_check_refuses_bad_input_in_one_line(tmp_path, capsys):
    _qdq_conv(tmp_path / "q.onnx", output_qdq=True)
    for extra, message in ((["--reference", str(tmp_path / "missing.onnx")], "no such model file"),
                           (["--input-shape", "x=1,3,4,4"], "--input-shape input 'x': shape (1, 3, 4, 4) contradicts")):
        assert main(["inspect", str(tmp_path / "q.onnx"), "--runtime-check", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("onnxqlimit: error: ") and message in err[0], err
