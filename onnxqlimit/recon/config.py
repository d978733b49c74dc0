"""Reconstruction settings, owned here alone: the method, its schedule and its knobs.

A preset fills the schedule (samples, iterations, batch, rounding learning rate, early
stop): `ReconConfig.preset("paper", iters=2000)` is the paper's schedule with fewer
iterations. `ReconConfig()` is the "fast" preset. The run's seed and progress display
are run-level settings (RunOptions), passed to reconstruct() beside this.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import QLimitError, check_one_of
from .blocks import GRANULARITIES, BlockConfig

METHODS = ("rtn", "adaround", "brecq", "qdrop")
LOSSES = ("mse", "fisher")


@dataclass(frozen=True)
class Preset:
    calib_size: int  # calibration samples: the activation ranges and the tuning both use them
    iters: int  # per block
    batch_size: int
    lr_round: float  # a short schedule needs a larger step for the rounding variables
    early_stop: bool  # end a block's schedule early once its loss has plateaued


# "fast" is sized for a 2-core CPU (docs/reconstruction.md has the measurements behind it);
# "paper" is the published setting: 20k iterations of batch 32 per block, 1024 samples.
PRESETS = {"fast": Preset(calib_size=256, iters=500, batch_size=8, lr_round=1e-2, early_stop=True),
           "paper": Preset(calib_size=1024, iters=20000, batch_size=32, lr_round=1e-3, early_stop=False)}


@dataclass
class ReconConfig:
    method: str = "qdrop"  # rtn | adaround | brecq | qdrop
    # The schedule (a preset's fields; the defaults are the "fast" preset).
    calib_size: int = 256
    iters: int = 500
    batch_size: int = 8
    lr_round: float = 1e-2  # AdaRound learning rate
    early_stop: bool = True
    # Blocks and loss.
    granularity: str = "block"  # adaround is always layer-wise
    max_layers: int = 6
    loss: str = "mse"  # mse | fisher
    # QDrop and AdaRound.
    quant_prob: float = 0.5  # QDrop: probability that an activation element is quantized while tuning
    round_lambda: float = 0.01  # AdaRound regulariser weight (0.1 suits MobileNetV2-like nets)
    warmup: float = 0.2  # fraction of iterations without the regulariser
    beta: tuple[float, float] = (20.0, 2.0)
    lr_scale: float = 4e-5
    learn_act_scales: bool = True
    # Early stopping (tune.py): after `stop_patience` loss windows of max(stop_window, iters / 20)
    # iterations without a relative gain of `stop_tol`, the rest of the schedule is run in
    # `stop_tail` x iters.
    stop_window: int = 25
    stop_tol: float = 0.01
    stop_patience: int = 2
    stop_tail: float = 0.2
    # Speed.
    small_block_threads: bool = True  # tune blocks under tune.SMALL_BLOCK_FLOP on one CPU thread
    channels_last: bool = True  # CPU: tune on channels-last activations (faster oneDNN convolutions)
    tile: int = 64  # tune local blocks on maps of >= 4 tiles on random tile x tile crops (0: off)
    compile: bool = False  # torch.compile the fake-quant + QDrop kernel (eager where it fails)
    cache_gb: float = 8.0  # block inputs/outputs past this go to memory-mapped files

    @classmethod
    def preset(cls, name: str, **changes) -> ReconConfig:
        """The preset's schedule, with `changes` (any field) on top; a change that is None (an
        option left unset) keeps the preset's value - no field takes None."""
        check_one_of("--preset", name, PRESETS)
        return cls(**{**asdict(PRESETS[name]), **{k: v for k, v in changes.items() if v is not None}})

    def __post_init__(self):
        check_one_of("--method", self.method, METHODS)
        if self.loss not in LOSSES:
            raise QLimitError(f"--loss must be mse or fisher (got {self.loss!r})")
        check_one_of("--granularity", self.granularity, GRANULARITIES)
        if not 0 < self.quant_prob <= 1:
            raise QLimitError(f"--quant-prob must be in (0, 1] (got {self.quant_prob})")
        if self.calib_size < 1 or self.iters < 1 or self.batch_size < 1 or self.max_layers < 1:
            raise QLimitError("--calib-size, --iters, --batch-size and --block-layers must be positive")
        if self.tile < 0 or 0 < self.tile < 8:
            raise QLimitError(f"--tile must be 0 (off) or at least 8 pixels (got {self.tile})")

    @property
    def block_config(self) -> BlockConfig:
        granularity = "layer" if self.method == "adaround" else self.granularity
        return BlockConfig(granularity=granularity, max_layers=self.max_layers)

    @property
    def qdrop(self) -> float | None:
        """The probability QDrop quantizes an element with while tuning; None without QDrop."""
        return self.quant_prob if self.method == "qdrop" and self.quant_prob < 1 else None
