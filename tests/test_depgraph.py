"""The channel dependency graph: groups, freezing, and removals that keep the maths exact.

The central check: zero the input-channel slices (``in`` members) of the channels we are about
to remove, so they contribute nothing; physically removing them must then leave every output
unchanged. That holds only if every coupled tensor, constant and shape was found.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxslim_cv import runtime
from onnxslim_cv.depgraph import PruneError, build_dependency_graph, prune_channels
from onnxslim_cv.ir import Model
from onnxslim_cv.pipeline import get_pass
from onnxslim_cv.testing import models as test_models
from onnxslim_cv.testing import zoo

from .conftest import graph_model

APPROXIMATE = ("LayerNormalization",)  # statistics over the channels shift when pruned


def _folded(proto: onnx.ModelProto) -> Model:
    model, _ = get_pass("fold")()(Model.from_proto(proto))
    return model


def _pick_removal(dg, fraction: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    removed = []
    for group in dg.prunable_groups:
        if any(a in note for note in group.notes for a in APPROXIMATE):
            continue
        count = min(int(round(len(group.units) * fraction)), len(group.units) - 1)
        if count > 0:
            removed.extend(int(u) for u in rng.choice(group.units, count, replace=False))
    return removed


def _zero_inputs_of(model: Model, dg, removed) -> None:
    removed_arr = np.asarray(sorted(removed))
    for member in dg.members:
        if member.role != "in":
            continue
        drop = ~dg.keep_mask(member.ids, removed_arr)
        if not drop.any():
            continue
        tensor = member.node.inputs[member.index]
        values = np.array(tensor.values, copy=True)
        index = [slice(None)] * values.ndim
        index[member.axis] = np.flatnonzero(drop)
        values[tuple(index)] = 0
        tensor.values = values


def _run(model: Model, feed):
    session = runtime.make_session(model.to_proto(), optimize=False)
    return runtime.run(session, feed)


def _assert_exact_removal(proto: onnx.ModelProto, feed, fraction=0.3, seed=0):
    model = _folded(proto)
    dg = build_dependency_graph(model)
    removed = _pick_removal(dg, fraction, seed)
    assert removed, "nothing was prunable"
    reference = model.copy()
    _zero_inputs_of(reference, build_dependency_graph(reference), removed)
    expected = _run(reference, feed)
    macs_predicted = dg.macs(removed)
    prune_channels(model, dg, removed)
    proto_out = model.to_proto()
    onnx.checker.check_model(proto_out)
    got = _run(model, feed)
    for a, b in zip(expected, got):
        assert a.shape == b.shape
        scale = max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * scale)
    return model, dg, removed, macs_predicted


@pytest.mark.parametrize("name", [n for n in test_models.BUILDERS if n != "resnet50"])
def test_removing_zeroed_channels_leaves_outputs_unchanged(name):
    proto = test_models.build(name, batch="N")
    feed = test_models.sample_inputs(proto, batch=2)
    _assert_exact_removal(proto, feed)


@pytest.mark.parametrize("name", [n for n in test_models.BUILDERS if n != "resnet50"])
def test_pruned_model_runs_at_other_batch_sizes(name):
    proto = test_models.build(name, batch="N")
    model = _folded(proto)
    dg = build_dependency_graph(model)
    removed = _pick_removal(dg, 0.5, seed=1)
    prune_channels(model, dg, removed)
    pruned = model.to_proto()
    session = runtime.make_session(pruned)
    for batch in (1, 3):
        outputs = runtime.run(session, test_models.sample_inputs(proto, batch=batch))
        assert outputs[0].shape[0] == batch


def test_predicted_macs_match_the_pruned_model():
    from onnxslim_cv.stats import model_stats

    proto = test_models.build("resnet_bottleneck_block")
    model, dg, removed, predicted = _assert_exact_removal(proto, test_models.sample_inputs(proto))
    assert predicted == model_stats(model, refresh_shapes=True).macs


def test_residual_add_couples_both_branches():
    model = _folded(test_models.build("resnet_basic_block"))
    dg = build_dependency_graph(model)
    spine = [g for g in dg.groups if len(g.sources) > 1]
    assert spine, "the residual add should merge the sources of both branches"
    assert all(g.prunable for g in spine[:-1])


def test_depthwise_conv_shares_channels_with_its_input():
    model = _folded(test_models.build("mobilenetv2_block"))
    dg = build_dependency_graph(model)
    depthwise = [n for n in model.graph.nodes if n.op == "Conv" and n.attrs.get("group", 1) > 1]
    assert depthwise
    for node in depthwise:
        groups = dg.group_of(node.name)
        assert len(groups) == 1
        group = groups[0]
        assert node.inputs[0].name in group.tensors and node.outputs[0].name in group.tensors


def test_grouped_conv_units_are_whole_groups():
    model = _folded(test_models.build("group_conv", channels=16, groups=4))
    dg = build_dependency_graph(model)
    grouped = next(n for n in model.graph.nodes if n.op == "Conv" and n.attrs.get("group", 1) == 4)
    group = dg.group_of(grouped.name)[0]
    assert len(group.units) == 4 and group.channels == 16


@pytest.mark.parametrize("groups", [2, 4, 16])
def test_grouped_conv_transpose_loses_whole_groups_exactly(groups):
    proto = test_models.build("conv_transpose", channels=16, groups=groups, batch="N")
    model = _folded(proto)
    dg = build_dependency_graph(model)
    deconv = next(n for n in model.graph.nodes if n.op == "ConvTranspose")
    (group,) = dg.group_of(deconv.name)
    assert group.prunable and len(group.units) == groups and group.channels == 16
    pruned, _, removed, predicted = _assert_exact_removal(proto, test_models.sample_inputs(proto, batch=2), fraction=0.5)
    deconv = next(n for n in pruned.graph.nodes if n.op == "ConvTranspose")
    lost = len(set(removed) & set(int(u) for u in group.units))
    assert lost == groups // 2
    assert deconv.attrs["group"] == groups - lost
    assert deconv.inputs[1].values.shape[:2] == (16 - 16 // groups * lost, 16 // groups)
    from onnxslim_cv.stats import model_stats

    assert predicted == model_stats(pruned, refresh_shapes=True).macs


def test_reduction_over_channels_freezes_with_a_reason():
    dg = build_dependency_graph(_folded(test_models.build("squeezenet_fire")))
    assert any("Softmax" in r for g in dg.groups for r in g.frozen)


@pytest.mark.parametrize("name", ["channel_shuffle", "shufflenet_v2"])
def test_channel_shuffles_are_tracked_as_channel_selections(name):
    model = _folded(test_models.build(name))
    dg = build_dependency_graph(model)
    conv_outputs = {n.outputs[0].name for n in model.graph.nodes if n.op == "Conv" and n.outputs[0].name != "output"}
    frozen = [g for g in dg.groups if g.frozen and set(g.tensors) & conv_outputs]
    assert frozen == []
    assert any("channel selection" in note for g in dg.groups for note in g.notes)
    # each shuffle output holds whole input channels: the Gather the pruner writes is exact
    if name == "channel_shuffle":
        (group,) = dg.prunable_groups
        shuffled = next(n for n in model.graph.nodes if n.op == "Reshape" and n.outputs[0].shape[1] == 16).outputs[0]
        source = dg.layouts[group.tensors[0]].ids
        order = [int(np.flatnonzero(source == unit)[0]) for unit in dg.layouts[shuffled.name].ids]
        assert order == [8 * k + j for j in range(8) for k in range(2)]  # position 2j + k holds channel 8k + j


def _strided_halves_model() -> onnx.ModelProto:
    """Conv 3->8 -> Relu -> even channels (Slice step 2) and odd channels (Gather [1, 3, 5, 7])
    -> a 1x1 conv each -> Add -> ``output``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("wa", (4, 4, 1, 1)), ("wb", (4, 4, 1, 1)))]
    inits += [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
              (("starts", [0]), ("ends", [8]), ("axes", [1]), ("steps", [2]), ("odd", [1, 3, 5, 7]))]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Slice", ["r1", "starts", "ends", "axes", "steps"], ["even"], name="even"),
        helper.make_node("Gather", ["r1", "odd"], ["odd_ch"], name="odd_gather", axis=1),
        helper.make_node("Conv", ["even", "wa"], ["ca"], name="conva"),
        helper.make_node("Conv", ["odd_ch", "wb"], ["cb"], name="convb"),
        helper.make_node("Add", ["ca", "cb"], ["output"], name="add"),
    ]
    graph = helper.make_graph(nodes, "halves", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    return graph_model(graph)


def test_a_strided_channel_slice_is_a_channel_selection():
    proto = _strided_halves_model()
    dg = build_dependency_graph(_folded(proto))
    # the even and the odd channels reach different convs: two groups, each free to lose any channel
    groups = [g for g in dg.groups if g.sources == ["conv1"]]
    assert [(g.prunable, len(g.units)) for g in groups] == [(True, 4), (True, 4)]
    _assert_exact_removal(proto, test_models.sample_inputs(proto, batch=2), fraction=0.5)


def test_a_single_channel_gather_is_a_channel_selection():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             (("w1", (4, 3, 3, 3)), ("b1", (4,)), ("w2", (2, 1, 1, 1)), ("w3", (2, 4, 1, 1)))]
    inits += [numpy_helper.from_array(np.array(2, dtype=np.int64), "pick"), numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Gather", ["c1", "pick"], ["one"], name="pick_one", axis=1),  # [N, H, W]
        helper.make_node("Unsqueeze", ["one", "axes"], ["one4"], name="unsqueeze"),  # [N, 1, H, W]
        helper.make_node("Conv", ["one4", "w2"], ["c2"], name="conv2"),
        helper.make_node("Conv", ["c1", "w3"], ["c3"], name="conv3"),
        helper.make_node("Add", ["c2", "c3"], ["output"], name="add"),
    ]
    graph = helper.make_graph(nodes, "pick", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, 8, 8])], inits)
    proto = graph_model(graph)
    dg = build_dependency_graph(_folded(proto))
    assert not any("single channels" in r for g in dg.groups for r in g.frozen)
    assert any("channel selection" in note for g in dg.groups for note in g.notes)
    # channel 2 reaches conv2 as well, so it is a group of its own; the other three may go
    (rest,) = [g for g in dg.groups if g.sources == ["conv1"] and len(g.units) == 3]
    assert rest.prunable
    _assert_exact_removal(proto, test_models.sample_inputs(proto, batch=2), fraction=0.5)


def test_a_pruned_shuffle_becomes_channel_gathers_and_an_untouched_one_stays():
    model = _folded(test_models.build("shufflenet_v2"))
    dg = build_dependency_graph(model)
    # only the first branch's inner channels (conv3 -> depthwise conv4 -> conv5): no shuffle changes
    (inner,) = [g for g in dg.prunable_groups if g.sources == ["conv3", "conv4"]]
    prune_channels(model, dg, inner.units[:4])
    assert [n.op for n in model.graph.nodes].count("Transpose") == 2
    model = _folded(test_models.build("shufflenet_v2"))
    dg = build_dependency_graph(model)
    prune_channels(model, dg, _pick_removal(dg, 0.5, seed=3))
    ops = [n.op for n in model.graph.nodes]
    assert "Transpose" not in ops and ops.count("Gather") == 4
    onnx.checker.check_model(model.to_proto())


def _runtime_bias_model() -> onnx.ModelProto:
    """Conv -> Conv and Gemm -> Gemm, where the second conv's bias and the first Gemm's C are
    model inputs rather than weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [weight("wa", 6, 3, 3, 3), weight("ba", 6), weight("wb", 5, 6, 1, 1), weight("wg", 5, 7),
             weight("wg2", 7, 2), weight("cg2", 2)]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "wb", "bias_in"], ["b"]),
        helper.make_node("Relu", ["b"], ["br"]),
        helper.make_node("GlobalAveragePool", ["br"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "wg", "c_in"], ["g"]),
        helper.make_node("Relu", ["g"], ["gr"]),
        helper.make_node("Gemm", ["gr", "wg2", "cg2"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
              helper.make_tensor_value_info("bias_in", TensorProto.FLOAT, [5]),
              helper.make_tensor_value_info("c_in", TensorProto.FLOAT, [7])]
    return graph_model(helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                                         inits))


def test_biases_computed_at_run_time_freeze_their_channels():
    proto = _runtime_bias_model()
    model = Model.from_proto(proto)
    dg = build_dependency_graph(model)
    reasons = [r for g in dg.groups for r in g.frozen]
    assert any("bias is computed at run time" in r for r in reasons), reasons
    assert any("C input is computed at run time" in r for r in reasons), reasons
    assert [g.channels for g in dg.prunable_groups] == [6]  # the first conv's outputs only
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32),
            "bias_in": rng.standard_normal(5).astype(np.float32), "c_in": rng.standard_normal(7).astype(np.float32)}
    prune_channels(model, dg, dg.prunable_groups[0].units[:2])
    onnx.checker.check_model(model.to_proto(), full_check=True)
    assert _run(model, feed)[0].shape == (1, 2)


def test_gather_with_one_wide_index_dim_keeps_the_channels():
    """torch.onnx's dynamo exporter writes ``as_strided`` after a pooled map as Reshape(-1) and a
    Gather of an [1, C, 1, 1] index tensor (ConvNeXt's head)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat"),
             numpy_helper.from_array(np.arange(6, dtype=np.int64).reshape(1, 6, 1, 1), "strided"),
             numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "wg")]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("ReduceMean", ["r"], ["m"], axes=[2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "flat"], ["v"]),
        helper.make_node("Gather", ["v", "strided"], ["s"], axis=0),
        helper.make_node("Flatten", ["s"], ["f"]),
        helper.make_node("Gemm", ["f", "wg"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    proto = graph_model(graph)
    dg = build_dependency_graph(_folded(proto))
    assert [g.channels for g in dg.prunable_groups] == [6]
    model, *_ = _assert_exact_removal(proto, {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}, fraction=0.5)
    gather = next(n for n in model.graph.nodes if n.op == "Gather")
    assert gather.inputs[1].values.shape == (1, 3, 1, 1)


def test_graph_outputs_are_frozen():
    model = _folded(test_models.build("conv_chain"))
    dg = build_dependency_graph(model)
    out = model.graph.outputs[0].name
    assert all(not g.prunable for g in dg.groups if out in g.tensors)


def test_removing_frozen_or_all_channels_is_refused():
    model = _folded(test_models.build("conv_chain"))
    dg = build_dependency_graph(model)
    frozen = next(g for g in dg.groups if g.frozen)
    with pytest.raises(PruneError, match="frozen"):
        prune_channels(model, dg, frozen.units[:1])
    group = dg.prunable_groups[0]
    with pytest.raises(PruneError, match="every channel"):
        prune_channels(model, dg, group.units)


def test_nothing_removed_changes_nothing():
    model = _folded(test_models.build("resnet_basic_block"))
    before = model.to_proto().SerializeToString()
    dg = build_dependency_graph(model)
    assert prune_channels(model, dg, [])["units"] == 0
    assert model.to_proto().SerializeToString() == before


def test_flatten_into_gemm_slices_blocks_of_features():
    proto = test_models.build("flatten_gemm")
    model, dg, removed, _ = _assert_exact_removal(proto, test_models.sample_inputs(proto))
    gemm = next(n for n in model.graph.nodes if n.op == "Gemm")
    conv = next(n for n in model.graph.nodes if n.op == "Conv")
    channels = conv.inputs[1].values.shape[0]
    weight = gemm.inputs[1].values
    features = weight.shape[1] if gemm.attrs.get("transB", 0) else weight.shape[0]
    assert features == channels * 8 * 8


def test_channels_last_flatten_slices_every_cth_feature():
    proto = test_models.build("channels_last_flatten", batch="N", channels=8, image_size=16)
    dg = build_dependency_graph(_folded(proto))
    (conv_group,) = [g for g in dg.groups if g.channels == 8]
    assert conv_group.prunable, conv_group.frozen
    model, dg, removed, _ = _assert_exact_removal(proto, test_models.sample_inputs(proto, batch=2), fraction=0.25)
    features = (8 - len(removed)) * 8 * 8
    reshape = next(n for n in model.graph.nodes if n.op == "Reshape")
    assert list(reshape.inputs[1].values) == [-1, features]
    linear = next(n for n in model.graph.nodes if n.op in ("MatMul", "Gemm"))
    weight = linear.inputs[1].values
    assert (weight.shape[1] if linear.attrs.get("transB", 0) else weight.shape[0]) == features


@pytest.mark.parametrize("explicit", [True, False])
def test_reshape_target_is_rewritten(explicit):
    proto = test_models.build("reshape_matmul", explicit_features=explicit, batch="N")
    _assert_exact_removal(proto, test_models.sample_inputs(proto, batch=2))


def test_unnamed_nodes_get_names():
    proto = test_models.build("conv_chain")
    for node in proto.graph.node:
        node.name = ""
    dg = build_dependency_graph(_folded(proto))
    assert all(g.sources for g in dg.groups)


def test_prunable_share_of_conv_channels_on_resnet_and_mobilenet_blocks():
    for name in ("resnet_basic_block", "resnet_bottleneck_block", "mobilenetv2_block"):
        dg = build_dependency_graph(_folded(test_models.build(name)))
        summary = dg.summary()
        assert summary["prunable_conv_channels"] >= 0.8 * summary["conv_channels"], name


# -- the shared real models ---------------------------------------------------------------------

SHARED = [entry.key for entry in zoo.available()] if zoo.shared_models_dir() else []


@pytest.mark.skipif(not SHARED, reason="../shared/models not present")
@pytest.mark.parametrize("key", SHARED)
def test_shared_model_exact_removal(key):
    entry = zoo.get(key)
    proto = onnx.load(entry.model_path())
    sample = next(iter(entry.inputs(limit=1)))
    feed = sample if isinstance(sample, dict) else {entry.input_name: sample}
    _assert_exact_removal(proto, feed, fraction=0.25)
