"""Speed options of the tuning loop: early stopping, keeping round to nearest, the
one-thread policy for small blocks, channels-last and tiled convolutional blocks, the
compiled kernel, and determinism with each."""
from __future__ import annotations

import math

import pytest
import torch

from onnxqlimit.quant import fake_quant
from onnxqlimit.quant.adaround import AdaRoundQuantize
from onnxqlimit.quant.fake_quant import FakeQuantize, QuantSpec, fake_quant_mix, keep_mask, mix
from onnxqlimit.recon import ReconConfig, reconstruct
from onnxqlimit.recon import tune as tune_module
from onnxqlimit.recon.blocks import find_blocks
from onnxqlimit.recon.tune import Plateau, ProgressClock
from tests.test_reconstruct import _calibrated


def integers(state) -> dict[str, torch.Tensor]:
    """What the export would write: every weight's integers and every quantizer's scale."""
    found = {}
    for name, q in state.quantizers.items():
        found[f"{name}:scale"] = q.scale.detach().clone()
        if isinstance(q, AdaRoundQuantize):
            found[f"{name}:int"] = q.chosen.float()
    return found


def tuned(config: ReconConfig, wbits: int = 4, abits: int = 4, name: str = "zoo_resnet", seed: int = 0):
    model, mirror, state, feeds = _calibrated(name, wbits, abits, samples=32)
    result = reconstruct(mirror, model, state, feeds, config, seed, progress=False)
    return result, state


def test_progress_clock_runs_the_rest_of_the_schedule_in_the_tail():
    clock = ProgressClock(100, tail=10)
    assert clock(50) == 0.5 and clock.end == 100
    clock.stop_at(30, floor=0.2)
    assert clock.shortened and clock.end == 40
    assert clock(30) == pytest.approx(0.3) and clock(40) == pytest.approx(1.0)
    late = ProgressClock(100, tail=10)
    late.stop_at(95, floor=0.2)  # fewer than `tail` left: nothing to shorten
    assert not late.shortened and late.end == 100
    early = ProgressClock(100, tail=10)
    early.stop_at(5, floor=0.2)  # still in warm-up: the tail starts with the regulariser on
    assert early(5) == pytest.approx(0.2)


def test_plateau_needs_patience_windows_without_gain():
    plateau = Plateau(window=2, tol=0.01, patience=2)
    falling = [10, 10, 8, 8, 6, 6, 5, 5]
    assert not any(plateau.update(x) for x in falling)
    flat = [5.0, 5.0, 4.99, 4.99]
    assert [plateau.update(x) for x in flat] == [False, False, False, True]


def test_mix_is_exact_and_passes_gradients_to_both_sides():
    a = torch.randn(1000, requires_grad=True)
    b = torch.randn(1000, requires_grad=True)
    keep = keep_mask(a, 0.5)
    assert keep.dtype == a.dtype and 0.4 < float(keep.mean()) < 0.6
    out = mix(a, b, keep)
    assert torch.equal(out, torch.where(keep.bool(), b, a))
    out.sum().backward()
    assert torch.equal(b.grad, keep) and torch.equal(a.grad, 1 - keep)


def test_lsq_gradient_matches_torchs_learnable_fake_quant():
    """The fused kernel's step-size gradient is LSQ's, as torch's reference op computes it."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5) * 3
    fq = FakeQuantize(QuantSpec(4, False))
    fq.set_qparams(torch.tensor([0.4]), torch.tensor([7.0]))
    fq.scale.requires_grad_(True)
    fq(x).pow(2).sum().backward()
    ours = fq.scale.grad.clone()
    scale = fq.scale.detach().clone().requires_grad_(True)
    factor = 1.0 / math.sqrt(x.numel() * 15)
    torch._fake_quantize_learnable_per_tensor_affine(x, scale, torch.tensor([7.0]), 0, 15, factor).pow(2).sum().backward()
    assert torch.allclose(ours, scale.grad, rtol=1e-4)


@pytest.mark.slow
def test_early_stopping_shortens_blocks_and_is_never_worse_than_round_to_nearest():
    result, _ = tuned(ReconConfig(iters=300, batch_size=8, lr_round=1e-2))
    blocks = [b for b in result.blocks if b.iters]
    assert any(b.stopped_early and b.iters < 300 for b in blocks)
    assert all(b.loss_after <= b.loss_before for b in result.blocks)


def test_a_block_that_tuning_makes_worse_keeps_round_to_nearest(monkeypatch):
    """Sabotaged tuning (rounding pushed the wrong way) must give the round-to-nearest block back."""
    original = AdaRoundQuantize.harden

    def harden_the_wrong_way(self):
        if self.hard:
            return
        with torch.no_grad():
            self.alpha.copy_(-self.alpha.sign() * 5 + (self.alpha == 0) * 5)  # flip every choice
        original(self)

    monkeypatch.setattr(AdaRoundQuantize, "harden", harden_the_wrong_way)
    model, mirror, state, feeds = _calibrated("zoo_resnet", 4, 8, samples=32)
    nearest = {n: q.quantize(mirror.initializer(n)).clone() for n, q in state.quantizers.items()
               if n in mirror.initializer_names}
    result = reconstruct(mirror, model, state, feeds, ReconConfig(iters=20, batch_size=8), progress=False)
    kept = [b for b in result.blocks if b.kept_rtn]
    assert kept and all(b.loss_after == b.loss_before for b in kept)
    assert all(b.loss_after <= b.loss_before for b in result.blocks)
    assert not any(isinstance(q, AdaRoundQuantize) for q in state.quantizers.values())
    for name, ints in nearest.items():  # back to the calibrated quantizers exactly
        assert torch.equal(state.quantizers[name].quantize(mirror.initializer(name)), ints), name


def test_small_blocks_tune_on_one_thread_and_the_count_is_restored(monkeypatch):
    seen = []
    original = tune_module.BlockRunner.loss

    def spy(self, block, env, index, targets=None):
        seen.append(torch.get_num_threads())
        return original(self, block, env, index, targets)

    monkeypatch.setattr(tune_module.BlockRunner, "loss", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(tune_module, "SMALL_BLOCK_FLOP", float("inf"))  # every block counts as small
        monkeypatch.setattr(tune_module, "SMALL_BLOCK_ELEMENTS", float("inf"))
        result, _ = tuned(ReconConfig(iters=6, batch_size=8, early_stop=False))
        assert all(b.threads == 1 for b in result.blocks if b.iters) and 1 in seen
        assert torch.get_num_threads() == 2
        seen.clear()
        monkeypatch.setattr(tune_module, "SMALL_BLOCK_FLOP", 0.0)  # none is
        result, _ = tuned(ReconConfig(iters=6, batch_size=8, early_stop=False))
        assert all(b.threads == 2 for b in result.blocks if b.iters) and set(seen) == {2}
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"early_stop": False}, {"small_block_threads": False},
                                     {"channels_last": True}, {"channels_last": False}, {"tile": 8}],
                         ids=["default", "no-early-stop", "no-thread-policy", "channels-last", "nchw", "tiles"])
def test_a_fixed_seed_gives_the_same_integers_with_each_speed_option(options, monkeypatch):
    if options.get("channels_last"):  # the test net's blocks are small: make them count as large
        monkeypatch.setattr(tune_module, "SMALL_BLOCK_FLOP", 0.0)
    config = ReconConfig(iters=60, batch_size=8, **options)
    first = integers(tuned(config, seed=3)[1])
    second = integers(tuned(config, seed=3)[1])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_convolutional_blocks_tune_channels_last_with_the_same_values(monkeypatch):
    monkeypatch.setattr(tune_module, "SMALL_BLOCK_FLOP", 0.0)
    model, mirror, state, feeds = _calibrated("zoo_resnet", 4, 4, samples=16)
    blocks = find_blocks(model)
    chosen = [tune_module.wants_channels_last(b, mirror.nodes) for b in blocks]
    head = [any(mirror.nodes[i].op_type in ("Flatten", "Gemm", "Reshape") for i in b.node_range) for b in blocks]
    assert any(chosen) and not any(c and h for c, h in zip(chosen, head))
    result = reconstruct(mirror, model, state, feeds, ReconConfig(iters=4, batch_size=8), progress=False)
    assert [b.channels_last for b in result.blocks if b.iters] == [c for c, b in zip(chosen, result.blocks) if b.iters]

    x = torch.randn(4, 8, 6, 5)
    nhwc = tune_module.channels_last({"x": x, "flat": torch.randn(4, 3), "ids": torch.arange(4).view(2, 2, 1, 1)})
    assert nhwc["x"].is_contiguous(memory_format=torch.channels_last) and torch.equal(nhwc["x"], x)
    assert nhwc["flat"].is_contiguous() and nhwc["ids"].dtype == torch.int64
    mask = keep_mask(nhwc["x"], 0.5)  # drawn in the tensor's own layout: mixing stays one dense pass
    assert mask.shape == x.shape and mask.is_contiguous(memory_format=torch.channels_last)
    block = blocks[0]  # a block's outputs do not depend on the layout of its inputs
    env = {n: torch.as_tensor(feeds[n][:4]) for n in block.inputs + block.context}  # the graph input
    assert env
    plain, last = dict(env), tune_module.channels_last(env)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in last.values())
    with torch.no_grad():
        for e in (plain, last):
            e.update(mirror.initializer_env(mirror.initializers_read(block.node_range)))
            mirror.execute(e, block.node_range, keep=block.loss_outputs)
    for name in block.loss_outputs:
        torch.testing.assert_close(last[name], plain[name], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_the_compiled_kernel_is_off_by_default_and_runs_where_available():
    """Compiled and eager tuning do not give the same integers (inductor's fused float
    arithmetic differs in the last bits, and Adam amplifies that), so compile is opt-in."""
    assert ReconConfig().compile is False
    if not fake_quant.compile_kernel(True):
        pytest.skip("torch.compile is not available on this machine")
    fake_quant.compile_kernel(False)
    result, state = tuned(ReconConfig(iters=20, batch_size=8, early_stop=False, compile=True))
    assert result.compiled and fake_quant._kernel is fake_quant_mix  # switched back afterwards
    ints = [v for k, v in integers(state).items() if k.endswith(":int")]
    assert ints and all(torch.equal(t, t.round()) and t.abs().max() <= 128 for t in ints)


@pytest.mark.slow
def test_local_blocks_on_large_maps_tune_on_tiles_against_float_tiles():
    model, mirror, state, feeds = _calibrated("zoo_resnet", 4, 4, samples=16)
    config = ReconConfig(iters=40, batch_size=8, tile=8)  # 32x32 inputs: 8x8 tiles
    result = reconstruct(mirror, model, state, feeds, config, progress=False)
    tiled = [b for b in result.blocks if b.tile]
    assert tiled and all(b.tile == (8, 8) for b in tiled)
    assert all(b.loss_after <= b.loss_before for b in result.blocks)
    blocks = find_blocks(model)
    for b in tiled:  # no reshape, flatten or matmul in a tiled block
        assert not {mirror.nodes[i].op_type for i in blocks[b.index].node_range} & {"Flatten", "Gemm", "Reshape", "MatMul"}
    off, _ = tuned(ReconConfig(iters=4, batch_size=8, tile=0))
    assert not any(b.tile for b in off.blocks)


def test_a_whole_map_tile_gives_the_cached_float_outputs(monkeypatch):
    """The float target of a tile is the float block on that tile: over the whole map it is
    exactly what the float model computed there."""
    seen = []
    original = tune_module.BlockRunner.float_outputs

    def check(runner, block, weights, index, tile):
        whole = (slice(0, None), slice(0, None))
        got = original(runner, block, weights, index, whole)
        for name, value in got.items():
            seen.append(name)
            torch.testing.assert_close(value, runner.fp.get(name, index), rtol=1e-5, atol=1e-5)
        return original(runner, block, weights, index, tile)

    monkeypatch.setattr(tune_module.BlockRunner, "float_outputs", check)
    tuned(ReconConfig(iters=2, batch_size=4, tile=8))
    assert seen
