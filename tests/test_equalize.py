"""Cross-layer equalization: fp32 outputs stay equal, ranges get balanced, unsafe pairs skipped."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_cv import runtime
from onnxslim_cv.equalize import equalize_cross_layer, find_pairs
from onnxslim_cv.ir import Model
from onnxslim_cv.pipeline import run_passes
from onnxslim_cv.testing import models

RTOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Model building
# ---------------------------------------------------------------------------------------------


class Builder:
    """Small onnx.helper graph builder with seeded weights."""

    def __init__(self, in_channels: int = 3, size: int = 8, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, in_channels, size, size])
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def init(self, name: str, values: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.float32), name))
        return name

    def conv(
        self, x: str, weight: np.ndarray, bias: Optional[np.ndarray] = None, group: int = 1, name: str = ""
    ) -> str:
        name = name or self.name("conv")
        inputs = [x, self.init(f"{name}.w", weight)]
        if bias is not None:
            inputs.append(self.init(f"{name}.b", bias))
        pad = weight.shape[-1] // 2
        self.nodes.append(helper.make_node("Conv", inputs, [name], name=name, group=group, pads=[pad] * 4))
        return name

    def op(self, op: str, inputs: Sequence[str], **attrs) -> str:
        name = self.name(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    def weights(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(np.float32) * 0.3

    def finish(self, *outputs: str) -> onnx.ModelProto:
        values = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "cle", [self.input], values, self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        proto.ir_version = 8
        return proto


def unbalance(w1: np.ndarray, b1: Optional[np.ndarray], w2: np.ndarray, depthwise_second: bool = False):
    """Blow some output channels of layer 1 up / down and undo it in layer 2 (same function)."""
    factors = np.ones(w1.shape[0], dtype=np.float32)
    factors[[0, 3]] = 100.0
    factors[5] = 0.01
    w1 = w1 * factors.reshape(-1, *([1] * (w1.ndim - 1)))
    b1 = None if b1 is None else b1 * factors
    if depthwise_second:
        w2 = w2 / factors.reshape(-1, *([1] * (w2.ndim - 1)))
    else:
        w2 = w2 / factors.reshape(1, -1, *([1] * (w2.ndim - 2)))
    return w1, b1, w2


def conv_act_conv(act: Optional[str] = "Relu", bias: bool = True, seed: int = 0) -> onnx.ModelProto:
    g = Builder(seed=seed)
    w1, b1, w2 = unbalance(g.weights(8, 3, 3, 3), g.weights(8) if bias else None, g.weights(6, 8, 3, 3))
    y = g.conv("x", w1, b1, name="conv1")
    if act == "Relu":
        y = g.op("Relu", [y])
    elif act == "LeakyRelu":
        y = g.op("LeakyRelu", [y], alpha=0.1)
    elif act == "PRelu":
        y = g.op("PRelu", [y, g.init("slope", np.linspace(0.05, 0.3, 8, dtype=np.float32).reshape(8, 1, 1))])
    elif act == "MaxPool":
        y = g.op("MaxPool", [g.op("Relu", [y])], kernel_shape=[2, 2], strides=[2, 2])
    elif act == "Clip6":
        y = g.op("Clip", [y, g.init("lo", np.array(0.0)), g.init("hi", np.array(6.0))])
    y = g.conv(y, w2, g.weights(6), name="conv2")
    return g.finish(y)


def mobilenet_block() -> onnx.ModelProto:
    """1x1 expand -> Relu -> 3x3 depthwise -> Relu -> 1x1 project, unbalanced at both joints."""
    g = Builder(seed=1)
    w1, b1, wd = unbalance(g.weights(8, 3, 1, 1), g.weights(8), g.weights(8, 1, 3, 3), depthwise_second=True)
    bd = g.weights(8)
    # unbalance the depthwise -> project joint differently
    factors = np.geomspace(0.02, 50.0, 8).astype(np.float32)[::-1].copy()
    wd, bd = wd * factors.reshape(8, 1, 1, 1), bd * factors
    w3 = g.weights(4, 8, 1, 1) / factors.reshape(1, 8, 1, 1)
    y = g.op("Relu", [g.conv("x", w1, b1, name="expand")])
    y = g.op("Relu", [g.conv(y, wd, bd, group=8, name="dw")])
    return g.finish(g.conv(y, w3, g.weights(4), name="project"))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def feeds_for(proto: onnx.ModelProto) -> Dict[str, np.ndarray]:
    return models.sample_inputs(proto, batch=2, seed=3)


def run(proto: onnx.ModelProto, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
    return runtime.run(runtime.make_session(proto), feeds)


def assert_same_outputs(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    feeds = feeds_for(reference)
    for ref, got in zip(run(reference, feeds), run(candidate, feeds)):
        scale = max(float(np.abs(ref).max()), 1e-12)
        error = float(np.abs(ref.astype(np.float64) - got).max()) / scale
        assert error < RTOL, f"relative error {error:.2e}"


def weights_of(model: Model) -> Dict[str, np.ndarray]:
    return {name: np.array(t.values) for name, t in model.tensors().items() if hasattr(t, "values")}


def conv_weight(model: Model, node_name: str) -> np.ndarray:
    node = next(n for n in model.graph.nodes if n.name == node_name)
    return np.asarray(node.inputs[1].values)


def out_range_spread(weight: np.ndarray) -> float:
    ranges = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1)
    return float(ranges.max() / ranges.min())


def equalize(proto: onnx.ModelProto, **kwargs):
    model = Model.from_proto(proto)
    report = equalize_cross_layer(model, **kwargs)
    return model, report


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_conv_relu_conv_balances_ranges_and_keeps_outputs():
    proto = conv_act_conv("Relu")
    model, report = equalize(proto)
    assert [(p.first, p.second, p.activation, p.channels) for p in report.pairs] == [("conv1", "conv2", "Relu", 8)]
    spread_before = out_range_spread(numpy_helper.to_array(proto.graph.initializer[0]))
    spread_after = out_range_spread(conv_weight(model, "conv1"))
    assert spread_before > 5e3 and spread_after < 20
    pair = report.pairs[0]
    assert pair.range_ratio_before == pytest.approx(spread_before, rel=1e-5)
    assert pair.range_ratio_after == pytest.approx(spread_after, rel=1e-5)
    # both layers now share each channel's range: r1_i == r2_i
    w1, w2 = conv_weight(model, "conv1"), conv_weight(model, "conv2")
    r1 = np.abs(w1).reshape(8, -1).max(axis=1)
    r2 = np.abs(np.moveaxis(w2, 1, 0)).reshape(8, -1).max(axis=1)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)
    assert report.converged and report.iterations == 1
    assert_same_outputs(proto, model.to_proto())


def test_mobilenet_chain_iterates_and_keeps_outputs():
    proto = mobilenet_block()
    model, report = equalize(proto, iterations=50)
    assert [(p.first, p.second) for p in report.pairs] == [("expand", "dw"), ("dw", "project")]
    assert report.iterations > 1 and report.converged
    for pair in report.pairs:
        assert pair.range_ratio_after < pair.range_ratio_before / 10
    # converged: every joint is balanced, so the depthwise ranges match both neighbours
    expand, dw, project = (conv_weight(model, n) for n in ("expand", "dw", "project"))
    r_expand = np.abs(expand).reshape(8, -1).max(axis=1)
    r_dw = np.abs(dw).reshape(8, -1).max(axis=1)
    r_project = np.abs(np.moveaxis(project, 1, 0)).reshape(8, -1).max(axis=1)
    np.testing.assert_allclose(r_expand, r_dw, rtol=5e-3)
    np.testing.assert_allclose(r_dw, r_project, rtol=5e-3)
    assert_same_outputs(proto, model.to_proto())


def test_iteration_budget_is_respected():
    _, report = equalize(mobilenet_block(), iterations=2)
    assert report.iterations == 2 and not report.converged


def test_relu6_clip_is_skipped_and_weights_untouched():
    proto = conv_act_conv("Clip6")
    model, report = equalize(proto)
    before = weights_of(Model.from_proto(proto))
    assert report.pairs == []
    assert "Clip(0,6)" in report.skipped["conv1"]
    for name, values in weights_of(model).items():
        np.testing.assert_array_equal(values, before[name])


def test_clip_with_zero_and_no_max_acts_as_relu():
    g = Builder()
    y = g.conv("x", g.weights(4, 3, 3, 3), g.weights(4), name="a")
    y = g.op("Clip", [y, g.init("lo", np.array(0.0))])
    proto = g.finish(g.conv(y, g.weights(2, 4, 3, 3), name="b"))
    model, report = equalize(proto)
    assert [p.activation for p in report.pairs] == ["Clip(0,inf)"]
    assert_same_outputs(proto, model.to_proto())


def test_tensor_with_two_readers_is_skipped():
    g = Builder()
    y = g.conv("x", g.weights(4, 3, 3, 3), g.weights(4), name="trunk")
    left = g.conv(y, g.weights(2, 4, 3, 3), name="left")
    right = g.conv(y, g.weights(2, 4, 3, 3), name="right")
    proto = g.finish(left, right)
    model, report = equalize(proto)
    assert report.pairs == []
    assert report.skipped["trunk"] == "output has 2 readers"
    np.testing.assert_array_equal(conv_weight(model, "trunk"), conv_weight(Model.from_proto(proto), "trunk"))


def test_graph_output_between_is_skipped():
    g = Builder()
    y = g.op("Relu", [g.conv("x", g.weights(4, 3, 3, 3), g.weights(4), name="first")])
    proto = g.finish(g.conv(y, g.weights(2, 4, 3, 3), name="second"), y)
    _, report = equalize(proto)
    assert report.pairs == []
    assert "graph output" in report.skipped["first"]


@pytest.mark.parametrize("act", ["LeakyRelu", "PRelu", "MaxPool", None])
def test_other_homogeneous_activations_keep_outputs(act):
    proto = conv_act_conv(act)
    model, report = equalize(proto)
    assert [p.activation for p in report.pairs] == ["Relu+MaxPool" if act == "MaxPool" else act]
    assert report.pairs[0].range_ratio_after < report.pairs[0].range_ratio_before / 100
    assert_same_outputs(proto, model.to_proto())


def test_first_conv_without_bias():
    proto = conv_act_conv("Relu", bias=False)
    model, report = equalize(proto)
    assert len(report.pairs) == 1
    first = next(n for n in model.graph.nodes if n.name == "conv1")
    assert len(first.inputs) == 2  # a missing bias is zero and stays zero: nothing to add
    assert_same_outputs(proto, model.to_proto())


def test_grouped_second_conv_is_skipped():
    g = Builder()
    y = g.op("Relu", [g.conv("x", g.weights(4, 3, 3, 3), name="first")])
    proto = g.finish(g.conv(y, g.weights(4, 2, 3, 3), group=2, name="grouped"))
    _, report = equalize(proto)
    assert report.pairs == []
    assert "grouped" in report.skipped["first"] and "grouped" in report.skipped["grouped"]


@pytest.mark.parametrize("trans_b, pool", [(1, True), (0, False)])
def test_flatten_gemm_second_layer(trans_b, pool):
    g = Builder(size=4)
    w1, b1, _ = unbalance(g.weights(8, 3, 3, 3), g.weights(8), g.weights(1, 8, 1, 1))
    y = g.op("Relu", [g.conv("x", w1, b1, name="conv")])
    if pool:
        y = g.op("GlobalAveragePool", [y])
    y = g.op("Flatten", [y], axis=1)
    features = 8 if pool else 8 * 16
    b = g.weights(5, features) if trans_b else g.weights(features, 5)
    y = g.op("Gemm", [y, g.init("fc.w", b), g.init("fc.b", g.weights(5))], transB=trans_b)
    proto = g.finish(y)
    model, report = equalize(proto)
    (pair,) = report.pairs
    assert pair.second.startswith("gemm") and pair.range_ratio_after < pair.range_ratio_before / 10
    assert_same_outputs(proto, model.to_proto())


def test_original_model_weights_unchanged_copy_safety():
    original = Model.from_proto(mobilenet_block())
    before = weights_of(original)
    work = original.copy()
    report = equalize_cross_layer(work)
    assert len(report.pairs) == 2
    for name, values in weights_of(original).items():
        np.testing.assert_array_equal(values, before[name])
    assert any(not np.array_equal(v, before[n]) for n, v in weights_of(work).items())


def test_invalid_arguments():
    model = Model.from_proto(conv_act_conv())
    with pytest.raises(ValueError):
        equalize_cross_layer(model, iterations=0)
    with pytest.raises(ValueError):
        equalize_cross_layer(model, tolerance=0.0)


def test_builder_models_after_fold():
    # conv_chain: Conv-BN-Relu x3 -> two Relu pairs once BN is folded
    chain = models.build("conv_chain")
    folded, _ = run_passes(Model.from_proto(chain), ["fold"])
    report = equalize_cross_layer(folded)
    assert len(report.pairs) == 2 and all(p.activation == "Relu" for p in report.pairs)
    assert_same_outputs(chain, folded.to_proto())

    # MobileNetV2: every joint has ReLU6 (Clip) or a residual / output, so nothing is paired
    mobilenet = models.build("mobilenetv2_block")
    folded, _ = run_passes(Model.from_proto(mobilenet), ["fold"])
    pairs, skipped = find_pairs(folded)
    report = equalize_cross_layer(folded)
    assert report.pairs == [] and pairs == []
    assert sum("Clip(0,6)" in reason for reason in skipped.values()) == 5
    assert_same_outputs(mobilenet, folded.to_proto())
