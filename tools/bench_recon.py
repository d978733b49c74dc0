"""Reconstruction benchmark: rtn, adaround, brecq, qdrop and onnxruntime side by side.

    python tools/bench_recon.py                                   # everything (hours on 2 cores)
    python tools/bench_recon.py --models zoo_resnet --bits W4A4 W2A4
    python tools/bench_recon.py --models rec --bits W4A4 --methods qdrop --preset fast
    python tools/bench_recon.py --peak                            # the machine's matmul peak only

Per model, bit width and method: the task metric of the exported QDQ file run by
onnxruntime (zoo top-1; PP-OCR rec character and exact-line accuracy; cls accuracy; det
F1), its size, the quantization wall time, and for the reconstruction methods the
achieved GFLOP/s of the tuning loop (torch's FLOP counter, forward + backward) next to a
measured fp32 matmul peak. The float metric is measured in the same run. onnxruntime's
quantize_static is the best of MinMax and Percentile (QInt4 at 4 bits; it has no 2/3-bit
types). Rows print as they finish; --jsonl keeps them as records.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxqlimit.quant.policy import QuantConfig  # noqa: E402
from onnxqlimit.quantize import RunOptions, quantize  # noqa: E402
from onnxqlimit.recon import ReconConfig  # noqa: E402
from tools import tasks  # noqa: E402
from tools.eval_float import MODELS  # noqa: E402
from tools.ort_baseline import quantize_with_ort  # noqa: E402

WIDTHS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W3A3": (3, 3), "W2A4": (2, 4)}
DEFAULT_WIDTHS = ["W8A8", "W4A4", "W3A3", "W2A4"]
METHODS = ("rtn", "adaround", "brecq", "qdrop", "ort")
EXTRA_METRIC = {"rec": "line_acc"}  # shown beside the headline metric


def matmul_peak(size: int = 2048, repeats: int = 20) -> float:
    """Measured fp32 GFLOP/s of a square matmul with torch's threads (the practical peak)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def run_ours(name, src, calib, out, wbits, abits, method, args) -> dict:
    recon = ReconConfig(round_lambda=args.round_lambda, loss=args.loss)
    result = quantize(src, out, calib, QuantConfig(wbits=wbits, abits=abits),
                      RunOptions(method=method, preset=args.preset, iters=args.iters, batch_size=args.batch_size,
                                 calib_size=len(next(iter(calib.values()))), recon=recon, progress=False))
    tuning = result.report["reconstruction"] or {}
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
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bits", nargs="+", default=DEFAULT_WIDTHS, choices=list(WIDTHS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--iters", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--calib-size", type=int, help="default: 256 (the fast preset), 32 for det (640x640 pages)")
    ap.add_argument("--round-lambda", type=float, default=0.01)
    ap.add_argument("--loss", default="mse")
    ap.add_argument("--jsonl", help="append one JSON record per cell")
    ap.add_argument("--peak", action="store_true", help="only measure the matmul peak")
    args = ap.parse_args(argv)
    peak = matmul_peak()
    print(f"torch threads {torch.get_num_threads()}, fp32 matmul peak {peak:.1f} GFLOP/s", flush=True)
    if args.peak:
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench_recon."))
    print("| model | metric | float | bits | method | metric | size MB | time s | GFLOP/s (% of peak) |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.models:
        task, make, key = MODELS[name]
        data, src = make(), tasks.model_path(name)
        n = args.calib_size or {"det": 32}.get(name, 256)
        calib = tasks.calibration(name, n)
        float_res = tasks.evaluate(str(src), task, data)
        extra = EXTRA_METRIC.get(task)

        def fmt(res: dict, key=key, extra=extra) -> str:
            return f"{res[key]:.4f}" + (f" / {res[extra]:.3f}" if extra else "")

        for bits in args.bits:
            wbits, abits = WIDTHS[bits]
            for method in args.methods:
                out = work / f"{name}_{bits}_{method}.onnx"
                record = {"model": name, "bits": bits, "method": method, "float": float_res, "calib": n,
                          "loss": args.loss, "preset": args.preset, "iters": args.iters, "batch_size": args.batch_size}
                start = time.perf_counter()
                try:
                    if method == "ort":
                        tried = run_ort(src, calib, out, wbits, abits)
                        scored = {m: tasks.evaluate(str(p), task, data) for m, p in tried.items()
                                  if isinstance(p, Path)}
                        if not scored:
                            raise next(iter(tried.values()))
                        best = max(scored, key=lambda m: scored[m][key])
                        out, res = tried[best], scored[best]
                        record["ort_calibration"] = best
                    else:
                        record.update(run_ours(name, src, calib, out, wbits, abits, method, args))
                        res = tasks.evaluate(str(out), task, data)
                    seconds = time.perf_counter() - start
                    record.update(result=res, size_mb=out.stat().st_size / 1e6, seconds=seconds)
                    rate = record.get("gflops")
                    speed = f"{rate:.1f} ({100 * rate / peak:.0f}%)" if rate else "-"
                    label = f"ort ({record['ort_calibration']})" if method == "ort" else method
                    print(f"| {name} | {key}{' / ' + extra if extra else ''} | {fmt(float_res)} | {bits} | {label} | "
                          f"{fmt(res)} | {record['size_mb']:.2f} | {seconds:.0f} | {speed} |", flush=True)
                except Exception as err:  # noqa: BLE001 - a failed cell is reported, the run goes on
                    record["error"] = str(err).splitlines()[0][:120]
                    print(f"| {name} | {key} | {fmt(float_res)} | {bits} | {method} | n/a ({record['error'][:60]}) "
                          f"| - | - | - |", flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
