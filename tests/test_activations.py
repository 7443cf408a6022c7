"""``onnxslim_cv.activations``: tapping intermediate tensors batch by batch."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxslim_cv import activations
from onnxslim_cv.calibration import from_iterable
from onnxslim_cv.ir import Model


def _batch_one_model() -> Model:
    """x[1,3,4,4] -> Relu -> Reshape([1, -1]): the constant batch 1 keeps the batch fixed."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["y"], name="flat"),
        helper.make_node("Shape", ["y"], ["y_shape"], name="shape_of"),
    ]
    graph = helper.make_graph(
        nodes, "batch_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48]),
         helper.make_tensor_value_info("y_shape", TensorProto.INT64, [2])],
        [numpy_helper.from_array(np.array([1, -1], np.int64), "shape")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return Model.from_proto(proto)


def _samples(count: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, 3, 4, 4)).astype(np.float32)


def _data(model: Model, x: np.ndarray):
    return from_iterable([{"x": s[None]} for s in x], model.input_specs())


def test_a_batch_one_model_still_hands_out_full_batches():
    model = _batch_one_model()
    session = activations.tap_session(model, ["r"])
    assert activations.session_batch_size(session, 16) == 1  # the Reshape keeps batch 1
    x = _samples(10)
    batches = list(activations.iterate(session, _data(model, x), ["r", "y"], batch_size=4))
    assert [b["r"].shape[0] for b in batches] == [4, 4, 2]
    joined = np.concatenate([b["r"] for b in batches])
    np.testing.assert_array_equal(joined, np.maximum(x, 0))
    np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches]), np.maximum(x, 0).reshape(10, -1))


def test_tensors_without_a_batch_axis_come_one_run_at_a_time():
    model = _batch_one_model()
    session = activations.tap_session(model, ["y_shape"])
    batches = list(activations.iterate(session, _data(model, _samples(5)), ["y", "y_shape"], batch_size=4))
    assert len(batches) == 5
    assert all(b["y_shape"].tolist() == [1, 48] for b in batches)


def test_plain_iterables_of_feeds_are_run_as_given():
    model = _batch_one_model()
    session = activations.tap_session(model, [])
    feeds = [{"x": s[None]} for s in _samples(3)]
    batches = list(activations.iterate(session, feeds, ["y"], batch_size=16))
    assert [b["y"].shape for b in batches] == [(1, 48)] * 3


def test_a_batchable_model_runs_whole_batches():
    model = _batch_one_model()
    proto = model.to_proto()
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([0, -1], np.int64), "shape"))
    grows = Model.from_proto(proto)
    assert activations.batch_can_grow(grows.to_proto())
    session = activations.tap_session(grows, ["r"])
    assert activations.session_batch_size(session, 4) == 4  # one run per batch, nothing to join
    batches = list(activations.iterate(session, _data(grows, _samples(10)), ["r"], batch_size=4))
    assert [b["r"].shape[0] for b in batches] == [4, 4, 2]
