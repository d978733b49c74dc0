"""The quantization report: per quantized node its bits, scales and output SQNR vs float,
plus model sizes and parity. Written as JSON by `--report`."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
import torch

from .calibrate import set_enabled
from .weights import model_bytes
from .mirror import Mirror
from .parity import OutputParity
from .quant.fake_quant import FakeQuantize
from .quant.policy import QuantConfig
from .state import QuantState

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
        set_enabled(quantizers, False)
        try:
            ref = mirror.run(sample, tensors)
        finally:
            set_enabled(quantizers, True)
    out = {}
    for name in tensors:
        signal = float(ref[name].double().pow(2).sum())
        noise = float((quant[name].double() - ref[name].double()).pow(2).sum())
        out[name] = 10 * np.log10(signal / noise) if noise > 0 else float("inf")
    return out


def build_report(original: onnx.ModelProto, exported: onnx.ModelProto, output_path, mirror: Mirror,
                 state: QuantState, feeds, parity: list[OutputParity], config: QuantConfig, options: dict,
                 seconds: float) -> dict:
    points, quantizers = state.points, state.quantizers
    by_node: dict[str, dict] = {}
    for point in points:
        for consumer in point.consumers:
            entry = by_node.setdefault(consumer, {})
            key = "weight" if point.kind == "weight" else f"input {point.tensor}"
            entry[key] = {"tensor": point.tensor, "bits": point.spec.bits, **_scale_stats(quantizers[point.tensor])}
    node_outputs = {n.name: n.outputs[0] for n in mirror.nodes if n.name in by_node}
    sqnr = node_sqnr(mirror, quantizers, feeds, sorted(set(node_outputs.values())))
    nodes = []
    op_types = {n.name: n.op_type for n in mirror.nodes}
    for name, entry in by_node.items():
        nodes.append({"node": name, "op": op_types.get(name), **entry,
                      "output_sqnr_db": round(sqnr[node_outputs[name]], 2) if name in node_outputs else None})
    return {
        "output": str(output_path),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "options": options,
        "size_bytes": {"float": model_bytes(original), "quantized": model_bytes(exported),
                       "ratio": round(model_bytes(exported) / max(1, model_bytes(original)), 4)},
        "opset": next(o.version for o in exported.opset_import if o.domain in ("", "ai.onnx")),
        "quantizers": {"weights": sum(p.kind == "weight" for p in points),
                       "activations": sum(p.kind == "activation" for p in points)},
        "parity": [{"output": r.name, "max_diff_over_range": r.max_abs_diff / (r.ref_range or 1.0),
                    "mean_diff_over_range": r.mean_abs_diff / (r.ref_range or 1.0), "within_one_step": r.within_step}
                   for r in parity],
        "nodes": nodes,
        "seconds": round(seconds, 2),
    }


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
