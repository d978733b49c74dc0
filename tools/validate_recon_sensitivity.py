"""Do the sensitivities predict the loss *after* reconstruction? (rank correlation)

    python -m tools.validate_recon_sensitivity --models zoo_resnet
    python -m tools.validate_recon_sensitivity --models rec --pairs 24 --json docs/results/DATE_recon_sensitivity.json

For each block and each uniform configuration of it (every weight at one width, every
activation at one width, below the widest), three predictions of the task-loss increase
and one measurement:

- block rtn: the block's Fisher-weighted output error with round-to-nearest quantizers,
  from float inputs (what the search's table held before 2026-12-05);
- model rtn: the whole model's task loss, run from the block on with only the block
  quantized, round to nearest, on the sensitivity samples (the table of an rtn run or of
  --sens-iters 0, for these configurations);
- model probe: the same after a short reconstruction of the block at that configuration;
- shared probe: what the table holds (--sens-iters N, the default): one short
  reconstruction per weight width, at the widest activations, whose loss reduction is
  taken off the narrower activations too (BlockLoss.model_losses);
- measured: the block reconstructed with the full schedule of the run (the fast preset,
  all calibration samples), every other block float, and the whole model's task loss
  against the float model on held-out samples - what a plan pays for that block after
  reconstruction.

Spearman's rho of each prediction against the measurement, and the time each took.
--pairs N measures a random N of the (block, configuration) pairs (large models).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
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
)
from onnxqlimit.data import batches
from onnxqlimit.mixed.block_loss import BlockLoss, float_pass, probe_schedule
from onnxqlimit.pipeline import place_and_calibrate, prepare
from onnxqlimit.quant.fake_quant import quantizers_disabled
from onnxqlimit.recon.blocks import find_blocks
from onnxqlimit.recon.fisher import task_loss
from onnxqlimit.recon.runner import quantizer_owners
from tools.common import Table, load


def _model_loss(mirror, feeds, reference, chunk: int) -> float:
    total = 0.0
    with torch.no_grad():
        for i, batch in enumerate(batches(feeds, chunk)):
            out = mirror.run(batch)
            total += sum(float(task_loss(reference[i][k], out[k])) for k in out if out[k].is_floating_point())
    return total / len(next(iter(feeds.values())))


def _prober(ctx, state, blocks, on_entry, samples: int, tune: ReconConfig | None) -> BlockLoss:
    found = float_pass(ctx.mirror, state, ctx.feeds, blocks, SensitivityConfig(samples=samples), 0, tune)
    return BlockLoss(ctx.mirror, state, found, on_entry, tune, 0, ctx.feeds)


def validate(name: str, calib: int, held: int, sens_samples: int, probe_iters: int, pairs: int, wbits, abits,
             chunk: int, probe_lr: float | None = None) -> dict:
    model = load(name, tempfile.mkdtemp(prefix='validate-'))  # where generated models are exported
    source = model.calibration(calib + held)
    calib = min(calib, len(next(iter(source.values()))) - held)  # the zoo ships 256 samples in all
    feeds, held_out = {k: v[:calib] for k, v in source.items()}, {k: v[calib:] for k, v in source.items()}
    recon = ReconConfig(calib_size=calib)
    options = RunOptions(recon=recon, mixed=MixedConfig(Targets(avg_wbits=8.0)), progress=False)
    ctx = prepare(model.path, feeds, QuantConfig(), options)
    state = place_and_calibrate(ctx)
    blocks = find_blocks(ctx.model, recon.block_config)
    owners, on_entry = quantizer_owners(ctx.mirror, blocks, state.points)
    with quantizers_disabled(state.quantizers), torch.no_grad():
        reference = [ctx.mirror.run(b) for b in batches(held_out, chunk)]
    rtn = _prober(ctx, state, blocks, on_entry, sens_samples, None)
    schedule = probe_schedule(recon, SensitivityConfig(tune_iters=probe_iters))
    probe = _prober(ctx, state, blocks, on_entry, sens_samples,
                    replace(schedule, lr_round=probe_lr) if probe_lr else schedule)
    full = _prober(ctx, state, blocks, on_entry, calib, recon)
    cases = []
    for block in blocks:
        owned = [p for p in owners.get(block.index, []) if not p.fixed]
        if not owned:
            continue
        for w in wbits:
            for a in abits:
                bits = {p.tensor: w if p.kind == "weight" else a for p in owned}
                if w < max(wbits) or a < max(abits):
                    cases.append((block, owned, bits, f"W{w}A{a}"))
    if pairs and pairs < len(cases):
        picks = np.random.default_rng(0).choice(len(cases), pairs, replace=False)
        cases = [cases[i] for i in sorted(picks)]
    rows, seconds = [], {"rtn": 0.0, "model": 0.0, "probe": 0.0, "shared": 0.0, "full": 0.0}
    shared: dict[tuple[int, str], float] = {}
    for block, owned, bits, label in cases:
        if (block.index, label) not in shared:  # the block's whole grid, as the table measures it
            started = time.perf_counter()
            grid = [(f"W{w}A{a}", {p.tensor: w if p.kind == "weight" else a for p in owned})
                    for w in wbits for a in abits]
            losses = probe.model_losses(block, owned, [b for _, b in grid])
            shared.update({(block.index, g): loss for (g, _), loss in zip(grid, losses)})
            seconds["shared"] += time.perf_counter() - started
        started = time.perf_counter()
        predicted_rtn = rtn.loss(block, owned, bits)
        seconds["rtn"] += time.perf_counter() - started
        started = time.perf_counter()
        predicted_model = rtn.model_loss(block, owned, bits)
        seconds["model"] += time.perf_counter() - started
        started = time.perf_counter()
        predicted_probe = probe.model_loss(block, owned, bits)
        seconds["probe"] += time.perf_counter() - started
        started = time.perf_counter()
        full._configure(owned, bits)
        before = _model_loss(ctx.mirror, held_out, reference, chunk)
        with full.tuned(block, owned, bits):
            after = _model_loss(ctx.mirror, held_out, reference, chunk)
        seconds["full"] += time.perf_counter() - started
        rows.append((block.index, label, predicted_rtn, predicted_model, predicted_probe, shared[block.index, label],
                     min(before, after)))
        print(f"  block {block.index} {label}: block rtn {predicted_rtn:.4g} model rtn {predicted_model:.4g} "
              f"model probe {predicted_probe:.4g} shared {shared[block.index, label]:.4g} measured {min(before, after):.4g} (rtn measured {before:.4g})",
              flush=True)
    for prober in (rtn, probe, full):
        prober.restore()
    data = np.array([r[2:] for r in rows])
    return {"model": name, "pairs": len(rows), "seconds": seconds, "rows": rows,
            **{f"rho_{k}": spearmanr(data[:, i], data[:, -1]).statistic
               for i, k in enumerate(("rtn", "model", "probe", "shared"))}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["zoo_resnet"])
    ap.add_argument("--calib", type=int, default=256, help="calibration samples (the full reconstruction's)")
    ap.add_argument("--held", type=int, default=128, help="held-out samples the measured loss is taken on")
    ap.add_argument("--sens-samples", type=int, default=32)
    ap.add_argument("--probe-iters", type=int, default=SensitivityConfig.tune_iters)
    ap.add_argument("--pairs", type=int, default=0, help="measure this many random (block, configuration) pairs")
    ap.add_argument("--wbits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--abits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--probe-lr", type=float, help="rounding learning rate of the probes (default: the run's)")
    ap.add_argument("--json", help="write the table as a docs/results record here")
    args = ap.parse_args(argv)
    table = Table(["model", "pairs", "rho block rtn (before)", "rho model rtn (--sens-iters 0)",
                   f"rho model probe ({args.probe_iters} it)", "rho shared probe (the table)", "block rtn s",
                   "model rtn s", "probe s", "shared s", "full recon s"], args.json, "Mixed precision: predicted against post-reconstruction loss",
                  f"Uniform block configurations (weights {args.wbits}, activations {args.abits}); measured: the "
                  f"block reconstructed (fast preset, {args.calib} samples), task loss on {args.held} held-out "
                  f"samples; predictions on {args.sens_samples} samples.")
    table.header()
    for name in args.models:
        r = validate(name, args.calib, args.held, args.sens_samples, args.probe_iters, args.pairs, args.wbits,
                     args.abits, args.chunk, args.probe_lr)
        s = r["seconds"]
        table.add(name, r["pairs"], f"{r['rho_rtn']:.3f}", f"{r['rho_model']:.3f}", f"{r['rho_probe']:.3f}",
                  f"{r['rho_shared']:.3f}", f"{s['rtn']:.1f}", f"{s['model']:.1f}", f"{s['probe']:.0f}",
                  f"{s['shared']:.0f}", f"{s['full']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
