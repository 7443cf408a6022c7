"""The ``prune`` pass: budgets, rounding, recovery, bad input, and outputs before/after."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxslim_cv import runtime
from onnxslim_cv.calibration import from_iterable
from onnxslim_cv.depgraph import build_dependency_graph
from onnxslim_cv.errors import UserError
from onnxslim_cv.ir import Model
from onnxslim_cv.pipeline import PassContext, make_passes, run_passes
from onnxslim_cv.stats import model_stats
from onnxslim_cv.testing import models as test_models

from .conftest import assert_one_line_error, chunk_read_through_shape, unprunable_model


def _calibration(proto, count=32, seed=1):
    specs = Model.from_proto(proto).input_specs()
    return from_iterable([test_models.sample_inputs(proto, batch=1, seed=seed + i) for i in range(count)], specs)


def _prune(proto, calib=None, **options):
    model = Model.from_proto(proto)
    passes = make_passes(["fold", "prune"], {"prune": options})
    out, reports = run_passes(model, passes, context=PassContext(calibration=calib, progress=False))
    return out, reports[1]


def _outputs(model_or_proto, feed):
    proto = model_or_proto.to_proto() if isinstance(model_or_proto, Model) else model_or_proto
    return runtime.run(runtime.make_session(proto, optimize=False), feed)


def _relative_error(a, b):
    return float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12))


def test_ratio_zero_leaves_outputs_bit_identical():
    proto = test_models.build("resnet_basic_block")
    model = Model.from_proto(proto)
    passes = make_passes(["prune"], {"prune": {"ratio": 0.0}})
    out, _ = run_passes(model, passes, context=PassContext(progress=False))
    feed = test_models.sample_inputs(proto)
    for a, b in zip(_outputs(proto, feed), _outputs(out, feed)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["resnet_basic_block", "mobilenetv2_block", "squeezenet_fire", "se_gemm", "split_concat"])
def test_ratio_removes_channels_and_result_is_valid(name):
    proto = test_models.build(name, batch="N")
    out, report = _prune(proto, ratio=0.5, round_to=1)
    pruned = out.to_proto()
    onnx.checker.check_model(pruned)
    assert pruned.ir_version <= runtime.max_ir_version()
    assert report.changes["channels removed"] > 0
    assert report.after.params < report.before.params
    assert report.after.macs < report.before.macs
    for batch in (1, 2):
        outputs = _outputs(pruned, test_models.sample_inputs(proto, batch=batch))
        assert outputs[0].shape[0] == batch


def test_target_macs_is_met_and_close():
    proto = test_models.build("resnet_bottleneck_block")
    out, report = _prune(proto, target_macs=0.6, round_to=1)
    ratio = report.after.macs / report.before.macs
    assert 0.5 <= ratio <= 0.6 + 1e-9


def test_round_to_keeps_channel_counts_aligned_and_never_over_prunes():
    proto = test_models.build("resnet_basic_block")  # groups of 16 channels
    out, report = _prune(proto, ratio=0.3, round_to=8)
    for row in report.details["groups"]:
        kept = row["channels"] * row["kept_units"] // row["units"]
        if kept != row["channels"]:
            assert kept % 8 == 0
            assert kept >= row["channels"] * (1 - 0.3)  # rounded up, not down


def test_auto_rounding_refines_only_the_groups_a_deep_target_needs(monkeypatch):
    from onnxslim_cv.passes import prune as prune_module

    monkeypatch.setattr(prune_module, "native_block_size", lambda: 16)
    proto = test_models.build("resnet_basic_block", width=16)  # groups of 16 and 32 channels
    with pytest.raises(UserError, match="unreachable"):
        _prune(proto, target_macs=0.5, round_to=16)
    out, report = _prune(proto, target_macs=0.5)  # round_to auto: 16 on this (patched) CPU
    assert report.after.macs / report.before.macs <= 0.5 + 1e-9
    assert any("finer in 2 group(s)" in note for note in report.notes)
    kept = {row["channels"]: row["channels"] * row["kept_units"] // row["units"]
            for row in report.details["groups"] if row["kept_units"] != row["units"]}
    assert kept[16] == 8  # refined: 16 could lose nothing at a step of 16
    assert kept[32] == 16  # not refined: still a multiple of the block
    pruned = out.to_proto()
    onnx.checker.check_model(pruned)
    assert np.all(np.isfinite(_outputs(pruned, test_models.sample_inputs(proto))[0]))

    _, report = _prune(proto, target_macs=0.8)  # reachable at the block: nothing refined
    assert not any("finer" in note for note in report.notes)
    for row in report.details["groups"]:
        assert (row["channels"] * row["kept_units"] // row["units"]) % 16 in (0, row["channels"] % 16)


def test_min_channels_and_exclude():
    proto = test_models.build("conv_chain")
    out, report = _prune(proto, ratio=0.9, round_to=1, min_channels=6)
    for row in report.details["groups"]:
        if row["kept_units"] != row["units"]:
            assert row["channels"] * row["kept_units"] // row["units"] >= 6
    out, report = _prune(proto, ratio=0.5, round_to=1, exclude="conv1$")
    row = next(r for r in report.details["groups"] if "conv1" in r["sources"])
    assert row["kept_units"] == row["units"]
    assert any("excluded" in reason for reason in row["frozen"])


def test_recipe_sets_options_and_per_group_ratios(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"ratio": 0.5, "round_to": 1, "groups": {"^conv2$": 0.25, "^conv1$": 0}}))
    proto = test_models.build("conv_chain")
    out, report = _prune(proto, recipe=str(recipe))
    rows = {tuple(r["sources"]): r for r in report.details["groups"]}
    conv1 = next(r for s, r in rows.items() if "conv1" in s)
    conv2 = next(r for s, r in rows.items() if "conv2" in s)
    assert conv1["kept_units"] == conv1["units"]
    assert conv2["units"] - conv2["kept_units"] == int(conv2["units"] * 0.25)


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn", "activation", "reconstruction", "obs"])
def test_every_criterion_runs(criterion):
    proto = test_models.build("resnet_basic_block")
    calib = _calibration(proto, 8) if criterion in ("activation", "reconstruction", "obs") else None
    out, report = _prune(proto, calib, ratio=0.5, round_to=1, criterion=criterion, recovery="none")
    assert report.changes["channels removed"] > 0


def _errors_by_recovery(proto, calib, feed, **options):
    """Output error against the original for each recovery, and the lsq run's report."""
    reference = _outputs(proto, feed)[0]
    errors = {}
    for recovery in ("none", "bias", "lsq"):
        out, report = _prune(proto, calib, recovery=recovery, **options)
        errors[recovery] = _relative_error(reference, _outputs(out, feed)[0])
    return errors, report


def test_reconstruction_and_bias_compensation_reduce_the_error():
    proto = test_models.build("resnet_bottleneck_block")
    feed = test_models.sample_inputs(proto, batch=8, seed=7)
    errors, _ = _errors_by_recovery(proto, _calibration(proto, 48, seed=100), feed, ratio=0.4, round_to=1, criterion="l2")
    assert errors["lsq"] < 0.7 * errors["none"], errors
    assert errors["bias"] <= errors["none"] * 1.001, errors


def test_lsq_refits_every_consumer_and_reports_errors():
    proto = test_models.build("mobilenetv2_block")
    out, report = _prune(proto, _calibration(proto, 16), ratio=0.5, round_to=1)
    rows = report.details["reconstruction"]
    assert rows
    for row in rows:
        if "skipped" not in row:
            assert row["error_after"] <= row["error_before"]


def test_lsq_refits_conv_transpose_consumers():
    proto = test_models.build("conv_transpose", channels=16)
    feed = test_models.sample_inputs(proto, batch=4, seed=3)
    errors, report = _errors_by_recovery(proto, _calibration(proto, 24, seed=50), feed, ratio=0.5, round_to=1, criterion="l2")
    rows = {row["layer"]: row for row in report.details["reconstruction"]}
    deconv = [name for name in rows if "deconv" in name]
    assert deconv and all("skipped" not in rows[name] for name in deconv), rows
    assert all(rows[name]["error_after"] < rows[name]["error_before"] for name in deconv), rows
    assert errors["lsq"] < errors["bias"] < errors["none"], errors


def test_grouped_conv_transpose_prunes_whole_groups_and_refits_its_consumer():
    proto = test_models.build("conv_transpose", channels=16, groups=4)
    feed = test_models.sample_inputs(proto, batch=4, seed=3)
    errors, report = _errors_by_recovery(proto, _calibration(proto, 24, seed=50), feed, ratio=0.5, round_to=1, criterion="l2")
    out, _ = _prune(proto, None, ratio=0.5, round_to=1)
    (deconv,) = [n for n in out.graph.nodes if n.op == "ConvTranspose"]
    assert deconv.attrs["group"] == 2 and deconv.inputs[1].values.shape[:2] == (8, 4)
    rows = {row["layer"]: row for row in report.details["reconstruction"]}
    assert rows and all("skipped" not in row for row in rows.values()), rows
    assert errors["lsq"] < errors["none"], errors


def test_channel_counts_read_through_shape_are_folded_before_the_graph_is_built():
    proto = chunk_read_through_shape()
    assert not build_dependency_graph(Model.from_proto(proto)).prunable_groups  # the Shape freezes them
    passes = make_passes(["prune"], {"prune": {"ratio": 0.5, "round_to": 1}})
    out, reports = run_passes(Model.from_proto(proto), passes, context=PassContext(progress=False))
    assert any(note.startswith("folded first (Identity, Dropout and constant subgraphs") for note in reports[0].notes)
    pruned = out.to_proto()
    onnx.checker.check_model(pruned, full_check=True)
    conv1 = next(i for i in pruned.graph.initializer if i.name == "w1")
    assert conv1.dims[0] == 8  # half of each chunk's channels went, the halves stay equal
    assert model_stats(out, refresh_shapes=True).macs < model_stats(Model.from_proto(proto)).macs
    runtime.run(runtime.make_session(pruned), {"input": np.zeros((1, 3, 8, 8), np.float32)})


def test_nothing_prunable_leaves_the_model_unchanged():
    proto = unprunable_model()
    model = Model.from_proto(proto)
    passes = make_passes(["prune"], {"prune": {"ratio": 0.5}})
    out, reports = run_passes(model, passes, context=PassContext(progress=False))
    assert any("nothing prunable" in note for note in reports[0].notes)
    feed = test_models.sample_inputs(proto)
    for a, b in zip(_outputs(proto, feed), _outputs(out, feed)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ratio": 1.0}, "ratio must be in"),
        ({"ratio": -0.1}, "ratio must be in"),
        ({"target_macs": 0.0}, "target MACs must be in"),
        ({}, "needs a budget: give --prune-target-macs F"),
        ({"ratio": 0.2, "target_macs": 0.5}, "alternatives"),
        ({"ratio": 0.2, "exclude": "("}, "regular expression"),
        ({"ratio": 0.2, "recovery": "lsq"}, "needs calibration"),
    ],
)
def test_bad_options_are_user_errors(options, message):
    proto = test_models.build("conv_chain")
    with pytest.raises(UserError, match=message):
        _prune(proto, **options)


def test_unreachable_target_is_a_user_error():
    proto = test_models.build("conv_chain")
    with pytest.raises(UserError, match="unreachable"):
        _prune(proto, target_macs=0.01, round_to=1)


def test_bad_recipe_is_a_user_error(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        _prune(test_models.build("conv_chain"), recipe=str(recipe))
    recipe.write_text(json.dumps({"ratio": 0.2, "bogus": 1}))
    with pytest.raises(UserError, match="unknown key"):
        _prune(test_models.build("conv_chain"), recipe=str(recipe))


def test_cli_prune_end_to_end(tmp_path, cli):
    proto = test_models.build("resnet_basic_block", batch="N")
    src = tmp_path / "in.onnx"
    onnx.save(proto, src)
    before = src.read_bytes()
    out = tmp_path / "out.onnx"
    result = cli(str(src), str(out), "--passes", "fold,prune", "--target-macs", "0.6", "--round-to", "1", "--random-inputs", "8", "--min-cosine", "0.5")
    assert result.code == 0, result.err
    assert src.read_bytes() == before
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned)
    stats = model_stats(Model.from_proto(pruned), refresh_shapes=True)
    original = model_stats(Model.from_proto(proto), refresh_shapes=True)
    assert stats.macs <= 0.6 * original.macs + 1


@pytest.mark.parametrize("args", [["--prune-ratio", "1.5"], ["--target-macs", "0.001", "--round-to", "1"]])
def test_cli_bad_budget_exits_2_without_output(tmp_path, cli, args):
    src = tmp_path / "in.onnx"
    onnx.save(test_models.build("conv_chain"), src)
    out = tmp_path / "out.onnx"
    result = cli(str(src), str(out), "--passes", "prune", *args)
    assert_one_line_error(result)
    assert not out.exists()


@pytest.mark.parametrize("allocation", ["sensitivity", "marginal"])
def test_measured_allocation_meets_the_target_with_the_allocated_ratios(allocation):
    proto = test_models.build("resnet_bottleneck_block")
    calib = _calibration(proto, 16)
    out, report = _prune(proto, calib, target_macs=0.6, allocation=allocation, round_to=1, recovery="bias")
    assert report.after.macs / report.before.macs <= 0.6 + 1e-9
    details = report.details["sensitivity"]
    assert list(details["allocations"]) == [allocation]
    levels = details["allocations"][allocation]["levels"]
    assert details["allocations"][allocation]["reached"] and len(details["curves"]) == len(levels) >= 2
    assert len(set(round(v, 6) for v in levels.values())) > 1  # not one ratio everywhere
    rows = {tuple(r["sources"]): r for r in report.details["groups"]}
    for curve in details["curves"]:  # each group lost exactly its allocated share (the recipe path)
        row = rows[tuple(curve["members"])]
        expected = min(int(levels[curve["name"]] * row["units"] + 1e-9), row["units"] - 1)
        assert row["units"] - row["kept_units"] == expected, (curve["name"], levels[curve["name"]], row)


def test_sensitivity_curves_are_measured_with_the_pass_recovery():
    # the refit undoes much of a group's loss, so curves measured with it are lower
    proto = test_models.build("resnet_bottleneck_block")
    calib = _calibration(proto, 16)
    curves = {}
    for recovery in ("bias", "lsq"):
        _, report = _prune(proto, calib, target_macs=0.6, round_to=1, recovery=recovery, allocation="sensitivity")
        curves[recovery] = {c["name"]: c["loss"]["cosine"] for c in report.details["sensitivity"]["curves"]}
    assert curves["bias"].keys() == curves["lsq"].keys()
    total = {k: sum(sum(v) for v in c.values()) for k, c in curves.items()}
    assert total["lsq"] < 0.8 * total["bias"], total


def test_group_curves_of_a_model_over_the_measuring_budget_use_fewer_samples(monkeypatch):
    from onnxslim_cv import sensitivity

    proto = test_models.build("resnet_bottleneck_block")
    measured = []
    analyze = sensitivity.analyze_groups
    monkeypatch.setattr(sensitivity, "analyze_groups", lambda *a, **k: measured.append(k["samples"]) or analyze(*a, **k))
    monkeypatch.setattr(sensitivity, "MEASURE_BUDGET_MACS", 1.0)  # any model is over it: the floor of 16
    out, report = _prune(proto, _calibration(proto, 24), target_macs=0.6, round_to=1, allocation="sensitivity")
    assert measured == [sensitivity.MIN_MEASURE_SAMPLES]
    assert any("group curves on 16 samples, not 64" in note for note in report.notes), report.notes
    assert report.after.macs <= 0.61 * report.before.macs
    monkeypatch.setattr(sensitivity, "MEASURE_BUDGET_MACS", 1e18)
    _prune(proto, _calibration(proto, 24), target_macs=0.6, round_to=1, allocation="sensitivity")
    assert measured[-1] == 64


def test_auto_allocation_keeps_the_candidate_with_the_lowest_calibration_loss():
    from onnxslim_cv.sensitivity import ReferenceOutputs

    proto = test_models.build("resnet_bottleneck_block")
    calib = _calibration(proto, 16)
    # allocation auto is the default; no mirrors, so the loss below is on the same samples
    out, report = _prune(proto, calib, target_macs=0.6, round_to=1, calib_mirror="none")
    details = report.details["allocation"]
    rows = details["candidates"]
    assert list(rows) == ["ranking", "sensitivity", "marginal"] and details["samples"] == 16
    assert details["chosen"] == min(rows, key=lambda name: rows[name]["cosine"])
    assert f"allocation {details['chosen']}," in report.notes[-1]
    assert report.after.macs / report.before.macs <= 0.6 + 1e-9
    # the emitted model is the chosen candidate itself: same loss against the folded original
    folded, _ = run_passes(Model.from_proto(proto), make_passes(["fold"], {}), context=PassContext(progress=False))
    loss = ReferenceOutputs(folded, calib).loss(out)["cosine"]
    assert loss == pytest.approx(rows[details["chosen"]]["cosine"], rel=1e-5, abs=1e-9)
    assert any(r["layer"] for r in report.details["reconstruction"])


def test_auto_allocation_is_the_ranking_without_data_or_without_a_macs_target():
    proto = test_models.build("resnet_bottleneck_block")
    _, report = _prune(proto, None, target_macs=0.6, round_to=1)
    assert "allocation ranking," in report.notes[-1] and "allocation" not in report.details
    _, report = _prune(proto, _calibration(proto, 8), ratio=0.3, round_to=1)
    assert "allocation" not in report.notes[-1] and "sensitivity" not in report.details


def test_auto_allocation_with_every_group_set_by_the_recipe_has_nothing_to_compare(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"target_macs": 0.9, "round_to": 1, "groups": {".": 0.5}}))
    proto = test_models.build("resnet_bottleneck_block")
    _, report = _prune(proto, _calibration(proto, 8), recipe=str(recipe))
    assert "allocation ranking," in report.notes[-1]
    assert "allocation" not in report.details and "sensitivity" not in report.details


def test_sensitivity_allocation_needs_a_macs_target_and_calibration_data():
    with pytest.raises(UserError, match="--prune-target-macs"):
        make_passes(["prune"], {"prune": {"ratio": 0.5, "allocation": "sensitivity"}})
    with pytest.raises(UserError, match="needs calibration data"):
        _prune(test_models.build("conv_chain"), None, target_macs=0.6, allocation="sensitivity")
    with pytest.raises(UserError, match="choose one of auto, ranking, sensitivity, marginal"):
        make_passes(["prune"], {"prune": {"target_macs": 0.6, "allocation": "aimet"}})


def test_mirrored_calibration_lowers_the_held_out_error_when_images_are_few():
    proto = test_models.build("resnet_bottleneck_block")
    feed = test_models.sample_inputs(proto, batch=16, seed=99)
    reference = _outputs(proto, feed)[0]
    calib = _calibration(proto, 2, seed=5)
    errors, notes = {}, {}
    for mirror in ("none", "auto", "flips", "crops"):
        out, report = _prune(proto, calib, ratio=0.5, round_to=1, criterion="l2", calib_mirror=mirror)
        errors[mirror] = _relative_error(reference, _outputs(out, feed)[0])
        notes[mirror] = [n for n in report.notes if n.startswith("calibration:")]
    assert all(errors[m] < 0.9 * errors["none"] for m in ("auto", "flips", "crops")), errors
    assert notes["none"] == [] and "(hflip), 4 samples" in notes["auto"][0] and "(flips), 8 samples" in notes["flips"][0]
    assert "30 random crops each (crops), 64 samples" in notes["crops"][0]


def test_mirroring_stops_at_enough_samples():
    proto = test_models.build("resnet_bottleneck_block")
    _, report = _prune(proto, _calibration(proto, 64), ratio=0.5, round_to=1, criterion="l2", recovery="bias")
    assert not [n for n in report.notes if n.startswith("calibration:")]
    _, report = _prune(proto, _calibration(proto, 63), ratio=0.5, round_to=1, criterion="l2", recovery="bias")
    assert [n for n in report.notes if n.startswith("calibration:")]
