"""Mixed precision: budgets met on the exported file, plans as files, solvers, the sensitivity cache."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxqlimit import QuantConfig
from onnxqlimit.cli import main
from onnxqlimit.errors import QLimitError
from onnxqlimit.mixed.config import GAConfig, MixedConfig, SensitivityConfig, Targets
from onnxqlimit.mixed.solvers import Problem, solve_ga, solve_milp
from onnxqlimit.parity import ort_session
from onnxqlimit.pipeline import RunOptions, quantize
from onnxqlimit.quant.bits import NOTES_KEY, BitPlan
from onnxqlimit.recon import ReconConfig
from tests import cost_oracle

MODELS = Path(__file__).resolve().parents[1] / "models"
RESNET, CALIB = str(MODELS / "zoo_resnet.onnx"), str(MODELS / "zoo_resnet_calib.npz")


def _run(tmp_path, work_dir, targets: Targets, name="out", method="rtn", solver="milp", seed=0, **extra):
    options = RunOptions(recon=ReconConfig(method=method, calib_size=64, iters=20), progress=False, seed=seed, mixed=MixedConfig(targets, SensitivityConfig(samples=16), solver), work_dir=str(work_dir), **extra)
    return quantize(RESNET, tmp_path / f"{name}.onnx", CALIB, QuantConfig.of(wbits=8, abits=8), options)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


def _weight_types(path) -> dict[str, int]:
    model = onnx.load(str(path))
    return {t.name: t.data_type for t in model.graph.initializer if t.name.endswith("_quantized")}


def _check_against_the_file(result, targets: Targets) -> dict:
    """The reported costs are the file's, recomputed from the file alone (tests/cost_oracle.py);
    the budgets bind (quantize() refuses a file over budget, so "within" alone cannot fail):
    the plan is not the all-8-bit one and one budget is used to within 5%."""
    by_hand = cost_oracle.file_costs(result.output_path)
    costs = result.report.costs
    assert costs["size_bytes"] == costs["planned_size_bytes"] == by_hand["size_bytes"]
    assert costs["avg_wbits"] == pytest.approx(by_hand["avg_wbits"], rel=1e-12)
    assert costs["bitops"] == by_hand["bitops"]
    budgets = targets.budgets()
    assert all(by_hand[k] <= limit for k, limit in budgets.items())
    assert max(by_hand[k] / limit for k, limit in budgets.items()) >= 0.95, (by_hand, budgets)
    assert set(cost_oracle.recorded_plan(onnx.load(str(result.output_path))).values()) - {8}
    return by_hand


def test_sensitivity_sample_count_shrinks_for_large_inputs_unless_given():
    def feeds(n, *shape):  # shapes only: nothing is allocated
        return {"x": np.broadcast_to(np.float32(0), (n, *shape)), "sr": np.broadcast_to(np.int64(0), (n,))}

    auto = SensitivityConfig()
    assert auto.sample_count(feeds(256, 3, 32, 32)) == 32
    assert auto.sample_count(feeds(256, 3, 640, 640)) == 8  # a page: 8 hold as many values as 32 of 320x320
    assert auto.sample_count(feeds(64, 3, 448, 448)) == 16
    assert auto.sample_count(feeds(5, 3, 32, 32)) == 5  # never more than there are
    assert SensitivityConfig(samples=20).sample_count(feeds(256, 3, 640, 640)) == 20  # given: taken as it is
    assert SensitivityConfig(samples=20).sample_count(feeds(12, 3, 32, 32)) == 12
    with pytest.raises(QLimitError):
        SensitivityConfig(samples=0)


def test_size_budget_is_met_on_the_file_and_layers_get_their_own_types(tmp_path, work_dir):
    result = _run(tmp_path, work_dir, Targets(size_bytes=45_000))
    _check_against_the_file(result, Targets(size_bytes=45_000))
    types = set(_weight_types(result.output_path).values())
    assert len(types) >= 2, types  # int8 for the first/last layers, narrower elsewhere
    assert all(p["within_one_step"] > 0.99 for p in result.report.parity)  # parity holds as for uniform widths


@pytest.mark.parametrize("targets", [Targets(avg_wbits=3.0), Targets(bitops=0.25e9),
                                     Targets(size_bytes=40_000, bitops=0.3e9)], ids=["avg_wbits", "bitops", "size+bitops"])
def test_each_budget_is_met(tmp_path, work_dir, targets):
    _check_against_the_file(_run(tmp_path, work_dir, targets), targets)


def test_tighter_budget_gives_a_smaller_plan_with_a_larger_predicted_loss(tmp_path, work_dir):
    loose = _run(tmp_path, work_dir, Targets(avg_wbits=6.0), "loose").report
    tight = _run(tmp_path, work_dir, Targets(avg_wbits=3.0), "tight").report
    assert tight.costs["avg_wbits"] < loose.costs["avg_wbits"]
    assert tight.mixed_precision["predicted_loss"] > loose.mixed_precision["predicted_loss"]


def test_unreachable_budget_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["quantize", RESNET, "-o", str(tmp_path / "x.onnx"), "--calib", CALIB, "--method", "rtn",
                 "--calib-size", "32", "--quiet", "--target-size", "5KB", "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "smallest reachable" in err, err
    assert not (tmp_path / "x.onnx").exists()


def test_plan_round_trips_through_json_and_bits_plan(tmp_path, work_dir, capsys):
    out, plan_file = tmp_path / "m.onnx", tmp_path / "plan.json"
    common = ["--calib", CALIB, "--method", "rtn", "--calib-size", "64", "--quiet", "--work-dir", str(work_dir)]
    assert main(["quantize", RESNET, "-o", str(out), "--target-avg-wbits", "3.5", "--save-plan", str(plan_file),
                 *common]) == 0
    saved = json.loads(plan_file.read_text())
    notes = saved.pop(NOTES_KEY)  # how the search scored it, skipped when the plan is read
    assert notes["scored"] == "whole model, round to nearest" and notes["predicted_loss"] > 0 and notes["measured_loss"] > 0
    assert saved and all(set(v) <= {"wbits", "abits"} for v in saved.values())
    again = tmp_path / "again.onnx"
    assert main(["quantize", RESNET, "-o", str(again), "--bits-plan", str(plan_file), *common]) == 0
    assert _weight_types(out) == _weight_types(again)
    a, b = (ort_session(str(p)) for p in (out, again))
    x = np.load(CALIB)["input"][:4]
    assert np.array_equal(a.run(None, {"input": x})[0], b.run(None, {"input": x})[0])
    # an edited plan takes effect: one layer to 2 bits
    node = next(n for n, v in saved.items() if v.get("wbits", 8) < 8)
    saved[node]["wbits"] = 2
    plan_file.write_text(json.dumps(saved))
    edited = tmp_path / "edited.onnx"
    assert main(["quantize", RESNET, "-o", str(edited), "--bits-plan", str(plan_file), *common]) == 0
    assert onnx.TensorProto.INT2 in _weight_types(edited).values()


@pytest.mark.parametrize("entries,message", [
    ({"no_such_node": {"wbits": 4}}, "no quantized node or tensor"),
    ({"/fc/Gemm": {"wbits": 1}}, "must be"),
    ({"/fc/Gemm": {"wbitz": 4}}, "expected"),
])
def test_bad_plans_are_refused(tmp_path, entries, message):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(QLimitError, match=message):
        quantize(RESNET, tmp_path / "o.onnx", CALIB, QuantConfig(),
                 RunOptions(recon=ReconConfig(method="rtn", calib_size=16), progress=False, bits_plan=str(path)))
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow
def test_search_is_deterministic_for_a_seed(tmp_path, work_dir):
    plans = [_run(tmp_path, work_dir, Targets(bitops=0.3e9), f"ga{i}", solver="ga", seed=3).report.plan
             for i in range(2)]
    assert plans[0] == plans[1]


@pytest.mark.slow
def test_sensitivities_are_cached_and_invalidated(tmp_path):
    work = tmp_path / "cache"
    first = _run(tmp_path, work, Targets(avg_wbits=4.0), "a").report.mixed_precision
    second = _run(tmp_path, work, Targets(avg_wbits=3.0), "b").report.mixed_precision
    assert not first["sensitivity_cached"] and second["sensitivity_cached"]
    assert len(list(work.glob("sensitivity-*.json"))) == 1
    # other calibration data: measured again
    data = np.load(CALIB)
    other = tmp_path / "other.npz"
    np.savez(other, input=data["input"][::-1].copy())
    options = RunOptions(recon=ReconConfig(method="rtn", calib_size=64), progress=False, mixed=MixedConfig(Targets(avg_wbits=3.0), SensitivityConfig(samples=16)), work_dir=str(work))
    third = quantize(RESNET, tmp_path / "c.onnx", str(other), QuantConfig(), options).report.mixed_precision
    assert not third["sensitivity_cached"]
    # another model (the MobileNetV2): measured again
    mbv2 = quantize(str(MODELS / "zoo_mobilenetv2.onnx"), tmp_path / "d.onnx", str(MODELS / "zoo_mobilenetv2_calib.npz"),
                    QuantConfig(), options).report.mixed_precision
    assert not mbv2["sensitivity_cached"]
    assert len(list(work.glob("sensitivity-*.json"))) == 3


def test_target_metric_holds_on_the_exported_file(tmp_path, work_dir):
    """Without --eval the metric is top-1 agreement with the float model on the calibration
    samples (64 here), recomputed with onnxruntime; the search's own estimate is not checked
    (it raises when it cannot reach the target)."""
    result = _run(tmp_path, work_dir, Targets(metric=0.95))
    report = result.report
    x = np.load(CALIB)["input"][:64]
    ref = ort_session(RESNET).run(None, {"input": x})[0].argmax(1)
    got = ort_session(str(result.output_path)).run(None, {"input": x})[0].argmax(1)
    assert report.metric == pytest.approx(np.mean(ref == got), abs=1 / 64)  # the float mirror may flip a tie
    assert report.metric >= 0.95
    assert report.costs["avg_wbits"] < 8  # not simply everything at 8 bits


@pytest.mark.slow  # (fast tier: reconstruction parity is covered by the per-width probe test and test_quantize)
def test_mixed_plan_with_reconstruction_passes_parity(tmp_path, work_dir):
    """A mixed plan survives reconstruction: the tuned file holds the plan's widths (file_costs
    checks the integers' ranges) and its costs are the file's; quantize() refuses to write a
    file without parity, so writing one is the parity check."""
    result = _run(tmp_path, work_dir, Targets(avg_wbits=3.5), method="qdrop")
    assert any(b["iters"] > 0 for b in result.report.reconstruction["blocks"])
    by_hand = _check_against_the_file(result, Targets(avg_wbits=3.5))
    assert len({w for _, w, _ in by_hand["nodes"].values()}) >= 3, by_hand["nodes"]  # 8 at the ends, two more inside
    assert all(p["within_one_step"] > 0.99 for p in result.report.parity)
    # the plan was scored after short reconstructions, and the run measured what it predicted
    mixed = result.report.mixed_precision
    assert mixed["scored_after"] == SensitivityConfig().tune_iters
    assert mixed["predicted_loss"] > 0 and mixed["measured_loss"] > 0
    assert len(mixed["block_losses"]) == len(result.report.reconstruction["blocks"])


@pytest.mark.slow  # (the fast tier keeps the per-width probe test)
def test_block_scores_are_whole_model_losses_lowered_by_reconstruction(tmp_path):
    """The table's scores: a uniform configuration scores the whole model's task loss with only
    its block quantized (checked here against a plain mirror run); after a short
    reconstruction a configuration never scores above round to nearest, and some gain by a
    fifth or more; a configuration at or below another in every width never scores less."""
    from dataclasses import replace

    import torch

    from onnxqlimit.data import batches
    from onnxqlimit.mixed.block_loss import probe_schedule
    from onnxqlimit.mixed.sensitivity import measure
    from onnxqlimit.pipeline import place_and_calibrate, prepare
    from onnxqlimit.quant.fake_quant import quantizers_disabled
    from onnxqlimit.recon.fisher import task_loss

    recon = ReconConfig(method="qdrop", calib_size=16, batch_size=8)
    config = SensitivityConfig(samples=16, tune_iters=30)
    ctx = prepare(RESNET, CALIB, QuantConfig(), RunOptions(recon=recon, progress=False,
                                                          mixed=MixedConfig(Targets(avg_wbits=4.0), config)))
    state = place_and_calibrate(ctx)
    rtn, tuned = (measure(ctx.mirror, ctx.model, state, ctx.feeds, config, recon.block_config, ({}, {}),
                          progress=False, tune=tune) for tune in (None, probe_schedule(recon, config)))
    points = {p.tensor: p for p in state.points}
    with torch.no_grad(), quantizers_disabled(state.quantizers):
        reference = [ctx.mirror.run(b) for b in batches(ctx.feeds, 8)]
    checked, gains = 0, []
    for rtn_options, tuned_options in zip(rtn.blocks, tuned.blocks):
        for option, after in zip(rtn_options, tuned_options):
            assert option.bits == after.bits and after.loss <= option.loss * (1 + 1e-4)  # (float sums)
            gains.append(after.loss / option.loss)
            for other in tuned_options:  # narrower never costs less
                if all(other.bits[t] >= b for t, b in after.bits.items()):
                    assert after.loss >= other.loss * (1 - 1e-9)
        uniform = [o for o in rtn_options if len(rtn_options) > 1 and len(set(o.bits.values())) == 1]
        for option in uniform[:2]:
            total = 0.0
            with quantizers_disabled(state.quantizers):
                for tensor, bits in option.bits.items():
                    quantizer = state.quantizers[tensor]
                    quantizer.spec = replace(points[tensor].spec, bits=bits)
                    quantizer.set_qparams(*state.calibration.qparams(points[tensor], bits))
                    quantizer.enabled = True
                with torch.no_grad():
                    for i, batch in enumerate(batches(ctx.feeds, 8)):
                        out = ctx.mirror.run(batch)
                        total += sum(float(task_loss(reference[i][k], out[k])) for k in out)
            assert option.loss == pytest.approx(total / 16, rel=1e-3)
            checked += 1
    assert checked >= 2 and gains and min(gains) < 0.8, (checked, sorted(gains)[:5])


def test_one_short_reconstruction_per_weight_width_scores_every_activation_width(monkeypatch):
    """BlockLoss.model_losses tunes each weight width below 8 once, at the widest
    activations: there it gives what tuning that configuration alone gives; a narrower
    activation width loses the same amount from its round-to-nearest loss, never below the
    tuned one; and the block's configurations rank as tuning each alone ranks them."""
    from scipy.stats import spearmanr

    from onnxqlimit.mixed import block_loss
    from onnxqlimit.pipeline import place_and_calibrate, prepare
    from onnxqlimit.recon.blocks import find_blocks
    from onnxqlimit.recon.runner import quantizer_owners

    recon = ReconConfig(method="qdrop", calib_size=16, batch_size=8)
    config = SensitivityConfig(samples=16, tune_iters=30)
    ctx = prepare(RESNET, CALIB, QuantConfig(smooth=0), RunOptions(recon=recon, progress=False,
                                                                   mixed=MixedConfig(Targets(avg_wbits=4.0), config)))
    state = place_and_calibrate(ctx)
    blocks = find_blocks(ctx.model, recon.block_config)
    owners, on_entry = quantizer_owners(ctx.mirror, blocks, state.points)
    block = blocks[1]
    owned = [p for p in owners[block.index] if not p.fixed]
    assert {p.kind for p in owned} == {"weight", "activation"}
    tune = block_loss.probe_schedule(recon, config)
    samples = block_loss.float_pass(ctx.mirror, state, ctx.feeds, blocks, config, 0, tune)
    runner = block_loss.BlockLoss(ctx.mirror, state, samples, on_entry, tune, 0, ctx.feeds)
    grid = [{p.tensor: w if p.kind == "weight" else a for p in owned} for w in (2, 4, 8) for a in (4, 8)]
    rtn = block_loss.BlockLoss(ctx.mirror, state, samples, on_entry).model_losses(block, owned, grid)
    tunings = []
    original = block_loss.tune_block
    monkeypatch.setattr(block_loss, "tune_block", lambda *a, **k: tunings.append(1) or original(*a, **k))
    shared = runner.model_losses(block, owned, grid)
    assert len(tunings) == 2  # W2 and W4 at A8; W8 is never tuned
    alone = [runner.model_loss(block, owned, bits) for bits in grid]
    runner.restore()
    for i in (1, 3):  # W2A8, W4A8: the probes themselves
        assert shared[i] == pytest.approx(alone[i], rel=1e-4)
    for i in (0, 2):  # W2A4, W4A4: the same loss removed as at A8, floored at the A8 probe
        assert shared[i + 1] <= shared[i] <= rtn[i]
        assert shared[i] == pytest.approx(max(shared[i + 1], rtn[i] - (rtn[i + 1] - shared[i + 1])))
    assert shared[4:] == rtn[4:]
    assert rtn[2] > shared[2] and spearmanr(shared, alone).statistic >= 0.8, (rtn, shared, alone)


def test_sixteen_bit_activations_are_a_search_choice(tmp_path, work_dir):
    """--abits-choices 8,16: the file holds int16/uint16 activation Q/DQ (opset 21), passes
    parity, and its BitOps count 16 bits where the plan put them."""
    targets = Targets(bitops=1.2e9)  # between uniform W8A8 (0.88 G) and W8A16
    result = quantize(
        RESNET, tmp_path / "a16.onnx", CALIB, QuantConfig.of(wbits=8, abits=8),
        RunOptions(recon=ReconConfig(method="rtn", calib_size=64), progress=False, work_dir=str(work_dir),
                   mixed=MixedConfig(targets, SensitivityConfig(wbits_choices=(4, 8), abits_choices=(8, 16),
                                                                samples=16))))
    model = onnx.load(str(result.output_path))
    inits = {t.name: t for t in model.graph.initializer}
    act_types = {inits[n.input[2]].data_type for n in model.graph.node
                 if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}
    assert act_types & {onnx.TensorProto.INT16, onnx.TensorProto.UINT16}, act_types
    assert model.opset_import[0].version >= 21
    by_hand = _check_against_the_file(result, targets)
    assert 16 in {a for _, _, a in by_hand["nodes"].values()}


def test_milp_is_exact_and_ga_finds_a_feasible_plan():
    rng = np.random.default_rng(0)
    losses = [rng.random(4) for _ in range(5)]
    costs = [rng.random((4, 2)) for _ in range(5)]
    problem = Problem(losses, costs, np.array([2.0, 2.2]))
    best = min((c for c in itertools.product(range(4), repeat=5) if problem.feasible(list(c))),
               key=lambda c: problem.totals(list(c))[0])
    exact = solve_milp(problem)
    assert exact is not None and problem.totals(exact)[0] == pytest.approx(problem.totals(list(best))[0])
    ga = solve_ga(problem, GAConfig(), seed=1)
    assert ga is not None and problem.feasible(ga)
    assert problem.totals(ga)[0] >= problem.totals(exact)[0] - 1e-12


def test_bit_plan_node_view_takes_the_widest_width_for_a_shared_activation():
    from onnxqlimit.quant.fake_quant import QuantSpec
    from onnxqlimit.quant.policy import QuantPoint

    points = [QuantPoint("x", "activation", QuantSpec(8, False), ["a", "b"]),
              QuantPoint("w", "weight", QuantSpec(8, True, 0), ["a"])]
    plan = BitPlan.from_nodes({"a": {"wbits": 3, "abits": 4}, "b": {"abits": 6}}, points)
    assert plan.bits == {"x": 6, "w": 3}
    assert BitPlan.from_nodes(plan.to_nodes(points), points) == plan
    assert plan.opset() == 21


def test_two_bit_weights_beside_eight_bit_inputs_load_with_default_optimizations(tmp_path):
    """onnxruntime would fuse them into QLinearConv with an int2 weight and refuse the file."""
    out = tmp_path / "w2a8.onnx"
    report = quantize(RESNET, out, CALIB, QuantConfig.of(wbits=2, abits=8),
                      RunOptions(recon=ReconConfig(method="rtn", calib_size=32), progress=False)).report
    assert report.costs["size_bytes"] == report.costs["planned_size_bytes"]
    x = np.load(CALIB)["input"][:8]
    plain = ort_session(str(out)).run(None, {"input": x})[0]
    optimized = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    # the 8-bit first/last layers do run fused, whose integer kernels round differently on some CPUs
    assert np.abs(plain - optimized).max() < 0.02 * np.ptp(plain)
    assert (plain.argmax(1) == optimized.argmax(1)).mean() >= 0.75


@pytest.mark.parametrize("args,message", [
    (["--target-avg-wbits", "3", "--wbits-choices", "1,4"], "--wbits-choices must be"),
    (["--target-metric", "1.5"], "--target-metric must be in"),
    (["--target-bitops", "1", "--solver", "magic"], "argument --solver: invalid choice: 'magic'"),
    (["--target-size", "50KB", "--sens-iters", "-1"], "--sens-iters must be 0"),
    (["--target-size", "0KB"], "positive size"),
    (["--target-size", "lots"], "expected a size"),
    (["--target-size", "50KB", "--bits-plan", "plan.json"], "cannot be combined"),
    (["--bits-plan", "missing.json"], "no such bit plan file"),
    (["--smooth", "banana"], "expected 'auto' or a number"),  # not mixed precision, but refused the same way
    (["--smooth", "1.5"], "--smooth must be 'auto' or from 0"),
])
def test_bad_mixed_precision_options_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.json").write_text("{}")
    code = main(["quantize", RESNET, "-o", "x.onnx", "--calib", CALIB, "--method", "rtn", "--quiet",
                 "--work-dir", "w", *args])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.onnx").exists()


def test_latency_budget_is_met_by_the_measured_table(tmp_path, work_dir):
    """The estimate is the cached table read by hand: the rest of the model (base_ms) plus, per
    compute node, its entry for the file's widths (float where an operand is float); the file's
    own measured time is of the same order as the float model's in the table."""
    with pytest.raises(QLimitError, match="smallest reachable") as refused:
        _run(tmp_path, work_dir, Targets(latency_ms=1e-4))
    reachable = float(str(refused.value).split("smallest reachable is ")[1].split(" ms")[0])
    result = _run(tmp_path, work_dir, Targets(latency_ms=1.2 * reachable))  # same cached table
    tables = list(work_dir.glob("latency-*.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    estimate = table["base_ms"]
    for node, (_, wbits, abits) in cost_oracle.file_costs(result.output_path)["nodes"].items():
        entries = table["nodes"][node]
        quantized = {k: v for k, v in entries.items() if k != "float"}
        # a float weight is the float node; a float activation with an integer weight, weight-only
        estimate += entries["float"] if wbits == 32 else quantized.get(f"{wbits}/{abits}", max(quantized.values()))
    costs = result.report.costs
    assert costs["latency_ms"] == pytest.approx(estimate, rel=1e-9)
    assert reachable - 5e-4 <= estimate <= 1.2 * reachable  # the message rounds to 0.001 ms
    # timed in onnxruntime: not a second estimate (a unit slip would be 1000x)
    assert 0.1 < costs["measured_latency_ms"] / table["float_model_ms"] < 20, (costs, table["float_model_ms"])


@pytest.mark.slow
def test_a_shared_budget_is_met_by_the_files_together_and_moves_between_models(tmp_path):
    """quantize_pipeline: one BitOps budget (the models' uniform-W4A4 BitOps, summed) over three
    models. The sum of the three files' BitOps, recomputed from the files alone, meets it and
    uses it; the search spends it unevenly (some model above its own uniform share)."""
    from onnxqlimit import Stage, quantize_pipeline
    from tests.test_oracles import cost_model_calib, cost_model_proto, placement_proto

    rng = np.random.default_rng(0)
    models = {"resnet": (RESNET, CALIB), "hand": (cost_model_proto(), cost_model_calib(32)),
              "gemms": (placement_proto(), {"x": rng.standard_normal((32, 8)).astype(np.float32)})}
    rtn = RunOptions(recon=ReconConfig(method="rtn", calib_size=32), progress=False)
    uniform = {name: cost_oracle.file_costs(quantize(m, tmp_path / f"{name}_w4a4.onnx", c,
                                                     QuantConfig.of(wbits=4, abits=4, smooth=0), rtn).output_path)
               for name, (m, c) in models.items()}
    budget = sum(u["bitops"] for u in uniform.values())
    stages = [Stage(name, m, tmp_path / "shared" / f"{name}.onnx", c) for name, (m, c) in models.items()]
    options = RunOptions(recon=ReconConfig(method="rtn", calib_size=32), progress=False, work_dir=str(tmp_path / "work"),
                         mixed=MixedConfig(sensitivity=SensitivityConfig((2, 4, 8), (4, 8), samples=8)))
    result = quantize_pipeline(stages, Targets(bitops=budget), QuantConfig.of(smooth=0), options)
    files = {s.name: cost_oracle.file_costs(s.output) for s in stages}
    assert result.costs["bitops"] == sum(f["bitops"] for f in files.values()) <= budget
    assert result.costs["bitops"] >= 0.95 * budget
    assert {n: r.report.costs["bitops"] for n, r in result.results.items()} == {n: f["bitops"] for n, f in files.items()}
    assert any(files[n]["bitops"] > uniform[n]["bitops"] for n in models)
    for bad, message in ((Targets(avg_wbits=4.0), "shared budget"), (Targets(bitops=budget, metric=0.9), "shared budget")):
        with pytest.raises(QLimitError, match=message):
            quantize_pipeline(stages, bad, options=options)
    with pytest.raises(QLimitError, match="own name"):
        quantize_pipeline([stages[0], stages[0]], Targets(bitops=budget), options=options)
    with pytest.raises(QLimitError, match="cannot be met"):
        quantize_pipeline(stages, Targets(bitops=budget / 100), QuantConfig.of(smooth=0), options)
