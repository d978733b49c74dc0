"""Quality of a model against its float reference, or against labels, through onnxruntime.

What the end of every `quantize` run prints (on held-back calibration samples) and what
`onnxqlimit eval` measures. Unlike the parity check (parity.py: does the file compute what
the tuned mirror computed?), this answers the user's question: did accuracy survive?
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
import onnx
import torch

from . import weights
from .data import batches, fixed_batch_size
from .mirror import Mirror
from .mixed.config import EvalData
from .mixed.metric import relative_score
from .parity import ort_session
from .quant.fake_quant import quantizers_disabled
from .recon.fisher import task_loss

log = logging.getLogger("onnxqlimit")


@dataclass
class OutputQuality:
    name: str
    sqnr_db: float | None = None  # 10 log10(sum ref^2 / sum (out - ref)^2); None without a reference
    top1_agreement: float | None = None  # classifier-shaped outputs [N, C>1]: argmax unchanged
    accuracy: float | None = None  # argmax against labels, when given


def run(model: onnx.ModelProto | str, feeds: Mapping[str, np.ndarray], batch_size: int = 32,
        optimize: bool = True) -> dict[str, np.ndarray]:
    """All outputs of `model` over the samples in `feeds`, batch by batch."""
    session = ort_session(model, optimize=optimize)
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(model, load_external_data=False)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in batches(feeds, fixed_batch_size(proto) or batch_size):
        for name, value in zip(names, session.run(names, {k: v for k, v in batch.items() if k in wanted})):
            parts[name].append(value)
    return {n: np.concatenate(v) if v[0].ndim else np.stack(v) for n, v in parts.items()}


def sqnr_db(out: np.ndarray, ref: np.ndarray) -> float:
    noise = float(np.sum((out.astype(np.float64) - ref) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def is_class_output(array: np.ndarray) -> bool:
    """Scores over classes, where top-1 agreement means something: [N, C > 1] float rows that
    are probabilities, or logits - which go negative, unlike coordinates, boxes and most
    regression heads (a face-landmark output is [N, 2K] of non-negative coordinates), and are
    not unit-length, unlike normalised embeddings."""
    if array.ndim != 2 or array.shape[1] < 2 or array.dtype.kind != "f" or not len(array):
        return False
    rows = array.astype(np.float64)
    if rows.min() >= 0 and rows.max() <= 1 and np.allclose(rows.sum(1), 1, atol=1e-3):
        return True
    return bool(rows.min() < 0) and not np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-3)


def compare(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None = None,
            labels: np.ndarray | None = None) -> list[OutputQuality]:
    rows = []
    for i, (name, out) in enumerate(outputs.items()):
        row = OutputQuality(name)
        ref = reference.get(name) if reference is not None else None
        if ref is not None and ref.shape == out.shape and out.dtype.kind == "f":
            row.sqnr_db = sqnr_db(out, ref)
            if is_class_output(ref):
                row.top1_agreement = float(np.mean(out.argmax(1) == ref.argmax(1)))
        if labels is not None and i == 0 and out.ndim == 2 and out.shape[1] > 1 and len(labels) == len(out):
            row.accuracy = float(np.mean(out.argmax(1) == np.asarray(labels).reshape(-1)))
        rows.append(row)
    return rows


def format_quality(rows: list[OutputQuality]) -> str:
    parts = []
    for r in rows:
        bits = []
        if r.sqnr_db is not None:
            bits.append(f"SQNR {r.sqnr_db:.1f} dB")
        if r.top1_agreement is not None:
            bits.append(f"top-1 agreement {r.top1_agreement:.2%}")
        if r.accuracy is not None:
            bits.append(f"accuracy {r.accuracy:.2%}")
        parts.append(f"{r.name}: {', '.join(bits) or 'not comparable'}")
    return "; ".join(parts)


def mirror_outputs(mirror: Mirror, quantizers, feeds: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """The float model's outputs, computed by the mirror with every quantizer off."""
    parts: dict[str, list[np.ndarray]] = {}
    with torch.no_grad(), quantizers_disabled(quantizers):
        for batch in batches(feeds, batch_size):
            for name, value in mirror.run(batch).items():
                parts.setdefault(name, []).append(value.cpu().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def quality(original: onnx.ModelProto, qmodel: str, mirror: Mirror, quantizers, feeds: Mapping[str, np.ndarray],
            batch_size: int, held_back: bool) -> dict | None:
    """The end-of-run quality: float model vs the exported file on `feeds`, both run by
    onnxruntime; but onnxruntime copies every weight of a model into memory, so for a float
    model kept on disk the float mirror (equal to it within the parity tolerance) stands in.
    None, with a warning, where it cannot be measured: that costs this line, not the run."""
    try:
        in_mirror = weights.on_disk(original)
        reference = mirror_outputs(mirror, quantizers, feeds, batch_size) if in_mirror else \
            run(original, feeds, batch_size)
        outputs = run(qmodel, feeds, batch_size)
        rows = compare(outputs, reference)
    except Exception as err:  # noqa: BLE001 - e.g. a float model onnxruntime cannot run
        log.warning("quality not measured: %s", str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
        return None
    samples = len(next(iter(feeds.values())))
    # The label-free task loss the mixed-precision search predicts (fisher.task_loss), per sample
    loss = sum(float(task_loss(torch.from_numpy(reference[k]), torch.from_numpy(outputs[k])))
               for k in reference if np.issubdtype(reference[k].dtype, np.floating))
    return {"samples": samples, "outputs": [asdict(r) for r in rows], "task_loss": loss / max(samples, 1),
            "reference": "float mirror" if in_mirror else "float model", "held_back": held_back}


def file_metric(qmodel, mirror: Mirror, quantizers, data: EvalData, batch_size: int) -> float:
    """The --target-metric score of the exported file, run by onnxruntime, against the float mirror."""
    outputs = run(str(qmodel), data.feeds, batch_size, optimize=False)
    reference = mirror_outputs(mirror, quantizers, data.feeds, batch_size)
    return relative_score({k: torch.from_numpy(v) for k, v in reference.items()},
                          {k: torch.from_numpy(outputs[k]) for k in reference}, data.labels)
