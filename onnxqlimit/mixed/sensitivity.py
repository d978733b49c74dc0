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

Reconstruction then changes these losses, and not alike: learned rounding recovers far
more of a 2-bit weight's error than of a 4-bit one's (docs/mixed_precision.md). A run
that reconstructs (any method but rtn) therefore scores each block's configurations
after reconstruction: its uniform configurations are reconstructed briefly
(SensitivityConfig.tune_iters iterations, from float inputs) and the factor each one
gains scales the round-to-nearest losses of the configurations like it.

The table depends on the model, the calibration data and these options only, so it is
cached in the work directory: a new budget is a new search, not a new measurement.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import onnx
import torch

from ..context import Context
from ..mirror import Mirror
from ..progress import progress_bar
from ..quant.fake_quant import quantizers_disabled, set_enabled
from ..quant.policy import COMPUTE_OPS, QuantPoint, operands
from ..quant.runtimes import RuntimeProfile, profile
from ..recon.block_cache import BatchLayout, TensorCache
from ..recon.blocks import Block, BlockConfig, find_blocks
from ..recon.config import ReconConfig
from ..recon.fisher import GradTap, damped, sampled_nll, task_loss
from ..recon.runner import BlockRunner, probe_layouts, quantizer_owners
from ..recon.tune import rtn_restorer, tune_block
from ..state import QuantState
from .config import SensitivityConfig

CACHE_VERSION = 1


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
        array = np.ascontiguousarray(feeds[name][: config.samples])
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


def probe_schedule(recon: ReconConfig, config: SensitivityConfig) -> ReconConfig | None:
    """The short reconstruction each configuration gets before it is scored: the run's own
    method and settings for config.tune_iters iterations; None (round to nearest) for an
    rtn run or tune_iters 0."""
    if recon.method == "rtn" or config.tune_iters == 0:
        return None
    return replace(recon, iters=config.tune_iters)


@dataclass
class _Samples:
    """Float tensors at block boundaries, the Fisher diagonal at block outputs and the float
    model's outputs, per chunk."""

    values: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    fisher: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    count: int = 0
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def measure(mirror: Mirror, model: onnx.ModelProto, state: QuantState, feeds: Mapping[str, np.ndarray],
            config: SensitivityConfig, block_config: BlockConfig, hints: tuple[Mapping[str, float], Mapping[str, float]],
            seed: int = 0, progress: bool = True, runs: Callable[[Mapping[str, int]], bool] | None = None,
            tune: ReconConfig | None = None) -> SensitivityTable:
    """Measure the table; `hints` are (parameters, multiply-adds) per quantizer, to steer
    which configurations of large blocks are measured; `runs` (see runnable) drops the
    configurations the runtime cannot run; with `tune` (a reconstruction schedule) every
    configuration is scored after a short reconstruction at its widths."""
    started = time.perf_counter()
    blocks = find_blocks(model, block_config)
    owners, on_entry = quantizer_owners(mirror, blocks, state.points)
    choices = {p.tensor: [p.spec.bits] if p.fixed else
               sorted(set(config.wbits_choices if p.kind == "weight" else config.abits_choices)) for p in state.points}
    samples = float_pass(mirror, state, feeds, blocks, config, seed, tune)
    layouts = None
    if tune is not None:
        torch_feeds = {k: torch.from_numpy(np.ascontiguousarray(v[: samples.count])) for k, v in feeds.items()}
        layouts = probe_layouts(mirror, state.quantizers, torch_feeds, list(samples.values))
    runner = BlockLoss(mirror, state, samples, on_entry, tune, seed, layouts)
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
                losses = _to_model_scale(runner, block, owned, configs, losses, table.diagonal)
            table.blocks[block.index] = [BlockOption(bits, loss) for bits, loss in zip(configs, losses)]
            bar.update()
    finally:
        bar.close()
        runner.restore()
    table.seconds = time.perf_counter() - started
    return table


def float_pass(mirror: Mirror, state: QuantState, feeds: Mapping[str, np.ndarray], blocks: list[Block],
                config: SensitivityConfig, seed: int, tune: ReconConfig | None = None) -> _Samples:
    """The float model's block-boundary tensors and Fisher diagonal on the first config.samples
    samples, in chunks of config.chunk - or of the short reconstructions' batch size, which
    must be the chunks' (a shape computed from the batch is cached once for every batch)."""
    if tune is not None:
        config = replace(config, chunk=tune.batch_size)
    total = len(next(iter(feeds.values())))
    count = min(config.samples, total)
    kept = list(dict.fromkeys([*mirror.input_names, *(t for b in blocks for t in b.inputs + b.context + b.outputs)]))
    loss_names = list(dict.fromkeys(t for b in blocks for t in b.loss_outputs))
    store: dict[str, torch.Tensor] = {}
    hooks = {name: mirror.get_hook(name) for name in loss_names}
    samples = _Samples({n: [] for n in kept}, {n: [] for n in loss_names}, count)
    generator = torch.Generator().manual_seed(seed)
    with quantizers_disabled(state.quantizers):
        try:
            for name, hook in hooks.items():
                mirror.set_hook(name, GradTap(hook, store, name))
            for start in range(0, count, config.chunk):
                batch = {k: v[start:min(start + config.chunk, count)] for k, v in feeds.items()}
                env = mirror.execute(mirror.initial_env(batch), keep=kept)
                loss = sum(sampled_nll(env[o], generator) for o in mirror.output_names if env[o].is_floating_point())
                tapped = [store[n] for n in loss_names]
                grads = torch.autograd.grad(loss, tapped, allow_unused=True) \
                    if torch.is_tensor(loss) and loss.requires_grad else [None] * len(tapped)
                for name, t, g in zip(loss_names, tapped, grads):
                    samples.fisher[name].append(torch.zeros_like(t).detach() if g is None else g.detach().float().pow(2))
                for name in kept:
                    samples.values[name].append(env[name].detach())
                for name in mirror.output_names:
                    if env[name].is_floating_point():
                        samples.outputs.setdefault(name, []).append(env[name].detach())
                store.clear()
        finally:
            for name, hook in hooks.items():
                mirror.set_hook(name, hook)
    return samples


class BlockLoss:
    """Runs one block from float inputs with some of its quantizers at given widths; with
    `tune` (a reconstruction schedule), each configuration is first reconstructed briefly."""

    def __init__(self, mirror: Mirror, state: QuantState, samples: _Samples, on_entry: set[str],
                 tune: ReconConfig | None = None, seed: int = 0, layouts: Mapping[str, BatchLayout] | None = None):
        self.mirror, self.state, self.samples, self.on_entry = mirror, state, samples, on_entry
        self.tune, self.seed = tune, seed
        self.runner = _probe_runner(mirror, state, samples, on_entry, tune, layouts) if tune is not None else None

    def _configure(self, owned: list[QuantPoint], bits: Mapping[str, int]) -> None:
        set_enabled(self.state.quantizers, False)
        for point in owned:
            if point.tensor in bits:
                quantizer = self.state.quantizers[point.tensor]
                quantizer.spec = replace(point.spec, bits=bits[point.tensor])
                quantizer.set_qparams(*self.state.calibration.qparams(point, bits[point.tensor]))
                quantizer.enabled = True

    def loss(self, block: Block, owned: list[QuantPoint], bits: Mapping[str, int]) -> float:
        """The block's predicted task-loss increase with `bits`, rounded to nearest."""
        self._configure(owned, bits)
        return self.evaluate(block)

    def model_loss(self, block: Block, owned: list[QuantPoint], bits: Mapping[str, int]) -> float:
        """The whole model's task-loss increase with only the block quantized at `bits`: after
        a short reconstruction at exactly these widths when there is a schedule, or rounded
        to nearest where that is lower (reconstruction keeps it where tuning does not help)."""
        self._configure(owned, bits)
        rtn = self.evaluate_model(block)
        if self.runner is None or not bits:
            return rtn
        with self.tuned(block, owned, bits):
            return min(rtn, self.evaluate_model(block))

    @contextlib.contextmanager
    def tuned(self, block: Block, owned: list[QuantPoint], bits: Mapping[str, int]) -> Iterator[None]:
        """Inside the `with`: the block's quantizers at `bits`, reconstructed (the others off);
        round to nearest again after it."""
        self._configure(owned, bits)
        tuned = [replace(p, spec=replace(p.spec, bits=bits[p.tensor])) for p in owned if p.tensor in bits]
        restore = rtn_restorer(self.runner, tuned)
        try:
            tune_block(self.runner, block, self.mirror.initializers_read(block.node_range), tuned, self.tune,
                       self.seed, None)
            yield
        finally:
            restore()

    def evaluate(self, block: Block) -> float:
        """The block's Fisher-weighted output error with its quantizers as they are."""
        mirror, samples = self.mirror, self.samples
        total = 0.0
        with torch.no_grad():
            weights = mirror.initializer_env(mirror.initializers_read(block.node_range))
            for c in range(len(next(iter(samples.values.values())))):
                env = dict(weights)
                for name in block.inputs + block.context:
                    x = samples.values[name][c]
                    env[name] = self.state.quantizers[name](x) if name in self.on_entry else x
                mirror.execute(env, block.node_range, keep=block.loss_outputs)
                for name in block.loss_outputs:
                    diff = env[name].float() - samples.values[name][c].float()
                    total += 0.5 * float((samples.fisher[name][c] * diff.pow(2)).sum())
        return total / samples.count

    def evaluate_model(self, block: Block) -> float:
        """The task loss (fisher.task_loss) of the model run from `block` on, from float
        inputs, with the quantizers as they are, against the float model's outputs."""
        mirror, samples = self.mirror, self.samples
        rest = range(block.start, len(mirror.nodes))
        total = 0.0
        with torch.no_grad():
            weights = mirror.initializer_env(mirror.initializers_read(rest))
            for c in range(len(next(iter(samples.values.values())))):
                env = {**weights, **{name: values[c] for name, values in samples.values.items()}}
                for name in block.inputs + block.context:
                    if name in self.on_entry:
                        env[name] = self.state.quantizers[name](env[name])
                mirror.execute(env, rest)
                total += sum(float(task_loss(ref[c], env[name])) for name, ref in samples.outputs.items() if name in env)
        return total / samples.count

    def restore(self) -> None:
        """Every quantizer back to its point's width and scales, enabled."""
        if self.runner is not None:
            self.runner.close()
        for point in self.state.points:
            quantizer = self.state.quantizers[point.tensor]
            quantizer.spec = point.spec
            quantizer.set_qparams(*self.state.calibration.qparams(point, point.spec.bits))
        set_enabled(self.state.quantizers, True)


def _to_model_scale(runner: BlockLoss, block: Block, owned: list[QuantPoint], configs: list[dict[str, int]],
                    losses: list[float], diagonal: Mapping[str, Mapping[int, float]]) -> list[float]:
    """The block's losses on the scale of the whole model's task loss, after reconstruction
    where the run reconstructs.

    The block-local estimate ranks a block's own configurations well, but not blocks against
    each other: an error early in the model grows on its way to the output far more than
    the Fisher weights at the block's output say (on the zoo ResNet, 13x for the first
    residual stage and 5x for the last at 2 bits). So each uniform configuration of the
    block (every weight at one width, every activation at one width) is measured whole:
    the model run from the block on, with only the block quantized (after a short
    reconstruction at those widths, when there is a schedule) against the float outputs.
    Its ratio to the block-local estimate scales the configurations like it: every other
    configuration takes the ratio of its dominant weight width (the width of the weight
    whose loss alone is largest in it) and narrowest activation width, or the block's
    median ratio. One measurement per uniform configuration keeps the cost near one run's."""
    kinds = {p.tensor: p.kind for p in owned}

    def key(bits: Mapping[str, int]) -> tuple[int | None, int | None]:
        weights = [t for t in bits if kinds[t] == "weight"]
        dominant = max(weights, key=lambda t: diagonal.get(t, {}).get(bits[t], 0.0)) if weights else None
        acts = [b for t, b in bits.items() if kinds[t] == "activation"]
        return (bits[dominant] if dominant else None, min(acts) if acts else None)

    ratios: dict[tuple[int | None, int | None], float] = {}
    for bits, loss in zip(configs, losses):
        uniform = all(len({b for t, b in bits.items() if kinds[t] == kind}) <= 1 for kind in ("weight", "activation"))
        if uniform and loss > 0:
            ratios[key(bits)] = runner.model_loss(block, owned, bits) / loss
    default = float(np.median(list(ratios.values()))) if ratios else 1.0
    scaled = [loss * ratios.get(key(bits), default) for bits, loss in zip(configs, losses)]
    # Narrower never costs less: a configuration at or below another in every width keeps at
    # least its loss (ratios taken from different uniform configurations could invert them)
    return [max([value] + [other for c, other in zip(configs, scaled) if all(c[t] >= b for t, b in bits.items())])
            for bits, value in zip(configs, scaled)]


def _probe_runner(mirror: Mirror, state: QuantState, samples: _Samples, on_entry: set[str], tune: ReconConfig,
                  layouts: Mapping[str, BatchLayout]) -> BlockRunner:
    """A reconstruction runner over the sensitivity samples, both caches holding the float
    model's tensors (each block is tuned from float inputs, as the table assumes) and, for
    a Fisher loss, the same weighting reconstruction uses (fisher.py) from the table's gradients."""
    n = samples.count
    runner = BlockRunner(mirror, state.quantizers, n, min(tune.batch_size, n), dict(layouts), tune.cache_gb)
    runner.on_entry = set(on_entry)
    for name, chunks in samples.values.items():
        for cache in (runner.fp, runner.q):
            cache.put(name, chunks)
    if tune.loss == "fisher":
        runner.fisher = TensorCache(dict(layouts), tune.cache_gb * 2**30 / 4, mirror.device)
        for name, chunks in samples.fisher.items():  # the table keeps squared gradients
            runner.fisher.put(name, damped([c.sqrt() for c in chunks]))
    return runner


def runnable(model: onnx.ModelProto, points: list[QuantPoint], runtime: RuntimeProfile) -> Callable[[Mapping[str, int]], bool]:
    """Whether a block configuration (quantizer -> width) gives every compute node whose weight
    and activation quantizers it sets a (wbits, abits) pair the runtime runs (runtimes.py)."""
    kinds = {p.tensor: p.kind for p in points}
    pairs = [(node.op_type, *operands(node.input, kinds)) for node in model.graph.node if node.op_type in COMPUTE_OPS]
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
