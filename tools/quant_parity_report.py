"""Quantized parity and file sizes for every test model at W8A8, W4A4, W3A3, W2A4 (markdown).

    python tools/quant_parity_report.py

Per model and width: share of activation integers that differ between onnxruntime and the
mirror on the same float input (exact check), end-to-end output drift (max and mean
|diff| / output scale, share within one step of scale/255) and the size ratio to FP32.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxqlimit import QuantConfig, RunOptions, quantize  # noqa: E402
from tools import tasks  # noqa: E402
from tools.archs import export_reference_models  # noqa: E402

WIDTHS = [(8, 8), (4, 4), (3, 3), (2, 4)]


def cases(work: Path):
    for name in ("zoo_resnet", "zoo_mobilenetv2", "rec", "cls", "det"):
        yield name, tasks.model_path(name), tasks.calibration(name, 16)
    rng = np.random.default_rng(0)
    refs = export_reference_models(work, 17)
    for name in ("resnet18", "mobilenet_v2"):
        yield f"{name} (torch)", refs[name], {"input": rng.standard_normal((8, 3, 224, 224)).astype(np.float32)}
    mask = np.ones((8, 32), np.int64)
    mask[::2, 20:] = 0
    yield "BERT-style (torch)", refs["bert"], {"input_ids": rng.integers(0, 1000, (8, 32)), "attention_mask": mask,
                                               "token_type_ids": np.zeros((8, 32), np.int64)}


def main() -> int:
    print("| model | bits | integers differing | max diff / scale | mean diff / scale | within one step | size vs FP32 | opset |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, path, calib in cases(tmp):
            for wbits, abits in WIDTHS:
                r = quantize(path, tmp / "q.onnx", calib, QuantConfig(wbits=wbits, abits=abits),
                             RunOptions(method="rtn", calib_size=16, batch_size=8, parity_samples=8,
                                        progress=False)).report
                p = r["parity"][0]
                print(f"| {name} | W{wbits}A{abits} | {r['integer_parity']['flipped']:.2e} | {p['max_diff_over_range']:.1e} "
                      f"| {p['mean_diff_over_range']:.1e} | {p['within_one_step']:.2%} | {r['size_bytes']['ratio']:.3f} "
                      f"| {r['opset']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
