"""Side by side: onnxqlimit vs onnxruntime's quantize_static, task metrics in one table.

    python tools/compare.py                          # all models, W8A8 W4A8 W4A4 W3A3 W2A4
    python tools/compare.py --models rec cls --bits W4A4

Per model and width: the float metric, onnxqlimit (round to nearest, per-channel MSE
weights, MSE activations, first/last layers 8-bit) and onnxruntime quantize_static
(QDQ, per-channel, MinMax and Percentile; QInt4/QUInt4 where 4 bits are asked; no 2/3-bit
types exist there). Same calibration set for both (tools/tasks.calibration, disjoint from
the evaluation data); every number is measured in this run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxqlimit.quant.policy import QuantConfig  # noqa: E402
from onnxqlimit.quantize import RunOptions, quantize  # noqa: E402
from tools import tasks  # noqa: E402
from tools.eval_float import MODELS  # noqa: E402
from tools.ort_baseline import quantize_with_ort  # noqa: E402

WIDTHS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W3A3": (3, 3), "W2A4": (2, 4)}


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
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bits", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="compare."))
    print("| model | metric | float | bits | onnxqlimit rtn | ort MinMax | ort Percentile |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        task, make, key = MODELS[name]
        data, src, calib = make(), tasks.model_path(name), tasks.calibration(name)
        float_metric = tasks.evaluate(str(src), task, data)[key]
        for bits in args.bits:
            wbits, abits = WIDTHS[bits]

            def ours():
                out = work / f"{name}_{bits}_qlimit.onnx"
                quantize(src, out, calib, QuantConfig(wbits=wbits, abits=abits),
                         RunOptions(method="rtn", calib_size=len(next(iter(calib.values()))), batch_size=8,
                                    progress=False))
                return tasks.evaluate(str(out), task, data)[key], out.stat().st_size / 1e6

            def theirs(method):
                def run():
                    out = quantize_with_ort(src, calib, work / f"{name}_{bits}_ort_{method}.onnx", wbits, abits, method)
                    return tasks.evaluate(str(out), task, data)[key], out.stat().st_size / 1e6
                return run

            print(f"| {name} | {key} | {float_metric:.4f} | {bits} | {_cell(ours)} | {_cell(theirs('minmax'))} | "
                  f"{_cell(theirs('percentile'))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
