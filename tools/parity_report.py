"""Print the mirror-vs-onnxruntime parity table (markdown) for every model we test on.

    python tools/parity_report.py            # zoo + PP-OCR (rapidocr-onnxruntime) + torch exports

Each row: model, input shape, output, max|diff| / max|ref| (tolerance 1e-4), and the
time of one mirror forward pass (after a warm-up pass) on this machine's CPU. PP-OCR
inputs are synthetic text-like pages (tools/synthetic.py): on random noise PP-OCR det
outputs an all-background map whose maximum is 7e-4, where a relative error means little.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxqlimit import Mirror, load_model  # noqa: E402
from onnxqlimit.data import load_npz  # noqa: E402
from onnxqlimit.parity import check_mirror  # noqa: E402
from tools.archs import export_reference_models  # noqa: E402
from tools.synthetic import paddle_text_image  # noqa: E402


def cases(workdir: Path):
    rng = np.random.default_rng(0)
    index = json.loads((ROOT / "models" / "zoo.json").read_text())["models"]
    for entry in index:
        feeds = load_npz(ROOT / "models" / entry["calib"], ["input"])
        yield entry["name"], ROOT / "models" / entry["onnx"], {"input": feeds["input"][:32]}
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is not None:
        models = Path(list(spec.submodule_search_locations)[0]) / "models"
        for name, file, shape in [("PP-OCRv4 det", "ch_PP-OCRv4_det_infer.onnx", (1, 3, 640, 640)),
                                  ("PP-OCRv4 rec", "ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 320)),
                                  ("PP-OCR mobile cls", "ch_ppocr_mobile_v2.0_cls_infer.onnx", (8, 3, 48, 192))]:
            yield name, models / file, {"x": paddle_text_image(shape[0], *shape[2:])}
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


def main() -> int:
    torch.set_num_threads(2)
    print("| model | input | output | max abs diff | max abs ref | relative | mirror forward |")
    print("|---|---|---|---|---|---|---|")
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
                print(f"| {name} | {shape} | {row.name} | {row.max_abs_diff:.2e} | {row.max_abs_ref:.2e} | "
                      f"{row.relative_error:.1e} | {elapsed * 1000:.0f} ms |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
