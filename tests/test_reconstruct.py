"""Least-squares refit of layers whose inputs lost channels (onnxslim_cv/reconstruct.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_cv import runtime
from onnxslim_cv.calibration import from_iterable
from onnxslim_cv.depgraph import build_dependency_graph, prune_channels
from onnxslim_cv.ir import Model
from onnxslim_cv.passes import prune as prune_pass
from onnxslim_cv.reconstruct import bias_compensation, reconstruct


def _redundant_then_deconv(kernel: int, stride: int, pad: int = 0) -> onnx.ModelProto:
    """1x1 conv whose channel 3 is ch0 - 0.5 * ch1, then a ConvTranspose.

    Removing channel 3 loses no information, so a refit of the ConvTranspose can undo it
    exactly where each output pixel comes from one tap (stride >= kernel).
    """
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    b1 = rng.normal(size=4).astype(np.float32)
    w1[3] = w1[0] - 0.5 * w1[1]
    b1[3] = b1[0] - 0.5 * b1[1]
    w2 = rng.normal(size=(4, 5, kernel, kernel)).astype(np.float32)
    w2[3] *= 3.0  # the removed channel matters
    b2 = rng.normal(size=5).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv"),
        helper.make_node(
            "ConvTranspose", ["h", "w2", "b2"], ["y"], name="deconv",
            kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4,
        ),
    ]
    graph = helper.make_graph(
        nodes, "deconv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _data(model: Model, count=16, seed=3):
    rng = np.random.default_rng(seed)
    return from_iterable([{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(count)], model.input_specs())


def _remove_channel_3(proto):
    original = Model.from_proto(proto)
    pruned = original.copy()
    dg = build_dependency_graph(pruned)
    group = next(g for g in dg.prunable_groups if "conv" in g.sources)
    removed = [group.units[3]]
    consumers = prune_pass._consumers(dg, removed)
    prune_channels(pruned, dg, removed)
    return original, pruned, consumers


def _relative_output_error(a: Model, b: Model, feed) -> float:
    ya = runtime.run(runtime.make_session(a.to_proto(), optimize=False), feed)[0]
    yb = runtime.run(runtime.make_session(b.to_proto(), optimize=False), feed)[0]
    assert ya.shape == yb.shape
    return float(np.linalg.norm(ya - yb) / np.linalg.norm(ya))


@pytest.mark.parametrize("kernel,stride,pad", [(2, 2, 0), (3, 3, 0), (4, 2, 1)])
def test_conv_transpose_refit_recovers_a_redundant_channel(kernel, stride, pad):
    # with overlapping taps (4, 2) the fit is per tap, but exact taps sum to an exact output
    original, pruned, consumers = _remove_channel_3(_redundant_then_deconv(kernel, stride, pad))
    assert [c.name for c in consumers] == ["deconv"]
    feed = {"x": np.random.default_rng(9).normal(size=(4, 3, 8, 8)).astype(np.float32)}
    before = _relative_output_error(original, pruned, feed)
    # a negligible ridge: the default one pulls towards the unpruned weights on purpose
    (fit,) = reconstruct(original, pruned, consumers, _data(original), ridge=1e-9)
    assert fit.skipped is None
    after = _relative_output_error(original, pruned, feed)
    onnx.checker.check_model(pruned.to_proto())
    assert before > 0.2
    assert after < 1e-4, (before, after)
    assert fit.error_after < 1e-5 * fit.error_before


def test_conv_transpose_refit_at_the_default_ridge_lowers_the_error():
    original, pruned, consumers = _remove_channel_3(_redundant_then_deconv(4, 2, pad=1))
    feed = {"x": np.random.default_rng(9).normal(size=(4, 3, 8, 8)).astype(np.float32)}
    before = _relative_output_error(original, pruned, feed)
    (fit,) = reconstruct(original, pruned, consumers, _data(original))
    assert 0 < fit.error_after < 0.5 * fit.error_before
    assert _relative_output_error(original, pruned, feed) < 0.5 * before


@pytest.mark.parametrize("kernel,exact", [(1, True), (2, False)])
def test_conv_transpose_bias_compensation_adds_the_lost_mean(kernel, exact):
    original, pruned, consumers = _remove_channel_3(_redundant_then_deconv(kernel, kernel))
    feed = {"x": np.zeros((1, 3, 8, 8), np.float32)}  # h is then its bias everywhere: its mean
    means = {"h": numpy_helper.to_array(next(i for i in original.to_proto().graph.initializer if i.name == "b1"))}
    before = _relative_output_error(original, pruned, feed)
    assert bias_compensation(original, pruned, consumers, means) == 1
    after = _relative_output_error(original, pruned, feed)
    if exact:  # one tap per output channel: the shift is exact
        assert after < 1e-5 * max(before, 1.0)
    else:  # one bias per channel for 4 taps of different shifts: the mean of them
        assert after < 0.9 * before


def test_is_slice_accepts_removal_alone_and_rejects_mixed_channels():
    from onnxslim_cv.reconstruct import _is_slice

    full = np.random.default_rng(0).normal(size=(2, 4, 3, 3)).astype(np.float32)
    keep = np.array([True, False, True, True])
    assert _is_slice(full, full[:, keep] + 1e-9, keep, 1)
    normalised = full[:, keep] / np.linalg.norm(full[:, keep], axis=1, keepdims=True)  # as a norm over channels does
    assert not _is_slice(full, normalised, keep, 1)
    assert not _is_slice(full, full[:, keep][:, :2], keep, 1)
    assert not _is_slice(full, full[:, keep], keep[:3], 1)


def test_first_stage_from_sliced_original_activations_fits_as_the_pruned_runs_do(monkeypatch):
    import onnxslim_cv.reconstruct as R

    proto = _redundant_then_deconv(4, 2, pad=1)
    fits = {}
    for shortcut in (True, False):
        original, pruned, consumers = _remove_channel_3(proto)
        calls = []
        real = R._is_slice if shortcut else (lambda *a: False)
        monkeypatch.setattr(R, "_is_slice", lambda *a: calls.append(real(*a)) or calls[-1])
        reconstruct(original, pruned, consumers, _data(original, count=48))  # 3 batches: 2 from the slice
        assert calls == [shortcut]  # checked once, on the first batch
        fits[shortcut] = {t.name: t.values.copy() for t in pruned.constants()}
    assert fits[True].keys() == fits[False].keys()
    for name in fits[True]:
        np.testing.assert_allclose(fits[True][name], fits[False][name], rtol=1e-4, atol=1e-6)


def _conv_then_conv() -> onnx.ModelProto:
    """1x1 conv (4 channels), then a 3x3 conv and a 1x1 conv reading it (one stage of two
    consumers; the 3x3's columns are channel-major taps), summed."""
    rng = np.random.default_rng(1)
    inits = {"w1": rng.normal(size=(4, 3, 1, 1)), "b1": rng.normal(size=4), "w2": rng.normal(size=(5, 4, 3, 3)),
             "b2": rng.normal(size=5), "w3": rng.normal(size=(5, 4, 1, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["r", "w3"], ["y3"], name="conv3"),
        helper.make_node("Add", ["y2", "y3"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "conv_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def _remove_units(proto, indices):
    original = Model.from_proto(proto)
    pruned = original.copy()
    dg = build_dependency_graph(pruned)
    group = next(g for g in dg.prunable_groups if "conv" in g.sources)
    removed = [group.units[i] for i in indices]
    consumers = prune_pass._consumers(dg, removed)
    prune_channels(pruned, dg, removed)
    return original, pruned, consumers


@pytest.mark.parametrize("build", [_conv_then_conv, lambda: _redundant_then_deconv(4, 2, pad=1)], ids=["conv", "conv_transpose"])
def test_slice_cache_gives_the_refit_of_a_full_pass_and_serves_later_removals(build, monkeypatch):
    from onnxslim_cv.reconstruct import SliceCache

    proto = build()
    cache = SliceCache()
    gathered = []
    real = SliceCache.accumulate
    monkeypatch.setattr(SliceCache, "accumulate", lambda self, node, *a: gathered.append(node.name) or real(self, node, *a))
    for removal in ([3], [1, 3], [0]):
        if removal == [0]:
            cache._entries.pop(next(iter(cache._entries)))  # a stage partly in the cache
        fits = []
        for use in (cache, None):
            original, pruned, consumers = _remove_units(proto, removal)
            data = _data(original, count=48)
            reconstruct(original, pruned, consumers, data, cache=use)
            assert not any(c.skipped for c in consumers)
            fits.append({t.name: t.values.copy() for t in pruned.constants()})
        assert fits[0].keys() == fits[1].keys()
        for name in fits[0]:
            np.testing.assert_allclose(fits[0][name], fits[1][name], rtol=1e-4, atol=1e-6)
    # the first removal's 3 batches of each consumer, then 3 of the one dropped from the cache
    assert len(gathered) == 3 * len(set(gathered)) + 3


def test_slice_cache_drops_its_oldest_entries_past_its_budget():
    from onnxslim_cv.reconstruct import SliceCache

    original, pruned, consumers = _remove_units(_conv_then_conv(), [3])
    node = next(n for n in original.graph.nodes if n.name == "conv2")
    x = np.random.default_rng(0).normal(size=(2, 4, 8, 8)).astype(np.float32)
    cache = SliceCache()
    cache.accumulate(node, x, np.random.default_rng(0), 16)
    assert "conv2" in cache
    size = 8 * 37 * (37 + 5)  # (D + 1)^2 + (D + 1) * Cout doubles, D = 4 * 3 * 3
    cache.max_bytes = size
    assert cache.make_room([node], keep=["conv2"]) is False  # only room for one, and that one is kept
    assert cache.make_room([node]) is True and "conv2" not in cache
    cache.max_bytes = size - 1
    assert cache.make_room([node]) is False


@pytest.mark.parametrize("builder", ["resnet_basic_block", "unet_like", "split_concat"])
def test_refits_from_the_original_s_values_and_the_changed_part_match_whole_model_runs(builder, monkeypatch):
    """With a cache, each stage reads the original's values from its store and runs only the
    part of the pruned copy that differs: the same refit as running both models whole."""
    from onnxslim_cv import regions, sensitivity
    from onnxslim_cv.reconstruct import OriginalValues, SliceCache
    from onnxslim_cv.testing import models as test_models

    proto = test_models.build(builder)
    model, dg, *_ = sensitivity.group_setup(Model.from_proto(proto))
    data = from_iterable([test_models.sample_inputs(proto, seed=i) for i in range(24)], model.input_specs())
    cut_nodes, tapped = [], []
    real_session, real_get = regions.region_session, OriginalValues.get
    monkeypatch.setattr(regions, "region_session", lambda c, region, *a: cut_nodes.append(region.nodes) or real_session(c, region, *a))
    monkeypatch.setattr(OriginalValues, "get", lambda self, names: tapped.append(
        [n for n in names if n not in self._values and n not in {t.name for t in self.original.graph.inputs}]) or real_get(self, names))
    cache = SliceCache(max_bytes=0)  # values only: every stage takes the store's path
    for group in dg.prunable_groups:
        removed = list(group.units)[: max(1, len(group.units) // 2)]
        fits = []
        for use in (cache, None):
            pruned = prune_pass.pruned_copy(model, dg, removed, "lsq", data, {}, cache=use)
            fits.append({t.name: np.asarray(t.values) for t in pruned.constants()})
        assert fits[0].keys() == fits[1].keys()
        for name in fits[0]:
            np.testing.assert_allclose(fits[0][name], fits[1][name], rtol=1e-4, atol=1e-5, err_msg=f"{group.sources} {name}")
    assert cut_nodes and min(cut_nodes) < len(model.graph.nodes)  # some stages ran only part of the model
    computed = [name for names in tapped for name in names]
    assert len(computed) == len(set(computed))  # each original value computed once


def test_original_values_over_budget_are_refused_once_and_the_refit_runs_the_models_instead(monkeypatch):
    from onnxslim_cv.reconstruct import OriginalValues, SliceCache

    original, pruned, consumers = _remove_units(_conv_then_conv(), [1, 3])
    data = _data(original, count=32)
    store = OriginalValues(original, data, True, 16, max_bytes=1 << 20)
    name = next(n for n in original.graph.nodes if n.name == "conv2").inputs[0].name
    values = store.get([name])
    assert values is not None and len(values) == 2 and values[0][name].shape[0] == 16
    store.max_bytes = values[0][name].nbytes  # room for one batch of it, not two
    store._values.clear()
    assert store.get([name]) is None and frozenset([name]) in store._too_big
    runs = []
    with monkeypatch.context() as patch:
        real = runtime.run
        patch.setattr(runtime, "run", lambda *a, **k: runs.append(1) or real(*a, **k))
        assert store.get([name]) is None and not runs  # remembered: not computed again
    assert OriginalValues(original, data, True, 16, max_bytes=1000).usable is False  # the inputs alone are too big
    fits = []
    for cache in (SliceCache(max_bytes=0, values_bytes=1000), None):
        original, pruned, consumers = _remove_units(_conv_then_conv(), [1, 3])
        reconstruct(original, pruned, consumers, data, cache=cache)
        fits.append({t.name: t.values.copy() for t in pruned.constants()})
    for key in fits[0]:
        np.testing.assert_array_equal(fits[0][key], fits[1][key])


@pytest.mark.parametrize("builder, kwargs", [("conv_chain", {"channels": (8, 16, 16, 16, 16, 8)}),
                                             ("resnet_basic_block", {})])
def test_each_stage_starts_from_the_taps_of_the_stages_before_it(builder, kwargs, monkeypatch):
    """Refitting every group's consumers takes one stage per depth; with the frontier each
    stage's session starts where the previous stage's taps are, so the stages together run
    fewer nodes than when each starts from the first changed node, for the same refit."""
    from onnxslim_cv import reconstruct as reconstruct_module
    from onnxslim_cv import sensitivity
    from onnxslim_cv.reconstruct import SliceCache
    from onnxslim_cv.testing import models as test_models

    proto = test_models.build(builder, **kwargs)
    model, dg, *_ = sensitivity.group_setup(Model.from_proto(proto))
    data = from_iterable([test_models.sample_inputs(proto, seed=i) for i in range(24)], model.input_specs())
    removed = [unit for group in dg.prunable_groups for unit in list(group.units)[: len(group.units) // 2]]
    nodes_run = []
    real_make = runtime.make_session
    monkeypatch.setattr(reconstruct_module.regions.runtime, "make_session",
                        lambda proto, **k: nodes_run.append(len(proto.graph.node)) or real_make(proto, **k))
    fits, totals, sessions = [], [], []
    for frontier in (True, False):
        if not frontier:
            monkeypatch.setattr(reconstruct_module._Frontier, "add", lambda self, *a: None)
        nodes_run.clear()
        pruned = prune_pass.pruned_copy(model, dg, removed, "lsq", data, {}, cache=SliceCache(max_bytes=0))
        fits.append({t.name: np.asarray(t.values) for t in pruned.constants()})
        totals.append(sum(nodes_run))
        sessions.append(len(nodes_run))
    assert sessions[0] == sessions[1] >= 3  # one cut session per stage past the first
    assert totals[0] < totals[1]
    assert fits[0].keys() == fits[1].keys()
    for name in fits[0]:
        np.testing.assert_allclose(fits[0][name], fits[1][name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_the_frontier_keeps_only_what_later_taps_read_and_empties_past_its_budget():
    from onnxslim_cv.reconstruct import _Frontier
    from onnxslim_cv.testing import models as test_models

    model = Model.from_proto(test_models.build("conv_chain", channels=(8, 8, 8)))
    relus = [n.outputs[0].name for n in model.graph.nodes if n.op == "Relu"]
    frontier = _Frontier(model, max_bytes=1 << 20)
    value = [np.ones((2, 8, 16, 16), np.float32)]
    frontier.add({relus[0]: value}, 1, later_taps=[relus[1]])
    assert list(frontier.values) == [relus[0]]
    frontier.add({relus[1]: value}, 1, later_taps=[])  # nothing reads them any more
    assert frontier.values == {}
    small = _Frontier(model, max_bytes=value[0].nbytes - 1)
    small.add({relus[0]: value}, 1, later_taps=[relus[1]])
    assert small.values == {} and small.disabled
    small.add({relus[0]: value}, 1, later_taps=[relus[1]])
    assert small.values == {}
