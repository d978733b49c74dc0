"""The pipeline, in one screen: load -> mirror -> calibrate -> reconstruct -> export -> validate."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch

from .calibrate import attach_quantizers, calibrate
from .data import batches, calibration_feeds, fixed_batch_size
from .errors import QLimitError
from .export import export_qdq, required_opset
from .load import LoadConfig, load_model, read_model
from .mirror import Mirror
from .parity import check_integers, check_mirror, format_parity
from .quant.policy import QuantConfig, plan
from .reconstruct import METHODS, PRESETS, ReconConfig, reconstruct
from .report import build_report

log = logging.getLogger("onnxqlimit")

INTEGER_CHECK_SAMPLES = 2


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
    simplify: bool = True
    preprocess: str | None = None  # for image-folder calibration
    parity_samples: int = 32
    progress: bool = True


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


def quantize(model, output_path, calibration, config: QuantConfig | None = None,
             options: RunOptions | None = None) -> QuantizeResult:
    """Quantize `model` (path or ModelProto) with `calibration` (.npz path, image folder,
    dict of arrays or an onnxruntime CalibrationDataReader) and write a QDQ model."""
    config, options = config or QuantConfig(), options or RunOptions()
    if options.method not in METHODS:
        raise QLimitError(f"--method {options.method!r} is not available (choose from {', '.join(METHODS)})")
    if options.preset not in PRESETS:
        raise QLimitError(f"--preset must be one of {', '.join(PRESETS)} (got {options.preset!r})")
    preset = PRESETS[options.preset]
    calib_size, batch_size = options.calib_size or preset.calib_size, options.batch_size or preset.batch_size
    recon = replace(options.recon, method=options.method, iters=options.iters or preset.iters, batch_size=batch_size,
                    lr_round=options.lr_round or preset.lr_round, seed=options.seed, progress=options.progress)
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    device = resolve_device(options.device)
    if device.type == "cpu":  # torch may start with fewer threads than the cores this process may use
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(torch.get_num_threads(), cores))

    original = read_model(model)
    loaded = load_model(original, LoadConfig(simplify=options.simplify, min_opset=required_opset(config.all_bits())))
    mirror = Mirror(loaded).to(device)
    feeds = calibration_feeds(calibration, mirror.input_names, calib_size, options.preprocess)
    calib_batches = list(batches(feeds, batch_size))

    points = plan(loaded, config)
    if not points:
        raise QLimitError("nothing to quantize: the model has no Conv/ConvTranspose/Gemm/MatMul with float weights")
    quantizers = attach_quantizers(mirror, points)
    calibrate(mirror, points, quantizers, calib_batches, config, progress=options.progress)
    tuning = reconstruct(mirror, loaded, points, quantizers, feeds, recon) if recon.method != "rtn" else None

    qmodel = export_qdq(loaded, mirror, points, quantizers)
    parity_feeds = {k: v[: options.parity_samples] for k, v in feeds.items()}
    parity = check_mirror(qmodel, mirror, parity_feeds, batch_size=batch_size)
    act_tensors = [p.tensor for p in points if p.kind == "activation"]
    # A couple of samples: every activation of the model is held at once for this check.
    flips = check_integers(qmodel, quantizers, act_tensors,
                           next(batches(parity_feeds, fixed_batch_size(loaded) or INTEGER_CHECK_SAMPLES)))
    if not (all(r.ok_quantized for r in parity) and flips.ok):
        raise QLimitError("exported model does not reproduce the quantized mirror in onnxruntime "
                          f"({flips.flipped:.2%} of activation integers differ):\n" + format_parity(parity, quantized=True))
    output_path = Path(output_path)
    save_atomically(qmodel, output_path)
    report = build_report(original, qmodel, output_path, mirror, points, quantizers, parity_feeds, parity,
                          config, {**asdict(options), "calib_size": calib_size, "batch_size": batch_size,
                                   "recon": asdict(recon)}, time.perf_counter() - started)
    report["integer_parity"] = asdict(flips)
    report["reconstruction"] = asdict(tuning) if tuning is not None else None
    return QuantizeResult(output_path, report)


def save_atomically(model: onnx.ModelProto, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: dict, path) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=_jsonable))


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)
