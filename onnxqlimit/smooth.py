"""SmoothQuant-style scale migration, folded into the float graph before quantizers attach.

Transformer activations carry a few channels tens of times larger than the rest (after
LayerNorm, after GELU), and one per-tensor activation scale must cover them. For an
activation X read by MatMul/Gemm layers with constant weights, per input channel j:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      X W = (X / s) (s W)

The layers' weights are multiplied by s (a change to float initializers) and X / s is
computed by one float Mul in front of them, so the quantizer sees the flatter X / s; other
readers of X (a residual Add) still read X. The exported file stays standard QDQ: the
Mul is an ordinary float op. Convolutions are left alone (their outliers are rare).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .graph import topological_sort
from .mirror import Mirror
from .weights import array as tensor_array

_SCALE_RANGE = (1e-4, 1e4)  # a dead channel must not blow a weight row up or to zero


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
    peak: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for feeds in batches:
            env = mirror.execute(mirror.initial_env(feeds), keep=tensors)
            for name in tensors:
                value = env[name].abs()
                value = value.reshape(-1, value.shape[-1]).amax(0).float()
                peak[name] = torch.maximum(peak[name], value) if name in peak else value
    return {name: value.cpu().numpy() for name, value in peak.items()}


def smooth(model: onnx.ModelProto, act_max: Mapping[str, np.ndarray], alpha: float) -> onnx.ModelProto:
    """A copy of `model` with every candidate activation's scale migrated into its layers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    readers = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            readers[name] += 1
    for tensor, layers in candidates(out).items():
        if tensor not in act_max or any(readers[n.input[1]] > 1 or inits[n.input[1]].data_type
                                        != onnx.TensorProto.FLOAT for n, _ in layers):
            continue  # a weight shared with another reader cannot take this tensor's scales alone
        weights = [tensor_array(inits[n.input[1]]).astype(np.float32) for n, _ in layers]
        w_max = np.max([np.abs(w).max(axis=1 - axis) for w, (_, axis) in zip(weights, layers)], axis=0)
        x_max = act_max[tensor].astype(np.float64)
        if x_max.shape != w_max.shape:
            continue
        scale = np.where((x_max > 0) & (w_max > 0),
                         x_max ** alpha / np.maximum(w_max, 1e-12) ** (1 - alpha), 1.0)
        scale = np.clip(scale, *_SCALE_RANGE).astype(np.float32)
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
