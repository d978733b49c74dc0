"""`onnxqlimit inspect`: what a model is made of, and whether the mirror can run it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from .data import graph_inputs, input_shape
from .load import default_opset
from .mirror import unsupported_op_counts


@dataclass
class ModelSummary:
    opset: int
    producer: str
    inputs: list[tuple[str, str, list]]  # name, element type, shape
    outputs: list[tuple[str, str, list]]
    op_counts: Counter
    parameters: int
    unsupported: Counter
    metadata_keys: list[str] = field(default_factory=list)


def _describe(value: onnx.ValueInfoProto) -> tuple[str, str, list]:
    elem = value.type.tensor_type.elem_type
    return value.name, onnx.TensorProto.DataType.Name(elem).lower() if elem else "?", input_shape(value)


def summarize(model: onnx.ModelProto) -> ModelSummary:
    parameters = sum(int(np.prod(t.dims)) for t in model.graph.initializer
                     if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE))
    return ModelSummary(
        opset=default_opset(model),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=[_describe(v) for v in graph_inputs(model)],
        outputs=[_describe(v) for v in model.graph.output],
        op_counts=Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node),
        parameters=parameters,
        unsupported=unsupported_op_counts(model),
        metadata_keys=[p.key for p in model.metadata_props],
    )


def _shape(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def format_summary(s: ModelSummary) -> str:
    lines = [f"opset {s.opset}, producer: {s.producer or '?'}, parameters: {s.parameters:,}"]
    lines += [f"input  {name}: {elem} {_shape(shape)}" for name, elem, shape in s.inputs]
    lines += [f"output {name}: {elem} {_shape(shape)}" for name, elem, shape in s.outputs]
    if s.metadata_keys:
        lines.append("metadata: " + ", ".join(s.metadata_keys))
    lines.append(f"ops ({sum(s.op_counts.values())} nodes):")
    for op, count in s.op_counts.most_common():
        lines.append(f"  {op:<28} {count:>5}  {'UNSUPPORTED' if op in s.unsupported else 'ok'}")
    if s.unsupported:
        lines.append("unsupported: " + ", ".join(f"{op} ({n})" for op, n in sorted(s.unsupported.items())))
    else:
        lines.append("all ops supported")
    return "\n".join(lines)
