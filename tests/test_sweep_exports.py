"""tools/sweep_exports.py: each pass's command runs and is checked; the table reports failures."""

from __future__ import annotations

import onnx
import pytest

from onnxslim_cv.testing import models as test_models

from .conftest import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("sweep_exports")


def test_every_pass_command_runs_and_its_output_is_checked(tool, tmp_path):
    path = tmp_path / "block.onnx"
    # 64-channel expansions: --prune-ratio 0.3 removes channels at either conv block (8 on
    # AVX2, 16 on AVX-512), as it does on the sweep's torchvision exports
    onnx.save(test_models.build("mobilenetv2_block", channels=16), str(path))
    summary = tool.graph_summary(path)
    assert summary["prunable_conv_channels"] >= 0.8 * summary["conv_channels"] > 0
    assert summary["frozen"] == []  # its graph output is frozen by design, which the summary leaves out
    for name in tool.DEFAULT_PASSES:
        run = tool.run_pass(path, name, 8, tmp_path)
        assert run["rc"] in (0, 1), (name, run)
        assert run["valid"] is True, (name, run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block.onnx"]  # outputs and reports cleaned up
    assert tool.run_pass(path, "prune", 8, tmp_path)["macs"] < 1.0


def test_frozen_groups_are_summarised_by_their_reason(tool, tmp_path):
    path = tmp_path / "fire.onnx"
    onnx.save(test_models.build("squeezenet_fire"), str(path))
    frozen = tool.graph_summary(path)["frozen"]
    assert frozen and "normalises over the channels" in frozen[0][0] and frozen[0][1] > 0


def test_a_failed_run_and_a_failed_export_show_in_the_table(tool):
    graph = {"conv_channels": 10, "prunable_conv_channels": 8, "frozen": [("graph output y", 2)], "nodes": 5}
    rows = [
        {"model": "a", "exporter": "dynamo", "graph": graph,
         "runs": {"fold": {"rc": 0, "valid": True, "cosine": 1.0, "seconds": 1.0},
                  "quant": {"rc": 2, "error": "onnxslim-cv: error: boom", "seconds": 0.5}}},
        {"model": "b", "exporter": "dynamo", "export_error": "TorchExportError: nope", "runs": {}},
    ]
    text = tool.table(rows, ["fold", "quant"])
    assert "8/10 (80%)" in text and "valid, cos 1.0000" in text
    assert "**error**: onnxslim-cv: error: boom" in text
    assert "export failed: TorchExportError: nope" in text


def test_unknown_names_are_refused(tool, capsys):
    assert tool.main(["--models", "alexnet9"]) == 2
    assert "alexnet9" in capsys.readouterr().err


def test_each_exporter_exports_only_its_frameworks_architectures(tool, tmp_path):
    # vgg16 is a Keras application only: the torch exporters skip it without trying an export
    assert tool.main(["--models", "vgg16", "--exporters", "torchscript,dynamo", "--folder", str(tmp_path),
                      "--passes", "fold"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "vgg16" in tool.KERAS_ARCHITECTURES and "vgg16" not in tool.ARCHITECTURES


def test_an_export_that_fails_the_checker_counts_as_a_failed_export(tool, tmp_path):
    invalid = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("PartitionedCall", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    path = tmp_path / "bad.onnx"
    onnx.save(invalid, str(path))
    assert "PartitionedCall" in tool._checker_error(path)
    onnx.save(test_models.build("conv_chain"), str(path))
    assert tool._checker_error(path) is None
