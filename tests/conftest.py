"""Shared fixtures: repository paths, the PP-OCR models shipped by rapidocr-onnxruntime, and
a private cache folder for every test (nothing is written to ~/.cache/onnxqlimit).

Tiers: `pytest -m "not slow"` is the fast tier; plain `pytest` (.ci/run) runs everything."""
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


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path_factory) -> Path:
    """ONNXQLIMIT_CACHE (the CLI's default --work-dir: block checkpoints, sensitivity and
    latency tables) points at a fresh temporary folder for each test; subprocesses inherit it.
    A sibling of tmp_path, not inside it, so tests that list their tmp_path see only their files."""
    folder = tmp_path_factory.mktemp("onnxqlimit-cache")
    monkeypatch.setenv("ONNXQLIMIT_CACHE", str(folder))
    return folder


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

