"""Checkpoints of a reconstruction: each finished block's learned quantizers, saved as the
block completes, so that a run killed mid-way resumes where it stopped.

A run's checkpoints live in `<work dir>/run-<key>/`, where the key hashes everything the
learned state depends on (the model, the calibration arrays, the quantization and
reconstruction settings, the bit plan): a resumed run can only pick up its own blocks.
Every block draws its random numbers from a generator seeded by (seed, block index), so a
block tuned after a resume is the block an uninterrupted run would have tuned, and the
file is byte-identical. The folder is removed once the model is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..quant.adaround import AdaRoundQuantize
from ..quant.fake_quant import FakeQuantize
from .results import BlockResult

log = logging.getLogger("onnxqlimit")


def run_key(model_bytes: bytes, feeds: Mapping[str, np.ndarray], settings: dict) -> str:
    digest = hashlib.sha256(model_bytes)
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        digest.update(f"{name}{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


class Checkpoints:
    def __init__(self, work_dir: Path, key: str, resume: bool):
        self.folder = Path(work_dir) / f"run-{key}"
        if not resume and self.folder.exists():  # a fresh run never reuses an old one's blocks
            shutil.rmtree(self.folder)
        if resume and not self.folder.exists():
            log.warning("--resume: no saved blocks for this model, data and options; starting from the first block")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.resumed = 0

    def _path(self, index: int) -> Path:
        return self.folder / f"block-{index:04d}.pt"

    def save(self, index: int, quantizers: Mapping[str, FakeQuantize], names: list[str], result: BlockResult) -> None:
        state = {name: {"adaround": isinstance(quantizers[name], AdaRoundQuantize),
                        "hard": bool(getattr(quantizers[name], "hard", False)),
                        "tensors": {k: v.detach().cpu() for k, v in quantizers[name].state_dict().items()}}
                 for name in names}
        payload = {"quantizers": state, "result": {k: v for k, v in asdict(result).items()}}
        tmp = self._path(index).with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self._path(index))  # a kill mid-write leaves no half checkpoint

    def load(self, index: int, quantizers: dict[str, FakeQuantize], names: list[str], initializer,
             set_hook) -> BlockResult | None:
        """Put a finished block's quantizers back; its BlockResult, or None if not saved."""
        path = self._path(index)
        if not path.exists():
            return None
        payload = torch.load(path, weights_only=True)
        for name in names:
            saved = payload["quantizers"][name]
            module = quantizers[name]
            if saved["adaround"]:
                module = AdaRoundQuantize(module, initializer(name))
                quantizers[name] = module
                set_hook(name, module)
                if saved["hard"]:  # a hard module keeps its chosen integers only: take that form first
                    module.harden()
            device = module.scale.device
            module.load_state_dict({k: v.to(device) for k, v in saved["tensors"].items()})
        known = {f.name for f in fields(BlockResult)}
        values = {k: v for k, v in payload["result"].items() if k in known}
        if values.get("tile") is not None:
            values["tile"] = tuple(values["tile"])
        self.resumed += 1
        return BlockResult(**values)

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
