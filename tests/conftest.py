"""Shared fixtures: repository paths, the PP-OCR models shipped by rapidocr-onnxruntime."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
sys.path.insert(0, str(ROOT))  # `tools` (reference architectures, harnesses) is importable in tests

torch.set_num_threads(2)


def ppocr_dir() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("rapidocr-onnxruntime is not installed: run the README's test command "
                    "(it installs the package for its PP-OCR models)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@pytest.fixture(scope="session")
def ppocr() -> dict[str, Path]:
    d = ppocr_dir()
    return {
        "det": d / "ch_PP-OCRv4_det_infer.onnx",
        "rec": d / "ch_PP-OCRv4_rec_infer.onnx",
        "cls": d / "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    }

