"""Reconstruction: AdaRound, LSQ, QDrop, block caches, Fisher weights, and the end-to-end gain over RTN."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from onnxqlimit import QuantConfig
from onnxqlimit.errors import QLimitError
from onnxqlimit.parity import ort_session
from onnxqlimit.pipeline import RunOptions, place_and_calibrate, prepare, quantize
from onnxqlimit.quant.adaround import AdaRoundQuantize
from onnxqlimit.quant.fake_quant import FakeQuantize, QuantSpec
from onnxqlimit.recon import ReconConfig, reconstruct
from onnxqlimit.recon.block_cache import BatchLayout, TensorCache, probe_layout
from onnxqlimit.recon.fisher import task_loss
from tests import cost_oracle
from tests.conftest import MODELS

TINY_RECON = {"calib_size": 64, "batch_size": 16}
TINY = {"parity_samples": 8, "progress": False}


def _weight_quantizer(weight: torch.Tensor, bits: int = 4) -> FakeQuantize:
    fq = FakeQuantize(QuantSpec(bits, True, 0), weight.shape[0])
    scale = weight.abs().flatten(1).max(1).values / fq.spec.qmax
    fq.set_qparams(scale, torch.zeros_like(scale))
    return fq


def test_adaround_starts_at_the_float_weight_and_hardens_to_integers():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    fq = _weight_quantizer(w)
    ada = AdaRoundQuantize(fq, w)
    inside = (w / fq._view(fq.scale, w)).abs() < fq.spec.qmax  # away from the clamp
    assert torch.allclose(ada(w)[inside], w[inside], atol=1e-5)  # soft rounding = the fractional part
    assert ada.regularizer(2.0).item() > 0
    ada.harden()
    assert not hasattr(ada, "alpha") and ada.chosen.dtype == torch.int8  # the choice is all that is kept
    ints = ada.quantize(w)
    assert torch.equal(ints, ints.round())
    assert torch.equal(ada(w), (ints - 0) * fq._view(fq.scale, w))
    nearest = fq.quantize(w)
    assert (ints != nearest).float().mean() < 0.01  # untrained, hard rounding is round-to-nearest


def test_adaround_regularizer_is_zero_at_hard_choices():
    w = torch.randn(4, 6)
    ada = AdaRoundQuantize(_weight_quantizer(w), w)
    with torch.no_grad():
        ada.alpha.copy_(torch.where(torch.rand_like(ada.alpha) < 0.5, -10.0, 10.0))
    assert ada.regularizer(2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_lsq_scales_the_step_size_gradient():
    x = torch.randn(64, 10)
    fq = FakeQuantize(QuantSpec(4, False))
    fq.set_qparams(torch.tensor(0.2), torch.tensor(8.0))
    fq.scale.requires_grad_(True)
    fq(x).sum().backward()
    scaled = fq.scale.grad.clone()
    assert scaled.abs().item() > 0
    # LSQ: d x_hat / d s = round(x/s) - x/s inside the range, the clamped level outside;
    # scaled by 1 / sqrt(N * Qp) with N = 640 elements, Qp = 15
    s = fq.scale.detach()
    levels = torch.round(x / s) + 8
    q = torch.clamp(levels, 0, 15)
    lsq = torch.where((levels >= 0) & (levels <= 15), q - 8 - x / s, q - 8).sum()
    assert scaled.item() == pytest.approx(lsq.item() / (640 * 15) ** 0.5, rel=1e-4)


def test_qdrop_mixes_quantized_and_float_elements():
    torch.manual_seed(0)
    x = torch.randn(1000) * 3
    fq = FakeQuantize(QuantSpec(2, False))
    fq.set_qparams(torch.tensor(1.0), torch.tensor(2.0))
    quantized = fq(x)
    fq.quant_prob = 0.5
    mixed = fq(x)
    from_quantized = (mixed == quantized) & (mixed != x)
    from_float = (mixed == x) & (mixed != quantized)
    assert 0.4 < from_quantized.float().mean() < 0.6 and 0.4 < from_float.float().mean() < 0.6
    fq.quant_prob = None
    assert torch.equal(fq(x), quantized)


@pytest.mark.parametrize("shape_one,shape_two,layout", [
    ((1, 8, 4), (2, 8, 4), BatchLayout(0)),
    ((8, 1, 4), (8, 2, 4), BatchLayout(1)),
    ((5, 16), (10, 16), BatchLayout(0, 5)),  # batch merged into the first axis, 5 rows per sample
    ((4,), (4,), BatchLayout(None)),
])
def test_batch_layout_probe_and_round_trip(shape_one, shape_two, layout):
    assert probe_layout(torch.zeros(shape_one), torch.zeros(shape_two)) == layout
    if layout.axis is not None:
        x = torch.arange(int(np.prod(shape_two)) * 2, dtype=torch.float32).reshape(
            [d * 2 if i == layout.axis else d for i, d in enumerate(shape_two)])
        first = layout.to_batch_first(x)
        assert first.shape[0] == 4
        assert torch.equal(layout.from_batch_first(first), x)
        assert torch.equal(layout.from_batch_first(first[1:3]), layout.from_batch_first(first)[
            tuple(slice(None) if i != layout.axis else slice(layout.group, 3 * layout.group) for i in range(x.dim()))])


def test_probe_refuses_a_tensor_without_a_clear_batch_axis():
    with pytest.raises(QLimitError, match="batch"):
        probe_layout(torch.zeros(3, 4), torch.zeros(7, 4))


def test_cache_spills_to_disk_and_reads_back_the_same():
    layouts = {"a": BatchLayout(1), "b": BatchLayout(None)}
    ram, disk = TensorCache(layouts, 1e9, torch.device("cpu")), TensorCache(layouts, 0, torch.device("cpu"))
    chunks = [torch.randn(3, 4, 5) for _ in range(3)]
    for cache in (ram, disk):
        cache.put("a", chunks)
        cache.put("b", [torch.arange(4)])
    assert disk.disk_bytes > 0 and ram.disk_bytes == 0
    index = torch.tensor([7, 0, 11, 3])
    assert torch.equal(ram.get("a", index), disk.get("a", index))
    assert torch.equal(ram.get("a", index)[:, 0], chunks[1][:, 3])
    assert torch.equal(disk.get("b", index), torch.arange(4))
    disk.drop("a")
    assert disk.disk_bytes == 0
    disk.close()


def test_task_loss_picks_kl_for_probabilities_and_logits_and_squares_otherwise():
    p = torch.softmax(torch.randn(4, 5, 7), -1)
    assert float(task_loss(p, p)) == pytest.approx(0.0, abs=1e-5)
    assert float(task_loss(p, torch.softmax(torch.randn(4, 5, 7), -1))) > 0
    logits = torch.randn(4, 10)
    assert float(task_loss(logits, logits + 3.0)) == pytest.approx(0.0, abs=1e-4)  # softmax ignores a shift
    maps = torch.rand(2, 1, 8, 8)
    # relative to the output's mean square, so maps in [0, 1] and boxes in pixels weigh alike
    assert float(task_loss(maps, maps + 0.5)) == pytest.approx(0.5 * 0.25 * 128 / float(maps.pow(2).mean()), rel=1e-5)


def _calibrated(name: str, wbits: int, abits: int, samples: int = 64):
    """The zoo model placed and calibrated by the pipeline's own first stages, without smoothing:
    these tests pin reconstruction's mechanics on the graph as given (with the classifier's
    input smoothed, its block fell only 57.9 -> 56.4 at W2A4; see issue 23's closing note)."""
    ctx = prepare(str(MODELS / f"{name}.onnx"), str(MODELS / f"{name}_calib.npz"), QuantConfig.of(wbits=wbits, abits=abits, smooth=0),
                  RunOptions(recon=ReconConfig(calib_size=samples, batch_size=16), progress=False, device="cpu"))
    return ctx.model, ctx.mirror, place_and_calibrate(ctx), ctx.feeds


@pytest.mark.slow
def test_reconstruction_lowers_the_block_loss_and_leaves_no_dropping_behind(monkeypatch):
    model, mirror, state, feeds = _calibrated("zoo_resnet", 2, 4)
    seen = set()
    original = FakeQuantize.forward

    def spy(self, x):
        seen.add(self.quant_prob)
        return original(self, x)

    monkeypatch.setattr(FakeQuantize, "forward", spy)
    result = reconstruct(mirror, model, state, feeds,
                         ReconConfig(method="qdrop", iters=120, batch_size=16, lr_round=1e-2), progress=False)
    monkeypatch.undo()
    assert 0.5 in seen and None in seen  # mixing on while tuning, off for the caches and targets
    assert all(q.quant_prob is None and not q.scale.requires_grad for q in state.quantizers.values())
    assert any(isinstance(q, AdaRoundQuantize) and q.hard for q in state.quantizers.values())
    before = sum(b.loss_before for b in result.blocks)
    after = sum(b.loss_after for b in result.blocks)
    assert after < 0.8 * before, [(b.loss_before, b.loss_after) for b in result.blocks]
    assert sum(b.loss_after < b.loss_before for b in result.blocks) > len(result.blocks) / 2
    # FLOPs per iteration, by hand: forward 2 x MACs x batch, backward counted as twice the forward
    macs = cost_oracle.node_macs(model)
    for block in result.blocks:
        start, stop = map(int, block.nodes.split("-"))
        block_macs = sum(macs.get(model.graph.node[i].name, 0) for i in range(start, stop + 1))
        assert block.gflop_per_iter == pytest.approx(3 * 2 * block_macs * 16 / 1e9, rel=1e-9), block
    done = sum(b.gflop_per_iter * b.iters for b in result.blocks)
    assert result.gflops == pytest.approx(done / result.train_seconds, rel=1e-9)
    # both caches hold the 64 calibration inputs (float32 [3, 32, 32]) at least
    assert result.peak_cache_mb >= 2 * 64 * 3 * 32 * 32 * 4 / 2**20
    # deterministic once tuned: the mirror gives the same output twice
    batch = {k: v[:4] for k, v in feeds.items()}
    with torch.no_grad():
        assert torch.equal(mirror.run(batch)["logits"], mirror.run(batch)["logits"])


def _top1(path, name: str) -> float:
    val = np.load(MODELS / f"{name}_val.npz")
    session = ort_session(str(path), optimize=True)
    logits = np.concatenate([session.run(None, {"input": val["input"][i:i + 500]})[0]
                             for i in range(0, len(val["label"]), 500)])
    return 100 * float((logits.argmax(1) == val["label"]).mean())


@pytest.mark.slow
def test_qdrop_beats_rtn_end_to_end_with_export_parity(tmp_path):
    """W2A4 on the zoo ResNet, fixed seed, fast settings: the shipped file must be better."""
    config = QuantConfig.of(wbits=2, abits=4)
    calib = str(MODELS / "zoo_resnet_calib.npz")
    quantize(MODELS / "zoo_resnet.onnx", tmp_path / "rtn.onnx", calib, config,
             RunOptions(recon=ReconConfig(method="rtn", **TINY_RECON), **TINY))
    qdrop = quantize(MODELS / "zoo_resnet.onnx", tmp_path / "qdrop.onnx", calib, config,
                     RunOptions(recon=ReconConfig(method="qdrop", iters=150, **TINY_RECON), **TINY))
    assert qdrop.report.reconstruction["blocks"]
    rtn_top1, qdrop_top1 = _top1(tmp_path / "rtn.onnx", "zoo_resnet"), _top1(tmp_path / "qdrop.onnx", "zoo_resnet")
    assert qdrop_top1 > rtn_top1 + 15, (rtn_top1, qdrop_top1)


@pytest.mark.slow
@pytest.mark.parametrize("method,extra", [("brecq", {}), ("adaround", {}), ("qdrop", {"loss": "fisher"})])
def test_every_method_exports_with_parity(tmp_path, method, extra):
    result = quantize(MODELS / "zoo_mobilenetv2.onnx", tmp_path / "q.onnx", str(MODELS / "zoo_mobilenetv2_calib.npz"),
                      QuantConfig.of(wbits=4, abits=4),
                      RunOptions(recon=ReconConfig(method=method, iters=20, **TINY_RECON, **extra), **TINY))
    blocks = result.report.reconstruction["blocks"]
    if method == "adaround":
        assert all(b["layers"] <= 1 for b in blocks)
    else:
        assert max(b["layers"] for b in blocks) > 1


@pytest.mark.parametrize("field,value,message", [
    ("method", "magic", "--method"), ("loss", "l1", "--loss"), ("granularity", "module", "granularit"),
    ("quant_prob", 0.0, "--quant-prob"), ("tile", -1, "--tile")])
def test_bad_reconstruction_settings_are_refused(field, value, message):
    with pytest.raises(QLimitError, match=message):
        ReconConfig(**{field: value})


@pytest.mark.slow
def test_same_seed_same_rounding_even_after_other_runs():
    def run():
        model, mirror, state, feeds = _calibrated("zoo_resnet", 4, 4, samples=32)
        reconstruct(mirror, model, state, feeds, ReconConfig(method="qdrop", iters=15, batch_size=8), progress=False)
        return {name: q.quantize(mirror.initializer(name)) for name, q in state.quantizers.items()
                if isinstance(q, AdaRoundQuantize)}

    first = run()
    torch.rand(1000)  # disturb the global random state between the runs
    second = run()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
