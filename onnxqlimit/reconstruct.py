"""Stage 4: BRECQ / QDrop reconstruction, one block at a time (docs/reconstruction.md).

For each block, in graph order: the float block output is the target; the block input
comes from the already-quantized preceding blocks. AdaRound learns the rounding of the
block's weights and LSQ the step sizes of the activation quantizers the block produces,
jointly, by Adam on the (optionally Fisher-weighted) squared output error. QDrop lets each
activation element of the block, and of its input, skip quantization with probability
1 - drop_prob during tuning. Afterwards the rounding is fixed and the block's quantized
outputs become the next block's inputs. Only the current block runs, forward and backward.
"""
from __future__ import annotations

import bisect
import contextlib
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from .block_cache import BatchLayout, TensorCache, probe_layout
from .blocks import GRANULARITIES, Block, BlockConfig, find_blocks
from .calibrate import set_enabled
from .errors import QLimitError
from .fisher import fisher_weights
from .mirror import Mirror
from .quant.adaround import AdaRoundQuantize
from .quant.fake_quant import FakeQuantize, keep_mask, reset_masks
from .quant.policy import QuantPoint
from .state import QuantState

METHODS = ("rtn", "adaround", "brecq", "qdrop")
LOSSES = ("mse", "fisher")
FAST_ITERS, FAST_BATCH = 500, 8


@dataclass(frozen=True)
class Preset:
    iters: int  # per block
    batch_size: int
    calib_size: int
    lr_round: float  # a short schedule needs a larger step for the rounding variables


# "fast" is sized for a 2-core CPU (docs/reconstruction.md has the measurements behind it);
# "paper" is the published setting: 20k iterations of batch 32 per block, 1024 samples.
PRESETS = {"fast": Preset(iters=FAST_ITERS, batch_size=FAST_BATCH, calib_size=256, lr_round=1e-2),
           "paper": Preset(iters=20000, batch_size=32, calib_size=1024, lr_round=1e-3)}


@dataclass
class ReconConfig:
    """Reconstruction settings. quantize() fills method, iters, batch_size, lr_round, seed
    and progress from its RunOptions and preset; the rest is taken as given."""

    method: str = "qdrop"
    iters: int = FAST_ITERS
    batch_size: int = FAST_BATCH
    granularity: str = "block"  # adaround is always layer-wise
    max_layers: int = 6
    loss: str = "mse"  # mse | fisher
    drop_prob: float = 0.5  # QDrop: probability that an activation element is quantized
    round_lambda: float = 0.01  # AdaRound regulariser weight (0.1 suits MobileNetV2-like nets)
    warmup: float = 0.2  # fraction of iterations without the regulariser
    beta: tuple[float, float] = (20.0, 2.0)
    lr_round: float = 1e-2
    lr_scale: float = 4e-5
    learn_act_scales: bool = True
    cache_gb: float = 8.0  # block inputs/outputs past this go to memory-mapped files
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise QLimitError(f"--method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if self.loss not in LOSSES:
            raise QLimitError(f"--loss must be mse or fisher (got {self.loss!r})")
        if self.granularity not in GRANULARITIES:
            raise QLimitError(f"--granularity must be one of {', '.join(GRANULARITIES)} (got {self.granularity!r})")
        if not 0 < self.drop_prob <= 1:
            raise QLimitError(f"--drop-prob must be in (0, 1] (got {self.drop_prob})")
        if self.iters < 1 or self.batch_size < 1 or self.max_layers < 1:
            raise QLimitError("--iters, --batch-size and --block-layers must be positive")

    @property
    def block_config(self) -> BlockConfig:
        granularity = "layer" if self.method == "adaround" else self.granularity
        return BlockConfig(granularity=granularity, max_layers=self.max_layers)

    @property
    def dropping(self) -> float | None:
        return self.drop_prob if self.method == "qdrop" and self.drop_prob < 1 else None


@dataclass
class BlockResult:
    index: int
    nodes: str
    layers: int
    iters: int
    seconds: float
    its_per_s: float
    loss_before: float
    loss_after: float
    gflop_per_iter: float
    gflops: float


@dataclass
class ReconResult:
    method: str
    samples: int
    batch_size: int
    blocks: list[BlockResult] = field(default_factory=list)
    seconds: float = 0.0
    train_seconds: float = 0.0
    gflops: float = 0.0  # achieved over all tuning iterations
    peak_cache_mb: float = 0.0
    peak_rss_mb: float = 0.0
    cache_on_disk: bool = False


def reconstruct(mirror: Mirror, model, state: QuantState, feeds: Mapping[str, np.ndarray],
                config: ReconConfig) -> ReconResult:
    """Tune the state's quantizers in place (AdaRound modules replace the tuned weights' quantizers)."""
    points, quantizers = state.points, state.quantizers
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    reset_masks()
    blocks = find_blocks(model, config.block_config)
    total = len(next(iter(feeds.values())))
    batch = min(config.batch_size, total)
    n = total // batch * batch  # equal batches: tensors without a batch axis are then the same in each
    feeds = {k: torch.from_numpy(np.ascontiguousarray(v[:n])) for k, v in feeds.items()}
    layouts = _probe_layouts(mirror, quantizers, feeds, _boundary_tensors(blocks, mirror.input_names))
    run = _Run(mirror, quantizers, config, n, batch, layouts)
    result = ReconResult(config.method, n, batch)
    for name in mirror.input_names:  # graph inputs: raw in both caches; their quantizers act on block entry
        for cache in (run.fp, run.q):
            cache.put(name, [feeds[name][c] for c in run.chunks])
    if config.loss == "fisher":
        targets = [t for b in blocks for t in b.loss_outputs]
        fisher_batches = [{k: v[c].to(mirror.device) for k, v in feeds.items()} for c in _slices(n, min(batch, 8))]
        run.fisher = TensorCache(layouts, config.cache_gb * 2**30 / 4, mirror.device)
        fisher_weights(mirror, quantizers, fisher_batches, targets, run.fisher, config.progress)

    owners, run.on_entry = quantizer_owners(mirror, blocks, points)
    last_reader = {t: b.index for b in blocks for t in b.inputs + b.context}
    total_iters = config.iters * sum(1 for b in blocks if owners.get(b.index)) if config.method != "rtn" else 0
    run.bar = tqdm(total=total_iters, desc="reconstructing", unit="it", disable=not config.progress or not total_iters)
    for name in run.on_entry:  # applied by _entry_env instead of where the tensor is produced
        mirror.set_hook(name, None)
    try:
        for block in blocks:
            result.blocks.append(run.block(block, owners.get(block.index, []), len(blocks)))
            for cache in run.caches():
                for name in block.inputs + block.context + block.outputs:
                    if last_reader.get(name, -1) <= block.index:
                        cache.drop(name)
    finally:
        for name in run.on_entry:
            mirror.set_hook(name, quantizers[name])
        run.close()
    result.peak_cache_mb = run.peak_cache_mb
    result.cache_on_disk = run.cache_on_disk
    result.seconds = time.perf_counter() - started
    result.train_seconds = sum(b.seconds for b in result.blocks)
    flops = sum(b.gflop_per_iter * b.iters for b in result.blocks)
    result.gflops = flops / result.train_seconds if result.train_seconds else 0.0  # includes the counted iteration
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _boundary_tensors(blocks: list[Block], graph_inputs: list[str]) -> list[str]:
    names = list(graph_inputs)
    for b in blocks:
        names += b.inputs + b.context + b.outputs
    return list(dict.fromkeys(names))


def _probe_layouts(mirror: Mirror, quantizers, feeds, names: list[str]) -> dict[str, BatchLayout]:
    """Batch axis of every cached tensor, from float runs on one and on two samples."""
    if len(next(iter(feeds.values()))) < 2:
        raise QLimitError("reconstruction needs at least 2 calibration samples")
    set_enabled(quantizers, False)
    try:
        with torch.no_grad():
            one, two = (mirror.run({k: v[:k_].to(mirror.device) for k, v in feeds.items()}, names) for k_ in (1, 2))
    finally:
        set_enabled(quantizers, True)
    return {name: probe_layout(one[name], two[name]) for name in names}


def quantizer_owners(mirror: Mirror, blocks: list[Block], points: list[QuantPoint]) -> tuple[dict[int, list[QuantPoint]], set[str]]:
    """Which block tunes which quantizer, and which activation quantizers act on block entry.

    A weight belongs to the block of its (first) layer. An activation quantizer belongs to
    the first block that reads its tensor and acts when that block (and any later reader)
    takes the tensor in: the producing block's loss then sees its unquantized output, and
    the quantizer is tuned with the layers it feeds. A tensor also read inside the block
    that produces it keeps its quantizer there.
    """
    starts = [b.start for b in blocks]

    def block_at(index: int) -> int:
        return bisect.bisect_right(starts, index) - 1

    produced_in = {name: block_at(i) for i, node in enumerate(mirror.nodes) for name in node.outputs}
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(mirror.nodes):
        for name in node.inputs:
            readers.setdefault(name, set()).add(block_at(i))
    owners: dict[int, list[QuantPoint]] = {}
    on_entry: set[str] = set()
    for point in points:
        read_by = readers.get(point.tensor, set())
        if not read_by:
            continue
        owner = min(read_by)
        if point.kind == "activation":
            if produced_in.get(point.tensor, -1) in read_by:
                owner = produced_in[point.tensor]
            else:
                on_entry.add(point.tensor)
        owners.setdefault(owner, []).append(point)
    return owners, on_entry


def _squared_error(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Squared error summed over axis 1 (channels) and averaged over the rest, as in the
    BRECQ/QDrop code: the AdaRound regulariser weight (lambda) is tuned against this scale."""
    err = (out.float() - target.float()).pow(2)
    if weight is not None:
        err = err * weight
    return err.sum() * (err.shape[1] / err.numel()) if err.dim() >= 2 else err.mean()


class _Run:
    """State shared by the blocks of one reconstruction: caches, quantizers, settings."""

    def __init__(self, mirror: Mirror, quantizers: dict[str, FakeQuantize], config: ReconConfig, n: int, batch: int,
                 layouts: dict[str, BatchLayout]):
        self.mirror, self.quantizers, self.config, self.n, self.batch = mirror, quantizers, config, n, batch
        budget = config.cache_gb * 2**30
        self.fp = TensorCache(layouts, budget / 2, mirror.device)  # the float model's tensors
        self.q = TensorCache(layouts, budget / 2, mirror.device)  # the quantized model's, before entry quantizers
        self.fisher: TensorCache | None = None
        self.chunks = _slices(n, batch)
        self.on_entry: set[str] = set()
        self.bar: tqdm | None = None
        self.peak_cache_mb = 0.0
        self.cache_on_disk = False

    def caches(self) -> list[TensorCache]:
        return [c for c in (self.fp, self.q, self.fisher) if c is not None]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for cache in self.caches():
            cache.close()

    # ------------------------------------------------------------ one block

    def block(self, block: Block, tuned: list[QuantPoint], count: int) -> BlockResult:
        weights = self.mirror.initializers_read(block.node_range)
        set_enabled(self.quantizers, False)
        self._store(self.fp, self._run(self.fp, block, weights, self.chunks))
        set_enabled(self.quantizers, True)
        eval_chunks = self.chunks[: max(1, 128 // self.batch)]
        before = self._error(self._run(self.q, block, weights, eval_chunks), block, eval_chunks)
        stats = (0, 0.0, 0.0, 0.0)
        if tuned and self.config.method != "rtn":
            stats = self._tune(block, weights, tuned)
        outputs = self._run(self.q, block, weights, self.chunks)
        after = self._error({k: v[: len(eval_chunks)] for k, v in outputs.items()}, block, eval_chunks)
        self._store(self.q, outputs)
        self.peak_cache_mb = max(self.peak_cache_mb, sum(c.peak_bytes for c in self.caches()) / 2**20)
        self.cache_on_disk |= bool(self.fp.disk_bytes or self.q.disk_bytes)
        iters, seconds, rate, flop = stats
        result = BlockResult(block.index, f"{block.start}-{block.stop - 1}", len(block.layers), iters, seconds, rate,
                             before, after, flop / 1e9, flop * rate / 1e9)
        if self.config.progress and iters and self.bar is not None:
            self.bar.write(f"block {block.index + 1}/{count} ({result.layers} layers): loss {before:.4g} -> {after:.4g}, "
                           f"{iters} it in {seconds:.1f} s ({rate:.1f} it/s, {result.gflops:.1f} GFLOP/s)")
        return result

    def _entry_env(self, block: Block, index, drop: float | None = None) -> dict[str, torch.Tensor]:
        """The block's inputs for samples `index`: cached quantized-model tensors, entry
        quantizers applied; with `drop`, each element is the float model's value instead
        with probability 1 - drop (QDrop)."""
        env = {}
        for name in block.inputs + block.context:
            x = self.q.get(name, index)
            if name in self.on_entry:
                x = self.quantizers[name](x)
            if drop is not None and name in block.inputs and x.is_floating_point():
                x = torch.where(keep_mask(x, drop), x, self.fp.get(name, index))
            env[name] = x
        return env

    def _run(self, cache: TensorCache, block: Block, weights: list[str],
             chunks: list[slice]) -> dict[str, list[torch.Tensor]]:
        """The block's outputs for the given sample ranges (float inputs from `cache` when
        quantizers are off), with the quantizers as they are."""
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in block.outputs}
        with torch.no_grad():
            weight_env = self.mirror.initializer_env(weights)
            for chunk in chunks:
                env = {**weight_env, **(self._entry_env(block, chunk) if cache is self.q else
                                        {name: cache.get(name, chunk) for name in block.inputs + block.context})}
                self.mirror.execute(env, block.node_range, keep=block.outputs)
                for name in block.outputs:
                    outputs[name].append(env[name])
        return outputs

    @staticmethod
    def _store(cache: TensorCache, outputs: dict[str, list[torch.Tensor]]) -> None:
        for name, chunks in outputs.items():
            cache.put(name, chunks)

    def _loss(self, block: Block, env: dict[str, torch.Tensor], index) -> torch.Tensor:
        return sum(_squared_error(env[o], self.fp.get(o, index), self.fisher.get(o, index) if self.fisher else None)
                   for o in block.loss_outputs)

    def _error(self, outputs: dict[str, list[torch.Tensor]], block: Block, chunks: list[slice]) -> float:
        """Reconstruction loss over the given (equal-sized) sample ranges."""
        return sum(float(self._loss(block, {k: v[i] for k, v in outputs.items()}, chunk))
                   for i, chunk in enumerate(chunks)) / len(chunks)

    def _tune(self, block: Block, weights: list[str], tuned: list[QuantPoint]) -> tuple[int, float, float, float]:
        """AdaRound + LSQ (+ QDrop) on one block. Returns (iterations, seconds, it/s, FLOP per iteration)."""
        config, mirror = self.config, self.mirror
        rounding: list[AdaRoundQuantize] = []
        for point in tuned:
            if point.kind == "weight":
                module = AdaRoundQuantize(self.quantizers[point.tensor], mirror.initializer(point.tensor))
                self.quantizers[point.tensor] = module
                mirror.set_hook(point.tensor, module)
                rounding.append(module)
        acts = [p.tensor for p in tuned if p.kind == "activation"]
        scales = [self.quantizers[t].scale for t in acts] if config.learn_act_scales else []
        for t in acts:
            if t not in self.on_entry:  # entry quantizers are mixed with the float input instead
                self.quantizers[t].drop_prob = config.dropping
            self.quantizers[t].scale.requires_grad_(bool(scales))
        optimizers = []
        if rounding:
            optimizers.append(torch.optim.Adam([m.alpha for m in rounding], lr=config.lr_round))
        schedule = None
        if scales:
            optimizers.append(torch.optim.Adam(scales, lr=config.lr_scale))
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizers[-1], T_max=config.iters, eta_min=0.0)
        generator = torch.Generator().manual_seed(config.seed * 100003 + block.index)
        warm = int(config.warmup * config.iters)
        flop = 0.0
        started = timed_from = time.perf_counter()
        try:
            for it in range(config.iters):
                index = torch.randperm(self.n, generator=generator)[: self.batch]
                counter = FlopCounterMode(display=False) if it == 0 else None
                with counter if counter is not None else contextlib.nullcontext():
                    env = self._entry_env(block, index, config.dropping)
                    env.update(mirror.initializer_env(weights))
                    mirror.execute(env, block.node_range, keep=block.loss_outputs)
                    loss = self._loss(block, env, index)
                if counter is not None:
                    # Forward FLOPs x 3 for forward + backward: torch's counter overstates
                    # grouped-convolution backward by the group count.
                    flop = 3.0 * counter.get_total_flops()
                if it >= warm and rounding:
                    progress = (it - warm) / max(1, config.iters - warm)
                    beta = config.beta[1] + (config.beta[0] - config.beta[1]) * (1 - progress)
                    loss = loss + config.round_lambda * sum(m.regularizer(beta) for m in rounding)
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                for opt in optimizers:
                    opt.step()
                if schedule is not None:
                    schedule.step()
                if it == 0:  # the counted iteration is slow: time the rest
                    timed_from = time.perf_counter()
                if self.bar is not None and (it % 50 == 49 or it == config.iters - 1):
                    self.bar.update(it % 50 + 1)
                    self.bar.set_postfix_str(f"block {block.index + 1} loss {loss.item():.4g}")
        finally:
            for module in rounding:
                module.harden()
            for t in acts:
                self.quantizers[t].drop_prob = None
                self.quantizers[t].scale.requires_grad_(False)
        end = time.perf_counter()
        rate = (config.iters - 1) / (end - timed_from) if config.iters > 1 else config.iters / (end - started)
        return config.iters, end - started, rate, flop
