"""Checkpoint and resume (issue 12 item 3): a run killed mid-reconstruction, resumed with
--resume, writes the same bytes as an uninterrupted run; a fresh run never reuses them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from onnxqlimit.recon import ReconConfig
from tests.conftest import MODELS, ROOT

MODEL, CALIB = MODELS / "zoo_resnet.onnx", MODELS / "zoo_resnet_calib.npz"


def _command(out, work, *extra):
    return [sys.executable, "-m", "onnxqlimit", "quantize", str(MODEL), "-o", str(out), "--calib", str(CALIB),
            "--wbits", "4", "--abits", "4", "--iters", "150", "--calib-size", "64", "--threads", "1",
            "--work-dir", str(work), "--quiet", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(tmp_path):
    whole = tmp_path / "whole.onnx"
    done = subprocess.run(_command(whole, tmp_path / "w1"), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not list((tmp_path / "w1").glob("run-*"))  # checkpoints are removed once the model is written

    out, work = tmp_path / "resumed.onnx", tmp_path / "w2"
    proc = subprocess.Popen(_command(out, work), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(work.glob("run-*/block-0002.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(p.name for p in work.glob("run-*/block-*.pt"))
    assert "block-0002.pt" in saved and not out.exists()
    assert len(saved) < 5  # killed mid-reconstruction (zoo_resnet has 5 blocks)

    done = subprocess.run(_command(out, work, "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(resumed from a checkpoint)") == len(saved)
    assert out.read_bytes() == whole.read_bytes()


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume(tmp_path):
    work = tmp_path / "w"
    # A shell's background jobs start with SIGINT ignored, and Python then keeps ignoring it:
    # give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(_command(tmp_path / "q.onnx", work), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not list(work.glob("run-*/block-0001.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip() == ("onnxqlimit: interrupted; nothing was written, finished blocks are saved: "
                           "rerun the same command with --resume")
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
def test_same_run_after_other_runs_in_one_process_gives_the_same_bytes(tmp_path):
    """Determinism does not depend on what ran before in the process (mask pools, seeds)."""
    import numpy as np

    from onnxqlimit import QuantConfig
    from onnxqlimit.pipeline import RunOptions, quantize

    calib = {"input": np.load(CALIB)["input"][:32]}
    options = RunOptions(recon=ReconConfig(iters=20, calib_size=32), progress=False, threads=1)
    quantize(MODEL, tmp_path / "a.onnx", calib, QuantConfig.of(wbits=4, abits=4), options)
    quantize(MODEL, tmp_path / "other.onnx", calib, QuantConfig.of(wbits=3, abits=8), RunOptions(recon=ReconConfig(iters=30), seed=7, progress=False))
    quantize(MODEL, tmp_path / "b.onnx", calib, QuantConfig.of(wbits=4, abits=4), options)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def _interrupted_after_tuning(tmp_path, monkeypatch, work, *extra) -> list[str]:
    """A run stopped by Ctrl-C once every block is tuned (while the file is being made): its
    checkpoints stay in `work`, as a run killed at that point leaves them. Returns their names."""
    from onnxqlimit.cli import main

    quantize_module = sys.modules["onnxqlimit.pipeline"]  # the package re-exports a function of that name

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(quantize_module, "export_qdq", interrupt)
        assert main(_argv(tmp_path / "stopped.onnx", work, *extra)) == 130
    return sorted(p.name for p in work.glob("run-*/block-*.pt"))


def _argv(out, work, *extra):
    return ["quantize", str(MODEL), "-o", str(out), "--calib", str(CALIB), "--wbits", "4", "--abits", "4",
            "--iters", "10", "--calib-size", "32", "--threads", "1", "--work-dir", str(work), "--quiet",
            "--report", str(out.with_suffix(".json")), *extra]


def _resumed_blocks(out) -> list[bool]:
    import json

    return [b["resumed"] for b in json.loads(out.with_suffix(".json").read_text())["reconstruction"]["blocks"]]


@pytest.mark.slow
def test_resume_with_changed_options_tunes_every_block_again(tmp_path, monkeypatch, capsys, caplog):
    """--resume restores only the blocks of a run with the same options: after a change of
    --seed or --iters the blocks are tuned again, and the file is the one a fresh run with
    the new options writes. The unchanged command, last, restores every block (the control)."""
    from onnxqlimit.cli import main

    work = tmp_path / "work"
    saved = _interrupted_after_tuning(tmp_path, monkeypatch, work)
    assert len(saved) == 5  # zoo_resnet's 5 blocks, all tuned before the interruption
    capsys.readouterr()
    for name, change in (("seed", ["--seed", "1"]), ("iters", ["--iters", "12"])):
        caplog.clear()
        out = tmp_path / f"{name}.onnx"
        assert main(_argv(out, work, "--resume", *change)) == 0
        text = capsys.readouterr().out
        assert "(resumed from a checkpoint)" not in text and _resumed_blocks(out) == [False] * 5
        assert "--resume: no saved blocks for this model, data and options" in caplog.text
        fresh = tmp_path / f"{name}-fresh.onnx"
        assert main(_argv(fresh, tmp_path / f"fresh-{name}", *change)) == 0
        assert out.read_bytes() == fresh.read_bytes()
    assert sorted(p.name for p in work.glob("run-*/block-*.pt")) == saved  # the first run's blocks are still there
    caplog.clear()
    out = tmp_path / "same.onnx"
    assert main(_argv(out, work, "--resume")) == 0
    assert capsys.readouterr().out.count("(resumed from a checkpoint)") == 5 and _resumed_blocks(out) == [True] * 5
    assert "no saved blocks" not in caplog.text
