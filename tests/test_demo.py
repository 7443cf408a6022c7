"""``onnxslim-cv demo``: the README's first command, end to end on the built-in model."""

import json
import time

import onnx

from onnxslim_cv import runtime
from onnxslim_cv.demo import demo_pipeline


def test_demo_runs_the_pipeline_and_reports_accuracy(cli, tmp_path):
    started = time.perf_counter()
    result = cli("demo", tmp_path / "demo-out")
    elapsed = time.perf_counter() - started
    assert result.code == 0, result.err
    assert elapsed < 60
    out = tmp_path / "demo-out"
    assert sorted(p.name for p in out.iterdir()) == ["digits_cnn.onnx", "digits_cnn.slim.onnx", "report.json"]
    slim = onnx.load(str(out / "digits_cnn.slim.onnx"))
    onnx.checker.check_model(slim, full_check=True)
    runtime.make_session(slim)
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == [p.name for p in demo_pipeline()]
    assert report["verification"]["passed"]
    top1 = report["test_top1"]
    assert top1["samples"] == 360 and top1["before"] > 0.95
    assert abs(top1["after"] - top1["before"]) <= 0.01
    assert "held-out test set (360 digits): top-1" in result.out


def test_demo_into_a_file_path_is_refused(cli, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = cli("demo", target)
    assert result.code == 2 and "not a folder" in result.err
