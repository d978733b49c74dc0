"""The pipeline, in one screen: load -> mirror -> calibrate -> mixed precision -> reconstruct -> export -> validate.

The bit plan is chosen before reconstruction: learned rounding is tied to a width.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch

from . import weights
from .calibrate import attach_quantizers, calibrate, set_enabled
from .data import batches, calibration_feeds, conform, fixed_batch_size, graph_inputs, load_npz, parse_preprocess
from .errors import QLimitError
from .evaluate import compare
from .evaluate import run as run_model
from .export import export_qdq, required_opset
from .load import LoadConfig, load_model, read_model, uses_external_data
from .mirror import Mirror
from .mixed.costs import CostModel, file_costs
from .mixed.metric import relative_score
from .mixed.search import EvalData, MixedConfig, SearchResult, result_json, search
from .output import StagedOutput, check_output
from .parity import check_integers, check_mirror, format_parity
from .quant.bits import BitPlan, plan_widths, read_plan_file
from .quant.policy import QuantConfig, place
from .quant.reach import last_layers
from .recon import METHODS, PRESETS, ReconConfig, reconstruct
from .recon.checkpoint import Checkpoints, run_key
from .report import build_report
from .smooth import candidates, channel_max, smooth
from .state import QuantState

log = logging.getLogger("onnxqlimit")

INTEGER_CHECK_SAMPLES = 2
HOLD_BACK = 32  # calibration-source samples past --calib-size kept for the end-of-run quality
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_THREADS_AT_IMPORT = torch.get_num_threads()


@dataclass
class RunOptions:
    method: str = "qdrop"  # rtn | adaround | brecq | qdrop
    preset: str = "fast"  # fast | paper: the four settings below, unless given
    calib_size: int | None = None
    batch_size: int | None = None
    iters: int | None = None  # per block
    lr_round: float | None = None  # AdaRound learning rate
    recon: ReconConfig = field(default_factory=ReconConfig)  # granularity, loss, QDrop, AdaRound, learning rates
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch CPU threads; default: the user's own setting, else every core
    simplify: bool = True
    overwrite: bool = False  # allow the output path to be the input model's own file
    preprocess: str | None = None  # for image-folder calibration
    parity_samples: int = 32
    progress: bool = True
    mixed: MixedConfig = field(default_factory=MixedConfig)  # a search runs when its targets are set
    bits_plan: str | None = None  # a JSON plan (node -> {wbits, abits}) to quantize with
    save_plan: str | None = None  # write the plan used here
    eval_data: str | None = None  # .npz (model inputs, optional `labels`) for --target-metric
    work_dir: str | None = None  # checkpoints of finished blocks (recon/checkpoint.py); None: none kept
    resume: bool = False  # restore the blocks an interrupted run of the same inputs saved in work_dir


@dataclass
class QuantizeResult:
    output_path: Path
    report: dict = field(default_factory=dict)


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
        return _quantize(model, output_path, calibration, config or QuantConfig(), options, device)
    finally:
        torch.set_num_threads(before)


def _quantize(model, output_path, calibration, config: QuantConfig, options: RunOptions,
              device: torch.device) -> QuantizeResult:
    if options.method not in METHODS:
        raise QLimitError(f"--method {options.method!r} is not available (choose from {', '.join(METHODS)})")
    if options.preset not in PRESETS:
        raise QLimitError(f"--preset must be one of {', '.join(PRESETS)} (got {options.preset!r})")
    if options.preprocess is not None:
        parse_preprocess(options.preprocess)  # a typo is refused before the model loads, folder or not
    preset = PRESETS[options.preset]
    calib_size, batch_size = options.calib_size or preset.calib_size, options.batch_size or preset.batch_size
    recon = replace(options.recon, method=options.method, iters=options.iters or preset.iters, batch_size=batch_size,
                    lr_round=options.lr_round or preset.lr_round, seed=options.seed, progress=options.progress,
                    early_stop=options.recon.early_stop and preset.early_stop)
    started = time.perf_counter()
    torch.manual_seed(options.seed)

    searching = options.mixed.targets.any()
    plan_entries = read_plan_file(options.bits_plan) if options.bits_plan else None
    if searching and plan_entries is not None:
        raise QLimitError("--bits-plan fixes every width; it cannot be combined with a --target-* search")
    check_output(model, Path(output_path), options.overwrite)
    original = read_model(model)
    widths = config.all_bits() | plan_widths(plan_entries or {})  # every width the file may hold
    if searching:
        widths |= set(options.mixed.sensitivity.wbits_choices) | set(options.mixed.sensitivity.abits_choices)
    loaded = load_model(original, LoadConfig(simplify=options.simplify, min_opset=required_opset(widths)))
    mirror = Mirror(loaded).to(device)
    feeds = conform(calibration_feeds(calibration, mirror.input_names, calib_size + HOLD_BACK, options.preprocess),
                    loaded)
    # Samples past calib_size are held back: the end-of-run quality is measured on data the
    # run never tuned on (when the source has no more, on the calibration samples, said so).
    held_back = {k: v[calib_size:] for k, v in feeds.items()}
    feeds = {k: v[:calib_size] for k, v in feeds.items()}
    eval_data = _eval_data(options.eval_data, loaded) if options.eval_data else None
    if config.smooth is not None:  # outlier channels migrated into the float weights (smooth.py)
        act_max = channel_max(mirror, batches(feeds, batch_size), list(candidates(loaded)))
        loaded = smooth(loaded, act_max, config.smooth)
        mirror = Mirror(loaded).to(device)

    # The last layers, element by element (reach.py), on one sample (or the model's fixed batch).
    last = last_layers(mirror, next(batches(feeds, fixed_batch_size(loaded) or 1))) if config.first_last_bits else None
    points = place(loaded, config, last)
    if not points:
        raise QLimitError("nothing to quantize: the model has no Conv/ConvTranspose/Gemm/MatMul with float weights")
    quantizers = attach_quantizers(mirror, points)
    calib_batches = list(batches(feeds, batch_size))
    state = QuantState(points, quantizers, calibrate(mirror, points, quantizers, calib_batches, config, options.progress))
    searched: SearchResult | None = None
    if plan_entries is not None or searching:
        default = state.plan
        if plan_entries is not None:
            state.apply(BitPlan.from_nodes(plan_entries, points))
        else:
            settings = {k: v for k, v in asdict(config).items() if k not in ("wbits", "abits")}
            searched = search(mirror, loaded, state, feeds, options.mixed, recon.block_config, settings, eval_data,
                              options.progress)
            state.apply(searched.plan)
        if state.plan != default:  # activation ranges follow the weights' new widths
            state.calibration = calibrate(mirror, points, quantizers, calib_batches, config, options.progress)
    checkpoints = None
    if options.work_dir is not None and recon.method != "rtn":
        settings = {"config": asdict(config), "plan": state.plan.to_nodes(points), "device": device.type,
                    "threads": torch.get_num_threads(), "recon": {k: v for k, v in asdict(recon).items() if k != "progress"}}
        checkpoints = Checkpoints(Path(options.work_dir), run_key(weights.identity(original), feeds, settings),
                                  options.resume)
    tuning = reconstruct(mirror, loaded, state, feeds, recon, checkpoints) if recon.method != "rtn" else None

    parity_feeds = {k: v[: options.parity_samples] for k, v in feeds.items()}
    act_tensors = [p.tensor for p in points if p.kind == "activation"]
    output_path = Path(output_path)
    held = len(next(iter(held_back.values())))
    with StagedOutput(output_path) as staged:  # validated as written, then moved into place
        # A model kept on disk has its integer weights written out as they are made.
        qmodel = export_qdq(loaded, mirror, state, staged.store if weights.on_disk(loaded) else None)
        qmodel = staged.write(qmodel, external_data=uses_external_data(model))
        written = staged.path
        parity, flips = _check_file(written, mirror, quantizers, act_tensors, parity_feeds,
                                    fixed_batch_size(loaded), batch_size)
        costs = file_costs(qmodel, CostModel(loaded, mirror, points, state.quantizers, feeds), state.plan)
        if searched is not None and "latency_ms" in searched.costs:  # a table estimate; the file's own time is measured
            from .mixed.latency import model_latency_ms

            costs["latency_ms"] = searched.costs["latency_ms"]
            costs["measured_latency_ms"] = model_latency_ms(str(written), {k: v[:1] for k, v in feeds.items()},
                                                            threads=options.mixed.latency_threads)
        budgets = options.mixed.targets.budgets()
        over = [name for name, limit in budgets.items() if costs[name] > limit * (1 + 1e-9)]
        if over:  # the search guarantees the budgets: reaching here is a bug, never a shipped file
            raise RuntimeError(f"exported file exceeds its budget: {', '.join(f'{n} {costs[n]:.6g} > {budgets[n]:.6g}' for n in over)}")
        try:  # measured before the move, while an input that --overwrite replaces is still there
            quality = {**_quality(original, str(written), mirror, quantizers, held_back if held else parity_feeds,
                                  batch_size), "held_back": bool(held)}
        except Exception as err:  # noqa: BLE001 - a float model onnxruntime cannot run costs this line, not the run
            log.warning("quality not measured: %s", str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
            quality = None
        staged.commit()
    if checkpoints is not None:
        checkpoints.finish()
    if options.save_plan:
        state.plan.save(options.save_plan, points)
    report = build_report(original, qmodel, output_path, mirror, state, parity_feeds, parity,
                          config, {**asdict(options), "calib_size": len(next(iter(feeds.values()))),
                                   "calib_size_limit": calib_size, "batch_size": batch_size,
                                   "recon": asdict(recon)}, time.perf_counter() - started)
    report["integer_parity"] = asdict(flips)
    report["quality"] = quality
    report["threads"] = torch.get_num_threads() if device.type == "cpu" else None
    report["reconstruction"] = asdict(tuning) if tuning is not None else None
    report["costs"] = costs
    report["plan"] = state.plan.to_nodes(points)
    report["mixed_precision"] = result_json(searched, points) if searched is not None else None
    if options.mixed.targets.metric is not None:
        report["metric"] = _file_metric(output_path, mirror, state, eval_data or EvalData(feeds), batch_size)
    return QuantizeResult(output_path, report)


def _eval_data(path: str, model: onnx.ModelProto) -> EvalData:
    """`--eval DATA.npz`: model inputs by name, and optionally `labels` (one per sample)."""
    feeds = conform(load_npz(path, [v.name for v in graph_inputs(model)]), model, f"{path}:")
    with np.load(path, allow_pickle=False) as data:
        labels = np.asarray(data["labels"]) if "labels" in data.files else None
    if labels is not None and len(labels) != len(next(iter(feeds.values()))):
        raise QLimitError(f"{path}: 'labels' must hold one label per sample")
    return EvalData(feeds, labels)


def _check_file(path: Path, mirror: Mirror, quantizers, act_tensors: list[str], feeds: dict[str, np.ndarray],
                fixed_batch: int | None, batch_size: int):
    """The written file in onnxruntime against the quantized mirror: outputs, and every
    activation quantizer's integers (parity.py); a file that fails is never moved into place."""
    parity = check_mirror(str(path), mirror, feeds, batch_size=batch_size)
    # A couple of samples: every activation of the model is held at once for this check.
    flips = check_integers(path, quantizers, act_tensors, next(batches(feeds, fixed_batch or INTEGER_CHECK_SAMPLES)))
    if not (all(r.ok_quantized for r in parity) and flips.ok):
        raise QLimitError("exported model does not reproduce the quantized mirror in onnxruntime "
                          f"({flips.flipped:.2%} of activation integers differ):\n" + format_parity(parity, quantized=True))
    return parity, flips


def _quality(original: onnx.ModelProto, qmodel: str, mirror: Mirror, quantizers,
             feeds: dict[str, np.ndarray], batch_size: int) -> dict:
    """Float model vs the exported file on `feeds` (evaluate.py), both run by onnxruntime;
    but onnxruntime copies every weight of a model into memory, so for a float model kept
    on disk the float mirror (equal to it within the parity tolerance) stands in."""
    in_mirror = weights.on_disk(original)
    reference = _float_outputs(mirror, quantizers, feeds, batch_size) if in_mirror else \
        run_model(original, feeds, batch_size)
    rows = compare(run_model(qmodel, feeds, batch_size), reference)
    return {"samples": len(next(iter(feeds.values()))), "outputs": [asdict(r) for r in rows],
            "reference": "float mirror" if in_mirror else "float model"}


def _float_outputs(mirror: Mirror, quantizers, feeds: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """The float model's outputs, computed by the mirror with every quantizer off."""
    parts: dict[str, list[np.ndarray]] = {}
    set_enabled(quantizers, False)
    try:
        with torch.no_grad():
            for batch in batches(feeds, batch_size):
                for name, value in mirror.run(batch).items():
                    parts.setdefault(name, []).append(value.cpu().numpy())
    finally:
        set_enabled(quantizers, True)
    return {name: np.concatenate(values) for name, values in parts.items()}


def _file_metric(qmodel: Path, mirror: Mirror, state: QuantState, data: EvalData, batch_size: int) -> float:
    """The --target-metric score of the exported file, run by onnxruntime, against the float mirror."""
    outputs = run_model(str(qmodel), data.feeds, batch_size, optimize=False)
    reference = _float_outputs(mirror, state.quantizers, data.feeds, batch_size)
    return relative_score({k: torch.from_numpy(v) for k, v in reference.items()},
                          {k: torch.from_numpy(outputs[k]) for k in reference}, data.labels)


def write_report(report: dict, path) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=_jsonable))


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)
