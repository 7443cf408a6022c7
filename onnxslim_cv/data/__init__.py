"""Built-in demo assets: a small digits CNN plus its calibration and held-out test data.

`onnxslim-cv demo` needs a model with a real, measurable accuracy; these accessors locate
the files through importlib.resources so they resolve wherever the package is installed.
The assets are produced by tools/train_demo_model.py (see README.md in this folder).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Tuple

import numpy as np

DEMO_INPUT_NAME = "image"
"""Name of the demo model's single input (and the only key of the calibration npz)."""

_MODEL_FILE = "digits_cnn.onnx"
_CALIB_FILE = "digits_calib.npz"
_TEST_FILE = "digits_test.npz"
_TEST_LABELS_FILE = "digits_test_labels.npy"


def _asset(name: str) -> Path:
    """Filesystem path of a packaged asset; the CLI and onnxruntime need real paths."""
    path = Path(str(resources.files(__name__).joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(
            f"demo asset {name} is missing from {path.parent}; "
            "regenerate it with `python tools/train_demo_model.py`"
        )
    return path


def demo_model_path() -> Path:
    """The fp32 demo model (BatchNormalization unfolded), input "image" [N,1,8,8]."""
    return _asset(_MODEL_FILE)


def demo_calibration_path() -> Path:
    """128 preprocessed training images in an npz keyed by the input name, ready for --calib."""
    return _asset(_CALIB_FILE)


def demo_test_set() -> Tuple[np.ndarray, np.ndarray]:
    """Held-out test split: (images float32 [K,1,8,8] preprocessed, labels int64 [K])."""
    with np.load(_asset(_TEST_FILE)) as npz:
        images = np.asarray(npz[DEMO_INPUT_NAME], dtype=np.float32)
    labels = np.asarray(np.load(_asset(_TEST_LABELS_FILE)), dtype=np.int64)
    return images, labels


__all__ = ["DEMO_INPUT_NAME", "demo_model_path", "demo_calibration_path", "demo_test_set"]
