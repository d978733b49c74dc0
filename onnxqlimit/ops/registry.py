"""The op registry: one small converter per ONNX op type, registered by decorator.

A converter receives the ONNX node (attributes parsed, opset known) once, when the
mirror is built, validates what it can, and returns the function that computes the
node's outputs from its input tensors. Problems found at build time raise
`UnsupportedNodeError`, so a model is refused before any work starts rather than
half-way through a calibration run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import UnsupportedNodeError

OpFn = Callable[..., Any]  # (*input tensors, None for absent optional inputs) -> Tensor | tuple
Converter = Callable[["Node"], OpFn]

_REGISTRY: dict[tuple[str, str], Converter] = {}


@dataclass(frozen=True)
class Node:
    """An ONNX node as converters see it."""

    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 17  # version of the node's domain in the model
    domain: str = ""

    @classmethod
    def from_proto(cls, proto: onnx.NodeProto, opsets: dict[str, int], index: int = 0) -> "Node":
        domain = "" if proto.domain in ("", "ai.onnx") else proto.domain
        return cls(
            op_type=proto.op_type,
            name=proto.name or f"{proto.op_type}_{index}",
            inputs=tuple(proto.input),
            outputs=tuple(proto.output),
            attrs={a.name: _attr_value(a) for a in proto.attribute},
            opset=opsets.get(domain, 0),
            domain=domain,
        )

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def unsupported(self, what: str) -> UnsupportedNodeError:
        return UnsupportedNodeError(f"{self.op_type} node '{self.name}': {what}")

    def needs_output(self, index: int) -> bool:
        """True when output `index` exists and is named (optional outputs may be omitted)."""
        return index < len(self.outputs) and self.outputs[index] != ""


def _attr_value(attr: onnx.AttributeProto) -> Any:
    if attr.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(attr.t)
    if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return attr  # control flow is not in the registry; keep the proto for the error message
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8") for v in value]
    return value


def register(*op_types: str, domain: str = "") -> Callable[[Converter], Converter]:
    """Register a converter for one or more op types: `@register("Relu")`."""

    def wrap(fn: Converter) -> Converter:
        for op_type in op_types:
            key = (domain, op_type)
            if key in _REGISTRY:
                raise RuntimeError(f"op {op_type} registered twice")
            _REGISTRY[key] = fn
        return fn

    return wrap


def get_converter(op_type: str, domain: str = "") -> Converter | None:
    return _REGISTRY.get(("" if domain == "ai.onnx" else domain, op_type))


def supported_ops() -> list[str]:
    return sorted(op if not dom else f"{dom}.{op}" for dom, op in _REGISTRY)


# ---------------------------------------------------------------- shared helpers

_ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
}
# torch has uint16/32/64 dtypes but almost no kernels for them: refuse rather than crash.
_REFUSED_NUMPY_KINDS = "SUcOV"
_REFUSED_NUMPY_TYPES = {np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64)}


def torch_dtype(onnx_type: int, node: Node | None = None) -> torch.dtype:
    """The torch dtype for an ONNX element type; strings, complex and float8 are refused."""
    if onnx_type not in _ONNX_TO_TORCH:
        name = onnx.TensorProto.DataType.Name(onnx_type)
        msg = f"tensor type {name} is not supported"
        raise node.unsupported(msg) if node else UnsupportedNodeError(msg)
    return _ONNX_TO_TORCH[onnx_type]


def as_tensor(array: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """numpy -> torch without surprises (copies read-only arrays, keeps 0-d shapes)."""
    if array.dtype.kind in _REFUSED_NUMPY_KINDS or array.dtype in _REFUSED_NUMPY_TYPES:
        raise UnsupportedNodeError(f"tensor type {array.dtype} is not supported")
    return torch.from_numpy(np.array(array, copy=True)).to(device)


def ints(t: torch.Tensor | Sequence[int] | None) -> list[int]:
    """A 1-D int tensor (shape operand) or attribute list as a Python list."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
