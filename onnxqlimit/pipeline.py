"""The pipeline, in one screen: prepare (load -> mirror -> data) -> place + calibrate ->
choose widths (plan file or mixed-precision search) -> reconstruct -> export + validate ->
report. Each stage is a function of the run's Context and returns a small result.

The bit plan is chosen before reconstruction: learned rounding is tied to a width.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import onnx
import torch

from . import weights
from .calibrate import attach_quantizers, calibrate, tie_scales
from .context import Context, RunOptions
from .data import (
    batches,
    calibration_feeds,
    conform,
    fixed_batch_size,
    load_eval_data,
    parse_preprocess,
)
from .errors import QLimitError
from .evaluate import file_metric, quality
from .export import export_qdq
from .load import LoadConfig, load_model, read_model, uses_external_data
from .mirror import Mirror
from .mixed.config import EvalData
from .mixed.costs import CostModel, file_costs
from .mixed.latency import model_latency_ms
from .mixed.search import SearchResult, search
from .output import StagedOutput, check_output
from .parity import IntegerParity, OutputParity, check_file
from .quant.bits import BitPlan, plan_widths, read_plan_file
from .quant.config import QuantConfig
from .quant.policy import place
from .quant.reach import last_layers
from .quant.runtimes import fusion_inputs, profile, restrict_choices, unfused_outputs
from .quant.widths import required_opset
from .recon import ReconResult, reconstruct
from .recon.checkpoint import Checkpoints, run_key
from .report import Report, build_report
from .runtime import RuntimeCheck, check_runtime
from .smooth import smooth_model
from .state import QuantState

log = logging.getLogger("onnxqlimit")
HOLD_BACK = 32  # calibration-source samples past calib_size kept for the end-of-run quality
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_THREADS_AT_IMPORT = torch.get_num_threads()


@dataclass
class QuantizeResult:
    output_path: Path
    report: Report


@dataclass
class Exported:
    """What export_and_validate leaves: the file's proto (weights may be references), its checks and costs."""

    model: onnx.ModelProto
    parity: list[OutputParity]
    integer_parity: IntegerParity
    costs: dict[str, float]
    quality: dict | None
    metric: float | None
    runtime: RuntimeCheck | None


def quantize(model, output_path, calibration, config: QuantConfig | None = None,
             options: RunOptions | None = None) -> QuantizeResult:
    """Quantize `model` (path or ModelProto) with `calibration` (.npz path, image folder,
    dict of arrays or an onnxruntime CalibrationDataReader) and write a QDQ model.
    torch's thread count is set for the run (see cpu_threads) and restored afterwards."""
    options = options or RunOptions()
    before = torch.get_num_threads()
    try:
        device = resolve_device(options.device)
        if device.type == "cpu":
            torch.set_num_threads(cpu_threads(options.threads))
        return _quantize(model, Path(output_path), calibration, config or QuantConfig(), options, device)
    finally:
        torch.set_num_threads(before)


def _quantize(model, output_path: Path, calibration, config: QuantConfig, options: RunOptions,
              device: torch.device) -> QuantizeResult:
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    check_output(model, output_path, options.overwrite)
    ctx = prepare(model, calibration, config, options, device)
    state = place_and_calibrate(ctx)
    searched = choose_widths(ctx, state)
    return finish(ctx, state, output_path, searched, started)


def finish(ctx: Context, state: QuantState, output_path: Path, searched: SearchResult | None,
           started: float) -> QuantizeResult:
    """Stages 4-6 with the widths chosen: reconstruct, export + validate, report."""
    options = ctx.options
    tuning, checkpoints = reconstruct_blocks(ctx, state)
    exported = export_and_validate(ctx, state, output_path, searched)
    if checkpoints is not None:  # kept until the file is written: a run stopped while exporting resumes
        checkpoints.finish()
    if searched is not None and exported.quality is not None:
        searched.measured_loss = exported.quality.get("task_loss")
    if options.save_plan:
        state.plan.save(options.save_plan, state.points, searched.notes() if searched is not None else None)
    report = build_report(ctx, state, exported, output_path, searched, tuning, time.perf_counter() - started)
    return QuantizeResult(output_path, report)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise QLimitError("--device cuda: torch sees no CUDA device (install a CUDA build of torch)")
    if name not in ("cpu", "cuda"):
        raise QLimitError(f"--device must be auto, cpu or cuda (got {name!r})")
    return torch.device(name)


def cpu_threads(requested: int | None) -> int:
    """torch threads for a CPU run: `requested` (--threads); else the user's own choice as it
    stands (OMP_NUM_THREADS / MKL_NUM_THREADS, or torch.set_num_threads called after importing
    onnxqlimit); else every core this process may use, since torch may start with fewer."""
    if requested is not None:
        if requested < 1:
            raise QLimitError(f"--threads must be positive (got {requested})")
        return requested
    current = torch.get_num_threads()
    if any(os.environ.get(name) for name in THREAD_ENV) or current != _THREADS_AT_IMPORT:
        return current
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(current, cores)


def prepare(model, calibration, config: QuantConfig | None = None, options: RunOptions | None = None,
            device: torch.device | None = None) -> Context:
    """Stage 1: the model read, loaded (simplified, constants lifted, BatchNorm folded, opset
    raised for the widths it may hold) and mirrored in torch; the calibration samples (and
    up to HOLD_BACK more, held back for the end-of-run quality); SmoothQuant applied if asked."""
    config, options = config or QuantConfig(), options or RunOptions()
    device = device or resolve_device(options.device)
    if options.preprocess is not None:
        parse_preprocess(options.preprocess)  # a typo is refused before the model loads, folder or not
    searching = options.mixed.targets.any()
    if searching:  # a search under a runtime profile chooses among the widths that runtime runs
        options = replace(options, mixed=restrict_choices(profile(config.runtime), options.mixed))
    plan_entries = read_plan_file(options.bits_plan) if options.bits_plan else None
    if searching and plan_entries is not None:
        raise QLimitError("--bits-plan fixes every width; it cannot be combined with a --target-* search")
    original = read_model(model)
    widths = config.widths.all_bits() | plan_widths(plan_entries or {})  # every width the file may hold
    if searching:
        choices = options.mixed.sensitivity
        widths |= set(choices.wbits_choices) | set(choices.abits_choices)
    loaded = load_model(original, LoadConfig(simplify=options.simplify,
                                               min_opset=required_opset(widths, config.scheme.weight_block is not None)))
    mirror = Mirror(loaded).to(device)
    calib_size = options.recon.calib_size
    feeds = conform(calibration_feeds(calibration, mirror.input_names, calib_size + HOLD_BACK, options.preprocess),
                    loaded)
    eval_data = load_eval_data(options.eval_data, loaded) if options.eval_data else None
    ctx = Context(config, options, device, original, loaded, mirror, {k: v[:calib_size] for k, v in feeds.items()},
                  {k: v[calib_size:] for k, v in feeds.items()}, eval_data, uses_external_data(model), plan_entries)
    if config.smooth is not None:  # outlier channels migrated into the float weights (smooth.py)
        ctx.model, ctx.smoothed = smooth_model(loaded, mirror, ctx.batches(), config)
        if ctx.smoothed:
            ctx.mirror = Mirror(ctx.model).to(device)
    return ctx


def place_and_calibrate(ctx: Context) -> QuantState:
    """Stage 2: quantizers where the policy puts them, weight scales, then activation ranges
    observed on the model with its weights quantized."""
    # The last layers, element by element (reach.py), on one sample (or the model's fixed batch).
    last = last_layers(ctx.mirror, next(batches(ctx.feeds, fixed_batch_size(ctx.model) or 1))) \
        if ctx.config.widths.first_last_bits else None
    points = place(ctx.model, ctx.config, last)
    if not points:
        raise QLimitError("nothing to quantize: the model has no Conv/ConvTranspose/Gemm/MatMul with float weights")
    quantizers = attach_quantizers(ctx.mirror, points, profile(ctx.config.runtime).fused_bits)
    state = QuantState(points, quantizers, calibrate(ctx.mirror, points, quantizers, ctx.batches(),
                                                     ctx.config.scheme, ctx.options.progress))
    for name in ctx.mirror.untaken_subgraphs():  # its weights keep round-to-nearest; activations stay float
        log.warning("%s was not taken on any calibration sample", name)
    untaken = ctx.mirror.untaken_nodes()
    for point in points:  # no sample measures what its width costs there: a search keeps it
        if point.consumers and set(point.consumers) <= untaken:
            point.fixed = True
    if state.calibration.unobserved:
        log.warning("%d activation(s) that no calibration sample computed stay float: %s",
                    len(state.calibration.unobserved), ", ".join(state.calibration.unobserved[:5]))
    return state


def choose_widths(ctx: Context, state: QuantState) -> SearchResult | None:
    """Stage 3: the widths of a --bits-plan file, or of a mixed-precision search when targets are
    set; activation ranges are observed again when weight widths changed."""
    options, default = ctx.options, state.plan
    searched = None
    if ctx.plan_entries is not None:  # output pairs follow their node's fusion, as in a searched plan
        plan = BitPlan.from_nodes(ctx.plan_entries, state.points)
        fused_bits = profile(ctx.config.runtime).fused_bits
        state.apply(plan.with_bits(unfused_outputs(fusion_inputs(ctx.model.graph, state.points), plan.bits,
                                                   fused_bits)))
    elif options.mixed.targets.any():
        searched = search(ctx, state)
        state.apply(searched.plan)
    recalibrate_if_changed(ctx, state, default)
    return searched


def recalibrate_if_changed(ctx: Context, state: QuantState, default: BitPlan) -> None:
    if state.plan != default:  # activation ranges follow the weights' new widths
        state.calibration = calibrate(ctx.mirror, state.points, state.quantizers, ctx.batches(), ctx.config.scheme,
                                      ctx.options.progress)


def reconstruct_blocks(ctx: Context, state: QuantState) -> tuple[ReconResult | None, Checkpoints | None]:
    """Stage 4: BRECQ / QDrop block by block (none for rtn); with a work dir, each finished
    block is checkpointed so that --resume picks up an interrupted run."""
    recon, options = ctx.recon, ctx.options
    if recon.method == "rtn":
        return None, None
    checkpoints = None
    if options.work_dir is not None:
        settings = {"config": asdict(ctx.config), "plan": state.plan.to_nodes(state.points), "device": ctx.device.type,
                    "threads": torch.get_num_threads(), "recon": asdict(recon), "seed": options.seed}
        checkpoints = Checkpoints(Path(options.work_dir), run_key(weights.identity(ctx.original), ctx.feeds, settings),
                                  options.resume)
    result = reconstruct(ctx.mirror, ctx.model, state, ctx.feeds, recon, options.seed, options.progress, checkpoints)
    tie_scales(state.points, state.quantizers)  # learned input scales reach the data-movement outputs tied to them
    return result, checkpoints


def export_and_validate(ctx: Context, state: QuantState, output_path: Path, searched: SearchResult | None) -> Exported:
    """Stage 5: the QDQ file, validated as written (onnxruntime against the tuned mirror, outputs
    and activation integers), its costs and quality measured, then moved into place."""
    options, batch_size = ctx.options, ctx.recon.batch_size
    parity_feeds = {k: v[: options.parity_samples] for k, v in ctx.feeds.items()}
    with StagedOutput(output_path) as staged:
        # A model kept on disk has its integer weights written out as they are made.
        qmodel = export_qdq(ctx.model, ctx.mirror, state, staged.store if weights.on_disk(ctx.model) else None)
        qmodel = staged.write(qmodel, external_data=ctx.external_data)
        parity, flips = check_file(staged.path, ctx.mirror, state, parity_feeds, fixed_batch_size(ctx.model), batch_size)
        costs = file_costs(qmodel, CostModel(ctx.model, ctx.mirror, state.points, state.quantizers, ctx.feeds,
                                             fused_bits=profile(ctx.config.runtime).fused_bits), state.plan)
        if searched is not None and "latency_ms" in searched.costs:  # a table estimate; the file's own time is measured
            costs["latency_ms"] = searched.costs["latency_ms"]
            costs["measured_latency_ms"] = model_latency_ms(str(staged.path), {k: v[:1] for k, v in ctx.feeds.items()},
                                                            threads=options.mixed.latency_threads)
        budgets = options.mixed.targets.budgets()
        over = [name for name, limit in budgets.items() if costs[name] > limit * (1 + 1e-9)]
        if over:  # the search guarantees the budgets: reaching here is a bug, never a shipped file
            raise RuntimeError(f"exported file exceeds its budget: {', '.join(f'{n} {costs[n]:.6g} > {budgets[n]:.6g}' for n in over)}")
        # Measured before the move, while an input that --overwrite replaces is still there.
        held = len(next(iter(ctx.held_back.values()))) > 0
        measured = quality(ctx.original, str(staged.path), ctx.mirror, state.quantizers,
                           ctx.held_back if held else parity_feeds, batch_size, held)
        runtime = runtime_check(ctx, staged.path)
        staged.commit()
    metric = None
    if options.mixed.targets.metric is not None:
        metric = file_metric(output_path, ctx.mirror, state.quantizers, ctx.eval_data or EvalData(ctx.feeds), batch_size)
    return Exported(qmodel, parity, flips, costs, measured, metric, runtime)


def runtime_check(ctx: Context, path: Path) -> RuntimeCheck | None:
    """How onnxruntime's CPU provider runs the file (runtime.py), timed against the float model
    on one batch (one sample, or the model's fixed batch) with the run's threads. The float
    model is not timed when its weights stay on disk (onnxruntime would copy them all into
    memory). None, with a warning, where it cannot be checked: that costs this line, not the run."""
    feeds = next(batches(ctx.feeds, fixed_batch_size(ctx.model) or 1))
    reference = None if weights.on_disk(ctx.original) else ctx.original.SerializeToString()
    try:
        return check_runtime(path, feeds, reference, torch.get_num_threads() if ctx.device.type == "cpu" else 0)
    except Exception as err:  # noqa: BLE001 - e.g. an optimized graph onnxruntime cannot save
        log.warning("runtime not checked: %s", str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
        return None
