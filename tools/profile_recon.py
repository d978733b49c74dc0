"""Where the block-tuning loop spends its time: a per-phase and per-op split.

    python -m tools.profile_recon --models face cls rec yolo320 det minilm --iters 40

Runs quantize() (qdrop, W4A4 unless --bits, --iters iterations per block, --calib-size
samples; early stopping off) under torch's profiler and splits the wall time of the tuning
steps (the forward of each block's first, FLOP-counted step left out) into phases: batch (sampling, cached-input
gather, entry quantizers, QDrop input mix), forward (of which fake quantization and QDrop
mixing), loss, AdaRound regulariser, backward (of which convolution / matmul), optimizer,
and the rest (the Python loop). "aten" is the operators' own CPU time; the gap to the wall
time is Python and dispatch overhead. The profiler itself adds a few microseconds per
operator, so the unprofiled it/s of the same run is printed beside it.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd.profiler import record_function

from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
from onnxqlimit.mirror import Mirror
from onnxqlimit.quant import adaround, fake_quant
from onnxqlimit.recon import runner, tune
from tools.bench_speed import MODELS
from tools.common import bits_option, load, widths

PHASES = ("batch", "forward", "loss", "regularizer", "backward", "optimizer")
MATMUL = ("conv", "mm", "bmm", "addmm", "matmul", "linear", "mkldnn")
FAKE_QUANT = ("fake_quant", "round", "clamp", "sigmoid", "floor")


def _labelled(fn, label):
    def wrapped(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapped


class _CountedStep(tune.FlopCounterMode):
    """The FLOP counter of each block's first step, labelled so the split can leave it out."""

    def __enter__(self):
        self._label = record_function("counted_step").__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._label.__exit__(*exc)


def instrument() -> None:
    """Label the loop's phases by wrapping the functions each phase calls (the tool's own
    patch: the library carries no profiling code). Only calls inside tune_block count."""
    runner.BlockRunner.entry_env = _labelled(runner.BlockRunner.entry_env, "phase:batch")
    Mirror.execute = _labelled(Mirror.execute, "phase:forward")
    runner.BlockRunner.loss = _labelled(runner.BlockRunner.loss, "phase:loss")
    adaround.AdaRoundQuantize.regularizer = _labelled(adaround.AdaRoundQuantize.regularizer, "phase:regularizer")
    torch.Tensor.backward = _labelled(torch.Tensor.backward, "phase:backward")
    torch.optim.Adam.step = _labelled(torch.optim.Adam.step, "phase:optimizer")
    fake_quant.FakeQuantize.forward = _labelled(fake_quant.FakeQuantize.forward, "part:fake_quant")
    adaround.AdaRoundQuantize.forward = _labelled(adaround.AdaRoundQuantize.forward, "part:fake_quant")
    fake_quant.keep_mask = _labelled(fake_quant.keep_mask, "part:qdrop_mask")
    runner.keep_mask = fake_quant.keep_mask
    tune.FlopCounterMode = _CountedStep
    tune.tune_block = _labelled(tune.tune_block, "tune_block")
    sys.modules["onnxqlimit.recon.reconstruct"].tune_block = tune.tune_block


def split(prof) -> dict[str, float]:
    """Seconds per phase and per op class, inside tune_block and outside each block's first step."""
    out: dict[str, float] = defaultdict(float)

    def walk(event, phase, part):
        name = event.name
        if name.startswith("phase:"):
            phase = name[6:]
            out[f"{phase}"] += event.cpu_time_total / 1e6
        elif name.startswith("part:"):
            part = name[5:]
            if phase:
                out[f"{phase}.{part}"] += event.cpu_time_total / 1e6
        elif name.startswith("aten::") or name.startswith("mkldnn"):
            key = "matmul" if any(m in name for m in MATMUL) else part or "other_ops"
            out[f"{phase or 'loop'}.aten.{key}"] += event.self_cpu_time_total / 1e6
            out[f"op:{phase or 'loop'}:{name}"] += event.self_cpu_time_total / 1e6
        for child in event.cpu_children:
            if child.name != "counted_step":
                walk(child, phase, part)

    for event in prof.events():
        if event.name == "tune_block" and event.cpu_parent is None:
            out["tune"] += event.cpu_time_total / 1e6
            for child in event.cpu_children:
                if child.name == "counted_step":
                    out["counted"] += child.cpu_time_total / 1e6
                else:
                    walk(child, None, None)
    return out


def report(name: str, parts: dict[str, float], recon: dict, top_ops: int = 0) -> str:
    total = parts["tune"] - parts["counted"]
    lines = [f"## {name}: {total:.1f} s in tune_block under the profiler; unprofiled {recon['gflops']:.1f} GFLOP/s, "
             f"{sum(b['iters'] for b in recon['blocks'])} iterations in {recon['train_seconds']:.1f} s",
             "| phase | % of tuning | of which (% of tuning) |", "|---|---|---|"]
    for phase in PHASES:
        sub = {k.split(".", 1)[1]: v for k, v in parts.items() if k.startswith(phase + ".")}
        details = ", ".join(f"{k.replace('aten.', 'ops: ')} {100 * v / total:.1f}" for k, v in sorted(sub.items(), key=lambda kv: -kv[1]) if v / total >= 0.005)
        lines.append(f"| {phase} | {100 * parts.get(phase, 0) / total:.1f} | {details} |")
    rest = total - sum(parts.get(p, 0) for p in PHASES)
    lines.append(f"| loop (Python, sampling, FLOP-counted steps) | {100 * rest / total:.1f} | |")
    aten = sum(v for k, v in parts.items() if ".aten." in k)
    top = sorted(((v, k[3:]) for k, v in parts.items() if k.startswith("op:")), reverse=True)[:top_ops]
    if top:
        lines.append("\n| phase:operator | % of tuning |\n|---|---|")
        lines += [f"| {k} | {100 * v / total:.1f} |" for v, k in top]
    lines.append(f"\noperators' own time: {100 * aten / total:.1f}% of tuning (the rest is Python, dispatch and the profiler)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bits", default="W4A4", type=bits_option, metavar="WxAy")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--calib-size", type=int)
    ap.add_argument("--top", type=int, default=0, help="also list the N operators with the most own time")
    args = ap.parse_args(argv)
    wbits, abits = widths(args.bits)
    instrument()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = load(name, Path(tmp))
            calib = model.calibration(args.calib_size or (256 if name.startswith("zoo") else None))
            recon = ReconConfig.preset("fast", iters=args.iters, calib_size=len(next(iter(calib.values()))),
                                       early_stop=False)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                result = quantize(model.path, Path(tmp) / f"{name}_q.onnx", calib, QuantConfig.of(wbits=wbits, abits=abits),
                                  RunOptions(recon=recon, progress=False))
            print(report(name, split(prof), result.report.reconstruction, args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
