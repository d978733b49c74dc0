"""Deployment check: does onnxruntime's CPU provider fuse our W8A8 QDQ export into integer
kernels, and is it faster than FP32?

    python tools/bench_latency.py [--threads 2] [--runs 30]

Models: torch-exported ResNet-18 and MobileNetV2 (224x224, random weights, random
calibration data - latency does not depend on accuracy) and the zoo models (their own
calibration data). Prints, per
model: fused integer ops in onnxruntime's optimized graph, median latency FP32 vs W8A8
at batch 1, and file sizes.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxqlimit.quant.policy import QuantConfig  # noqa: E402
from onnxqlimit.quantize import RunOptions, quantize  # noqa: E402
from tools.archs import export_reference_models  # noqa: E402


def session(path: Path, threads: int, optimized_out: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if optimized_out:
        options.optimized_model_filepath = str(optimized_out)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def median_ms(sess: ort.InferenceSession, feeds: dict, runs: int) -> float:
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| model | fused integer ops (W8A8) | FP32 ms | W8A8 ms | speed-up | FP32 MB | W8A8 MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        refs = export_reference_models(tmp, 13)
        cases = [(n, refs[n], (1, 3, 224, 224)) for n in ("resnet18", "mobilenet_v2")]
        cases += [(n, ROOT / "models" / f"{n}.onnx", (1, 3, 32, 32)) for n in ("zoo_resnet", "zoo_mobilenetv2")]
        for name, path, shape in cases:
            zoo_calib = ROOT / "models" / f"{name}_calib.npz"
            calib = (str(zoo_calib) if zoo_calib.exists()
                     else {"input": rng.standard_normal((32,) + shape[1:]).astype(np.float32)})
            out = tmp / f"{name}_w8a8.onnx"
            quantize(path, out, calib, QuantConfig(wbits=8, abits=8, quantize_add=True, quantize_concat=True),
                     RunOptions(method="rtn", progress=False))
            feeds = {"input": rng.standard_normal(shape).astype(np.float32)}
            optimized = tmp / f"{name}_opt.onnx"
            q_sess = session(out, args.threads, optimized)
            ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
            fused = ", ".join(f"{op} x{c}" for op, c in sorted(ops.items()) if op.startswith(("QLinear", "QGemm", "MatMulInteger")))
            fp = median_ms(session(path, args.threads), feeds, args.runs)
            q = median_ms(q_sess, feeds, args.runs)
            print(f"| {name} | {fused or 'none'} | {fp:.2f} | {q:.2f} | {fp / q:.2f}x | "
                  f"{path.stat().st_size / 1e6:.2f} | {out.stat().st_size / 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
