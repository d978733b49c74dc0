"""Exact MILP vs the genetic algorithm on the same sensitivity tables and budgets.

    python -m tools.compare_solvers --models zoo_resnet zoo_mobilenetv2 cls rec

For each model, sweeps a size budget and a BitOps budget over --points values from a
quarter of the all-widest plan's cost to all of it (unreachable ones skipped), and solves
each with both solvers for every run seed 0..--seeds-1 (GA: default settings). The run's
seed (RunOptions.seed) seeds both the sensitivity measurement and the GA, so each seed has
its own table, and MILP and GA solve that same table: the lower predicted loss increase is
the better plan. Printed: the GA's predicted loss over the MILP's and the search times.
Sensitivities are cached in --work-dir. --json PATH keeps the table as a docs/results record.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from onnxqlimit import MixedConfig, QuantConfig, ReconConfig, RunOptions, Targets, place_and_calibrate, prepare
from onnxqlimit.errors import QLimitError
from onnxqlimit.mixed.search import search
from tools.common import Table, load


def compare(name: str, points: int, seeds: int, work_dir: Path) -> list[dict]:
    model = load(name)
    # A target, so that prepare() loads the model at the opset the search's widths need, as a search run does.
    options = RunOptions(recon=ReconConfig(calib_size=256), mixed=MixedConfig(Targets(avg_wbits=8.0)),
                         work_dir=str(work_dir), progress=False)
    ctx = prepare(model.path, model.calibration(256), QuantConfig(), options)
    state = place_and_calibrate(ctx)

    def run(targets: Targets, solver: str, seed: int):
        run_ctx = replace(ctx, options=replace(options, mixed=MixedConfig(targets, solver=solver), seed=seed))
        try:
            return search(run_ctx, state)
        except QLimitError:
            return None

    widest = run(Targets(avg_wbits=8.0), "milp", 0).costs  # every width at its widest
    rows = []
    for budget in ("size_bytes", "bitops"):
        for limit in np.linspace(0.25 * widest[budget], widest[budget], points):  # unreachable ones are skipped
            for seed in range(seeds):
                exact = run(Targets(**{budget: float(limit)}), "milp", seed)
                if exact is None:
                    continue
                genetic = run(Targets(**{budget: float(limit)}), "ga", seed)
                rows.append({"model": name, "budget": budget, "limit": float(limit), "seed": seed,
                             "milp_loss": exact.predicted_loss, "milp_s": exact.seconds,
                             "ga_loss": genetic.predicted_loss if genetic else float("nan"),
                             "ga_s": genetic.seconds if genetic else float("nan")})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["zoo_resnet", "zoo_mobilenetv2"])
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--work-dir", default="/tmp/onnxqlimit-compare-solvers")
    ap.add_argument("--json", help="write the table as a docs/results record here")
    args = ap.parse_args(argv)
    table = Table(["model", "budget", "plans", "GA / MILP loss (mean over seeds)", "GA best / MILP",
                   "GA worse than MILP", "GA found a plan", "MILP s", "GA s"], args.json,
                  "Mixed precision: the exact MILP against the genetic algorithm",
                  f"{args.points} budgets from a quarter of the all-widest plan's cost to all of it, seeds "
                  f"0..{args.seeds - 1}; predicted loss increase of each solver's plan on the same sensitivity table.")
    table.header()
    for name in args.models:
        rows = compare(name, args.points, args.seeds, Path(args.work_dir))
        for budget in ("size_bytes", "bitops"):
            sel = [r for r in rows if r["budget"] == budget]
            if not sel:
                continue
            limits = sorted({r["limit"] for r in sel})
            ratio = [r["ga_loss"] / r["milp_loss"] for r in sel if r["milp_loss"] > 0]
            best = []  # per budget value: the best seed's GA plan against that seed's MILP plan
            for lim in limits:
                ratios = [r["ga_loss"] / r["milp_loss"] for r in sel
                          if r["limit"] == lim and r["milp_loss"] > 0 and np.isfinite(r["ga_loss"])]
                best.append(min(ratios) if ratios else float("nan"))
            worse = sum(b > 1 + 1e-6 for b in best)
            found = sum(np.isfinite(r["ga_loss"]) for r in sel)
            table.add(name, budget, len(limits), f"{np.nanmean(ratio):.3f}", f"{np.nanmean(best):.3f}",
                      f"{worse}/{len(limits)}", f"{found}/{len(sel)}", f"{np.mean([r['milp_s'] for r in sel]):.2f}",
                      f"{np.nanmean([r['ga_s'] for r in sel]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
