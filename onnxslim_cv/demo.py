"""``onnxslim-cv demo``: the whole pipeline on a built-in model with a real accuracy.

The model is a small CNN this project trains on scikit-learn's digits (see
onnxslim_cv/data/README.md), so the demo can show top-1 before and after on held-out data
rather than agreement on random inputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from . import calibration, runtime
from .bench import benchmark
from .data import demo_calibration_path, demo_model_path, demo_test_set
from .errors import UserError
from .model_io import StagedModel, file_size, load_model
from .pipeline import PassContext, available_passes, make_passes, run_passes
from .report import environment, format_passes, format_verification, human_bytes, write_json
from .verify import verify

MODEL_NAME = "digits_cnn.onnx"
RESULT_NAME = "digits_cnn.slim.onnx"


def top1_accuracy(model_path, images: np.ndarray, labels: np.ndarray) -> float:
    session = runtime.make_session(str(model_path))
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: images})[0]
    return float(np.mean(logits.argmax(axis=1) == labels))


def demo_pipeline():
    """The passes the demo runs: every registered pass that declares demo options, in order."""
    passes = available_passes()
    names = [name for name, cls in passes.items() if cls.demo_options is not None]
    return make_passes(names, {name: dict(passes[name].demo_options or {}) for name in names})


def run_demo(outdir, *, progress: Optional[bool] = None, quiet: bool = False) -> int:
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"demo output '{outdir}' exists and is not a folder")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create demo folder '{outdir}': {exc.strerror or exc}")

    say = (lambda *_: None) if quiet else print
    source = demo_model_path()
    original = outdir / MODEL_NAME
    shutil.copyfile(source, original)
    model = load_model(original)
    data = calibration.from_path(demo_calibration_path(), model.input_specs())
    passes = demo_pipeline()
    say(f"demo: digits CNN ({source.name}), calibration {data.description}")
    say(f"passes: {', '.join(p.name for p in passes)}")
    result, reports = run_passes(model, passes, context=PassContext(calibration=data, progress=progress))
    say(format_passes(reports))

    result_path = outdir / RESULT_NAME
    with StagedModel(result, result_path) as staged:
        verification = verify(original, staged.path, data, progress=progress)
        staged.commit()
    say(format_verification(verification))

    images, labels = demo_test_set()
    before = top1_accuracy(original, images, labels)
    after = top1_accuracy(result_path, images, labels)
    latency = benchmark([str(original), str(result_path)], threads=1, seconds=2.0, labels=[MODEL_NAME, RESULT_NAME])
    say(
        f"held-out test set ({len(labels)} digits): top-1 {100 * before:.2f}% -> {100 * after:.2f}%; "
        f"size {human_bytes(file_size(original))} -> {human_bytes(file_size(result_path))}; "
        f"latency ratio {latency.ratio:.2f} (1 thread, interleaved)"
    )
    report = {
        "environment": environment(),
        "passes": [r.to_dict() for r in reports],
        "verification": verification.to_dict(),
        "test_top1": {"before": before, "after": after, "samples": int(len(labels))},
        "latency": latency.to_dict(),
        "files": {"original": str(original), "result": str(result_path)},
    }
    write_json(report, outdir / "report.json")
    say(f"wrote {original}, {result_path} and {outdir / 'report.json'}")
    say(f"next: onnxslim-cv inspect {result_path}   |   onnxslim-cv bench {original} {result_path}")
    return 0 if verification.passed else 1
