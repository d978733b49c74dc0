"""Stage 6, the quantization report: per quantized node its bits, scales and output SQNR vs float,
plus model sizes and parity. Written as JSON by `--report`."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .context import Context
from .evaluate import OutputQuality, format_quality
from .mirror import Mirror
from .mixed.search import SearchResult, format_plan_rows, result_json
from .quant.fake_quant import FakeQuantize, quantizers_disabled
from .recon import ReconResult
from .runtime import RuntimeCheck, format_runtime
from .state import QuantState
from .weights import model_bytes

SQNR_SAMPLES = 4  # samples used for per-node SQNR (all node outputs are held at once)


def _scale_stats(q: FakeQuantize) -> dict:
    s = q.scale.detach().float().cpu()
    return {"min": float(s.min()), "max": float(s.max()), "mean": float(s.mean())}


def node_sqnr(mirror: Mirror, quantizers: Mapping[str, FakeQuantize], feeds: Mapping[str, np.ndarray],
              tensors: list[str]) -> dict[str, float]:
    """SQNR (dB) of each named tensor in the quantized mirror against the float mirror."""
    sample = {k: v[:SQNR_SAMPLES] for k, v in feeds.items()}
    with torch.no_grad():
        quant = mirror.run(sample, tensors)
        with quantizers_disabled(quantizers):
            ref = mirror.run(sample, tensors)
    out = {}
    for name in tensors:
        signal = float(ref[name].double().pow(2).sum())
        noise = float((quant[name].double() - ref[name].double()).pow(2).sum())
        out[name] = 10 * np.log10(signal / noise) if noise > 0 else float("inf")
    return out


@dataclass
class Report:
    """What a run did, for `--report` (JSON), `--plot` and the lines the CLI prints."""

    output: str
    opset: int
    seconds: float
    threads: int | None  # torch CPU threads; None on a GPU
    config: dict  # QuantConfig
    options: dict  # RunOptions, with the calibration samples used
    size_bytes: dict  # float, quantized, ratio
    quantizers: dict  # weights, activations
    costs: dict  # avg_wbits, container_wbits, size_bytes, bitops (+ latency) of the file
    plan: dict  # node -> wbits / abits
    parity: list[dict]  # per output: the file against the tuned mirror
    integer_parity: dict
    quality: dict | None  # float vs the file (evaluate.quality); None when it could not be measured
    nodes: list[dict]  # per quantized node: widths, scales, output SQNR vs float
    reconstruction: dict | None  # ReconResult; None for rtn
    mixed_precision: dict | None  # SearchResult; None without a search
    metric: float | None = None  # --target-metric: the file's score
    runtime: dict | None = None  # RuntimeCheck: integer kernels and latency in onnxruntime CPU
    smoothed: dict | None = None  # SmoothQuant alpha per smoothed MatMul/Gemm input (smooth.py)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=_jsonable)

    def write(self, path) -> None:
        Path(path).write_text(self.to_json())


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def build_report(ctx: Context, state: QuantState, exported, output_path: Path, searched: SearchResult | None,
                 tuning: ReconResult | None, seconds: float) -> Report:
    points, quantizers, mirror = state.points, state.quantizers, ctx.mirror
    by_node: dict[str, dict] = {}
    for point in points:
        for consumer in point.consumers:
            entry = by_node.setdefault(consumer, {})
            key = "weight" if point.kind == "weight" else f"input {point.tensor}"
            entry[key] = {"tensor": point.tensor, "bits": point.spec.bits, **_scale_stats(quantizers[point.tensor])}
    # (the first named output: a recurrent node may leave Y unnamed and return only its state)
    node_outputs = {n.name: next(o for o in n.outputs if o) for n in mirror.nodes if n.name in by_node}
    sqnr = node_sqnr(mirror, quantizers, ctx.feeds, sorted(set(node_outputs.values())))
    op_types = {n.name: n.op_type for n in mirror.nodes}
    nodes = [{"node": name, "op": op_types.get(name), **entry,
              "output_sqnr_db": round(sqnr[node_outputs[name]], 2) if name in node_outputs else None}
             for name, entry in by_node.items()]
    float_bytes, quantized_bytes = model_bytes(ctx.original), model_bytes(exported.model)
    return Report(
        output=str(output_path),
        opset=next(o.version for o in exported.model.opset_import if o.domain in ("", "ai.onnx")),
        seconds=round(seconds, 2),
        threads=torch.get_num_threads() if ctx.device.type == "cpu" else None,
        config=asdict(ctx.config),
        options={**asdict(ctx.options), "calib_size": ctx.samples},
        size_bytes={"float": float_bytes, "quantized": quantized_bytes,
                    "ratio": round(quantized_bytes / max(1, float_bytes), 4)},
        quantizers={"weights": sum(p.kind == "weight" for p in points),
                    "activations": sum(p.kind == "activation" for p in points)},
        costs=exported.costs,
        plan=state.plan.to_nodes(points),
        parity=[{"output": r.name, "max_diff_over_range": r.max_abs_diff / (r.ref_range or 1.0),
                 "mean_diff_over_range": r.mean_abs_diff / (r.ref_range or 1.0), "within_one_step": r.within_step}
                for r in exported.parity],
        integer_parity=asdict(exported.integer_parity),
        quality=exported.quality,
        nodes=nodes,
        reconstruction=asdict(tuning) if tuning is not None else None,
        mixed_precision=result_json(searched, points) if searched is not None else None,
        metric=exported.metric,
        runtime=asdict(exported.runtime) if exported.runtime is not None else None,
        smoothed=ctx.smoothed,
    )


def format_block_table(blocks: list[dict]) -> str:
    """One line per reconstructed block: the loss it was tuned on before and after (without
    the rounding regulariser, which the progress bar also leaves out) and its time."""
    lines = [f"{'block':>5} {'layers':>6} {'iters':>6} {'loss before':>12} {'loss after':>11} {'change':>8} {'time':>8}  nodes"]
    for b in blocks:
        change = b["loss_after"] / b["loss_before"] - 1 if b["loss_before"] > 0 else 0.0
        note = " (round to nearest kept)" if b["kept_rtn"] else " (stopped on a plateau)" if b["stopped_early"] else ""
        note += " (resumed from a checkpoint)" if b.get("resumed") else ""
        lines.append(f"{b['index'] + 1:>5} {b['layers']:>6} {b['iters']:>6} {b['loss_before']:>12.4g} "
                     f"{b['loss_after']:>11.4g} {change:>+8.1%} {b['seconds']:>7.1f}s  {b['nodes']}{note}")
    return "\n".join(lines)


def format_report(r: Report) -> str:
    """The lines `onnxqlimit quantize` prints at the end of a run."""
    lines = []
    options, mixed, c = r.options, r.mixed_precision, r.costs
    if mixed:
        lines.append(format_plan_rows(r.plan, {n["node"]: n["op"] for n in r.nodes}))
        cached = " (sensitivities from the cache)" if mixed["sensitivity_cached"] else \
            f" (sensitivities measured in {mixed['sensitivity_seconds']:.1f} s)"
        lines.append(f"mixed precision: {mixed['solver']} search in {mixed['seconds']:.1f} s{cached}, "
                     f"predicted loss increase {mixed['predicted_loss']:.4g} "
                     + (f"(after {mixed['scored_after']}-iteration reconstructions)" if mixed["scored_after"]
                        else "(round to nearest)")
                     + (f", measured {mixed['measured_loss']:.4g}" if mixed.get("measured_loss") is not None else ""))
    widths = r.config["widths"]
    bits = "mixed" if mixed or options["bits_plan"] else f"W{widths['wbits']}A{widths['abits']}"
    lines.append(f"wrote {r.output}: {bits} ({options['recon']['method']}), opset {r.opset}, "
                 f"{r.quantizers['weights']} weight and {r.quantizers['activations']} activation quantizers")
    lines.append(f"weights: {c['avg_wbits']:.3f} bits per parameter ({c['container_wbits']:.3f} as stored), "
                 f"weight storage {c['size_bytes'] / 1e3:.1f} KB, {c['bitops'] / 1e9:.4g} GBitOps per sample"
                 + (f", latency {c['latency_ms']:.3f} ms estimated / {c['measured_latency_ms']:.3f} ms measured"
                    if "latency_ms" in c else ""))
    if r.smoothed:
        lines.append(f"smoothing (SmoothQuant, --smooth {r.config['smooth']}): {len(r.smoothed)} MatMul/Gemm inputs, "
                     f"alpha {', '.join(f'{a:g}' for a in sorted(set(r.smoothed.values())))}")
    if r.metric is not None:
        lines.append(f"metric on the exported file: {r.metric:.4f} of float "
                     f"(target {options['mixed']['targets']['metric']})")
    if options["save_plan"]:
        lines.append(f"plan: {options['save_plan']}")
    tuning = r.reconstruction
    if tuning:
        lines.append(format_block_table(tuning["blocks"]))
        lines.append(f"reconstruction: {len(tuning['blocks'])} blocks, {tuning['samples']} samples, "
                     f"{tuning['seconds']:.1f} s ({tuning['gflops']:.1f} GFLOP/s while tuning), "
                     f"cache peak {tuning['peak_cache_mb']:.0f} MB{' (partly on disk)' if tuning['cache_on_disk'] else ''}, "
                     f"process peak {tuning['peak_rss_mb']:.0f} MB")
    sizes = r.size_bytes
    lines.append(f"size: {sizes['float'] / 1e6:.2f} MB -> {sizes['quantized'] / 1e6:.2f} MB ({sizes['ratio']:.1%}); "
                 f"time {r.seconds:.1f} s")
    q = r.quality
    if q is not None:
        lines.append(f"quality, {q['reference']} vs this file in onnxruntime on {q['samples']} "
                     f"{'held-back samples' if q['held_back'] else 'calibration samples (none held back)'}: "
                     + format_quality([OutputQuality(**o) for o in q["outputs"]]))
    if r.runtime is not None:
        lines.append(format_runtime(RuntimeCheck(**r.runtime)))
    lines.append("parity, this file vs the tuned mirror (what was optimised is what ships; not a quality measure): "
                 + "; ".join(f"{p['output']} {p['within_one_step']:.2%} of values within one quantization step"
                             for p in r.parity))
    return "\n".join(lines)
