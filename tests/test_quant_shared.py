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

from onnxslim_cv import runtime
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
# PP-OCR cls outputs a 2-class softmax that fp32 decides at 1e-9 against 1 on these crops, and
# it is calibrated on COCO images (its 12 text crops are the evaluation set). On the second crop
# int8 keeps the class at 0.66 (pair-safe weights on an AVX2 CPU) or 0.68 (full 8-bit weights,
# exact arithmetic): cosine 0.89 / 0.91.
COSINE_FLOOR = {"ppocr_cls": 0.85}


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
    for feed in entry.inputs(INPUTS.get(key, 2)):
        for a, b in zip(reference.run(None, feed), candidate.run(None, feed)):
            if key in CLASSIFIERS:
                assert np.argmax(a.reshape(a.shape[0], -1), 1).tolist() == np.argmax(b.reshape(b.shape[0], -1), 1).tolist()
                assert _cosine(a, b) >= COSINE_FLOOR.get(key, 0.9), key
            else:
                assert _cosine(a, b) >= 0.97, key
