"""Tuning high-resolution convolutional blocks on random spatial tiles.

A block made only of local ops (convolutions, pooling windows, elementwise ops) computes
each output pixel from a neighbourhood of its input, so a tile of the input is a valid
input of its own. At 640x640 a PP-OCR det block takes seconds per step on two cores; on
tiles a fraction of the area it takes a matching fraction. The target of a tile is the
float block run on the same tile of the float input (BlockRunner.float_outputs), so both
sides see the same zero padding at the tile's borders and the loss compares like with like.
"""
from __future__ import annotations

import torch

from .blocks import Block

# Ops whose outputs at a pixel depend only on a window of their inputs around it.
LOCAL_OPS = {"Conv", "ConvTranspose", "BatchNormalization", "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish",
             "LeakyRelu", "PRelu", "Tanh", "Elu", "Selu", "Softplus", "Erf", "Exp", "Neg", "Abs", "Sqrt", "Identity",
             "Add", "Sub", "Mul", "Div", "Max", "Min", "MaxPool", "AveragePool", "Concat"}
_ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "PRelu"}


def tileable(block: Block, nodes, spatial: dict[str, tuple[int, ...]], constants: dict[str, torch.Tensor]) -> bool:
    """Whether the block may be tuned on tiles: local ops only, channel-axis concats, no
    constant that varies over space, and every block input 4-D with one spatial size.

    `spatial` maps the block's inputs to their shapes, `constants` the initializers it reads.
    """
    shapes = [spatial.get(name) for name in block.inputs + block.context]
    if not shapes or any(s is None or len(s) != 4 or s[2:] != shapes[0][2:] for s in shapes):
        return False
    for i in block.node_range:
        node = nodes[i]
        if node.op_type not in LOCAL_OPS:
            return False
        if node.op_type == "Concat" and node.attrs.get("axis") not in (1, -3):
            return False
        if node.op_type in _ELEMENTWISE_BINARY:
            for name in node.inputs:
                c = constants.get(name)
                if c is not None and c.dim() >= 1 and c.numel() > 1 and (c.dim() < 3 or c.shape[-1] != 1 or c.shape[-2] != 1):
                    return False
    return True


class TileSampler:
    """Random tiles of `side` x `side` pixels (clipped to the map) from a generator."""

    def __init__(self, height: int, width: int, side: int, generator: torch.Generator):
        self.height, self.width = height, width
        self.h, self.w = min(side, height), min(side, width)
        self.generator = generator

    def __call__(self) -> tuple[slice, slice]:
        top = int(torch.randint(0, self.height - self.h + 1, (), generator=self.generator))
        left = int(torch.randint(0, self.width - self.w + 1, (), generator=self.generator))
        return slice(top, top + self.h), slice(left, left + self.w)


def tile_sampler(runner, block: Block, weights: list[str], side: int, generator: torch.Generator) -> TileSampler | None:
    """A sampler of tiles for the block, or None where tiling does not apply or pay: off
    (`side` 0), Fisher-weighted loss (its weights are per full-size output), a non-local
    block, or maps of fewer than four tiles' pixels."""
    if not side or runner.fisher is not None:
        return None
    shapes = {name: tuple(runner.q.get(name, slice(0, 1)).shape) for name in block.inputs + block.context}
    constants = {name: runner.mirror.initializer(name) for name in weights}
    if not tileable(block, runner.mirror.nodes, shapes, constants):
        return None
    height, width = next(iter(shapes.values()))[2:]
    if height * width < 4 * side * side:  # under four tiles: too little saved for the float pass
        return None
    return TileSampler(height, width, side, generator)
