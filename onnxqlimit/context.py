"""The run-level settings (RunOptions) and the one object every stage after prepare()
takes (Context): the settings, the loaded model, its mirror and the data."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from .data import batches
from .mirror import Mirror
from .mixed.config import EvalData, MixedConfig
from .quant.config import QuantConfig
from .recon.config import ReconConfig


@dataclass
class RunOptions:
    recon: ReconConfig = field(default_factory=ReconConfig)  # method, schedule (presets), blocks, QDrop, AdaRound
    mixed: MixedConfig = field(default_factory=MixedConfig)  # a search runs when its targets are set
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch CPU threads; default: the user's own setting, else every core
    simplify: bool = True
    overwrite: bool = False  # allow the output path to be the input model's own file
    preprocess: str | None = None  # for image-folder calibration
    parity_samples: int = 32
    progress: bool = True
    bits_plan: str | None = None  # a JSON plan (node -> {wbits, abits}) to quantize with
    save_plan: str | None = None  # write the plan used here
    eval_data: str | None = None  # .npz (model inputs, optional `labels`) for --target-metric
    work_dir: str | None = None  # sensitivity/latency tables and block checkpoints; None: none kept
    resume: bool = False  # restore the blocks an interrupted run of the same inputs saved in work_dir


@dataclass
class Context:
    """One run, as the stages after prepare() see it."""

    config: QuantConfig
    options: RunOptions
    device: torch.device
    original: onnx.ModelProto  # the model as given
    model: onnx.ModelProto  # as loaded (simplified, constants lifted, BatchNorm folded): the mirror's graph
    mirror: Mirror
    feeds: dict[str, np.ndarray]  # the calibration samples
    held_back: dict[str, np.ndarray]  # source samples past calib_size, for the end-of-run quality (may be empty)
    eval_data: EvalData | None = None  # --eval data for --target-metric
    external_data: bool = False  # the model file keeps its weights in a data file: the output will too
    plan_entries: dict | None = None  # the --bits-plan file's node -> widths, read once
    smoothed: dict[str, float] = field(default_factory=dict)  # SmoothQuant alpha per smoothed tensor

    @property
    def recon(self) -> ReconConfig:
        return self.options.recon

    @property
    def samples(self) -> int:
        return len(next(iter(self.feeds.values())))

    def batches(self, size: int | None = None) -> list[dict[str, np.ndarray]]:
        """The calibration samples in batches of `size` (default: the reconstruction's)."""
        return list(batches(self.feeds, size or self.recon.batch_size))
