"""Deployment check: does onnxruntime's CPU provider fuse our W8A8 QDQ export into integer
kernels, and is it faster than FP32?

    python -m tools.bench_latency [--threads 2] [--runs 30] [--json PATH]

Models: torch-exported ResNet-18 and MobileNetV2 (224x224, random weights, random
calibration data - latency does not depend on accuracy) and the zoo models (their own
calibration data). Prints, per model: fused integer ops in onnxruntime's optimized graph,
median latency FP32 vs W8A8 at batch 1 (onnxqlimit.mixed.latency.model_latency_ms), and
file sizes. --json PATH keeps the table as a docs/results record.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
from onnxqlimit.mixed.latency import model_latency_ms
from tools.archs import export_reference_models
from tools.common import Table, load


def fused_ops(path: Path, optimized: Path, threads: int) -> str:
    """The integer ops in onnxruntime's optimized graph of `path` (written to `optimized`)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3  # not the warning that the written graph is tuned for this machine
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return ", ".join(f"{op} x{c}" for op, c in sorted(ops.items()) if op.startswith(("QLinear", "QGemm", "MatMulInteger")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", help="write the table as a docs/results record here")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    table = Table(["model", "fused integer ops (W8A8)", "FP32 ms", "W8A8 ms", "speed-up", "FP32 MB", "W8A8 MB"],
                  args.json, "W8A8 in onnxruntime: fused integer kernels and latency",
                  f"Batch 1, median of {args.runs} runs with {args.threads} intra-op thread(s); W8A8 round to nearest "
                  "with --quantize-add --quantize-concat.")
    table.header()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        refs = export_reference_models(tmp, 13)
        cases = [(n, refs[n], (1, 3, 224, 224), None) for n in ("resnet18", "mobilenet_v2")]
        for name in ("zoo_resnet", "zoo_mobilenetv2"):
            model = load(name)
            cases.append((name, model.path, (1, 3, 32, 32), model.calibration(256)))
        for name, path, shape, calib in cases:
            if calib is None:
                calib = {"input": rng.standard_normal((32,) + shape[1:]).astype(np.float32)}
            out = tmp / f"{name}_w8a8.onnx"
            quantize(path, out, calib, QuantConfig.of(wbits=8, abits=8, quantize_add=True, quantize_concat=True),
                     RunOptions(recon=ReconConfig(method="rtn"), progress=False))
            feeds = {"input": rng.standard_normal(shape).astype(np.float32)}
            fused = fused_ops(out, tmp / f"{name}_opt.onnx", args.threads)
            fp = model_latency_ms(str(path), feeds, args.runs, args.threads)
            q = model_latency_ms(str(out), feeds, args.runs, args.threads)
            table.add(name, fused or "none", f"{fp:.2f}", f"{q:.2f}", f"{fp / q:.2f}x",
                      f"{path.stat().st_size / 1e6:.2f}", f"{out.stat().st_size / 1e6:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
