"""Per-node onnxruntime latency table for the mixed-precision search's --target-latency.

    python -m tools.build_latency_table MODEL.onnx --calib CALIB.npz [--pairs 8/8,4/8,4/4,2/4] [--out table.json]

Every Conv / ConvTranspose / Gemm / MatMul is timed alone (float, and as QDQ at each
wbits/abits pair) on sample 0 of the calibration data; see onnxqlimit/mixed/latency.py.
Prints one row per node, a sum row and the whole float model's latency, and writes
{"nodes": {node: {"float": ms, "8/8": ms, ...}}, "model_float_ms": ms, ...} as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from onnxqlimit.data import graph_inputs, load_npz
from onnxqlimit.errors import QLimitError
from onnxqlimit.load import LoadConfig, load_model
from onnxqlimit.mixed.latency import FLOAT, model_latency_ms, node_latency_table, nodes_of, pair_key


def parse_pairs(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(b) for b in item.split("/")) for item in text.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected wbits/abits pairs like 8/8,4/4, got {text!r}")
    return pairs  # type: ignore[return-value]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calib", required=True, help=".npz keyed by input name; sample 0 is used")
    parser.add_argument("--pairs", type=parse_pairs, default=parse_pairs("8/8,4/8,4/4,2/4"))
    parser.add_argument("--out", help="write the table as JSON here")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    try:
        model = load_model(args.model, LoadConfig(min_opset=25))
        names = [i.name for i in graph_inputs(model)]
        feeds = {k: v[:1] for k, v in load_npz(args.calib, names).items()}
        nodes = nodes_of(model)
        start = time.perf_counter()
        table = node_latency_table(model, feeds, nodes, args.pairs, args.repeats, args.threads)
        elapsed = time.perf_counter() - start
        whole = model_latency_ms(model, feeds, args.repeats, args.threads)
    except QLimitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    keys = [FLOAT] + [pair_key(*p) for p in args.pairs]
    ops = {n.name: n.op_type for n in model.graph.node}
    width = max([len("node (op)")] + [len(f"{n} ({ops[n]})") for n in nodes])
    header = f"{'node (op)':<{width}} " + " ".join(f"{k:>9}" for k in keys)
    print(f"{args.model}: {len(nodes)} compute nodes, median ms per run alone "
          f"({args.repeats} runs, {args.threads} thread(s))")
    print(header)
    print("-" * len(header))
    for n in nodes:
        print(f"{f'{n} ({ops[n]})':<{width}} " + " ".join(f"{table[n][k]:9.4f}" for k in keys))
    print("-" * len(header))
    sums = {k: sum(row[k] for row in table.values()) for k in keys}
    print(f"{'sum over nodes':<{width}} " + " ".join(f"{sums[k]:9.4f}" for k in keys))
    print(f"{'vs float':<{width}} " + " ".join(f"{sums[k] / sums[FLOAT]:8.2f}x" for k in keys))
    print(f"whole float model (model_latency_ms): {whole:.4f} ms; table built in {elapsed:.1f} s")
    if args.out:
        record = {"model": args.model, "pairs": [pair_key(*p) for p in args.pairs], "repeats": args.repeats,
                  "threads": args.threads, "model_float_ms": whole, "nodes": table}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
