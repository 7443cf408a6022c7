"""Sensitivity analysis: curves, the suffix shortcut against whole-model runs, allocation, CLI."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxslim_cv import activations, sensitivity
from onnxslim_cv.calibration import from_iterable, from_path
from onnxslim_cv.data import demo_calibration_path, demo_model_path
from onnxslim_cv.depgraph import build_dependency_graph
from onnxslim_cv.errors import UserError
from onnxslim_cv.ir import Model
from onnxslim_cv.model_io import load_model
from onnxslim_cv.pipeline import PassContext, make_passes, run_passes
from onnxslim_cv.sensitivity import SensitivityCurve, allocate, analyze_groups, analyze_layers
from onnxslim_cv.sparsity import magnitude_mask, sparsifiable_layers
from onnxslim_cv.testing import models as test_models

from .conftest import assert_one_line_error, graph_model


def _data(proto, count=12, seed=0):
    specs = Model.from_proto(proto).input_specs()
    return from_iterable([test_models.sample_inputs(proto, seed=seed + i) for i in range(count)], specs)


@pytest.fixture(scope="module")
def digits():
    """The built-in trained digits CNN and its calibration images: a real model."""
    model = load_model(str(demo_model_path()))
    return model, from_path(demo_calibration_path(), model.input_specs())


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def _conv_chain(channels=(3, 8, 8, 4), kernels=(3, 1, 1)):
    """Convs in a chain on an input whose height and width are dynamic."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for i, (cin, cout, k) in enumerate(zip(channels, channels[1:], kernels)):
        weights.append(numpy_helper.from_array(rng.standard_normal((cout, cin, k, k)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [previous, f"w{i}"], [f"y{i}"], name=f"conv{i}", pads=[k // 2] * 4))
        previous = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info(previous, onnx.TensorProto.FLOAT, None)], weights)
    return graph_model(graph)


def test_suffix_macs_sum_each_layer_and_everything_downstream_at_the_data_s_size():
    proto = _conv_chain()
    model = Model.from_proto(proto)
    layers, _ = sparsifiable_layers(model, include_first=True, include_last=True)
    data = from_iterable([{"x": np.zeros((1, 3, 8, 8), np.float32)}], model.input_specs())
    pixels = 8 * 8
    own = [pixels * 8 * 3 * 9, pixels * 8 * 8, pixels * 4 * 8]
    assert sensitivity.suffix_macs(model, layers, data) == sum(own) + sum(own[1:]) + own[2]
    assert sensitivity.suffix_macs(model, layers[1:2], data) == own[1] + own[2]
    per_sample = sum(own) + sum(own[1:]) + own[2]
    assert sensitivity.affordable_samples(model, layers, 2, 64, data, budget=per_sample * 2 * 64) == (64, per_sample * 2)
    assert sensitivity.affordable_samples(model, layers, 2, 64, data, budget=per_sample * 2 * 40.5)[0] == 40
    assert sensitivity.affordable_samples(model, layers, 2, 64, data, budget=per_sample)[0] == sensitivity.MIN_MEASURE_SAMPLES
    assert sensitivity.affordable_samples(model, layers, 2, 8, data, budget=per_sample)[0] == 8  # never more than asked


def test_group_suffix_macs_count_each_group_s_sources_and_everything_downstream():
    model = Model.from_proto(_conv_chain())
    dg = build_dependency_graph(model.copy())
    data = from_iterable([{"x": np.zeros((1, 3, 8, 8), np.float32)}], model.input_specs())
    own = [64 * 8 * 3 * 9, 64 * 8 * 8, 64 * 4 * 8]  # conv0, conv1, conv2 at 8 x 8
    groups = {tuple(g.sources): g for g in dg.prunable_groups}
    assert set(groups) == {("conv0",), ("conv1",)}  # conv2 writes the graph output
    assert sensitivity.group_suffix_macs(model, [groups[("conv0",)]], data) == sum(own)
    assert sensitivity.group_suffix_macs(model, [groups[("conv1",)]], data) == own[1] + own[2]
    assert sensitivity.group_suffix_macs(model, list(groups.values()), data) == sum(own) + own[1] + own[2]


def test_budget_note_only_when_the_curves_saw_fewer_samples_than_the_data_had():
    model = Model.from_proto(_conv_chain())
    data = lambda count: from_iterable([{"x": np.zeros((1, 3, 8, 8), np.float32)}] * count, model.input_specs())
    note = sensitivity.budget_note(16, 64, 2.5e11, "every layer's suffix x 6 levels", data(40))
    assert note == "curves on 16 samples, not 64: at 2.5e+11 multiply-adds per sample (every layer's suffix x 6 levels) " \
                   "64 would exceed the 4e+12 budget"
    assert sensitivity.budget_note(16, 64, 2.5e11, "x", data(12)) is None  # all the data had
    assert sensitivity.budget_note(64, 64, 1.0, "x", data(100)) is None


def test_layer_curves_start_at_zero_and_grow_with_sparsity(digits):
    model, data = digits
    curves = analyze_layers(model, data, samples=64, progress=False)
    assert [c.name for c in curves] == ["conv2", "layer1.conv1", "layer1.conv2", "conv3"]  # first and last left out
    for curve in curves:
        assert curve.kind == "layer" and curve.levels == [0.0, 0.3, 0.5, 0.7, 0.9]
        assert set(curve.loss) == {"cosine", "snr", "top1"}
        for metric, losses in curve.loss.items():
            assert losses[0] == 0.0
        cosine = curve.loss["cosine"]
        assert 0 < cosine[1] < cosine[-1]
        assert all(b >= a for a, b in zip(cosine[1:], cosine[2:])), (curve.name, cosine)
        assert curve.loss["snr"][-1] > curve.loss["snr"][1]
        assert curve.params == int(np.prod(model.tensors()[curve.members[0]].values.shape))
    # the dense model is not modified
    assert all(np.count_nonzero(model.tensors()[c.members[0]].values) == c.params for c in curves)


def test_masked_weights_match_magnitude_mask():
    weight = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    weight[0, 0, 0, :2] = 0.5  # ties are broken by position, as magnitude_mask does
    weight[1, 0, 0, :2] = -0.5
    levels = [0.1, 0.33, 0.5, 0.9]
    for level, masked in zip(levels, sensitivity.masked_weights(weight, levels)):
        expected = np.where(magnitude_mask(weight, level), weight, 0)
        assert np.array_equal(masked, expected)
        assert masked.dtype == weight.dtype


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet_basic_block", {}),  # residual Adds, fixed batch-1 export that can grow
        ("squeezenet_fire", {}),  # Concat of two branches
        ("unet_like", {"batch": "N"}),  # skip connection Concat after Resize, dynamic batch
        ("detection_head", {}),  # two outputs, head layers that reach only one of them
        ("se_gemm", {}),  # Gemm squeeze-excite multiplied back into the feature map
    ],
)
def test_suffix_models_match_whole_model_runs(monkeypatch, name, kwargs):
    proto = test_models.build(name, **kwargs)
    model = Model.from_proto(proto)
    data = _data(proto, 10)
    options = dict(include_first=True, include_last=True, progress=False, sparsities=(0.3, 0.8))
    full = analyze_layers(model, data, method="full", **options)
    with monkeypatch.context() as patch:  # the suffix path must not fall back to whole models
        patch.setattr(sensitivity, "_full_proto", lambda *a, **k: pytest.fail("fell back to the whole model"))
        fast = analyze_layers(model, data, **options)
    assert [c.name for c in fast] == [c.name for c in full] and len(fast) >= 3
    for a, b in zip(fast, full):
        assert a.loss.keys() == b.loss.keys()
        for metric in a.loss:
            assert np.allclose(a.loss[metric], b.loss[metric], rtol=1e-5, atol=1e-5), (a.name, metric)
        assert a.loss["cosine"][-1] > 0


def _fixed_batch_one(proto):
    """resnet_basic_block with its Flatten replaced by Reshape to [1, C]: batch 1 only."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    index, flatten = next((i, n) for i, n in enumerate(graph.node) if n.op_type == "Flatten")
    graph.initializer.append(numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "fixed_shape"))
    graph.node.remove(flatten)
    graph.node.insert(index, helper.make_node("Reshape", [flatten.input[0], "fixed_shape"], list(flatten.output), name="reshape_fixed"))
    return proto


def test_fixed_batch_one_export_that_cannot_grow(monkeypatch):
    proto = _fixed_batch_one(test_models.build("resnet_basic_block"))
    assert not activations.batch_can_grow(proto)
    model = Model.from_proto(proto)
    data = _data(proto, 5)
    fast = analyze_layers(model, data, progress=False, sparsities=(0.5, 0.9))
    full = analyze_layers(model, data, progress=False, sparsities=(0.5, 0.9), method="full")
    assert len(fast) == 5
    for a, b in zip(fast, full):
        assert np.allclose(a.loss["cosine"], b.loss["cosine"], atol=1e-6)
        assert a.loss["cosine"][-1] > 0


def test_layers_by_name_and_bad_levels():
    proto = test_models.build("conv_chain")
    model = Model.from_proto(proto)
    curves = analyze_layers(model, _data(proto, 4), layers=["conv1", "conv3.weight"], progress=False)
    assert [c.name for c in curves] == ["conv1", "conv3"]  # first/last may be asked for by name
    with pytest.raises(UserError, match="no sparsifiable layer named"):
        analyze_layers(model, _data(proto, 4), layers=["nope"], progress=False)
    with pytest.raises(UserError, match=r"must be in \[0, 1\)"):
        analyze_layers(model, _data(proto, 4), sparsities=(0.5, 1.0), progress=False)


def test_levels_with_equal_weights_are_measured_once(digits, monkeypatch):
    from onnxslim_cv import sensitivity

    model, data = digits
    levels = (0.3, 0.5, 0.7, 0.9)
    plain = analyze_layers(model, data, samples=16, sparsities=levels, layers=["conv2"], progress=False)

    def coarse(layer, weight, wanted):
        """Levels 0.5 and 0.7 get 0.3's weights again (equal copies, not the same object)."""
        masked = sensitivity.masked_weights(weight, wanted)
        return [masked[0], masked[0].copy(), masked[0].copy(), masked[3]]

    measured = []
    real_measure = sensitivity._measure
    monkeypatch.setattr(sensitivity, "_measure",
                        lambda *args: measured.append(len(args[3])) or real_measure(*args))
    (curve,) = analyze_layers(model, data, samples=16, sparsities=levels, layers=["conv2"], progress=False,
                              weights_at=coarse)
    assert measured and set(measured) == {2}  # two distinct weights per batch, not four
    cosine, reference = curve.loss["cosine"], plain[0].loss["cosine"]
    assert cosine[1] == cosine[2] == cosine[3] == pytest.approx(reference[1], rel=1e-6)
    assert cosine[4] == pytest.approx(reference[4], rel=1e-6)


def test_distinct_arrays():
    from onnxslim_cv.sensitivity import distinct_arrays

    a, b = np.zeros((2, 3)), np.ones((2, 3))
    distinct, index = distinct_arrays([a, a.copy(), b, np.zeros(6), b])
    assert index == [0, 0, 1, 2, 1] and len(distinct) == 3  # equal values of another shape stay apart


# ---------------------------------------------------------------------------------------------
# Channel groups
# ---------------------------------------------------------------------------------------------


def test_group_curves_record_macs_and_patterns_select_one_group(digits):
    model, data = digits
    curves = analyze_groups(model, data, ratios=(0.25, 0.5), samples=32, progress=False)
    dg = build_dependency_graph(model.copy())
    assert len(curves) == len(dg.prunable_groups) >= 3
    total = dg.macs()
    for curve in curves:
        assert curve.kind == "group" and curve.levels == [0.0, 0.25, 0.5]
        assert curve.loss["cosine"][0] == 0 and 0 < curve.loss["cosine"][1] < curve.loss["cosine"][2]
        assert curve.macs_at[0] == total and curve.macs_at[0] > curve.macs_at[1] > curve.macs_at[2]
        matched = [g.id for g in dg.groups if any(re.search(curve.pattern, n) for n in g.nodes + g.tensors + g.sources)]
        assert matched == [curve.group]


def test_group_loss_is_what_prune_with_bias_recovery_does(digits, tmp_path):
    """A curve point is the output loss of the prune pass removing that ratio of that group."""
    model, data = digits
    data = data.limited(32)
    curve = analyze_groups(model, data, ratios=(0.5,), samples=32, progress=False)[0]
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"groups": {curve.pattern: 0.5}}))
    # the same 32 samples: no mirrored copies, which the pass adds under 64 by default
    options = {"ratio": 0.0, "round_to": 1, "criterion": "l2", "recovery": "bias", "recipe": str(recipe), "calib_mirror": "none"}
    pruned, reports = run_passes(model, make_passes(["prune"], {"prune": options}), context=PassContext(calibration=data, progress=False))
    assert reports[0].changes["groups pruned"] == 1
    reference = sensitivity.ReferenceOutputs(model, data, False)
    assert reference.loss(pruned)["cosine"] == pytest.approx(curve.loss["cosine"][1], rel=1e-6)


@pytest.mark.parametrize("builder", ["resnet_basic_block", "unet_like", "detection_head", "split_concat", "reshape_matmul", "se_gemm"])
@pytest.mark.parametrize("recovery", ["bias", "lsq"])
def test_group_curves_run_only_what_the_group_changes_and_match_whole_model_runs(builder, recovery, monkeypatch):
    proto = test_models.build(builder)
    model, data = Model.from_proto(proto), _data(proto, 8)
    cut_curves = analyze_groups(model, data, ratios=(0.25, 0.5), samples=8, recovery=recovery, progress=False)
    runs = []
    full_run = sensitivity.ReferenceOutputs.loss

    def whole(self, candidate, original=None):
        runs.append(original is not None)
        return full_run(self, candidate)  # without ``original``: every node runs

    monkeypatch.setattr(sensitivity.ReferenceOutputs, "loss", whole)
    whole_curves = analyze_groups(model, data, ratios=(0.25, 0.5), samples=8, recovery=recovery, progress=False)
    assert runs and all(runs)  # analyze_groups asks for the cut on every candidate
    assert [c.name for c in cut_curves] == [c.name for c in whole_curves]
    for cut, full in zip(cut_curves, whole_curves):
        for metric in full.loss:
            np.testing.assert_allclose(cut.loss[metric], full.loss[metric], rtol=1e-5, atol=1e-9, err_msg=cut.name)


# ---------------------------------------------------------------------------------------------
# Allocation
# ---------------------------------------------------------------------------------------------


def _curve(name, losses, params=100, levels=(0.0, 0.25, 0.5, 0.75)):
    return SensitivityCurve(name, "layer", list(levels), {"cosine": list(losses)}, params=params, macs=params * 10)


def test_allocate_meets_the_target_with_equal_degradation():
    curves = [
        _curve("flat", [0, 0.001, 0.002, 0.004], params=300),
        _curve("medium", [0, 0.01, 0.02, 0.04], params=100),
        _curve("steep", [0, 0.1, 0.2, 0.4], params=100),
    ]
    allocation = allocate(curves, target=0.5, metric="cosine")
    achieved = sum(allocation[c.name] * c.params for c in curves) / sum(c.params for c in curves)
    assert achieved == pytest.approx(0.5, abs=1e-6) and allocation.reached
    assert allocation["flat"] > allocation["medium"] > allocation["steep"]
    # every layer below its largest level sits at the same loss: the threshold
    for curve in curves:
        if allocation[curve.name] < curve.levels[-1]:
            loss = float(np.interp(allocation[curve.name], curve.levels, curve.loss["cosine"]))
            assert loss == pytest.approx(allocation.threshold, rel=1e-6)
    assert allocation["flat"] == 0.75  # capped by the largest measured level


def test_allocate_makes_curves_monotone_and_respects_max_level():
    bumpy = _curve("bumpy", [0, 0.05, 0.01, 0.2])  # noise: loss falls at 0.5
    smooth = _curve("smooth", [0, 0.02, 0.04, 0.06])
    allocation = allocate([bumpy, smooth], target=0.4)
    # the dip at 0.5 cannot be used: 0.05 already at 0.25, so the running max is 0.05 up to 0.5
    assert allocation["bumpy"] <= 0.5 + 1e-9
    capped = allocate([bumpy, smooth], target=0.3, max_level=0.4)
    assert max(capped.values()) <= 0.4 + 1e-12
    assert sum(capped.values()) / 2 == pytest.approx(0.3, abs=1e-6)


def test_unreachable_target_raises_or_returns_the_largest_levels():
    curves = [_curve("a", [0, 0.1, 0.2, 0.3]), _curve("b", [0, 0.2, 0.3, 0.4])]
    with pytest.raises(UserError, match="unreachable"):
        allocate(curves, target=0.9)
    result = allocate(curves, target=0.9, strict=False)
    assert not result.reached and dict(result) == {"a": 0.75, "b": 0.75}
    assert allocate(curves, target=0.0) == {"a": 0.0, "b": 0.0}


def test_flat_curves_meet_the_target_instead_of_overshooting():
    # top-1 loss is 0 up to 0.5 for both layers: threshold 0 alone would allow 0.5 everywhere
    curves = [_curve("a", [0, 0, 0, 0.1], params=100), _curve("b", [0, 0, 0, 0.3], params=100)]
    allocation = allocate(curves, target=0.3)
    assert allocation.threshold == 0 and allocation.achieved == pytest.approx(0.3, abs=1e-6)
    assert allocation["a"] == pytest.approx(allocation["b"]) == pytest.approx(0.3, abs=1e-6)
    # and past the flat stretch the steeper curve gets less
    beyond = allocate(curves, target=0.6)
    assert beyond.achieved == pytest.approx(0.6, abs=1e-6) and beyond["a"] > beyond["b"] > 0.5


def _summed_loss(curves, allocation):
    return sum(float(np.interp(allocation[c.name], c.levels, c.loss["cosine"])) for c in curves)


def test_marginal_rule_spends_the_budget_where_it_saves_most_per_unit_of_loss():
    levels = [0.0, 0.25, 0.5, 0.75]
    # "big" saves 100 MACs per step at +0.02 loss, "small" 10 MACs at +0.005: per MAC, big is cheaper
    big = SensitivityCurve("big", "group", levels, {"cosine": [0, 0.02, 0.04, 0.06]}, 10, 400, macs_at=[1000, 900, 800, 700], group=0)
    small = SensitivityCurve("small", "group", levels, {"cosine": [0, 0.005, 0.01, 0.015]}, 10, 40, macs_at=[1000, 990, 980, 970], group=1)
    equal = allocate([big, small], target=0.8, cost="macs")
    marginal = allocate([big, small], target=0.8, cost="macs", rule="marginal")
    assert marginal.rule == "marginal" and marginal.to_dict()["rule"] == "marginal" and equal.rule == "equal"
    assert marginal.achieved == pytest.approx(0.8, abs=1e-6) and marginal.reached
    assert dict(marginal) == pytest.approx({"big": 0.5, "small": 0.0})
    assert equal["small"] == 0.75  # equal loss spends the flat curve first
    assert _summed_loss([big, small], marginal) == pytest.approx(0.04)
    assert _summed_loss([big, small], marginal) < _summed_loss([big, small], equal) - 0.005


def test_marginal_rule_on_layers_meets_the_target_with_no_more_loss_than_equal():
    curves = [
        _curve("flat", [0, 0.001, 0.002, 0.004], params=300),
        _curve("medium", [0, 0.01, 0.02, 0.04], params=100),
        _curve("steep", [0, 0.1, 0.2, 0.4], params=100),
    ]
    for target in (0.2, 0.5, 0.6):
        equal = allocate(curves, target=target)
        marginal = allocate(curves, target=target, rule="marginal")
        assert marginal.achieved == pytest.approx(target, abs=1e-6)
        assert _summed_loss(curves, marginal) <= _summed_loss(curves, equal) + 1e-9


def test_marginal_rule_hands_an_overshoot_back():
    # counted with rounding (whole steps of 0.25), "b"'s first step overshoots the target; once it
    # is taken, "a"'s cheaper step is no longer needed and is handed back
    levels = [0.0, 0.25, 0.5, 0.75]
    a = SensitivityCurve("a", "group", levels, {"cosine": [0, 0.01, 0.05, 0.2]}, 10, 300, macs_at=[1000, 900, 800, 700], group=0)
    b = SensitivityCurve("b", "group", levels, {"cosine": [0, 0.03, 0.2, 0.5]}, 10, 600, macs_at=[1000, 800, 600, 400], group=1)

    def rounded(allocation):
        steps = {name: np.floor(value * 4 + 1e-9) for name, value in allocation.items()}
        return 1 - 0.1 * steps["a"] - 0.2 * steps["b"]

    result = allocate([a, b], target=0.85, cost="macs", achieved=rounded, rule="marginal")
    assert dict(result) == pytest.approx({"a": 0.0, "b": 0.25}) and result.achieved == pytest.approx(0.8)


def test_unknown_allocation_rule_is_a_user_error():
    with pytest.raises(UserError, match="choose one of equal, marginal"):
        allocate([_curve("a", [0, 0.1, 0.2, 0.3])], target=0.3, rule="greedy")


def test_group_allocation_counts_macs():
    groups = [
        SensitivityCurve("g1", "group", [0.0, 0.5], {"cosine": [0, 0.01]}, 10, 400, macs_at=[1000, 800], group=0),
        SensitivityCurve("g2", "group", [0.0, 0.5], {"cosine": [0, 0.1]}, 10, 400, macs_at=[1000, 800], group=1),
    ]
    allocation = allocate(groups, target=0.85, cost="macs")
    assert allocation.achieved == pytest.approx(0.85, abs=1e-6)
    assert allocation["g1"] > allocation["g2"]
    with pytest.raises(UserError, match="MACs"):
        allocate(groups, target=0.85, cost="params")
    exact = allocate(groups, target=0.85, cost="macs", achieved=lambda levels: 1 - 0.3 * sum(levels.values()))
    assert exact.achieved <= 0.85 + 1e-9


def test_allocate_refuses_a_metric_that_was_not_measured():
    with pytest.raises(UserError, match="top1"):
        allocate([_curve("a", [0, 0.1, 0.2, 0.3])], target=0.3, metric="top1")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli_analyze_prints_a_table_and_writes_json_and_a_recipe(cli, tmp_path):
    out_json, recipe = tmp_path / "sens.json", tmp_path / "recipe.json"
    result = cli(
        "analyze", demo_model_path(), "--calib", demo_calibration_path(), "--samples", "32",
        "--sparsities", "0.5,0.9", "--target-sparsity", "0.6", "--json", out_json, "--recipe-out", recipe,
    )
    assert result.code == 0, result.err
    assert "sparsity 0.5" in result.out and "layer1.conv2" in result.out and "chosen sparsity" in result.out
    assert "allocation: params sparsity 0.6000" in result.out
    data = json.loads(out_json.read_text())
    assert data["kind"] == "layer" and len(data["curves"]) == 4
    assert data["curves"][0]["levels"] == [0.0, 0.5, 0.9]
    assert data["allocation"]["achieved"] == pytest.approx(0.6, abs=1e-6)
    layers = json.loads(recipe.read_text())["layers"]
    assert set(layers) == {c["name"] for c in data["curves"]}
    params = {c["name"]: c["params"] for c in data["curves"]}
    assert sum(layers[n] * params[n] for n in layers) / sum(params.values()) == pytest.approx(0.6, abs=1e-6)


def test_cli_group_recipe_is_consumed_by_the_prune_pass(cli, model_file, tmp_path):
    model = model_file("resnet_bottleneck_block", batch="N")
    proto = onnx.load(str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.concatenate([test_models.sample_inputs(proto, seed=i)["input"] for i in range(16)]))
    recipe = tmp_path / "prune.json"
    result = cli("analyze", model, "--calib", calib, "--groups", "--ratios", "0.25,0.5,0.75",
                 "--target-macs", "0.7", "--recipe-out", recipe)
    assert result.code == 0, result.err
    assert "ratio 0.75" in result.out and "chosen ratio" in result.out
    assert float(re.search(r"keeps (\d\.\d+) of the model's MACs", result.out).group(1)) <= 0.7
    written = json.loads(recipe.read_text())
    assert written["target_macs"] == 0.7 and written["round_to"] == 1
    assert len(written["groups"]) >= 2 and any(r > 0 for r in written["groups"].values())

    report = tmp_path / "report.json"
    result = cli(model, tmp_path / "slim.onnx", "--passes", "fold,prune", "--prune-recipe", recipe, "--calib", calib,
                 "--report-json", report, "--min-cosine", "0")
    assert result.code == 0, result.err
    prune = json.loads(report.read_text())["passes"][1]
    assert prune["after"]["macs"] / prune["before"]["macs"] <= 0.7 + 1e-6
    # every regex still names exactly one group after fold, which got exactly the recipe's ratio
    folded, _ = run_passes(Model.from_proto(proto), make_passes(["fold"]), context=PassContext(progress=False))
    groups = build_dependency_graph(folded).groups
    rows = {tuple(r["sources"]): r for r in prune["details"]["groups"]}
    for pattern, ratio in written["groups"].items():
        matched = [g for g in groups if any(re.search(pattern, n) for n in g.nodes + g.tensors + g.sources)]
        assert len(matched) == 1, pattern
        row = rows[tuple(matched[0].sources)]
        assert row["units"] - row["kept_units"] == int(ratio * row["units"] + 1e-9), (pattern, ratio, row)


def test_cli_plot_writes_a_png(cli, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sens.png"
    result = cli("analyze", demo_model_path(), "--calib", demo_calibration_path(), "--samples", "16",
                 "--sparsities", "0.5,0.9", "--target-sparsity", "0.5", "--plot", png)
    assert result.code == 0, result.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib_names_the_extra(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = cli("analyze", demo_model_path(), "--calib", demo_calibration_path(), "--plot", tmp_path / "s.png")
    assert_one_line_error(result, "onnxslim-cv[plot]")
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((), "needs inputs"),
        (("--random-inputs", "4", "--sparsities", "0.5,1.5"), "--sparsities"),
        (("--random-inputs", "4", "--sparsities", "abc"), "comma-separated"),
        (("--random-inputs", "4", "--metric", "psnr"), "--metric"),
        (("--random-inputs", "4", "--target-macs", "0.5"), "--groups"),
        (("--random-inputs", "4", "--groups", "--target-sparsity", "0.5"), "--target-macs"),
        (("--random-inputs", "4", "--recipe-out", "r.json"), "needs a target"),
    ],
)
def test_cli_bad_input_is_one_line(cli, tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    result = cli("analyze", demo_model_path(), *args)
    assert_one_line_error(result, fragment)


def test_cli_random_inputs_warn(cli):
    result = cli("analyze", demo_model_path(), "--random-inputs", "4", "--sparsities", "0.5")
    assert result.code == 0, result.err
    assert "random inputs" in result.err and "layer1.conv1" in result.out
