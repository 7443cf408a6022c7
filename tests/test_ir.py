"""The IR: normalisation of exporter quirks, copies, shapes, the emitted IR version."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_cv import runtime
from onnxslim_cv.errors import UserError
from onnxslim_cv.ir import Model, emit_ir_version
from onnxslim_cv.model_io import load_model
from onnxslim_cv.testing import models

from .conftest import graph_model, run_model


def ir3_model_with_initializer_inputs() -> onnx.ModelProto:
    """IR-3 style (SqueezeNet, ResNet-20 in ../shared): every initializer is also an input."""
    weight = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
        helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3, 1, 1]),
    ]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g", inputs, [output], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    return model


def constant_node_model() -> onnx.ModelProto:
    """paddle2onnx style: weights live in Constant nodes, there are no initializers."""
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(np.full((2, 3, 1, 1), 0.5, np.float32))),
        helper.make_node("Constant", [], ["s"], value_float=2.0),
        helper.make_node("Constant", [], ["shape"], value_ints=[1, -1]),
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Mul", ["c", "s"], ["m"]),
        helper.make_node("Reshape", ["m", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def deduplicated_parameters_model() -> onnx.ModelProto:
    """torch.onnx (TorchScript) style: equal parameters stored once, the others read through
    Identity; one Identity (of a weight) also feeds a graph output."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b1"),
    ]
    nodes = [
        helper.make_node("Identity", ["b1"], ["b2"]),
        helper.make_node("Identity", ["b2"], ["b3"]),  # a chain resolves too
        helper.make_node("Identity", ["w2"], ["w2_out"]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
        helper.make_node("Conv", ["c1", "w2", "b3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2]),
         helper.make_tensor_value_info("w2_out", TensorProto.FLOAT, [4, 4, 1, 1])], inits,
    )
    return graph_model(graph)


def test_identity_copies_of_weights_become_weights_of_their_own():
    source = deduplicated_parameters_model()
    model = Model.from_proto(source)
    second = next(n for n in model.graph.nodes if n.op == "Conv" and n.outputs[0].name == "y")
    assert isinstance(second.inputs[2], gs.Constant) and second.inputs[2].name == "b3"
    assert [n.op for n in model.graph.nodes if n.op == "Identity"] == ["Identity"]  # the graph output's
    proto = model.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 2, 2)).astype(np.float32)
    for ref, out in zip(run_model(source, {"x": x}), run_model(proto, {"x": x})):
        np.testing.assert_array_equal(ref, out)


def test_initializers_listed_as_inputs_become_plain_weights():
    model = Model.from_proto(ir3_model_with_initializer_inputs())
    assert [t.name for t in model.graph.inputs] == ["x"]
    proto = model.to_proto()
    assert [i.name for i in proto.graph.input] == ["x"]
    assert proto.ir_version >= 4  # IR 3 requires initializers to be inputs
    onnx.checker.check_model(proto, full_check=True)


def test_constant_nodes_become_initializers_with_the_same_values():
    source = constant_node_model()
    model = Model.from_proto(source)
    assert not [n for n in model.graph.nodes if n.op == "Constant"]
    proto = model.to_proto()
    assert {i.name for i in proto.graph.initializer} == {"w", "s", "shape"}
    x = np.random.default_rng(0).standard_normal((1, 3, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(run_model(source, {"x": x})[0], run_model(proto, {"x": x})[0])


def test_from_proto_leaves_the_callers_proto_alone():
    source = constant_node_model()
    before = source.SerializeToString()
    Model.from_proto(source)
    assert source.SerializeToString() == before


def test_emitted_ir_version_is_loadable_even_when_the_source_was_stamped_too_new():
    proto = models.conv_chain()
    proto.ir_version = onnx.IR_VERSION  # what onnx.helper stamps by default
    emitted = Model.from_proto(proto).to_proto()
    assert emitted.ir_version <= runtime.max_ir_version()
    runtime.make_session(emitted)


def test_emit_ir_version_keeps_the_original_where_possible():
    opsets = [helper.make_opsetid("", 13)]
    assert emit_ir_version(8, opsets) == 8
    assert emit_ir_version(3, [helper.make_opsetid("", 7)]) == 4
    assert emit_ir_version(3, opsets) == helper.find_min_ir_version_for(opsets)


def test_copy_is_independent_but_shares_weight_arrays():
    model = Model.from_proto(models.conv_chain())
    clone = model.copy()
    weight = next(t for t in clone.constants() if t.name == "conv1.weight")
    original = next(t for t in model.constants() if t.name == "conv1.weight")
    assert weight is not original and weight.values is original.values
    weight.values = np.zeros_like(weight.values)
    assert np.abs(original.values).sum() > 0
    clone.graph.nodes.pop()
    assert len(model.graph.nodes) == len(clone.graph.nodes) + 1


def test_set_input_shapes_fixes_dynamic_dims_and_refreshes_shapes():
    model = load_model(models.resnet_basic_block(batch="N"))
    assert model.input_specs()[0].shape[0] == "N"
    model.set_input_shapes({"input": (2, 3, 16, 16)})
    assert model.input_specs()[0].shape == (2, 3, 16, 16)
    gemm = next(n for n in model.graph.nodes if n.op == "Gemm")
    assert list(gemm.outputs[0].shape) == [2, 10]


@pytest.mark.parametrize(
    "shapes, message",
    [
        ({"nope": (1, 3, 16, 16)}, "model's inputs are: input"),
        ({"input": (1, 3, 16)}, "has rank 4"),
        ({"input": (1, 3, 32, 32)}, "fixed at 16"),
        ({"input": (0, 3, 16, 16)}, "must be positive"),
    ],
)
def test_set_input_shapes_rejects_what_would_break_the_graph(shapes, message):
    model = load_model(models.resnet_basic_block(batch="N"))
    with pytest.raises(UserError, match=message):
        model.set_input_shapes(shapes)


def test_infer_shapes_forgets_stale_shapes_after_a_rewrite():
    model = load_model(models.conv_chain())
    conv = next(n for n in model.graph.nodes if n.op == "Conv")
    assert conv.outputs[0].shape[1] == 8
    weight = conv.inputs[1]
    weight.values = weight.values[:4]  # as a pruning pass would
    bn = conv.outputs[0].outputs[0]
    for index in range(1, 5):
        bn.inputs[index].values = bn.inputs[index].values[:4]
    if len(conv.inputs) > 2:
        conv.inputs[2].values = conv.inputs[2].values[:4]
    model.infer_shapes(reset=True)
    assert conv.outputs[0].shape[1] == 4
