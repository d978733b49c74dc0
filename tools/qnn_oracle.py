"""The qnn profile against onnxruntime's own QNN rules: the Q/DQ types each writes.

    python -m tools.qnn_oracle [--models rec,cls] [--wbits 8] [--json PATH]

onnxruntime ships the configuration it applies for Qualcomm's HTP
(`onnxruntime.quantization.execution_providers.qnn.get_qnn_qdq_config`). This tool
quantizes each model with it (A16 activations, int8/int4 per-channel weights, as onnxqlimit's
`--runtime qnn --abits 16 --wbits W`) and with onnxqlimit, then compares the files: per role
(activation Q/DQ, weights, biases) the integer types and zero points, and for each
Conv/MatMul/Gemm whether its inputs and output carry Q/DQ. Rows: one per (model, role,
type), with the count in each file.
"""
from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto

from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
from onnxqlimit.load import LoadConfig, load_model
from tools.common import Table, load
from tools.ort_baseline import DictReader

COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def ort_qnn(src: Path, out: Path, calib: dict, wbits: int) -> Path:
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    config = get_qnn_qdq_config(str(src), DictReader(calib), activation_type=QuantType.QUInt16,
                                weight_type=QuantType.QInt8 if wbits == 8 else QuantType.QInt4, per_channel=True)
    quantize(str(src), str(out), config)
    return out


def roles(path: Path) -> Counter:
    """(role, integer type) -> count: activation QuantizeLinear, weight and bias DequantizeLinear
    (an initializer's integers), and compute nodes by which of their inputs/output carry Q/DQ."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for t in node.input:
            readers.setdefault(t, []).append(node)
    counts: Counter = Counter()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in inits:
            # a Q of a float initializer is a weight or bias quantized in the graph
            role = "activation Q" if node.input[0] not in inits else \
                f"{'bias' if len(inits[node.input[0]].dims) == 1 else 'weight'} Q of a float initializer"
            counts[(role, TensorProto.DataType.Name(inits[node.input[2]].data_type))] += 1
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            kind = "bias" if inits[node.input[0]].data_type == TensorProto.INT32 else "weight"
            counts[(f"{kind} DQ", TensorProto.DataType.Name(inits[node.input[0]].data_type))] += 1
        elif node.op_type in COMPUTE:
            fed = all(t in producer and producer[t].op_type == "DequantizeLinear" for t in node.input if t)
            out = any(r.op_type == "QuantizeLinear" for r in readers.get(node.output[0], []))
            counts[(f"{node.op_type}", f"inputs {'all DQ' if fed else 'not all DQ'}, output {'Q' if out else 'no Q'}")] += 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="rec,cls")
    parser.add_argument("--wbits", type=int, default=8, choices=(4, 8))
    parser.add_argument("--json", help="write the table as a docs/results record here")
    args = parser.parse_args(argv)
    table = Table(["model", "role", "type / form", "onnxruntime get_qnn_qdq_config", "onnxqlimit --runtime qnn"],
                  args.json, f"QNN A16W{args.wbits}: onnxqlimit's qnn profile against onnxruntime's QNN configuration",
                  "get_qnn_qdq_config(activation_type=QUInt16, weight_type=QInt8/QInt4, per_channel=True) then "
                  f"quantize(); onnxqlimit --runtime qnn --abits 16 --wbits {args.wbits} --method rtn. Counts per file.")
    table.header()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            model = load(name, work)
            calib = model.calibration()
            # onnxruntime's QNN path takes Constant-node weights (PP-OCR's export) for activations
            # and quantizes them to uint16: both tools start from the same loaded graph, whose
            # constants are initializers (onnxqlimit.load: onnxsim, constants lifted)
            loaded = work / f"{name}_loaded.onnx"
            onnx.save(load_model(onnx.load(str(model.path)), LoadConfig()), str(loaded))
            theirs = roles(ort_qnn(loaded, work / f"{name}_ort_qnn.onnx", calib, args.wbits))
            ours_path = work / f"{name}_qnn.onnx"
            quantize(model.path, ours_path, calib, QuantConfig.of(runtime="qnn", abits=16, wbits=args.wbits),
                     RunOptions(recon=ReconConfig.preset("fast", method="rtn", calib_size=len(next(iter(calib.values())))),
                                progress=False))
            ours = roles(ours_path)
            for role, kind in sorted(set(theirs) | set(ours)):
                table.add(name, role, kind, theirs.get((role, kind), 0), ours.get((role, kind), 0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
