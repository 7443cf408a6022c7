"""``onnxslim_cv.graph_utils``: the small rewrites passes share."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from onnxslim_cv import runtime
from onnxslim_cv.graph_utils import name_nodes, new_constant, strip_output_softmax, unique_name
from onnxslim_cv.ir import Model
from onnxslim_cv.testing import models as test_models


def _run(model: Model, feed):
    session = runtime.make_session(model.to_proto())
    return session.run(None, feed)[0]


def test_strip_output_softmax_returns_the_classifier_logits():
    proto = test_models.build("squeezenet_fire")
    model = Model.from_proto(proto)
    stripped = model.copy()
    assert strip_output_softmax(stripped) == 1
    assert not any(node.op == "Softmax" for node in stripped.graph.nodes)
    assert any(node.op == "Softmax" for node in model.graph.nodes)  # the copy only
    onnx.checker.check_model(stripped.to_proto())
    feed = test_models.sample_inputs(proto, batch=3, seed=2)
    probs, logits = _run(model, feed), _run(stripped, feed)
    assert logits.shape == probs.shape
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(axis=1, keepdims=True), probs, rtol=1e-5, atol=1e-7)


def test_strip_output_softmax_leaves_other_softmax_outputs_alone():
    # per-anchor scores [N, A, 2] (a detector's), not one class vector per sample
    node = helper.make_node("Softmax", ["x"], ["scores"], axis=-1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 2])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 5, 2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    model = Model.from_proto(proto)
    assert strip_output_softmax(model) == 0
    assert [t.name for t in model.graph.outputs] == ["scores"]


def test_unique_name_appends_the_first_free_suffix():
    assert unique_name("w", set()) == "w"
    assert unique_name("w", {"w", "w_1", "w_3"}) == "w_2"


def test_new_constant_and_name_nodes_avoid_names_in_use():
    model = Model.from_proto(test_models.conv_chain())
    weight = next(t for t in model.graph.tensors().values() if isinstance(t, gs.Constant))
    fresh = new_constant(model.graph, weight.name, np.zeros(2, np.float32))
    assert fresh.name == f"{weight.name}_1"

    first, second = model.graph.nodes[:2]
    first.name, second.name = "", first.op + "_1"  # an unnamed node whose default name is taken
    assert name_nodes(model.graph) == 1
    names = [node.name for node in model.graph.nodes]
    assert len(set(names)) == len(names) and all(names)
    assert first.name == f"{first.op}_0"
