"""Mirror vs onnxruntime on real graphs: PP-OCR (Paddle exports), torch exports, the zoo.

Tolerance: max|diff| <= 1e-4 * max|ref| per output (onnxqlimit.parity.DEFAULT_TOLERANCE);
the reference is onnxruntime running the user's original file, so loading (onnxsim,
constant lifting, BN folding, opset conversion) is checked along with the mirror.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from onnxqlimit import LoadConfig, Mirror, load_model
from onnxqlimit.data import load_npz
from onnxqlimit.parity import check_mirror, format_parity
from tests.conftest import MODELS
from tools.synthetic import paddle_text_image

RNG = np.random.default_rng(0)


def assert_parity(path, feeds_list, simplify=True):
    mirror = Mirror(load_model(path, LoadConfig(simplify=simplify)))
    for feeds in feeds_list:
        rows = check_mirror(str(path), mirror, feeds)
        assert all(r.ok for r in rows), format_parity(rows)
    return mirror


def image(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# Several input sizes per model: their spatial dims are dynamic.
PPOCR_SHAPES = {
    "det": [(1, 3, 640, 640), (1, 3, 960, 736)],
    "rec": [(1, 3, 48, 320), (2, 3, 48, 480)],
    "cls": [(4, 3, 48, 192)],
}


@pytest.mark.parametrize("name", ["det", "rec", "cls"])
def test_ppocr_parity(ppocr, name):
    feeds = [{"x": paddle_text_image(*shape[:1], *shape[2:], seed=i)} for i, shape in enumerate(PPOCR_SHAPES[name])]
    assert_parity(ppocr[name], feeds)


@pytest.mark.parametrize("name", ["rec", "cls"])
def test_ppocr_parity_without_simplifier(ppocr, name):
    """Our own Constant lifting and BN folding, with onnxsim switched off."""
    loaded = load_model(ppocr[name], LoadConfig(simplify=False))
    assert not any(n.op_type == "Constant" and n.output[0] in {i for m in loaded.graph.node for i in m.input
                                                                 if m.op_type == "Conv"} for n in loaded.graph.node)
    shape = PPOCR_SHAPES[name][0]
    assert_parity(ppocr[name], [{"x": paddle_text_image(shape[0], *shape[2:])}], simplify=False)


def test_ppocr_rec_keeps_its_character_dictionary(ppocr):
    import onnx

    original = {p.key: p.value for p in onnx.load(str(ppocr["rec"]), load_external_data=False).metadata_props}
    loaded = {p.key: p.value for p in load_model(ppocr["rec"]).metadata_props}
    assert "character" in original and loaded == original


@pytest.fixture(scope="module", params=[13, 17])
def reference_models(request, tmp_path_factory):
    from tools.archs import export_reference_models

    return export_reference_models(tmp_path_factory.mktemp(f"opset{request.param}"), request.param)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torch_cnn_parity(reference_models, name):
    mirror = assert_parity(reference_models[name], [{"input": image(1, 3, 224, 224)}, {"input": image(2, 3, 224, 224)}])
    assert not any(n.op_type == "BatchNormalization" for n in mirror.nodes)


def bert_feeds(batch, seq):
    mask = np.ones((batch, seq), np.int64)
    mask[-1, seq // 2:] = 0  # padding in the last sequence
    types = np.zeros((batch, seq), np.int64)
    types[:, seq // 3:] = 1
    return {"input_ids": RNG.integers(0, 1000, (batch, seq)), "attention_mask": mask, "token_type_ids": types}


@pytest.mark.slow
def test_torch_bert_parity_dynamic_batch_and_sequence(reference_models):
    assert_parity(reference_models["bert"], [bert_feeds(1, 8), bert_feeds(3, 37), bert_feeds(2, 128)])


def zoo_entries():
    index = MODELS / "zoo.json"
    return json.loads(index.read_text())["models"] if index.exists() else []


@pytest.mark.parametrize("entry", zoo_entries(), ids=lambda e: e["name"])
def test_zoo_parity(entry):
    model = MODELS / entry["onnx"]
    feeds = load_npz(MODELS / entry["calib"], ["input"])
    assert_parity(model, [{"input": feeds["input"][:32]}])


def test_zoo_is_present():
    assert len(zoo_entries()) >= 2
