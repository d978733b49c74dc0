"""How onnxruntime's CPU provider will run a file: which compute nodes end up in integer
kernels, and how fast the file is against its float model.

A QDQ file is only as fast as the fusions onnxruntime finds in it: a DequantizeLinear ->
Conv -> QuantizeLinear pattern becomes QLinearConv, a weight-only int4 MatMul becomes
MatMulNBits, and anything else runs as float compute between Q/DQ nodes. The file is opened
with onnxruntime's default optimizations, the optimized graph it saves is read back, and its
compute nodes are counted by kind; then the file and the float model are timed in turns.
"""
from __future__ import annotations

import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from .data import model_feeds
from .graph import all_nodes

# Compute kernels of onnxruntime's CPU provider, in the optimized graph (any domain).
INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "MatMulNBits", "ConvInteger",
                   "MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "QLinearConvTranspose")
FLOAT_KERNELS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
                 "NhwcFusedConv", "TransposeMatMul", "Attention")
TIME_BUDGET_S = 0.5  # for the models timed together, after warm-up: at least 5 turns
MAX_REPEATS = 200


@dataclass
class RuntimeCheck:
    integer: int  # compute nodes of the optimized graph in integer kernels
    compute: int  # all its compute nodes, integer or float
    kernels: dict[str, int] = field(default_factory=dict)  # compute op type -> count
    float_nodes: list[str] = field(default_factory=list)  # compute nodes left in float, by name
    batch: int = 1
    ms: float | None = None  # median latency of the file
    float_ms: float | None = None  # ... and of its float model, timed in turns with it
    threads: int = 0  # onnxruntime intra-op threads (0: its default)

    @property
    def ratio(self) -> float | None:
        return self.ms / self.float_ms if self.ms and self.float_ms else None


class Session(ort.InferenceSession):
    """An onnxruntime session fed batches as onnxqlimit holds them (samples first): scalar
    and stacked state inputs become what the model declares (data.model_feeds)."""

    def run(self, output_names, input_feed, run_options=None):
        if getattr(self, "_declared", None) is None:  # (once: latency timing calls run in a loop)
            self._declared = {i.name: i.shape for i in self.get_inputs()}
        return super().run(output_names, model_feeds(input_feed, self._declared), run_options)


def cpu_session(model: onnx.ModelProto | str | Path | bytes, threads: int = 0,
                optimized_path: str | None = None) -> ort.InferenceSession:
    """`model` as a user's onnxruntime CPU session runs it: default (all) graph optimizations,
    `threads` intra-op threads (0: onnxruntime's default); the optimized graph saved to
    `optimized_path` when given."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = optimized_path
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else \
        model if isinstance(model, bytes) else str(model)
    return Session(source, options, providers=["CPUExecutionProvider"])


def compute_kernels(path: str | Path | bytes, threads: int = 0) -> tuple[Counter, list[str]]:
    """Compute op types in the graph onnxruntime optimizes `path` into (inside If branches and
    loop bodies too), and the names of the ones that stay float."""
    with tempfile.TemporaryDirectory() as folder:
        optimized = str(Path(folder) / "optimized.onnx")
        cpu_session(path, threads, optimized)
        nodes = list(all_nodes(onnx.load(optimized, load_external_data=False).graph))
    kinds = Counter(n.op_type for n in nodes if n.op_type in INTEGER_KERNELS + FLOAT_KERNELS)
    floats = [n.name or n.output[0] for n in nodes if n.op_type in FLOAT_KERNELS]
    return kinds, floats


def interleaved_ms(models: list[str | Path | bytes], feeds: Mapping[str, np.ndarray], threads: int = 0,
                   budget_s: float = TIME_BUDGET_S) -> list[float]:
    """Median ms per run of each model (a path or serialized bytes), run in turns so that a
    busy moment slows them alike, for `budget_s` after warm-up (at least 5 turns)."""
    sessions = [cpu_session(m, threads) for m in models]
    inputs = [{i.name: feeds[i.name] for i in s.get_inputs()} for s in sessions]
    for session, given in zip(sessions, inputs):  # warm-up: first runs allocate and pick kernels
        for _ in range(3):
            session.run(None, given)
    times: list[list[float]] = [[] for _ in sessions]
    started = time.perf_counter()
    repeats = max(MAX_REPEATS, int(MAX_REPEATS * budget_s / TIME_BUDGET_S))
    while len(times[0]) < repeats and (len(times[0]) < 5 or time.perf_counter() - started < budget_s):
        for session, given, log in zip(sessions, inputs, times):
            t0 = time.perf_counter()
            session.run(None, given)
            log.append(time.perf_counter() - t0)
    return [1000.0 * float(np.median(t)) for t in times]


def check_runtime(path: str | Path, feeds: Mapping[str, np.ndarray], reference: str | Path | bytes | None = None,
                  threads: int = 0) -> RuntimeCheck:
    """The kernels onnxruntime runs `path` with, and its latency on `feeds` (one batch) against
    `reference`'s (the float model, a path or serialized bytes) when given."""
    kinds, floats = compute_kernels(path, threads)
    timed = interleaved_ms([path] + ([reference] if reference is not None else []), feeds, threads)
    integer = sum(n for op, n in kinds.items() if op in INTEGER_KERNELS)
    return RuntimeCheck(integer, sum(kinds.values()), dict(kinds), floats, len(next(iter(feeds.values()))),
                        timed[0], timed[1] if reference is not None else None, threads)


def format_runtime(check: RuntimeCheck) -> str:
    integer = ", ".join(f"{op} {n}" for op, n in sorted(check.kernels.items()) if op in INTEGER_KERNELS)
    floats = ", ".join(f"{op} {n}" for op, n in sorted(check.kernels.items()) if op in FLOAT_KERNELS)
    kinds = "; ".join(part for part in (integer, f"float: {floats}" if floats else "") if part)
    line = f"onnxruntime CPU: {check.integer}/{check.compute} compute nodes in integer kernels" + \
        (f" ({kinds})" if kinds else "")
    if check.ms is not None:
        line += f"; {check.ms:.3f} ms per batch of {check.batch}"
        if check.float_ms is not None:
            line += f" vs float {check.float_ms:.3f} ms ({check.ratio:.2f}x)"
    return line
