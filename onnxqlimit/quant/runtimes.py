"""Runtime profiles: what each deployment runtime runs in integer kernels, as one table.

A file is only as fast as the patterns its runtime fuses. A profile says, per compute op,
which weight and activation widths the runtime runs as integer arithmetic, how values map
to integers (signedness, zero points, granularity) and whether 8-bit layers are written in
the fused form: Q/DQ on the layer's output too (after a bias Add and a Relu/Clip that the
runtime folds into the Q) and an int32 bias, so that DQ -> Conv/MatMul/Gemm -> Q matches
QLinearConv / QLinearMatMul / QGemm. The placement (policy.py), the widths a search may
choose and the export all read the profile; a width the runtime cannot run is refused.

Sources, checked on the runtimes' own documentation and (for onnxruntime) by saving the
optimized graph of small files (tests/test_runtime.py):
- ort-cpu: onnxruntime 1.32 CPU fuses only 8-bit Q/DQ (QLinearConv needs the output Q;
  MatMul/Gemm without one run as MatMulIntegerToFloat / QGemm with an int32 bias).
  Activations uint8 with a zero point, weights int8 symmetric per channel ("U8S8", the
  default of onnxruntime's quantize_static; on AVX2 without VNNI onnxruntime's guidance is
  that U8S8 may saturate rarely - it does not on VNNI / AVX512 machines).
- tensorrt: explicit quantization accepts Q/DQ with zero point 0 only: int8 symmetric
  activations and weights (per-channel weights). A symmetric per-tensor range pays twice
  for a transformer's outlier channels, so SmoothQuant (alpha 0.8) is on by default, as in
  NVIDIA's ModelOpt INT8 recipe (all-MiniLM-L6-v2 W8A8 rtn: 0.9857 -> 0.9968 cosine).
- qnn (Qualcomm HTP): uint8/uint16 activations with zero points, symmetric int8/int4
  per-channel weights, int32 biases, and Q/DQ on every tensor (HTP runs QDQ node units;
  what is left float falls back to the CPU) - as onnxruntime's
  `execution_providers.qnn.get_qnn_qdq_config` writes them (A16W8, A16W4 are its accurate
  configurations).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from ..errors import QLimitError, check_one_of
from ..graph import all_nodes
from .widths import (
    ACT_BITS,
    DEFAULT_ABITS_CHOICES,
    DEFAULT_WBITS_CHOICES,
    FLOAT_BITS,
    WEIGHT_BITS,
)

COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class OpRule:
    """The widths one compute op runs at on a runtime."""

    weight_bits: tuple[int, ...]  # weight widths with quantized activations ...
    act_bits: tuple[int, ...]  # ... at these widths
    weight_only_bits: tuple[int, ...] = ()  # weight widths with float activations (MatMulNBits & co.)

    def allows(self, wbits: int, abits: int) -> bool:
        if abits == FLOAT_BITS:
            return wbits in self.weight_only_bits
        return wbits in self.weight_bits and abits in self.act_bits


@dataclass(frozen=True)
class RuntimeProfile:
    name: str
    summary: str
    act_symmetric: bool | None = None  # forced activation signedness (True: int8, zero point 0); None: the user's
    weight_symmetric: bool | None = None  # forced weight signedness; None: the user's
    weight_per_channel: bool | None = None  # forced weight granularity; None: the user's
    weight_only_blocks: bool = False  # weight-only layers need block-wise scales (--weight-block)
    fused_bits: tuple[int, ...] = (8,)  # layers whose weights and inputs are all at these widths get
    # output Q/DQ (at their input's width) and int32 biases: the fused form
    ops: Mapping[str, OpRule] | None = None  # per compute op; None: every supported width
    quantize_all: bool = False  # Q/DQ on every float tensor read as data (the runtime runs whole QDQ node units)
    smooth: float | str = "auto"  # SmoothQuant unless the user sets --smooth: per tensor ("auto") or one alpha
    # the widths a search chooses from unless told (FLOAT_BITS: weight-only, or a float layer)
    wbits_choices: tuple[int, ...] = DEFAULT_WBITS_CHOICES
    abits_choices: tuple[int, ...] = DEFAULT_ABITS_CHOICES

    def rule(self, op_type: str) -> OpRule:
        if self.ops is None:
            return OpRule(WEIGHT_BITS, ACT_BITS[:-1], WEIGHT_BITS)
        return self.ops[op_type]

    def allows(self, wbits: int, abits: int) -> bool:
        return any(self.rule(op).allows(wbits, abits) for op in COMPUTE)

    def runs(self, op_type: str, wbits: int, abits: int) -> bool:
        """Whether a plan may give this op these widths: what it runs, or float altogether."""
        if wbits == FLOAT_BITS:
            return abits == FLOAT_BITS
        return op_type not in COMPUTE or self.rule(op_type).allows(wbits, abits)

    def fit(self, op_type: str, wbits: int, abits: int) -> tuple[int, int]:
        """(wbits, abits) where this op runs them, else the widest weights at the narrowest
        activations it does run (a Conv asked for weight-only int4 on ort-cpu: W8A8)."""
        rule = self.rule(op_type)
        return (wbits, abits) if rule.allows(wbits, abits) else (max(rule.weight_bits), min(rule.act_bits))

    def weight_widths(self) -> set[int]:
        return {b for op in COMPUTE for r in [self.rule(op)] for b in (*r.weight_bits, *r.weight_only_bits)}

    def act_widths(self) -> set[int]:
        return {b for op in COMPUTE for r in [self.rule(op)] for b in
                (*r.act_bits, *((FLOAT_BITS,) if r.weight_only_bits else ()))}

    def describe(self) -> str:
        """What each op runs at, e.g. 'Conv W8A8; MatMul W8A8, weight-only W4/W8'."""
        parts = []
        for op in COMPUTE:
            r = self.rule(op)
            text = f"{op} W{'/'.join(map(str, r.weight_bits))}A{'/'.join(map(str, r.act_bits))}"
            if r.weight_only_bits:
                text += f", weight-only W{'/'.join(map(str, r.weight_only_bits))}"
            parts.append(text)
        return "; ".join(parts)


_INT8 = OpRule(weight_bits=(8,), act_bits=(8,))
_QNN = OpRule(weight_bits=(4, 8), act_bits=(8, 16))

PROFILES: dict[str, RuntimeProfile] = {p.name: p for p in (
    RuntimeProfile("generic", "every width; 8-bit layers in the form onnxruntime fuses"),
    RuntimeProfile("ort-cpu", "onnxruntime CPU: W8A8 in integer kernels (uint8 activations, int8 per-channel "
                   "weights), MatMul/Gemm also weight-only int4/int8 (MatMulNBits)",
                   act_symmetric=False, weight_symmetric=True, weight_per_channel=True,
                   ops={"Conv": _INT8, "ConvTranspose": _INT8, "Gemm": OpRule((8,), (8,), (4, 8)),
                        "MatMul": OpRule((8,), (8,), (4, 8))},
                   wbits_choices=(4, 8, FLOAT_BITS), abits_choices=(8, FLOAT_BITS)),
    RuntimeProfile("tensorrt", "TensorRT explicit quantization: int8, zero point 0 everywhere; MatMul/Gemm also "
                   "weight-only int4, block-wise",
                   act_symmetric=True, weight_symmetric=True, weight_per_channel=True, weight_only_blocks=True, smooth=0.8,
                   ops={"Conv": _INT8, "ConvTranspose": _INT8, "Gemm": OpRule((8,), (8,), (4,)),
                        "MatMul": OpRule((8,), (8,), (4,))},
                   wbits_choices=(4, 8, FLOAT_BITS), abits_choices=(8, FLOAT_BITS)),
    RuntimeProfile("qnn", "Qualcomm QNN HTP: uint8/uint16 activations, symmetric int8/int4 per-channel weights",
                   act_symmetric=False, weight_symmetric=True, weight_per_channel=True, fused_bits=(4, 8, 16),
                   ops={op: _QNN for op in COMPUTE}, quantize_all=True, wbits_choices=(4, 8), abits_choices=(8, 16)),
)}
RUNTIMES = tuple(PROFILES)


def profile(name: str) -> RuntimeProfile:
    check_one_of("--runtime", name, RUNTIMES)
    return PROFILES[name]


def check_pairs(runtime: RuntimeProfile, pairs: Iterable[tuple[int, int, str]], weight_block: int | None) -> None:
    """Refuse, in one line naming the profile, a (wbits, abits) pair (from the flag named) that
    no op of the runtime runs."""
    for wbits, abits, flag in pairs:
        if not runtime.allows(wbits, abits):
            pair = f"W{wbits}A{'float' if abits == FLOAT_BITS else abits}"
            raise QLimitError(f"{flag}: runtime profile '{runtime.name}' cannot run {pair} ({runtime.describe()})")
        if abits == FLOAT_BITS and runtime.weight_only_blocks and weight_block is None:
            raise QLimitError(f"{flag}: runtime profile '{runtime.name}' runs weight-only layers block-wise only: "
                              "add --weight-block 32, 64 or 128")


def check_widths(runtime: RuntimeProfile, kind: str, widths: Iterable[int], flag: str) -> None:
    """Refuse, in one line naming the profile, a width the runtime cannot run."""
    allowed = runtime.weight_widths() if kind == "weight" else runtime.act_widths()
    bad = sorted(set(widths) - allowed)
    if bad:
        raise QLimitError(f"{flag} {','.join(map(str, bad))}: runtime profile '{runtime.name}' runs {kind}s at "
                          f"{','.join(map(str, sorted(allowed)))} bits only ({runtime.summary})")


def scheme_conflicts(runtime: RuntimeProfile, settings: Mapping[str, bool]) -> None:
    """Refuse explicit scheme settings (`act_symmetric`, `weight_symmetric`, `weight_per_channel`
    -> the value asked for) that the runtime cannot take."""
    for key, asked in settings.items():
        forced = getattr(runtime, key)
        if forced is not None and asked != forced:
            raise QLimitError(f"runtime profile '{runtime.name}' needs {key.replace('_', ' ')} = {forced} "
                              f"({runtime.summary})")


def adapt_scheme(runtime: RuntimeProfile, scheme):
    """`scheme` with the settings the runtime fixes."""
    forced = {k: getattr(runtime, k) for k in ("act_symmetric", "weight_symmetric", "weight_per_channel")
              if getattr(runtime, k) is not None}
    return replace(scheme, **forced)


def restrict_choices(runtime: RuntimeProfile, mixed):
    """`mixed` (a MixedConfig) with its search's width choices cut to those the runtime runs;
    the default choices are the runtime's own (ort-cpu: weight-only int4, W8A8 or float)."""
    sens = mixed.sensitivity
    defaults = (sens.wbits_choices, sens.abits_choices) == (DEFAULT_WBITS_CHOICES, DEFAULT_ABITS_CHOICES)
    asked_w, asked_a = (runtime.wbits_choices, runtime.abits_choices) if defaults else \
        (sens.wbits_choices, sens.abits_choices)
    wbits = tuple(b for b in asked_w if b in runtime.weight_widths() | {FLOAT_BITS})
    abits = tuple(b for b in asked_a if b in runtime.act_widths())
    if not wbits or not abits:
        kind, flag = ("weight", "--wbits-choices") if not wbits else ("activation", "--abits-choices")
        check_widths(runtime, kind, asked_w if not wbits else asked_a, flag)
    return replace(mixed, sensitivity=replace(sens, wbits_choices=wbits, abits_choices=abits))


def fusion_inputs(graph, points) -> dict[str, list[str]]:
    """Each fused-form output point (QuantPoint.output_of) -> the quantized inputs of the node
    it lets the runtime fuse."""
    quantized = {p.tensor for p in points}
    inputs = {n.name: [t for t in n.input if t in quantized] for n in all_nodes(graph)}
    return {p.tensor: inputs.get(p.output_of, []) for p in points if p.output_of is not None}


def fuses(inputs: Iterable[str], plan: Mapping[str, int], fused_bits: tuple[int, ...]) -> bool:
    """Whether a node with these quantized inputs fuses under `plan`; an input whose width the
    plan does not give counts as fused (a cost estimate then never falls below the file's)."""
    return all(plan.get(t, fused_bits[0]) in fused_bits for t in inputs)


def unfused_outputs(fusion: Mapping[str, list[str]], plan: Mapping[str, int],
                    fused_bits: tuple[int, ...]) -> dict[str, int]:
    """The fused-form output points whose node `plan` no longer fuses, left float (FLOAT_BITS):
    their Q/DQ pair only served the fusion, and a uniform run at those widths places none. A
    float output unfuses the node that reads it in turn (a Conv output feeding an Add)."""
    settled, changes = dict(plan), {}
    while True:
        new = {t: FLOAT_BITS for t, inputs in fusion.items() if t not in changes and not fuses(inputs, settled, fused_bits)}
        if not new:
            return changes
        changes.update(new)
        settled.update(new)
