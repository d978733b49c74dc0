"""Quality of a model against its float reference, or against labels, through onnxruntime.

What the end of every `quantize` run prints (on held-back calibration samples) and what
`onnxqlimit eval` measures. Unlike the parity check (parity.py: does the file compute what
the tuned mirror computed?), this answers the user's question: did accuracy survive?
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx

from .data import batches, fixed_batch_size
from .parity import ort_session


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


def _is_classifier(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.shape[1] > 1 and array.dtype.kind == "f"


def compare(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None = None,
            labels: np.ndarray | None = None) -> list[OutputQuality]:
    rows = []
    for i, (name, out) in enumerate(outputs.items()):
        row = OutputQuality(name)
        ref = reference.get(name) if reference is not None else None
        if ref is not None and ref.shape == out.shape and out.dtype.kind == "f":
            row.sqnr_db = sqnr_db(out, ref)
            if _is_classifier(out):
                row.top1_agreement = float(np.mean(out.argmax(1) == ref.argmax(1)))
        if labels is not None and i == 0 and _is_classifier(out) and len(labels) == len(out):
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
