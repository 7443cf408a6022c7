"""QDQ placement, parameters, emission and the onnxruntime fusion check (``onnxslim_cv.qdq``)."""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_cv import qdq, runtime
from onnxslim_cv.ir import Model
from onnxslim_cv.passes.fold import FoldPass
from onnxslim_cv.pipeline import PassContext

from .conftest import with_scalar_clip_bounds
from onnxslim_cv.testing import models as test_models


# ---------------------------------------------------------------------- helpers
def _folded(name_or_proto, **kwargs) -> Model:
    """A builder model with BatchNorm folded: what the quant pass plans on."""
    proto = test_models.build(name_or_proto, **kwargs) if isinstance(name_or_proto, str) else name_or_proto
    model = Model.from_proto(proto)
    FoldPass().run(model, PassContext(progress=False))
    return model


def _nodes(model: Model, op: str) -> List[str]:
    return [n.name for n in model.graph.nodes if n.op == op]




def _float_island_model() -> onnx.ModelProto:
    """input -> conv1 -> {Exp, HardSigmoid} -> Add -> conv2 -> output.

    The Add reads two float-only ops, so it must stay float; conv2 still reads a quantized Add output.
    """
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.2, "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32) * 0.5, "w2")
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Exp", ["c1"], ["e"], name="exp"),
        helper.make_node("HardSigmoid", ["c1"], ["h"], name="hardsigmoid"),
        helper.make_node("Add", ["e", "h"], ["a"], name="add"),
        helper.make_node("Conv", ["a", "w2"], ["output"], name="conv2"),
    ]
    proto = _conv_model(nodes, [w1, w2], "float_island")
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _add_div_model() -> onnx.ModelProto:
    """input -> conv1 + conv2 -> Add -> Div(x, 4) -> conv3 -> output.

    Folding cannot move the division into the Add; it can live in the Add output's quantize scale.
    """
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32) * 0.5, "w3"),
        numpy_helper.from_array(np.array(4.0, np.float32), "four"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["input", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "c2"], ["a"], name="add"),
        helper.make_node("Div", ["a", "four"], ["d"], name="div"),
        helper.make_node("Conv", ["d", "w3"], ["output"], name="conv3"),
    ]
    return _conv_model(nodes, inits, "add_div")


def _conv_model(nodes, initializers, name: str) -> onnx.ModelProto:
    """input [1,3,8,8] -> nodes -> output [1,4,8,8], opset 13 and an IR onnxruntime loads."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])],
        initializer=initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return proto


def _observed_ranges(model: Model, names, feeds) -> Dict[str, Tuple[float, float]]:
    """Min/max of ``names`` on ``feeds``, measured with numpy on the float model."""
    session = runtime.make_session(runtime.with_outputs(model.to_proto(), names), optimize=False)
    outputs = [o.name for o in session.get_outputs()]
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for feed in feeds:
        for name, value in zip(outputs, runtime.run(session, feed)):
            if name in lo:
                lo[name] = min(lo[name], float(value.min()))
                hi[name] = max(hi[name], float(value.max()))
    return {n: (lo[n], hi[n]) for n in names}


def _params(plan: qdq.QuantPlan, ranges, act_type: str) -> Dict[str, qdq.QuantParams]:
    ranges = {**ranges, **plan.fixed_ranges}
    plan.tie_concats(ranges)
    params = {}
    for members in plan.classes().values():
        lo = min(ranges[m][0] for m in members)
        hi = max(ranges[m][1] for m in members)
        p = qdq.params_from_range(lo, hi, act_type)
        for m in members:
            params[m] = p
    return params


def _quantize(name: str, *, act_type: str = "uint8", samples: int = 6, per_channel: bool = True):
    """(float proto, emitted model, plan, feeds): plan + numpy ranges + emit_qdq."""
    model = _folded(name)
    float_proto = model.to_proto()
    plan = qdq.plan_quantization(model, act_type=act_type)
    source = test_models.build(name)
    feeds = [test_models.sample_inputs(source, seed=s) for s in range(samples)]
    params = _params(plan, _observed_ranges(model, plan.quantized, feeds), act_type)
    qdq.emit_qdq(model, plan, params, per_channel=per_channel)
    return float_proto, model, plan, feeds


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


# ---------------------------------------------------------------------- placement
@pytest.mark.parametrize("name", ["conv_chain", "resnet_basic_block"])
def test_every_conv_is_int8_and_relu_fuses_without_a_qdq_in_between(name):
    model = _folded(name)
    plan = qdq.plan_quantization(model)
    convs = _nodes(model, "Conv")
    assert convs and set(convs) <= set(plan.int8_nodes)
    nodes = {n.name: n for n in model.graph.nodes}
    relus = _nodes(model, "Relu")
    assert relus
    for relu in relus:
        producer = nodes[plan.fused_activations[relu]]
        assert producer.op in ("Conv", "Add")
        conv_output = nodes[relu].inputs[0].name
        assert conv_output not in plan.quantized, f"QDQ between {producer.name} and {relu}"
        assert nodes[relu].outputs[0].name in plan.quantized
        assert relu not in plan.int8_nodes  # fused, not a node of its own


def test_residual_add_is_int8_when_its_inputs_are_quantized():
    model = _folded("resnet_basic_block")
    plan = qdq.plan_quantization(model)
    nodes = {n.name: n for n in model.graph.nodes}
    adds = _nodes(model, "Add")
    assert len(adds) == 2
    for add in adds:
        assert add in plan.int8_nodes
        assert all(t.name in plan.quantized for t in nodes[add].inputs)


@pytest.mark.parametrize("name, op", [("squeezenet_fire", "MaxPool"), ("resnet_basic_block", "Flatten"), ("se_gemm", "Reshape"),
                                      ("split_concat", "Split")])
def test_pass_through_ops_share_their_input_quantization(name, op):
    model = _folded(name)
    plan = qdq.plan_quantization(model)
    found = [n for n in model.graph.nodes if n.op == op]
    assert found
    for node in found:
        assert node.name in plan.int8_nodes
        source = node.inputs[0].name
        for out in node.outputs:
            assert out.name in plan.quantized
            assert plan.root(out.name) == plan.root(source)
    classes = plan.classes()
    assert sum(len(members) for members in classes.values()) == len(plan.quantized)


def test_pass_through_ops_that_only_reach_float_ops_stay_float():
    # detection_head: the heads' Transposes feed Reshape -> Concat -> model output only.
    model = _folded("detection_head")
    plan = qdq.plan_quantization(model)
    transposes = [n for n in model.graph.nodes if n.op == "Transpose"]
    assert transposes
    for node in transposes:
        assert node.name not in plan.int8_nodes
        assert all(out.name not in plan.quantized for out in node.outputs)


def test_float_only_ops_and_an_add_of_float_inputs_stay_float():
    model = _folded(_float_island_model())
    plan = qdq.plan_quantization(model)
    assert plan.int8_nodes == ["conv1", "conv2"]
    for name in ("exp", "hardsigmoid", "add"):
        assert name not in plan.int8_nodes
    assert "e" not in plan.quantized and "h" not in plan.quantized
    assert "c1" in plan.quantized and "a" in plan.quantized  # conv1's output and conv2's input


def test_hardsigmoid_in_a_builder_is_never_int8():
    model = _folded("mobilenetv3_block")
    plan = qdq.plan_quantization(model)
    hardsigmoids = _nodes(model, "HardSigmoid")
    assert hardsigmoids
    assert not set(hardsigmoids) & set(plan.int8_nodes)


def test_add_whose_inputs_are_both_kept_float_stays_float():
    model = _folded("resnet_basic_block")
    plan = qdq.plan_quantization(model, keep_float=["conv5", "conv6"])  # the two inputs of add2
    assert "add2" not in plan.int8_nodes
    assert "add1" in plan.int8_nodes
    assert plan.float_nodes == {"conv5": "kept float", "conv6": "kept float"}


def test_keep_float_with_a_reason_keeps_that_conv_float():
    model = _folded("conv_chain")
    plan = qdq.plan_quantization(model, keep_float={"conv2": "sensitive layer"})
    assert "conv2" not in plan.int8_nodes
    assert plan.float_nodes["conv2"] == "sensitive layer"
    assert plan.keep == {"conv2": "sensitive layer"}
    assert {"conv1", "conv3"} <= set(plan.int8_nodes)


def test_exclude_regex_keeps_matching_nodes_float():
    model = _folded("resnet_basic_block")
    plan = qdq.plan_quantization(model, exclude=r"^conv[45]$")
    assert "conv4" not in plan.int8_nodes and "conv5" not in plan.int8_nodes
    assert plan.float_nodes["conv4"] == plan.float_nodes["conv5"] == "matches --quant-exclude"
    assert {"conv1", "conv2", "conv3", "conv6"} <= set(plan.int8_nodes)


def test_clip_with_scalar_bounds_fuses_like_relu():
    model = _folded(with_scalar_clip_bounds(test_models.build("mobilenetv2_block")))
    plan = qdq.plan_quantization(model)
    clips = _nodes(model, "Clip")
    assert clips and set(clips) <= set(plan.fused_activations)
    assert set(_nodes(model, "Conv")) <= set(plan.int8_nodes)


def test_clip_with_one_element_bounds_does_not_crash_planning():
    model = _folded("mobilenetv2_block")
    plan = qdq.plan_quantization(model)
    assert set(_nodes(model, "Clip")) <= set(plan.fused_activations)


def test_sigmoid_gets_its_fixed_range_and_is_int8():
    model = _folded("se_gemm")
    plan = qdq.plan_quantization(model)
    sigmoid = _nodes(model, "Sigmoid")[0]
    assert sigmoid in plan.int8_nodes
    assert plan.fixed_ranges["sigmoid1"] == (0.0, 1.0)


def test_division_by_a_constant_after_an_int8_add_is_absorbed_into_the_scale():
    proto = _add_div_model()
    model = _folded(proto)
    plan = qdq.plan_quantization(model)
    assert plan.int8_nodes == ["conv1", "conv2", "add", "conv3"]
    assert plan.absorbed == {"div": ("a", "d", 4.0)}
    assert "a" not in plan.quantized and "d" in plan.quantized
    feeds = [{"input": np.random.default_rng(s).standard_normal((1, 3, 8, 8)).astype(np.float32)} for s in range(4)]
    params = _params(plan, _observed_ranges(model, plan.quantized, feeds), "uint8")
    qdq.emit_qdq(model, plan, params)
    emitted = model.to_proto()
    onnx.checker.check_model(emitted, full_check=True)
    assert "Div" not in [n.op_type for n in emitted.graph.node]
    kernels = qdq.fusion_report(emitted, plan).int8_kernels
    assert kernels.get("QLinearConv") == 3 and kernels.get("QLinearAdd") == 1
    reference, candidate = runtime.make_session(proto), runtime.make_session(emitted)
    for feed in feeds:
        assert _cosine(runtime.run(reference, feed)[0], runtime.run(candidate, feed)[0]) > 0.99


# ---------------------------------------------------------------------- concat ties
def _concat_plan():
    plan = qdq.QuantPlan(quantized=["a", "b", "out"], concats={"out": ["a", "b"]})
    return plan


def test_tie_concats_ties_inputs_with_similar_ranges():
    plan = _concat_plan()
    tied = plan.tie_concats({"a": (0.0, 5.0), "b": (0.0, 6.0), "out": (0.0, 6.0)})
    assert tied == 1
    assert plan.root("a") == plan.root("b") == plan.root("out")
    assert len(plan.classes()) == 1


def test_tie_concats_leaves_a_narrow_input_its_own_scale():
    plan = _concat_plan()
    tied = plan.tie_concats({"a": (-50.0, 300.0), "b": (0.0, 1.0), "out": (-50.0, 300.0)})
    assert tied == 0
    assert plan.root("b") != plan.root("out")
    assert len(plan.classes()) == 3


def test_squeezenet_concats_are_planned_for_tying():
    model = _folded("squeezenet_fire")
    plan = qdq.plan_quantization(model)
    assert plan.concats == {"concat1": ["relu3", "relu4"], "concat2": ["relu6", "relu7"]}
    assert {"concat1", "concat2"} <= set(plan.int8_nodes)


# ---------------------------------------------------------------------- parameters
@pytest.mark.parametrize("lo, hi", [(-1.0, 3.0), (-5.0, -1.0), (2.0, 7.0), (-0.001, 100.0), (0.0, 0.0), (-3.0, 3.0)])
def test_uint8_params_zero_point_in_range_and_zero_exact(lo, hi):
    p = qdq.params_from_range(lo, hi, "uint8")
    assert p.dtype == "uint8" and p.np_dtype == np.uint8
    assert 0 <= p.zero_point <= 255
    assert p.scale > 0
    assert p.lo <= 0.0 <= p.hi  # the range always contains zero
    # the ends of the range are reachable within half a step (q=0 and q=255 dequantize near lo and hi)
    assert abs((0 - p.zero_point) * p.scale - p.lo) <= p.scale * 0.5 + 1e-6
    assert abs((255 - p.zero_point) * p.scale - p.hi) <= p.scale * 0.5 + 1e-6


def test_uint8_relu_range_has_zero_point_zero():
    p = qdq.params_from_range(0.0, 6.0, "uint8")
    assert p.zero_point == 0
    assert p.scale == pytest.approx(6.0 / 255.0)


def test_int8_symmetric_params_have_zero_point_zero():
    p = qdq.params_from_range(-2.0, 5.0, "int8")
    assert p.dtype == "int8" and p.np_dtype == np.int8
    assert p.zero_point == 0
    assert p.scale == pytest.approx(5.0 / 127.0)


def test_int8_relu_range_stays_symmetric_for_tensorrt():
    p = qdq.params_from_range(0.0, 6.0, "int8")
    assert p.zero_point == 0
    assert p.scale == pytest.approx(6.0 / 127.0)


def test_infinite_range_is_refused():
    with pytest.raises(ValueError, match="not finite"):
        qdq.params_from_range(0.0, np.inf, "uint8")


# ---------------------------------------------------------------------- weights
@pytest.mark.parametrize("shape, axis", [((8, 3, 3, 3), 0), ((16, 10), 1), ((10, 16), 0)])
def test_per_channel_weights_reconstruct_within_half_a_step(shape, axis):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3.0, size=shape[axis]).reshape(
        [-1 if i == axis else 1 for i in range(len(shape))]
    ).astype(np.float32)
    q, scale = qdq.quantize_weight(w, axis)
    assert q.dtype == np.int8 and q.shape == w.shape
    assert scale.shape == (shape[axis],) and np.all(scale > 0)
    assert q.min() >= -127 and q.max() <= 127
    broadcast = scale.reshape([-1 if i == axis else 1 for i in range(len(shape))])
    error = np.abs(q.astype(np.float32) * broadcast - w)
    per_channel = np.moveaxis(error, axis, 0).reshape(shape[axis], -1).max(axis=1)
    assert np.all(per_channel <= scale / 2 + 1e-7)
    # each channel uses its full range: the largest |w| maps to 127
    assert np.all(np.moveaxis(np.abs(q), axis, 0).reshape(shape[axis], -1).max(axis=1) == 127)


def test_per_tensor_weight_has_one_scale():
    w = np.random.default_rng(2).standard_normal((4, 3, 3, 3)).astype(np.float32)
    q, scale = qdq.quantize_weight(w, None)
    assert np.ndim(scale) == 0
    assert q.min() >= -127 and q.max() <= 127
    assert np.abs(q.astype(np.float32) * scale - w).max() <= float(scale) / 2 + 1e-7


def _same_sign_pair_max(q: np.ndarray) -> int:
    """The largest |sum| of two same-sign entries in each row, over all rows."""
    worst = 0
    for row in q.reshape(q.shape[0], -1).astype(np.int64):
        for part in (np.sort(row[row > 0])[::-1], np.sort(-row[row < 0])[::-1]):
            if len(part) >= 2:
                worst = max(worst, int(part[0] + part[1]))
    return worst


def test_pair_safe_weights_never_pair_past_128_and_keep_at_least_7_bits():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 8, 3, 3)).astype(np.float32)
    w[::4, 0, 0, 0] = 30.0  # channels with one dominant weight can keep more levels
    q, scale = qdq.quantize_weight(w, 0, pairs="any")
    assert _same_sign_pair_max(q) <= qdq.PAIR_LIMIT
    full, full_scale = qdq.quantize_weight(w, 0)
    assert _same_sign_pair_max(full) > qdq.PAIR_LIMIT  # what full-range weights would risk
    levels = np.abs(q).reshape(64, -1).max(axis=1)
    assert levels.min() >= 63 and levels[::4].min() > 100  # dominant weights: near 8 bits
    error = np.abs(q.astype(np.float32) * scale.reshape(-1, 1, 1, 1) - w).reshape(64, -1).max(axis=1)
    assert np.all(error <= scale / 2 + 1e-6)
    assert np.all(scale <= 2 * full_scale + 1e-9)  # never coarser than 7 bits


def test_pair_safe_levels_pick_the_largest_safe_bound():
    rows = np.array([[1.0, 1.0, 0.1], [1.0, 0.01, -0.01], [1.0, -1.0, 0.5]], np.float32)
    levels = qdq.pair_safe_levels(rows)
    assert levels[0] == 64  # 64 + 64 = 128
    assert levels[1] == 127  # nothing pairs with the dominant weight
    assert levels[2] == 85  # 85 + round(42.5) = 127; 86 + 43 = 129 is one too many
    per_tensor, _ = qdq.quantize_weight(rows, None, pairs="any")
    assert _same_sign_pair_max(per_tensor.reshape(1, -1)) <= qdq.PAIR_LIMIT


def test_unknown_weight_pairing_is_refused():
    with pytest.raises(ValueError, match="weight pairing"):
        qdq.quantize_weight(np.ones((2, 2), np.float32), 0, pairs="every")


def _neighbour_pair_max(q: np.ndarray) -> int:
    """The largest |sum| of same-sign entries 2i, 2i+1 of each output channel read in
    (kernel position, input channel) order, over both odd-channel layouts."""
    by_position = np.moveaxis(q.astype(np.int64), 1, -1)
    layouts = [by_position.reshape(q.shape[0], -1)]
    if q.shape[1] % 2:
        pad = np.zeros(by_position.shape[:-1] + (1,), np.int64)
        layouts.append(np.concatenate([by_position, pad], axis=-1).reshape(q.shape[0], -1))
    worst = 0
    for flat in layouts:
        flat = np.concatenate([flat, np.zeros((flat.shape[0], flat.shape[1] % 2), np.int64)], axis=1)
        a, b = flat[:, 0::2], flat[:, 1::2]
        worst = max(worst, int(np.where(np.sign(a) == np.sign(b), np.abs(a + b), 0).max()))
    return worst


@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (32, 3, 3, 3), (32, 64, 1, 1), (8, 5, 3)])
def test_adjacent_pairs_keep_more_levels_than_any_pairs_and_stay_under_128(shape):
    w = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    adjacent, adjacent_scale = qdq.quantize_weight(w, 0, pairs="adjacent")
    anywhere, anywhere_scale = qdq.quantize_weight(w, 0, pairs="any")
    assert _neighbour_pair_max(adjacent) <= qdq.PAIR_LIMIT
    assert np.all(adjacent_scale <= anywhere_scale)  # never coarser
    levels = np.abs(adjacent).reshape(shape[0], -1).max(axis=1)
    assert levels.min() >= 63 and levels.mean() > np.abs(anywhere).reshape(shape[0], -1).max(axis=1).mean() + 5


def test_adjacent_pairs_fall_back_to_any_pairs_off_the_conv_layout():
    w = np.random.default_rng(5).standard_normal((16, 10)).astype(np.float32)
    for axis in (0, 1):
        assert np.array_equal(qdq.quantize_weight(w, axis, pairs="adjacent")[0], qdq.quantize_weight(w, axis, pairs="any")[0])


def test_depthwise_means_one_input_and_one_output_channel_per_group():
    dw = gs.Node("Conv", attrs={"group": 8}, inputs=[gs.Variable("x"), gs.Constant("w", np.zeros((8, 1, 3, 3), np.float32))])
    multiplier = gs.Node("Conv", attrs={"group": 8}, inputs=[gs.Variable("x"), gs.Constant("w", np.zeros((16, 1, 3, 3), np.float32))])
    grouped = gs.Node("Conv", attrs={"group": 2}, inputs=[gs.Variable("x"), gs.Constant("w", np.zeros((8, 4, 3, 3), np.float32))])
    dense = gs.Node("Conv", inputs=[gs.Variable("x"), gs.Constant("w", np.zeros((8, 8, 3, 3), np.float32))])
    assert [qdq.is_depthwise_conv(n) for n in (dw, multiplier, grouped, dense)] == [True, False, False, False]


def test_zero_weight_channel_does_not_divide_by_zero():
    w = np.zeros((2, 3), np.float32)
    w[1] = [0.5, -1.0, 0.25]
    q, scale = qdq.quantize_weight(w, 0)
    assert np.all(np.isfinite(scale)) and np.all(q[0] == 0)


def test_weight_axis_is_the_output_channel_axis():
    model = _folded("flatten_gemm")
    nodes = {n.name: n for n in model.graph.nodes}
    assert qdq.weight_axis(nodes["conv1"], True) == 0
    gemm = nodes["fc1"]
    assert qdq.weight_axis(gemm, True) == (0 if gemm.attrs.get("transB", 0) else 1)
    assert qdq.weight_axis(nodes["conv1"], False) is None


# ---------------------------------------------------------------------- emission
@pytest.mark.parametrize("name", ["conv_chain", "resnet_basic_block", "squeezenet_fire", "detection_head"])
def test_emitted_model_is_valid_and_close_to_float(name):
    float_proto, model, plan, feeds = _quantize(name)
    proto = model.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    assert runtime.default_opset(proto) >= 13
    assert proto.ir_version <= runtime.max_ir_version()
    assert [o.name for o in proto.graph.output] == [o.name for o in float_proto.graph.output]
    reference, candidate = runtime.make_session(float_proto), runtime.make_session(proto)
    for feed in feeds[:4]:
        for a, b in zip(runtime.run(reference, feed), runtime.run(candidate, feed)):
            assert a.shape == b.shape
            assert _cosine(a, b) > 0.99


def test_emitted_weights_are_int8_with_per_channel_scales():
    _, model, plan, _ = _quantize("conv_chain")
    proto = model.to_proto()
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    assert len(weight_dq) == 3
    for node in weight_dq:
        assert inits[node.input[0]].dtype == np.int8
        assert inits[node.input[1]].ndim == 1  # one scale per output channel
        assert np.all(inits[node.input[2]] == 0)
    bias_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("bias_quantized")]
    assert bias_dq and all(inits[n.input[0]].dtype == np.int32 for n in bias_dq)


def test_emitted_per_tensor_weights_have_scalar_scales():
    _, model, _, _ = _quantize("conv_chain", per_channel=False)
    proto = model.to_proto()
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    assert weight_dq and all(inits[n.input[1]].ndim == 0 for n in weight_dq)


# ---------------------------------------------------------------------- fusion report
@pytest.mark.parametrize("name, convs", [("conv_chain", 3), ("resnet_basic_block", 6)])
def test_fusion_report_sees_qlinearconv_and_nothing_unfused(name, convs):
    _, model, plan, _ = _quantize(name)
    report = qdq.fusion_report(model.to_proto(), plan)
    assert report.int8_kernels.get("QLinearConv") == convs
    assert report.unfused == []
    assert "Conv" not in report.float_ops and "FusedConv" not in report.float_ops
    assert set(report.to_dict()) == {"int8_kernels", "float_ops", "leftover_quantize", "leftover_dequantize", "unfused"}


def test_fusion_report_on_resnet_block_has_int8_adds_and_gemm():
    _, model, plan, _ = _quantize("resnet_basic_block")
    report = qdq.fusion_report(model.to_proto(), plan)
    assert report.int8_kernels.get("QLinearAdd") == 2
    assert report.int8_kernels.get("QGemm") == 1


def test_fusion_report_lists_planned_ops_that_run_float():
    # The plan says int8, but the model handed over is the float one: nothing can fuse.
    model = _folded("resnet_basic_block")
    plan = qdq.plan_quantization(model)
    report = qdq.fusion_report(model.to_proto(), plan)
    assert report.int8_kernels == {}
    assert report.leftover_quantize == report.leftover_dequantize == 0
    for entry in ("add1 (Add)", "add2 (Add)", "conv6 (Conv)", "fc1 (Gemm)"):
        assert entry in report.unfused


def test_fusion_report_counts_a_float_fusedconv_as_unfused():
    model = _folded("conv_chain")
    plan = qdq.plan_quantization(model, act_type="int8")
    # symmetric int8 (zero point 0) on the Relu outputs: onnxruntime cannot drop the Relu
    qdq.emit_qdq(model, plan, {t: qdq.params_from_range(-4.0, 4.0, "int8") for t in plan.quantized})
    report = qdq.fusion_report(model.to_proto(), plan)
    assert report.int8_kernels.get("QLinearConv", 0) < 3  # the premise: the convs did not fuse
    missing = 3 - report.int8_kernels.get("QLinearConv", 0)
    assert f"{missing} of 3 planned int8 Conv ran in float" in report.unfused


def test_int8_activations_are_symmetric_and_the_report_says_what_onnxruntime_left_float():
    _, model, plan, _ = _quantize("conv_chain", act_type="int8")
    proto = model.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    zero_points = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.endswith("_zero_point")
                   and not i.name.endswith(("weight_zero_point", "bias_zero_point"))]
    assert zero_points and all(z.dtype == np.int8 and int(z) == 0 for z in zero_points)
    report = qdq.fusion_report(proto, plan)
    # onnxruntime cannot drop a Relu before a zero-point-0 quantize, so those convs stay float
    # (TensorRT fuses them itself); the report must not hide it.
    fused = report.int8_kernels.get("QLinearConv", 0)
    assert fused == 3 or f"{3 - fused} of 3 planned int8 Conv ran in float" in report.unfused


# ---------------------------------------------------------------------- output layers, detection
@pytest.mark.parametrize("name, expected", [("conv_chain", ["conv3"]), ("resnet_basic_block", ["fc1"]),
                                            ("squeezenet_fire", ["conv8"]), ("flatten_gemm", ["fc2"])])
def test_output_layers_finds_the_final_compute_layer(name, expected):
    assert qdq.output_layers(_folded(name)) == expected


def test_output_layers_of_a_detector_are_all_head_convs():
    assert sorted(qdq.output_layers(_folded("detection_head"))) == ["conv3", "conv4", "conv5", "conv6"]


def test_output_layers_max_share_drops_expensive_layers():
    # resnet_basic_block's fc1 is ~0.03% of the MACs, squeezenet_fire's classifier conv ~7.6%.
    assert qdq.output_layers(_folded("resnet_basic_block"), max_share=0.05) == ["fc1"]
    assert qdq.output_layers(_folded("squeezenet_fire"), max_share=0.05) == []
    assert qdq.output_layers(_folded("squeezenet_fire"), max_share=0.5) == ["conv8"]
    assert qdq.output_layers(_folded("resnet_basic_block"), max_share=0.0) == []


def test_output_layers_max_share_keeps_the_cheapest_that_fit():
    model = _folded("detection_head")
    everything = qdq.output_layers(model)
    chosen = qdq.output_layers(model, max_share=0.2)
    assert set(chosen) < set(everything)
    assert qdq.output_layers(model, max_share=1.0) and set(qdq.output_layers(model, max_share=1.0)) == set(everything)


def test_is_quantized_model_tells_float_from_emitted():
    float_proto, model, _, _ = _quantize("conv_chain")
    assert qdq.is_quantized_model(Model.from_proto(float_proto)) is None
    assert qdq.is_quantized_model(model) in ("QuantizeLinear", "DequantizeLinear")
    assert qdq.is_quantized_model(Model.from_proto(model.to_proto()))


def test_a_layer_kept_float_between_int8_layers_stays_float_in_onnxruntime():
    # onnxruntime would quantize a float Conv between DequantizeLinear and QuantizeLinear by
    # itself; the emitted guard must stop that, and the outputs must not change.
    model = _folded("conv_chain")
    convs = _nodes(model, "Conv")
    middle = convs[1]
    plan = qdq.plan_quantization(model, keep_float={middle: "test"})
    assert middle not in plan.int8_nodes
    source = test_models.build("conv_chain")
    feeds = [test_models.sample_inputs(source, seed=s) for s in range(4)]
    reference = runtime.make_session(model.to_proto())
    qdq.emit_qdq(model, plan, _params(plan, _observed_ranges(model, plan.quantized, feeds), "uint8"))
    optimized = qdq.optimized_graph(model.to_proto())
    ops = {n.name: n.op_type for n in optimized.graph.node}
    assert ops.get(middle) in ("Conv", "FusedConv")
    assert sum(op == "QLinearConv" for op in ops.values()) == len(convs) - 1
    candidate = runtime.make_session(model.to_proto())
    for feed in feeds:
        assert _cosine(reference.run(None, feed)[0], candidate.run(None, feed)[0]) > 0.99
