"""torch's thread count: --threads wins, then the user's own setting, else every core; restored after a run."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from onnxqlimit import QuantConfig, Report
from onnxqlimit.cli import main
from onnxqlimit.errors import QLimitError
from onnxqlimit.pipeline import RunOptions, cpu_threads, quantize
from onnxqlimit.recon import ReconConfig  # noqa: I001
from tests.conftest import MODELS

quantize_module = importlib.import_module("onnxqlimit.pipeline")  # the package exports a function of that name

FAST = RunOptions(recon=ReconConfig(method="rtn", calib_size=8, batch_size=8), parity_samples=4, progress=False, device="cpu")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    for name in quantize_module.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)


def run(tmp_path, options: RunOptions) -> Report:
    return quantize(MODELS / "zoo_resnet.onnx", tmp_path / "q.onnx", str(MODELS / "zoo_resnet_calib.npz"),
                    QuantConfig.of(wbits=8, abits=8), options).report


def test_policy(restore_threads, four_cores, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(quantize_module, "_THREADS_AT_IMPORT", 1)
    assert cpu_threads(3) == 3  # --threads
    assert cpu_threads(None) == 4  # nothing set by the user: every core
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(None) == 1  # the environment's choice stands
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(quantize_module, "_THREADS_AT_IMPORT", 2)
    assert cpu_threads(None) == 1  # torch.set_num_threads after import stands
    with pytest.raises(QLimitError, match="--threads"):
        cpu_threads(0)


def test_user_setting_wins_and_is_restored(tmp_path, restore_threads, four_cores, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(quantize_module, "_THREADS_AT_IMPORT", 2)  # the user changed it after import
    assert run(tmp_path, FAST).threads == 1
    assert torch.get_num_threads() == 1
    assert run(tmp_path, replace(FAST, threads=2)).threads == 2
    assert torch.get_num_threads() == 1  # a library call leaves the process's setting as it found it


def test_cli_threads(tmp_path, restore_threads, capsys):
    report = tmp_path / "r.json"
    args = ["quantize", str(MODELS / "zoo_resnet.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
            str(MODELS / "zoo_resnet_calib.npz"), "--method", "rtn", "--calib-size", "8", "--device", "cpu", "--quiet"]
    assert main(args + ["--threads", "1", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["threads"] == 1
    assert main(args + ["--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def _child(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=300, check=True)


@pytest.mark.slow
@pytest.mark.parametrize("env,first,expected", [
    ({}, "", "1000"),  # short OpenMP spin: a busy neighbour cannot stall 2-thread blocks
    ({"GOMP_SPINCOUNT": "50"}, "", "50"),  # the user's own setting stands
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "", "None"),
    ({}, "import torch; ", "None"),  # too late once torch (and its OpenMP) is loaded: leave it
])
def test_openmp_spin_is_shortened_only_before_torch_loads_and_never_over_the_user(env, first, expected):
    code = first + "import os, onnxqlimit; print(os.environ.get('GOMP_SPINCOUNT'))"
    assert _child(code, **env).stdout.strip() == expected


@pytest.mark.slow
def test_two_processes_with_different_openmp_waits_write_identical_files(tmp_path):
    """The spin setting changes scheduling only: the same run in two processes gives the same bytes."""
    outputs = []
    for i, env in enumerate(({}, {"OMP_WAIT_POLICY": "PASSIVE"})):
        out = tmp_path / f"q{i}.onnx"
        argv = ["quantize", str(MODELS / "zoo_resnet.onnx"), "-o", str(out), "--calib",
                str(MODELS / "zoo_resnet_calib.npz"), "--wbits", "4", "--abits", "4", "--iters", "20",
                "--calib-size", "16", "--device", "cpu", "--threads", "2", "--quiet"]
        _child(f"import sys; from onnxqlimit.cli import main; sys.exit(main({argv!r}))", **env)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
