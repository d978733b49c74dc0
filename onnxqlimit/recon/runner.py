"""The block runner: cached block inputs for all samples, one block run at a time.

Reconstruction (and anything else that asks "what is this block's loss with these
quantizers?") runs one block at a time over tensors cached at block boundaries; see
block_cache.py for the cache and docs/reconstruction.md for the loop.
"""
from __future__ import annotations

import bisect

import torch
from tqdm import tqdm

from ..errors import QLimitError
from ..mirror import Mirror
from ..quant.fake_quant import (
    FakeQuantize,
    is_channels_last,
    keep_mask,
    mix,
    quantizers_disabled,
)
from ..quant.policy import QuantPoint
from .block_cache import BatchLayout, TensorCache, probe_layout
from .blocks import Block


def slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def boundary_tensors(blocks: list[Block], graph_inputs: list[str]) -> list[str]:
    names = list(graph_inputs)
    for b in blocks:
        names += b.inputs + b.context + b.outputs
    return list(dict.fromkeys(names))


def probe_layouts(mirror: Mirror, quantizers, feeds, names: list[str]) -> dict[str, BatchLayout]:
    """Batch axis of every cached tensor, from float runs on one and on two samples."""
    if len(next(iter(feeds.values()))) < 2:
        raise QLimitError("reconstruction needs at least 2 calibration samples")
    with torch.no_grad(), quantizers_disabled(quantizers):
        one, two = (mirror.run({k: v[:k_].to(mirror.device) for k, v in feeds.items()}, names) for k_ in (1, 2))
    return {name: probe_layout(one[name], two[name]) for name in names}


def quantizer_owners(mirror: Mirror, blocks: list[Block], points: list[QuantPoint]) -> tuple[dict[int, list[QuantPoint]], set[str]]:
    """Which block tunes which quantizer, and which activation quantizers act on block entry.

    A weight belongs to the block of its (first) layer. An activation quantizer belongs to
    the first block that reads its tensor and acts when that block (and any later reader)
    takes the tensor in: the producing block's loss then sees its unquantized output, and
    the quantizer is tuned with the layers it feeds. A tensor also read inside the block
    that produces it keeps its quantizer there. Gather tables belong to no block.
    """
    starts = [b.start for b in blocks]

    def block_at(index: int) -> int:
        return bisect.bisect_right(starts, index) - 1

    produced_in = {name: block_at(i) for i, node in enumerate(mirror.nodes) for name in node.outputs}
    readers: dict[str, set[int]] = {}
    for i in range(len(mirror.nodes)):
        for name in mirror.reads(i):  # (a control-flow node's subgraphs read too)
            readers.setdefault(name, set()).add(block_at(i))
        for name in mirror.inside(i):  # what a branch or loop body computes belongs to the node's block
            readers.setdefault(name, set()).add(block_at(i))
            produced_in.setdefault(name, block_at(i))
    owners: dict[int, list[QuantPoint]] = {}
    on_entry: set[str] = set()
    for point in points:
        read_by = readers.get(point.tensor, set())
        if not read_by or point.table:  # a table's rows are looked up, and most never appear in calibration
            continue
        owner = min(read_by)
        if point.kind == "activation":
            if produced_in.get(point.tensor, -1) in read_by:
                owner = produced_in[point.tensor]
            else:
                on_entry.add(point.tensor)
        owners.setdefault(owner, []).append(point)
    return owners, on_entry


def squared_error(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Squared error summed over axis 1 (channels) and averaged over the rest, as in the
    BRECQ/QDrop code: the AdaRound regulariser weight (lambda) is tuned against this scale."""
    if is_channels_last(out):  # one layout for both, or every pass below runs strided
        target = target.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last) if weight is not None else None
    err = (out.float() - target.float()).pow(2)
    if weight is not None:
        err = err * weight
    return err.sum() * (err.shape[1] / err.numel()) if err.dim() >= 2 else err.mean()


class BlockRunner:
    """Runs blocks over the cached inputs of every calibration sample and scores them.

    Holds the float model's (`fp`) and the quantized model's (`q`) tensors at block
    boundaries, optionally the Fisher weights, and the quantizers; `run` executes a block
    on sample ranges, `loss` is the reconstruction loss of one batch, `error` its mean.
    """

    def __init__(self, mirror: Mirror, quantizers: dict[str, FakeQuantize], n: int, batch: int,
                 layouts: dict[str, BatchLayout], cache_gb: float):
        self.mirror, self.quantizers, self.n, self.batch = mirror, quantizers, n, batch
        budget = cache_gb * 2**30
        self.fp = TensorCache(layouts, budget / 2, mirror.device)  # the float model's tensors
        self.q = TensorCache(layouts, budget / 2, mirror.device)  # the quantized model's, before entry quantizers
        self.fisher: TensorCache | None = None
        self.chunks = slices(n, batch)
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

    def entry_env(self, block: Block, index, quant_prob: float | None = None,
                  tile: tuple[slice, slice] | None = None) -> dict[str, torch.Tensor]:
        """The block's inputs for samples `index` (and pixels `tile` of 4-D ones): cached
        quantized-model tensors, entry quantizers applied; with `quant_prob`, each element is the
        float model's value instead with probability 1 - quant_prob (QDrop)."""
        env = {}
        for name in block.inputs + block.context:
            x = self.q.get(name, index, tile)
            if name in self.on_entry:
                x = self.quantizers[name](x)
            if quant_prob is not None and name in block.inputs and x.is_floating_point():
                x = mix(self.fp.get(name, index, tile), x, keep_mask(x, quant_prob))
            env[name] = x
        return env

    def run(self, cache: TensorCache, block: Block, weights: list[str],
             chunks: list[slice]) -> dict[str, list[torch.Tensor]]:
        """The block's outputs for the given sample ranges (float inputs from `cache` when
        quantizers are off), with the quantizers as they are."""
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in block.outputs}
        with torch.no_grad():
            weight_env = self.mirror.initializer_env(weights)
            for chunk in chunks:
                env = {**weight_env, **(self.entry_env(block, chunk) if cache is self.q else
                                        {name: cache.get(name, chunk) for name in block.inputs + block.context})}
                self.mirror.execute(env, block.node_range, keep=block.outputs)
                for name in block.outputs:
                    outputs[name].append(env[name])
        return outputs

    def float_outputs(self, block: Block, weights: list[str], index, tile: tuple[slice, slice]) -> dict[str, torch.Tensor]:
        """The float block's loss outputs for samples `index`, on pixels `tile` of the float
        model's inputs (the target of a tiled tuning step; tiles.py)."""
        env = {name: self.fp.get(name, index, tile) for name in block.inputs + block.context}
        with torch.no_grad(), quantizers_disabled(self.quantizers):  # all are on while a block tunes
            env.update(self.mirror.initializer_env(weights))
            self.mirror.execute(env, block.node_range, keep=block.loss_outputs)
        return {name: env[name] for name in block.loss_outputs}

    @staticmethod
    def store(cache: TensorCache, outputs: dict[str, list[torch.Tensor]]) -> None:
        for name, chunks in outputs.items():
            cache.put(name, chunks)

    def loss(self, block: Block, env: dict[str, torch.Tensor], index,
             targets: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Loss against the float model's cached outputs for samples `index`, or `targets`."""
        return sum(squared_error(env[o], targets[o] if targets is not None else self.fp.get(o, index),
                                 self.fisher.get(o, index) if self.fisher else None)
                   for o in block.loss_outputs)

    def error(self, outputs: dict[str, list[torch.Tensor]], block: Block, chunks: list[slice]) -> float:
        """Reconstruction loss over the given (equal-sized) sample ranges."""
        return sum(float(self.loss(block, {k: v[i] for k, v in outputs.items()}, chunk))
                   for i, chunk in enumerate(chunks)) / len(chunks)

    def track(self) -> None:
        """Note the caches' peak size and whether they spilled to disk."""
        self.peak_cache_mb = max(self.peak_cache_mb, sum(c.peak_bytes for c in self.caches()) / 2**20)
        self.cache_on_disk |= bool(self.fp.disk_bytes or self.q.disk_bytes)
