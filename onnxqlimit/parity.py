"""Mirror-vs-onnxruntime comparison: the check that what we compute is what ships.

Two uses: the float mirror against the user's original file (tolerance 1e-4 of each
output's magnitude), and the quantized mirror against the exported QDQ file: there every
activation quantizer must produce onnxruntime's integers from onnxruntime's own input
(check_integers), and the outputs must not drift grossly (ties compound; see below).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .data import batches, fixed_batch_size
from .errors import QLimitError
from .graph import all_graphs, subgraphs
from .mirror import Mirror
from .runtime import Session
from .weights import on_disk

# Relative to the largest reference magnitude of each output: float32 summation order
# differences between torch and onnxruntime stay ~1e-6 of that on real models.
DEFAULT_TOLERANCE = 1e-4
# Quantized parity, end to end. A rounding tie decided differently (torch and onnxruntime
# sum in different orders) flips one activation integer, and flips compound layer by
# layer: on PP-OCR cls at W8A8 none differ in the first 35 quantizers and 8% in the last,
# moving one near-tie softmax output by 0.008; on a random-weight ResNet-18 40% differ by
# its last block. So outputs are reported (max, mean, share within one step of range/255)
# but only gross divergence fails here: the typical sample's (the median's) mean |diff| above
# 1% of the output's scale. The median, because one near-tie sample may flip its decision
# (PP-OCR cls at W4A4 on 8 samples: one 2-class softmax moved 0.12, the mean over all 1.5%),
# while a wrong scale moves every sample. The exact test is check_integers below.
QUANTIZED_MAX_MEAN_DIFF = 0.01
# Share of activation integers allowed to differ when onnxruntime's QuantizeLinear and the
# mirror's quantizer see the same float input: both divide in IEEE float32 and round half
# to even, so this is exact in practice; a wrong scale, zero point or clamp moves most.
MAX_INTEGER_FLIPS = 1e-4
INTEGER_CHECK_SAMPLES = 2  # samples for check_integers: every activation of the model is held at once


@dataclass
class OutputParity:
    name: str
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_ref: float
    ref_range: float  # max(range, max|ref|) of the reference output
    within_step: float  # share of elements with |diff| <= ref_range / 255
    tolerance: float = DEFAULT_TOLERANCE
    typical_abs_diff: float | None = None  # the median over samples of each sample's mean |diff|

    @property
    def relative_error(self) -> float:
        return self.max_abs_diff / self.max_abs_ref if self.max_abs_ref > 0 else self.max_abs_diff

    @property
    def ok(self) -> bool:
        return self.relative_error <= self.tolerance

    @property
    def ok_quantized(self) -> bool:
        typical = self.mean_abs_diff if self.typical_abs_diff is None else self.typical_abs_diff
        return typical <= QUANTIZED_MAX_MEAN_DIFF * (self.ref_range or 1.0)


def ort_session(model: onnx.ModelProto | str | bytes, optimize: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:  # compare against the graph as written, not onnxruntime's rewrite of it
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, onnx.ModelProto) and on_disk(model):
        raise ValueError("a model whose weights are on disk runs from its file: pass the path")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return Session(source, options, providers=["CPUExecutionProvider"])


def check_mirror(reference: onnx.ModelProto | str, mirror: Mirror, feeds: Mapping[str, np.ndarray],
                 batch_size: int = 8, tolerance: float = DEFAULT_TOLERANCE, optimize: bool = False) -> list[OutputParity]:
    """Run `reference` in onnxruntime and `mirror` in torch on the same inputs; compare outputs."""
    session = ort_session(reference, optimize)
    names = [o.name for o in session.get_outputs()]
    model = reference if isinstance(reference, onnx.ModelProto) else onnx.load(reference, load_external_data=False)
    batch_size = fixed_batch_size(model) or batch_size
    refs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    diffs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    per_sample: dict[str, list[np.ndarray]] = {n: [] for n in names}
    with torch.no_grad():
        for batch in batches(feeds, batch_size):
            expected = session.run(names, batch)
            actual = mirror.run(batch, names)
            for name, ref in zip(names, expected):
                got = actual[name].detach().cpu().numpy()
                if got.shape != ref.shape:
                    raise AssertionError(f"output '{name}': mirror shape {got.shape} != onnxruntime {ref.shape}")
                ref64 = ref.astype(np.float64).reshape(-1)
                refs[name].append(ref64)
                diffs[name].append(np.abs(ref64 - got.astype(np.float64).reshape(-1)))
                samples = len(next(iter(batch.values())))  # an output without a batch axis is one sample
                per_sample[name].append(diffs[name][-1].reshape(samples if ref.ndim and ref.shape[0] == samples else 1, -1)
                                        .mean(axis=1) if ref.size else np.zeros(0))
    rows = []
    for name in names:
        ref, diff = np.concatenate(refs[name]), np.concatenate(diffs[name])
        if ref.size == 0:
            rows.append(OutputParity(name, 0.0, 0.0, 0.0, 0.0, 1.0, tolerance))
            continue
        # The output's scale: its range, or its magnitude when all samples agree closely
        # (two-class softmax on similar inputs spans 0.01 yet lives on [0, 1]).
        span = max(float(ref.max() - ref.min()), float(np.abs(ref).max()))
        rows.append(OutputParity(name, float(diff.max()), float(diff.mean()), float(np.abs(ref).max()), span,
                                 float(np.mean(diff <= span / 255)), tolerance,
                                 float(np.median(np.concatenate(per_sample[name])))))
    return rows


def format_parity(rows: list[OutputParity], quantized: bool = False) -> str:
    if quantized:
        lines = [f"{'output':<32} {'max|diff|/range':>16} {'mean|diff|/range':>17} {'within 1 step':>14}  ok"]
        for r in rows:
            span = r.ref_range or 1.0
            lines.append(f"{r.name:<32} {r.max_abs_diff / span:>16.2e} {r.mean_abs_diff / span:>17.2e} "
                         f"{r.within_step:>13.4%}  {'yes' if r.ok_quantized else 'NO'}")
        return "\n".join(lines)
    lines = [f"{'output':<32} {'max|diff|':>11} {'max|ref|':>11} {'rel':>10}  ok"]
    for r in rows:
        lines.append(f"{r.name:<32} {r.max_abs_diff:>11.3e} {r.max_abs_ref:>11.3e} {r.relative_error:>10.2e}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)


@dataclass
class IntegerParity:
    elements: int
    flipped: float  # share of activation integers that differ
    beyond_one_level: float  # share that differ by more than one level

    @property
    def ok(self) -> bool:
        return self.flipped <= MAX_INTEGER_FLIPS


def check_integers(qmodel: Path, quantizers: Mapping, tensors: list[str],
                   feeds: Mapping[str, np.ndarray]) -> IntegerParity:
    """Feed each activation quantizer the float tensor onnxruntime computed, and compare its
    integers with those of onnxruntime's QuantizeLinear: a test of scales, zero points,
    clamps and rounding that upstream summation-order differences cannot blur.
    `qmodel` is the written file; it is probed from a copy beside it (so external data resolves)
    that also outputs every quantized tensor."""
    probe = onnx.load(str(qmodel), load_external_data=False)
    existing = {o.name for o in probe.graph.output}
    names = []
    # export names each activation's DequantizeLinear output <tensor>_dequantized; the
    # integers themselves cannot be fetched (onnxruntime has no numpy type for int4/int2)
    for name in tensors:
        names += [name, f"{name}_dequantized"]
    carried = _carry_out(probe.graph, set(names), _elem_types(probe.graph))
    outputs = [carried.get(name, name) for name in names]
    for name in outputs:
        if name not in existing:
            probe.graph.output.add(name=name)
    probe_path = Path(qmodel).with_name(f".{Path(qmodel).name}.probe.onnx")
    onnx.save(probe, str(probe_path))
    try:
        session = ort_session(str(probe_path))
    finally:
        probe_path.unlink(missing_ok=True)
    values = dict(zip(names, session.run(outputs, dict(feeds))))
    total = flipped = beyond = 0
    with torch.no_grad():
        for name in tensors:
            q = quantizers[name]
            x = torch.from_numpy(values[name]).to(q.scale.device)
            ints = q.quantize(x)
            dequantized = torch.from_numpy(values[f"{name}_dequantized"]).to(q.scale.device)
            theirs = torch.round(dequantized / q.scale.reshape(()) + q.zero_point.reshape(()))
            diff = (ints - theirs).abs().cpu().numpy()
            total += diff.size
            flipped += int((diff > 0).sum())
            beyond += int((diff > 1).sum())
    return IntegerParity(total, flipped / max(total, 1), beyond / max(total, 1))


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for g in all_graphs(graph)
            for v in [*g.value_info, *g.input, *g.output]}


def _carry_out(graph: onnx.GraphProto, names: set[str], types: dict[str, int]) -> dict[str, str]:
    """For each of `names` computed inside a subgraph of `graph`'s nodes: the tensor of
    `graph` that now carries it out, the subgraph and its node given one more output each
    (a Loop or Scan body's becomes a scan output, stacked over iterations; an If branch that
    does not compute it returns an empty tensor). In place; `graph`'s own tensors are left out."""
    carried: dict[str, str] = {}
    for node in graph.node:
        subs = subgraphs(node)
        if not subs:
            continue
        inside = []
        for sub in subs:
            own = {o for n in sub.node for o in n.output} | {v.name for v in sub.input}
            inside.append({**{n: n for n in names if n in own}, **_carry_out(sub, names, types)})
        for name in sorted(set().union(*inside) - set(carried)):
            out = f"{name}_carried_by_{node.name or node.op_type}"
            elem = types.get(name, onnx.TensorProto.FLOAT)
            for sub, found in zip(subs, inside):
                value = f"{out}_value"  # a copy: onnxruntime returns nothing for a tensor output twice
                if name in found:
                    sub.node.append(onnx.helper.make_node("Identity", [found[name]], [value]))
                else:  # the other branch of an If
                    empty = onnx.helper.make_tensor(value, elem, [0], [])
                    sub.node.append(onnx.helper.make_node("Constant", [], [value], value=empty))
                sub.output.append(onnx.helper.make_tensor_value_info(value, elem, None))
            for attr in node.attribute:  # Scan: one more scan output, along axis 0, forward
                if attr.name in ("scan_output_axes", "scan_output_directions"):
                    attr.ints.append(0)
            node.output.append(out)
            carried[name] = out
    return carried


def check_file(path: Path, mirror: Mirror, state, feeds: Mapping[str, np.ndarray], fixed_batch: int | None,
               batch_size: int) -> tuple[list[OutputParity], IntegerParity]:
    """The written file in onnxruntime against the quantized mirror: outputs, and every
    activation quantizer's integers; a file that fails is never moved into place."""
    parity = check_mirror(str(path), mirror, feeds, batch_size=batch_size)
    # A couple of samples: every activation of the model is held at once for this check.
    acts = [p.tensor for p in state.points if p.kind == "activation" and not p.spec.is_float]
    flips = check_integers(path, state.quantizers, acts, next(batches(feeds, fixed_batch or INTEGER_CHECK_SAMPLES)))
    if not (all(r.ok_quantized for r in parity) and flips.ok):
        raise QLimitError("exported model does not reproduce the quantized mirror in onnxruntime "
                          f"({flips.flipped:.2%} of activation integers differ):\n" + format_parity(parity, quantized=True))
    return parity, flips
