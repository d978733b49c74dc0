"""Reconstruction blocks found from the graph (onnxqlimit/recon/blocks.py) and `inspect --blocks`."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from onnxqlimit.recon.blocks import (
    Block,
    BlockConfig,
    context_tensors,
    find_blocks,
    format_blocks,
    weight_layers,
)
from onnxqlimit.cli import main
from onnxqlimit.errors import QLimitError
from onnxqlimit.load import load_model
from tests.conftest import MODELS
from tests.onnx_builders import make, rand, tensor
from tools.archs import (
    MBV2_IMAGENET,
    BertEncoder,
    InvertedResidual,
    MobileNetV2,
    ResNet,
    export_onnx,
)

# --------------------------------------------------------------------------- models
# Narrow versions of the reference architectures: the graphs have the same topology as
# resnet18 / mobilenet_v2 (block counts, strides, which blocks have a skip), export fast.


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(0)
    net = ResNet([2, 2, 2, 2], [8, 16, 32, 64], num_classes=10)  # resnet18's layout
    path = export_onnx(net, (torch.randn(1, 3, 32, 32),), tmp_path_factory.mktemp("r") / "r.onnx", 13,
                       ["input"], ["logits"], {"input": {0: "b"}})
    return load_model(path)


@pytest.fixture(scope="module")
def mbv2(tmp_path_factory) -> tuple[onnx.ModelProto, int]:
    torch.manual_seed(0)
    net = MobileNetV2(MBV2_IMAGENET, num_classes=10, width_mult=0.5, last_channels=64)
    skips = sum(m.use_res for m in net.modules() if isinstance(m, InvertedResidual))
    path = export_onnx(net, (torch.randn(1, 3, 32, 32),), tmp_path_factory.mktemp("m") / "m.onnx", 13,
                       ["input"], ["logits"], {"input": {0: "b"}})
    return load_model(path), skips


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(0)
    net = BertEncoder(vocab_size=50, hidden=32, layers=2, heads=2, ffn=64, max_len=16)
    ids, mask, types = torch.randint(0, 50, (2, 8)), torch.ones(2, 8, dtype=torch.int64), torch.zeros(2, 8, dtype=torch.int64)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    path = export_onnx(net, (ids, mask, types), tmp_path_factory.mktemp("b") / "b.onnx", 13, names, ["h"],
                       {n: {0: "b", 1: "s"} for n in names})
    return load_model(path)


# ------------------------------------------------------------------------- helpers


def producers(model: onnx.ModelProto) -> dict[str, int]:
    inits = {t.name for t in model.graph.initializer}
    found = {i.name: -1 for i in model.graph.input if i.name not in inits}
    found.update({o: i for i, node in enumerate(model.graph.node) for o in node.output if o})
    return found


def block_of(blocks: list[Block], index: int) -> Block:
    return next(b for b in blocks if index in b.node_range)


def check_invariants(model: onnx.ModelProto, blocks: list[Block], cap: int) -> None:
    nodes = list(model.graph.node)
    made = producers(model)
    context = context_tensors(model)
    outputs = {o.name for o in model.graph.output}
    assert [b.index for b in blocks] == list(range(len(blocks)))
    assert blocks[0].start == 0 and blocks[-1].stop == len(nodes)
    assert all(a.stop == b.start and a.start < a.stop for a, b in itertools.pairwise(blocks))
    assert [n for b in blocks for n in b.layers] == [nodes[i].name for i in weight_layers(model)]
    earlier_outputs: set[str] = set()
    for b in blocks:
        assert 1 <= len(b.layers) <= cap
        read_outside = {t for i in b.node_range for t in nodes[i].input if t in made and made[t] < b.start}
        assert set(b.inputs) | set(b.context) == read_outside and not set(b.inputs) & set(b.context)
        assert not set(b.inputs) & context and set(b.context) <= context
        assert set(b.inputs) <= earlier_outputs  # every main-path input comes out of an earlier block
        needed_later = {o for i in b.node_range for o in nodes[i].output
                        if o in outputs or any(o in nodes[j].input for j in range(b.stop, len(nodes)))}
        assert set(b.outputs) == needed_later
        assert b.loss_outputs == [o for o in b.outputs if o not in context]
        earlier_outputs |= set(b.outputs)


def joins(model: onnx.ModelProto) -> list[int]:
    """Indices of residual Adds (two computed float inputs, no initializer)."""
    inits = {t.name for t in model.graph.initializer}
    context = context_tensors(model)
    return [i for i, n in enumerate(model.graph.node) if n.op_type == "Add" and len(n.input) == 2
            and not set(n.input) & (inits | context)]


def check_residuals_inside(model: onnx.ModelProto, blocks: list[Block]) -> None:
    """Both operands of every residual join come from the join's block, or are its one input."""
    made = producers(model)
    for i in joins(model):
        b = block_of(blocks, i)
        for t in model.graph.node[i].input:
            assert made[t] in b.node_range or b.inputs == [t], (model.graph.node[i].name, b)


def layer_counts(blocks: list[Block]) -> list[int]:
    return [len(b.layers) for b in blocks]


# --------------------------------------------------------------------------- tests


def test_resnet18_layout(resnet):
    blocks = find_blocks(resnet)
    check_invariants(resnet, blocks, cap=6)
    check_residuals_inside(resnet, blocks)
    # stem conv (+ReLU, max-pool), 8 basic blocks (downsample conv inside), classifier
    assert layer_counts(blocks) == [1, 2, 2, 3, 2, 3, 2, 3, 2, 1]
    assert all(len(b.inputs) <= 1 and len(b.loss_outputs) == 1 for b in blocks)  # one tensor crosses each cut
    assert blocks[0].context == ["input"] and blocks[0].inputs == []
    ops = [n.op_type for n in resnet.graph.node]
    assert ops[blocks[0].start:blocks[0].stop] == ["Conv", "Relu", "MaxPool"]  # the stem's tail stays with it
    assert [ops[b.stop - 1] for b in blocks[1:-1]] == ["Relu"] * 7 + ["Flatten"]
    assert all(any("downsample" in n for n in b.layers) == (len(b.layers) == 3) for b in blocks)
    assert blocks[-1].layers == ["/fc/Gemm"] and blocks[-1].loss_outputs == ["logits"]


def test_mobilenetv2_layout(mbv2):
    model, skips = mbv2
    blocks = find_blocks(model)
    check_invariants(model, blocks, cap=6)
    check_residuals_inside(model, blocks)
    with_skip = [b for b in blocks if any(model.graph.node[i].op_type == "Add" for i in b.node_range)]
    assert skips == 10 and len(with_skip) == skips
    assert all(len(b.layers) == 3 and model.graph.node[b.stop - 1].op_type == "Add" for b in with_skip)
    # The plain chains (stem, inverted residuals without skip, last 1x1 conv, classifier) in groups of 3.
    assert layer_counts(blocks) == [3] * 17 + [2]
    assert all(len(b.inputs) <= 1 and len(b.loss_outputs) == 1 for b in blocks)
    ungrouped = find_blocks(model, BlockConfig(chain_group=1))
    assert layer_counts(ungrouped) == [1, 1, 1, 1, 1, 1, 3, 1, 1, 1, 3, 3, 1, 1, 1, 3, 3, 3, 1, 1, 1, 3, 3,
                                       1, 1, 1, 3, 3, 1, 1, 1, 1, 1]


def test_bert_layout_and_mask_context(bert):
    blocks = find_blocks(bert)
    check_invariants(bert, blocks, cap=6)
    check_residuals_inside(bert, blocks)
    assert layer_counts(blocks) == [4, 2, 4, 2]  # attention (Q, K, V, O), FFN (in, out), per encoder layer
    assert all(len(b.inputs) <= 1 and len(b.loss_outputs) == 1 for b in blocks)
    assert blocks[-1].loss_outputs == ["h"]
    # Everything computed from the attention mask is context: fed as is, never live, no loss on it.
    nodes, masked = bert.graph.node, {"attention_mask"}
    for node in nodes:
        if set(node.input) & masked and node.op_type != "Add":  # stop where the mask bias meets the scores
            masked.update(node.output)
    assert masked <= context_tensors(bert)
    assert "attention_mask" in blocks[0].context
    assert set(blocks[2].context) & masked  # the second layer's attention reads the mask bias as context
    assert not any(set(b.inputs) & masked or set(b.loss_outputs) & masked for b in blocks)


def test_granularities(resnet, mbv2, bert):
    model, _ = mbv2
    for m in (resnet, model, bert):
        per_block = find_blocks(m)
        layers = find_blocks(m, BlockConfig(granularity="layer"))
        check_invariants(m, layers, cap=1)
        assert len(layers) == len(weight_layers(m))
        net = find_blocks(m, BlockConfig(granularity="net"))
        assert len(net) == 1 and len(net[0].layers) == len(weight_layers(m)) and net[0].inputs == []
        stage = find_blocks(m, BlockConfig(granularity="stage"))
        check_invariants(m, stage, cap=24)
        assert len(stage) < len(per_block)
    assert layer_counts(find_blocks(model, BlockConfig(granularity="stage"))) == [24, 24, 5]
    # Layer-wise on ResNet: conv2 keeps its residual Add and ReLU, as in BRECQ's layer reconstruction.
    blocks, made = find_blocks(resnet, BlockConfig(granularity="layer")), producers(resnet)
    for i in joins(resnet):
        b = block_of(blocks, i)
        assert resnet.graph.node[i + 1].op_type == "Relu" and i + 1 in b.node_range and len(b.inputs) == 2
        assert any(made[t] in b.node_range for t in resnet.graph.node[i].input)


def test_max_layers_is_a_hard_cap(resnet):
    blocks = find_blocks(resnet, BlockConfig(max_layers=2))
    check_invariants(resnet, blocks, cap=2)
    assert layer_counts(blocks) == [1, 2, 2, 1, 2, 2, 1, 2, 2, 1, 2, 2, 1]  # downsample blocks must split
    assert max(len(b.inputs) for b in blocks) == 2  # ... and then a residual crosses the cut


@pytest.mark.parametrize("name", ["det", "rec", "cls"])
def test_ppocr_blocks_are_well_formed(ppocr, name):
    model = load_model(ppocr[name])
    blocks = find_blocks(model)
    check_invariants(model, blocks, cap=6)
    assert len(blocks) >= len(weight_layers(model)) / 6


def test_shape_ops_give_context_and_weights_need_float_initializers():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("Reshape", ["c", "s"], ["r"]),
             helper.make_node("MatMul", ["r", "r"], ["a"]),  # activation x activation: not a weight layer
             helper.make_node("Flatten", ["a"], ["f"]),
             helper.make_node("MatMul", ["m", "f"], ["y"])]  # constant on the left is a MatMul weight too
    model = make(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y", [3, 32])],
                 [("w", rand(2, 2, 1, 1)), ("m", rand(3, 1))])
    assert weight_layers(model) == [0, 5]
    assert context_tensors(model) == {"x", "s"}
    blocks = find_blocks(model, BlockConfig(granularity="layer"))
    assert [(b.start, b.stop) for b in blocks] == [(0, 5), (5, 6)]
    assert blocks[1].inputs == ["f"] and blocks[0].outputs == ["f"]
    int_weight = make([helper.make_node("MatMul", ["x", "k"], ["y"])], [tensor("x", [2, 3], TensorProto.INT32)],
                      [tensor("y", [2, 2], TensorProto.INT32)], [("k", np.ones((3, 2), np.int32))])
    assert weight_layers(int_weight) == [] and len(find_blocks(int_weight)) == 1


def test_config_is_checked():
    with pytest.raises(QLimitError, match="granularity"):
        BlockConfig(granularity="module")
    with pytest.raises(QLimitError, match="max_layers"):
        BlockConfig(max_layers=0)


def test_format_blocks(resnet):
    text = format_blocks(find_blocks(resnet), resnet)
    lines = text.splitlines()
    assert len(lines) == 11
    assert lines[0].startswith("block 0: nodes 0-2, 1 layer (/stem/stem.0/Conv), in: [] context: [input] out: [")
    assert lines[-1] == "10 blocks, 21 layers of 49 nodes; layers per block: min 1, median 2, max 3 (1 2 2 3 2 3 2 3 2 1)"


def test_inspect_blocks_cli(capsys):
    path = MODELS / "zoo_resnet.onnx"
    assert main(["inspect", str(path), "--blocks"]) == 0
    out = capsys.readouterr().out
    assert "reconstruction blocks (granularity block, at most 6 layers per block):" in out
    assert "block 4: nodes 21-21, 1 layer (/fc/Gemm), in: [/Flatten_output_0] out: [logits]" in out
    assert "5 blocks, 10 layers of 22 nodes" in out
    assert main(["inspect", str(path), "--blocks", "--granularity", "layer"]) == 0
    assert "10 blocks, 10 layers" in capsys.readouterr().out
    assert main(["inspect", str(path), "--blocks", "--block-layers", "2"]) == 0
    assert "max 2" in capsys.readouterr().out
    for bad in (["--granularity", "module"], ["--block-layers", "0"]):
        assert main(["inspect", str(path), "--blocks", *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("onnxqlimit: error: argument"), err
