"""FP32 task metrics and onnxruntime quantize_static baselines, as one markdown table.

    python -m tools.eval_float                      # all models, all baseline configs
    python -m tools.eval_float --models rec cls --configs W8A8-minmax
    python -m tools.eval_float --float-only

Every number printed is measured in this run: float metrics on the default evaluation
sets of tools/tasks.py, then for each model onnxruntime's quantize_static
(tools/ort_baseline.py) at W8A8, W4A8 and W4A4 with MinMax and Percentile calibration on
`tasks.calibration(model)` (disjoint from the evaluation data). A failed quantization or
evaluation prints its error in the row instead of a number. --json PATH keeps the table as
a docs/results record.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import traceback
from pathlib import Path

import onnxruntime as ort

from tools.common import TASK_MODELS, Table, load
from tools.ort_baseline import LAST_TIMINGS, quantize_with_ort

CONFIGS = {f"W{w}A{a}-{m}": (w, a, m) for w, a in ((8, 8), (4, 8), (4, 4))
           for m in ("minmax", "percentile")}


def fmt(res: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in res.items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(TASK_MODELS), choices=list(TASK_MODELS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--float-only", action="store_true")
    ap.add_argument("--keep", type=Path, help="directory to keep the quantized models in")
    ap.add_argument("--json", help="write the table as a docs/results record here")
    args = ap.parse_args(argv)
    out_dir = args.keep or Path(tempfile.mkdtemp(prefix="ortq_models."))
    out_dir.mkdir(parents=True, exist_ok=True)

    table = Table(["model", "config", "headline", "all metrics", "size MB", "quantize s", "eval s"], args.json,
                  "Float metrics and onnxruntime quantize_static baselines",
                  "onnxruntime quantize_static (tools/ort_baseline.py): QDQ, per-channel weights, calibrated on "
                  "tools/tasks.calibration (disjoint from the evaluation data).")
    table.header()
    for name in args.models:
        model = load(name)
        src, key = model.path, model.metric
        jobs = [("float", None)] + ([] if args.float_only else [(c, CONFIGS[c]) for c in args.configs])
        calib = None
        for label, cfg in jobs:
            qs = "-"
            try:
                path = src
                if cfg:
                    calib = calib if calib is not None else model.calibration()
                    with contextlib.redirect_stdout(sys.stderr):  # onnxruntime's calibration chatter
                        path = quantize_with_ort(src, calib, out_dir / f"{name}_{label}.onnx", *cfg)
                    qs = f"{LAST_TIMINGS['total']:.1f}"
                t0 = time.perf_counter()
                try:
                    res = model.score(path)
                except ort.capi.onnxruntime_pybind11_state.InvalidGraph as e:
                    # e.g. int4 W4A4: the default (ALL) optimisations drop Q/DQ around MaxPool
                    # and leave MaxPool on uint4, which onnxruntime then rejects; measure it
                    # with basic optimisations and say so in the row.
                    print(f"{name} {label}: {str(e)[:200]}", file=sys.stderr)
                    res = model.score(path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
                    label += " (fails to load with default opts; BASIC)"
                ev = time.perf_counter() - t0
                row = [name, label, f"{res[key]:.4f}", fmt(res), f"{path.stat().st_size / 1e6:.2f}", qs, f"{ev:.1f}"]
            except Exception as e:  # noqa: BLE001 - report the failure in the table, go on
                traceback.print_exc(file=sys.stderr)
                row = [name, label, "error", f"{type(e).__name__}: {str(e)[:150]}", "-", qs, "-"]
            table.add(*row)
    return table.rows


if __name__ == "__main__":
    main()
