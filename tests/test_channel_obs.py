"""Greedy OBS channel order (:mod:`onnxslim_cv.channel_obs`) and prune's ``obs`` criterion."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_cv import channel_obs, runtime
from onnxslim_cv.activations import channel_moments
from onnxslim_cv.calibration import from_iterable
from onnxslim_cv.depgraph import build_dependency_graph
from onnxslim_cv.ir import Model
from onnxslim_cv.passes import prune as P
from onnxslim_cv.pipeline import PassContext, make_passes, run_passes
from onnxslim_cv.testing import models as test_models

DUPLICATE = (2, 5)  # channels of the first conv with the same filter (and bias)


def _duplicate_channel_model() -> onnx.ModelProto:
    """input -> Conv 3x3 (8) -> Relu -> Conv 3x3 (6) -> output; two of the 8 channels are one signal.

    The duplicated channels carry the most energy, so scoring channels one at a time keeps them
    to the end; but removing either costs nothing once the consumer is refit on the other."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w1[DUPLICATE[0]] *= 4.0
    w1[DUPLICATE[1]] = w1[DUPLICATE[0]]
    b1 = rng.standard_normal(8).astype(np.float32) * 0.1
    b1[DUPLICATE[1]] = b1[DUPLICATE[0]]
    w2 = rng.standard_normal((6, 8, 3, 3)).astype(np.float32) * 0.3
    b2 = np.zeros(6, np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["output"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "duplicate_channel",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 6, 8, 8])],
        initializer=[numpy_helper.from_array(v, n) for n, v in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = test_models.DEFAULT_IR_VERSION
    return model


def _calibration(proto, count, seed=1):
    specs = Model.from_proto(proto).input_specs()
    return from_iterable([test_models.sample_inputs(proto, batch=1, seed=seed + i) for i in range(count)], specs)


def _setup(proto, count=24):
    model = Model.from_proto(proto)
    dg = build_dependency_graph(model)
    data = _calibration(proto, count)
    moments = channel_moments(model, P.consumer_axes(dg), data)
    covariances = channel_obs.consumer_covariances(model, dg, data)
    return model, dg, moments, covariances


def _channel_of(dg, group, units):
    return [group.units.index(u) for u in units]


def test_duplicated_channels_go_first_in_obs_order_and_last_by_energy():
    model, dg, moments, covariances = _setup(_duplicate_channel_model())
    (group,) = dg.prunable_groups
    assert len(covariances) == 1  # conv2 reads the group, with its 8 x 9 columns
    (consumer,) = covariances.values()
    assert consumer.covariance.shape == (72, 72)

    diagonal = P.unit_scores(model, dg, "reconstruction", moments)
    by_energy = sorted(group.units, key=lambda u: diagonal[u])
    assert set(_channel_of(dg, group, by_energy[-2:])) == set(DUPLICATE)

    order = channel_obs.removal_order(dg, group, list(covariances.values()), np.zeros(dg.num_ids))
    assert sorted(order) == sorted(group.units)
    assert _channel_of(dg, group, order[:1])[0] in DUPLICATE
    # with the refit it is the cheapest channel by far (what is left is the ridge's doing)
    state = channel_obs._GreedyState(consumer, {i: consumer.columns(np.array([i])) for i in range(len(group.units))})
    costs = state.costs(len(group.units))
    assert costs[DUPLICATE[0]] == costs.min()
    assert costs[DUPLICATE[0]] < 0.25 * np.median(costs)


def test_obs_cost_is_the_refit_error_of_removing_a_block():
    """tr(W_B (Hinv_BB)^-1 W_B^T) equals the error of the best refit of the other columns."""
    rng = np.random.default_rng(3)
    mixing = rng.standard_normal((12, 12))
    cov = mixing @ mixing.T / 12
    weight = rng.standard_normal((5, 12))
    consumer = channel_obs.ConsumerCovariance(None, None, weight, cov, energy=1.0)
    block = np.array([3, 7, 8])
    kept = np.setdiff1d(np.arange(12), block)
    state = channel_obs._GreedyState(consumer, {0: block, 1: kept})  # unit 1: every other column
    h = cov + channel_obs.DAMP * np.mean(np.diag(cov)) * np.eye(12)
    # best W' on the kept columns: minimise (W - W') h (W - W')^T with W'_B = 0
    w_kept = weight[:, kept] + weight[:, block] @ h[np.ix_(block, kept)] @ np.linalg.inv(h[np.ix_(kept, kept)])
    delta = weight.copy()
    delta[:, kept] -= w_kept
    expected = float(np.trace(delta @ h @ delta.T))
    assert state.costs(2)[0] == pytest.approx(expected, rel=1e-9)
    # and the update leaves the weights that refit gives (the removed columns dropped)
    state.remove(np.array([0]))
    assert state.weight.shape == (5, 9)
    assert np.allclose(state.weight, w_kept)


def test_reorder_keeps_each_groups_scores_so_allocation_is_unchanged():
    proto = test_models.build("resnet_basic_block")
    model, dg, moments, covariances = _setup(proto)
    diagonal = P.unit_scores(model, dg, "reconstruction", moments)
    reordered = P.unit_scores(model, dg, "obs", moments, covariances)
    assert covariances
    changed = 0
    for group in dg.prunable_groups:
        units = list(group.units)
        assert np.allclose(np.sort(diagonal[units]), np.sort(reordered[units]))
        changed += int(not np.allclose(diagonal[units], reordered[units]))
    assert changed > 0  # the order did change somewhere


def test_flatten_gemm_consumer_blocks_are_the_channels_features():
    proto = test_models.build("flatten_gemm")
    model, dg, moments, covariances = _setup(proto)
    gemms = [c for c in covariances.values() if c.layer.op in ("Gemm", "MatMul")]
    assert gemms, "the Flatten-Gemm head is solved with its covariance"
    gemm = max(gemms, key=lambda c: c.layer.reduction)  # the one after Flatten: 8 channels x 8 x 8
    assert gemm.layer.reduction == 512
    by_unit = channel_obs._positions_by_unit(dg, gemm.member)
    sizes = {len(v) for v in by_unit.values()}
    assert sizes == {64}  # H*W features per channel
    scores = P.unit_scores(model, dg, "obs", moments, covariances)
    assert np.isfinite(scores).all()


def _prune(proto, calib, **options):
    model = Model.from_proto(proto)
    out, reports = run_passes(model, make_passes(["prune"], {"prune": options}), context=PassContext(calibration=calib, progress=False))
    return out, reports[0]


def _output(model, feed):
    return runtime.run(runtime.make_session(model.to_proto(), optimize=False), feed)[0]


def test_prune_obs_removes_the_duplicate_and_the_refit_restores_the_outputs():
    proto = _duplicate_channel_model()
    calib = _calibration(proto, 24)
    feeds = [test_models.sample_inputs(proto, batch=4, seed=500 + i) for i in range(2)]
    reference = [runtime.run(runtime.make_session(proto, optimize=False), feed)[0] for feed in feeds]
    errors = {}
    for criterion in ("obs", "reconstruction"):
        out, report = _prune(proto, calib, ratio=0.125, round_to=1, criterion=criterion, recovery="lsq")
        assert report.changes["channels removed"] == 1
        pruned = out.to_proto()
        onnx.checker.check_model(pruned)
        assert pruned.ir_version <= runtime.max_ir_version()
        errors[criterion] = max(
            float(np.linalg.norm(_output(out, feed) - ref) / np.linalg.norm(ref)) for feed, ref in zip(feeds, reference)
        )
    assert errors["obs"] < 0.01, errors  # what is left is the refit's pull towards the old weights
    assert errors["reconstruction"] > 10 * errors["obs"], errors


def test_obs_is_the_default_criterion_with_enough_calibration_data():
    proto = test_models.build("squeezenet_fire")
    out, report = _prune(proto, _calibration(proto, P.OBS_MIN_SAMPLES), ratio=0.25, round_to=1)
    assert "criterion obs" in " ".join(report.notes)
    onnx.checker.check_model(out.to_proto())
    _, report_few = _prune(proto, _calibration(proto, 8), ratio=0.25, round_to=1)
    assert "criterion reconstruction" in " ".join(report_few.notes)
    _, report_plain = _prune(proto, None, ratio=0.25, round_to=1)
    assert "criterion l2" in " ".join(report_plain.notes)


def test_groups_read_only_by_depthwise_convs_keep_the_diagonal_scores():
    proto = test_models.build("mobilenetv2_block")
    model, dg, moments, covariances = _setup(proto)
    diagonal = P.unit_scores(model, dg, "reconstruction", moments)
    reordered = P.unit_scores(model, dg, "obs", moments, covariances)
    solved = {id(c.member) for c in covariances.values()}
    for group in dg.prunable_groups:
        units = set(int(u) for u in group.units)
        readers = [m for m in dg.members if m.role == "in" and units & set(dg.find(m.ids).tolist())]
        if not any(id(m) in solved for m in readers):
            assert np.array_equal(diagonal[list(units)], reordered[list(units)])


def test_large_groups_lose_several_of_their_cheapest_units_per_step(monkeypatch):
    model, dg, moments, covariances = _setup(test_models.build("resnet_basic_block"))
    diagonal = np.zeros(dg.num_ids)
    group = max(dg.prunable_groups, key=lambda g: len(g.units))
    consumers = list(covariances.values())
    exact = channel_obs.removal_order(dg, group, consumers, diagonal)
    monkeypatch.setattr(channel_obs, "GREEDY_STEPS", 4)
    chunked = channel_obs.removal_order(dg, group, consumers, diagonal)
    assert sorted(exact) == sorted(chunked) == sorted(int(u) for u in group.units)
    step = len(group.units) // 4
    assert step > 1
    # the first step takes the units the exact greedy would rank cheapest before any removal
    positions = [channel_obs._positions_by_unit(dg, c.member) for c in consumers]
    units = [int(u) for u in group.units]
    costs = np.zeros(len(units))
    for consumer, by_unit in zip(consumers, positions):
        blocks = {i: consumer.columns(by_unit[u]) for i, u in enumerate(units) if u in by_unit}
        if blocks:
            costs += channel_obs._GreedyState(consumer, blocks).costs(len(units))
    cheapest = {units[i] for i in np.argsort(costs, kind="stable")[:step]}
    assert set(chunked[:step]) == cheapest
    assert exact[0] in cheapest
