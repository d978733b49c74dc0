"""What to quantize and how, split as torch.ao splits it:

- `Widths`: the default widths and the rules that set them per node (first/last layers,
  embedding tables, --bits overrides); a search or a plan file then changes them per quantizer.
- `Scheme`: how values map to integers - symmetry, granularity and the range observers.
- `Placement`: which ops get quantizers beyond the default compute-layer inputs.
- `QuantConfig`: the three, plus SmoothQuant, a transform of the float graph before placement.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from ..errors import QLimitError, check_one_of
from .runtimes import adapt_scheme, check_pairs, profile
from .widths import WEIGHT_BLOCKS, check_bits

WEIGHT_OBSERVERS = ("mse", "minmax")
ACT_OBSERVERS = ("mse", "minmax", "percentile")


def _check_patterns(patterns) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise QLimitError(f"bad node pattern {pattern!r}: {err}") from None


@dataclass(frozen=True)
class Widths:
    wbits: int = 8
    abits: int = 8
    first_last_bits: int | None = 8  # None: first/last layers use wbits/abits like the rest
    embedding_bits: int | None = 8  # Gather tables, weight-only per row; None: float
    overrides: tuple[tuple[str, int, int], ...] = ()  # (node name or regex, wbits, abits)

    def __post_init__(self):
        check_bits("weight", self.wbits)
        check_bits("activation", self.abits)
        if self.first_last_bits is not None:
            check_bits("weight", self.first_last_bits, "--first-last-bits")
        if self.embedding_bits is not None:
            check_bits("weight", self.embedding_bits, "--embedding-bits")
        for _, w, a in self.overrides:
            check_bits("weight", w, "--bits wbits")
            check_bits("activation", a, "--bits abits")
        _check_patterns(p for p, *_ in self.overrides)

    def all_bits(self) -> set[int]:
        """Every width the placement can give a quantizer (the BitPlan's opset floor before a search)."""
        bits = {self.wbits, self.abits} | {b for _, w, a in self.overrides for b in (w, a)}
        bits |= {self.embedding_bits} if self.embedding_bits else set()
        return bits | ({self.first_last_bits} if self.first_last_bits else set())


@dataclass(frozen=True)
class Scheme:
    weight_symmetric: bool = True  # signed integers, zero point 0; else unsigned with a zero point
    weight_per_channel: bool = True  # one scale per output channel; else one per tensor
    weight_init: str = "mse"  # weight range observer: mse | minmax
    act_symmetric: bool = False
    act_init: str = "mse"  # activation range observer: mse | minmax | percentile
    percentile: float = 99.99  # for act_init "percentile"
    weight_block: int | None = None  # MatMul/Gemm weights: one scale per block of this many along K

    def __post_init__(self):
        check_one_of("--weight-init", self.weight_init, WEIGHT_OBSERVERS)
        check_one_of("--act-init", self.act_init, ACT_OBSERVERS)
        if not 0 < self.percentile <= 100:
            raise QLimitError(f"--percentile must be in (0, 100] (got {self.percentile})")
        if self.weight_block is not None:
            check_one_of("--weight-block", self.weight_block, WEIGHT_BLOCKS)
            if not self.weight_per_channel:
                raise QLimitError("--weight-block gives each output channel its own scales: it cannot be --per-tensor")


@dataclass(frozen=True)
class Placement:
    quantize_add: bool = False  # inputs of Adds of two activations (residual joins)
    quantize_concat: bool = False
    # MatMul of two activations (attention scores/context); None: where the runtime fuses it
    # (both inputs at its fused width, W8A8 on onnxruntime), float below that
    quantize_act_matmul: bool | None = None
    exclude: tuple[str, ...] = ()  # node names or regexes (full match) left float

    def __post_init__(self):
        _check_patterns(self.exclude)


@dataclass
class QuantConfig:
    widths: Widths = field(default_factory=Widths)
    scheme: Scheme = field(default_factory=Scheme)
    placement: Placement = field(default_factory=Placement)
    # SmoothQuant migration strength (alpha) for MatMul/Gemm inputs: "auto" chooses per tensor
    # (smooth.choose_alphas); None: the runtime's default ("auto", tensorrt 0.8); 0: off.
    # Resolved at construction: afterwards None means off.
    smooth: float | str | None = None
    runtime: str = "generic"  # the runtime profile (runtimes.py) the file is written for

    @classmethod
    def of(cls, smooth: float | str | None = None, runtime: str = "generic", **settings) -> QuantConfig:
        """A config from flat keywords, each given to the part that owns it:
        `QuantConfig.of(wbits=4, abits=4, exclude=("head",), act_init="minmax")`."""
        parts = [part(**{f.name: settings.pop(f.name) for f in fields(part) if f.name in settings})
                 for part in (Widths, Scheme, Placement)]
        if settings:
            raise TypeError(f"QuantConfig.of: no setting named {', '.join(sorted(settings))}")
        return cls(*parts, smooth=smooth, runtime=runtime)

    def __post_init__(self):
        if self.smooth is not None and self.smooth != "auto" and not (
                isinstance(self.smooth, (int, float)) and 0.0 <= self.smooth < 1.0):
            raise QLimitError(f"--smooth must be 'auto' or from 0 (off) to below 1 (got {self.smooth})")
        # The profile fixes what the runtime needs (signedness, granularity) and refuses widths it cannot run.
        runtime = profile(self.runtime)
        self.smooth = runtime.smooth if self.smooth is None else (self.smooth or None)
        self.scheme = adapt_scheme(runtime, self.scheme)
        w = self.widths
        pairs = [(w.wbits, w.abits, f"--wbits {w.wbits} --abits {w.abits}")]
        pairs += [(wb, ab, f"--bits {pattern}={wb}/{ab}") for pattern, wb, ab in w.overrides]
        if w.first_last_bits:
            pairs.append((max(w.wbits, w.first_last_bits), max(w.abits, w.first_last_bits),
                          f"--first-last-bits {w.first_last_bits}"))
        check_pairs(runtime, pairs, self.scheme.weight_block)
