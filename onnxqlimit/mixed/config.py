"""Mixed-precision settings, owned here alone: the budgets, the sensitivity measurement,
the solver. The run's seed, work dir (where tables are cached) and progress display are
run-level settings (RunOptions)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ..errors import QLimitError, check_one_of
from ..quant.widths import DEFAULT_ABITS_CHOICES, DEFAULT_WBITS_CHOICES, check_bits

SOLVERS = ("milp", "ga")
# Each budget: its flag and how its values read.
UNITS = {"size_bytes": ("--target-size", lambda v: f"{v / 1e3:.1f} KB"),
         "avg_wbits": ("--target-avg-wbits", lambda v: f"{v:.3f} bits"),
         "bitops": ("--target-bitops", lambda v: f"{v / 1e9:.4g} G"),
         "latency_ms": ("--target-latency", lambda v: f"{v:.3f} ms")}
BUDGETS = tuple(UNITS)


@dataclass
class Targets:
    size_bytes: float | None = None
    avg_wbits: float | None = None
    bitops: float | None = None  # bit-operations per sample (the CLI takes G)
    latency_ms: float | None = None
    metric: float | None = None  # fraction of the float model's metric to keep

    def __post_init__(self):
        for name in BUDGETS:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise QLimitError(f"{UNITS[name][0]} must be positive (got {value})")
        if self.metric is not None and not 0 < self.metric <= 1:
            raise QLimitError(f"--target-metric must be in (0, 1] (got {self.metric})")

    def budgets(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in BUDGETS if getattr(self, name) is not None}

    def any(self) -> bool:
        return bool(self.budgets()) or self.metric is not None


AUTO_SAMPLES = (8, 32)  # the automatic sample count's range (SensitivityConfig.sample_count)
AUTO_VALUES = 32 * 3 * 320 * 320  # input values the automatic count aims at


@dataclass(frozen=True)
class SensitivityConfig:
    wbits_choices: tuple[int, ...] = DEFAULT_WBITS_CHOICES
    abits_choices: tuple[int, ...] = DEFAULT_ABITS_CHOICES
    # Calibration samples the losses are averaged over; None: automatic (sample_count).
    samples: int | None = None
    chunk: int = 16  # samples per forward pass
    max_block_configs: int = 32  # joint configurations measured per block at most
    # Iterations of the short reconstruction each configuration gets before it is scored, so
    # the search ranks plans by their loss after reconstruction (0: round to nearest, as an
    # rtn run always does).
    tune_iters: int = 50

    def __post_init__(self):
        for kind, name, widths in (("weight", "--wbits-choices", self.wbits_choices),
                                   ("activation", "--abits-choices", self.abits_choices)):
            if not widths:
                raise QLimitError(f"{name} needs at least one width")
            for bits in widths:
                check_bits(kind, bits, name)
        if (self.samples is not None and self.samples < 1) or self.chunk < 1 or self.max_block_configs < 2:
            raise QLimitError("sensitivity samples, chunk and block configurations must be positive")
        if self.tune_iters < 0:
            raise QLimitError(f"--sens-iters must be 0 (round to nearest) or positive (got {self.tune_iters})")

    def sample_count(self, feeds: Mapping[str, np.ndarray]) -> int:
        """How many calibration samples the table is measured on: `samples` when given, else
        32, or fewer (down to 8) for large inputs. Every measurement runs a block or the rest
        of the model on all of them, so their cost grows with the values they hold; and on a
        convolutional or token model every position is a sample of the same statistics, so a
        few large inputs average as well as many small ones. 8 pages of 640x640 hold as many
        values as 32 inputs of 320x320 (PP-OCR det: the table in half the time, same ranks;
        docs/mixed_precision.md)."""
        total = len(next(iter(feeds.values())))
        if self.samples is not None:
            return min(self.samples, total)
        per_sample = max(1, sum(int(np.prod(v.shape[1:])) for v in feeds.values()))
        return min(total, max(AUTO_SAMPLES[0], min(AUTO_SAMPLES[1], AUTO_VALUES // per_sample)))


@dataclass(frozen=True)
class GAConfig:
    population: int = 64
    generations: int = 200
    mutation: float = 0.05  # per gene
    crossover: float = 0.9
    tournament: int = 3
    elite: int = 2

    def __post_init__(self):
        if self.population < 4 or self.generations < 1 or not 0 <= self.mutation <= 1 or not 0 <= self.crossover <= 1:
            raise QLimitError("--ga-population >= 4, --ga-generations >= 1, mutation and crossover in [0, 1]")


@dataclass
class MixedConfig:
    targets: Targets = field(default_factory=Targets)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    solver: str = "milp"  # milp | ga
    ga: GAConfig = field(default_factory=GAConfig)
    latency_threads: int = 1

    def __post_init__(self):
        check_one_of("--solver", self.solver, SOLVERS)


@dataclass
class EvalData:
    """Data the --target-metric search scores plans on: model inputs, optional labels."""

    feeds: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None
