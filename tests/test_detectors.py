"""YOLOv8-style detectors (tools/archs.YoloV8, random weights, narrow): placement around
the C2f split/concat, SPPF max-pools, the upsample + concat neck and the DFL decode;
reconstruction blocks; export parity; the head's 8-bit rule; dynamic batch."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from onnxqlimit import QuantConfig
from onnxqlimit.load import load_model
from onnxqlimit.mirror import Mirror
from onnxqlimit.pipeline import RunOptions, quantize
from onnxqlimit.quant.policy import place
from onnxqlimit.quant.reach import last_layers
from onnxqlimit.recon import ReconConfig  # noqa: I001
from onnxqlimit.recon.blocks import find_blocks, weight_layers
from tools.archs import YoloV8, export_onnx, fit_conv_scales, randomize_bn_stats

SIZE, CLASSES = 64, 3


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    torch.manual_seed(0)
    net = YoloV8(num_classes=CLASSES, width=0.0625)  # YOLOv8n's graph with 8..64 channels
    gen = torch.Generator().manual_seed(0)
    randomize_bn_stats(net, gen)
    fit_conv_scales(net, torch.rand(2, 3, SIZE, SIZE, generator=gen))
    path = tmp_path_factory.mktemp("yolo") / "yolo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the anchor grid is constant on purpose
        return export_onnx(net, (torch.zeros(1, 3, SIZE, SIZE),), path, 13, ["images"], ["output0"],
                           {"images": {0: "batch"}, "output0": {0: "batch"}})


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, SIZE, SIZE), dtype=np.float32)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def test_graph_has_the_yolov8_ops(yolo):
    ops = {n.op_type for n in load_model(yolo).graph.node}
    assert {"Split", "Concat", "MaxPool", "Resize", "Softmax", "Sigmoid", "Conv"} <= ops


def test_placement_quantizes_compute_inputs_only_and_keeps_the_head_at_8_bits(yolo):
    model = load_model(yolo)
    producers = _producers(model)
    last = last_layers(Mirror(model), {"images": _images(1, 0)})  # one sample
    assert place(model, QuantConfig.of(wbits=4, abits=4)) != place(model, QuantConfig.of(wbits=4, abits=4), last)
    points = place(model, QuantConfig.of(wbits=4, abits=4), last)
    acts = {p.tensor: p for p in points if p.kind == "activation"}
    weights = {p.tensor: p for p in points if p.kind == "weight"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert {n.input[1] for n in convs} == set(weights)  # every conv weight, nothing else
    # Activation quantizers stand on compute-layer inputs and, in the 8-bit head that
    # onnxruntime fuses, on the outputs of its convs and of the SiLU / Concat ops between
    # them (QLinearSigmoid, QLinearMul, QLinearConcat), and tied to their input on the
    # data-movement ops there (Split, Reshape, nearest Resize); the 4-bit backbone's C2f
    # split, the neck's concat/upsample, the max-pools and the decode run in float.
    consumers = {t: [n for n in model.graph.node if t in n.input] for t in acts}
    ops = {n.name: n.op_type for n in model.graph.node}
    assert all(any(c.op_type == "Conv" for c in consumers[t]) or acts[t].output_of for t in acts)
    outputs_of = {p.output_of for p in acts.values() if p.output_of}
    from onnxqlimit.quant.policy import DATA_MOVEMENT

    assert {ops[n] for n in outputs_of} <= {"Conv", "Sigmoid", "Mul", "Concat", "Add", *DATA_MOVEMENT}
    assert all((p.tied_to is not None) == (ops[p.output_of] in DATA_MOVEMENT) for p in acts.values() if p.output_of)
    assert outputs_of and all(weights[n.input[1]].spec.bits == 8 for n in convs if n.name in outputs_of)
    assert "output0" not in acts
    # The last compute layers (class logits, the DFL expectation) keep 8-bit weights and inputs.
    dfl = next(n for n in convs if producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "Softmax")
    assert weights[dfl.input[1]].spec.bits == 8 and acts[dfl.input[0]].spec.bits == 8
    cls_heads = [n for n in convs if "/detect/cls." in n.name and n.name.endswith(".2/Conv")]  # class logits
    assert len(cls_heads) == 3 and all(weights[n.input[1]].fixed and weights[n.input[1]].spec.bits == 8
                                       for n in cls_heads)
    # The box-bin convs feed the DFL convolution (through the decode's Concat/Split): not last.
    box_heads = [n for n in convs if "/detect/box." in n.name and n.name.endswith(".2/Conv")]
    assert len(box_heads) == 3 and all(weights[n.input[1]].spec.bits == 4 for n in box_heads)
    assert last == {n.name for n in cls_heads} | {dfl.name}


def test_graph_rule_alone_misses_the_class_heads(yolo):
    """Read off tensors, the decode's Concat/Split puts every head upstream of the DFL conv."""
    model = load_model(yolo)
    weights = {p.tensor: p for p in place(model, QuantConfig.of(wbits=4, abits=4)) if p.kind == "weight"}
    cls_heads = [n for n in model.graph.node if "/detect/cls." in n.name and n.name.endswith(".2/Conv")]
    assert all(weights[n.input[1]].spec.bits == 4 for n in cls_heads)


def test_blocks_cover_every_weight_layer_once(yolo):
    model = load_model(yolo)
    blocks = find_blocks(model)
    layers = [i for b in blocks for i in b.layers]
    names = [model.graph.node[i].name for i in weight_layers(model)]
    assert sorted(layers) == sorted(names) and len(set(layers)) == len(layers)
    assert len(blocks) > 5  # the net is cut into several blocks, not reconstructed whole


@pytest.mark.parametrize("bits", [(8, 8), pytest.param((4, 4), marks=pytest.mark.slow)])
def test_qdrop_export_matches_and_runs_at_another_batch(yolo, tmp_path, bits):
    out = tmp_path / "q.onnx"
    options = RunOptions(recon=ReconConfig(method="qdrop", iters=4, calib_size=8, batch_size=4), parity_samples=4, progress=False, device="cpu")
    report = quantize(yolo, out, {"images": _images(8, 1)}, QuantConfig.of(wbits=bits[0], abits=bits[1]), options).report
    assert min(r["within_one_step"] for r in report.parity) >= 0.99  # mirror vs onnxruntime
    x = _images(3, 2)  # calibrated at batch 8
    ref = ort.InferenceSession(str(yolo), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert got.shape == ref.shape == (3, 4 + CLASSES, (SIZE // 8) ** 2 + (SIZE // 16) ** 2 + (SIZE // 32) ** 2)
    boxes_sqnr = 10 * np.log10((ref[:, :4] ** 2).mean() / ((got[:, :4] - ref[:, :4]) ** 2).mean())
    # random weights, 4 iterations: 15 / 10 dB here (W8A8 19 dB before the fused form put an
    # 8-bit Q/DQ on every conv output, as onnxruntime's quantize_static does); a broken file is < 0
    assert boxes_sqnr > (12 if bits == (8, 8) else 6)
    dq = [n for n in onnx.load(str(out)).graph.node if n.op_type == "DequantizeLinear"]
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    weight_ints = [inits[n.input[0]] for n in dq if n.input[0] in inits and inits[n.input[0]].ndim == 4]
    assert weight_ints and {str(w.dtype) for w in weight_ints} == ({"int8"} if bits[0] == 8 else {"int4", "int8"})
