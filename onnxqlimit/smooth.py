"""SmoothQuant-style scale migration, folded into the float graph before quantizers attach.

Transformer activations carry a few channels tens of times larger than the rest (after
LayerNorm, after GELU), and one per-tensor activation scale must cover them. For an
activation X read by MatMul/Gemm layers with constant weights, per input channel j:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      X W = (X / s) (s W)

The layers' weights are multiplied by s (a change to float initializers) and X / s is
computed by one float Mul in front of them, so the quantizer sees the flatter X / s; other
readers of X (a residual Add) still read X. The exported file stays standard QDQ: the
Mul is an ordinary float op. Convolutions are left alone (their outliers are rare).

Smoothing moves error from the activation into the weights, so it helps only where the
activation limits (8-bit activations with outlier channels) and hurts where the weights do
(4-bit weights then hold the outliers). `choose_alphas` (the default, "auto") decides per
tensor: the layers' output error with X and W quantized as the run will quantize them,
at alpha 0 and on a grid; a tensor is smoothed only where its best alpha cuts that error
by a clear margin.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Iterable, Mapping

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .graph import topological_sort
from .mirror import Mirror
from .quant.config import QuantConfig
from .quant.fake_quant import FakeQuantize, QuantSpec
from .quant.observers import RangeObserver, weight_qparams
from .quant.policy import place
from .weights import array as tensor_array
from .weights import on_disk

log = logging.getLogger("onnxqlimit")

_SCALE_RANGE = (1e-4, 1e4)  # a dead channel must not blow a weight row up or to zero
ALPHAS = (0.5, 0.65, 0.8)  # the strengths "auto" tries beside 0 (off)
GAIN = 0.8  # "auto" smooths a tensor only where the layers' output error drops by a fifth or more
ROW_ELEMENTS = 1 << 20  # activation values kept per tensor for the decision (rows of its last axis)


def _weight_rows(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> int | None:
    """The axis of the constant weight that meets the activation's last axis, or None if
    the node is not activation @ constant weight."""
    if len(node.input) < 2 or node.input[1] not in inits or node.input[0] in inits:
        return None
    weight = inits[node.input[1]]
    if node.op_type == "MatMul" and len(weight.dims) == 2:
        return 0
    if node.op_type == "Gemm" and not any(a.name == "transA" and a.i for a in node.attribute):
        return 1 if any(a.name == "transB" and a.i for a in node.attribute) else 0
    return None


def candidates(model: onnx.ModelProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Activation tensor -> the (layer, weight axis) pairs that read it as their input A."""
    inits = {t.name: t for t in model.graph.initializer}
    found: dict[str, list] = defaultdict(list)
    for node in model.graph.node:
        axis = _weight_rows(node, inits)
        if axis is not None:
            found[node.input[0]].append((node, axis))
    return dict(found)


def channel_max(mirror: Mirror, batches: Iterable[Mapping[str, np.ndarray]], tensors: list[str]) -> dict[str, np.ndarray]:
    """Per last-axis channel, the largest |value| of each tensor over the calibration batches."""
    return _observe(mirror, batches, tensors, rows=False)[0]


def _observe(mirror: Mirror, batches: Iterable[Mapping[str, np.ndarray]], tensors: list[str], rows: bool):
    """(channel max, sampled rows) per tensor: the rows (None unless asked) are evenly spaced
    over each batch, at most ROW_ELEMENTS values per tensor over all batches."""
    batches = list(batches)
    peak: dict[str, torch.Tensor] = {}
    kept: dict[str, list[torch.Tensor]] = defaultdict(list)
    with torch.no_grad():
        for feeds in batches:
            env = mirror.execute(mirror.initial_env(feeds), keep=tensors)
            for name in tensors:
                value = env[name].reshape(-1, env[name].shape[-1]).float()
                top = value.abs().amax(0)
                peak[name] = torch.maximum(peak[name], top) if name in peak else top
                if rows:
                    quota = max(1, ROW_ELEMENTS // value.shape[1] // len(batches))
                    kept[name].append(value[:: max(1, -(-len(value) // quota))].cpu())
    return ({name: value.cpu().numpy() for name, value in peak.items()},
            {name: torch.cat(parts) for name, parts in kept.items()} if rows else None)


def _scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    scale = np.where((x_max > 0) & (w_max > 0), x_max.astype(np.float64) ** alpha
                     / np.maximum(w_max, 1e-12) ** (1 - alpha), 1.0)
    return np.clip(scale, *_SCALE_RANGE).astype(np.float32)


def _smoothable(model: onnx.ModelProto) -> dict[str, tuple[list[tuple[onnx.NodeProto, int]], list[np.ndarray]]]:
    """Candidate tensor -> (its layers, their float weights), where every weight is read by that
    layer alone (a shared weight cannot take one tensor's scales)."""
    inits = {t.name: t for t in model.graph.initializer}
    readers = defaultdict(int)
    for node in model.graph.node:
        for name in node.input:
            readers[name] += 1
    found = {}
    for tensor, layers in candidates(model).items():
        if any(readers[n.input[1]] > 1 or inits[n.input[1]].data_type != onnx.TensorProto.FLOAT for n, _ in layers):
            continue
        found[tensor] = (layers, [tensor_array(inits[n.input[1]]).astype(np.float32) for n, _ in layers])
    return found


def _weight_max(layers, weights) -> np.ndarray:
    """Per input channel of the activation, the largest |weight| over its layers."""
    return np.max([np.abs(w).max(axis=1 - axis) for w, (_, axis) in zip(weights, layers)], axis=0)


def smooth_model(model: onnx.ModelProto, mirror: Mirror, batches: Iterable[Mapping[str, np.ndarray]],
                 config: QuantConfig) -> tuple[onnx.ModelProto, dict[str, float]]:
    """The model as `config.smooth` asks (one alpha for every candidate, or "auto": chosen per
    tensor at the widths placement gives it), and the alpha of each smoothed tensor."""
    if config.smooth == "auto":
        if on_disk(model):  # smoothing rewrites float weights in memory, which such a model cannot hold
            log.info("smoothing: not decided automatically for a model whose weights stay on disk (see --smooth)")
            return model, {}
        specs = {p.tensor: p.spec for p in place(model, config)}
        found = _smoothable(model)
        tensors = [t for t, (layers, _) in found.items() if t in specs and not specs[t].is_float
                   and specs[t].bits < 16 and all(n.input[1] in specs and not specs[n.input[1]].is_float
                                                  for n, _ in layers)]
        if not tensors:
            return model, {}
        act_max, rows = _observe(mirror, batches, tensors, rows=True)
        alphas = choose_alphas({t: found[t] for t in tensors}, act_max, rows, specs, config.scheme.weight_init,
                               config.scheme.act_init)
    else:
        alphas = {t: config.smooth for t in _smoothable(model)}
        act_max = channel_max(mirror, batches, list(alphas))
    return (smooth(model, act_max, alphas), alphas) if alphas else (model, {})


def choose_alphas(found, act_max: Mapping[str, np.ndarray], rows: Mapping[str, torch.Tensor],
                  specs: Mapping[str, QuantSpec], weight_init: str = "mse", act_init: str = "mse") -> dict[str, float]:
    """Per tensor of `found` (tensor -> (layers, float weights)), the alpha (from 0 and ALPHAS)
    with the lowest relative output error of its layers on the sampled `rows`, X and each W
    quantized by their `specs`; only tensors whose best alpha beats 0 by GAIN. Deterministic:
    evenly spaced rows, seeded observers."""
    chosen = {}
    for tensor, (layers, weights) in found.items():
        x = rows[tensor]
        w_max = _weight_max(layers, weights)
        if act_max[tensor].shape != w_max.shape:
            continue
        as_matmul = [torch.from_numpy(w if axis == 0 else w.T) for w, (_, axis) in zip(weights, layers)]
        exact = [x @ w for w in as_matmul]

        def error(alpha: float) -> float:
            scale = torch.from_numpy(_scales(act_max[tensor], w_max, alpha)) if alpha else torch.ones(x.shape[1])
            xq = _fake_quant(x / scale, specs[tensor], lambda v: _act_qparams(v, specs[tensor], act_init))
            total = 0.0
            for (node, axis), weight, w, y in zip(layers, weights, as_matmul, exact):
                scaled = torch.from_numpy(weight) * (scale[:, None] if axis == 0 else scale[None, :])
                wq = _fake_quant(scaled, specs[node.input[1]], lambda v: weight_qparams(v, specs[node.input[1]],
                                                                                        weight_init))
                wq = wq if axis == 0 else wq.T
                total += float(((xq @ wq - y).pow(2).sum() / y.pow(2).sum().clamp(min=1e-12)))
            return total

        errors = {alpha: error(alpha) for alpha in (0.0, *ALPHAS)}
        best = min(errors, key=errors.get)
        if best and errors[best] < GAIN * errors[0.0]:
            chosen[tensor] = best
    return chosen


def _act_qparams(x: torch.Tensor, spec: QuantSpec, method: str):
    observer = RangeObserver()
    observer.observe(x)
    return observer.qparams(spec, method)


def _fake_quant(x: torch.Tensor, spec: QuantSpec, qparams) -> torch.Tensor:
    scale, zero = qparams(x)
    quantizer = FakeQuantize(spec, scale.numel())
    quantizer.set_qparams(scale, zero)
    with torch.no_grad():
        return quantizer(x)


def smooth(model: onnx.ModelProto, act_max: Mapping[str, np.ndarray], alpha: float | Mapping[str, float]
           ) -> onnx.ModelProto:
    """A copy of `model` with candidate activations' scales migrated into their layers: every
    candidate at one `alpha`, or the tensors of a {tensor: alpha} map (choose_alphas)."""
    alphas = alpha if isinstance(alpha, Mapping) else {t: alpha for t in act_max}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    for tensor, (layers, weights) in _smoothable(out).items():
        if not alphas.get(tensor) or tensor not in act_max:
            continue
        w_max = _weight_max(layers, weights)
        if act_max[tensor].shape != w_max.shape:
            continue
        scale = _scales(act_max[tensor], w_max, alphas[tensor])
        for (node, axis), weight in zip(layers, weights):
            shaped = scale[:, None] if axis == 0 else scale[None, :]
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(weight * shaped, node.input[1]))
        inverse = f"{tensor}_smooth_inverse"
        graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
        smoothed = f"{tensor}_smoothed"
        graph.node.append(helper.make_node("Mul", [tensor, inverse], [smoothed], name=f"{tensor}_Smooth"))
        for node, _ in layers:
            node.input[0] = smoothed
    topological_sort(graph)
    return onnx.shape_inference.infer_shapes(out)  # types for the new tensors: placement reads them
