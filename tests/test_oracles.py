"""Independent oracles (issue 21 item 5): the cost model against arithmetic written out by
hand, the observers against brute force in numpy, the placement flags against Q/DQ
positions listed by hand, and the weight schemes against the form of the exported file.
Nothing here asks the package to check itself: every expected number comes from the test."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxqlimit import QuantConfig
from onnxqlimit.calibrate import attach_quantizers, calibrate
from onnxqlimit.load import LoadConfig, load_model
from onnxqlimit.mirror import Mirror
from onnxqlimit.mixed.config import MixedConfig, SensitivityConfig, Targets
from onnxqlimit.mixed.costs import CostModel
from onnxqlimit.pipeline import RunOptions, quantize
from onnxqlimit.quant.bits import BitPlan
from onnxqlimit.quant.fake_quant import QuantSpec
from onnxqlimit.quant.observers import RangeObserver, weight_qparams
from onnxqlimit.quant.policy import place
from onnxqlimit.recon import ReconConfig
from tests import cost_oracle
from tests.onnx_builders import make, rand, tensor


def qconfig(**kw) -> QuantConfig:
    """Every QuantConfig of this file, from flat settings. No smoothing unless asked: the hand
    formulas name the graph's own tensors, which a smoothing Mul would rename."""
    return QuantConfig.of(**{"smooth": 0, **kw})


def options(recon: ReconConfig | None = None, **kw) -> RunOptions:
    """Every RunOptions of this file: round to nearest, quiet, small parity check unless told."""
    return RunOptions(**{"recon": recon or ReconConfig(method="rtn"), "progress": False, "parity_samples": 8, **kw})


# ---------------------------------------------------------------------------------------------
# A small hand-built graph whose costs are worked out below by hand.
#
#   x [n,3,8,8] -> Conv conv1 (w1 [4,3,3,3], b1, stride 2, pad 1) -> c1 [n,4,4,4] -> Relu -> r1
#   r1 -> Conv dw (w2 [4,1,3,3], group 4, pad 1, no bias) -> c2 [n,4,4,4] -> Flatten -> f [n,64]
#   f -> Gemm gemm (w3 [10,64], transB, b3) -> g [n,10]
#   ids [n] -> Gather gather (table [5,10]) -> e [n,10];   Add(g, e) -> s
#   s -> MatMul matmul (w4 [10,6]) -> y [n,6]

def cost_model_proto() -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="dw", pads=[1, 1, 1, 1], group=4),
             helper.make_node("Flatten", ["c2"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], name="gemm", transB=1),
             helper.make_node("Gather", ["table", "ids"], ["e"], name="gather"),
             helper.make_node("Add", ["g", "e"], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "w4"], ["y"], name="matmul")]
    inits = [("w1", rand(4, 3, 3, 3)), ("b1", rand(4)), ("w2", rand(4, 1, 3, 3)), ("w3", rand(10, 64)),
             ("b3", rand(10)), ("table", rand(5, 10)), ("w4", rand(10, 6))]
    return make(nodes, [tensor("x", ["n", 3, 8, 8]), tensor("ids", ["n"], TensorProto.INT64)],
                [tensor("y", ["n", 6])], inits)


def cost_model_calib(n: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32), "ids": rng.integers(0, 5, n)}


# MACs per sample, from the layer shapes:
#   conv1: out 4x4 (floor((8 + 2 - 3) / 2) + 1 = 4), Cout 4, Cin/groups 3, kernel 3x3
MACS_CONV1 = 4 * 4 * 4 * 3 * 3 * 3  # 1728
#   dw: out 4x4, Cout 4, Cin/groups = 4/4 = 1, kernel 3x3
MACS_DW = 4 * 4 * 4 * 1 * 3 * 3  # 576
#   gemm: 10 outputs x 64 inputs;  matmul: 6 outputs x 10 inputs
MACS_GEMM = 10 * 64  # 640
MACS_MATMUL = 6 * 10  # 60
# Parameters of the layers that avg_wbits weighs (the Gather table is left out of it)
PARAMS = {"w1": 4 * 3 * 3 * 3, "w2": 4 * 1 * 3 * 3, "w3": 10 * 64, "w4": 10 * 6}  # 108, 36, 640, 60
BIAS_BYTES = 4 * 4 + 10 * 4  # b1 and b3: float32, or int32 of the same size
# Placed at W8A8 (the fused form, runtimes.py): b1 and b3 become int32 with one float32 scale
# per output channel while their layer's weight and input are both at 8 bits (the widths an
# integer kernel takes; a plan at others keeps the bias float), and the output of dw (c2,
# read by Flatten) gets an 8-bit Q/DQ pair while dw fuses (left float otherwise); conv1's
# output reaches r1's Q through its Relu; the Gemm and MatMul need none.


def fused_bytes(bits: dict[str, int]) -> int:
    return (4 * 4 * (bits["w1"] == bits["x"] == 8) + 10 * 4 * (bits["w3"] == bits["f"] == 8)
            + (4 + 1) * (bits["w2"] == bits["r1"] == 8))


def container(bits: int) -> int:
    """The integer type a width is stored in: 2 -> int2, 3-4 -> int4, 5-8 -> int8, 16 -> int16."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8 if bits <= 8 else 16


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def hand_weight_bytes(numel: int, channels: int, bits: int) -> int:
    """Packed integers + one float32 scale and one zero point (in the container) per channel
    (an int2 weight's unfusing Reshape takes its shape from a Shape node: no bytes)."""
    c = container(bits)
    return ceil_div(numel * c, 8) + 4 * channels + ceil_div(channels * c, 8)


def hand_activation_bytes(bits: int) -> int:
    """float32 scale + zero point; where the container is wider than the width (or sub-byte),
    two float32 clip bounds."""
    c = container(bits)
    return 4 + ceil_div(c, 8) + (8 if bits < c or c < 8 else 0)


UNIFORM = {"w1": 4, "w2": 4, "w3": 4, "w4": 4, "table": 8, "x": 8, "r1": 8, "f": 8, "s": 8}
MIXED = {"w1": 8, "w2": 2, "w3": 3, "w4": 5, "table": 8, "x": 8, "r1": 4, "f": 2, "s": 16}


def hand_costs(bits: dict[str, int], per_channel: bool = True, fused: bool = False) -> dict[str, float]:
    # weight and activation operand of each layer, MACs x wbits x abits
    bitops = (MACS_CONV1 * bits["w1"] * bits["x"] + MACS_DW * bits["w2"] * bits["r1"]
              + MACS_GEMM * bits["w3"] * bits["f"] + MACS_MATMUL * bits["w4"] * bits["s"])
    channels = {"w1": 4, "w2": 4, "w3": 10, "w4": 6} if per_channel else dict.fromkeys(PARAMS, 1)
    size = (BIAS_BYTES
            + hand_weight_bytes(108, channels["w1"], bits["w1"])  # per output channel: axis 0 of [4,3,3,3]
            + hand_weight_bytes(36, channels["w2"], bits["w2"])
            + hand_weight_bytes(640, channels["w3"], bits["w3"])  # Gemm transB: axis 0 of [10,64]
            + hand_weight_bytes(60, channels["w4"], bits["w4"])  # MatMul: axis 1 of [10,6]
            + hand_weight_bytes(50, 5, bits["table"])  # Gather table: one scale per row
            + sum(hand_activation_bytes(bits[a]) for a in ("x", "r1", "f", "s"))
            + (fused_bytes(bits) if fused else 0))
    params = sum(PARAMS.values())
    return {"bitops": bitops, "size_bytes": size,
            "avg_wbits": sum(PARAMS[w] * bits[w] for w in PARAMS) / params,
            "container_wbits": sum(PARAMS[w] * container(bits[w]) for w in PARAMS) / params}


def test_hand_arithmetic_of_the_two_plans():
    """The hand formula itself, worked to the last digit, so the tests below compare with numbers."""
    assert hand_costs(UNIFORM) == {"bitops": 3004 * 4 * 8, "size_bytes": 56 + 72 + 36 + 365 + 57 + 75 + 4 * 5,
                                   "avg_wbits": 4.0, "container_wbits": 4.0}
    mixed = hand_costs(MIXED)
    assert mixed["bitops"] == 1728 * 64 + 576 * 8 + 640 * 6 + 60 * 80  # 123840
    # w1 108+16+4, w2 9+16+1, w3 320+40+5, w4 60+24+6, table 50+20+5,
    # x 5, r1 4+1+8, f 4+1+8, s 4+2
    assert mixed["size_bytes"] == 56 + 128 + 26 + 365 + 90 + 75 + 5 + 13 + 13 + 6  # 777
    assert mixed["avg_wbits"] == pytest.approx((108 * 8 + 36 * 2 + 640 * 3 + 60 * 5) / 844)
    assert mixed["container_wbits"] == pytest.approx((108 * 8 + 36 * 2 + 640 * 4 + 60 * 8) / 844)


@pytest.fixture(scope="module")
def cost_model():
    loaded = load_model(cost_model_proto(), LoadConfig(min_opset=25))
    mirror = Mirror(loaded)
    config = qconfig(wbits=4, abits=8, first_last_bits=None)
    points = place(loaded, config)
    quantizers = attach_quantizers(mirror, points)
    calib = cost_model_calib()
    calibrate(mirror, points, quantizers, [calib], config.scheme, progress=False)
    return CostModel(loaded, mirror, points, quantizers, calib), points


def test_placement_of_the_cost_model_is_what_the_hand_formula_assumes(cost_model):
    _, points = cost_model
    assert {p.tensor: p.spec.bits for p in points} == UNIFORM
    assert {p.tensor for p in points if p.table} == {"table"}


@pytest.mark.parametrize("plan", [UNIFORM, MIXED], ids=["uniform", "mixed"])
def test_cost_model_matches_the_hand_formula(cost_model, plan):
    model, _ = cost_model
    got = model.evaluate(BitPlan(plan))
    expected = hand_costs(plan)
    assert got["bitops"] == expected["bitops"]
    assert got["size_bytes"] == expected["size_bytes"]
    assert got["avg_wbits"] == pytest.approx(expected["avg_wbits"], rel=1e-12)
    assert got["container_wbits"] == pytest.approx(expected["container_wbits"], rel=1e-12)


@pytest.mark.parametrize("plan", [UNIFORM, MIXED], ids=["uniform", "mixed"])
def test_exported_file_costs_match_the_hand_formula(tmp_path, plan):
    """file_costs measures the written file: its bytes, the plan it records, the costs."""
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({t: {"bits": b} for t, b in plan.items()}))
    out = tmp_path / "q.onnx"
    report = quantize(cost_model_proto(), out, cost_model_calib(), qconfig(wbits=4, abits=8, first_last_bits=None),
                      options(bits_plan=str(plan_file))).report
    expected = hand_costs(plan)
    costs = report.costs
    assert costs["size_bytes"] == costs["planned_size_bytes"] == expected["size_bytes"]
    assert costs["bitops"] == expected["bitops"]
    assert costs["avg_wbits"] == pytest.approx(expected["avg_wbits"], rel=1e-12)
    model = onnx.load(str(out))
    recorded = json.loads(next(p.value for p in model.metadata_props if p.key == "onnxqlimit.bit_plan"))
    assert recorded == plan
    # the file's integer weights are in the containers the hand formula counted
    types = {t.name: t.data_type for t in model.graph.initializer if t.name.endswith("_quantized")}
    signed = {2: TensorProto.INT2, 4: TensorProto.INT4, 8: TensorProto.INT8}
    assert types == {f"{w}_quantized": signed[container(plan[w])] for w in ("w1", "w2", "w3", "w4", "table")}


@pytest.mark.parametrize("target", ["avg_wbits", "bitops", "size_bytes"])
def test_a_searched_plan_costs_what_the_hand_formula_says(tmp_path, target):
    """A search on the hand-built graph: whatever plan it picks, the file's costs are the hand
    formula's for that plan, and by the hand formula the plan is within the budget (quantize()
    only checks with its own cost model) without being the all-8-bit plan."""
    limit = {"avg_wbits": 3.5, "bitops": 60_000.0, "size_bytes": 670.0}[target]
    mixed = MixedConfig(Targets(**{target: limit}), SensitivityConfig(samples=8))
    out = tmp_path / "q.onnx"
    report = quantize(cost_model_proto(), out, cost_model_calib(), qconfig(first_last_bits=None),
                      options(mixed=mixed, work_dir=str(tmp_path / "work"))).report
    plan = cost_oracle.recorded_plan(onnx.load(str(out)))
    plan = {t: b for t, b in plan.items() if t != "c2"}  # the fused form's output (fixed at 8)
    expected = hand_costs(plan, fused=True)
    assert report.costs["size_bytes"] == expected["size_bytes"]
    assert report.costs["bitops"] == expected["bitops"]
    assert report.costs["avg_wbits"] == pytest.approx(expected["avg_wbits"], rel=1e-12)
    assert expected[target] <= limit < hand_costs(dict.fromkeys(plan, 8), fused=True)[target], (plan, expected)
    by_file = cost_oracle.file_costs(out)  # the generic file oracle agrees on this graph too
    assert {k: by_file[k] for k in ("size_bytes", "bitops")} == {k: expected[k] for k in ("size_bytes", "bitops")}
    assert by_file["avg_wbits"] == pytest.approx(expected["avg_wbits"], rel=1e-12)


def test_reconstruction_flops_per_iteration_are_six_macs_per_sample(tmp_path):
    """Tuning counts 2 FLOPs per MAC forward and twice that backward: a block's FLOPs per
    iteration are 6 x batch x the MACs of the layers in its node range (hand numbers above)."""
    report = quantize(cost_model_proto(), tmp_path / "q.onnx", cost_model_calib(), qconfig(first_last_bits=None),
                      options(ReconConfig(method="qdrop", iters=2, batch_size=8))).report
    loaded_order = ["conv1", "relu1", "dw", "flat", "gemm", "gather", "add", "matmul"]  # as written
    assert [n.name for n in load_model(cost_model_proto()).graph.node] == loaded_order  # block ranges index this
    macs = {"conv1": MACS_CONV1, "dw": MACS_DW, "gemm": MACS_GEMM, "matmul": MACS_MATMUL}
    blocks = report.reconstruction["blocks"]
    assert sum(b["layers"] for b in blocks) == 4
    for block in blocks:
        start, stop = map(int, block["nodes"].split("-"))
        block_macs = sum(macs.get(name, 0) for name in loaded_order[start:stop + 1])
        assert block["gflop_per_iter"] == pytest.approx(6 * 8 * block_macs / 1e9, rel=1e-12), block


# ---------------------------------------------------------------------------------------------
# Placement: which tensors get a Q/DQ pair in the file, by flag.
#
#   x [n,8] -> Gemm g1 (w1) -> a -> Relu -> r
#   r -> Gemm g2 (w2) -> b;  Add(b, r) -> s  (a residual join of two activations)
#   Add(s, bias) -> t  (a bias-like Add of a constant: never a join)
#   Concat(t, r) -> c [n,16] -> Reshape [n,4,4] -> q;  Transpose(q) -> qt
#   MatMul(q, qt) -> m [n,4,4]  (activation x activation, attention-like)
#   Flatten(m) -> fl -> Gemm g3 (w3) -> y [n,5]

def placement_proto() -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["a"], name="g1", transB=1),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2"], ["b"], name="g2", transB=1),
             helper.make_node("Add", ["b", "r"], ["s"], name="residual"),
             helper.make_node("Add", ["s", "bias"], ["t"], name="bias_add"),
             helper.make_node("Concat", ["t", "r"], ["c"], name="concat", axis=1),
             helper.make_node("Reshape", ["c", "shape"], ["q"], name="reshape"),
             helper.make_node("Transpose", ["q"], ["qt"], name="transpose", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "qt"], ["m"], name="attention"),
             helper.make_node("Flatten", ["m"], ["fl"], name="flatten"),
             helper.make_node("Gemm", ["fl", "w3"], ["y"], name="g3", transB=1)]
    inits = [("w1", rand(8, 8)), ("w2", rand(8, 8)), ("bias", rand(8)), ("shape", np.array([-1, 4, 4], np.int64)),
             ("w3", rand(5, 16))]
    return make(nodes, [tensor("x", ["n", 8])], [tensor("y", ["n", 5])], inits)


def qdq_positions(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(activations that enter a QuantizeLinear, directly or through the Max/Min clip;
    initializers whose integers a DequantizeLinear reads), read off the file's graph."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    acts = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            source = node.input[0]
            while source in producer and producer[source].op_type in ("Max", "Min"):
                source = producer[source].input[0]
            acts.add(source)
    weights = {n.input[0].removesuffix("_quantized") for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return acts, weights


# The activation inputs of the three Gemms and, the attention MatMul being at 8 bits (where
# onnxruntime runs it in an integer kernel), its inputs q and qt. No output pairs: onnxruntime
# runs a Gemm without bias (or with an int32 one) as QGemm and a MatMul as
# MatMulIntegerToFloat, float outputs and all. A flag-quantized join whose inputs are all
# 8-bit gets an output pair too (QLinearAdd: s; QLinearConcat: c).
DEFAULT_ACTS = {"x", "r", "fl", "q", "qt"}


@pytest.mark.parametrize("flags,expected", [
    ({}, DEFAULT_ACTS),
    ({"quantize_add": True}, DEFAULT_ACTS | {"b", "s"}),  # the residual's other input b (r is quantized for g2)
    ({"quantize_concat": True}, DEFAULT_ACTS | {"t", "c"}),  # t and r
    ({"quantize_act_matmul": False}, DEFAULT_ACTS - {"q", "qt"}),
    ({"quantize_add": True, "quantize_concat": True, "quantize_act_matmul": True}, DEFAULT_ACTS | {"b", "s", "t", "c"}),
], ids=["default", "add", "concat", "float-attention", "all"])
def test_placement_flags_put_qdq_where_expected(tmp_path, flags, expected):
    out = tmp_path / "q.onnx"
    rng = np.random.default_rng(0)
    quantize(placement_proto(), out, {"x": rng.standard_normal((16, 8)).astype(np.float32)},
             qconfig(wbits=8, abits=8, **flags), options())
    model = onnx.load(str(out))
    acts, weights = qdq_positions(model)
    assert acts == expected
    assert weights == {"w1", "w2", "w3"}
    # and the readers take the dequantized tensors: every input of a quantized node that was
    # expected to be quantized now comes out of a DequantizeLinear
    readers = {"residual": {"b", "r"}, "concat": {"t", "r"}, "attention": {"q", "qt"}}
    for node in model.graph.node:
        if node.name in readers:
            for tensor_name in readers[node.name]:
                want = f"{tensor_name}_dequantized" if tensor_name in acts else tensor_name
                assert want in node.input, (node.name, list(node.input))
    bias_add = next(n for n in model.graph.node if n.name == "bias_add")
    assert "bias" in bias_add.input  # the constant operand of an Add is never quantized


def test_attention_matmul_counts_its_second_input_as_the_weight(tmp_path):
    """BitOps of MatMul(q, qt): 4x4 outputs x 4 inputs = 64 MACs per sample; float operands
    count 32 bits. The Gemms: g1 8x8 = 64, g2 64, g3 5x16 = 80 MACs, all W8A8."""
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((16, 8)).astype(np.float32)}
    gemms = (64 + 64 + 80) * 8 * 8
    off = quantize(placement_proto(), tmp_path / "off.onnx", calib, qconfig(quantize_act_matmul=False),
                   options()).report.costs
    assert off["bitops"] == gemms + 64 * 32 * 32
    on = quantize(placement_proto(), tmp_path / "on.onnx", calib, qconfig(quantize_act_matmul=True, abits=4),
                  options()).report.costs
    # g1 and g3 are first/last: 8-bit inputs; g2 reads r at 4 bits; q and qt at 4 bits
    assert on["bitops"] == 64 * 8 * 8 + 64 * 8 * 4 + 80 * 8 * 8 + 64 * 4 * 4


@pytest.mark.parametrize("act_init", ["minmax", "percentile"])
def test_cli_scheme_and_placement_flags_reach_the_file(tmp_path, capsys, act_init):
    """The command-line flags, end to end: --quantize-add/--quantize-concat/--quantize-attention
    place the extra Q/DQ pairs, --weight-asymmetric --per-tensor give one unsigned scale and zero
    point per weight, and --act-init sets the input's range from the calibration data (its
    min/max, or numpy's percentile of its values)."""
    from onnxqlimit.cli import main

    model, calib, out = tmp_path / "m.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    onnx.save(placement_proto(), str(model))
    x = np.random.default_rng(2).standard_t(3, size=(16, 8)).astype(np.float32)
    np.savez(calib, x=x)
    assert main(["quantize", str(model), "-o", str(out), "--calib", str(calib), "--method", "rtn", "--quiet",
                 "--quantize-add", "--quantize-concat", "--quantize-attention", "--weight-asymmetric", "--per-tensor",
                 "--weight-init", "minmax", "--act-init", act_init, "--percentile", "95", "--smooth", "0"]) == 0, capsys.readouterr().err
    written = onnx.load(str(out))
    acts, weights = qdq_positions(written)
    assert acts == DEFAULT_ACTS | {"b", "s", "t", "c"} and weights == {"w1", "w2", "w3"}
    for name in weights:
        ints, scale, zero, axis = _weights_in_file(written, name)
        assert ints.data_type == TensorProto.UINT8 and axis is None and scale.shape == zero.shape == ()
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    values = x.astype(np.float64).ravel()
    lo, hi = (values.min(), values.max()) if act_init == "minmax" else np.percentile(values, [5, 95])
    scale, zero = np_qparams(lo, hi, 8, False)
    assert float(inits["x_scale"]) == pytest.approx(scale, rel=1e-5)
    assert int(inits["x_zero_point"]) == zero and inits["x_zero_point"].dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# Weight schemes in the file: asymmetric (unsigned, zero points) and per-tensor scales.

def _weights_in_file(model: onnx.ModelProto, name: str):
    """(integers, scale, zero point, axis) of a weight; a table whose rows are gathered as
    integers (no DequantizeLinear) reports axis 0 and its [rows, 1] scale column as a vector."""
    inits = {t.name: t for t in model.graph.initializer}
    dq = next((n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{name}_quantized"),
              None)
    if dq is None:
        return (inits[f"{name}_quantized"], numpy_helper.to_array(inits[f"{name}_scale"]).reshape(-1),
                numpy_helper.to_array(inits[f"{name}_zero_point"]).reshape(-1), 0)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
    return (inits[f"{name}_quantized"], numpy_helper.to_array(inits[f"{name}_scale"]),
            numpy_helper.to_array(inits[f"{name}_zero_point"]), axis)


def _per_channel(values: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
    if axis is None:
        return values.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_asymmetric_weights_are_unsigned_with_min_max_zero_points(tmp_path, per_channel):
    """weight_init=minmax so the expected range is the weight's own: scale = (max - min) / 15,
    zero point = round(-min / scale), min/max taken over the channel (or the whole tensor)
    and widened to hold 0."""
    proto = cost_model_proto()
    floats = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = tmp_path / "q.onnx"
    quantize(proto, out, cost_model_calib(),
             qconfig(wbits=4, abits=8, first_last_bits=None, weight_symmetric=False, weight_per_channel=per_channel,
                     weight_init="minmax"), options())
    model = onnx.load(str(out))
    axes = {"w1": 0, "w2": 0, "w3": 0, "w4": 1}
    for name, axis in axes.items():
        ints, scale, zero, file_axis = _weights_in_file(model, name)
        assert ints.data_type == TensorProto.UINT4
        w = floats[name].astype(np.float64)
        if per_channel:
            assert file_axis == axis and scale.shape == zero.shape == (w.shape[axis],)
            others = tuple(i for i in range(w.ndim) if i != axis)
            lo, hi = np.minimum(w.min(axis=others), 0), np.maximum(w.max(axis=others), 0)
        else:
            assert file_axis is None and scale.shape == zero.shape == ()
            lo, hi = min(w.min(), 0.0), max(w.max(), 0.0)
        expected_scale = (hi - lo) / 15
        np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
        np.testing.assert_array_equal(zero.astype(np.int64), np.round(-lo / expected_scale).astype(np.int64))
        assert str(zero.dtype) == "uint4"  # the zero points share the weight's unsigned type
        assert np.any(zero.astype(np.int64) != 0)  # weights around zero: mid-range zero points
        q = numpy_helper.to_array(ints).astype(np.int64)
        assert q.min() >= 0 and q.max() <= 15
        # dequantized by hand, every weight lies within half a step of its float value
        s, z = _per_channel(scale.astype(np.float64), file_axis, w.ndim), _per_channel(zero.astype(np.float64), file_axis, w.ndim)
        assert np.all(np.abs((q - z) * s - w) <= s / 2 * (1 + 1e-5))


def test_per_tensor_symmetric_weights_have_one_scale_and_no_axis(tmp_path):
    proto = cost_model_proto()
    floats = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    out = tmp_path / "q.onnx"
    report = quantize(proto, out, cost_model_calib(),
                      qconfig(wbits=4, abits=8, first_last_bits=None, weight_per_channel=False, weight_init="minmax"),
                      options()).report
    model = onnx.load(str(out))
    for name in ("w1", "w2", "w3", "w4"):
        ints, scale, zero, axis = _weights_in_file(model, name)
        assert axis is None and scale.shape == () and zero.shape == ()
        assert ints.data_type == TensorProto.INT4 and int(zero.astype(np.int64)) == 0
        assert float(scale) == pytest.approx(np.abs(floats[name]).max() / 7, rel=1e-6)
    # the Gather table keeps its per-row scales: per-tensor applies to layer weights
    _, scale, _, axis = _weights_in_file(model, "table")
    assert axis == 0 and scale.shape == (5,)
    # one float32 scale and one int4 zero point (a byte) per layer weight
    assert report.costs["size_bytes"] == hand_costs(UNIFORM, per_channel=False)["size_bytes"]
    # per channel, w1 and w2 held 4 scales and 2 bytes of zero points, w3 10 and 5, w4 6 and 3
    saved = (4 * 3 + 1) + (4 * 3 + 1) + (4 * 9 + 4) + (4 * 5 + 2)
    assert hand_costs(UNIFORM)["size_bytes"] - report.costs["size_bytes"] == saved


# ---------------------------------------------------------------------------------------------
# Observers against brute force.

LP = 2.4  # the Lp norm of the range search (observers.LP_NORM; the paper's 2.4)


def np_qparams(lo, hi, bits: int, symmetric: bool):
    """Scale and zero point covering [lo, hi] widened to hold 0, computed here in float64."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if symmetric:
        return np.maximum(-lo, hi) / (2 ** (bits - 1) - 1), np.zeros_like(lo)
    scale = (hi - lo) / (2**bits - 1)
    return scale, np.clip(np.round(-lo / scale), 0, 2**bits - 1)


def np_fake_quant(x, scale, zero, bits: int, symmetric: bool):
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    return (np.clip(np.round(x / scale) + zero, qmin, qmax) - zero) * scale


def lp_error(x, scale, zero, bits, symmetric, weights=None, axis=-1):
    err = np.abs(np_fake_quant(x, scale, zero, bits, symmetric) - x) ** LP
    return (err * (1 if weights is None else weights)).sum(axis=axis)


def test_minmax_weight_ranges_are_min_and_max_per_channel():
    w = np.random.default_rng(3).standard_normal((6, 5, 3)).astype(np.float32) + 0.4
    for symmetric in (True, False):
        scale, zero = weight_qparams(torch.from_numpy(w), QuantSpec(4, symmetric, 1), "minmax")
        rows = np.moveaxis(w, 1, 0).reshape(5, -1).astype(np.float64)
        expected_scale, expected_zero = np_qparams(rows.min(1), rows.max(1), 4, symmetric)
        np.testing.assert_allclose(scale.numpy(), expected_scale, rtol=1e-6)
        np.testing.assert_array_equal(zero.numpy(), expected_zero)


def _shrunk_errors(rows: np.ndarray, ratios, bits: int, symmetric: bool) -> np.ndarray:
    """Lp error of every channel for its min-max range shrunk by each ratio: [ratios, channels].
    A ratio is a number (all channels) or one number per channel."""
    lo, hi = rows.min(1), rows.max(1)
    out = []
    for ratio in ratios:
        scale, zero = np_qparams(lo * ratio, hi * ratio, bits, symmetric)
        out.append(lp_error(rows, scale[:, None], zero[:, None], bits, symmetric))
    return np.array(out)


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, True), (4, False), (8, True)])
def test_weight_mse_search_picks_the_lowest_error_of_its_grid(bits, symmetric):
    """The documented search: shrink factors 1.00, 0.95, ..., 0.20, then 0.01 steps within
    +-0.04 of each channel's best. Brute force over that grid in numpy must find no range
    with a lower Lp error than the one chosen, and the choice is at least as good as min-max
    and close to the best of all 81 factors 1.00 ... 0.20."""
    rng = np.random.default_rng(bits)
    w = np.concatenate([rng.standard_normal((8, 288)), rng.laplace(size=(8, 288)),
                        rng.standard_t(3, size=(8, 288))]).astype(np.float32)
    scale, zero = weight_qparams(torch.from_numpy(w), QuantSpec(bits, symmetric, 0), "mse")
    rows = w.astype(np.float64)
    chosen = lp_error(rows, scale.double().numpy()[:, None], zero.double().numpy()[:, None], bits, symmetric)
    coarse = [1.0 - 0.05 * i for i in range(17)]
    coarse_err = _shrunk_errors(rows, coarse, bits, symmetric)
    centre = np.array(coarse)[coarse_err.argmin(0)]  # each channel's best coarse factor
    fine_err = _shrunk_errors(rows, [np.clip(centre + 0.01 * i, 0.2, 1.0) for i in range(-4, 5)], bits, symmetric)
    best_of_grid = np.minimum(coarse_err.min(0), fine_err.min(0))
    np.testing.assert_allclose(chosen, best_of_grid, rtol=1e-4)
    assert np.all(chosen <= coarse_err[0] * (1 + 1e-6))  # never worse than min-max (factor 1.00)
    exhaustive = _shrunk_errors(rows, np.linspace(1.0, 0.2, 81), bits, symmetric).min(0)
    assert chosen.sum() <= exhaustive.sum() * 1.01  # coarse-to-fine: "the same optimum in practice"


def _observer(batches) -> RangeObserver:
    observer = RangeObserver()
    for batch in batches:
        observer.observe(torch.from_numpy(batch))
    return observer


def test_activation_minmax_keeps_the_exact_extremes_of_every_batch():
    rng = np.random.default_rng(5)
    small = rng.standard_normal((4, 100)).astype(np.float32)
    big = rng.standard_normal(200_000).astype(np.float32)  # subsampled for the histogram; extremes kept
    big[123_457] = 9.5
    big[7] = -7.25
    observer = _observer([small[0], big, *small[1:]])
    for bits, symmetric in ((8, False), (4, True)):
        scale, zero = observer.qparams(QuantSpec(bits, symmetric), "minmax")
        expected_scale, expected_zero = np_qparams(np.float64(-7.25), np.float64(9.5), bits, symmetric)
        assert float(scale) == pytest.approx(expected_scale, rel=1e-6)
        assert float(zero) == expected_zero
    assert sum(s.numel() for s in observer.samples) < small.size + big.size  # the big batch was subsampled


def test_activation_percentile_is_numpy_percentile_of_the_samples():
    rng = np.random.default_rng(6)
    batches = [rng.standard_t(3, size=5000).astype(np.float32) + 0.2 for _ in range(4)]
    values = np.concatenate(batches).astype(np.float64)
    observer = _observer(batches)
    for p in (99.99, 99.0, 90.0):
        lo, hi = np.percentile(values, [100 - p, p])  # linear interpolation, as torch.quantile
        scale, zero = observer.qparams(QuantSpec(8, False), "percentile", p)
        expected_scale, expected_zero = np_qparams(lo, hi, 8, False)
        assert float(scale) == pytest.approx(expected_scale, rel=1e-5)
        assert float(zero) == expected_zero
        assert expected_scale < (values.max() - values.min()) / 255  # a real clip, not min-max


def _candidate_ranges(lo: float, hi: float, symmetric: bool) -> list[tuple[float, float]]:
    """The documented activation grid: each end shrunk by 1.00, 0.98, ..., 0.20 (41 steps),
    independently for two-sided data, the far end only for one-sided data, one magnitude
    for symmetric quantizers."""
    ratios = np.linspace(1.0, 0.2, 41)
    if symmetric:
        return [(-m, m) for m in max(-lo, hi) * ratios]
    los = lo * ratios if lo < 0 else [0.0]
    his = hi * ratios if hi > 0 else [0.0]
    return [(a, b) for a in los for b in his]


@pytest.mark.parametrize("kind,bits", [("two-sided", 4), ("two-sided", 8), ("relu", 4), ("symmetric", 4)])
def test_activation_mse_search_picks_the_lowest_error_of_its_grid(kind, bits):
    rng = np.random.default_rng(bits)
    batches = [rng.standard_t(4, size=3000).astype(np.float32) + 0.3 for _ in range(4)]
    if kind == "relu":
        batches = [np.maximum(b, 0) for b in batches]
    symmetric = kind == "symmetric"
    scale, zero = _observer(batches).qparams(QuantSpec(bits, symmetric), "mse")
    scale, zero = float(scale), float(zero)
    values = np.concatenate(batches).astype(np.float64)
    lo, hi = min(values.min(), 0.0), max(values.max(), 0.0)
    candidates = _candidate_ranges(lo, hi, symmetric)
    # on the 2048-bin histogram the search works on: the choice is the grid's minimum
    counts, _ = np.histogram(values, bins=2048, range=(lo, hi))
    centres = lo + (hi - lo) / 2048 * (np.arange(2048) + 0.5)
    hist_err = [lp_error(centres, *np_qparams(a, b, bits, symmetric), bits, symmetric, counts) for a, b in candidates]
    assert lp_error(centres, scale, zero, bits, symmetric, counts) <= min(hist_err) * (1 + 1e-5)
    # on the samples themselves: within 1% of the grid's best, and far better than min-max at 4 bits
    exact_err = [lp_error(values, *np_qparams(a, b, bits, symmetric), bits, symmetric) for a, b in candidates]
    chosen = lp_error(values, scale, zero, bits, symmetric)
    assert chosen <= min(exact_err) * 1.01
    if bits == 4:
        assert chosen < 0.8 * exact_err[0]
    if kind == "relu":
        assert zero == 0  # one-sided data keeps 0 as its lower end
