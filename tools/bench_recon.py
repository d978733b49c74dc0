"""Reconstruction benchmark: rtn, adaround, brecq, qdrop and onnxruntime side by side.

    python -m tools.bench_recon                                   # everything (hours on 2 cores)
    python -m tools.bench_recon --models zoo_resnet --bits W4A4 W2A4
    python -m tools.bench_recon --models rec --bits W4A4 --methods qdrop --preset fast
    python -m tools.bench_recon --peak                            # the machine's matmul peak only

Per model, bit width and method: the task metric of the exported QDQ file run by
onnxruntime (zoo top-1; PP-OCR rec character and exact-line accuracy; cls accuracy; det
F1), its size, the quantization wall time, and for the reconstruction methods the
achieved GFLOP/s of the tuning loop (torch's FLOP counter, forward + backward) next to a
measured fp32 matmul peak. The float metric is measured in the same run. onnxruntime's
quantize_static is the best of MinMax and Percentile (QInt4 at 4 bits; it has no 2/3-bit
types). Rows print as they finish; --jsonl keeps them as records, --json PATH the table as
a docs/results record.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
from tools.common import TASK_MODELS, Table, bits_option, load, matmul_peak, widths
from tools.ort_baseline import quantize_with_ort

DEFAULT_WIDTHS = ["W8A8", "W4A4", "W3A3", "W2A4"]
METHODS = ("rtn", "adaround", "brecq", "qdrop", "ort")
EXTRA_METRIC = {"rec": "line_acc"}  # shown beside the headline metric


def run_ours(name, src, calib, out, wbits, abits, method, args) -> dict:
    recon = ReconConfig.preset(args.preset, method=method, iters=args.iters, batch_size=args.batch_size,
                               calib_size=len(next(iter(calib.values()))), round_lambda=args.round_lambda, loss=args.loss)
    result = quantize(src, out, calib, QuantConfig.of(wbits=wbits, abits=abits), RunOptions(recon=recon, progress=False))
    tuning = result.report.reconstruction or {}
    return {"gflops": tuning.get("gflops"), "blocks": len(tuning.get("blocks", [])),
            "peak_rss_mb": tuning.get("peak_rss_mb"), "peak_cache_mb": tuning.get("peak_cache_mb")}


def run_ort(src, calib, out, wbits, abits) -> tuple[Path, str]:
    """Both calibrations; the caller keeps the better one."""
    if wbits not in (4, 8) or abits not in (4, 8):
        raise ValueError(f"onnxruntime has no {min(wbits, abits)}-bit type")
    paths = {}
    for method in ("minmax", "percentile"):
        try:
            paths[method] = quantize_with_ort(src, calib, out.with_name(f"{out.stem}_{method}.onnx"), wbits, abits, method)
        except Exception as err:  # noqa: BLE001 - a failing baseline is a result
            paths[method] = err
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(TASK_MODELS), choices=list(TASK_MODELS))
    ap.add_argument("--bits", nargs="+", default=DEFAULT_WIDTHS, type=bits_option, metavar="WxAy")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--iters", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--calib-size", type=int, help="default: 256 (the fast preset), 32 for det (640x640 pages)")
    ap.add_argument("--round-lambda", type=float, default=0.01)
    ap.add_argument("--loss", default="mse")
    ap.add_argument("--jsonl", help="append one JSON record per cell")
    ap.add_argument("--json", help="write the table as a docs/results record here")
    ap.add_argument("--peak", action="store_true", help="only measure the matmul peak")
    args = ap.parse_args(argv)
    peak = matmul_peak()
    print(f"torch threads {torch.get_num_threads()}, fp32 matmul peak {peak:.1f} GFLOP/s", flush=True)
    if args.peak:
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench_recon."))
    table = Table(["model", "metric", "float", "bits", "method", "metric", "size MB", "time s", "GFLOP/s (% of peak)"],
                  args.json, "Reconstruction methods against onnxruntime",
                  f"Preset {args.preset}" + (f", {args.iters} iterations per block" if args.iters else "")
                  + f", loss {args.loss}; fp32 matmul peak {peak:.1f} GFLOP/s with {torch.get_num_threads()} threads. "
                  "onnxruntime: quantize_static, the better of MinMax and Percentile.")
    table.header()
    for name in args.models:
        model = load(name)
        src, key = model.path, model.metric
        n = args.calib_size or {"det": 32}.get(name, 256)
        calib = model.calibration(n)
        float_res = model.score(src)
        extra = EXTRA_METRIC.get(name)

        def fmt(res: dict, key=key, extra=extra) -> str:
            return f"{res[key]:.4f}" + (f" / {res[extra]:.3f}" if extra else "")

        for bits in args.bits:
            wbits, abits = widths(bits)
            for method in args.methods:
                out = work / f"{name}_{bits}_{method}.onnx"
                record = {"model": name, "bits": bits, "method": method, "float": float_res, "calib": n,
                          "loss": args.loss, "preset": args.preset, "iters": args.iters, "batch_size": args.batch_size}
                start = time.perf_counter()
                try:
                    if method == "ort":
                        tried = run_ort(src, calib, out, wbits, abits)
                        scored = {m: model.score(p) for m, p in tried.items() if isinstance(p, Path)}
                        if not scored:
                            raise next(iter(tried.values()))
                        best = max(scored, key=lambda m: scored[m][key])
                        out, res = tried[best], scored[best]
                        record["ort_calibration"] = best
                    else:
                        record.update(run_ours(name, src, calib, out, wbits, abits, method, args))
                        res = model.score(out)
                    seconds = time.perf_counter() - start
                    record.update(result=res, size_mb=out.stat().st_size / 1e6, seconds=seconds)
                    rate = record.get("gflops")
                    speed = f"{rate:.1f} ({100 * rate / peak:.0f}%)" if rate else "-"
                    label = f"ort ({record['ort_calibration']})" if method == "ort" else method
                    table.add(name, key + (" / " + extra if extra else ""), fmt(float_res), bits, label, fmt(res),
                              f"{record['size_mb']:.2f}", f"{seconds:.0f}", speed)
                except Exception as err:  # noqa: BLE001 - a failed cell is reported, the run goes on
                    record["error"] = str(err).splitlines()[0][:120]
                    table.add(name, key, fmt(float_res), bits, method, f"n/a ({record['error'][:60]})", "-", "-", "-")
                if args.jsonl:
                    with open(args.jsonl, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
