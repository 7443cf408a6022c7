"""``quant`` on every real model in ../shared/models (skipped when absent).

Each model is quantized from real calibration images with every op placed int8 that can be,
and the result must be a valid model that onnxruntime turns into int8 kernels for every op
the plan meant to be int8 (read from onnxruntime's own optimized graph), while its outputs
stay close to the float model's on held-out inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxslim_cv import qdq, runtime
from onnxslim_cv.model_io import load_model
from onnxslim_cv.pipeline import PassContext, make_passes, run_passes
from onnxslim_cv.testing import zoo

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(zoo.shared_models_dir() is None, reason="shared models folder absent"),
]

KEYS = ["squeezenet", "resnet20", "mnist", "ppocr_cls", "ppocr_det", "ultraface", "fastestdet", "superres"]
CLASSIFIERS = {"squeezenet", "resnet20", "mnist", "ppocr_cls"}
# PP-OCR det's first input is the document photo; the COCO images after it hold no text, so
# their probability maps are all (near) zero and a cosine between them means nothing.
INPUTS = {"ppocr_det": 1}
# Classifiers are checked over 16 inputs: top-1 agreement and the mean cosine of the outputs.
# One image near a tie can flip (ResNet-20's first test image: fp32 logits 8.68 / 8.13), so a
# single image's answer says little; the mean cosine is what saturated int8 kernels lose
# (0.969 on SqueezeNet, 0.960 on ResNet-20 with full-range weights on an AVX2 CPU).
# PP-OCR cls outputs a 2-class softmax that fp32 decides at 1e-9 against 1 on its 12 crops (cycled
# here), and it is calibrated on COCO images, not text: bench_quant finds 10/12 crops agreeing
# for ours and for every onnxruntime variant with 7-bit weights.
CLASSIFIER_INPUTS = 16
CLASSIFIER_FLOORS = {"squeezenet": (0.9, 0.98), "resnet20": (0.9, 0.98), "mnist": (0.9, 0.98),
                     "ppocr_cls": (0.75, 0.9)}  # (top-1 agreement, mean cosine)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("key", KEYS)
def test_quant_fuses_every_planned_op_and_keeps_outputs(key):
    entry = zoo.get(key)
    if entry.key not in {e.key for e in zoo.available()}:
        pytest.skip(f"{key} not in the shared folder")
    model = load_model(entry.model_path(), input_shapes=entry.input_shapes if entry.dynamic else None)
    data = entry.calibration(16)
    quantized, reports = run_passes(
        model, make_passes(["quant"], {"quant": {"placement": "all", "samples": 16}}),
        context=PassContext(calibration=data, progress=False),
    )
    report = reports[0]
    proto = quantized.to_proto()
    onnx.checker.check_model(proto)
    assert proto.ir_version <= runtime.max_ir_version()
    assert report.details["fusion"]["unfused"] == []
    assert report.details["fusion"]["int8_kernels"].get("QLinearConv", 0) > 0

    reference = runtime.make_session(model.to_proto())
    candidate = runtime.make_session(proto)
    if key in CLASSIFIERS:
        agree, cosines = [], []
        for feed in entry.inputs(CLASSIFIER_INPUTS):
            a, b = reference.run(None, feed)[0], candidate.run(None, feed)[0]
            agree.append(np.argmax(a.reshape(a.shape[0], -1), 1).tolist() == np.argmax(b.reshape(b.shape[0], -1), 1).tolist())
            cosines.append(_cosine(a, b))
        min_agreement, min_cosine = CLASSIFIER_FLOORS[key]
        assert np.mean(agree) >= min_agreement, key
        assert np.mean(cosines) >= min_cosine, key
        return
    for feed in entry.inputs(INPUTS.get(key, 2)):
        for a, b in zip(reference.run(None, feed), candidate.run(None, feed)):
            assert _cosine(a, b) >= 0.97, key


@pytest.mark.parametrize("key", ["squeezenet", "resnet20", "superres", "fastestdet"])
def test_pair_safe_weights_of_every_conv_run_exact_at_the_worst_input(key):
    """Each dense conv's real weights, pair-safe for neighbouring pairs, in onnxruntime's fused
    kernel with every input at the top of its type (the most an int16 pair can be asked to
    hold): the same output as the unfused QDQ math. Full-range weights differ on a CPU that
    saturates, so the check can fail."""
    entry = zoo.get(key)
    if entry.key not in {e.key for e in zoo.available()}:
        pytest.skip(f"{key} not in the shared folder")
    model = load_model(entry.model_path(), input_shapes=entry.input_shapes if entry.dynamic else None)
    convs = [n for n in model.graph.nodes if n.op == "Conv" and hasattr(n.inputs[1], "values")
             and int(n.attrs.get("group", 1)) == 1]
    assert convs
    mismatches = {"adjacent": 0, None: 0}
    for node in convs:
        for pairs in mismatches:
            q, _ = qdq.quantize_weight(node.inputs[1].values, 0, pairs)
            y_scale = max(float(np.abs(q.astype(np.int64)).reshape(q.shape[0], -1).sum(axis=1).max()) / 127.0 / 100.0, 1e-3)
            probe = runtime._conv_probe("uint8", q, y_scale=y_scale)
            fused, exact = runtime._probe_output(probe), runtime._probe_output(probe, optimize=False)
            mismatches[pairs] += int(np.abs(fused - exact).max() > 1.01 * y_scale)
    assert mismatches["adjacent"] == 0
    if runtime.int8_products_saturate("uint8"):
        assert mismatches[None] > 0
