"""Tuning one block: AdaRound rounding + LSQ step sizes (+ QDrop), jointly, by Adam.

AdaRound learns the rounding of the block's weights and LSQ the step sizes of the
activation quantizers the block owns, on the (optionally Fisher-weighted) squared
output error over cached inputs; QDrop lets each activation element skip quantization
with probability 1 - drop_prob. At the end the rounding is hardened.
"""
from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ..quant.adaround import AdaRoundQuantize
from ..quant.policy import QuantPoint
from .blocks import Block
from .runner import BlockRunner

if TYPE_CHECKING:  # reconstruct imports this module
    from .reconstruct import ReconConfig


def tune_block(runner: BlockRunner, block: Block, weights: list[str], tuned: list[QuantPoint], config: ReconConfig,
               bar: tqdm | None) -> tuple[int, float, float, float]:
    """AdaRound + LSQ (+ QDrop) on one block. Returns (iterations, seconds, it/s, FLOP per iteration)."""
    mirror = runner.mirror
    rounding: list[AdaRoundQuantize] = []
    for point in tuned:
        if point.kind == "weight":
            module = AdaRoundQuantize(runner.quantizers[point.tensor], mirror.initializer(point.tensor))
            runner.quantizers[point.tensor] = module
            mirror.set_hook(point.tensor, module)
            rounding.append(module)
    acts = [p.tensor for p in tuned if p.kind == "activation"]
    scales = [runner.quantizers[t].scale for t in acts] if config.learn_act_scales else []
    for t in acts:
        if t not in runner.on_entry:  # entry quantizers are mixed with the float input instead
            runner.quantizers[t].drop_prob = config.dropping
        runner.quantizers[t].scale.requires_grad_(bool(scales))
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
            index = torch.randperm(runner.n, generator=generator)[: runner.batch]
            counter = FlopCounterMode(display=False) if it == 0 else None
            with counter if counter is not None else contextlib.nullcontext():
                env = runner.entry_env(block, index, config.dropping)
                env.update(mirror.initializer_env(weights))
                mirror.execute(env, block.node_range, keep=block.loss_outputs)
                loss = runner.loss(block, env, index)
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
            if bar is not None and (it % 50 == 49 or it == config.iters - 1):
                bar.update(it % 50 + 1)
                bar.set_postfix_str(f"block {block.index + 1} loss {loss.item():.4g}")
    finally:
        for module in rounding:
            module.harden()
        for t in acts:
            runner.quantizers[t].drop_prob = None
            runner.quantizers[t].scale.requires_grad_(False)
    end = time.perf_counter()
    rate = (config.iters - 1) / (end - timed_from) if config.iters > 1 else config.iters / (end - started)
    return config.iters, end - started, rate, flop
