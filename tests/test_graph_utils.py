"""``onnxslim_cv.graph_utils``: the small rewrites passes share."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxslim_cv import runtime
from onnxslim_cv.graph_utils import strip_output_softmax
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
