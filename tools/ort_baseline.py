"""onnxruntime `quantize_static` as a careful user runs it: the baseline onnxqlimit must beat.

Steps (see /work/shared/ANCHORS.md):
  1. raise the opset with onnx.version_converter: 17, or 21 when a 4-bit type is used
     (int4/uint4 Q/DQ need 21; per-channel DequantizeLinear needs >= 13, and the PP-OCR
     rec model ships at opset 12, where per_channel output does not load);
  2. onnxruntime.quantization.shape_inference.quant_pre_process (symbolic shape
     inference + basic graph optimisations such as Conv+BN folding);
  3. quantize_static, QDQ format, per_channel=True, MinMax or Percentile calibration,
     activations QUInt8/QUInt4, weights QInt8/QInt4.

Calibration is streamed with the `CalibStridedMinMax` extra option (the reader supports
__len__/set_range): without it quantize_static keeps every intermediate tensor of every
calibration sample in memory (PP-OCR det at 640x640 is ~0.5 GB per sample), and the
other knob, CalibMaxIntermediateOutputs, discards the collected batches in onnxruntime
1.32 (MinMaxCalibrater.collect_data clears them without merging their ranges: with k set,
only the last n mod k samples count - checked on PP-OCR cls). Strides of 4 samples give
the same MinMax ranges as one pass (checked: identical) and Percentile ranges within
0.06% (histograms are re-binned when merged); peak memory on PP-OCR det is ~4.4 GB.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import version_converter
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

WEIGHT_TYPES = {8: QuantType.QInt8, 4: QuantType.QInt4}
ACT_TYPES = {8: QuantType.QUInt8, 4: QuantType.QUInt4}
METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
LAST_TIMINGS: dict = {}  # seconds per step of the latest quantize_with_ort call


class DictReader(CalibrationDataReader):
    """Feeds a {input_name: [N,...] array} dict one sample at a time (batch 1 keeps the
    stored intermediate tensors small); supports quantize_static's strided calibration."""

    def __init__(self, calib: dict[str, np.ndarray]):
        self.calib = calib
        self.n = len(next(iter(calib.values())))
        if any(len(v) != self.n for v in calib.values()):
            raise ValueError("all calibration arrays need the same number of samples")
        self.set_range(0, self.n)

    def __len__(self):
        return self.n

    def set_range(self, start_index: int, end_index: int):
        self.pos, self.end = start_index, min(end_index, self.n)

    def get_next(self):
        if self.pos >= self.end:
            return None
        i, self.pos = self.pos, self.pos + 1
        return {k: v[i:i + 1] for k, v in self.calib.items()}


def _stride(n: int, target: int = 4) -> int:
    """Largest divisor of n that is <= target (quantize_static needs n % stride == 0)."""
    return max(d for d in range(1, min(n, target) + 1) if n % d == 0)


def _pre_process(src: Path, dst: Path) -> str:
    """quant_pre_process, retried the way its error messages suggest: symbolic shape
    inference stops on PP-OCR det/rec ("Incomplete symbolic shape inference": auto_merge
    fixes it) and asserts on a Concat in PP-OCR cls (then skip the symbolic part, keeping
    ONNX shape inference and the graph optimisations). Returns the mode that worked."""
    tries = [("default", {}), ("auto_merge", {"auto_merge": True}),
             ("skip_symbolic_shape", {"skip_symbolic_shape": True})]
    for i, (mode, kw) in enumerate(tries):
        try:
            quant_pre_process(str(src), str(dst), **kw)
            return mode
        except Exception:  # noqa: BLE001 - onnxruntime raises bare Exception/AssertionError here
            if i == len(tries) - 1:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _working_dir(path):
    """onnxruntime 1.32's quantize_static leaves a uuid-named copy of a large model's weights
    (90 MB for MiniLM) in the working directory: run it from a temporary one."""
    here = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(here)


def quantize_with_ort(model_path, calib: dict[str, np.ndarray], out_path, wbits: int = 8,
                      abits: int = 8, method: str = "minmax") -> Path:
    """Quantize `model_path` to QDQ with onnxruntime and write `out_path`.
    wbits/abits: 8 or 4 (onnxruntime has no 2/3/5-7-bit QuantType for quantize_static).
    method: "minmax" | "percentile" (onnxruntime's default 99.999th percentile).
    Per-step timings land in LAST_TIMINGS."""
    for kind, b in (("weight", wbits), ("activation", abits)):
        if b not in (4, 8):
            raise ValueError(f"{b}-bit {kind}s: onnxruntime.quantization.quantize_static has no "
                             f"{b}-bit QuantType (it offers 4, 8 and 16 bits); use 8 or 4")
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, not {method!r}")
    model_path, out_path = Path(model_path).resolve(), Path(out_path).resolve()
    opset = 21 if 4 in (wbits, abits) else 17
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ortq.") as tmp, _working_dir(tmp):
        model = onnx.load(str(model_path))
        cur = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
        if cur < opset:
            model = version_converter.convert_version(model, opset)
        conv = Path(tmp) / "opset.onnx"
        onnx.save(model, str(conv))
        t1 = time.perf_counter()
        pre = Path(tmp) / "pre.onnx"
        pre_mode = _pre_process(conv, pre)
        t2 = time.perf_counter()
        reader = DictReader(calib)
        quantize_static(
            str(pre), str(out_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=ACT_TYPES[abits], weight_type=WEIGHT_TYPES[wbits],
            calibrate_method=METHODS[method],
            extra_options={"CalibStridedMinMax": _stride(len(reader))})
        t3 = time.perf_counter()
    LAST_TIMINGS.clear()
    LAST_TIMINGS.update(opset=t1 - t0, pre_process=t2 - t1, quantize=t3 - t2, total=t3 - t0)
    LAST_TIMINGS["pre_process_mode"] = pre_mode
    return out_path
