"""Mirror-vs-onnxruntime comparison: the check that what we compute is what ships."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .data import batches, fixed_batch_size
from .mirror import Mirror

# Relative to the largest reference magnitude of each output: float32 summation order
# differences between torch and onnxruntime stay ~1e-6 of that on real models.
DEFAULT_TOLERANCE = 1e-4


@dataclass
class OutputParity:
    name: str
    max_abs_diff: float
    max_abs_ref: float
    tolerance: float

    @property
    def relative_error(self) -> float:
        return self.max_abs_diff / self.max_abs_ref if self.max_abs_ref > 0 else self.max_abs_diff

    @property
    def ok(self) -> bool:
        return self.relative_error <= self.tolerance


def ort_session(model: onnx.ModelProto | str, optimize: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:  # compare against the graph as written, not onnxruntime's rewrite of it
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def check_mirror(reference: onnx.ModelProto | str, mirror: Mirror, feeds: Mapping[str, np.ndarray],
                 batch_size: int = 8, tolerance: float = DEFAULT_TOLERANCE) -> list[OutputParity]:
    """Run `reference` in onnxruntime and `mirror` in torch on the same inputs; compare outputs."""
    session = ort_session(reference)
    names = [o.name for o in session.get_outputs()]
    model = reference if isinstance(reference, onnx.ModelProto) else onnx.load(reference, load_external_data=False)
    batch_size = fixed_batch_size(model) or batch_size
    diff = {n: 0.0 for n in names}
    peak = {n: 0.0 for n in names}
    with torch.no_grad():
        for batch in batches(feeds, batch_size):
            expected = session.run(names, batch)
            actual = mirror.run(batch, names)
            for name, ref in zip(names, expected):
                got = actual[name].detach().cpu().numpy()
                if got.shape != ref.shape:
                    raise AssertionError(f"output '{name}': mirror shape {got.shape} != onnxruntime {ref.shape}")
                ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
                if ref64.size:
                    diff[name] = max(diff[name], float(np.abs(ref64 - got64).max()))
                    peak[name] = max(peak[name], float(np.abs(ref64).max()))
    return [OutputParity(n, diff[n], peak[n], tolerance) for n in names]


def format_parity(rows: list[OutputParity]) -> str:
    lines = [f"{'output':<32} {'max|diff|':>11} {'max|ref|':>11} {'rel':>10}  ok"]
    for r in rows:
        lines.append(f"{r.name:<32} {r.max_abs_diff:>11.3e} {r.max_abs_ref:>11.3e} {r.relative_error:>10.2e}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
