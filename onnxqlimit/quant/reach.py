"""Which compute layers are "last": their output reaches no other compute layer.

The graph alone cannot tell when a decode concatenates several heads and splits them
apart again (YOLOv8: box bins and class logits are concatenated, then split; the bins go
to the DFL convolution, the logits straight to the output). By tensors, every head then
lies upstream of the DFL convolution and none is last, so the class logits fell to the
narrowest width, where they broke first. This module follows elements instead: one
forward pass of the mirror in which every compute layer is a gradient barrier whose
output is a leaf, and one backward pass from a random projection of every compute
layer's input. A layer whose output gets no gradient reaches no compute layer.

A gradient can also be zero because of the values (a saturated HardSigmoid gate, a dead
ReLU), so the element test only decides for layers whose every path to a compute layer
goes through an op that selects elements (Split, Slice, Gather); every other layer keeps
the graph's answer.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..mirror import Mirror
from .policy import COMPUTE_OPS, feeding_compute

SELECTING_OPS = ("Split", "Slice", "Gather", "GatherElements", "GatherND")


def last_layers(mirror: Mirror, batch: Mapping[str, np.ndarray], seed: int = 0) -> set[str]:
    """Names of the compute nodes none of whose output elements reach another compute node,
    found on one `batch` of inputs (one sample will do, unless the model fixes its batch)."""
    generator = torch.Generator().manual_seed(seed)
    env = mirror.initial_env(batch)
    leaves: dict[str, torch.Tensor] = {}
    probes: list[torch.Tensor] = []
    with torch.enable_grad():
        for index, node in enumerate(mirror.nodes):
            args = [mirror.value(env, name) if name else None for name in node.inputs]
            compute = node.op_type in COMPUTE_OPS
            if compute:  # what reaches this layer: projected on fixed random weights (a plain sum
                for a in args:  # would give softmax outputs a zero gradient)
                    if isinstance(a, torch.Tensor) and a.requires_grad:
                        weight = torch.randn(a.shape, generator=generator).to(a.device, a.dtype)
                        probes.append((a * weight).sum())
                with torch.no_grad():
                    result = mirror.call(index, args, env)
            else:
                result = mirror.call(index, args, env)
            results = list(result) if isinstance(result, (tuple, list)) else [result]
            if compute and isinstance(results[0], torch.Tensor) and results[0].is_floating_point():
                results[0] = results[0].detach().requires_grad_(True)
                leaves[node.name] = results[0]
            for name, value in zip(node.outputs, results):
                if name:
                    env[name] = value
        if not probes or not leaves:
            return set(leaves)
        grads = torch.autograd.grad(torch.stack(probes).sum(), list(leaves.values()), allow_unused=True)
    unreached = {name for name, g in zip(leaves, grads) if g is None or not bool(g.ne(0).any())}
    nodes = [(n.name, n.op_type, n.inputs, n.outputs) for n in mirror.nodes]
    return unreached - feeding_compute(nodes, SELECTING_OPS)
