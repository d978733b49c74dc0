"""Quantized parity and file sizes for every test model at W8A8, W4A4, W3A3, W2A4 (markdown).

    python -m tools.quant_parity_report

Per model and width: share of activation integers that differ between onnxruntime and the
mirror on the same float input (exact check), end-to-end output drift (max and mean
|diff| / output scale, share within one step of scale/255) and the size ratio to FP32.
--json PATH keeps the table as a docs/results record.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
from tools.archs import export_reference_models
from tools.common import Table, load

WIDTHS = [(8, 8), (4, 4), (3, 3), (2, 4)]


def cases(work: Path):
    for name in ("zoo_resnet", "zoo_mobilenetv2", "rec", "cls", "det"):
        model = load(name)
        yield name, model.path, model.calibration(16)
    rng = np.random.default_rng(0)
    refs = export_reference_models(work, 17)
    for name in ("resnet18", "mobilenet_v2"):
        yield f"{name} (torch)", refs[name], {"input": rng.standard_normal((8, 3, 224, 224)).astype(np.float32)}
    mask = np.ones((8, 32), np.int64)
    mask[::2, 20:] = 0
    yield "BERT-style (torch)", refs["bert"], {"input_ids": rng.integers(0, 1000, (8, 32)), "attention_mask": mask,
                                               "token_type_ids": np.zeros((8, 32), np.int64)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the table as a docs/results record here")
    args = ap.parse_args(argv)
    table = Table(["model", "bits", "integers differing", "max diff / scale", "mean diff / scale", "within one step",
                   "size vs FP32", "opset"], args.json, "Quantized parity and file sizes",
                  "Round to nearest, 16 calibration samples, 8 parity samples; the file in onnxruntime against "
                  "the mirror on the same float input.")
    table.header()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, path, calib in cases(tmp):
            for wbits, abits in WIDTHS:
                r = quantize(path, tmp / "q.onnx", calib, QuantConfig.of(wbits=wbits, abits=abits),
                             RunOptions(recon=ReconConfig(method="rtn", calib_size=16, batch_size=8), parity_samples=8,
                                        progress=False)).report
                p = r.parity[0]
                table.add(name, f"W{wbits}A{abits}", f"{r.integer_parity['flipped']:.2e}",
                          f"{p['max_diff_over_range']:.1e}", f"{p['mean_diff_over_range']:.1e}",
                          f"{p['within_one_step']:.2%}", f"{r.size_bytes['ratio']:.3f}", r.opset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
