"""Tests for the synthetic CV test models in ``onnxslim_cv.testing.models``."""

from __future__ import annotations

import functools
import inspect
import time
from collections import Counter
from typing import Dict, List

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxslim_cv.testing import models as M

NAMES = list(M.BUILDERS)
ALL_OPSETS = list(range(M.MIN_OPSET, M.MAX_OPSET + 1))

# Performance-test models: checked at one opset and a reduced image size only (building one takes
# a few hundred milliseconds, whatever the image size).
HEAVY_KWARGS: Dict[str, dict] = {"resnet50": {"image_size": 64}}
LIGHT_NAMES = [n for n in NAMES if n not in HEAVY_KWARGS]

# Outputs squashed into [0, 1]: they only need to vary, not to have a large spread.
BOUNDED_OUTPUTS = {"probs", "mask", "scores"}

# Exact op counts at default arguments and opset 13 (HardSwish decomposed).
EXPECTED_OPS: Dict[str, Dict[str, int]] = {
    "conv_chain": {"Conv": 3, "BatchNormalization": 3, "Relu": 3},
    "resnet_basic_block": {
        "Conv": 6, "BatchNormalization": 6, "Relu": 5, "Add": 2,
        "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1,
    },
    "resnet_bottleneck_block": {
        "Conv": 5, "BatchNormalization": 5, "Relu": 4, "Add": 1,
        "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1,
    },
    "mobilenetv2_block": {"Conv": 7, "BatchNormalization": 7, "Clip": 5, "Add": 1},
    "mobilenetv3_block": {
        "Conv": 6, "BatchNormalization": 4, "HardSigmoid": 4, "Mul": 4,
        "GlobalAveragePool": 1, "Relu": 1, "Add": 1,
    },
    "squeezenet_fire": {
        "Conv": 8, "Relu": 8, "MaxPool": 1, "Concat": 2,
        "GlobalAveragePool": 1, "Flatten": 1, "Softmax": 1,
    },
    "group_conv": {"Conv": 3, "BatchNormalization": 3, "Relu": 2},
    "flatten_gemm": {"Conv": 1, "BatchNormalization": 1, "Relu": 2, "Flatten": 1, "Gemm": 2},
    "reshape_matmul": {"Conv": 1, "BatchNormalization": 1, "Relu": 1, "Reshape": 1, "MatMul": 1, "Add": 1},
    "channels_last_flatten": {
        "Conv": 1, "BatchNormalization": 1, "Relu": 1, "Transpose": 1, "Reshape": 1, "MatMul": 1, "Add": 1,
    },
    "unet_like": {
        "Conv": 4, "BatchNormalization": 3, "Relu": 3, "MaxPool": 1,
        "Resize": 1, "Concat": 1, "Sigmoid": 1,
    },
    "conv_transpose": {"Conv": 2, "ConvTranspose": 1, "BatchNormalization": 2, "Relu": 2},
    "detection_head": {
        "Conv": 6, "BatchNormalization": 2, "Relu": 2, "Sigmoid": 2,
        "Transpose": 4, "Reshape": 4, "Concat": 2,
    },
    "split_concat": {"Conv": 4, "BatchNormalization": 3, "Relu": 3, "Split": 1, "Concat": 1, "Slice": 1},
    "depth_to_space": {"Conv": 3, "BatchNormalization": 2, "Relu": 2, "DepthToSpace": 1, "SpaceToDepth": 1},
    "channel_shuffle": {"Conv": 2, "BatchNormalization": 1, "Relu": 1, "Reshape": 2, "Transpose": 1},
    "shufflenet_v2": {
        "Conv": 9, "BatchNormalization": 8, "Relu": 6, "Concat": 3, "Reshape": 4, "Transpose": 2, "Gather": 4,
    },
    "se_gemm": {
        "Conv": 2, "BatchNormalization": 1, "Relu": 2, "GlobalAveragePool": 1, "Flatten": 1,
        "Gemm": 2, "Sigmoid": 1, "Reshape": 1, "Mul": 1,
    },
    "norm_zoo": {  # LayerNormalization decomposed below opset 17
        "Conv": 5, "InstanceNormalization": 1, "PRelu": 1, "LeakyRelu": 1, "Pad": 1, "Clip": 1,
        "AveragePool": 1, "Resize": 1, "Transpose": 2, "MaxPool": 1,
        "ReduceMean": 2, "Sub": 1, "Pow": 1, "Add": 2, "Sqrt": 1, "Div": 1, "Mul": 1,
    },
    "group_norm": {  # GroupNormalization decomposed below opset 21
        "Conv": 2, "Reshape": 2, "InstanceNormalization": 1, "Mul": 1, "Add": 1, "Relu": 1,
    },
    "matmul_classifier": {"Conv": 1, "BatchNormalization": 1, "Relu": 2, "Reshape": 1, "MatMul": 2, "Add": 1},
    "resnet50": {
        "Conv": 53, "BatchNormalization": 53, "Relu": 49, "Add": 16, "MaxPool": 1,
        "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1,
    },
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def build(name: str, **kwargs) -> onnx.ModelProto:
    """``M.build`` with the heavy models shrunk to :data:`HEAVY_KWARGS` (unless overridden)."""
    return M.build(name, **{**HEAVY_KWARGS.get(name, {}), **kwargs})


@functools.lru_cache(maxsize=None)
def _shared(name: str, items: tuple) -> onnx.ModelProto:
    return build(name, **dict(items))


def shared(name: str, **kwargs) -> onnx.ModelProto:
    """Like :func:`build` but cached, so the heavy models are built once: do not modify the result."""
    bound = inspect.signature(M.BUILDERS[name]).bind(**{**HEAVY_KWARGS.get(name, {}), **kwargs})
    bound.apply_defaults()
    return _shared(name, tuple(sorted(bound.kwargs.items())))


def session_for(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Outputs by name; ``model`` is a ModelProto or an InferenceSession to reuse."""
    session = model if isinstance(model, ort.InferenceSession) else session_for(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def initializers(model: onnx.ModelProto) -> Dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def nodes_of(model: onnx.ModelProto, op_type: str) -> List[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def producers(model: onnx.ModelProto) -> Dict[str, onnx.NodeProto]:
    return {out: n for n in model.graph.node for out in n.output}


def declared_shape(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def with_all_intermediates_as_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    extended.graph.output.extend(inferred.graph.value_info)
    return extended


# ---------------------------------------------------------------------------------------------
# every builder: valid, runnable, healthy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, opset", [(n, o) for n in LIGHT_NAMES for o in ALL_OPSETS] + [(n, 13) for n in HEAVY_KWARGS]
)
def test_model_is_valid_and_runs(name, opset):
    model = shared(name, opset=opset)

    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == M.DEFAULT_IR_VERSION <= 13
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]

    outputs = run(model, M.sample_inputs(model))
    assert list(outputs) == [o.name for o in model.graph.output]
    for out in model.graph.output:
        assert list(outputs[out.name].shape) == declared_shape(out), out.name
    for out_name, value in outputs.items():
        assert np.isfinite(value).all(), out_name
        assert value.std() > 1e-3, out_name
        if out_name in BOUNDED_OUTPUTS:
            assert 0.0 <= value.min() and value.max() <= 1.0, out_name
            assert np.ptp(value) > 0, f"{out_name} is constant"


@pytest.mark.parametrize("name", NAMES)
def test_intermediate_activations_neither_explode_nor_vanish(name):
    model = shared(name)
    activations = run(with_all_intermediates_as_outputs(model), M.sample_inputs(model))
    assert len(activations) > len(model.graph.output)
    for tensor, value in activations.items():
        if value.dtype != np.float32:
            continue
        assert np.isfinite(value).all(), tensor
        assert np.abs(value).max() < 1e3, tensor
        assert value.std() > 1e-3, tensor


@pytest.mark.parametrize("name", NAMES)
def test_graph_layout_and_names(name):
    model = shared(name)
    graph = model.graph

    assert [i.name for i in graph.input] == ["input"]
    assert declared_shape(graph.input[0])[:2] == [1, M.IN_CHANNELS]
    assert len(graph.value_info) == 0
    for out in graph.output:
        shape = declared_shape(out)
        assert shape and all(isinstance(d, int) and d > 0 for d in shape), (out.name, shape)

    node_names = [n.name for n in graph.node]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    for conv in nodes_of(model, "Conv"):
        assert conv.input[1] == f"{conv.name}.weight"
        if len(conv.input) > 2:
            assert conv.input[2] == f"{conv.name}.bias"


@pytest.mark.parametrize("name", LIGHT_NAMES)  # test_model_is_valid_and_runs checks the heavy ones
def test_output_shapes_match_declared(name):
    model = shared(name, batch=2)
    outputs = run(model, M.sample_inputs(model))
    for out in model.graph.output:
        assert list(outputs[out.name].shape) == declared_shape(out)


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_same_arguments_give_identical_bytes(name):
    first = build(name, opset=12, seed=7).SerializeToString()
    second = build(name, opset=12, seed=7).SerializeToString()
    assert first == second


@pytest.mark.parametrize("name", NAMES)
def test_seed_changes_every_weight(name):
    a, b = initializers(shared(name, seed=0)), initializers(shared(name, seed=1))
    assert a.keys() == b.keys()
    weights = [k for k in a if k.endswith((".weight", ".bias", ".running_mean", ".running_var"))]
    assert weights
    for key in weights:
        assert not np.array_equal(a[key], b[key]), key


def test_sample_inputs_are_deterministic_and_fill_symbolic_dims():
    model = M.conv_chain(batch="N")
    first, again = M.sample_inputs(model, batch=3, seed=5), M.sample_inputs(model, batch=3, seed=5)
    other = M.sample_inputs(model, batch=3, seed=6)

    assert list(first) == ["input"]
    x = first["input"]
    assert x.dtype == np.float32 and x.shape == (3, M.IN_CHANNELS, 16, 16)
    np.testing.assert_array_equal(x, again["input"])
    assert not np.array_equal(x, other["input"])
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2


# ---------------------------------------------------------------------------------------------
# the graph features each builder exists for
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_expected_op_counts(name):
    counts = Counter(n.op_type for n in shared(name, opset=13).graph.node)
    assert dict(counts) == EXPECTED_OPS[name]


@pytest.mark.parametrize("name", [n for n in NAMES if EXPECTED_OPS[n].get("BatchNormalization")])
def test_batch_norms_are_unfolded_and_non_trivial(name):
    model = shared(name)
    weights = initializers(model)
    bns = nodes_of(model, "BatchNormalization")
    assert bns
    for bn in bns:
        assert len(bn.output) == 1 and attr(bn, "training_mode") is None
        assert list(bn.input[1:]) == [f"{bn.name}.{s}" for s in ("weight", "bias", "running_mean", "running_var")]
        gamma, beta, mean, var = (weights[i] for i in bn.input[1:])
        assert ((0.5 <= gamma) & (gamma <= 1.5)).all() and not np.allclose(gamma, 1.0)
        assert (beta != 0).all() and (mean != 0).all()
        assert ((0.5 <= var) & (var <= 2.0)).all() and not np.allclose(var, 1.0)


def test_conv_chain_last_conv_is_bias_free():
    convs = nodes_of(M.conv_chain(), "Conv")
    assert [len(c.input) for c in convs] == [3, 3, 2]


@pytest.mark.parametrize("name", ["resnet_basic_block", "resnet_bottleneck_block"])
def test_resnet_has_strided_projection_shortcut(name):
    model = M.build(name)
    producer = producers(model)
    projections = [
        c for c in nodes_of(model, "Conv") if attr(c, "kernel_shape") == [1, 1] and attr(c, "strides") == [2, 2]
    ]
    assert len(projections) == 1
    for add in nodes_of(model, "Add"):
        assert {producer[i].op_type for i in add.input} <= {"BatchNormalization", "Relu"}
    assert attr(nodes_of(model, "Gemm")[0], "transB") == 1
    assert declared_shape(model.graph.output[0]) == [1, 10]


@pytest.mark.parametrize("name, expected", [("mobilenetv2_block", 2), ("mobilenetv3_block", 1)])
def test_mobilenet_depthwise_convs(name, expected):
    model = M.build(name)
    weights = initializers(model)
    depthwise = [c for c in nodes_of(model, "Conv") if attr(c, "group") > 1]
    assert len(depthwise) == expected
    for conv in depthwise:
        w = weights[conv.input[1]]
        assert attr(conv, "group") == w.shape[0] and w.shape[1] == 1


def test_mobilenetv2_relu6_is_clip_with_input_bounds():
    model = M.mobilenetv2_block(opset=11)
    weights = initializers(model)
    for clip in nodes_of(model, "Clip"):
        assert len(clip.input) == 3 and not clip.attribute
        assert weights[clip.input[1]] == 0.0 and weights[clip.input[2]] == 6.0


def test_mobilenetv3_squeeze_excite_gates_the_depthwise_output():
    model = M.mobilenetv3_block(opset=14)  # native HardSwish: the only HardSigmoid is the SE gate
    producer = producers(model)
    (gate,) = nodes_of(model, "HardSigmoid")
    assert attr(gate, "alpha") == pytest.approx(1 / 6) and attr(gate, "beta") == pytest.approx(0.5)

    (se_mul,) = [m for m in nodes_of(model, "Mul") if m.input[1] == gate.output[0]]
    assert producer[se_mul.input[0]].op_type == "HardSwish"  # the depthwise conv-bn-hardswish

    chain, node = [], gate
    while node.op_type != "GlobalAveragePool":
        chain.append(node)
        node = producer[node.input[0]]
    assert [n.op_type for n in chain] == ["HardSigmoid", "Conv", "Relu", "Conv"]
    assert all(len(n.input) == 3 for n in chain if n.op_type == "Conv")  # SE convs carry a bias
    assert node.input[0] == se_mul.input[0]  # squeezes the same tensor it gates


@pytest.mark.parametrize("opset", ALL_OPSETS)
def test_hardswish_is_native_from_opset_14_and_decomposed_below(opset):
    model = M.mobilenetv3_block(opset=opset)
    ops = Counter(n.op_type for n in model.graph.node)
    if opset >= 14:
        assert ops["HardSwish"] == 3 and ops["HardSigmoid"] == 1
    else:
        assert ops["HardSwish"] == 0 and ops["HardSigmoid"] == 4
        decomposed = [
            m for m in nodes_of(model, "Mul")
            if producers(model)[m.input[1]].op_type == "HardSigmoid"
            and producers(model)[m.input[1]].input[0] == m.input[0]
        ]
        assert len(decomposed) == 3


def test_squeezenet_fire_concats_without_batch_norm():
    model = M.squeezenet_fire()
    producer = producers(model)
    assert not nodes_of(model, "BatchNormalization")
    for concat in nodes_of(model, "Concat"):
        assert attr(concat, "axis") == 1
        kernels = [attr(producer[producer[i].input[0]], "kernel_shape") for i in concat.input]
        assert kernels == [[1, 1], [3, 3]]
    assert attr(nodes_of(model, "Softmax")[0], "axis") == 1


def test_group_conv_is_grouped_but_not_depthwise():
    model = M.group_conv()
    grouped = [c for c in nodes_of(model, "Conv") if attr(c, "group") != 1]
    assert len(grouped) == 1
    assert attr(grouped[0], "group") == 4
    assert initializers(model)[grouped[0].input[1]].shape == (16, 4, 3, 3)


def test_flatten_gemm_sees_unpooled_features():
    model = M.flatten_gemm()
    first_fc = nodes_of(model, "Gemm")[0]
    assert initializers(model)[first_fc.input[1]].shape == (32, 8 * 8 * 8)
    assert not nodes_of(model, "GlobalAveragePool")


@pytest.mark.parametrize("explicit, target", [(True, [-1, 8 * 8 * 8]), (False, [0, -1])])
def test_reshape_matmul_shape_constant(explicit, target):
    model = M.reshape_matmul(explicit_features=explicit, batch="N")
    weights = initializers(model)
    (reshape,) = nodes_of(model, "Reshape")
    assert weights[reshape.input[1]].tolist() == target
    assert weights[reshape.input[1]].dtype == np.int64
    assert weights[nodes_of(model, "MatMul")[0].input[1]].shape == (512, 10)
    assert run(model, M.sample_inputs(model, batch=2))["logits"].shape == (2, 10)


@pytest.mark.parametrize("opset", [11, 12, 13, 17])
def test_unet_resize_and_skip_concat(opset):
    model = M.unet_like(opset=opset)
    weights = initializers(model)
    (resize,) = nodes_of(model, "Resize")
    assert attr(resize, "mode") == b"nearest"
    assert weights[resize.input[2]].tolist() == [1.0, 1.0, 2.0, 2.0]
    if opset < 13:
        assert weights[resize.input[1]].size == 0  # roi is required before opset 13
    else:
        assert resize.input[1] == ""
    (concat,) = nodes_of(model, "Concat")
    assert concat.input[0] == resize.output[0]
    assert producers(model)[concat.input[1]].op_type == "Relu"  # the encoder skip
    assert declared_shape(model.graph.output[0]) == [1, 1, 32, 32]


@pytest.mark.parametrize("kernel_size", [2, 4])
def test_conv_transpose_restores_resolution(kernel_size):
    model = M.conv_transpose(kernel_size=kernel_size)
    (deconv,) = nodes_of(model, "ConvTranspose")
    assert len(deconv.input) == 2  # bias-free, followed by BN
    consumer = [n for n in model.graph.node if deconv.output[0] in n.input]
    assert [n.op_type for n in consumer] == ["BatchNormalization"]
    assert initializers(model)[deconv.input[1]].shape == (8, 8, kernel_size, kernel_size)
    out = run(model, M.sample_inputs(model))["output"]
    assert out.shape == (1, M.IN_CHANNELS, 16, 16)


def test_detection_head_outputs():
    model = M.detection_head(batch="N")
    anchors = 2 * (16 * 16 + 8 * 8)
    assert [o.name for o in model.graph.output] == ["scores", "boxes"]
    assert declared_shape(model.graph.output[0]) == ["N", anchors, 3]
    assert declared_shape(model.graph.output[1]) == ["N", anchors, 4]
    outputs = run(model, M.sample_inputs(model, batch=2))
    assert outputs["scores"].shape == (2, anchors, 3) and outputs["boxes"].shape == (2, anchors, 4)


@pytest.mark.parametrize("opset", [11, 12, 13, 18])
def test_split_concat_splits_and_slices_channels(opset):
    model = M.split_concat(opset=opset)
    weights, producer = initializers(model), producers(model)
    (split,) = nodes_of(model, "Split")
    assert attr(split, "axis") == 1 and producer[split.input[0]].op_type == "Relu"
    if opset < 13:
        assert attr(split, "split") == [8, 8] and len(split.input) == 1
    else:
        assert attr(split, "split") is None and weights[split.input[1]].tolist() == [8, 8]
    branch_convs = [n for n in nodes_of(model, "Conv") if n.input[0] in split.output]
    assert [c.input[0] for c in branch_convs] == list(split.output)
    assert all(weights[c.input[1]].shape == (8, 8, 3, 3) for c in branch_convs)

    (concat,) = nodes_of(model, "Concat")
    (slice_,) = nodes_of(model, "Slice")
    assert attr(concat, "axis") == 1 and slice_.input[0] == concat.output[0]
    assert [weights[i].tolist() for i in slice_.input[1:]] == [[4], [12], [1]]
    activations = run(with_all_intermediates_as_outputs(model), M.sample_inputs(model))
    np.testing.assert_array_equal(activations[slice_.output[0]], activations[concat.output[0]][:, 4:12])
    assert declared_shape(model.graph.output[0]) == [1, 8, 16, 16]


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space_trades_channels_for_resolution(mode):
    model = M.depth_to_space(mode=mode)
    weights, producer = initializers(model), producers(model)
    (d2s,) = nodes_of(model, "DepthToSpace")
    (s2d,) = nodes_of(model, "SpaceToDepth")
    assert attr(d2s, "blocksize") == 2 and attr(d2s, "mode") == mode.encode()
    assert attr(s2d, "blocksize") == 2
    assert producer[d2s.input[0]].op_type == "Relu" and producer[s2d.input[0]].op_type == "Relu"
    after_d2s, after_s2d = (n for n in nodes_of(model, "Conv") if n.input[0] in (d2s.output[0], s2d.output[0]))
    assert weights[after_d2s.input[1]].shape == (8, 4, 3, 3)
    assert weights[after_s2d.input[1]].shape == (8, 32, 1, 1)

    activations = run(with_all_intermediates_as_outputs(model), M.sample_inputs(model))
    assert activations[d2s.output[0]].shape == (1, 4, 32, 32)
    assert activations[s2d.output[0]].shape == (1, 32, 16, 16)
    other = M.depth_to_space(mode="CRD" if mode == "DCR" else "DCR")
    assert initializers(other).keys() == weights.keys()  # same weights, only the pixel order differs
    assert not np.allclose(run(model, M.sample_inputs(model))["output"], run(other, M.sample_inputs(other))["output"])
    with pytest.raises(ValueError, match="mode"):
        M.depth_to_space(mode="dcr")


def test_channel_shuffle_interleaves_the_groups():
    model = M.channel_shuffle(batch="N")
    weights = initializers(model)
    first, second = nodes_of(model, "Reshape")
    (transpose,) = nodes_of(model, "Transpose")
    assert weights[first.input[1]].tolist() == [0, 2, 8, 16, 16]
    assert attr(transpose, "perm") == [0, 2, 1, 3, 4]
    assert weights[second.input[1]].tolist() == [0, 16, 16, 16]
    assert first.output[0] == transpose.input[0] and transpose.output[0] == second.input[0]

    activations = run(with_all_intermediates_as_outputs(model), M.sample_inputs(model, batch=3))
    before, after = activations[first.input[0]], activations[second.output[0]]
    # output channel i * groups + g is input channel g * (C / groups) + i
    order = [g * 8 + i for i in range(8) for g in range(2)]
    np.testing.assert_array_equal(after, before[:, order])


def test_shufflenet_v2_passes_the_even_channels_on_and_feeds_the_odd_ones_to_the_branch():
    model = M.shufflenet_v2(batch="N")
    concat = nodes_of(model, "Concat")[0]
    gathers = nodes_of(model, "Gather")[:2]
    activations = run(with_all_intermediates_as_outputs(model), M.sample_inputs(model, batch=3))
    before = activations[concat.output[0]]
    np.testing.assert_array_equal(activations[gathers[0].output[0]], before[:, 0::2])
    np.testing.assert_array_equal(activations[gathers[1].output[0]], before[:, 1::2])


def test_se_gemm_gates_the_conv_output_with_gemm_layers():
    model = M.se_gemm()
    weights, producer = initializers(model), producers(model)
    (mul,) = nodes_of(model, "Mul")
    assert producer[mul.input[0]].op_type == "Relu"  # the conv-bn-relu feature map
    reshape = producer[mul.input[1]]
    assert reshape.op_type == "Reshape" and weights[reshape.input[1]].tolist() == [0, 16, 1, 1]

    chain, node = [], producer[reshape.input[0]]
    while node.op_type != "GlobalAveragePool":
        chain.append(node)
        node = producer[node.input[0]]
    assert [n.op_type for n in chain] == ["Sigmoid", "Gemm", "Relu", "Gemm", "Flatten"]
    assert node.input[0] == mul.input[0]  # squeezes the same tensor it gates
    fc2, fc1 = chain[1], chain[3]
    assert weights[fc1.input[1]].shape == (4, 16) and weights[fc2.input[1]].shape == (16, 4)
    assert attr(fc1, "transB") == 1 and attr(fc2, "transB") == 1
    assert [c.input[0] for c in nodes_of(model, "Conv")][1] == mul.output[0]


@pytest.mark.parametrize("opset", [11, 16, 17, 21])
def test_norm_zoo_channel_wise_ops(opset):
    model = M.norm_zoo(opset=opset)
    weights = initializers(model)
    (inorm,) = nodes_of(model, "InstanceNormalization")
    assert [weights[i].shape for i in inorm.input[1:]] == [(16,), (16,)]
    assert weights[nodes_of(model, "PRelu")[0].input[1]].shape == (16, 1, 1)
    assert attr(nodes_of(model, "LeakyRelu")[0], "alpha") == pytest.approx(0.1)
    (pad,) = nodes_of(model, "Pad")
    assert weights[pad.input[1]].tolist() == [0, 0, 1, 1, 0, 0, 1, 1] and attr(pad, "mode") == b"constant"
    (after_pad,) = [c for c in nodes_of(model, "Conv") if c.input[0] == pad.output[0]]
    assert attr(after_pad, "pads") == [0, 0, 0, 0]
    (clip,) = nodes_of(model, "Clip")
    assert (weights[clip.input[1]], weights[clip.input[2]]) == (0.0, 6.0)
    assert attr(nodes_of(model, "AveragePool")[0], "kernel_shape") == [2, 2]
    assert weights[nodes_of(model, "Resize")[0].input[2]].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert [attr(t, "perm") for t in nodes_of(model, "Transpose")] == [[0, 2, 3, 1], [0, 3, 1, 2]]

    layer_norms = nodes_of(model, "LayerNormalization")
    if opset >= 17:
        assert len(layer_norms) == 1 and attr(layer_norms[0], "axis") == -1
        assert [weights[i].shape for i in layer_norms[0].input[1:]] == [(16,), (16,)]
    else:
        assert not layer_norms
        assert [attr(r, "axes") for r in nodes_of(model, "ReduceMean")] == [[-1], [-1]]
    # the decomposition and the op compute the same thing from the same weights
    other = M.norm_zoo(opset=16 if opset >= 17 else 17)
    feeds = M.sample_inputs(model)
    np.testing.assert_allclose(run(model, feeds)["output"], run(other, feeds)["output"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset", [11, 13, 20, 21])
def test_group_norm_is_native_from_opset_21_and_decomposed_below(opset):
    model = M.group_norm(opset=opset, batch="N")
    weights, producer = initializers(model), producers(model)
    assert not nodes_of(model, "BatchNormalization")
    (relu,) = nodes_of(model, "Relu")
    norm_out = producer[relu.input[0]]
    if opset >= 21:
        assert norm_out.op_type == "GroupNormalization" and attr(norm_out, "num_groups") == 4
        assert [weights[i].shape for i in norm_out.input[1:]] == [(16,), (16,)]
        assert producer[norm_out.input[0]].op_type == "Conv"
    else:
        assert not nodes_of(model, "GroupNormalization")
        chain, node = [], norm_out
        while node.op_type != "Conv":
            chain.append(node)
            node = producer[node.input[0]]
        assert [n.op_type for n in chain] == ["Add", "Mul", "Reshape", "InstanceNormalization", "Reshape"]
        add, mul, back, inorm, grouped = chain
        assert weights[grouped.input[1]].tolist() == [0, 4, -1]
        assert weights[inorm.input[1]].tolist() == [1.0] * 4 and weights[inorm.input[2]].tolist() == [0.0] * 4
        assert weights[back.input[1]].tolist() == [0, 16, 16, 16]
        assert weights[mul.input[1]].shape == (16, 1, 1) and weights[add.input[1]].shape == (16, 1, 1)
    # native and decomposed GroupNorm agree (same weights), at several batch sizes
    other = M.group_norm(opset=20 if opset >= 21 else 21, batch="N")
    for batch in (1, 3):
        feeds = M.sample_inputs(model, batch=batch)
        np.testing.assert_allclose(run(model, feeds)["output"], run(other, feeds)["output"], rtol=1e-4, atol=1e-4)


def test_matmul_classifier_second_matmul_reads_first_matmul_features():
    model = M.matmul_classifier(batch="N")
    weights, producer = initializers(model), producers(model)
    (reshape,) = nodes_of(model, "Reshape")
    assert weights[reshape.input[1]].tolist() == [-1, 8 * 8 * 8]
    first, second = nodes_of(model, "MatMul")
    assert first.input[0] == reshape.output[0]
    assert weights[first.input[1]].shape == (512, 10) and weights[second.input[1]].shape == (10, 10)
    assert second.output[0] == "logits"  # no bias on the last layer
    relu = producer[second.input[0]]
    add = producer[relu.input[0]]
    assert (relu.op_type, add.op_type) == ("Relu", "Add") and producer[add.input[0]] is first
    assert weights[add.input[1]].shape == (10,)
    assert run(model, M.sample_inputs(model, batch=3))["logits"].shape == (3, 10)


def test_resnet50_topology():
    model = shared("resnet50")
    weights, producer = initializers(model), producers(model)
    convs = nodes_of(model, "Conv")
    stem = convs[0]
    assert attr(stem, "kernel_shape") == [7, 7] and attr(stem, "strides") == [2, 2]
    assert weights[stem.input[1]].shape == (64, 3, 7, 7)
    strided = [
        (attr(c, "kernel_shape"), weights[c.input[1]].shape[0]) for c in convs[1:] if attr(c, "strides") == [2, 2]
    ]
    # stride on the 3x3 of each later stage's first block and on its projection shortcut
    assert strided == [([3, 3], 128), ([1, 1], 512), ([3, 3], 256), ([1, 1], 1024), ([3, 3], 512), ([1, 1], 2048)]
    for add in nodes_of(model, "Add"):
        assert {producer[i].op_type for i in add.input} <= {"BatchNormalization", "Relu", "MaxPool"}
    (fc,) = nodes_of(model, "Gemm")
    assert weights[fc.input[1]].shape == (1000, 2048) and attr(fc, "transB") == 1
    assert declared_shape(model.graph.output[0]) == [1, 1000]
    assert all(d % 4 == 0 for d in declared_shape(model.graph.input[0])[2:])


def test_resnet50_has_resnet50_parameter_count():
    count = sum(w.size for w in initializers(shared("resnet50")).values())
    assert 25.0e6 <= count <= 26.0e6  # torchvision: 25.56M trainable, plus the BN running stats


def test_resnet50_default_build_is_fast_and_checks_image_size():
    start = time.perf_counter()
    model = M.resnet50()
    assert time.perf_counter() - start < 2.0
    assert declared_shape(model.graph.input[0]) == [1, M.IN_CHANNELS, 224, 224]
    assert declared_shape(model.graph.output[0]) == [1, 1000]
    assert declared_shape(M.resnet50(image_size=32, num_classes=7).graph.output[0]) == [1, 7]
    with pytest.raises(ValueError, match="multiple of 32"):
        M.resnet50(image_size=48)


# ---------------------------------------------------------------------------------------------
# dynamic batch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_symbolic_batch_runs_at_several_sizes(name):
    model = shared(name, batch="N")
    onnx.checker.check_model(model, full_check=True)
    assert declared_shape(model.graph.input[0])[0] == "N"
    assert all(declared_shape(o)[0] == "N" for o in model.graph.output)

    session = session_for(model)
    for batch in (1, 3):
        outputs = run(session, M.sample_inputs(model, batch=batch))
        for out in model.graph.output:
            assert list(outputs[out.name].shape) == [batch] + declared_shape(out)[1:]


def test_batched_results_match_single_sample_results():
    model = M.resnet_basic_block(batch="N")
    x = M.sample_inputs(model, batch=3)["input"]
    batched = run(model, {"input": x})["logits"]
    single = run(model, {"input": x[1:2]})["logits"]
    np.testing.assert_allclose(batched[1:2], single, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# registry and argument validation
# ---------------------------------------------------------------------------------------------


def test_registry_and_build():
    assert set(M.BUILDERS) == set(EXPECTED_OPS)
    assert M.build("group_conv", seed=3).SerializeToString() == M.group_conv(seed=3).SerializeToString()
    with pytest.raises(KeyError, match="unknown test model"):
        M.build("vgg19")


@pytest.mark.parametrize(
    "kwargs", [{"opset": 10}, {"opset": M.MAX_OPSET + 1}, {"batch": 0}, {"batch": ""}, {"batch": True}]
)
def test_invalid_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        M.conv_chain(**kwargs)
