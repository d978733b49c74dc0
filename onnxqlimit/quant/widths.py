"""Bit widths, in one place: what each kind of quantizer supports, the containers ONNX
stores them in, and the opset those containers need.

3 bits are stored in a 4-bit container, 5-7 in an 8-bit one; int4/uint4 and int16 Q/DQ
need opset 21, int2/uint2 opset 25, per-channel `axis` opset 13.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from ..errors import QLimitError

WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
FLOAT_BITS = 32  # an activation "width" meaning: left float, no Q/DQ (weight-only layers)
ACT_BITS = (2, 3, 4, 5, 6, 7, 8, 16, FLOAT_BITS)
WEIGHT_BLOCKS = (16, 32, 64, 128, 256)  # block sizes along K for MatMul/Gemm weights (DequantizeLinear block_size)
# A plan may also leave a weight float (FLOAT_BITS): a layer a latency search keeps unquantized.
SUPPORTED_BITS = {"weight": (*WEIGHT_BITS, FLOAT_BITS), "activation": ACT_BITS}
# The widths a mixed-precision search chooses from unless told otherwise.
DEFAULT_WBITS_CHOICES = (2, 3, 4, 8)
DEFAULT_ABITS_CHOICES = (4, 8)

# (container bits, signed) -> (numpy dtype, opset that first allows it in Q/DQ)
CONTAINERS = {
    (2, True): (ml_dtypes.int2, 25), (2, False): (ml_dtypes.uint2, 25),
    (4, True): (ml_dtypes.int4, 21), (4, False): (ml_dtypes.uint4, 21),
    (8, True): (np.int8, 13), (8, False): (np.uint8, 13),
    (16, True): (np.int16, 21), (16, False): (np.uint16, 21),
}
_ELEMENT_BITS = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT2: 2, onnx.TensorProto.UINT2: 2}


def check_bits(kind: str, bits: int, what: str | None = None) -> int:
    """`bits` if a `kind` ("weight" | "activation") quantizer supports it, else a one-line error."""
    allowed = SUPPORTED_BITS[kind]
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
        label = what or ("wbits" if kind == "weight" else "abits")
        extra = " (activations also 16; 32: float)" if kind == "activation" else " (32: float)"
        raise QLimitError(f"{label} must be {allowed[0]}..{max(b for b in allowed if b <= 8)}{extra}, got {bits!r}")
    return bits


def container_bits(bits: int) -> int:
    """The integer container of a width (FLOAT_BITS: float32 itself)."""
    return next(c for c in (2, 4, 8, 16, FLOAT_BITS) if bits <= c)


def container_dtype(bits: int, signed: bool):
    """The numpy type of the integers of a `bits`-wide quantizer."""
    return CONTAINERS[(container_bits(bits), signed)][0]


def required_opset(bits: set[int], blocks: bool = False) -> int:
    """The lowest opset whose Q/DQ types hold every bit width used (13 at least: `axis`; 21
    for block-wise scales)."""
    return max([21 if blocks else 13] + [CONTAINERS[(container_bits(b), True)][1] for b in bits if b != FLOAT_BITS])


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes an initializer's values take as ONNX stores them (int4 packs two per byte, int2 four)."""
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    bits = _ELEMENT_BITS.get(tensor.data_type) or 8 * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return -(-count * bits // 8)
