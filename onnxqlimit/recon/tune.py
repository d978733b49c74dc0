"""Tuning one block: AdaRound rounding + LSQ step sizes (+ QDrop), jointly, by Adam.

AdaRound learns the rounding of the block's weights and LSQ the step sizes of the
activation quantizers the block owns, on the (optionally Fisher-weighted) squared
output error over cached inputs; QDrop lets each activation element skip quantization
with probability 1 - quant_prob. At the end the rounding is hardened.

The schedule runs on a progress clock p in [0, 1]: the regulariser is off while
p < warmup, then its beta falls from 20 to 2, and the step-size learning rate follows a
cosine in p. With early stopping, once the reconstruction loss has stopped improving the
clock is sped up so that the rest of the schedule (the anneal to hard rounding) is run in
a short tail instead of the remaining iterations; without it p = it / iters exactly.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ..quant.adaround import AdaRoundQuantize
from ..quant.policy import QuantPoint
from .blocks import Block
from .config import ReconConfig
from .runner import BlockRunner
from .tiles import tile_sampler

# Blocks below this many FLOP per iteration (forward + backward) tune on one thread: a
# second thread saves less than the synchronisation costs, and on a busy machine two
# threads spin-wait on each other (docs/reconstruction.md, "CPU threads").
SMALL_BLOCK_FLOP = 50e6
# ... and below this many elements in its inputs, weights and outputs: the FLOP counter
# sees only matmuls and convolutions, and a block of upsamplings and adds on large maps
# (PP-OCR det's FPN at 640x640: 0.0 GFLOP counted, 0.8 s per step) is no small block.
SMALL_BLOCK_ELEMENTS = 2**20


# Ops that reshape or reorder axes: on channels-last tensors they copy back to NCHW, which
# costs more than the convolutions gain (PP-OCR rec's transformer blocks: 0.6-0.8x).
_LAYOUT_OPS = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MatMul", "Gemm", "Einsum",
               "DepthToSpace", "SpaceToDepth"}


def wants_channels_last(block: Block, nodes) -> bool:
    """Convolutional blocks without reshapes: the ones channels-last pays for."""
    ops = {nodes[i].op_type for i in block.node_range}
    return "Conv" in ops and not ops & _LAYOUT_OPS


def channels_last(env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """4-D float tensors in channels-last layout: oneDNN's convolutions, forward and
    backward, run up to 3x faster on it than on NCHW (docs/reconstruction.md); the
    layout follows through the block's elementwise ops. Values are unchanged."""
    return {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 and v.is_floating_point() else v
            for k, v in env.items()}


@dataclass
class TuneStats:
    iters: int
    seconds: float
    its_per_s: float  # without the FLOP-counted first iteration
    flop_per_iter: float
    stopped_early: bool
    threads: int
    channels_last: bool = False
    tile: tuple[int, int] | None = None  # tuned on random tiles of this many pixels (tiles.py)


class ProgressClock:
    """p(it) = it / iters, until `stop_at(it)` makes the rest of [p, 1] last `tail` iterations."""

    def __init__(self, iters: int, tail: int):
        self.iters, self.tail = iters, tail
        self.end = iters
        self._from: tuple[int, float] | None = None  # (iteration, progress) where the tail starts

    def __call__(self, it: int) -> float:
        if self._from is None:
            return it / self.iters
        start, p = self._from
        return p + (1 - p) * (it - start) / max(1, self.end - start)

    def stop_at(self, it: int, floor: float) -> None:
        """Finish within `tail` iterations from `it`, starting the tail no earlier than progress `floor`."""
        if self._from is None and self.end - it > self.tail:
            self._from = (it, max(self(it), floor))
            self.end = it + self.tail

    @property
    def shortened(self) -> bool:
        return self._from is not None


class Plateau:
    """Window means of the loss; a plateau is `patience` windows in a row without a
    relative improvement of `tol` over the best window so far. Losses are summed as
    tensors, so a GPU run synchronises once per window, not once per step."""

    def __init__(self, window: int, tol: float, patience: int):
        self.window, self.tol, self.patience = window, tol, patience
        self.best, self.stale, self._sum, self._count = math.inf, 0, 0.0, 0

    def update(self, loss: torch.Tensor | float) -> bool:
        self._sum, self._count = self._sum + loss, self._count + 1
        if self._count < self.window:
            return False
        mean, self._sum, self._count = float(self._sum) / self.window, 0.0, 0
        if mean < self.best * (1 - self.tol):
            self.best, self.stale = mean, 0
        else:
            self.best, self.stale = min(self.best, mean), self.stale + 1
        return self.stale >= self.patience


def rtn_restorer(runner: BlockRunner, tuned: list[QuantPoint]) -> Callable[[], None]:
    """A function that puts back the block's quantizers as they are now (round to nearest,
    calibrated step sizes): tuning must never leave a block worse than its start."""
    saved = {p.tensor: runner.quantizers[p.tensor] for p in tuned}
    scales = {p.tensor: saved[p.tensor].scale.detach().clone() for p in tuned if p.kind == "activation"}

    def restore() -> None:
        for point in tuned:
            runner.quantizers[point.tensor] = saved[point.tensor]
            if point.kind == "weight":
                runner.mirror.set_hook(point.tensor, saved[point.tensor])
        with torch.no_grad():
            for name, scale in scales.items():
                saved[name].scale.copy_(scale)
    return restore


def tune_block(runner: BlockRunner, block: Block, weights: list[str], tuned: list[QuantPoint], config: ReconConfig,
               seed: int, bar: tqdm | None) -> TuneStats:
    """AdaRound + LSQ (+ QDrop) on one block, in place."""
    mirror = runner.mirror
    rounding: list[AdaRoundQuantize] = []
    for point in tuned:
        if point.kind == "weight" and not point.spec.is_float:  # (a weight left float has nothing to round)
            module = AdaRoundQuantize(runner.quantizers[point.tensor], mirror.initializer(point.tensor))
            runner.quantizers[point.tensor] = module
            mirror.set_hook(point.tensor, module)
            rounding.append(module)
    # 16-bit activations keep their calibrated steps (their rounding error is 256x below 8-bit's:
    # learning and dropping them adds noise, not accuracy) and tied ones their source's
    acts = [p.tensor for p in tuned if p.kind == "activation" and p.spec.bits <= 8 and p.tied_to is None]
    scales = [runner.quantizers[t].scale for t in acts] if config.learn_act_scales else []
    for t in acts:
        if t not in runner.on_entry:  # entry quantizers are mixed with the float input instead
            runner.quantizers[t].quant_prob = config.qdrop
        runner.quantizers[t].scale.requires_grad_(bool(scales))
    round_opt = torch.optim.Adam([m.alpha for m in rounding], lr=config.lr_round) if rounding else None
    scale_opt = torch.optim.Adam(scales, lr=config.lr_scale) if scales else None
    optimizers = [o for o in (round_opt, scale_opt) if o is not None]
    generator = torch.Generator().manual_seed(seed * 100003 + block.index)
    clock = ProgressClock(config.iters, max(1, round(config.stop_tail * config.iters)))
    plateau = Plateau(max(config.stop_window, config.iters // 20), config.stop_tol, config.stop_patience)
    threads = block_threads = torch.get_num_threads()
    nhwc = False  # decided with the thread count, after the first (FLOP-counted) step
    tiles = tile_sampler(runner, block, weights, config.tile, generator)
    flop, it, shown = 0.0, 0, 0
    started = timed_from = time.perf_counter()
    try:
        while it < clock.end:
            p = clock(it)
            if scale_opt is not None:  # cosine decay in p (CosineAnnealingLR when p = it / iters)
                scale_opt.param_groups[0]["lr"] = config.lr_scale * 0.5 * (1 + math.cos(math.pi * p))
            index = torch.randperm(runner.n, generator=generator)[: runner.batch]
            tile = tiles() if tiles is not None else None
            targets = runner.float_outputs(block, weights, index, tile) if tile is not None else None
            counter = FlopCounterMode(display=False) if it == 0 else None
            with counter if counter is not None else contextlib.nullcontext():
                env = runner.entry_env(block, index, config.qdrop, tile)
                if nhwc:
                    env = channels_last(env)
                env.update(mirror.initializer_env(weights))
                mirror.execute(env, block.node_range, keep=block.loss_outputs)
                loss = runner.loss(block, env, index, targets)
            recon_loss = loss.detach()
            if p >= config.warmup and rounding:
                beta = config.beta[1] + (config.beta[0] - config.beta[1]) * (1 - (p - config.warmup) / (1 - config.warmup))
                loss = loss + config.round_lambda * sum(m.regularizer(beta) for m in rounding)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            for opt in optimizers:
                opt.step()
            for t in acts if scales else ():  # a learned scale stays inside a folded Clip's range
                runner.quantizers[t].fit_range()
            if it == 0:
                # Forward FLOPs x 3 for forward + backward: torch's counter overstates
                # grouped-convolution backward by the group count.
                flop = 3.0 * counter.get_total_flops()
                on_cpu = mirror.device.type == "cpu"
                elements = sum(v.numel() for v in env.values() if v.is_floating_point())
                if config.small_block_threads and flop < SMALL_BLOCK_FLOP and elements < SMALL_BLOCK_ELEMENTS and on_cpu:
                    block_threads = 1
                    torch.set_num_threads(1)
                nhwc = config.channels_last and on_cpu and flop >= SMALL_BLOCK_FLOP and wants_channels_last(block, mirror.nodes)
                timed_from = time.perf_counter()  # the counted iteration is slow: time the rest
            it += 1
            if config.early_stop and plateau.update(recon_loss):
                clock.stop_at(it, config.warmup)
            if bar is not None and (it % 50 == 0 or it == clock.end):
                # The bar counts planned iterations: an early stop skips the rest of the block's.
                step = config.iters - shown if it == clock.end else it - shown
                bar.update(step)
                shown += step
                bar.set_postfix_str(f"block {block.index + 1} loss {recon_loss.item():.4g}")
    finally:
        torch.set_num_threads(threads)
        for module in rounding:
            module.harden()
        for t in acts:
            runner.quantizers[t].quant_prob = None
            runner.quantizers[t].scale.requires_grad_(False)
    end = time.perf_counter()
    rate = (it - 1) / (end - timed_from) if it > 1 else it / (end - started)
    return TuneStats(it, end - started, rate, flop, clock.shortened, block_threads, nhwc,
                     (tiles.h, tiles.w) if tiles is not None else None)
