"""Conversion-speed benchmark (issue 10): wall time, tuning-loop GFLOP/s and the task metric.

    python tools/bench_speed.py                                  # every model, W4A4, qdrop fast
    python tools/bench_speed.py --models cls rec --bits W4A4 --jsonl speed.jsonl
    python tools/bench_speed.py --models cls --busy              # idle run, then beside a busy process
    python tools/bench_speed.py --peak                           # the machine's matmul peak only

Per model (tools/speed_models.py): quantize() wall time, the tuning loop's achieved GFLOP/s
(torch's FLOP counter, forward + backward) overall and its range over the blocks, the
iterations run, the blocks stopped early / kept at round to nearest, and the metric of the
exported file. `--busy` reruns the model beside a CPU-bound process and prints, per block,
how much slower it tuned than in the idle run. Run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxqlimit.quant.policy import QuantConfig  # noqa: E402
from onnxqlimit.quantize import RunOptions, quantize  # noqa: E402
from onnxqlimit.recon import ReconConfig  # noqa: E402
from tools.bench_recon import matmul_peak  # noqa: E402
from tools.speed_models import MODELS, prepare  # noqa: E402


SWITCHES = ("early_stop", "compile", "channels_last", "small_block_threads")


def _burn(stop) -> None:
    """A CPU-bound neighbour: pure Python arithmetic until told to stop."""
    x = 0
    while not stop.is_set():
        for i in range(100000):
            x = (x + i * i) % 1000003


def run(name: str, model, work: Path, args, busy: bool = False) -> dict:
    recon = {k: getattr(args, k) for k in SWITCHES + ("tile",) if getattr(args, k) is not None}
    stop = multiprocessing.Event()
    neighbour = multiprocessing.Process(target=_burn, args=(stop,), daemon=True) if busy else None
    if neighbour is not None:
        neighbour.start()
    try:
        started = time.perf_counter()
        result = quantize(model.path, work / f"{name}_q.onnx", model.calib,
                          QuantConfig(wbits=args.wbits, abits=args.abits),
                          RunOptions(method=args.method, preset=args.preset, iters=args.iters, threads=args.threads,
                                     calib_size=model.calib_size, progress=args.progress,
                                     recon=ReconConfig(**recon)))
        wall = time.perf_counter() - started
    finally:
        if neighbour is not None:
            stop.set()
            neighbour.join()
    tuning = result.report["reconstruction"] or {}
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
    ap.add_argument("--bits", default="W4A4")
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
    ap.add_argument("--jsonl", type=Path)
    args = ap.parse_args(argv)
    args.wbits, args.abits = int(args.bits[1]), int(args.bits[3])
    print(f"fp32 matmul peak: {matmul_peak():.0f} GFLOP/s", flush=True)
    if args.peak:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = prepare(name, Path(tmp), args.calib_size)
            rows = [run(name, model, Path(tmp), args)]
            if args.busy:
                rows.append(run(name, model, Path(tmp), args, busy=True))
                slow = [i / b for i, b in zip(rows[0]["block_its"], rows[1]["block_its"]) if b]
                rows[1]["slowdown"] = {"max": round(max(slow), 2), "median": round(sorted(slow)[len(slow) // 2], 2)}
            for row in rows:
                shown = {k: v for k, v in row.items() if k != "block_its"}
                print(json.dumps(shown), flush=True)
                if args.jsonl:
                    with args.jsonl.open("a") as f:
                        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
