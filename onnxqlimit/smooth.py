"""SmoothQuant-style scale migration and Outlier Suppression+ channel shifts, folded into the
float graph before quantizers attach.

Transformer activations carry a few channels tens of times larger than the rest (after
LayerNorm, after GELU), and one per-tensor activation scale must cover them. For an
activation X read by MatMul/Gemm layers with constant weights, per input channel j:

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      X W = (X / s) (s W)

The layers' weights are multiplied by s (a change to float initializers) and X / s is
computed by one float Mul in front of them, so the quantizer sees the flatter X / s; other
readers of X (a residual Add) still read X. The exported file stays standard QDQ: the
Mul is an ordinary float op. Convolutions are left alone (their outliers are rare).

With `shift` (Outlier Suppression+, Wei et al. 2023), each channel is first centred on the
middle of its range, z_j = (min X_j + max X_j) / 2:  X W = (X - z) W + z W, the constant
z W joining the layer's bias. Channels of a LayerNorm or GELU output sit off zero by
different amounts; centred, they fit a symmetric (zero point 0) range - what TensorRT takes.
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


def channel_range(mirror: Mirror, batches: Iterable[Mapping[str, np.ndarray]], tensors: list[str]
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per last-axis channel, the smallest and largest value of each tensor over the batches."""
    low: dict[str, torch.Tensor] = {}
    high: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for feeds in batches:
            env = mirror.execute(mirror.initial_env(feeds), keep=tensors)
            for name in tensors:
                value = env[name].reshape(-1, env[name].shape[-1]).float()
                lo, hi = value.amin(0), value.amax(0)
                low[name] = torch.minimum(low[name], lo) if name in low else lo
                high[name] = torch.maximum(high[name], hi) if name in high else hi
    return {name: (low[name].cpu().numpy(), high[name].cpu().numpy()) for name in low}


def channel_max(ranges: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per channel, the largest |value| (of channel_range's ranges)."""
    return {name: np.maximum(-lo, hi) for name, (lo, hi) in ranges.items()}


def _add_to_bias(graph, node: onnx.NodeProto, delta: np.ndarray, inits, readers) -> None:
    """Add the per-output-channel constant `delta` to a layer's output: into a Gemm's C or a
    MatMul's bias Add constant read by it alone, else by a new Add after the layer."""
    bias = None
    if node.op_type == "Gemm":  # alpha A B + beta C: C takes delta x alpha / beta
        attrs = {a.name: a.f for a in node.attribute}
        delta = delta * attrs.get("alpha", 1.0) / attrs.get("beta", 1.0)
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = node.input[2]
    elif node.op_type == "MatMul":
        after = [n for n in graph.node if node.output[0] in n.input]
        if len(after) == 1 and after[0].op_type == "Add":
            bias = next((t for t in after[0].input if t != node.output[0] and t in inits), None)
    if bias is not None and readers[bias] == 1 and inits[bias].data_type == onnx.TensorProto.FLOAT:
        values = tensor_array(inits[bias]).astype(np.float32)
        if values.size == delta.size:
            inits[bias].CopyFrom(numpy_helper.from_array((values + delta.reshape(values.shape)), bias))
            return
    name = f"{node.output[0]}_shift_bias"
    graph.initializer.append(numpy_helper.from_array(delta.astype(np.float32), name))
    if node.op_type == "Gemm" and len(node.input) < 3:
        node.input.append(name)
        return
    unbiased = f"{node.output[0]}_unshifted"
    graph.node.append(helper.make_node("Add", [unbiased, name], [node.output[0]], name=f"{node.output[0]}_ShiftBias"))
    node.output[0] = unbiased


def smooth(model: onnx.ModelProto, ranges: Mapping[str, tuple[np.ndarray, np.ndarray]], alpha: float | None,
           shift: bool = False) -> onnx.ModelProto:
    """A copy of `model` with every candidate activation's scale migrated into its layers
    (`alpha`; None: no scaling) and, with `shift`, its channels centred."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    readers = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            readers[name] += 1
    for tensor, layers in candidates(out).items():
        if tensor not in ranges or any(readers[n.input[1]] > 1 or inits[n.input[1]].data_type
                                       != onnx.TensorProto.FLOAT for n, _ in layers):
            continue  # a weight shared with another reader cannot take this tensor's scales alone
        weights = [tensor_array(inits[n.input[1]]).astype(np.float32) for n, _ in layers]
        w_max = np.max([np.abs(w).max(axis=1 - axis) for w, (_, axis) in zip(weights, layers)], axis=0)
        lo, hi = (r.astype(np.float64) for r in ranges[tensor])
        if lo.shape != w_max.shape:
            continue
        center = (lo + hi) / 2 if shift else np.zeros_like(lo)
        x_max = np.maximum(center - lo, hi - center)
        scale = np.clip(np.where((x_max > 0) & (w_max > 0),
                                 x_max ** (alpha or 0) / np.maximum(w_max, 1e-12) ** (1 - (alpha or 0)), 1.0),
                        *_SCALE_RANGE).astype(np.float32)
        smoothed, source = f"{tensor}_smoothed", tensor
        if shift:  # X - z, and z W into each layer's bias (with the weight as it was)
            for (node, axis), weight in zip(layers, weights):
                _add_to_bias(graph, node, (center @ weight if axis == 0 else weight @ center).astype(np.float32),
                             inits, readers)
            graph.initializer.append(numpy_helper.from_array(center.astype(np.float32), f"{tensor}_shift"))
            source = f"{tensor}_centred" if alpha is not None else smoothed
            graph.node.append(helper.make_node("Sub", [tensor, f"{tensor}_shift"], [source], name=f"{tensor}_Shift"))
        if alpha is not None:
            for (node, axis), weight in zip(layers, weights):
                shaped = scale[:, None] if axis == 0 else scale[None, :]
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(weight * shaped, node.input[1]))
            inverse = f"{tensor}_smooth_inverse"
            graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
            graph.node.append(helper.make_node("Mul", [source, inverse], [smoothed], name=f"{tensor}_Smooth"))
        for node, _ in layers:
            node.input[0] = smoothed
    topological_sort(graph)
    return onnx.shape_inference.infer_shapes(out)  # types for the new tensors: placement reads them
