"""Checks of the shipped demo assets: the demo's accuracy story is only as good as these files."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxslim_cv.data import (
    DEMO_INPUT_NAME,
    demo_calibration_path,
    demo_model_path,
    demo_test_set,
)


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(str(demo_model_path()))


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(demo_model_path()), providers=["CPUExecutionProvider"])


def test_model_is_valid_and_unfolded(model, session):
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 13  # newer IRs are refused by the supported onnxruntime
    op_types = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" in op_types  # the demo's first pass is what folds it
    assert op_types <= {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
    assert model.doc_string
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert [i.name for i in session.get_inputs()] == [DEMO_INPUT_NAME]
    assert [o.name for o in session.get_outputs()] == ["logits"]


def test_test_set_shapes_and_dtypes():
    images, labels = demo_test_set()
    assert images.dtype == np.float32 and labels.dtype == np.int64
    assert images.ndim == 4 and images.shape[1:] == (1, 8, 8)
    assert len(images) == len(labels) > 0
    assert set(np.unique(labels)) == set(range(10))
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_test_accuracy(session):
    images, labels = demo_test_set()
    logits = session.run(None, {DEMO_INPUT_NAME: images})[0]
    assert logits.shape == (len(images), 10)
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    assert accuracy >= 0.95, f"demo model test accuracy {accuracy:.4f} < 0.95"


def test_calibration_file(model):
    input_name = model.graph.input[0].name
    with np.load(demo_calibration_path()) as npz:
        assert list(npz.keys()) == [input_name]
        calib = npz[input_name]
    assert calib.dtype == np.float32
    assert calib.shape == (128, 1, 8, 8)
    assert calib.min() >= 0.0 and calib.max() <= 1.0


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch(session, batch):
    images, _ = demo_test_set()
    logits = session.run(None, {DEMO_INPUT_NAME: images[:batch]})[0]
    assert logits.shape == (batch, 10)
    assert logits.dtype == np.float32
    full = session.run(None, {DEMO_INPUT_NAME: images[:7]})[0]
    np.testing.assert_allclose(logits, full[:batch], rtol=1e-5, atol=1e-5)
