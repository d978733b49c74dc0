"""Checkpoint and resume (issue 12 item 3): a run killed mid-reconstruction, resumed with
--resume, writes the same bytes as an uninterrupted run; a fresh run never reuses them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from onnxqlimit.recon import ReconConfig  # noqa: I001
from tests.conftest import MODELS, ROOT

MODEL, CALIB = MODELS / "zoo_resnet.onnx", MODELS / "zoo_resnet_calib.npz"


def _command(out, work, *extra):
    return [sys.executable, "-m", "onnxqlimit", "quantize", str(MODEL), "-o", str(out), "--calib", str(CALIB),
            "--wbits", "4", "--abits", "4", "--iters", "150", "--calib-size", "64", "--threads", "1",
            "--work-dir", str(work), "--quiet", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


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
