"""Tests for the synthetic CV test models in ``onnxslim_cv.testing.models``."""

from __future__ import annotations

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
    "unet_like": {
        "Conv": 4, "BatchNormalization": 3, "Relu": 3, "MaxPool": 1,
        "Resize": 1, "Concat": 1, "Sigmoid": 1,
    },
    "conv_transpose": {"Conv": 2, "ConvTranspose": 1, "BatchNormalization": 2, "Relu": 2},
    "detection_head": {
        "Conv": 6, "BatchNormalization": 2, "Relu": 2, "Sigmoid": 2,
        "Transpose": 4, "Reshape": 4, "Concat": 2,
    },
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def run(model: onnx.ModelProto, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
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


@pytest.mark.parametrize("opset", ALL_OPSETS)
@pytest.mark.parametrize("name", NAMES)
def test_model_is_valid_and_runs(name, opset):
    model = M.build(name, opset=opset)

    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == M.DEFAULT_IR_VERSION <= 13
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]

    outputs = run(model, M.sample_inputs(model))
    assert list(outputs) == [o.name for o in model.graph.output]
    for out_name, value in outputs.items():
        assert np.isfinite(value).all(), out_name
        assert value.std() > 1e-3, out_name
        if out_name in BOUNDED_OUTPUTS:
            assert 0.0 <= value.min() and value.max() <= 1.0, out_name
            assert np.ptp(value) > 0, f"{out_name} is constant"


@pytest.mark.parametrize("name", NAMES)
def test_intermediate_activations_neither_explode_nor_vanish(name):
    model = M.build(name)
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
    model = M.build(name)
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


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes_match_declared(name):
    model = M.build(name, batch=2)
    outputs = run(model, M.sample_inputs(model))
    for out in model.graph.output:
        assert list(outputs[out.name].shape) == declared_shape(out)


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_same_arguments_give_identical_bytes(name):
    first = M.build(name, opset=12, seed=7).SerializeToString()
    second = M.build(name, opset=12, seed=7).SerializeToString()
    assert first == second


@pytest.mark.parametrize("name", NAMES)
def test_seed_changes_every_weight(name):
    a, b = initializers(M.build(name, seed=0)), initializers(M.build(name, seed=1))
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
    counts = Counter(n.op_type for n in M.build(name, opset=13).graph.node)
    assert dict(counts) == EXPECTED_OPS[name]


@pytest.mark.parametrize("name", [n for n in NAMES if EXPECTED_OPS[n].get("BatchNormalization")])
def test_batch_norms_are_unfolded_and_non_trivial(name):
    model = M.build(name)
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


# ---------------------------------------------------------------------------------------------
# dynamic batch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_symbolic_batch_runs_at_several_sizes(name):
    model = M.build(name, batch="N")
    onnx.checker.check_model(model, full_check=True)
    assert declared_shape(model.graph.input[0])[0] == "N"
    assert all(declared_shape(o)[0] == "N" for o in model.graph.output)

    for batch in (1, 3):
        outputs = run(model, M.sample_inputs(model, batch=batch))
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
