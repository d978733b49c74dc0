"""The metric behind `--target-metric`: how much of the float model's quality a plan keeps.

Without labels it is agreement with the float model, per output, and the worst output
counts: class outputs (probabilities along the last axis, or N x classes logits) score
the fraction of positions whose top-1 class matches the float model's; any other output
scores 1 - noise / signal (so 0.99 means an SQNR of 20 dB). With labels (`--eval` with a
`labels` array) it is top-1 accuracy of the first class output, as a fraction of the
float model's accuracy on the same data.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..recon.fisher import output_kind


def _class_axis(kind: str) -> int:
    return -1 if kind == "probabilities" else 1


def output_score(reference: torch.Tensor, output: torch.Tensor) -> float:
    ref, out = reference.float(), output.float()
    kind = output_kind(ref)
    if kind == "values":
        signal = float(ref.double().pow(2).sum())
        noise = float((out.double() - ref.double()).pow(2).sum())
        return max(0.0, 1.0 - noise / signal) if signal > 0 else float(noise == 0)
    axis = _class_axis(kind)
    return float((ref.argmax(axis) == out.argmax(axis)).float().mean())


def agreement(reference: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> float:
    scores = [output_score(reference[k], outputs[k]) for k in reference if reference[k].is_floating_point()]
    return min(scores) if scores else 1.0


def accuracy(outputs: Mapping[str, torch.Tensor], labels: np.ndarray) -> float:
    for value in outputs.values():
        kind = output_kind(value) if value.is_floating_point() else "values"
        if kind != "values":
            predicted = value.float().argmax(_class_axis(kind)).cpu().numpy()
            return float((predicted.reshape(-1) == np.asarray(labels).reshape(-1)).mean())
    raise ValueError("labelled evaluation needs a class output (probabilities or N x classes logits)")


def relative_score(reference: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor],
                   labels: np.ndarray | None) -> float:
    """The fraction of the float model's metric that `outputs` keep."""
    if labels is None:
        return agreement(reference, outputs)
    return accuracy(outputs, labels) / max(accuracy(reference, labels), 1e-12)
