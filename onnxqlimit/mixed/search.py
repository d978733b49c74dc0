"""The mixed-precision search: sensitivities + costs -> the best bit plan within the budgets.

It runs after calibration and before reconstruction, because learned rounding is tied to
a width: the plan is chosen on sensitivities scored as reconstruction will leave them
(sensitivity.py; round to nearest for an rtn run), then reconstruction tunes the model at
the chosen widths.

Budgets are linear in the per-block choices except BitOps and latency, whose terms
multiply a layer's weight width by its input's width. When that input's quantizer belongs
to another block (a tensor read by several blocks), the block's cost takes the widest
width that quantizer may have, so a chosen plan never exceeds a budget; the exact costs
of the plan are then computed and reported.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx
import torch

from ..calibrate import calibrate
from ..context import Context
from ..data import batches
from ..errors import QLimitError
from ..mirror import Mirror
from ..quant.bits import BitPlan
from ..quant.fake_quant import quantizers_disabled
from ..quant.policy import COMPUTE_OPS, QuantPoint
from ..quant.runtimes import profile
from ..state import QuantState
from .block_loss import probe_schedule
from .config import UNITS, EvalData, MixedConfig
from .costs import CostModel
from .latency import FLOAT, model_latency_ms, node_latency_table
from .metric import relative_score
from .sensitivity import SensitivityTable, load_or_measure
from .solvers import Problem, solve

FRONTIER_POINTS = 12  # plans along the primary budget tried for --target-metric


@dataclass
class SearchResult:
    plan: BitPlan
    predicted_loss: float
    costs: dict[str, float]
    solver: str
    seconds: float  # the search itself, with the sensitivities at hand
    sensitivity_seconds: float
    sensitivity_cached: bool
    metric_estimate: float | None = None  # --target-metric: the plan's score with round-to-nearest
    frontier: list[dict] = field(default_factory=list)  # plans tried for --target-metric
    scored_after: int = 0  # reconstruction iterations the losses were measured after (0: round to nearest)
    block_losses: list[float] = field(default_factory=list)  # predicted loss of each block's chosen option
    measured_loss: float | None = None  # the exported file's task loss against float (held-back samples)

    def notes(self) -> dict:
        """What a saved plan records of how it was chosen: predicted beside measured loss."""
        return {"scored": f"whole model, after {self.scored_after}-iteration reconstructions of each block's "
                "uniform configurations" if self.scored_after else "whole model, round to nearest",
                "predicted_loss": self.predicted_loss,
                "measured_loss": self.measured_loss, "block_losses": self.block_losses, "costs": self.costs}


@dataclass
class SearchSpace:
    """One model's side of a search: its per-block options, their losses and costs under the
    named budgets (limits open), and the costs no block's choice changes."""

    table: SensitivityTable
    costs: CostModel
    problem: Problem
    const: np.ndarray
    names: list[str]


def search_space(ctx: Context, state: QuantState, names: list[str]) -> SearchSpace:
    """The sensitivities (measured or cached) and the cost of every block option, for `names`."""
    config, mirror, model, feeds = ctx.options.mixed, ctx.mirror, ctx.model, ctx.feeds
    sample = {k: v[:1] for k, v in feeds.items()}
    latency = _latency_table(model, sample, config, ctx.options.work_dir, ctx.config.scheme.weight_block) \
        if "latency_ms" in names else None
    costs = CostModel(model, mirror, state.points, state.quantizers, sample, latency,
                      profile(ctx.config.runtime).fused_bits)
    size_hint = dict(costs.numel)
    ops_hint: dict[str, float] = {}
    for node in costs.nodes:
        for tensor in (node.weight, node.act):
            if tensor:
                ops_hint[tensor] = ops_hint.get(tensor, 0.0) + node.macs
    table = load_or_measure(ctx, state, (size_hint, ops_hint))
    problem, const = _problem(table, costs, names, [np.inf] * len(names))
    return SearchSpace(table, costs, problem, const, names)


def search(ctx: Context, state: QuantState) -> SearchResult:
    """The bit plan within ctx.options.mixed's budgets with the least predicted loss."""
    config = ctx.options.mixed
    budgets = config.targets.budgets()
    names = list(budgets) or ["size_bytes"]
    space = search_space(ctx, state, names)
    started = time.perf_counter()
    problem, const = space.problem, space.const
    problem.limits = np.array([budgets.get(n, np.inf) for n in names], float) - const
    check_reachable(problem, const, names, budgets)
    result_extra: dict = {}
    if config.targets.metric is not None:
        choice, result_extra = _meet_metric(ctx, state, space.table, problem, const, names, space.costs)
    else:
        choice = solve(problem, config.solver, config.ga, ctx.options.seed)
        if choice is None:
            raise QLimitError(unreachable_together(problem, const, names, budgets))
    return result_of(ctx, space, choice, time.perf_counter() - started, result_extra)


def result_of(ctx: Context, space: SearchSpace, choice: list[int], seconds: float, extra: dict | None = None
              ) -> SearchResult:
    """The SearchResult of one choice of option per block of `space`."""
    plan = _plan_of(space.table, choice, list(space.costs.points.values()), space.costs)
    tune = probe_schedule(ctx.recon, ctx.options.mixed.sensitivity)
    return SearchResult(plan, space.problem.totals(choice)[0], space.costs.evaluate(plan), ctx.options.mixed.solver,
                        seconds, space.table.seconds, space.table.from_cache, **(extra or {}),
                        scored_after=tune.iters if tune is not None else 0,
                        block_losses=[float(l[i]) for l, i in zip(space.problem.losses, choice)])


def _plan_of(table: SensitivityTable, choice: list[int], points: list[QuantPoint], costs: CostModel) -> BitPlan:
    bits = {p.tensor: max(table.choices[p.tensor]) for p in points}
    for options, i in zip(table.blocks, choice):
        bits.update(options[i].bits)
    return BitPlan({**bits, **costs.unfused_outputs(bits)})


def _problem(table: SensitivityTable, costs: CostModel, names: list[str], limits: list[float]) -> tuple[Problem, np.ndarray]:
    """Per-block option costs for the named budgets, and what no block's choice changes."""
    upper = {t: max(c) for t, c in table.choices.items()}
    node_block = {}
    for node in costs.nodes:
        owner = table.owner.get(node.weight) if node.weight else None
        node_block[node.name] = owner if owner is not None else table.owner.get(node.act)
    params = max(1, sum(costs.layer_numel.values()))
    option_costs = []
    for b, options in enumerate(table.blocks):
        nodes = [n for n in costs.nodes if node_block[n.name] == b]
        rows = []
        for option in options:
            bits = {**upper, **option.bits}
            bits.update(costs.unfused_outputs(bits))
            row = {"size_bytes": sum(costs.storage(t, bits[t], bits) for t in option.bits),
                   "avg_wbits": sum(costs.layer_numel[t] * w for t, w in option.bits.items() if t in costs.layer_numel) / params,
                   "bitops": sum(costs.node_bitops(n, bits) for n in nodes)}
            if costs.latency is not None:
                row["latency_ms"] = sum(costs.node_latency(n, bits) for n in nodes)
            rows.append([row[n] for n in names])
        option_costs.append(np.array(rows, float).reshape(len(options), len(names)))
    owned = set(table.owner)
    loose = [n for n in costs.nodes if node_block[n.name] is None]
    const = {"size_bytes": costs.base_bytes + sum(costs.storage(t, upper[t]) for t in upper if t not in owned),
             "avg_wbits": sum(n * upper[t] for t, n in costs.layer_numel.items() if t not in owned) / params,
             "bitops": sum(costs.node_bitops(n, upper) for n in loose),
             "latency_ms": (costs.latency["base_ms"] + sum(costs.node_latency(n, upper) for n in loose))
             if costs.latency is not None else 0.0}
    const_vec = np.array([const[n] for n in names])
    losses = [np.array([o.loss for o in options]) for options in table.blocks]
    return Problem(losses, option_costs, np.array(limits, float) - const_vec), const_vec


def _reachable(problem: Problem, const: np.ndarray, k: int) -> float:
    return float(const[k] + sum(c[:, k].min() for c in problem.costs))


def check_reachable(problem: Problem, const: np.ndarray, names: list[str], budgets: Mapping[str, float]) -> None:
    for k, name in enumerate(names):
        if name in budgets and _reachable(problem, const, k) > budgets[name]:
            flag, fmt = UNITS[name]
            raise QLimitError(f"{flag} {fmt(budgets[name])} cannot be met: the smallest reachable is "
                              f"{fmt(_reachable(problem, const, k))} with these widths")


def unreachable_together(problem, const, names, budgets) -> str:
    parts = ", ".join(f"{UNITS[n][0]} (alone >= {UNITS[n][1](_reachable(problem, const, k))})"
                      for k, n in enumerate(names) if n in budgets)
    return f"these budgets cannot be met together: {parts}"


def _meet_metric(ctx: Context, state: QuantState, table: SensitivityTable, problem: Problem, const: np.ndarray,
                 names: list[str], costs: CostModel) -> tuple[list[int], dict]:
    """The smallest plan on the primary budget (the first one given, else size) that keeps the
    target metric with round-to-nearest, by bisection over plans along the budget."""
    config, seed = ctx.options.mixed, ctx.options.seed
    low = _reachable(problem, const, 0)
    high = float(const[0] + sum(c[:, 0].max() for c in problem.costs))
    cap = problem.limits[0] + const[0]
    plans: list[list[int]] = []
    for limit in np.linspace(low, min(high, cap), FRONTIER_POINTS):
        limits = problem.limits.copy()
        limits[0] = limit - const[0]
        choice = solve(Problem(problem.losses, problem.costs, limits), config.solver, config.ga, seed)
        if choice is not None and choice not in plans:
            plans.append(choice)
    if not plans:
        raise QLimitError(unreachable_together(problem, const, names, config.targets.budgets()))
    plans.sort(key=lambda c: float(problem.totals(c)[1][0]))
    def recalibrate() -> None:  # activation ranges observed with the plan's weights, as its file will have them
        state.calibration = calibrate(ctx.mirror, state.points, state.quantizers, ctx.batches(), ctx.config.scheme,
                                      progress=False, previous=state.calibration)

    scorer = _PlanScorer(ctx.mirror, state, ctx.eval_data or EvalData(ctx.feeds), recalibrate)
    frontier: list[dict] = []

    def score(i: int) -> float:
        value = scorer(_plan_of(table, plans[i], state.points, costs))
        frontier.append({names[0]: float(problem.totals(plans[i])[1][0] + const[0]), "metric": value})
        return value

    target = config.targets.metric
    if score(len(plans) - 1) < target:
        best = frontier[-1]["metric"]
        raise QLimitError(f"--target-metric {target} cannot be met: the widest plan within the budgets keeps {best:.4f}")
    lo, hi, best_score = 0, len(plans) - 1, frontier[-1]["metric"]
    while lo < hi:
        mid = (lo + hi) // 2
        value = score(mid)
        if value >= target:
            hi, best_score = mid, value
        else:
            lo = mid + 1
    return plans[hi], {"metric_estimate": best_score, "frontier": frontier}


class _PlanScorer:
    """Scores plans with round-to-nearest quantizers on the evaluation data, against float,
    each with the activation ranges `recalibrate` observes for it (the file's)."""

    def __init__(self, mirror: Mirror, state: QuantState, data: EvalData, recalibrate: Callable[[], None],
                 batch_size: int = 32):
        self.mirror, self.state, self.data, self.batch_size = mirror, state, data, batch_size
        self.recalibrate = recalibrate
        with quantizers_disabled(state.quantizers):
            self.reference = self._outputs()

    def _outputs(self) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for batch in batches(self.data.feeds, self.batch_size):
                for name, value in self.mirror.run(batch).items():
                    parts.setdefault(name, []).append(value.cpu())
        return {k: torch.cat(v) for k, v in parts.items()}

    def __call__(self, plan: BitPlan) -> float:
        self.state.apply(plan)
        self.recalibrate()
        return relative_score(self.reference, self._outputs(), self.data.labels)


def _latency_table(model: onnx.ModelProto, sample: Mapping[str, np.ndarray], config: MixedConfig,
                   work_dir: str | None, block: int | None = None) -> dict:
    """Per-node onnxruntime latencies for the candidate width pairs (cached in the work directory)."""
    choices = config.sensitivity
    pairs = sorted({(w, a) for w in choices.wbits_choices for a in choices.abits_choices}, reverse=True)
    nodes = [n.name for n in model.graph.node if n.op_type in COMPUTE_OPS]
    key = hashlib.sha256(model.SerializeToString(deterministic=True) + json.dumps(
        [pairs, config.latency_threads, {k: list(v.shape) for k, v in sample.items()}, block]).encode()).hexdigest()[:24]
    path = Path(work_dir) / f"latency-{key}.json" if work_dir is not None else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    table = node_latency_table(model, dict(sample), nodes, pairs, threads=config.latency_threads, block=block)
    whole = model_latency_ms(model, dict(sample), threads=config.latency_threads)
    result = {"base_ms": max(0.0, whole - sum(entry[FLOAT] for entry in table.values())), "nodes": table,
              "float_model_ms": whole}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return result


def format_plan_rows(rows: Mapping[str, Mapping[str, int]], op_types: Mapping[str, str]) -> str:
    """One line per quantized node of a plan's node view: its weight and activation widths."""
    width = min(48, max((len(n) for n in rows), default=4))
    lines = [f"{'node':<{width}}  {'op':<13} W  A"]
    for node, entry in rows.items():
        shown = node if len(node) <= width else "..." + node[-(width - 3):]
        lines.append(f"{shown:<{width}}  {op_types.get(node, '?'):<13} {entry.get('wbits', '-'):<2} {entry.get('abits', '-')}")
    return "\n".join(lines)


def result_json(result: SearchResult, points: list[QuantPoint]) -> dict:
    data = asdict(result)
    data["plan"] = result.plan.to_nodes(points)
    return data
