"""Exact MILP vs the genetic algorithm on the same sensitivity tables and budgets.

    python tools/compare_solvers.py --models zoo_resnet zoo_mobilenetv2 cls rec

For each model, sweeps a size budget and a BitOps budget over --points values from a
quarter of the all-widest plan's cost to all of it (unreachable ones skipped), solves
each with both solvers (GA: default settings, seeds 0..--seeds-1) and prints the
predicted loss increase each plan reaches and the search time. Both solve the same problem (one measured configuration per block),
so the lower predicted loss is the better plan. Sensitivities are cached in --work-dir.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxqlimit.calibrate import attach_quantizers, calibrate  # noqa: E402
from onnxqlimit.data import batches  # noqa: E402
from onnxqlimit.errors import QLimitError  # noqa: E402
from onnxqlimit.load import LoadConfig, load_model  # noqa: E402
from onnxqlimit.mirror import Mirror  # noqa: E402
from onnxqlimit.mixed.search import MixedConfig, Targets, search  # noqa: E402
from onnxqlimit.mixed.sensitivity import SensitivityConfig  # noqa: E402
from onnxqlimit.mixed.solvers import GAConfig  # noqa: E402
from onnxqlimit.quant.policy import QuantConfig, place  # noqa: E402
from onnxqlimit.recon import ReconConfig  # noqa: E402
from onnxqlimit.state import QuantState  # noqa: E402
from tools import tasks  # noqa: E402


def compare(name: str, points: int, seeds: int, work_dir: Path) -> list[dict]:
    loaded = load_model(str(tasks.model_path(name)), LoadConfig(min_opset=25))
    mirror = Mirror(loaded)
    feeds = tasks.calibration(name, 256)
    config = QuantConfig()
    qpoints = place(loaded, config)
    quantizers = attach_quantizers(mirror, qpoints)
    state = QuantState(qpoints, quantizers, calibrate(mirror, qpoints, quantizers, list(batches(feeds, 8)), config,
                                                      progress=False))
    settings = {k: v for k, v in vars(config).items() if k not in ("wbits", "abits")}

    def run(targets: Targets, solver: str, seed: int = 0):
        mixed = MixedConfig(targets, SensitivityConfig(), solver, GAConfig(seed=seed), work_dir)
        try:
            return search(mirror, loaded, state, feeds, mixed, ReconConfig().block_config, settings, progress=False)
        except QLimitError:
            return None

    widest = run(Targets(avg_wbits=8.0), "milp").costs  # every width at its widest
    rows = []
    for budget in ("size_bytes", "bitops"):
        for limit in np.linspace(0.25 * widest[budget], widest[budget], points):  # unreachable ones are skipped
            exact = run(Targets(**{budget: float(limit)}), "milp")
            if exact is None:
                continue
            genetic = [run(Targets(**{budget: float(limit)}), "ga", s) for s in range(seeds)]
            found = [g for g in genetic if g is not None]
            rows.append({"model": name, "budget": budget, "limit": float(limit), "milp_loss": exact.predicted_loss,
                         "milp_s": exact.seconds, "ga_loss": float(np.mean([g.predicted_loss for g in found]))
                         if found else float("nan"), "ga_best": min((g.predicted_loss for g in found), default=np.nan),
                         "ga_s": float(np.mean([g.seconds for g in found])) if found else float("nan"),
                         "ga_feasible": len(found)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["zoo_resnet", "zoo_mobilenetv2"])
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--work-dir", default="/tmp/onnxqlimit-compare-solvers")
    args = ap.parse_args(argv)
    print("| model | budget | plans | GA / MILP loss (mean over seeds) | GA best / MILP | GA worse than MILP "
          "| GA found a plan | MILP s | GA s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        rows = compare(name, args.points, args.seeds, Path(args.work_dir))
        for budget in ("size_bytes", "bitops"):
            sel = [r for r in rows if r["budget"] == budget]
            if not sel:
                continue
            ratio = [r["ga_loss"] / r["milp_loss"] for r in sel if r["milp_loss"] > 0]
            best = [r["ga_best"] / r["milp_loss"] for r in sel if r["milp_loss"] > 0]
            worse = sum(r["ga_best"] > r["milp_loss"] * (1 + 1e-6) for r in sel)
            print(f"| {name} | {budget} | {len(sel)} | {np.nanmean(ratio):.3f} | {np.nanmean(best):.3f} | "
                  f"{worse}/{len(sel)} | {sum(r['ga_feasible'] for r in sel)}/{len(sel) * args.seeds} | "
                  f"{np.mean([r['milp_s'] for r in sel]):.2f} | {np.nanmean([r['ga_s'] for r in sel]):.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
