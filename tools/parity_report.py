"""Print the mirror-vs-onnxruntime parity table (markdown) for every model we test on.

    python -m tools.parity_report            # zoo + PP-OCR (rapidocr-onnxruntime) + torch exports

Each row: model, input shape, output, max|diff| / max|ref| (tolerance 1e-4), and the
time of one mirror forward pass (after a warm-up pass) on this machine's CPU. PP-OCR
inputs are synthetic text-like pages (tools/synthetic.py): on random noise PP-OCR det
outputs an all-background map whose maximum is 7e-4, where a relative error means little.
--json PATH keeps the table as a docs/results record.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from onnxqlimit import Mirror, load_model
from onnxqlimit.data import load_npz
from onnxqlimit.parity import check_mirror
from tools.archs import export_reference_models
from tools.common import Table
from tools.synthetic import paddle_text_image
from tools.tasks import ROOT, model_path


def cases(workdir: Path):
    rng = np.random.default_rng(0)
    index = json.loads((ROOT / "models" / "zoo.json").read_text())["models"]
    for entry in index:
        feeds = load_npz(ROOT / "models" / entry["calib"], ["input"])
        yield entry["name"], ROOT / "models" / entry["onnx"], {"input": feeds["input"][:32]}
    if importlib.util.find_spec("rapidocr_onnxruntime") is not None:
        for name, model, shape in [("PP-OCRv4 det", "det", (1, 3, 640, 640)), ("PP-OCRv4 rec", "rec", (1, 3, 48, 320)),
                                   ("PP-OCR mobile cls", "cls", (8, 3, 48, 192))]:
            yield name, model_path(model), {"x": paddle_text_image(shape[0], *shape[2:])}
    for opset in (13, 17):
        paths = export_reference_models(workdir / f"opset{opset}", opset)
        for name in ("resnet18", "mobilenet_v2"):
            yield f"{name} (torch, opset {opset})", paths[name], {"input": rng.standard_normal((2, 3, 224, 224)).astype(np.float32)}
        seq = 64
        mask = np.ones((2, seq), np.int64)
        mask[1, 40:] = 0
        feeds = {"input_ids": rng.integers(0, 1000, (2, seq)), "attention_mask": mask,
                 "token_type_ids": np.zeros((2, seq), np.int64)}
        yield f"BERT-style encoder (torch, opset {opset})", paths["bert"], feeds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the table as a docs/results record here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    table = Table(["model", "input", "output", "max abs diff", "max abs ref", "relative", "mirror forward"], args.json,
                  "The mirror against onnxruntime, float",
                  "max|diff| / max|ref| of every output (tolerance 1e-4); mirror forward: one pass after a warm-up, "
                  "2 torch threads.")
    table.header()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, feeds in cases(Path(tmp)):
            (path.parent).mkdir(parents=True, exist_ok=True)
            mirror = Mirror(load_model(path))
            with torch.no_grad():
                mirror.run(feeds)
                start = time.perf_counter()
                mirror.run(feeds)
                elapsed = time.perf_counter() - start
            shape = "x".join(str(d) for d in next(iter(feeds.values())).shape)
            for row in check_mirror(str(path), mirror, feeds, batch_size=32):
                failed += not row.ok
                table.add(name, shape, row.name, f"{row.max_abs_diff:.2e}", f"{row.max_abs_ref:.2e}",
                          f"{row.relative_error:.1e}", f"{elapsed * 1000:.0f} ms")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
