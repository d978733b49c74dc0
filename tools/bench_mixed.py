"""Mixed-precision Pareto benchmark: task metric vs weight storage and vs BitOps.

    python tools/bench_mixed.py                                   # everything (hours on 2 cores)
    python tools/bench_mixed.py --models zoo_resnet --uniform W4A8 W8A8 --method rtn
    python tools/bench_mixed.py --models bert --budgets bitops --solver ga --jsonl mixed.jsonl
    python tools/bench_mixed.py --models rec cls --plots docs/img --iters 500
    python tools/bench_mixed.py --models rec --uniform W4A6 --budgets bitops   # the rec target

Per model and uniform width (first/last layers at 8 bits, the quantizer's default): the
uniform model, then a mixed-precision search (weights 2/3/4/8, activations 4/8) at that
uniform model's measured weight storage and at its BitOps, each quantized with the same
method. Every file is scored with onnxruntime: the zoo top-1, PP-OCR rec character
accuracy and cls accuracy (the headline metrics of tools/eval_float.py, in %), and for a
random-weight BERT encoder the mean cosine similarity of its hidden states to the float
model's (float = 100). The float metric is measured in the same run. Costs are those the
quantizer reports for the exported file. Each model is first converted to the opset the
narrowest width needs (--opset), so uniform and mixed runs quantize one graph. One work
dir per model holds the sensitivity cache, so it is measured once. Rows print as they
finish; --jsonl keeps one record per cell (with the plan for mixed cells); --plots writes
one PNG per model.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxqlimit.export import required_opset  # noqa: E402
from onnxqlimit.quant.bits import ACT_BITS, WEIGHT_BITS  # noqa: E402
from onnxqlimit.mixed.search import MixedConfig, Targets  # noqa: E402
from onnxqlimit.mixed.sensitivity import SensitivityConfig  # noqa: E402
from onnxqlimit.quant.policy import QuantConfig  # noqa: E402
from onnxqlimit.quantize import RunOptions, quantize  # noqa: E402
from tools import tasks  # noqa: E402
from tools.eval_float import MODELS  # noqa: E402

NAMES = ("zoo_resnet", "zoo_mobilenetv2", "rec", "cls", "bert")
WIDTHS = {f"W{w}A{a}": (w, a) for a in (8, 4) for w in (2, 3, 4, 8)}  # the default grid
BUDGETS = {"size": "size_bytes", "bitops": "bitops"}
BERT = dict(vocab_size=1000, hidden=64, layers=2, heads=4, ffn=128, max_len=32)
BERT_SEQ, BERT_EVAL = 32, 256
WCHOICES, ACHOICES = (2, 3, 4, 8), (4, 8)

Scorer = Callable[[Path], float]


def width(config: str) -> tuple[int, int]:
    """'W4A6' -> (4, 6): any supported pair, e.g. the rec target's W4A6 BitOps."""
    match = re.fullmatch(r"W(\d+)A(\d+)", config)
    if not match or int(match[1]) not in WEIGHT_BITS or int(match[2]) not in ACT_BITS:
        raise argparse.ArgumentTypeError(f"{config!r}: expected WxAy with x in {list(WEIGHT_BITS)}, y in {list(ACT_BITS)}")
    return int(match[1]), int(match[2])


# ------------------------------------------------------------------------------ models

def bert_inputs(names: list[str], n: int, seed: int) -> dict[str, np.ndarray]:
    """Random token ids, padded to BERT_SEQ after a random length (mask 0 there), one segment."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(BERT_SEQ)[None] < rng.integers(BERT_SEQ // 2, BERT_SEQ + 1, (n, 1))).astype(np.int64)
    feeds = {"input_ids": rng.integers(1, BERT["vocab_size"], (n, BERT_SEQ), dtype=np.int64) * mask,
             "attention_mask": mask, "token_type_ids": np.zeros((n, BERT_SEQ), np.int64)}
    return {k: feeds[k] for k in names}


def prepare_bert(work: Path, calib_size: int) -> tuple[Path, dict, Scorer, float, str]:
    import onnx
    import onnxruntime as ort
    import torch

    from tools.archs import BertEncoder, export_onnx

    torch.manual_seed(0)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = [torch.from_numpy(v[:2]) for v in bert_inputs(names, 2, 7).values()]
    src = export_onnx(BertEncoder(**BERT), tuple(example), work / "bert.onnx", 13, names, ["h"],
                      {n: {0: "b", 1: "s"} for n in names})
    names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
    evaluation = bert_inputs(names, BERT_EVAL, 0)

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, evaluation)[0].reshape(BERT_EVAL, -1).astype(np.float64)

    reference = run(src)

    def score(path: Path) -> float:
        out = run(path)
        cos = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1) + 1e-30)
        return 100 * float(cos.mean())

    return src, bert_inputs(names, calib_size, 1000), score, 100.0, "cosine to float (%)"


def prepare(name: str, work: Path, calib_size: int | None) -> tuple[Path, dict, Scorer, float, str]:
    """(source model, calibration dict, file -> metric in %, float metric, metric label)."""
    if name == "bert":
        return prepare_bert(work, calib_size or 64)
    task, make, key = MODELS[name]
    data, src = make(), tasks.model_path(name)

    def score(path: Path) -> float:
        return 100 * tasks.evaluate(str(path), task, data)[key]

    return src, tasks.calibration(name, calib_size or 256), score, score(src), f"{key} (%)"


def shared_source(src: Path, dest: Path, opset: int) -> Path:
    """`src` converted to `opset`. The quantizer raises a model to the opset its widths need
    before simplifying, so a W8A8 run (13) and a search over 2-bit choices (25) would
    otherwise quantize differently simplified graphs (BERT's GELU and LayerNorm become
    Gelu / RMSNormalization only at >= 20 / 23) that differ in size and metric at one plan."""
    import onnx

    model = onnx.load(str(src))
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not opset or current >= opset:
        return src
    try:
        onnx.save(onnx.version_converter.convert_version(model, opset), str(dest))
        return dest
    except Exception as err:  # noqa: BLE001 - fall back to the source as given
        print(f"{src.name}: opset {current} -> {opset} failed ({str(err).splitlines()[0][:80]}); using opset {current}")
        return src


# ------------------------------------------------------------------------------- cells

def run_cell(src: Path, out: Path, calib: dict, score: Scorer, args, wbits: int = 8, abits: int = 8,
             targets: Targets | None = None, work_dir: Path | None = None) -> dict:
    mixed = MixedConfig(targets, SensitivityConfig(wbits_choices=WCHOICES, abits_choices=ACHOICES),
                        solver=args.solver, work_dir=work_dir) if targets else MixedConfig()
    options = RunOptions(method=args.method, calib_size=len(next(iter(calib.values()))), iters=args.iters,
                         progress=False, mixed=mixed)
    start = time.perf_counter()
    report = quantize(src, out, calib, QuantConfig() if targets else QuantConfig(wbits=wbits, abits=abits),
                      options).report
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    metric = score(out)
    cell = {"metric": metric, "costs": report["costs"], "seconds": seconds, "eval_seconds": time.perf_counter() - start}
    if targets:
        cell["mixed_precision"] = {k: v for k, v in report["mixed_precision"].items() if k != "plan"}
        cell["plan"] = report["plan"]
    return cell


def row(name: str, config: str, kind: str, cell: dict, float_metric: float) -> str:
    if "error" in cell:
        return f"| {name} | {config} | {kind} | n/a ({cell['error'][:70]}) | - | - | - | - | {cell.get('seconds', 0):.0f} |"
    c = cell["costs"]
    return (f"| {name} | {config} | {kind} | {cell['metric']:.2f} | {100 * cell['metric'] / float_metric:.1f} | "
            f"{c['size_bytes'] / 1e3:.1f} | {c['avg_wbits']:.2f} | {c['bitops'] / 1e9:.3f} | {cell['seconds']:.0f} |")


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
    ap.add_argument("--uniform", nargs="+", default=list(WIDTHS), metavar="WxAy",
                    help="uniform widths, each also the budget of the mixed runs (default: W2-W8 x A8/A4)")
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    ap.add_argument("--method", default="qdrop", choices=("rtn", "adaround", "brecq", "qdrop"))
    ap.add_argument("--iters", type=int, help="per block; default: the preset's")
    ap.add_argument("--calib-size", type=int, help="default 256, 64 for bert")
    ap.add_argument("--solver", default="milp", choices=("milp", "ga"))
    ap.add_argument("--opset", type=int, help="convert each model to this opset first, for all its runs; "
                    "default: the one the narrowest width needs (0: as given)")
    ap.add_argument("--jsonl", help="append one JSON record per cell")
    ap.add_argument("--plots", default="docs/img", help="directory for one PNG per model ('' for none)")
    args = ap.parse_args(argv)
    try:
        widths = {config: width(config) for config in args.uniform}
    except argparse.ArgumentTypeError as err:
        ap.error(f"--uniform: {err}")
    if args.opset is None:
        args.opset = required_opset({*WCHOICES, *ACHOICES, *(b for pair in widths.values() for b in pair)})
    work = Path(tempfile.mkdtemp(prefix="bench_mixed."))
    print(f"work dir {work}", flush=True)
    print("| model | config | kind | metric | % of float | weight KB | avg wbits | GBitOps | seconds |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    summaries = []
    for name in args.models:
        model_dir = work / name
        model_dir.mkdir()
        src, calib, score, float_metric, ylabel = prepare(name, model_dir, args.calib_size)
        src = shared_source(src, model_dir / f"{name}_opset{args.opset}.onnx", args.opset)
        print(f"| {name} | float | float | {float_metric:.2f} | 100.0 | - | 32 | - | - |", flush=True)
        base = {"model": name, "method": args.method, "iters": args.iters, "solver": args.solver,
                "calib": len(next(iter(calib.values()))), "source": str(src), "float": float_metric, "metric_name": ylabel}
        cells: list[dict] = []

        def record(cell: dict) -> None:
            cells.append(cell)
            print(row(name, cell["config"], cell["kind"], cell, float_metric), flush=True)
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
            wbits, abits = widths[config]
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
