"""The core on every real model in ../shared/models: load, fold, emit, verify (skipped when absent).

The issue's bar: ``onnxslim-cv IN OUT --passes fold`` works on every shared model, keeps the
outputs (max relative error <= 1e-5 on real inputs) and ``onnxslim-cv verify`` passes it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxslim_cv import runtime
from onnxslim_cv.model_io import load_model
from onnxslim_cv.stats import model_stats
from onnxslim_cv.testing import zoo

from .conftest import sha256

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(zoo.shared_models_dir() is None, reason="shared models folder absent"),
]

MAX_RELATIVE_ERROR = 1e-5
SAMPLES = 4


def real_inputs_npz(entry, tmp_path):
    """A few preprocessed real samples as an .npz, the way a user hands them to --calib."""
    batch = np.concatenate([item[entry.input_name] for item in entry.inputs(limit=SAMPLES)])
    path = tmp_path / f"{entry.key}.npz"
    np.savez(path, **{entry.input_name: batch})
    return path, batch


def shape_args(entry):
    return ["--input-shape", f"{entry.input_name}:{'x'.join(map(str, entry.input_shape))}"] if entry.dynamic else []


@pytest.mark.parametrize("key", list(zoo.ZOO))
def test_fold_via_the_cli_keeps_outputs_and_passes_verify(key, cli, tmp_path):
    entry = zoo.get(key)
    source = entry.model_path()
    digest = sha256(source)
    data, batch = real_inputs_npz(entry, tmp_path)
    out = tmp_path / "folded.onnx"

    result = cli(source, out, "--passes", "fold", "--calib", data, "--min-cosine", "0.99999", *shape_args(entry))
    assert result.code == 0, result.err
    assert sha256(source) == digest

    emitted = onnx.load(str(out))
    onnx.checker.check_model(emitted, full_check=True)
    assert emitted.ir_version <= runtime.max_ir_version()
    reference, candidate = runtime.make_session(str(source)), runtime.make_session(str(out))
    # Relative to the largest reference value over all samples: a text map that is ~0 on one
    # image has no meaningful per-sample relative error.
    error = scale = 0.0
    for sample in batch:
        feed = {entry.input_name: sample[None]}
        for ref, cand in zip(runtime.run(reference, feed), runtime.run(candidate, feed)):
            error = max(error, float(np.abs(ref.astype(np.float64) - cand).max()))
            scale = max(scale, float(np.abs(ref).max()))
    assert error / scale <= MAX_RELATIVE_ERROR

    assert cli("verify", source, out, "--calib", data, "--min-cosine", "0.99999", *shape_args(entry)).code == 0


@pytest.mark.parametrize("key", list(zoo.ZOO))
def test_inspect_counts_every_weight_layer(key, cli):
    entry = zoo.get(key)
    model = load_model(entry.model_path(), input_shapes=entry.input_shapes if entry.dynamic else None)
    stats = model_stats(model)
    assert stats.macs is not None and stats.macs > 0
    assert len(stats.layers) == sum(1 for n in model.graph.nodes if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul"))


def test_the_ir3_models_lose_their_initializer_inputs():
    for key in ("squeezenet", "resnet20", "mnist", "ultraface"):
        model = load_model(zoo.get(key).model_path())
        assert len(model.graph.inputs) == 1, key


def test_paddle_constant_nodes_become_initializers():
    model = load_model(zoo.get("ppocr_det").model_path())
    assert not [n for n in model.graph.nodes if n.op == "Constant"]
    assert sum(1 for _ in model.constants()) >= 380


def test_fp16_squeezenet_folds_too(cli, tmp_path):
    source = zoo.shared_models_dir() / "imagenet" / "squeezenet1.1_caffe2_fp16.onnx"
    out = tmp_path / "fp16.onnx"
    assert cli(source, out, "--random-inputs", "2").code == 0
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
