"""BRECQ's Fisher-diagonal weights for the reconstruction loss, computed once, without labels.

The weight of each element of a block output is the squared gradient of a task loss with
respect to that element, taken on the quantized (round-to-nearest) model: KL(float ||
quantized) for outputs that are probabilities or class logits, squared error for the rest
(maps, boxes, embeddings). Gradients are scaled by their mean magnitude per tensor and
damped with +1, so an element with an average gradient weighs 4 and one with none weighs
1 (BRECQ's code adds the +1 to raw gradients, which are ~1e-6: that is plain MSE).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..mirror import Mirror
from ..progress import progress_bar
from ..quant.fake_quant import FakeQuantize, quantizers_disabled
from .block_cache import TensorCache


class GradTap(nn.Module):
    """Keeps a handle on a tensor (after its quantizer) so its gradient can be asked for."""

    def __init__(self, inner: nn.Module | None, store: dict[str, torch.Tensor], name: str):
        super().__init__()
        self.inner, self.store, self.name = inner, store, name

    def forward(self, x):
        y = self.inner(x) if self.inner is not None else x
        if y.is_floating_point() and not y.requires_grad:
            y = y.detach().requires_grad_()
        self.store[self.name] = y
        return y


def output_kind(reference: torch.Tensor) -> str:
    """"probabilities" (last axis sums to 1), "logits" (N x classes) or "values" (maps, boxes, embeddings)."""
    ref = reference.float()
    if ref.dim() >= 2 and ref.min() >= 0 and ref.max() <= 1 and torch.allclose(ref.sum(-1), torch.ones(()), atol=1e-3):
        return "probabilities"
    if ref.dim() == 2 and ref.shape[1] > 1:
        return "logits"
    return "values"


def task_loss(reference: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Label-free loss of one model output against the float model's, summed over samples:
    KL(float || quantized) for class outputs, else half the squared error relative to the
    output's mean square (so outputs in pixels and in [0, 1] weigh alike)."""
    ref, out = reference.float(), output.float()
    kind = output_kind(ref)
    if kind == "probabilities":
        return (ref * (torch.log(ref.clamp_min(1e-12)) - torch.log(out.clamp_min(1e-12)))).sum()
    if kind == "logits":
        p = torch.softmax(ref, dim=1)
        return (p * (torch.log_softmax(ref, dim=1) - torch.log_softmax(out, dim=1))).sum()
    return 0.5 * (out - ref).pow(2).sum() / ref.pow(2).mean().clamp_min(1e-12)


def sampled_nll(output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """-log p(y | x) of a label y drawn from the model's own prediction (Gaussian noise for
    "values" outputs). Its squared gradient is, in expectation, the Fisher information:
    the Hessian of task_loss at the float model, with no labels needed."""
    kind = output_kind(output.detach())
    if kind == "values":
        noise = torch.randn(output.shape, generator=generator).to(output.device)
        return (output.float() * noise).sum() / output.detach().float().pow(2).mean().clamp_min(1e-12).sqrt()
    logp = torch.log(output.float().clamp_min(1e-12)) if kind == "probabilities" else torch.log_softmax(output.float(), 1)
    moved = logp.movedim(-1 if kind == "probabilities" else 1, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    labels = torch.multinomial(flat.detach().exp().cpu(), 1, generator=generator).to(flat.device)
    return -flat.gather(1, labels).sum()


def fisher_weights(mirror: Mirror, quantizers: Mapping[str, FakeQuantize], batches: list[dict[str, torch.Tensor]],
                   names: list[str], cache: TensorCache, progress: bool = True) -> None:
    """Store into `cache`, for every tensor in `names`, (1 + |g| / mean|g|)^2 over all samples."""
    store: dict[str, torch.Tensor] = {}
    originals = {name: mirror.get_hook(name) for name in names}
    grads: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    try:
        for name, hook in originals.items():
            mirror.set_hook(name, GradTap(hook, store, name))
        for batch in progress_bar(progress, batches, desc="fisher", unit="batch", leave=False):
            with torch.no_grad(), quantizers_disabled(quantizers):
                reference = mirror.run(batch)
            output = mirror.run(batch)
            loss = sum(task_loss(reference[o], output[o]) for o in mirror.output_names)
            tensors = [store[name] for name in names]
            found = torch.autograd.grad(loss, tensors, allow_unused=True) if loss.requires_grad else [None] * len(names)
            for name, t, g in zip(names, tensors, found):
                grads[name].append((g if g is not None else torch.zeros_like(t)).detach().abs().cpu())
            store.clear()
    finally:
        for name, hook in originals.items():
            mirror.set_hook(name, hook)
    for name, chunks in grads.items():
        cache.put(name, damped(chunks))


def damped(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """(1 + |g| / mean|g|)^2 per element, the mean over all chunks of one tensor."""
    mean = torch.cat([g.reshape(-1) for g in grads]).abs().mean().clamp_min(1e-30)
    return [(1 + g.abs() / mean).pow(2) for g in grads]
