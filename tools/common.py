"""What the tools share: the one model registry, scoring against a float model, the
settings and width helpers, and the result tables (printed as markdown, kept as the
docs/results records that `python -m tools.benchmarks_doc` renders).

Every tool runs from the repository root as a module, `python -m tools.NAME`, so `tools`
and `onnxqlimit` import without any path set-up.

Models (`load(name, work)`; `MODELS` lists them):

    zoo_resnet, zoo_mobilenetv2   the repo's trained 32x32 zoo models (models/), top-1
    rec, cls, det                 PP-OCRv4 rec / mobile cls / PP-OCRv4 det (rapidocr), on text
                                  rendered by tools/tasks.py: char accuracy, accuracy, box F1
    face      MTCNN-RNet-style face net, 24x24, random weights (tools/archs.py)
    yolo320   YOLOv8n-sized detector at 320x320, random weights (tools/archs.py)
    minilm    MiniLM-L6-sized encoder (384 hidden, 6 layers, 12 heads), 64 tokens, random weights
    bert      a small BERT-style encoder (64 hidden, 2 layers), 32 tokens, random weights

The trained models are scored with their task metric on tools/tasks.py's evaluation data;
the random-weight ones (whose task metrics mean nothing) against the float model on
held-out inputs: SQNR of the first output and the mean cosine similarity of its rows.
Calibration inputs are always disjoint from the scoring data; `Model.calibration(n)`
defaults to 128 samples for the zoo (tasks.calibration), 64 for PP-OCR, yolo320 and the
encoders, 256 for face.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from onnxqlimit.evaluate import run as run_outputs
from onnxqlimit.evaluate import sqnr_db
from onnxqlimit.quant.widths import ACT_BITS, WEIGHT_BITS
from tools import tasks

# ------------------------------------------------------------------------------ widths


def widths(text: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8): any pair the quantizer supports (raises argparse.ArgumentTypeError)."""
    match = re.fullmatch(r"W(\d+)A(\d+)", text)
    if not match or int(match[1]) not in WEIGHT_BITS or int(match[2]) not in ACT_BITS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected WxAy with x in {list(WEIGHT_BITS)}, y in {list(ACT_BITS)}")
    return int(match[1]), int(match[2])


def bits_option(text: str) -> str:
    """An argparse type for a WxAy option: checked by `widths`, kept as written (it labels rows)."""
    widths(text)
    return text


# ------------------------------------------------------------------------------ models

TASK_MODELS = {  # trained models: name -> (tools/tasks.py task, evaluation data, headline metric)
    "zoo_resnet": ("zoo", lambda: tasks.zoo_dataset("zoo_resnet"), "top1"),
    "zoo_mobilenetv2": ("zoo", lambda: tasks.zoo_dataset("zoo_mobilenetv2"), "top1"),
    "rec": ("rec", tasks.rec_dataset, "char_acc"),
    "cls": ("cls", tasks.cls_dataset, "acc"),
    "det": ("det", tasks.det_dataset, "f1"),
}
# Random-weight BERT-style encoders: encoder size, sequence length, export opset and output name.
ENCODERS = {
    "minilm": (dict(vocab_size=30522, hidden=384, layers=6, heads=12, ffn=1536, max_len=512), 64, 14, "last_hidden_state"),
    "bert": (dict(vocab_size=1000, hidden=64, layers=2, heads=4, ffn=128, max_len=32), 32, 13, "h"),
}
GENERATED = ("face", "yolo320", *ENCODERS)  # random weights, exported by load(); scored against float
MODELS = (*TASK_MODELS, *GENERATED)


@dataclass
class Model:
    """A benchmark model: its float file, calibration inputs on demand, and a scorer."""

    name: str
    path: Path
    metric: str  # the headline key of score()'s metrics
    calib_size: int  # calibration samples when a tool does not say
    sample: Callable[[int], dict[str, np.ndarray]]  # n -> calibration inputs, disjoint from the scoring data
    score: Callable[..., dict[str, float]]  # (file[, opt_level]) -> metrics

    def calibration(self, n: int | None = None) -> dict[str, np.ndarray]:
        return self.sample(n or self.calib_size)


@lru_cache(maxsize=None)
def task_data(name: str):
    """The evaluation set of a trained model (made once per process)."""
    return TASK_MODELS[name][1]()


def _task_scorer(name: str) -> Callable[..., dict[str, float]]:
    task = TASK_MODELS[name][0]

    def score(path, opt_level=None) -> dict[str, float]:
        """The task metrics of `path` in onnxruntime (opt_level: see tasks.run_model)."""
        return tasks.evaluate(str(path), task, task_data(name), opt_level)
    return score


def _images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random images (not white noise): a coarse random field upsampled, in [0, 1]."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 3, size // 8, size // 8), dtype=np.float32)
    return np.ascontiguousarray(coarse.repeat(8, 2).repeat(8, 3) * 0.8
                                + 0.2 * rng.random((n, 3, size, size), dtype=np.float32))


def tokens(n: int, seed: int, vocab: int, seq: int, low: int = 1) -> dict[str, np.ndarray]:
    """Random token ids in [low, vocab), padded after a random length of seq/2..seq (mask 0
    there), one segment."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(seq)[None] < rng.integers(seq // 2, seq + 1, (n, 1))).astype(np.int64)
    return {"input_ids": rng.integers(low, vocab, (n, seq), dtype=np.int64) * mask,
            "attention_mask": mask, "token_type_ids": np.zeros((n, seq), np.int64)}


def _encoder(name: str, work: Path) -> tuple[Path, Callable[[int, int], dict[str, np.ndarray]]]:
    """The exported encoder and its inputs (n, seed) -> feeds, restricted to the graph's inputs."""
    import onnx
    import torch

    from tools.archs import BertEncoder, export_onnx

    size, seq, opset, output = ENCODERS[name]
    low = 1000 if name == "minilm" else 1  # minilm: ids past BERT's special and rare tokens

    def feeds(n: int, seed: int) -> dict[str, np.ndarray]:
        return {k: v for k, v in tokens(n, seed, size["vocab_size"], seq, low).items() if k in inputs}

    torch.manual_seed(0)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tuple(torch.from_numpy(v) for v in tokens(2, 7, size["vocab_size"], seq, low).values())
    src = export_onnx(BertEncoder(**size), example, work / f"{name}.onnx", opset, names, [output],
                      {k: {0: "batch", 1: "sequence"} for k in names})
    inputs = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}
    return src, feeds


def load(name: str, work: Path | str | None = None) -> Model:
    """The registry's model `name`; the random-weight ones are exported into `work` first."""
    if name in TASK_MODELS:
        return Model(name, tasks.model_path(name), TASK_MODELS[name][2], 128 if name.startswith("zoo") else 64,
                     lambda n: tasks.calibration(name, n), _task_scorer(name))
    if name not in GENERATED:
        raise KeyError(f"no model {name!r} (models: {', '.join(MODELS)})")
    if work is None:
        raise ValueError(f"{name} is exported by load(): give it a work folder")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    from tools import archs

    if name == "face":
        src = archs.export_facenet(work / "face.onnx")
        return Model(name, src, "cosine", 256, lambda n: {"input": _images(n, 24, 1)},
                     against_float(src, {"input": _images(512, 24, 2)}))
    if name == "yolo320":
        src = archs.export_yolo(work / "yolo320.onnx", size=320)
        return Model(name, src, "cosine", 64, lambda n: {"images": _images(n, 320, 1)},
                     against_float(src, {"images": _images(32, 320, 2)}))
    src, feeds = _encoder(name, work)
    calib_seed, held_seed, held = (1, 2, 128) if name == "minilm" else (1000, 0, 256)
    return Model(name, src, "cosine", 64, lambda n: feeds(n, calib_seed), against_float(src, feeds(held, held_seed)))


def at_opset(src: Path, dest: Path, opset: int) -> Path:
    """`src` converted to `opset` (written to `dest`); `src` itself when it is there already
    or `opset` is 0. The quantizer raises a model to the opset its widths need before
    simplifying, so a W8A8 run (13) and a search over 2-bit choices (25) would otherwise
    quantize differently simplified graphs (BERT's GELU and LayerNorm become Gelu /
    RMSNormalization only at >= 20 / 23) that differ in size and metric at one plan."""
    import onnx

    model = onnx.load(str(src))
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not opset or current >= opset:
        return src
    try:
        onnx.save(onnx.version_converter.convert_version(model, opset), str(dest))
        return dest
    except Exception as err:  # noqa: BLE001 - fall back to the source as given
        print(f"{src.name}: opset {current} -> {opset} failed ({str(err).splitlines()[0][:80]}); using opset {current}")
        return src


# ----------------------------------------------------------------------------- scoring


def first_output(path, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """The model's first output over `feeds` in onnxruntime, one row per sample, float64."""
    out = next(iter(run_outputs(str(path), feeds, batch).values()))
    return out.reshape(len(out), -1).astype(np.float64)


def mean_cosine(out: np.ndarray, ref: np.ndarray) -> float:
    """Mean cosine similarity of matching rows."""
    out, ref = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-30)
    return float(cos.mean())


def against_float(src: Path, held_out: dict[str, np.ndarray]) -> Callable[[Path], dict[str, float]]:
    """A scorer: SQNR (dB, onnxqlimit.evaluate.sqnr_db) and mean row cosine of a file's first
    output against the float model's, on `held_out` (the reference runs on first use)."""
    reference: list[np.ndarray] = []

    def score(path: Path) -> dict[str, float]:
        if not reference:
            reference.append(first_output(src, held_out))
        out = first_output(path, held_out)
        return {"sqnr_db": sqnr_db(out, reference[0]), "cosine": mean_cosine(out, reference[0])}
    return score


def matmul_peak(size: int = 2048, repeats: int = 20) -> float:
    """Measured fp32 GFLOP/s of a square matmul with torch's threads (the practical peak)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


# ------------------------------------------------------------------------------ tables


def machine() -> str:
    """Where this runs: cores, accelerator, torch and onnxruntime versions."""
    import onnxruntime
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"{cores}-core {platform.machine()} CPU"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    build = "CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
    parts += [f"torch {torch.__version__.split('+')[0]} ({build})", f"onnxruntime {onnxruntime.__version__}"]
    return ", ".join(parts)


def _tool() -> tuple[str, str]:
    """(module, file) of the running tool: ("tools.bench_recon", "tools/bench_recon.py")."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = spec.name if spec is not None and spec.name else f"tools.{Path(sys.argv[0]).stem}"
    return module, module.replace(".", "/") + ".py"


def write_record(path, title: str, columns: list[str], rows: list[list], notes: str = "") -> Path:
    """Write one measured table as a docs/results record (format: tools/benchmarks_doc.py):
    today's date, the running tool and its command line from sys.argv, and this machine."""
    module, tool = _tool()
    record = {"title": title, "date": datetime.date.today().isoformat(), "tool": tool,
              "command": " ".join(["python", "-m", module, *map(shlex.quote, sys.argv[1:])]),
              "machine": machine(), "columns": list(columns), "rows": [list(r) for r in rows], "notes": notes}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def markdown_row(cells) -> str:
    return "| " + " | ".join("" if c is None else str(c) for c in cells) + " |"


class Table:
    """A result table printed as markdown row by row as it is measured; with `record` (a
    tool's --json PATH) also written there as a docs/results record after every row, so a
    long run that is stopped keeps what it measured."""

    def __init__(self, columns: list[str], record=None, title: str = "", notes: str = ""):
        self.columns, self.rows = list(columns), []
        self.record, self.title, self.notes = record, title, notes

    def header(self) -> None:
        print(markdown_row(self.columns))
        print("|" + "|".join("---" for _ in self.columns) + "|", flush=True)

    def add(self, *cells) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))
        print(markdown_row(cells), flush=True)
        self.save()

    def save(self) -> None:
        if self.record:
            write_record(self.record, self.title, self.columns, self.rows, self.notes)
