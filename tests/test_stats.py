"""Params, MACs per layer (checked against hand arithmetic), sparsity."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxslim_cv.model_io import load_model
from onnxslim_cv.stats import model_stats
from onnxslim_cv.testing import models


def _init(name, shape, zeros=0):
    values = np.arange(1, int(np.prod(shape)) + 1, dtype=np.float32).reshape(shape)
    values.reshape(-1)[:zeros] = 0
    return numpy_helper.from_array(values, name)


def handmade(batch=1):
    """Every weight op once, sizes small enough to check the MACs by hand."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv", pads=[1, 1, 1, 1]),  # 3->8, 8x8
        helper.make_node("Conv", ["c1", "w2"], ["c2"], name="group", pads=[1, 1, 1, 1], group=4),  # 8->8 in 4 groups
        helper.make_node("ConvTranspose", ["c2", "w3"], ["c3"], name="deconv", strides=[2, 2]),  # 8->2, 8x8 -> 16x16
        helper.make_node("GlobalAveragePool", ["c3"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w4"], ["g"], name="fc", transB=1),  # 2 -> 5
        helper.make_node("Unsqueeze", ["g", "axes"], ["u"]),
        helper.make_node("MatMul", ["u", "w5"], ["y"], name="matmul"),  # [N,1,5] x [5,7]
    ]
    inits = [
        _init("w1", (8, 3, 3, 3), zeros=54),
        _init("w2", (8, 2, 3, 3)),
        _init("w3", (8, 2, 2, 2)),
        _init("w4", (5, 2)),
        _init("w5", (5, 7)),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    graph = helper.make_graph(
        nodes,
        "handmade",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 1, 7])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


EXPECTED_MACS = {
    "conv": 8 * 8 * 8 * (3 * 3 * 3),  # outputs x (C_in x k x k)
    "group": 8 * 8 * 8 * (2 * 3 * 3),  # each output sees C_in / group channels
    "deconv": (8 * 8 * 8) * (2 * 2 * 2),  # inputs x (C_out / group x k x k)
    "fc": 5 * 2,
    "matmul": 1 * 7 * 5,
}


def test_macs_per_layer_match_hand_arithmetic():
    stats = model_stats(load_model(handmade()))
    assert {layer.name: layer.macs for layer in stats.layers} == EXPECTED_MACS
    assert stats.macs == sum(EXPECTED_MACS.values())


def test_macs_scale_with_a_fixed_batch():
    stats = model_stats(load_model(handmade(batch=3)))
    assert stats.macs == 3 * sum(EXPECTED_MACS.values())


def test_params_count_float_weights_not_shape_data():
    stats = model_stats(load_model(handmade()))
    assert stats.params == 8 * 27 + 8 * 18 + 8 * 8 + 10 + 35  # the int64 axes are not parameters
    assert {layer.name: layer.params for layer in stats.layers}["conv"] == 216


def test_weight_sparsity_counts_exact_zeros():
    stats = model_stats(load_model(handmade()))
    conv = next(layer for layer in stats.layers if layer.name == "conv")
    assert conv.weight_sparsity == 54 / 216
    assert stats.weight_sparsity == 54 / stats.params


def test_unknown_dims_make_macs_unknown_but_keep_a_lower_bound():
    model = handmade()
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "H"
    stats = model_stats(load_model(model))
    assert stats.macs is None
    assert 0 < stats.macs_known < sum(EXPECTED_MACS.values())


def test_dynamic_batch_counts_as_one():
    stats = model_stats(load_model(models.resnet_basic_block(batch="N")))
    fixed = model_stats(load_model(models.resnet_basic_block(batch=1)))
    assert stats.macs == fixed.macs > 0


def test_op_histogram_and_io():
    stats = model_stats(load_model(models.squeezenet_fire()))
    assert stats.op_histogram["Concat"] == 2
    assert stats.inputs[0]["name"] == "input"
    assert stats.size_bytes > 0
