"""One budget shared by the models of a pipeline (OCR: det -> cls -> rec; a detector and its
classifier), spent where the losses say it buys most.

Each model is prepared, calibrated and scored exactly as its own search would be
(mixed/search.py: per-block options with their whole-model losses, scored after short
reconstructions, and their costs). The blocks of all models then form one multiple-choice
knapsack whose limits are the shared budget less what no block changes, so a bit goes to
whichever model loses most without it. Then each model is reconstructed at its part of the
plan and exported as `quantize()` would; the files' costs, summed, meet the budget.

Losses of different models meet in one sum, but their units do not: on RapidOCR the
per-block output losses reach 1e5 for det, 400 for rec and 0.6 for cls, and raw sums gave
det the bits rec needed (rec read nothing). So each model's losses are divided by its
worst plan's (every block at its costliest-loss option): 1 means "as broken as this
model gets within the choices", for every model. A stage's `weight` (default 1) scales
that when one model matters more to the end metric.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .context import RunOptions
from .errors import QLimitError
from .mixed.config import Targets
from .mixed.search import check_reachable, unreachable_together, result_of, search_space
from .mixed.solvers import Problem, solve
from .output import check_output
from .pipeline import (
    QuantizeResult,
    cpu_threads,
    finish,
    place_and_calibrate,
    prepare,
    recalibrate_if_changed,
    resolve_device,
)
from .quant.config import QuantConfig

SHARED = ("size_bytes", "bitops", "latency_ms")  # costs that add up over the models of a pipeline


@dataclass
class Stage:
    """One model of the pipeline and where its file goes."""

    name: str
    model: str | Path | onnx.ModelProto
    output: str | Path
    calibration: Any  # as quantize() takes it: .npz, image folder, dict of arrays, CalibrationDataReader
    config: QuantConfig | None = None  # None: the pipeline's
    weight: float = 1.0  # how much this model's loss counts in the shared search


@dataclass
class PipelineResult:
    results: dict[str, QuantizeResult]  # per stage name, as quantize() returns it
    costs: dict[str, float]  # the budgets' costs, summed over the files
    predicted_loss: float  # what the search minimised: the weighted sum of each model's loss share
    seconds: float
    search_seconds: float = 0.0  # the joint solve alone
    shares: dict[str, dict[str, float]] = field(default_factory=dict)  # per stage: its part of each budget


def quantize_pipeline(stages: list[Stage], targets: Targets, config: QuantConfig | None = None,
                      options: RunOptions | None = None) -> PipelineResult:
    """Quantize every stage under one shared budget (`targets`: size, BitOps and/or latency,
    each the sum over the files). `options` are every stage's run options; with a work_dir,
    each stage keeps its tables and checkpoints in a subfolder named after it."""
    options = options or RunOptions()
    budgets = _check(stages, targets)
    names = list(budgets)
    before = torch.get_num_threads()
    started = time.perf_counter()
    try:
        device = resolve_device(options.device)
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads(options.threads))
        runs = []
        for stage in stages:  # every output checked before any work starts
            check_output(stage.model, Path(stage.output), options.overwrite)
        for stage in stages:
            stage_options = replace(options, mixed=replace(options.mixed, targets=targets), save_plan=None,
                                    work_dir=str(Path(options.work_dir) / stage.name) if options.work_dir else None)
            torch.manual_seed(stage_options.seed)
            ctx = prepare(stage.model, stage.calibration, stage.config or config or QuantConfig(), stage_options,
                          device)
            state = place_and_calibrate(ctx)
            runs.append((stage, ctx, state, state.plan, search_space(ctx, state, names)))
        solved = time.perf_counter()
        choice, predicted = _solve_together(runs, names, budgets, options)
        search_seconds = time.perf_counter() - solved
        results, at = {}, 0
        for stage, ctx, state, default, space in runs:
            count = len(space.problem.losses)
            searched = result_of(ctx, space, choice[at:at + count], search_seconds)
            at += count
            state.apply(searched.plan)
            recalibrate_if_changed(ctx, state, default)
            results[stage.name] = finish(ctx, state, Path(stage.output), searched, time.perf_counter())
    finally:
        torch.set_num_threads(before)
    shares = {name: {n: r.report.costs[n] for n in names} for name, r in results.items()}
    costs = {n: sum(share[n] for share in shares.values()) for n in names}
    return PipelineResult(results, costs, predicted, time.perf_counter() - started, search_seconds, shares)


def _check(stages: list[Stage], targets: Targets) -> dict[str, float]:
    if not stages:
        raise QLimitError("a pipeline needs at least one model")
    for what, values in (("name", [s.name for s in stages]),
                         ("output", [str(Path(s.output).resolve()) for s in stages])):
        if len(set(values)) != len(values):
            raise QLimitError(f"every model of a pipeline needs its own {what}")
    if any(not s.weight > 0 for s in stages):
        raise QLimitError("a pipeline stage's weight must be positive")
    budgets = targets.budgets()
    if targets.metric is not None or set(budgets) - set(SHARED) or not budgets:
        raise QLimitError("a shared budget is a size, BitOps or latency target (each the sum over the files); "
                          "average bits and --target-metric are per model")
    return budgets


def _worst(space) -> float:
    """The loss of a model's worst plan: every block at its largest-loss option."""
    return sum(float(loss.max()) for loss in space.problem.losses) or 1.0


def _solve_together(runs, names: list[str], budgets: dict[str, float], options: RunOptions) -> tuple[list[int], float]:
    """One option per block of every model: the least weighted loss within the shared budgets,
    each model's losses as a share of its worst plan's."""
    losses = [loss * stage.weight / _worst(space) for stage, *_, space in runs for loss in space.problem.losses]
    costs = [cost for *_, space in runs for cost in space.problem.costs]
    const = np.sum([space.const for *_, space in runs], axis=0)
    problem = Problem(losses, costs, np.array([budgets[n] for n in names], float) - const)
    check_reachable(problem, const, names, budgets)
    choice = solve(problem, options.mixed.solver, options.mixed.ga, options.seed)
    if choice is None:
        raise QLimitError(unreachable_together(problem, const, names, budgets))
    return choice, problem.totals(choice)[0]
