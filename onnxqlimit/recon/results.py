"""What a reconstruction reports: one BlockResult per block, a ReconResult for the run
(checkpoint.py saves and restores BlockResults with the blocks they describe)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BlockResult:
    index: int
    nodes: str
    layers: int
    iters: int
    seconds: float
    its_per_s: float
    loss_before: float
    loss_after: float
    gflop_per_iter: float
    gflops: float
    stopped_early: bool = False  # the schedule was shortened on a loss plateau
    kept_rtn: bool = False  # tuning did not beat round to nearest, which was kept
    threads: int = 0
    channels_last: bool = False  # tuned on channels-last activations
    tile: tuple[int, int] | None = None  # tuned on random tiles of this size
    resumed: bool = False  # taken from a checkpoint of an interrupted run (checkpoint.py)


@dataclass
class ReconResult:
    method: str
    samples: int
    batch_size: int
    blocks: list[BlockResult] = field(default_factory=list)
    seconds: float = 0.0
    train_seconds: float = 0.0
    gflops: float = 0.0  # achieved over all tuning iterations
    peak_cache_mb: float = 0.0
    peak_rss_mb: float = 0.0
    cache_on_disk: bool = False
    compiled: bool = False  # the fake-quant kernel ran under torch.compile
