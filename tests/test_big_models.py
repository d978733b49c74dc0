"""Models too big to hold: weights stay in their data files (mapped, never read whole),
external data in gives external data out, and the output is validated from its file.

The real thing (a transformer over 12 GB on this 24 GB machine) is `tools/big_model.py`;
here a small encoder is made to take the same path by lowering weights.IN_MEMORY_LIMIT.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from onnxqlimit import weights
from onnxqlimit.cli import main
from onnxqlimit.load import load_model, read_model
from onnxqlimit.mirror import Mirror
from onnxqlimit.parity import ort_session
from tests.test_transformers import NAMES, VOCAB, token_feeds
from tools.archs import BertEncoder, export_onnx
from tools.big_model import build


@pytest.fixture(scope="module")
def external_encoder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = BertEncoder(vocab_size=VOCAB, hidden=64, layers=2, heads=2, ffn=128, max_len=32).eval()
    example = tuple(torch.as_tensor(v) for v in token_feeds(np.random.default_rng(0), 2, 12).values())
    folder = tmp_path_factory.mktemp("big")
    plain = export_onnx(net, example, folder / "plain.onnx", 17, NAMES, ["hidden"],
                        {n: {0: "batch", 1: "seq"} for n in NAMES})
    path = folder / "model" / "encoder.onnx"
    path.parent.mkdir()
    onnx.save(onnx.load(str(plain)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="encoder.onnx.data", size_threshold=1024)
    np.savez(folder / "calib.npz", **token_feeds(np.random.default_rng(1), 24, 12))
    return path


def _maps(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def test_weights_over_the_limit_stay_on_disk_and_the_mirror_maps_them(external_encoder, monkeypatch):
    monkeypatch.setattr(weights, "IN_MEMORY_LIMIT", 0)
    model = read_model(external_encoder)
    data = external_encoder.parent / "encoder.onnx.data"
    assert weights.on_disk(model) and model.ByteSize() < data.stat().st_size / 5  # references, not data
    big = [t for t in model.graph.initializer if weights.is_external(t)]
    assert big and all(isinstance(weights.array(t), np.memmap) for t in big)
    mirror = Mirror(model)
    assert _maps(data)  # the weights are the mapped file
    feeds = token_feeds(np.random.default_rng(2), 3, 12)
    expected = ort_session(str(external_encoder)).run(["hidden"], feeds)[0]
    with torch.no_grad():
        got = mirror.run(feeds)["hidden"].numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    with pytest.raises(ValueError, match="runs from its file"):
        ort_session(model)  # onnxruntime cannot resolve basepath references from bytes


@pytest.mark.parametrize("method", ["rtn", "qdrop"])
def test_on_disk_and_in_memory_runs_write_the_same_files(external_encoder, tmp_path, monkeypatch, method):
    """The on-disk path changes where weights live, never what is computed (automatic smoothing,
    which a model kept on disk skips, is off in both)."""
    calib = str(external_encoder.parent.parent / "calib.npz")
    args = ["--calib", calib, "--method", method, "--iters", "5", "--calib-size", "16", "--no-simplify",
            "--quiet", "--work-dir", str(tmp_path / "work"), "--smooth", "0"]
    assert main(["quantize", str(external_encoder), "-o", str(tmp_path / "mem" / "q.onnx"), *args]) == 0
    monkeypatch.setattr(weights, "IN_MEMORY_LIMIT", 0)
    assert main(["quantize", str(external_encoder), "-o", str(tmp_path / "disk" / "q.onnx"), *args]) == 0
    for name in ("q.onnx", "q.onnx.data"):
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "disk" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["q.onnx", "q.onnx.data"]
    written = onnx.load(str(tmp_path / "disk" / "q.onnx"), load_external_data=False)
    placed = [weights._info(t) for t in written.graph.initializer if weights.is_external(t)]
    assert all(offset % weights.ALIGN == 0 for _, offset, length in placed if length >= weights.ALIGN)
    assert all(not t.external_data or {e.key for e in t.external_data} <= {"location", "offset", "length"}
               for t in written.graph.initializer)  # no basepath in the file: onnxruntime refuses it


def test_a_missing_external_data_file_is_one_line(external_encoder, tmp_path, capsys):
    lonely = tmp_path / "encoder.onnx"
    lonely.write_bytes(external_encoder.read_bytes())  # the model without its data file
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(lonely), "-o", str(out), "--calib",
                 str(external_encoder.parent.parent / "calib.npz"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "external data file encoder.onnx.data" in err and "is missing" in err
    assert not out.exists()


def test_save_streams_big_tensors_out_and_keeps_small_ones(tmp_path):
    big = onnx.numpy_helper.from_array(np.arange(40000, dtype=np.float32).reshape(200, 200), "big")
    small = onnx.numpy_helper.from_array(np.ones(4, np.float32), "small")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["big", "big"], ["y"])], "g", [],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [200, 200])],
                                   [big, small])
    model = onnx.helper.make_model(graph)
    weights.save(model, tmp_path / "m.onnx", "m.onnx.data")
    assert weights.is_external(model.graph.initializer[0]) and not weights.is_external(model.graph.initializer[1])
    assert np.array_equal(weights.array(model.graph.initializer[0]), np.arange(40000).reshape(200, 200))
    assert (tmp_path / "m.onnx.data").stat().st_size == 160000
    y = ort_session(str(tmp_path / "m.onnx")).run(None, {})[0]
    assert np.array_equal(y, 2 * np.arange(40000, dtype=np.float32).reshape(200, 200))


def test_simplification_keeps_attention_in_standard_ops(tmp_path):
    """onnxsim fuses a plain attention subgraph into com.microsoft.Attention by default: the
    mirror cannot run it and the output would need onnxruntime. Loading skips that fusion."""
    path = tmp_path / "attention.onnx"
    build(path, layers=1, hidden=64, heads=4)
    model = load_model(path)
    assert not [n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert "Softmax" in {n.op_type for n in model.graph.node}
    Mirror(model)


def test_external_data_outside_the_model_folder_is_refused(external_encoder, tmp_path, capsys):
    model = onnx.load(str(external_encoder), load_external_data=False)
    for tensor in weights.external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../encoder.onnx.data"
    sneaky = tmp_path / "inner" / "encoder.onnx"
    sneaky.parent.mkdir()
    onnx.save(model, str(sneaky))
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(sneaky), "-o", str(out), "--calib",
                 str(external_encoder.parent.parent / "calib.npz"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has external data outside the model's folder ('../encoder.onnx.data')" in err
    assert not out.exists()
