"""Peak memory of a quantization run on a random-weight transformer bigger than half of RAM.

    python -m tools.big_model                      # 17 layers of width 4096: 13.7 GB of float weights
    python -m tools.big_model --method qdrop --iters 20
    python -m tools.big_model --layers 2           # a quick look (1.6 GB)

The model (pre-LayerNorm encoder layers: attention, then a 4x MLP) is written straight
to an external data file, tensor by tensor, so making it never holds it either; it is
cached in --folder and reused. The run is the real CLI in a child process; a sampler
reads the child's /proc status every half second. Printed: the model's size, the run's
peak resident memory (VmHWM), its peak anonymous memory (what the kernel cannot drop),
its peak file-backed share (the mapped weights: page cache, dropped under pressure), the
machine's RAM and the quality line of the run's report. --jsonl PATH appends the
measurement; --json PATH writes it as a one-row docs/results record.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 1 << 16


class DataFile:
    """Appends tensors to one external data file and returns references to them."""

    def __init__(self, path: Path):
        self.name, self.file = path.name, open(path, "wb")

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        self.file.write(b"\0" * (-self.file.tell() % ALIGN))
        offset = self.file.tell()
        self.file.write(np.ascontiguousarray(array).tobytes())
        ref = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        ref.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.name), ("offset", offset), ("length", array.nbytes)):
            ref.external_data.add(key=key, value=str(value))
        return ref


def build(path: Path, layers: int, hidden: int, heads: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    data = DataFile(path.with_name(path.name + ".data"))
    inits, nodes = [], []
    head = hidden // heads

    def weight(name, rows, cols):
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        w *= 1.0 / np.sqrt(rows)
        inits.append(data.tensor(name, w))
        return name

    def small(name, value):
        inits.append(helper.make_tensor(name, TensorProto.FLOAT, value.shape, value.reshape(-1).tolist())
                     if value.size < 256 else data.tensor(name, value))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=f"/{name}/{op}", **attrs))
        return name

    def linear(x, prefix, rows, cols):
        y = node("MatMul", [x, weight(f"{prefix}.weight", rows, cols)], f"{prefix}/matmul")
        return node("Add", [y, small(f"{prefix}.bias", np.zeros(cols, np.float32))], f"{prefix}/out")

    def norm(x, prefix):
        return node("LayerNormalization", [x, small(f"{prefix}.weight", np.ones(hidden, np.float32)),
                                           small(f"{prefix}.bias", np.zeros(hidden, np.float32))], f"{prefix}/out",
                    axis=-1, epsilon=1e-5)

    inits.append(helper.make_tensor("heads_shape", TensorProto.INT64, [4], [0, 0, heads, head]))
    inits.append(helper.make_tensor("merge_shape", TensorProto.INT64, [3], [0, 0, hidden]))
    inits.append(helper.make_tensor("inv_sqrt", TensorProto.FLOAT, [], [1.0 / np.sqrt(head)]))
    x = "x"
    for i in range(layers):
        p = f"layers.{i}"
        h = norm(x, f"{p}.norm1")
        q, k, v = (node("Reshape", [linear(h, f"{p}.attn.{n}", hidden, hidden), "heads_shape"], f"{p}.attn.{n}/heads")
                   for n in "qkv")
        q = node("Transpose", [q], f"{p}.attn.q/t", perm=[0, 2, 1, 3])
        k = node("Transpose", [k], f"{p}.attn.k/t", perm=[0, 2, 3, 1])
        v = node("Transpose", [v], f"{p}.attn.v/t", perm=[0, 2, 1, 3])
        s = node("Mul", [node("MatMul", [q, k], f"{p}.attn/scores"), "inv_sqrt"], f"{p}.attn/scaled")
        a = node("Softmax", [s], f"{p}.attn/probs", axis=-1)
        c = node("Transpose", [node("MatMul", [a, v], f"{p}.attn/context")], f"{p}.attn/context_t", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, "merge_shape"], f"{p}.attn/merged")
        x = node("Add", [x, linear(c, f"{p}.attn.o", hidden, hidden)], f"{p}/residual1")
        h = node("Relu", [linear(norm(x, f"{p}.norm2"), f"{p}.mlp.fc1", hidden, 4 * hidden)], f"{p}.mlp/act")
        x = node("Add", [x, linear(h, f"{p}.mlp.fc2", 4 * hidden, hidden)], f"{p}/residual2")
    out = norm(x, "final_norm")
    graph = helper.make_graph(nodes, "big_transformer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", "seq", hidden])], inits)
    data.file.close()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _status(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def measure(command: list[str]) -> dict:
    """Run `command`; its wall time and peak memory (sampled from /proc every 0.5 s)."""
    started = time.perf_counter()
    child = subprocess.Popen(command)
    peaks = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}

    def sample():
        while child.poll() is None:
            try:
                now = _status(child.pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                break
            for key in peaks:
                peaks[key] = max(peaks[key], now.get(key, 0))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    sampler.join(timeout=2)
    return {"returncode": child.returncode, "seconds": time.perf_counter() - started,
            "peak_rss": max(peaks["VmHWM"], usage.ru_maxrss * 1024), "peak_anon": peaks["RssAnon"],
            "peak_file": peaks["RssFile"]}


def ram_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


def quality(report_path: Path) -> str:
    """The run's quality line (float vs the file), from the report it wrote."""
    from onnxqlimit.evaluate import OutputQuality, format_quality

    try:
        q = json.loads(report_path.read_text())["quality"]
    except (OSError, ValueError, KeyError):
        return "-"
    return format_quality([OutputQuality(**o) for o in q["outputs"]]) if q else "-"


def main(argv=None) -> int:
    from tools.common import Table, bits_option, widths  # here: build() stays numpy and onnx only

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=17)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8, help="calibration samples")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--bits", default="W8A8", type=bits_option, metavar="WxAy")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--folder", type=Path, default=Path.home() / ".cache" / "onnxqlimit" / "big")
    ap.add_argument("--jsonl", type=Path, help="append the measurement here")
    ap.add_argument("--json", help="write the result as a one-row docs/results record here")
    args = ap.parse_args(argv)

    args.folder.mkdir(parents=True, exist_ok=True)
    name = f"transformer_{args.layers}x{args.hidden}"
    model = args.folder / f"{name}.onnx"
    if not model.exists():
        started = time.perf_counter()
        build(model, args.layers, args.hidden, args.heads)
        print(f"built {model} in {time.perf_counter() - started:.0f} s")
    calib = args.folder / f"{name}_calib_{args.samples}x{args.seq}.npz"
    if not calib.exists():
        rng = np.random.default_rng(1)
        np.savez(calib, x=rng.standard_normal((args.samples, args.seq, args.hidden), dtype=np.float32))
    size = model.stat().st_size + (args.folder / f"{model.name}.data").stat().st_size
    out = args.folder / "out" / f"{name}_{args.bits}_{args.method}.onnx"
    wbits, abits = widths(args.bits)
    report = out.with_suffix(".json")
    report.unlink(missing_ok=True)
    command = [sys.executable, "-m", "onnxqlimit", "quantize", str(model), "-o", str(out), "--calib", str(calib),
               "--wbits", str(wbits), "--abits", str(abits), "--method", args.method, "--iters", str(args.iters),
               "--calib-size", str(args.samples), "--batch-size", str(min(args.samples, 4)),
               "--report", str(report)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    print(" ".join(command), flush=True)
    result = measure(command)
    out_size = out.stat().st_size + out.with_name(out.name + ".data").stat().st_size if out.exists() else 0
    result.update(model=name, model_bytes=size, ram_bytes=ram_bytes(), output_bytes=out_size, method=args.method,
                  bits=args.bits, samples=args.samples, seq=args.seq)
    gib = 2**30
    print(f"\nmodel {name}: {size / gib:.2f} GiB float weights ({size / result['ram_bytes']:.0%} of {result['ram_bytes'] / gib:.1f} GiB RAM)")
    print(f"run ({args.bits} {args.method}): exit {result['returncode']}, {result['seconds']:.0f} s")
    print(f"peak resident {result['peak_rss'] / gib:.2f} GiB = anonymous {result['peak_anon'] / gib:.2f} GiB (peak) + "
          f"file-backed {result['peak_file'] / gib:.2f} GiB (peak; mapped weights, page cache)")
    print(f"output {out_size / gib:.2f} GiB")
    result["quality"] = quality(report)
    print(f"quality: {result['quality']}")
    if args.jsonl:
        with args.jsonl.open("a") as fh:
            fh.write(json.dumps(result) + "\n")
    if args.json:
        table = Table(["run", "time", "peak resident", "peak anonymous", "peak file-backed", "output",
                       "quality (float mirror vs file)"], args.json, "Peak memory on a transformer bigger than half of RAM",
                      f"{name}: {size / gib:.2f} GiB of float weights, {result['ram_bytes'] / gib:.1f} GiB of RAM; "
                      f"{args.samples} calibration samples of {args.seq} tokens"
                      + (f", {args.iters} iterations per block" if args.method != "rtn" else "") + ".")
        table.header()
        table.add(f"{args.bits} {args.method}" + ("" if result["returncode"] == 0 else f" (exit {result['returncode']})"),
                  f"{result['seconds']:.0f} s", f"{result['peak_rss'] / gib:.2f} GiB", f"{result['peak_anon'] / gib:.2f} GiB",
                  f"{result['peak_file'] / gib:.2f} GiB", f"{out_size / gib:.2f} GiB", result["quality"])
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
