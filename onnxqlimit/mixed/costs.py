"""What a bit plan costs, in the units budgets are given in.

- size: bytes of weight storage as the exported file stores it - every initializer, with
  quantized weights packed in their containers (3-bit weights in int4 count 4 bits) plus
  their scales and zero points, and each activation quantizer's constants. The exported
  file is measured the same way (`file_costs`), so the budget is checked on what ships.
- avg_wbits: parameter-weighted logical weight bits over the quantized layer weights
  (Gather tables are left out: fixed-width lookups would swamp the layers' bits).
- bitops: sum over compute nodes of MACs x weight bits x activation bits per sample at the
  calibration shape (an unquantized operand counts 32 bits). For a MatMul of two
  activations the second input plays the weight.
- latency_ms: a per-node table measured with onnxruntime (mixed/latency.py) plus the
  rest of the model as measured in float; int4/int2 activations run simulated in
  onnxruntime, and the table says so in its numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

import numpy as np
import onnx
import torch

from ..graph import all_initializers, all_nodes
from ..mirror import Mirror
from ..qdq import (
    activation_storage_bytes,
    bias_storage_bytes,
    packed_integers,
    weight_storage_bytes,
)
from ..quant.bits import BitPlan
from ..quant.fake_quant import FakeQuantize, quantizers_disabled
from ..quant.policy import COMPUTE_OPS, QuantPoint, operands
from ..quant.runtimes import fuses, fusion_inputs, unfused_outputs
from ..quant.widths import FLOAT_BITS, container_bits, stored_bytes
from ..weights import array as tensor_array


@dataclass
class NodeCost:
    name: str
    macs: int  # per sample
    weight: str | None  # the quantizer playing the weight operand, if quantized
    act: str | None  # the quantizer of the activation operand, if quantized


class CostModel:
    def __init__(self, model: onnx.ModelProto, mirror: Mirror, points: list[QuantPoint],
                 quantizers: Mapping[str, FakeQuantize], sample: Mapping[str, np.ndarray],
                 latency: dict | None = None, fused_bits: tuple[int, ...] = (8,)):
        self.points = {p.tensor: p for p in points}
        self.fused_bits = fused_bits  # the widths the runtime fuses (runtimes.py)
        self.fusion = fusion_inputs(model.graph, points)  # output Q/DQ that exist while their node fuses
        weights = [p for p in points if p.kind == "weight"]
        self.shapes = {p.tensor: tuple(mirror.initializer(p.tensor).shape) for p in weights}
        self.numel = {t: int(np.prod(shape)) for t, shape in self.shapes.items()}
        self.layer_numel = {t: n for t, n in self.numel.items() if not self.points[t].table}  # what avg_wbits weighs
        used = {t for n in all_nodes(model.graph) for t in n.input}
        self.base_bytes = sum(stored_bytes(t) for t in model.graph.initializer
                              if t.name in used and t.name not in self.numel)
        self.nodes = _node_costs(mirror, self.points, quantizers, sample)
        self.latency = latency  # {"base_ms": float, "nodes": {node: {"float" | "W/A": ms}}}

    # ------------------------------------------------------------ per quantizer / per node

    def fused(self, tensors: Iterable[str], plan: Mapping[str, int] | None) -> bool:
        return fuses(tensors, plan or {}, self.fused_bits)

    def storage(self, tensor: str, bits: int, plan: Mapping[str, int] | None = None) -> int:
        """Bytes of one quantizer at `bits`, in a plan that gives the other widths `plan` holds:
        an int32 bias adds its scales, and a fused form's output pair exists, only while the
        layer fuses (BiasQuantize, unfused_outputs)."""
        spec = replace(self.points[tensor].spec, bits=bits)
        point = self.points[tensor]
        if tensor in self.fusion and not self.fused(self.fusion[tensor], plan):
            return 0
        if tensor in self.numel:
            int32 = point.bias is not None and self.fused([tensor, point.bias[1]], {**(plan or {}), tensor: bits})
            extra = bias_storage_bytes(self.shapes[tensor][spec.channel_axis] if spec.channel_axis is not None
                                       else 1) if int32 else 0
            return weight_storage_bytes(spec, self.shapes[tensor]) + extra
        return activation_storage_bytes(spec)

    def node_widths(self, node: NodeCost, bits: Mapping[str, int]) -> tuple[int, int]:
        w = bits[node.weight] if node.weight else FLOAT_BITS
        a = bits[node.act] if node.act else FLOAT_BITS
        return w, a

    def node_bitops(self, node: NodeCost, bits: Mapping[str, int]) -> float:
        w, a = self.node_widths(node, bits)
        return float(node.macs) * w * a

    def node_latency(self, node: NodeCost, bits: Mapping[str, int]) -> float:
        from .latency import FLOAT, pair_key

        entries = self.latency["nodes"].get(node.name, {})
        if not entries:
            return 0.0
        w, a = self.node_widths(node, bits)
        if w == FLOAT_BITS:  # (a float activation with an integer weight is a weight-only entry)
            return entries[FLOAT]
        key = pair_key(w, a)
        if key in entries:
            return entries[key]
        # A pair not measured: the slowest quantized entry, so a plan never looks faster than it is.
        return max(v for k, v in entries.items() if k != FLOAT)

    # ------------------------------------------------------------ whole plans

    def unfused_outputs(self, plan: Mapping[str, int]) -> dict[str, int]:
        return unfused_outputs(self.fusion, plan, self.fused_bits)

    def evaluate(self, plan: BitPlan | Mapping[str, int]) -> dict[str, float]:
        bits = plan.bits if isinstance(plan, BitPlan) else plan
        layers = self.layer_numel
        weight_bits = sum(n * bits[t] for t, n in layers.items())
        stored_wbits = sum(n * container_bits(bits[t]) for t, n in layers.items())
        params = max(1, sum(layers.values()))
        costs = {"size_bytes": self.base_bytes + sum(self.storage(t, bits[t], bits) for t in self.points),
                 "avg_wbits": weight_bits / params, "container_wbits": stored_wbits / params,
                 "bitops": sum(self.node_bitops(n, bits) for n in self.nodes)}
        if self.latency is not None:
            costs["latency_ms"] = self.latency["base_ms"] + sum(self.node_latency(n, bits) for n in self.nodes)
        return costs


def _node_costs(mirror: Mirror, points: Mapping[str, QuantPoint], quantizers, sample) -> list[NodeCost]:
    """MACs per sample of every compute node, from one float run on a single sample. A node
    inside a Loop or Scan body counts once per iteration; one in an If branch the sample
    does not take counts nothing."""
    compute = [n for n in mirror.nodes if n.op_type in COMPUTE_OPS]
    inner = [n for sub in mirror.nested() for n in sub.nodes if n.op_type in COMPUTE_OPS]
    wanted = list(dict.fromkeys(t for n in compute for t in (*n.inputs[:2], n.outputs[0]) if t))
    probe = _ShapeProbe(mirror, {t for n in inner for t in (*n.inputs[:2], n.outputs[0]) if t})
    with torch.no_grad(), quantizers_disabled(quantizers), probe:
        env = mirror.execute(mirror.initial_env({k: v[:1] for k, v in sample.items()}), keep=wanted)
    shapes = {t: tuple(env[t].shape) for t in wanted if t in env}
    shapes.update(probe.shapes)
    kinds = {t: p.kind for t, p in points.items()}
    costs = []
    for node in compute + inner:
        a_shape, b_shape, out = (shapes.get(t, ()) for t in (node.inputs[0], node.inputs[1], node.outputs[0]))
        macs = _macs(node, a_shape, b_shape, out) * probe.calls.get(node.outputs[0], 1)
        weight, act = operands(node.inputs, kinds)
        costs.append(NodeCost(node.name, macs, weight, act))
    return costs


class _ShapeProbe:
    """Hooks recording the shape of named tensors (and how often each is computed) wherever
    they are computed, subgraphs included, around the hooks already there."""

    def __init__(self, mirror: Mirror, names: set[str]):
        self.mirror, self.names = mirror, names
        self.shapes: dict[str, tuple] = {}
        self.calls: dict[str, int] = {}
        self._kept: dict[str, torch.nn.Module | None] = {}

    def __enter__(self):
        for name in self.names:
            self._kept[name] = self.mirror.get_hook(name)
            self.mirror.set_hook(name, _Record(self, name, self._kept[name]))
        return self

    def __exit__(self, *exc):
        for name, hook in self._kept.items():
            self.mirror.set_hook(name, hook)

    def record(self, name: str, x: torch.Tensor) -> None:
        self.shapes.setdefault(name, tuple(x.shape))
        self.calls[name] = self.calls.get(name, 0) + 1


class _Record(torch.nn.Module):
    def __init__(self, probe: _ShapeProbe, name: str, inner: torch.nn.Module | None):
        super().__init__()
        self.__dict__["probe"] = probe  # (not a child module)
        self.name, self.inner = name, inner

    def forward(self, x):
        self.probe.record(self.name, x)
        return self.inner(x) if self.inner is not None else x


def _macs(node, a_shape: tuple, b_shape: tuple, out: tuple) -> int:
    numel = int(np.prod(out)) if out else 0
    if node.op_type == "Conv" and len(b_shape) >= 2:
        return numel * int(np.prod(b_shape[1:]))
    if node.op_type == "ConvTranspose" and len(b_shape) >= 2:
        return int(np.prod(a_shape)) * int(np.prod(b_shape[1:]))
    if node.op_type == "Gemm" and len(a_shape) == 2:
        return numel * a_shape[0 if node.attr("transA", 0) else 1]
    if a_shape:  # MatMul
        return numel * a_shape[-1]
    return 0


def file_costs(model: onnx.ModelProto, cost_model: CostModel, plan: BitPlan) -> dict[str, float]:
    """Costs of an exported QDQ file: storage measured from its initializers, and the plan
    it records in its metadata checked against the integer types and ranges it holds."""
    inits = {t.name: t for t in all_initializers(model.graph)}
    recorded = json.loads(next((p.value for p in model.metadata_props if p.key == "onnxqlimit.bit_plan"), "{}"))
    if recorded != dict(plan.bits):
        raise ValueError("the exported file's recorded bit plan differs from the plan")
    for tensor, point in cost_model.points.items():
        if point.kind != "weight" or plan.bits[tensor] == FLOAT_BITS:
            continue
        ints = tensor_array(inits[f"{tensor}_quantized"])  # int8/uint8 as stored (mapped, for a big model)
        spec = replace(point.spec, bits=plan.bits[tensor])
        if ints.dtype.kind not in "iu":  # ml_dtypes' int4/int2 as a numpy integer type
            ints = ints.astype(np.int16)
        elif ints.dtype == np.uint8 and container_bits(spec.bits) < 8:  # a table packed into bytes
            ints = packed_integers(ints, spec)
        if int(ints.min(initial=spec.qmin)) < spec.qmin or int(ints.max(initial=spec.qmax)) > spec.qmax:
            raise ValueError(f"{tensor}: stored integers exceed the {spec.bits}-bit range")
    costs = cost_model.evaluate(plan)
    costs["planned_size_bytes"] = costs["size_bytes"]  # what the search counted; tests hold the two equal
    costs["size_bytes"] = sum(stored_bytes(t) for t in all_initializers(model.graph))
    return costs
