"""--preset: what `paper` sets (the published schedule) and what the explicit options override,
as the run records it in its report."""
from __future__ import annotations

import json

from onnxqlimit.cli import main
from tests.conftest import MODELS

MODEL, CALIB = MODELS / "zoo_resnet.onnx", MODELS / "zoo_resnet_calib.npz"  # 256 calibration samples


def _report(tmp_path, capsys, *argv) -> dict:
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main(["quantize", str(MODEL), "-o", str(out), "--calib", str(CALIB), "--quiet", "--report", str(report),
                 "--threads", "1", *argv])
    assert code == 0, capsys.readouterr().err
    return json.loads(report.read_text())


def test_paper_preset_is_the_published_schedule(tmp_path, capsys):
    """BRECQ/QDrop's setting: 20000 iterations per block, batch 32, rounding lr 1e-3, no early
    stop, up to 1024 calibration samples (all 256 the file has). Round to nearest, so the
    20000 iterations are recorded, not run."""
    report = _report(tmp_path, capsys, "--preset", "paper", "--method", "rtn")
    options, recon = report["options"], report["options"]["recon"]
    assert (recon["iters"], recon["batch_size"], recon["lr_round"], recon["early_stop"]) == (20000, 32, 1e-3, False)
    assert recon["calib_size"] == 1024 and options["calib_size"] == 256  # the limit, and the samples used
    assert report["reconstruction"] is None and report["quality"]["held_back"] is False  # every sample calibrates


def test_fast_preset_differs_where_documented(tmp_path, capsys):
    recon = _report(tmp_path, capsys, "--method", "rtn", "--calib-size", "64")["options"]["recon"]
    assert (recon["iters"], recon["batch_size"], recon["lr_round"], recon["early_stop"]) == (500, 8, 1e-2, True)


def test_explicit_options_override_the_paper_preset_and_the_rest_still_applies(tmp_path, capsys, monkeypatch):
    """--iters, --batch-size and --calib-size win over the preset; its learning rate and its
    full schedule (no early stop) still apply, and the blocks run exactly --iters iterations
    on batches of --batch-size."""
    import torch

    rates = set()
    adam = torch.optim.Adam

    def spy(params, lr, **kwargs):  # the optimisers tuning makes: rounding (lr_round) and LSQ scales
        rates.add(lr)
        return adam(params, lr=lr, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", spy)
    report = _report(tmp_path, capsys, "--preset", "paper", "--iters", "3", "--batch-size", "16", "--calib-size", "48",
                     "--wbits", "4", "--abits", "4")
    options, recon = report["options"], report["options"]["recon"]
    assert (recon["iters"], recon["batch_size"], recon["lr_round"], recon["early_stop"]) == (3, 16, 1e-3, False)
    assert options["calib_size"] == recon["calib_size"] == 48
    tuning = report["reconstruction"]
    assert tuning["samples"] == 48 and tuning["batch_size"] == 16
    assert [b["iters"] for b in tuning["blocks"]] == [3] * len(tuning["blocks"]) and len(tuning["blocks"]) == 5
    assert not any(b["stopped_early"] for b in tuning["blocks"])
    assert rates == {1e-3, recon["lr_scale"]}  # the rounding variables were tuned at paper's rate
    # the held-back samples come from past --calib-size: quality is measured on data not tuned on
    assert report["quality"]["held_back"] is True
