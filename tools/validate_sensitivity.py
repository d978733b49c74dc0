"""How well the Fisher sensitivities predict the real loss increase (rank correlation).

    python -m tools.validate_sensitivity --models zoo_resnet rec
    python -m tools.validate_sensitivity --models zoo_mobilenetv2 --samples 64 --joint 40

For every searchable quantizer and every width below its widest: the predicted increase
of the label-free task loss (the diagonal of the sensitivity table: the block's output
error weighted by the Fisher diagonal, that quantizer alone at that width) against the
measured increase (the whole model run with only that quantizer quantized, task loss
against the float model on the same samples). Spearman's rho over all pairs, and per kind.
Then, for --joint block configurations (several quantizers lowered at once), measured
against the jointly measured prediction and against the sum of the diagonal terms: what
measuring combinations buys over assuming independence inside a block. --json PATH keeps
the table as a docs/results record.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from scipy.stats import spearmanr

from onnxqlimit import (
    MixedConfig,
    QuantConfig,
    ReconConfig,
    RunOptions,
    SensitivityConfig,
    Targets,
    place_and_calibrate,
    prepare,
)
from onnxqlimit.data import batches
from onnxqlimit.mirror import Mirror
from onnxqlimit.mixed.costs import CostModel
from onnxqlimit.mixed.sensitivity import measure
from onnxqlimit.quant.fake_quant import quantizers_disabled
from onnxqlimit.recon.fisher import task_loss
from onnxqlimit.state import QuantState
from tools.common import Table, load


def measured_increase(mirror: Mirror, state: QuantState, feeds, reference, bits: dict[str, int], chunk: int) -> float:
    """Task loss of the whole model with only the quantizers in `bits` on, at those widths."""
    points = {p.tensor: p for p in state.points}
    total = 0.0
    with quantizers_disabled(state.quantizers):
        for tensor, width in bits.items():
            quantizer = state.quantizers[tensor]
            quantizer.spec = replace(points[tensor].spec, bits=width)
            quantizer.set_qparams(*state.calibration.qparams(points[tensor], width))
            quantizer.enabled = True
        try:
            with torch.no_grad():
                for i, batch in enumerate(batches(feeds, chunk)):
                    out = mirror.run(batch)
                    total += sum(float(task_loss(reference[i][k], out[k])) for k in out if out[k].is_floating_point())
        finally:
            for tensor in bits:  # back to the point's own width
                point = points[tensor]
                state.quantizers[tensor].spec = point.spec
                state.quantizers[tensor].set_qparams(*state.calibration.qparams(point, point.spec.bits))
    return total / len(next(iter(feeds.values())))


def validate(name: str, samples: int, joint: int, chunk: int) -> dict:
    model = load(name)
    # A target, so that prepare() loads the model at the opset the search's widths need, as a search run does.
    options = RunOptions(recon=ReconConfig(calib_size=samples, batch_size=chunk),
                         mixed=MixedConfig(Targets(avg_wbits=8.0)), progress=False)
    ctx = prepare(model.path, model.calibration(samples), QuantConfig(), options)
    state = place_and_calibrate(ctx)
    mirror, feeds, points, quantizers = ctx.mirror, ctx.feeds, state.points, state.quantizers
    costs = CostModel(ctx.model, mirror, points, quantizers, feeds)
    ops_hint: dict[str, float] = {}
    for node in costs.nodes:
        for t in (node.weight, node.act):
            if t:
                ops_hint[t] = ops_hint.get(t, 0.0) + node.macs
    started = time.perf_counter()
    table = measure(mirror, ctx.model, state, feeds, SensitivityConfig(samples=samples, chunk=chunk),
                    ctx.recon.block_config, (dict(costs.numel), ops_hint), seed=0, progress=False)
    seconds = time.perf_counter() - started
    with quantizers_disabled(quantizers), torch.no_grad():
        reference = [mirror.run(b) for b in batches(feeds, chunk)]
    kinds = {p.tensor: p.kind for p in points}
    rows = []
    for tensor, by_width in table.diagonal.items():
        for width, predicted in by_width.items():
            if width < max(by_width):
                rows.append((kinds[tensor], predicted, measured_increase(mirror, state, feeds, reference,
                                                                         {tensor: width}, chunk)))
    result = {"model": name, "pairs": len(rows), "sensitivity_s": seconds}
    pred, meas = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    result["rho_all"] = spearmanr(pred, meas).statistic
    for kind in ("weight", "activation"):
        mask = np.array([r[0] == kind for r in rows])
        result[f"rho_{kind}"] = spearmanr(pred[mask], meas[mask]).statistic if mask.sum() > 2 else float("nan")
        result[f"pairs_{kind}"] = int(mask.sum())
    rng = np.random.default_rng(0)
    multi = [(b, o) for b, opts in enumerate(table.blocks) for o in opts
             if sum(w < max(table.choices[t]) for t, w in o.bits.items()) >= 2]
    picked = [multi[i] for i in rng.choice(len(multi), min(joint, len(multi)), replace=False)] if multi else []
    if picked:
        jp, sp, jm = [], [], []
        for _, option in picked:
            jp.append(option.loss)
            sp.append(sum(table.diagonal.get(t, {}).get(w, 0.0) for t, w in option.bits.items()))
            jm.append(measured_increase(mirror, state, feeds, reference, option.bits, chunk))
        result.update(joint_configs=len(picked), rho_joint=spearmanr(jp, jm).statistic,
                      rho_sum_of_diagonal=spearmanr(sp, jm).statistic,
                      joint_rel_error=float(np.median(np.abs(np.array(jp) - jm) / np.maximum(jm, 1e-12))),
                      sum_rel_error=float(np.median(np.abs(np.array(sp) - jm) / np.maximum(jm, 1e-12))))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["zoo_resnet", "rec"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--joint", type=int, default=30, help="multi-quantizer block configurations to check")
    ap.add_argument("--json", help="write the table as a docs/results record here")
    args = ap.parse_args(argv)
    table = Table(["model", "pairs (w / a)", "Spearman rho all", "weights", "activations", "joint configs",
                   "rho joint", "rho sum of diagonal", "median rel. error joint / sum", "sensitivity s"], args.json,
                  "Mixed precision: predicted against measured loss increase",
                  f"{args.samples} calibration samples in chunks of {args.chunk}; up to {args.joint} joint block "
                  "configurations per model.")
    table.header()
    nan = float("nan")
    for name in args.models:
        r = validate(name, args.samples, args.joint, args.chunk)
        table.add(name, f"{r['pairs']} ({r['pairs_weight']} / {r['pairs_activation']})", f"{r['rho_all']:.3f}",
                  f"{r['rho_weight']:.3f}", f"{r['rho_activation']:.3f}", r.get("joint_configs", 0),
                  f"{r.get('rho_joint', nan):.3f}", f"{r.get('rho_sum_of_diagonal', nan):.3f}",
                  f"{r.get('joint_rel_error', nan):.2f} / {r.get('sum_rel_error', nan):.2f}", f"{r['sensitivity_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
