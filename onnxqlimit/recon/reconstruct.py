"""Stage 5: BRECQ / QDrop reconstruction, one block at a time (docs/reconstruction.md).

For each block, in graph order: the float block output is the target; the block input
comes from the already-quantized preceding blocks. AdaRound learns the rounding of the
block's weights and LSQ the step sizes of the activation quantizers the block produces,
jointly, by Adam on the (optionally Fisher-weighted) squared output error. QDrop lets each
activation element of the block, and of its input, skip quantization with probability
1 - drop_prob during tuning. Afterwards the rounding is fixed and the block's quantized
outputs become the next block's inputs. Only the current block runs, forward and backward.
"""
from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

from ..calibrate import set_enabled
from ..errors import QLimitError
from ..mirror import Mirror
from ..progress import progress_bar
from ..quant.fake_quant import compile_kernel, reset_masks
from ..quant.policy import QuantPoint
from ..state import QuantState
from .block_cache import TensorCache
from .blocks import GRANULARITIES, Block, BlockConfig, find_blocks
from .checkpoint import Checkpoints
from .fisher import fisher_weights
from .runner import BlockRunner, boundary_tensors, probe_layouts, quantizer_owners, slices
from .tune import TuneStats, rtn_restorer, tune_block

METHODS = ("rtn", "adaround", "brecq", "qdrop")
LOSSES = ("mse", "fisher")
log = logging.getLogger("onnxqlimit")
FAST_ITERS, FAST_BATCH = 500, 8


@dataclass(frozen=True)
class Preset:
    iters: int  # per block
    batch_size: int
    calib_size: int
    lr_round: float  # a short schedule needs a larger step for the rounding variables
    early_stop: bool  # end a block's schedule early once its loss has plateaued


# "fast" is sized for a 2-core CPU (docs/reconstruction.md has the measurements behind it);
# "paper" is the published setting: 20k iterations of batch 32 per block, 1024 samples.
PRESETS = {"fast": Preset(iters=FAST_ITERS, batch_size=FAST_BATCH, calib_size=256, lr_round=1e-2,
                              early_stop=True),
           "paper": Preset(iters=20000, batch_size=32, calib_size=1024, lr_round=1e-3, early_stop=False)}


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
    # Early stopping (tune.py): after `stop_patience` loss windows of max(stop_window, iters / 20)
    # iterations without a relative gain of `stop_tol`, the rest of the schedule is run in
    # `stop_tail` x iters.
    early_stop: bool = True
    stop_window: int = 25
    stop_tol: float = 0.01
    stop_patience: int = 2
    stop_tail: float = 0.2
    small_block_threads: bool = True  # tune blocks under tune.SMALL_BLOCK_FLOP on one CPU thread
    channels_last: bool = True  # CPU: tune on channels-last activations (faster oneDNN convolutions)
    tile: int = 64  # tune local blocks on maps of >= 4 tiles on random tile x tile crops (0: off)
    compile: bool = False  # torch.compile the fake-quant + QDrop kernel (eager where it fails)
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
        if self.tile < 0 or 0 < self.tile < 8:
            raise QLimitError(f"--tile must be 0 (off) or at least 8 pixels (got {self.tile})")

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
    stopped_early: bool = False  # the schedule was shortened on a loss plateau
    kept_rtn: bool = False  # tuning did not beat round to nearest, which was kept
    threads: int = 0
    channels_last: bool = False  # tuned on channels-last activations
    tile: tuple[int, int] | None = None  # tuned on random tiles of this size
    resumed: bool = False  # taken from a checkpoint of an interrupted run (checkpoint.py)


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
    compiled: bool = False  # the fake-quant kernel ran under torch.compile


def reconstruct(mirror: Mirror, model, state: QuantState, feeds: Mapping[str, np.ndarray],
                config: ReconConfig, checkpoints: Checkpoints | None = None) -> ReconResult:
    """Tune the state's quantizers in place (AdaRound modules replace the tuned weights' quantizers).
    With `checkpoints`, each finished block is saved, and blocks saved by an earlier run of
    the same inputs are restored instead of tuned."""
    points, quantizers = state.points, state.quantizers
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    reset_masks()
    compiled = compile_kernel(config.compile)
    blocks = find_blocks(model, config.block_config)
    total = len(next(iter(feeds.values())))
    batch = min(config.batch_size, total)
    n = total // batch * batch  # equal batches: tensors without a batch axis are then the same in each
    feeds = {k: torch.from_numpy(np.ascontiguousarray(v[:n])) for k, v in feeds.items()}
    layouts = probe_layouts(mirror, quantizers, feeds, boundary_tensors(blocks, mirror.input_names))
    run = BlockRunner(mirror, quantizers, n, batch, layouts, config.cache_gb)
    result = ReconResult(config.method, n, batch)
    for name in mirror.input_names:  # graph inputs: raw in both caches; their quantizers act on block entry
        for cache in (run.fp, run.q):
            cache.put(name, [feeds[name][c] for c in run.chunks])
    if config.loss == "fisher":
        targets = [t for b in blocks for t in b.loss_outputs]
        fisher_batches = [{k: v[c].to(mirror.device) for k, v in feeds.items()} for c in slices(n, min(batch, 8))]
        run.fisher = TensorCache(layouts, config.cache_gb * 2**30 / 4, mirror.device)
        fisher_weights(mirror, quantizers, fisher_batches, targets, run.fisher, config.progress)

    owners, run.on_entry = quantizer_owners(mirror, blocks, points)
    last_reader = {t: b.index for b in blocks for t in b.inputs + b.context}
    total_iters = config.iters * sum(1 for b in blocks if owners.get(b.index)) if config.method != "rtn" else 0
    bar = progress_bar(config.progress and total_iters > 0, total=total_iters, desc="reconstructing", unit="it")
    for name in run.on_entry:  # applied by entry_env instead of where the tensor is produced
        mirror.set_hook(name, None)
    try:
        for block in blocks:
            # A block's random numbers depend on (seed, block) alone, so a resumed run tunes
            # the blocks it did not finish exactly as an uninterrupted run would.
            torch.manual_seed(config.seed * 100003 + block.index)
            reset_masks()
            tuned = owners.get(block.index, [])
            names = [p.tensor for p in tuned]
            restored = checkpoints.load(block.index, run.quantizers, names, mirror.initializer, mirror.set_hook,
                                        BlockResult) if checkpoints is not None else None
            result.blocks.append(_reconstruct_block(run, block, tuned, len(blocks), config, bar, restored))
            if checkpoints is not None and restored is None:
                checkpoints.save(block.index, run.quantizers, names, result.blocks[-1])
            for cache in run.caches():
                for name in block.inputs + block.context + block.outputs:
                    if last_reader.get(name, -1) <= block.index:
                        cache.drop(name)
    finally:
        for name in run.on_entry:
            mirror.set_hook(name, quantizers[name])
        bar.close()
        run.close()
        compile_kernel(False)
    result.compiled = compiled
    result.peak_cache_mb = run.peak_cache_mb
    result.cache_on_disk = run.cache_on_disk
    result.seconds = time.perf_counter() - started
    result.train_seconds = sum(b.seconds for b in result.blocks)
    flops = sum(b.gflop_per_iter * b.iters for b in result.blocks)
    result.gflops = flops / result.train_seconds if result.train_seconds else 0.0  # includes the counted iteration
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _reconstruct_block(runner: BlockRunner, block: Block, tuned: list[QuantPoint], count: int, config: ReconConfig,
                       bar: tqdm | None, restored: BlockResult | None = None) -> BlockResult:
    """Float target, loss before, tuning, loss after; the quantized outputs feed the next block.
    A `restored` block (its quantizers already loaded) only refills the caches."""
    weights = runner.mirror.initializers_read(block.node_range)
    set_enabled(runner.quantizers, False)
    runner.store(runner.fp, runner.run(runner.fp, block, weights, runner.chunks))
    set_enabled(runner.quantizers, True)
    if restored is not None:
        runner.store(runner.q, runner.run(runner.q, block, weights, runner.chunks))
        runner.track()
        if bar is not None and tuned and config.method != "rtn":
            bar.update(config.iters)
        return replace(restored, resumed=True)
    eval_chunks = runner.chunks[: max(1, 128 // runner.batch)]
    before = runner.error(runner.run(runner.q, block, weights, eval_chunks), block, eval_chunks)
    stats, kept_rtn = None, False
    if tuned and config.method != "rtn":
        restore = rtn_restorer(runner, tuned)
        stats = tune_block(runner, block, weights, tuned, config, bar)

    def quantized_outputs() -> tuple[dict[str, list[torch.Tensor]], float]:
        outputs = runner.run(runner.q, block, weights, runner.chunks)
        return outputs, runner.error({k: v[: len(eval_chunks)] for k, v in outputs.items()}, block, eval_chunks)

    outputs, after = quantized_outputs()
    if stats is not None and not after <= before:  # also when tuning ended in NaN
        if not math.isfinite(after):  # never shipped: the block goes back to its round-to-nearest state
            log.warning("block %d (nodes %d-%d): the loss became %s while tuning; round to nearest kept for it",
                        block.index + 1, block.start, block.stop - 1, after)
        restore()
        kept_rtn = True
        outputs, after = quantized_outputs()
    runner.store(runner.q, outputs)
    runner.track()
    stats = stats or TuneStats(0, 0.0, 0.0, 0.0, False, 0)
    result = BlockResult(block.index, f"{block.start}-{block.stop - 1}", len(block.layers), stats.iters,
                         stats.seconds, stats.its_per_s, before, after, stats.flop_per_iter / 1e9,
                         stats.flop_per_iter * stats.its_per_s / 1e9, stats.stopped_early, kept_rtn, stats.threads,
                         stats.channels_last, stats.tile)
    if config.progress and stats.iters and bar is not None:
        notes = ", stopped early" * stats.stopped_early + ", kept round-to-nearest" * kept_rtn
        bar.write(f"block {block.index + 1}/{count} ({result.layers} layers): loss {before:.4g} -> {after:.4g}, "
                  f"{stats.iters} it in {stats.seconds:.1f} s ({stats.its_per_s:.1f} it/s, {result.gflops:.1f} GFLOP/s, "
                  f"{stats.threads} thread{'s' * (stats.threads > 1)}{', NHWC' * stats.channels_last}{f', {stats.tile[0]}x{stats.tile[1]} tiles' if stats.tile else ''}){notes}")
    return result
