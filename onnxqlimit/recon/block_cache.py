"""Cached block inputs and outputs for the whole calibration set.

Reconstruction runs one block at a time, so the tensors crossing block boundaries are
computed once for all samples and kept here. A tensor is stored "batch first": its batch
axis, found by probing the model with one and two samples, is moved to the front (and
split out when an op merged it into another axis, e.g. (N*T, C)). Tensors without a
batch axis (shape arithmetic) are stored once. Past a memory budget, tensors go to
memory-mapped files in a temporary folder instead of RAM.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import QLimitError


@dataclass(frozen=True)
class BatchLayout:
    axis: int | None  # None: no batch axis, one value serves every batch
    group: int = 1  # elements of the axis per sample (> 1 when the batch was merged into it)

    def to_batch_first(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return x
        shape = list(x.shape)
        n = shape[self.axis] // self.group
        split = shape[: self.axis] + [n, self.group] + shape[self.axis + 1:]
        x = x.reshape(split).movedim(self.axis, 0)
        return x if self.group > 1 else x.squeeze(self.axis + 1)

    def from_batch_first(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return x
        if self.group == 1:
            return x.movedim(0, self.axis)
        x = x.movedim(0, self.axis)  # (..., n, group, ...)
        shape = list(x.shape)
        return x.reshape(shape[: self.axis] + [shape[self.axis] * self.group] + shape[self.axis + 2:])


def probe_layout(one: torch.Tensor, two: torch.Tensor) -> BatchLayout:
    """The batch axis of a tensor, from its values for batches of one and two samples."""
    if one.shape == two.shape:
        return BatchLayout(None)
    for axis, (a, b) in enumerate(zip(one.shape, two.shape)):
        if a != b:
            if b != 2 * a or one.dim() != two.dim():
                break
            return BatchLayout(axis, a)
    raise QLimitError(f"cannot tell the batch axis of a tensor of shape {tuple(one.shape)} "
                      f"(two samples: {tuple(two.shape)}): reconstruction needs a batch dimension")


class TensorCache:
    """name -> tensor over all samples (batch first), in RAM up to `budget_bytes`, then on disk."""

    def __init__(self, layouts: dict[str, BatchLayout], budget_bytes: float, device: torch.device):
        self.layouts, self.budget, self.device = layouts, budget_bytes, device
        self._data: dict[str, torch.Tensor | np.memmap] = {}
        self._folder: tempfile.TemporaryDirectory | None = None
        self.ram_bytes = self.disk_bytes = 0
        self.peak_bytes = 0

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def put(self, name: str, chunks: list[torch.Tensor]) -> None:
        """Store a tensor given as per-batch chunks in its native layout."""
        layout = self.layouts[name]
        if layout.axis is None:
            value = chunks[0].detach().cpu()
        else:
            value = torch.cat([layout.to_batch_first(c.detach()).cpu() for c in chunks])
        size = value.numel() * value.element_size()
        if self.ram_bytes + size > self.budget and layout.axis is not None and value.dtype != torch.bool:
            self._data[name] = self._spill(name, value.numpy())
            self.disk_bytes += size
        else:
            self._data[name] = value
            self.ram_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.ram_bytes + self.disk_bytes)

    def _spill(self, name: str, array: np.ndarray) -> np.memmap:
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="onnxqlimit-cache-")
        path = Path(self._folder.name) / f"{len(self._data)}.npy"
        mapped = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
        mapped[...] = array
        mapped.flush()
        return mapped

    def get(self, name: str, index: torch.Tensor | slice, tile: tuple[slice, slice] | None = None) -> torch.Tensor:
        """The samples `index` of a tensor, in its native layout, on the run's device; of a
        4-D tensor batched on axis 0, only the pixels `tile` (gathered without the rest)."""
        layout, value = self.layouts[name], self._data[name]
        tile = tile if value.ndim == 4 else None
        early = tile is not None and layout == BatchLayout(0)
        if early:
            value = value[..., tile[0], tile[1]]  # a view: the gather below copies the tile only
        if layout.axis is not None:
            if isinstance(value, np.memmap):
                rows = index if isinstance(index, slice) else np.sort(index.cpu().numpy())
                value = torch.from_numpy(np.ascontiguousarray(value[rows]))
                if not isinstance(index, slice):  # memmaps read faster in order; restore the batch order
                    order = torch.as_tensor(np.argsort(np.argsort(index.cpu().numpy())))
                    value = value[order]
            else:
                value = value[index]
            value = layout.from_batch_first(value)
        if tile is not None and not early:
            value = value[..., tile[0], tile[1]]
        return value.to(self.device, non_blocking=True)

    def drop(self, name: str) -> None:
        value = self._data.pop(name, None)
        if value is None:
            return
        size = value.size * value.itemsize if isinstance(value, np.memmap) else value.numel() * value.element_size()
        if isinstance(value, np.memmap):
            self.disk_bytes -= size
            Path(value.filename).unlink(missing_ok=True)
        else:
            self.ram_bytes -= size

    def close(self) -> None:
        self._data.clear()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None
