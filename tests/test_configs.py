"""Settings: every setting has one owner and reaches it once.

- Each `quantize` flag changes exactly the config field(s) it owns, and nothing else.
- A ReconConfig given to quantize() is run as given (the old pipeline copied the preset's
  iterations and the run's seed over it).
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
from onnxqlimit.cli import build_configs, build_parser
from onnxqlimit.errors import QLimitError
from onnxqlimit.quant.config import Placement, Scheme, Widths
from onnxqlimit.recon.config import PRESETS
from tests.conftest import MODELS

BASE = ["quantize", "m.onnx", "-o", "o.onnx", "--calib", "c.npz"]
PAPER = {"recon.calib_size": 1024, "recon.iters": 20000, "recon.batch_size": 32, "recon.lr_round": 1e-3,
         "recon.early_stop": False}

# flag arguments -> {path in (config, options): expected value}, every other field unchanged
FLAGS = [
    (["--wbits", "4"], {"config.widths.wbits": 4}),
    (["--abits", "16"], {"config.widths.abits": 16}),
    (["--first-last-bits", "same"], {"config.widths.first_last_bits": None}),
    (["--first-last-bits", "6"], {"config.widths.first_last_bits": 6}),
    (["--embedding-bits", "0"], {"config.widths.embedding_bits": None}),
    (["--embedding-bits", "4"], {"config.widths.embedding_bits": 4}),
    (["--bits", "conv1=4/8,layer.*=3/6"], {"config.widths.overrides": (("conv1", 4, 8), ("layer.*", 3, 6))}),
    (["--weight-init", "minmax"], {"config.scheme.weight_init": "minmax"}),
    (["--act-init", "percentile"], {"config.scheme.act_init": "percentile"}),
    (["--percentile", "99.9"], {"config.scheme.percentile": 99.9}),
    (["--per-tensor"], {"config.scheme.weight_per_channel": False}),
    (["--weight-asymmetric"], {"config.scheme.weight_symmetric": False}),
    (["--act-symmetric"], {"config.scheme.act_symmetric": True}),
    (["--weight-block", "64"], {"config.scheme.weight_block": 64}),
    (["--abits", "none"], {"config.widths.abits": 32}),
    (["--runtime", "tensorrt"], {"config.runtime": "tensorrt", "config.scheme.act_symmetric": True,
                                 "config.smooth": 0.8}),
    (["--quantize-add"], {"config.placement.quantize_add": True}),
    (["--quantize-concat"], {"config.placement.quantize_concat": True}),
    (["--quantize-attention"], {"config.placement.quantize_act_matmul": True}),
    (["--no-quantize-attention"], {"config.placement.quantize_act_matmul": False}),
    (["--exclude", "a", "--exclude", "b.*"], {"config.placement.exclude": ("a", "b.*")}),
    (["--smooth", "0.5"], {"config.smooth": 0.5}),
    (["--smooth", "0"], {"config.smooth": None}),
    (["--method", "brecq"], {"recon.method": "brecq"}),
    (["--preset", "paper"], PAPER),
    (["--preset", "paper", "--iters", "50"], {**PAPER, "recon.iters": 50}),
    (["--iters", "9"], {"recon.iters": 9}),
    (["--calib-size", "16"], {"recon.calib_size": 16}),
    (["--batch-size", "4"], {"recon.batch_size": 4}),
    (["--no-early-stop"], {"recon.early_stop": False}),
    (["--no-channels-last"], {"recon.channels_last": False}),
    (["--tile", "0"], {"recon.tile": 0}),
    (["--compile"], {"recon.compile": True}),
    (["--granularity", "stage"], {"recon.granularity": "stage"}),
    (["--block-layers", "3"], {"recon.max_layers": 3}),
    (["--loss", "fisher"], {"recon.loss": "fisher"}),
    (["--quant-prob", "0.7"], {"recon.quant_prob": 0.7}),
    (["--round-lambda", "0.1"], {"recon.round_lambda": 0.1}),
    (["--cache-gb", "2"], {"recon.cache_gb": 2.0}),
    (["--target-size", "600KB"], {"mixed.targets.size_bytes": 600e3}),
    (["--target-avg-wbits", "3"], {"mixed.targets.avg_wbits": 3.0}),
    (["--target-bitops", "2"], {"mixed.targets.bitops": 2e9}),
    (["--target-latency", "1.5"], {"mixed.targets.latency_ms": 1.5}),
    (["--target-metric", "0.9"], {"mixed.targets.metric": 0.9}),
    (["--wbits-choices", "4,2"], {"mixed.sensitivity.wbits_choices": (2, 4)}),
    (["--abits-choices", "8,16"], {"mixed.sensitivity.abits_choices": (8, 16)}),
    (["--sens-samples", "8"], {"mixed.sensitivity.samples": 8}),
    (["--sens-iters", "0"], {"mixed.sensitivity.tune_iters": 0}),
    (["--solver", "ga"], {"mixed.solver": "ga"}),
    (["--ga-population", "10"], {"mixed.ga.population": 10}),
    (["--ga-generations", "5"], {"mixed.ga.generations": 5}),
    (["--ga-mutation", "0.1"], {"mixed.ga.mutation": 0.1}),
    (["--ga-crossover", "0.5"], {"mixed.ga.crossover": 0.5}),
    (["--eval", "e.npz"], {"options.eval_data": "e.npz"}),
    (["--save-plan", "p.json"], {"options.save_plan": "p.json"}),
    (["--bits-plan", "p.json"], {"options.bits_plan": "p.json"}),
    (["--work-dir", "w"], {"options.work_dir": "w"}),
    (["--seed", "5"], {"options.seed": 5}),
    (["--device", "cpu"], {"options.device": "cpu"}),
    (["--threads", "2"], {"options.threads": 2}),
    (["--preprocess", "size=8,8"], {"options.preprocess": "size=8,8"}),
    (["--no-simplify"], {"options.simplify": False}),
    (["--resume"], {"options.resume": True}),
    (["--overwrite"], {"options.overwrite": True}),
    (["--quiet"], {"options.progress": False}),
]
# Not settings: the files quantize() is called with, and what the CLI writes after it.
NOT_SETTINGS = {"help", "model", "output", "calib", "report", "plot"}


def flat(argv: list[str]) -> dict[str, object]:
    """Every leaf setting of the configs the CLI builds, as 'config.widths.wbits' -> value."""
    config, options = build_configs(build_parser().parse_args(BASE + argv))
    tree = {"config": asdict(config), "recon": asdict(options.recon), "mixed": asdict(options.mixed),
            "options": {k: v for k, v in asdict(options).items() if k not in ("recon", "mixed")}}
    leaves = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        else:
            leaves[prefix] = value

    for name, value in tree.items():
        walk(name, value)
    return leaves


@pytest.mark.parametrize("argv,expected", FLAGS, ids=[" ".join(a) for a, _ in FLAGS])
def test_each_flag_reaches_its_one_setting_and_nothing_else(argv, expected, monkeypatch):
    monkeypatch.setenv("ONNXQLIMIT_CACHE", "cache")
    default, given = flat([]), flat(argv)
    changed = {k: v for k, v in given.items() if v != default[k]}
    assert changed == expected


def test_every_quantize_flag_is_covered():
    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "quantize")[1]
    covered = {a for argv, _ in FLAGS for a in argv if a.startswith("-")}
    for action in sub._actions:
        if action.dest in NOT_SETTINGS:
            continue
        assert set(action.option_strings) & covered, f"no test that {action.option_strings} reaches its setting"


def test_the_work_dir_defaults_to_the_cache_variable(monkeypatch):
    monkeypatch.setenv("ONNXQLIMIT_CACHE", "/some/cache")
    assert flat([])["options.work_dir"] == "/some/cache"


def test_the_fast_preset_is_the_default_and_a_preset_takes_changes():
    assert ReconConfig() == ReconConfig.preset("fast")
    paper = ReconConfig.preset("paper", iters=10, loss="fisher")
    assert (paper.iters, paper.batch_size, paper.calib_size, paper.lr_round, paper.early_stop, paper.loss) == \
        (10, PRESETS["paper"].batch_size, 1024, 1e-3, False, "fisher")
    with pytest.raises(QLimitError, match="--preset must be one of"):
        ReconConfig.preset("huge")


def test_quantconfig_of_gives_each_flat_setting_to_its_owner():
    config = QuantConfig.of(wbits=4, abits=6, act_init="minmax", quantize_add=True, exclude=("x",), smooth=0.5)
    assert config == QuantConfig(Widths(wbits=4, abits=6), Scheme(act_init="minmax"),
                                 Placement(quantize_add=True, exclude=("x",)), smooth=0.5)
    with pytest.raises(TypeError, match="no setting named wbit"):
        QuantConfig.of(wbit=4)


def test_a_recon_config_is_run_as_given(tmp_path):
    """Its iterations, batch and samples are not replaced by a preset's, nor its method by a default
    (before issue 21, quantize() copied the fast preset's 500 iterations over `iters`)."""
    recon = ReconConfig(method="brecq", iters=7, batch_size=4, calib_size=24, lr_round=5e-3, early_stop=False)
    calib = {"input": np.load(MODELS / "zoo_resnet_calib.npz")["input"][:64]}
    report = quantize(MODELS / "zoo_resnet.onnx", tmp_path / "q.onnx", calib, QuantConfig.of(wbits=4, abits=4),
                      RunOptions(recon=ReconConfig(**asdict(recon)), seed=3, parity_samples=4, progress=False)).report
    assert report.options["recon"] == asdict(recon) and report.options["seed"] == 3
    tuning = report.reconstruction
    assert (tuning["method"], tuning["batch_size"], tuning["samples"]) == ("brecq", 4, 24)
    iters = {b["iters"] for b in tuning["blocks"]}
    assert 7 in iters and iters <= {0, 7}  # blocks without quantizers of their own run none
