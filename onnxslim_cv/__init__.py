"""onnxslim-cv: a graph-level compression compiler for computer-vision ONNX models.

Library use, for conversion scripts::

    import onnxslim_cv as osc

    model = osc.load_model("model.onnx")
    data = osc.calibration.from_path("calib/", model.input_specs(),
                                     preprocess=osc.calibration.ImagePreprocess(scale=1 / 255))
    slim, reports = osc.run_passes(model, ["fold"], context=osc.PassContext(calibration=data))
    osc.save_model(slim, "slim.onnx")
    report = osc.verify("model.onnx", "slim.onnx", data)
    assert report.passed, report.failures
"""

__version__ = "0.1.0"

from . import calibration  # noqa: E402
from .errors import GateFailed, OnnxSlimCVError, UserError  # noqa: E402
from .ir import Model  # noqa: E402
from .model_io import load_model, save_model  # noqa: E402
from .pipeline import (  # noqa: E402
    Pass,
    PassContext,
    PassOption,
    PassReport,
    available_passes,
    get_pass,
    register_pass,
    run_passes,
)
from .stats import model_stats  # noqa: E402
from .verify import Thresholds, verify  # noqa: E402

__all__ = [
    "GateFailed",
    "Model",
    "OnnxSlimCVError",
    "Pass",
    "PassContext",
    "PassOption",
    "PassReport",
    "Thresholds",
    "UserError",
    "available_passes",
    "calibration",
    "get_pass",
    "load_model",
    "model_stats",
    "register_pass",
    "run_passes",
    "save_model",
    "verify",
]
