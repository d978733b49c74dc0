"""How much each quantizer, at each width, costs the model: the Fisher approximation.

The task loss is label-free: KL(float || quantized) for class outputs, relative squared
error otherwise (fisher.task_loss). Its Hessian at the float model is the Fisher
information, estimated from squared gradients of the model's own sampled predictions
(fisher.sampled_nll). Following BRECQ, the loss increase of a block whose quantizers are
set to a configuration c is

    dL_B(c) ~= 1/2 * sum over the block's outputs of F * (z_c - z)^2,

with z the float block output, z_c the output with the block's quantizers (round to
nearest) at c and every other block float. Blocks are taken as independent of each
other; inside a block the layers' errors interact, so each candidate configuration is
measured jointly, not summed from single-quantizer terms. The single-quantizer terms (the
diagonal) are measured too: they guide which configurations to measure in blocks too
large to enumerate, and are what the validation tool ranks against the real loss.

That estimate ranks a block's own configurations, but not blocks against each other (an
early error grows on its way to the output more than the Fisher weights say), and
reconstruction then changes the losses unevenly (learned rounding recovers far more of a
2-bit weight's error than of a 4-bit one's; docs/mixed_precision.md). So each block's
uniform configurations are also measured whole: the model run from the block on, after a
short reconstruction at those widths in a run that reconstructs, and their ratio to the
estimate rescales the configurations like them (block_loss.py).

The table depends on the model, the calibration data and these options only, so it is
cached in the work directory: a new budget is a new search, not a new measurement.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnx

from ..context import Context
from ..graph import all_nodes
from ..mirror import Mirror
from ..progress import progress_bar
from ..quant.policy import COMPUTE_OPS, QuantPoint, operands
from ..quant.runtimes import RuntimeProfile, profile
from ..recon.blocks import BlockConfig, find_blocks
from ..recon.config import ReconConfig
from ..recon.runner import quantizer_owners
from ..state import QuantState
from .block_loss import BlockLoss, float_pass, probe_schedule, to_model_scale
from .config import SensitivityConfig

CACHE_VERSION = 2  # 2: uniform configurations among the varied widths, one probe per weight width


@dataclass
class BlockOption:
    bits: dict[str, int]  # the block's quantizers -> width
    loss: float  # predicted task-loss increase, measured jointly


@dataclass
class SensitivityTable:
    choices: dict[str, list[int]]  # quantizer -> widths the search may give it (one for fixed ones)
    owner: dict[str, int]  # quantizer -> block index
    diagonal: dict[str, dict[int, float]]  # quantizer -> width -> loss increase with it alone quantized
    blocks: list[list[BlockOption]]  # per block: the jointly measured configurations
    samples: int = 0
    seconds: float = 0.0
    from_cache: bool = False

    def to_json(self) -> dict:
        data = asdict(self)
        data["diagonal"] = {t: {str(b): v for b, v in d.items()} for t, d in self.diagonal.items()}
        data.pop("from_cache")
        return data

    @classmethod
    def from_json(cls, data: dict) -> SensitivityTable:
        return cls(choices=data["choices"], owner=data["owner"],
                   diagonal={t: {int(b): v for b, v in d.items()} for t, d in data["diagonal"].items()},
                   blocks=[[BlockOption(**o) for o in opts] for opts in data["blocks"]],
                   samples=data["samples"], seconds=data["seconds"], from_cache=True)


def cache_key(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], state: QuantState, config: SensitivityConfig,
              block_config: BlockConfig, quant_settings: dict, seed: int) -> str:
    """Model + calibration samples used + placement + options: what the table depends on."""
    digest = hashlib.sha256()
    digest.update(model.SerializeToString(deterministic=True))
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name][: config.sample_count(feeds)])
        digest.update(name.encode() + str(array.dtype).encode() + str(array.shape).encode() + array.tobytes())
    points = [(p.tensor, p.kind, p.fixed, p.spec.bits if p.fixed else None, p.spec.symmetric, p.spec.channel_axis,
               p.spec.block_size)
              for p in state.points]
    digest.update(json.dumps([CACHE_VERSION, points, asdict(config), asdict(block_config), quant_settings, seed],
                             sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def load_or_measure(ctx: Context, state: QuantState,
                    hints: tuple[Mapping[str, float], Mapping[str, float]]) -> SensitivityTable:
    """The sensitivity table of this run: from the work dir's cache when an identical run
    measured it, else measured (and cached)."""
    config, block_config, seed = ctx.options.mixed.sensitivity, ctx.recon.block_config, ctx.options.seed
    tune = probe_schedule(ctx.recon, config)
    path = None
    if ctx.options.work_dir is not None:
        # Widths are what the table varies; everything else about the quantizers is part of the key.
        settings = {**asdict(ctx.config), "widths": {k: v for k, v in asdict(ctx.config.widths).items()
                                                     if k not in ("wbits", "abits")},
                    "tune": asdict(tune) if tune is not None else None}
        key = cache_key(ctx.model, ctx.feeds, state, config, block_config, settings, seed)
        path = Path(ctx.options.work_dir) / f"sensitivity-{key}.json"
        if path.is_file():
            try:
                return SensitivityTable.from_json(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError):
                pass  # a damaged cache file is measured again and overwritten
    runs = runnable(ctx.model, state.points, profile(ctx.config.runtime))
    table = measure(ctx.mirror, ctx.model, state, ctx.feeds, config, block_config, hints, seed, ctx.options.progress,
                    runs, tune)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table.to_json()))
        tmp.replace(path)
    return table


def measure(mirror: Mirror, model: onnx.ModelProto, state: QuantState, feeds: Mapping[str, np.ndarray],
            config: SensitivityConfig, block_config: BlockConfig, hints: tuple[Mapping[str, float], Mapping[str, float]],
            seed: int = 0, progress: bool = True, runs: Callable[[Mapping[str, int]], bool] | None = None,
            tune: ReconConfig | None = None) -> SensitivityTable:
    """Measure the table; `hints` are (parameters, multiply-adds) per quantizer, to steer
    which configurations of large blocks are measured; `runs` (see runnable) drops the
    configurations the runtime cannot run; with `tune` (a reconstruction schedule) the
    whole-model measurements follow a short reconstruction at their widths."""
    started = time.perf_counter()
    blocks = find_blocks(model, block_config)
    owners, on_entry = quantizer_owners(mirror, blocks, state.points)
    choices = {p.tensor: [p.spec.bits] if p.fixed else
               sorted(set(config.wbits_choices if p.kind == "weight" else config.abits_choices)) for p in state.points}
    samples = float_pass(mirror, state, feeds, blocks, config, seed, tune)
    runner = BlockLoss(mirror, state, samples, on_entry, tune, seed, feeds)
    table = SensitivityTable(choices, {p.tensor: b for b, pts in owners.items() for p in pts}, {},
                             [[] for _ in blocks], samples.count)
    bar = progress_bar(progress, total=len(blocks), desc="sensitivity", unit="block", leave=False)
    try:
        for block in blocks:
            owned = owners.get(block.index, [])
            for point in owned:
                if len(choices[point.tensor]) > 1:
                    table.diagonal[point.tensor] = {b: runner.loss(block, owned, {point.tensor: b})
                                                    for b in choices[point.tensor]}
            configs = _block_configs(owned, choices, table.diagonal, hints, config.max_block_configs)
            if runs is not None:  # else the widest configuration: every runtime runs W8A8 or float
                widest = {p.tensor: max(choices[p.tensor]) for p in owned}
                configs = [c for c in configs if runs(c)] or [widest]
            losses = [runner.loss(block, owned, bits) for bits in configs]
            if len(configs) > 1:  # (one configuration: a constant, whatever its scale)
                losses = to_model_scale(runner, block, owned, configs, losses, table.diagonal)
            table.blocks[block.index] = [BlockOption(bits, loss) for bits, loss in zip(configs, losses)]
            bar.update()
    finally:
        bar.close()
        runner.restore()
    table.seconds = time.perf_counter() - started
    return table


def runnable(model: onnx.ModelProto, points: list[QuantPoint], runtime: RuntimeProfile) -> Callable[[Mapping[str, int]], bool]:
    """Whether a block configuration (quantizer -> width) gives every compute node whose weight
    and activation quantizers it sets a (wbits, abits) pair the runtime runs (runtimes.py)."""
    kinds = {p.tensor: p.kind for p in points}
    pairs = [(node.op_type, *operands(node.input, kinds)) for node in all_nodes(model.graph)
             if node.op_type in COMPUTE_OPS]
    pairs = [(op, w, a) for op, w, a in pairs if w is not None and a is not None]

    def runs(config: Mapping[str, int]) -> bool:
        return all(runtime.runs(op, config[w], config[a]) for op, w, a in pairs if w in config and a in config)
    return runs


def _block_configs(owned: list[QuantPoint], choices: Mapping[str, list[int]], diagonal: Mapping[str, Mapping[int, float]],
                   hints: tuple[Mapping[str, float], Mapping[str, float]], limit: int) -> list[dict[str, int]]:
    """The configurations of one block to measure jointly.

    All of them when there are at most `limit`; otherwise the uniform ones (every weight at
    one width, every activation at one width) and greedy descents from the widest
    configuration that lower, step by step, the quantizer with the smallest predicted loss
    increase per unit of cost saved - over weights alone for each activation width with
    parameters as the cost (size budgets), and over all quantizers with multiply-adds as
    the cost (BitOps and latency budgets).
    """
    tensors = [p.tensor for p in owned]
    if not tensors:
        return [{}]
    grid = [choices[t] for t in tensors]
    if np.prod([len(g) for g in grid]) <= limit:
        return [dict(zip(tensors, combo)) for combo in itertools.product(*grid)]
    kinds = {p.tensor: p.kind for p in owned}
    found: list[dict[str, int]] = []

    def add(config: dict[str, int]) -> None:
        if config not in found:
            found.append(dict(config))

    wset = sorted({b for t in tensors if kinds[t] == "weight" for b in choices[t]})
    aset = sorted({b for t in tensors if kinds[t] == "activation" for b in choices[t]})
    for w in wset or [None]:
        for a in aset or [None]:
            add({t: _nearest(choices[t], w if kinds[t] == "weight" else a) for t in tensors})

    def descend(config: dict[str, int], movable: list[str], cost_hint: Mapping[str, float]) -> None:
        config = dict(config)
        while True:
            moves = []
            for t in movable:
                lower = [b for b in choices[t] if b < config[t]]
                if lower:
                    to = max(lower)
                    gain = max(diagonal.get(t, {}).get(to, 0.0) - diagonal.get(t, {}).get(config[t], 0.0), 0.0)
                    saved = cost_hint.get(t, 1.0) * (config[t] - to)
                    moves.append((gain / max(saved, 1e-30), t, to))
            if not moves:
                return
            _, t, to = min(moves)
            config[t] = to
            add(config)

    top = {t: max(choices[t]) for t in tensors}
    weights_only = [t for t in tensors if kinds[t] == "weight"]
    for a in aset or [None]:
        descend({**top, **{t: _nearest(choices[t], a) for t in tensors if kinds[t] == "activation"}}, weights_only,
                hints[0])
    descend(top, tensors, hints[1])
    if len(found) > limit:  # keep the uniform ones and an even spread of the rest
        head = len(wset or [0]) * len(aset or [0])
        rest = found[head:]
        picks = np.linspace(0, len(rest) - 1, limit - head).round().astype(int)
        found = found[:head] + [rest[i] for i in dict.fromkeys(picks.tolist())]
    return found


def _nearest(widths: list[int], bits: int | None) -> int:
    if bits is None:
        return max(widths)
    return min(widths, key=lambda b: (abs(b - bits), -b))
