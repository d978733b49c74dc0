"""How one block configuration is scored: the block estimate, the whole model, and both
after a short reconstruction (the sensitivity table's measurements; sensitivity.py).

- BlockLoss.loss: BRECQ's Fisher-weighted output error of the block, from float inputs.
- BlockLoss.model_loss: the whole model's task loss with only the block quantized, run
  from the block on; after a short reconstruction at those widths when there is a schedule.
- to_model_scale: the block's configurations rescaled by the ratio of the two, measured
  on its uniform configurations.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping

import numpy as np
import torch

from ..mirror import Mirror
from ..quant.fake_quant import quantizers_disabled, reset_masks, set_enabled
from ..quant.policy import QuantPoint
from ..recon.block_cache import BatchLayout, TensorCache
from ..recon.blocks import Block
from ..recon.config import ReconConfig
from ..recon.fisher import GradTap, damped, sampled_nll, task_loss
from ..recon.runner import BlockRunner, probe_layouts
from ..recon.tune import rtn_restorer, tune_block
from ..state import QuantState
from .config import SensitivityConfig


def probe_schedule(recon: ReconConfig, config: SensitivityConfig) -> ReconConfig | None:
    """The short reconstruction each configuration gets before it is scored: the run's own
    method and settings for config.tune_iters iterations; None (round to nearest) for an
    rtn run or tune_iters 0."""
    if recon.method == "rtn" or config.tune_iters == 0:
        return None
    return replace(recon, iters=config.tune_iters)


@dataclass
class Samples:
    """Float tensors at block boundaries, the Fisher diagonal at block outputs and the float
    model's outputs, per chunk."""

    values: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    fisher: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    count: int = 0
    outputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def float_pass(mirror: Mirror, state: QuantState, feeds: Mapping[str, np.ndarray], blocks: list[Block],
                config: SensitivityConfig, seed: int, tune: ReconConfig | None = None) -> Samples:
    """The float model's block-boundary tensors and Fisher diagonal on the first
    config.sample_count(feeds) samples, in chunks of config.chunk - or of the short
    reconstructions' batch size, which must be the chunks' (a shape computed from the batch
    is cached once for every batch)."""
    if tune is not None:
        config = replace(config, chunk=tune.batch_size)
    count = config.sample_count(feeds)
    kept = list(dict.fromkeys([*mirror.input_names, *(t for b in blocks for t in b.inputs + b.context + b.outputs)]))
    loss_names = list(dict.fromkeys(t for b in blocks for t in b.loss_outputs))
    store: dict[str, torch.Tensor] = {}
    hooks = {name: mirror.get_hook(name) for name in loss_names}
    samples = Samples({n: [] for n in kept}, {n: [] for n in loss_names}, count)
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

    def __init__(self, mirror: Mirror, state: QuantState, samples: Samples, on_entry: set[str],
                 tune: ReconConfig | None = None, seed: int = 0, feeds: Mapping[str, np.ndarray] | None = None):
        self.mirror, self.state, self.samples, self.on_entry = mirror, state, samples, on_entry
        self.tune, self.seed = tune, seed
        self.runner = None
        if tune is not None:  # (`feeds`: the samples' model inputs, to find each cached tensor's batch axis)
            first = {k: torch.from_numpy(np.ascontiguousarray(v[: samples.count])) for k, v in feeds.items()}
            layouts = probe_layouts(mirror, state.quantizers, first, list(samples.values))
            self.runner = _probe_runner(mirror, state, samples, on_entry, tune, layouts)

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
        a short reconstruction at exactly these widths when there is a schedule and a weight
        below 8 bits, or rounded to nearest where that is lower (reconstruction keeps it
        where tuning does not help)."""
        return self.model_losses(block, owned, [bits])[0]

    def model_losses(self, block: Block, owned: list[QuantPoint], uniform: list[Mapping[str, int]]) -> list[float]:
        """model_loss of each of the block's uniform configurations (one weight width, one
        activation width), with one short reconstruction per weight width below 8 bits.

        It runs at the widest activations, where the weights cause most of the error and
        learned rounding recovers most; the loss it removes there is taken off the other
        activation widths too (floored at the tuned loss: narrower never costs less). A probe
        per configuration would double the probes of a block with activation choices 4/8,
        and probes are most of a table's time (PP-OCR det at 640x640: 537 of 819 s); this
        ranks as well (docs/mixed_precision.md, "Scored on the whole model")."""
        def widths(bits: Mapping[str, int], kind: str) -> list[int]:
            return [bits[p.tensor] for p in owned if p.kind == kind and p.tensor in bits]

        losses = []
        for bits in uniform:
            self._configure(owned, bits)
            losses.append(self.evaluate_model(block))
        if self.runner is None:
            return losses
        by_weight: dict[int, list[int]] = {}
        for i, bits in enumerate(uniform):
            if widths(bits, "weight") and min(widths(bits, "weight")) < 8:  # learned rounding barely moves 8 bits
                by_weight.setdefault(min(widths(bits, "weight")), []).append(i)
        tuned_losses = list(losses)
        for group in by_weight.values():
            probe = max(group, key=lambda i: min(widths(uniform[i], "activation"), default=0))
            with self.tuned(block, owned, uniform[probe]):
                tuned = min(losses[probe], self.evaluate_model(block))
            for i in group:
                tuned_losses[i] = max(tuned, losses[i] - (losses[probe] - tuned))
        return tuned_losses

    @contextlib.contextmanager
    def tuned(self, block: Block, owned: list[QuantPoint], bits: Mapping[str, int]) -> Iterator[None]:
        """Inside the `with`: the block's quantizers at `bits`, reconstructed (the others off);
        round to nearest again after it."""
        self._configure(owned, bits)
        tuned = [replace(p, spec=replace(p.spec, bits=bits[p.tensor])) for p in owned if p.tensor in bits]
        restore = rtn_restorer(self.runner, tuned)
        # Seeded as reconstruction seeds a block: a probe's score must not depend on the probes before it.
        torch.manual_seed(self.seed * 100003 + block.index)
        reset_masks()
        try:
            tune_block(self.runner, block, self.mirror.initializers_read(block.node_range), tuned, self.tune,
                       self.seed, None)
            yield
        finally:
            restore()

    def _entered(self, block: Block, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`env` with the quantizers that act on the block's entry applied to its inputs."""
        for name in block.inputs + block.context:
            if name in self.on_entry:
                env[name] = self.state.quantizers[name](env[name])
        return env

    def evaluate(self, block: Block) -> float:
        """The block's Fisher-weighted output error with its quantizers as they are."""
        mirror, samples = self.mirror, self.samples
        total = 0.0
        with torch.no_grad():
            weights = mirror.initializer_env(mirror.initializers_read(block.node_range))
            for c in range(len(next(iter(samples.values.values())))):
                inputs = {n: samples.values[n][c] for n in block.inputs + block.context}
                env = self._entered(block, {**weights, **inputs})
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
                env = self._entered(block, {**weights, **{name: values[c] for name, values in samples.values.items()}})
                mirror.execute(env, rest)
                total += sum(float(task_loss(ref[c], env[name]))
                             for name, ref in samples.outputs.items() if name in env)
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


def to_model_scale(runner: BlockLoss, block: Block, owned: list[QuantPoint], configs: list[dict[str, int]],
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
    median ratio. One measurement per uniform configuration, and one short reconstruction
    per weight width (BlockLoss.model_losses), keep the cost near one run's."""
    kinds = {p.tensor: p.kind for p in owned}

    def key(bits: Mapping[str, int]) -> tuple[int | None, int | None]:
        weights = [t for t in bits if kinds[t] == "weight"]
        dominant = max(weights, key=lambda t: diagonal.get(t, {}).get(bits[t], 0.0)) if weights else None
        acts = [b for t, b in bits.items() if kinds[t] == "activation"]
        return (bits[dominant] if dominant else None, min(acts) if acts else None)

    # Uniform among the widths the search chooses: a quantizer at one width in every configuration is fixed.
    varied = {t for t in kinds if len({c.get(t) for c in configs}) > 1}
    uniform = [(bits, loss) for bits, loss in zip(configs, losses) if loss > 0 and
               all(len({b for t, b in bits.items() if t in varied and kinds[t] == kind}) <= 1
                   for kind in ("weight", "activation"))]
    whole = runner.model_losses(block, owned, [bits for bits, _ in uniform])
    ratios = {key(bits): model / loss for (bits, loss), model in zip(uniform, whole)}
    default = float(np.median(list(ratios.values()))) if ratios else 1.0
    scaled = [loss * ratios.get(key(bits), default) for bits, loss in zip(configs, losses)]
    # Narrower never costs less: a configuration at or below another in every width keeps at
    # least its loss (ratios taken from different uniform configurations could invert them)
    return [max([value] + [other for c, other in zip(configs, scaled) if all(c[t] >= b for t, b in bits.items())])
            for bits, value in zip(configs, scaled)]


def _probe_runner(mirror: Mirror, state: QuantState, samples: Samples, on_entry: set[str], tune: ReconConfig,
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
