"""Verification metrics and the gate."""

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_cv import calibration
from onnxslim_cv.errors import UserError
from onnxslim_cv.model_io import load_model
from onnxslim_cv.verify import Thresholds, _classifier_classes, verify
from onnxslim_cv.testing import models


def scaled_output_model(scale, bias=0.0, classes=10, batch="N"):
    """y = x * scale + bias, so the candidate's error is known in closed form."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    inits = [
        numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
        numpy_helper.from_array(np.asarray(bias, np.float32), "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, classes])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def data_for(model, samples):
    return calibration.from_iterable(samples, load_model(model).input_specs())


def logits(n=16, classes=10, seed=0):
    return [{"x": row[None]} for row in np.random.default_rng(seed).standard_normal((n, classes)).astype(np.float32)]


def test_identical_models_have_no_error():
    model = scaled_output_model(1.0)
    report = verify(model, model, data_for(model, logits()))
    (out,) = report.outputs
    assert report.passed and report.samples == 16
    assert out.max_abs_error == 0 and out.snr_db is None
    assert out.cosine_mean == pytest.approx(1.0) and out.top1_agreement == 1.0 and out.top5_agreement == 1.0


def test_metrics_match_closed_forms():
    ref, cand = scaled_output_model(1.0), scaled_output_model(1.0, bias=0.1)
    samples = logits(32)
    report = verify(ref, cand, data_for(ref, samples))
    (out,) = report.outputs
    x = np.concatenate([s["x"] for s in samples]).astype(np.float64)
    assert out.max_abs_error == pytest.approx(0.1, rel=1e-5)
    expected_snr = 10 * math.log10(np.square(x).sum() / (x.size * 0.01))
    assert out.snr_db == pytest.approx(expected_snr, rel=1e-4)
    cosines = [np.dot(r, r + 0.1) / (np.linalg.norm(r) * np.linalg.norm(r + 0.1)) for r in x]
    assert out.cosine_mean == pytest.approx(np.mean(cosines), abs=1e-6)
    assert out.cosine_min == pytest.approx(np.min(cosines), abs=1e-6)


def test_top1_agreement_counts_argmax_changes():
    """Negating the logits moves every argmax; top-5 of the negation rarely holds the old top-1."""
    ref, cand = scaled_output_model(1.0), scaled_output_model(-1.0)
    report = verify(ref, cand, data_for(ref, logits(20)), thresholds=Thresholds(min_cosine=None))
    (out,) = report.outputs
    assert out.top1_agreement == 0.0
    assert out.top5_agreement == 0.0  # the old top-1 is now the smallest logit
    assert report.passed  # no gate was set


def test_gates_fail_with_reasons():
    ref, cand = scaled_output_model(1.0), scaled_output_model(-1.0)
    report = verify(ref, cand, data_for(ref, logits()), thresholds=Thresholds(min_cosine=0.99, min_top1_agreement=0.9))
    assert not report.passed
    assert any("cosine" in f and "--min-cosine 0.99" in f for f in report.failures)
    assert any("top-1 agreement 0.0000 < --min-top1-agreement 0.9" in f for f in report.failures)


def test_nan_in_the_candidate_always_fails():
    ref, cand = scaled_output_model(1.0), scaled_output_model(np.inf)
    report = verify(ref, cand, data_for(ref, logits(4)), thresholds=Thresholds(min_cosine=None))
    assert not report.passed
    assert "NaN/inf" in report.failures[0]


def test_top1_gate_needs_a_classifier_output():
    model = models.conv_chain()
    data = calibration.random_data(load_model(model).input_specs(), 2)
    report = verify(model, model, data, thresholds=Thresholds(min_top1_agreement=0.5))
    assert not report.passed and "classifier-shaped" in report.failures[0]


def test_latency_gate():
    model = models.resnet_basic_block()
    data = calibration.random_data(load_model(model).input_specs(), 2)
    report = verify(model, model, data, thresholds=Thresholds(max_latency_ratio=1e-6))
    assert report.latency is not None and report.latency["ratio"] > 0
    assert any("latency ratio" in f for f in report.failures)


def test_models_with_different_outputs_are_refused():
    data_model = scaled_output_model(1.0)
    other = scaled_output_model(1.0)
    other.graph.output[0].name = "z"
    other.graph.node[1].output[0] = "z"
    with pytest.raises(UserError, match="different outputs"):
        verify(data_model, other, data_for(data_model, logits(2)))


def test_fixed_batch_models_get_one_sample_at_a_time():
    ref = scaled_output_model(1.0, batch=1)
    data = calibration.from_iterable([{"x": np.ones((5, 10), np.float32)}], load_model(ref).input_specs())
    report = verify(ref, ref, data)
    assert report.samples == 5 and report.outputs[0].samples == 5


def test_empty_data_is_an_error():
    model = scaled_output_model(1.0)
    with pytest.raises(UserError, match="no samples"):
        verify(model, model, data_for(model, []))


@pytest.mark.parametrize(
    "shape, classes",
    [((8, 1000), 1000), ((1, 1000, 1, 1), 1000), ((4, 2), 2), ((1, 4420, 2), None), ((1, 1, 224, 224), None), ((5, 1), None)],
)
def test_classifier_shapes(shape, classes):
    assert _classifier_classes(shape) == classes


def test_near_zero_outputs_that_agree_within_float_noise_pass():
    """A sigmoid map that is ~0 everywhere: cosine of noise against noise must not fail a bit-exact rewrite."""
    ref = scaled_output_model(1e-9)
    cand = scaled_output_model(1.3e-9)
    report = verify(ref, cand, data_for(ref, logits(4)))
    assert report.passed, report.failures


def test_thresholds_are_validated():
    with pytest.raises(UserError, match="--min-cosine"):
        Thresholds(min_cosine=2.0).validate()
    with pytest.raises(UserError, match="fraction"):
        Thresholds(min_top1_agreement=99).validate()
    with pytest.raises(UserError, match="--max-latency-ratio"):
        Thresholds(max_latency_ratio=0).validate()


def test_proto_candidates_are_accepted():
    proto = models.mobilenetv2_block()
    data = calibration.random_data(load_model(proto).input_specs(), 3)
    assert verify(proto, onnx.load_from_string(proto.SerializeToString()), data).passed
