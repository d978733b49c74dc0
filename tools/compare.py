"""Side by side: onnxqlimit vs onnxruntime's quantize_static, task metrics in one table.

    python -m tools.compare                          # all models, W8A8 W4A8 W4A4 W3A3 W2A4
    python -m tools.compare --models rec cls --bits W4A4

Per model and width: the float metric, onnxqlimit (round to nearest, per-channel MSE
weights, MSE activations, first/last layers 8-bit) and onnxruntime quantize_static
(QDQ, per-channel, MinMax and Percentile; QInt4/QUInt4 where 4 bits are asked; no 2/3-bit
types exist there). Same calibration set for both (tools/tasks.calibration: 64 samples for
PP-OCR, 128 for the zoo, disjoint from the evaluation data); every number is measured in
this run. --json PATH keeps the table as a docs/results record.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
from tools.common import TASK_MODELS, Table, bits_option, load, widths
from tools.ort_baseline import quantize_with_ort

WIDTHS = ["W8A8", "W4A8", "W4A4", "W3A3", "W2A4"]


def _cell(fn):
    """(metric, size MB, seconds) or the error text."""
    start = time.perf_counter()
    try:
        metric, size = fn()
    except Exception as err:  # a baseline that fails (onnxruntime rejecting its own file) is a result
        return f"n/a ({str(err).splitlines()[0][:60]})"
    return f"{metric:.4f} ({size:.2f} MB, {time.perf_counter() - start:.0f} s)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(TASK_MODELS), choices=list(TASK_MODELS))
    ap.add_argument("--bits", nargs="+", default=WIDTHS, type=bits_option, metavar="WxAy")
    ap.add_argument("--json", help="write the table as a docs/results record here")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="compare."))
    table = Table(["model", "metric", "float", "bits", "onnxqlimit rtn", "ort MinMax", "ort Percentile"], args.json,
                  "Round to nearest against onnxruntime's quantize_static",
                  "Cells: metric (file size, quantization time). Calibration: 64 samples for PP-OCR and 128 for "
                  "the zoo, disjoint from the evaluation data, and the same for both tools.")
    table.header()
    for name in args.models:
        model = load(name)
        src, key = model.path, model.metric
        calib = model.calibration()  # tasks.calibration's default: 64 for PP-OCR, 128 for the zoo
        float_metric = model.score(src)[key]
        for bits in args.bits:
            wbits, abits = widths(bits)

            def ours():
                out = work / f"{name}_{bits}_qlimit.onnx"
                recon = ReconConfig(method="rtn", calib_size=len(next(iter(calib.values()))), batch_size=8)
                quantize(src, out, calib, QuantConfig.of(wbits=wbits, abits=abits), RunOptions(recon=recon, progress=False))
                return model.score(out)[key], out.stat().st_size / 1e6

            def theirs(method):
                def run():
                    out = quantize_with_ort(src, calib, work / f"{name}_{bits}_ort_{method}.onnx", wbits, abits, method)
                    return model.score(out)[key], out.stat().st_size / 1e6
                return run

            table.add(name, key, f"{float_metric:.4f}", bits, _cell(ours), _cell(theirs("minmax")),
                      _cell(theirs("percentile")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
