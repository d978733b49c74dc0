"""Stage 4: BRECQ / QDrop reconstruction, one block at a time (docs/reconstruction.md).

For each block, in graph order: the float block output is the target; the block input
comes from the already-quantized preceding blocks. AdaRound learns the rounding of the
block's weights and LSQ the step sizes of the activation quantizers the block produces,
jointly, by Adam on the (optionally Fisher-weighted) squared output error. QDrop lets each
activation element of the block, and of its input, skip quantization with probability
1 - quant_prob during tuning. Afterwards the rounding is fixed and the block's quantized
outputs become the next block's inputs. Only the current block runs, forward and backward.
"""
from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from ..mirror import Mirror
from ..progress import progress_bar
from ..quant.fake_quant import compile_kernel, quantizers_disabled, reset_masks
from ..quant.policy import QuantPoint
from ..state import QuantState
from .block_cache import TensorCache
from .blocks import Block, find_blocks
from .checkpoint import Checkpoints
from .config import ReconConfig
from .fisher import fisher_weights
from .results import BlockResult, ReconResult
from .runner import (
    BlockRunner,
    boundary_tensors,
    probe_layouts,
    quantizer_owners,
    slices,
)
from .tune import TuneStats, rtn_restorer, tune_block

log = logging.getLogger("onnxqlimit")


def reconstruct(mirror: Mirror, model, state: QuantState, feeds: Mapping[str, np.ndarray], config: ReconConfig,
                seed: int = 0, progress: bool = True, checkpoints: Checkpoints | None = None) -> ReconResult:
    """Tune the state's quantizers in place (AdaRound modules replace the tuned weights' quantizers).
    With `checkpoints`, each finished block is saved, and blocks saved by an earlier run of
    the same inputs are restored instead of tuned."""
    points, quantizers = state.points, state.quantizers
    started = time.perf_counter()
    torch.manual_seed(seed)
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
    # Graph inputs, as the model takes them (a scalar or a stacked state: Mirror.as_declared), raw in
    # both caches; their quantizers act on block entry
    chunks = [mirror.as_declared({name: feeds[name][c] for name in mirror.input_names}) for c in run.chunks]
    for name in mirror.input_names:
        for cache in (run.fp, run.q):
            cache.put(name, [chunk[name] for chunk in chunks])
    if config.loss == "fisher":
        targets = [t for b in blocks for t in b.loss_outputs]
        fisher_batches = [{k: v[c].to(mirror.device) for k, v in feeds.items()} for c in slices(n, min(batch, 8))]
        run.fisher = TensorCache(layouts, config.cache_gb * 2**30 / 4, mirror.device)
        fisher_weights(mirror, quantizers, fisher_batches, targets, run.fisher, progress)

    owners, run.on_entry = quantizer_owners(mirror, blocks, points)
    last_reader = {t: b.index for b in blocks for t in b.inputs + b.context}
    total_iters = config.iters * sum(1 for b in blocks if owners.get(b.index)) if config.method != "rtn" else 0
    bar = progress_bar(progress and total_iters > 0, total=total_iters, desc="reconstructing", unit="it")
    for name in run.on_entry:  # applied by entry_env instead of where the tensor is produced
        mirror.set_hook(name, None)
    try:
        for block in blocks:
            # A block's random numbers depend on (seed, block) alone, so a resumed run tunes
            # the blocks it did not finish exactly as an uninterrupted run would.
            torch.manual_seed(seed * 100003 + block.index)
            reset_masks()
            tuned = owners.get(block.index, [])
            names = [p.tensor for p in tuned]
            restored = checkpoints.load(block.index, run.quantizers, names, mirror.initializer, mirror.set_hook) \
                if checkpoints is not None else None
            result.blocks.append(_reconstruct_block(run, block, tuned, len(blocks), config, seed,
                                                    bar if progress else None, restored))
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
                       seed: int, bar: tqdm | None, restored: BlockResult | None = None) -> BlockResult:
    """Float target, loss before, tuning, loss after; the quantized outputs feed the next block.
    A `restored` block (its quantizers already loaded) only refills the caches."""
    weights = runner.mirror.initializers_read(block.node_range)
    with quantizers_disabled(runner.quantizers):
        runner.store(runner.fp, runner.run(runner.fp, block, weights, runner.chunks))
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
        stats = tune_block(runner, block, weights, tuned, config, seed, bar)

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
    if stats.iters and bar is not None:
        notes = ", stopped early" * stats.stopped_early + ", kept round-to-nearest" * kept_rtn
        bar.write(f"block {block.index + 1}/{count} ({result.layers} layers): loss {before:.4g} -> {after:.4g}, "
                  f"{stats.iters} it in {stats.seconds:.1f} s ({stats.its_per_s:.1f} it/s, {result.gflops:.1f} GFLOP/s, "
                  f"{stats.threads} thread{'s' * (stats.threads > 1)}{', NHWC' * stats.channels_last}{f', {stats.tile[0]}x{stats.tile[1]} tiles' if stats.tile else ''}){notes}")
    return result
