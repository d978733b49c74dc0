"""Conversion-speed benchmark (issue 10): wall time, tuning-loop GFLOP/s and the task metric.

    python -m tools.bench_speed                                  # every model, W4A4, qdrop fast
    python -m tools.bench_speed --models cls rec --bits W4A4 --jsonl speed.jsonl
    python -m tools.bench_speed --models cls --busy              # idle run, then beside a busy process
    python -m tools.bench_speed --peak                           # the machine's matmul peak only

Per model (face, cls, rec, yolo320, det, minilm, zoo_resnet, zoo_mobilenetv2 from
tools/common.py; the random-weight ones scored by SQNR and cosine against the float
model on held-out inputs): quantize() wall time, the tuning loop's achieved GFLOP/s
(torch's FLOP counter, forward + backward) overall and its range over the blocks, the
iterations run, the blocks stopped early / kept at round to nearest, and the metric of the
exported file. `--busy` reruns the model beside a CPU-bound process and prints, per block,
how much slower it tuned than in the idle run. Rows print as JSON as they finish, then a
table (--json PATH keeps it as a docs/results record). Run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
from tools.common import Table, bits_option, load, matmul_peak, widths

MODELS = ("face", "cls", "rec", "yolo320", "det", "minilm", "zoo_resnet", "zoo_mobilenetv2")
SWITCHES = ("early_stop", "compile", "channels_last", "small_block_threads")


def _burn(stop) -> None:
    """A CPU-bound neighbour: pure Python arithmetic until told to stop."""
    x = 0
    while not stop.is_set():
        for i in range(100000):
            x = (x + i * i) % 1000003


def run(name: str, model, calib: dict, work: Path, args, busy: bool = False) -> dict:
    recon = ReconConfig.preset(args.preset, method=args.method, iters=args.iters,
                               calib_size=len(next(iter(calib.values()))), **{k: getattr(args, k) for k in SWITCHES + ("tile",)})
    stop = multiprocessing.Event()
    neighbour = multiprocessing.Process(target=_burn, args=(stop,), daemon=True) if busy else None
    if neighbour is not None:
        neighbour.start()
    try:
        started = time.perf_counter()
        result = quantize(model.path, work / f"{name}_q.onnx", calib, QuantConfig.of(wbits=args.wbits, abits=args.abits),
                          RunOptions(recon=recon, threads=args.threads, progress=args.progress))
        wall = time.perf_counter() - started
    finally:
        if neighbour is not None:
            stop.set()
            neighbour.join()
    tuning = result.report.reconstruction or {}
    blocks = [b for b in tuning.get("blocks", []) if b["iters"]]
    rates = [b["gflops"] for b in blocks]
    return {"model": name, "bits": args.bits, "busy": busy, "wall_s": round(wall, 1),
            "train_s": round(tuning.get("train_seconds", 0.0), 1), "gflops": round(tuning.get("gflops", 0.0), 1),
            "block_gflops": [round(min(rates), 1), round(max(rates), 1)] if rates else None,
            "iters": sum(b["iters"] for b in blocks), "blocks": len(blocks),
            "stopped_early": sum(b.get("stopped_early", False) for b in blocks),
            "kept_rtn": sum(b.get("kept_rtn", False) for b in blocks),
            "block_its": [b["its_per_s"] for b in blocks], "metric": model.score(result.output_path)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bits", default="W4A4", type=bits_option, metavar="WxAy")
    ap.add_argument("--method", default="qdrop")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--iters", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--calib-size", type=int)
    for switch in SWITCHES:  # ReconConfig's speed levers, default when not given
        ap.add_argument("--" + switch.replace("_", "-"), type=lambda s: s == "on", choices=[True, False], metavar="on|off")
    ap.add_argument("--tile", type=int, help="tile side for local blocks (0: off; default ReconConfig's)")
    ap.add_argument("--busy", action="store_true", help="also run beside a CPU-bound process; per-block slowdown")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--peak", action="store_true", help="print the matmul peak and stop")
    ap.add_argument("--jsonl", type=Path, help="append one JSON record per run")
    ap.add_argument("--json", help="write the table as a docs/results record here")
    args = ap.parse_args(argv)
    args.wbits, args.abits = widths(args.bits)
    print(f"fp32 matmul peak: {matmul_peak():.0f} GFLOP/s", flush=True)
    if args.peak:
        return 0
    table = Table(["model", "bits", "neighbour", "wall s", "tuning s", "GFLOP/s (blocks min-max)", "iterations",
                   "blocks (stopped early / kept rtn)", "metric", "slowdown per block, median / max"],
                  args.json, f"Conversion speed, {args.bits} {args.method}",
                  f"Preset {args.preset}" + (f", {args.iters} iterations per block" if args.iters else "")
                  + "; wall time of quantize(), the tuning loop's GFLOP/s (torch's FLOP counter, forward + backward).")
    done = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = load(name, Path(tmp))
            calib = model.calibration(args.calib_size or (256 if name.startswith("zoo") else None))
            rows = [run(name, model, calib, Path(tmp), args)]
            if args.busy:
                rows.append(run(name, model, calib, Path(tmp), args, busy=True))
                slow = [i / b for i, b in zip(rows[0]["block_its"], rows[1]["block_its"]) if b]
                rows[1]["slowdown"] = {"max": round(max(slow), 2), "median": round(sorted(slow)[len(slow) // 2], 2)}
            for row in rows:
                shown = {k: v for k, v in row.items() if k != "block_its"}
                print(json.dumps(shown), flush=True)
                if args.jsonl:
                    with args.jsonl.open("a") as f:
                        f.write(json.dumps(row) + "\n")
            done += rows
    print()
    table.header()
    for row in done:
        rates = row["block_gflops"]
        slow = row.get("slowdown")
        table.add(row["model"], row["bits"], "busy" if row["busy"] else "idle", f"{row['wall_s']:.1f}",
                  f"{row['train_s']:.1f}", f"{row['gflops']:.1f}" + (f" ({rates[0]:.1f}-{rates[1]:.1f})" if rates else ""),
                  row["iters"], f"{row['blocks']} ({row['stopped_early']} / {row['kept_rtn']})",
                  ", ".join(f"{k} {v:.4f}" for k, v in row["metric"].items()),
                  f"{slow['median']:.2f}x / {slow['max']:.2f}x" if slow else "-")
    return 0


if __name__ == "__main__":
    sys.exit(main())
