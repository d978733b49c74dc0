"""Mixed-precision Pareto benchmark: task metric vs weight storage and vs BitOps.

    python -m tools.bench_mixed                                   # everything (hours on 2 cores)
    python -m tools.bench_mixed --models zoo_resnet --uniform W4A8 W8A8 --method rtn
    python -m tools.bench_mixed --models bert --budgets bitops --solver ga --jsonl mixed.jsonl
    python -m tools.bench_mixed --models rec cls --plots docs/img --iters 500
    python -m tools.bench_mixed --models rec --uniform W4A6 --budgets bitops   # the rec target

Per model and uniform width (first/last layers at 8 bits, the quantizer's default): the
uniform model, then a mixed-precision search (the search's default choices: weights
2/3/4/8, activations 4/8) at that uniform model's measured weight storage and at its
BitOps, each quantized with the same method. Every file is scored with onnxruntime
(tools/common.py): the zoo top-1, PP-OCR rec character accuracy and cls accuracy (in %),
and for a random-weight BERT encoder the mean cosine similarity of its hidden states to
the float model's (float = 100). The float metric is measured in the same run. Costs are
those the quantizer reports for the exported file. Each model is first converted to the
opset the narrowest width needs (--opset), so uniform and mixed runs quantize one graph.
One work dir per model holds the sensitivity cache, so it is measured once. Rows print as
they finish; --jsonl keeps one record per cell (with the plan for mixed cells), --json
PATH the table as a docs/results record; --plots writes one PNG per model.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from onnxqlimit import MixedConfig, QuantConfig, ReconConfig, RunOptions, SensitivityConfig, Targets, quantize
from onnxqlimit.quant.widths import required_opset
from tools.common import TASK_MODELS, Table, at_opset, bits_option, load, widths

NAMES = ("zoo_resnet", "zoo_mobilenetv2", "rec", "cls", "bert")
WIDTHS = [f"W{w}A{a}" for a in (8, 4) for w in (2, 3, 4, 8)]  # the default grid
BUDGETS = {"size": "size_bytes", "bitops": "bitops"}
CHOICES = SensitivityConfig()  # the widths the searches choose from

Scorer = Callable[[Path], float]


# ------------------------------------------------------------------------------ models

def prepare(name: str, work: Path, calib_size: int | None) -> tuple[Path, dict, Scorer, float, str]:
    """(source model, calibration dict, file -> metric in %, float metric, metric label)."""
    model = load(name, work)

    def score(path: Path) -> float:
        return 100 * model.score(path)[model.metric]

    label = f"{model.metric} (%)" if name in TASK_MODELS else f"{model.metric} to float (%)"
    calib = model.calibration(calib_size or (64 if name == "bert" else 256))
    return model.path, calib, score, score(model.path), label


# ------------------------------------------------------------------------------- cells

def run_cell(src: Path, out: Path, calib: dict, score: Scorer, args, wbits: int = 8, abits: int = 8,
             targets: Targets | None = None, work_dir: Path | None = None) -> dict:
    mixed = MixedConfig(targets, CHOICES, solver=args.solver) if targets else MixedConfig()
    recon = ReconConfig.preset("fast", method=args.method, iters=args.iters, calib_size=len(next(iter(calib.values()))))
    options = RunOptions(recon=recon,
                         mixed=mixed, work_dir=str(work_dir) if targets and work_dir else None, progress=False)
    start = time.perf_counter()
    report = quantize(src, out, calib, QuantConfig() if targets else QuantConfig.of(wbits=wbits, abits=abits),
                      options).report
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    metric = score(out)
    cell = {"metric": metric, "costs": report.costs, "seconds": seconds, "eval_seconds": time.perf_counter() - start}
    if targets:
        cell["mixed_precision"] = {k: v for k, v in report.mixed_precision.items() if k != "plan"}
        cell["plan"] = report.plan
    return cell


COLUMNS = ["model", "config", "kind", "metric", "% of float", "weight KB", "avg wbits", "GBitOps", "seconds"]


def row(name: str, config: str, kind: str, cell: dict, float_metric: float) -> list:
    if "error" in cell:
        return [name, config, kind, f"n/a ({cell['error'][:70]})", "-", "-", "-", "-", f"{cell.get('seconds', 0):.0f}"]
    c = cell["costs"]
    return [name, config, kind, f"{cell['metric']:.2f}", f"{100 * cell['metric'] / float_metric:.1f}",
            f"{c['size_bytes'] / 1e3:.1f}", f"{c['avg_wbits']:.2f}", f"{c['bitops'] / 1e9:.3f}", f"{cell['seconds']:.0f}"]


def summary(name: str, cells: list[dict], float_metric: float) -> str:
    """Mixed minus uniform at the same budget, per budget kind."""
    uniform = {c["config"]: c for c in cells if c["kind"] == "uniform" and "metric" in c}
    parts = [f"{name}: float {float_metric:.2f}"]
    for kind in sorted({c["kind"] for c in cells} - {"uniform"}):
        mine = [c for c in cells if c["kind"] == kind]
        deltas = [c["metric"] - uniform[c["config"]]["metric"] for c in mine if "metric" in c and c["config"] in uniform]
        errors = sum("error" in c for c in mine)
        if deltas:
            parts.append(f"{kind} vs uniform {np.mean(deltas):+.2f} pts mean, min {min(deltas):+.2f}, "
                         f"better in {sum(d > 0 for d in deltas)}/{len(deltas)}" + (f", {errors} errors" if errors else ""))
        elif errors:
            parts.append(f"{kind}: {errors} errors")
    sens = [c["mixed_precision"] for c in cells if c.get("mixed_precision")]
    measured = [s["sensitivity_seconds"] for s in sens if not s["sensitivity_cached"]]
    if sens:
        parts.append(f"sensitivity {sum(measured):.0f} s (measured {len(measured)}x, cached {len(sens) - len(measured)}x), "
                     f"search {np.mean([s['seconds'] for s in sens]):.1f} s mean")
    return "; ".join(parts)


# -------------------------------------------------------------------------------- plots

def plot(name: str, cells: list[dict], float_metric: float, ylabel: str, method: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in cells if "metric" in c]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = (("size_bytes", 1e3, "weight storage (KB)", "mixed@size"), ("bitops", 1e9, "GBitOps per sample", "mixed@bitops"))
    for ax, (key, scale, xlabel, own) in zip(axes, panels):
        for abits, marker, colour in zip(sorted({c["abits"] for c in done}, reverse=True), "osDp*",
                                         ("tab:blue", "tab:orange", "tab:red", "tab:brown", "tab:olive")):
            uni = [c for c in done if c["kind"] == "uniform" and c["abits"] == abits]
            if uni:
                ax.scatter([c["costs"][key] / scale for c in uni], [c["metric"] for c in uni], marker=marker,
                           s=90, color=colour, alpha=0.8, zorder=2, label=f"uniform A{abits}")
            for c in uni:
                ax.annotate(c["config"], (c["costs"][key] / scale, c["metric"]), textcoords="offset points",
                            xytext=(5, -10), fontsize=8)
        for kind, style in (("mixed@size", dict(color="tab:green", marker="^")),
                            ("mixed@bitops", dict(color="tab:purple", marker="v"))):
            pts = sorted((c["costs"][key] / scale, c["metric"]) for c in done if c["kind"] == kind)
            if pts and kind == own:
                ax.plot(*zip(*pts), lw=1.8, ms=7, zorder=4, label=f"{kind} (budget = uniform's)", **style)
            elif pts:
                ax.plot(*zip(*pts), ls="none", ms=7, mfc="none", mew=1.5, zorder=5, label=kind, **style)
        ax.axhline(float_metric, ls="--", color="gray", lw=1, label=f"float {float_metric:.2f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{name}: mixed precision vs uniform ({method})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(NAMES), choices=NAMES)
    ap.add_argument("--uniform", nargs="+", default=WIDTHS, type=bits_option, metavar="WxAy",
                    help="uniform widths, each also the budget of the mixed runs (default: W2-W8 x A8/A4)")
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    ap.add_argument("--method", default="qdrop", choices=("rtn", "adaround", "brecq", "qdrop"))
    ap.add_argument("--iters", type=int, help="per block; default: the preset's")
    ap.add_argument("--calib-size", type=int, help="default 256, 64 for bert")
    ap.add_argument("--solver", default="milp", choices=("milp", "ga"))
    ap.add_argument("--opset", type=int, help="convert each model to this opset first, for all its runs; "
                    "default: the one the narrowest width needs (0: as given)")
    ap.add_argument("--jsonl", help="append one JSON record per cell")
    ap.add_argument("--json", help="write the table as a docs/results record here")
    ap.add_argument("--plots", default="docs/img", help="directory for one PNG per model ('' for none)")
    args = ap.parse_args(argv)
    pairs = {config: widths(config) for config in args.uniform}
    if args.opset is None:
        args.opset = required_opset({*CHOICES.wbits_choices, *CHOICES.abits_choices, *(b for p in pairs.values() for b in p)})
    work = Path(tempfile.mkdtemp(prefix="bench_mixed."))
    print(f"work dir {work}", flush=True)
    table = Table(COLUMNS, args.json, f"Mixed precision against uniform widths ({args.method})",
                  f"Mixed: {args.solver} search over weights {'/'.join(map(str, CHOICES.wbits_choices))}, activations "
                  f"{'/'.join(map(str, CHOICES.abits_choices))} at the uniform row's weight storage (mixed@size) or "
                  f"BitOps (mixed@bitops); every model at opset {args.opset}"
                  + (f", {args.iters} iterations per block" if args.iters else "") + ".")
    table.header()
    summaries = []
    for name in args.models:
        model_dir = work / name
        model_dir.mkdir()
        src, calib, score, float_metric, ylabel = prepare(name, model_dir, args.calib_size)
        src = at_opset(src, model_dir / f"{name}_opset{args.opset}.onnx", args.opset)
        table.add(name, "float", "float", f"{float_metric:.2f}", "100.0", "-", "32", "-", "-")
        base = {"model": name, "method": args.method, "iters": args.iters, "solver": args.solver,
                "calib": len(next(iter(calib.values()))), "source": str(src), "float": float_metric, "metric_name": ylabel}
        cells: list[dict] = []

        def record(cell: dict) -> None:
            cells.append(cell)
            table.add(*row(name, cell["config"], cell["kind"], cell, float_metric))
            if args.jsonl:
                with open(args.jsonl, "a") as fh:
                    fh.write(json.dumps({**base, **cell}, default=str) + "\n")

        def attempt(cell: dict, **kw) -> dict:
            start = time.perf_counter()
            try:
                cell.update(run_cell(src, model_dir / f"{cell['config']}_{cell['kind']}.onnx", calib, score, args, **kw))
            except Exception as err:  # noqa: BLE001 - a failed cell (e.g. an unreachable budget) is a result
                cell.update(error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200],
                            seconds=time.perf_counter() - start)
            record(cell)
            return cell

        for config in args.uniform:
            wbits, abits = pairs[config]
            uniform = attempt({"config": config, "kind": "uniform", "wbits": wbits, "abits": abits},
                              wbits=wbits, abits=abits)
            if "error" in uniform:
                continue
            for budget in args.budgets:
                target = uniform["costs"][BUDGETS[budget]]
                attempt({"config": config, "kind": f"mixed@{budget}", "wbits": wbits, "abits": abits,
                         "target": {BUDGETS[budget]: target}},
                        targets=Targets(**{BUDGETS[budget]: target}), work_dir=model_dir / "mixed")
        summaries.append(summary(name, cells, float_metric))
        if args.plots:
            path = Path(args.plots) / f"bench_mixed_{name}.png"
            plot(name, cells, float_metric, ylabel, args.method, path)
            print(f"plot: {path}", flush=True)
    print()
    for line in summaries:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
