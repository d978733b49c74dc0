"""The models of the conversion-speed benchmark and profile (issue 10), one place.

    face     MTCNN-RNet-style face net, 24x24, random weights (tools/archs.py)
    cls      PP-OCR text-direction classifier (rapidocr)
    rec      PP-OCRv4 recognizer, 48x320 (rapidocr)
    yolo320  YOLOv8n-sized detector at 320x320, random weights (tools/archs.py)
    det      PP-OCRv4 text detector at 640x640 (rapidocr)
    minilm   MiniLM-L6-sized encoder (384 hidden, 6 layers, 12 heads), 64 tokens, random weights
    zoo_resnet, zoo_mobilenetv2   the repo's trained 32x32 zoo models

`prepare(name, work)` exports what needs exporting and returns the model, its calibration
set and a scorer: the task metric for the trained models, SQNR of the outputs against the
float model on held-out inputs for the random-weight ones (their task metrics mean nothing).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools import tasks
from tools.eval_float import MODELS as TASK_MODELS

MODELS = ("face", "cls", "rec", "yolo320", "det", "minilm", "zoo_resnet", "zoo_mobilenetv2")
MINILM = dict(vocab_size=30522, hidden=384, layers=6, heads=12, ffn=1536, max_len=512)
MINILM_SEQ = 64


@dataclass
class SpeedModel:
    path: Path
    calib: dict[str, np.ndarray]
    calib_size: int
    score: Callable[[Path], dict[str, float]]  # exported file -> metrics


def _run(path: Path, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    outs = [session.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    return np.concatenate(outs).reshape(n, -1).astype(np.float64)


def sqnr_scorer(src: Path, held_out: dict[str, np.ndarray]) -> Callable[[Path], dict[str, float]]:
    reference = _run(src, held_out)

    def score(path: Path) -> dict[str, float]:
        out = _run(path, held_out)
        noise = ((out - reference) ** 2).sum()
        cos = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1) + 1e-30)
        return {"sqnr_db": float(10 * np.log10((reference**2).sum() / max(noise, 1e-30))),
                "cosine": float(cos.mean())}
    return score


def _images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random images (not white noise): a coarse random field upsampled, in [0, 1]."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 3, size // 8, size // 8), dtype=np.float32)
    return np.ascontiguousarray(coarse.repeat(8, 2).repeat(8, 3) * 0.8
                                + 0.2 * rng.random((n, 3, size, size), dtype=np.float32))


def _tokens(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = (np.arange(MINILM_SEQ)[None] < rng.integers(MINILM_SEQ // 2, MINILM_SEQ + 1, (n, 1))).astype(np.int64)
    return {"input_ids": rng.integers(1000, MINILM["vocab_size"], (n, MINILM_SEQ), dtype=np.int64) * mask,
            "attention_mask": mask, "token_type_ids": np.zeros((n, MINILM_SEQ), np.int64)}


def prepare(name: str, work: Path, calib_size: int | None = None) -> SpeedModel:
    from tools import archs

    work = Path(work)
    if name == "face":
        src = archs.export_facenet(work / "face.onnx")
        n = calib_size or 256
        return SpeedModel(src, {"input": _images(n, 24, 1)}, n, sqnr_scorer(src, {"input": _images(512, 24, 2)}))
    if name == "yolo320":
        src = archs.export_yolo(work / "yolo320.onnx", size=320)
        n = calib_size or 64
        return SpeedModel(src, {"images": _images(n, 320, 1)}, n, sqnr_scorer(src, {"images": _images(32, 320, 2)}))
    if name == "minilm":
        import torch

        torch.manual_seed(0)
        example = tuple(torch.from_numpy(v[:2]) for v in _tokens(2, 7).values())
        names = ["input_ids", "attention_mask", "token_type_ids"]
        src = archs.export_onnx(archs.BertEncoder(**MINILM), example, work / "minilm.onnx", 14, names,
                                ["last_hidden_state"], {k: {0: "batch", 1: "sequence"} for k in names})
        n = calib_size or 64
        return SpeedModel(src, _tokens(n, 1), n, sqnr_scorer(src, _tokens(128, 2)))
    task, make, key = TASK_MODELS[name]
    data = make()
    n = calib_size or (64 if name in ("rec", "cls", "det") else 256)
    return SpeedModel(tasks.model_path(name), tasks.calibration(name, n), n,
                      lambda path: {key: float(tasks.evaluate(str(path), task, data)[key])})
