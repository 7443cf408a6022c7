"""The command line contract: exit codes, one-line errors, nothing written on failure."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxslim_cv import runtime
from onnxslim_cv.pipeline import Pass, PassReport
from onnxslim_cv.testing import models

from .conftest import assert_one_line_error, sha256


class BreakWeights(Pass):
    """Negates every conv weight: a compression gone wrong, for the gate to catch."""

    name = "break-test"
    summary = "test pass that ruins the model"
    demo_options = None

    def run(self, model, context):
        for node in model.graph.nodes:
            if node.op == "Conv":
                node.inputs[1].values = -node.inputs[1].values
        return PassReport(self.name)


@pytest.fixture
def classifier(model_file):
    return model_file("resnet_basic_block", batch="N")


def npz(tmp_path, name="calib.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def images(n=6, size=16, dtype=np.float32):
    return np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(dtype)


# ---------------------------------------------------------------------- compress
def test_compress_writes_a_verified_model_and_a_report(cli, classifier, tmp_path):
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    before = sha256(classifier)
    result = cli(classifier, out, "--passes", "fold", "--calib", npz(tmp_path, input=images()), "--report-json", report)
    assert result.code == 0, result.err
    assert "verification on" in result.out and "PASS" in result.out
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    runtime.make_session(str(out))
    assert sha256(classifier) == before
    data = json.loads(report.read_text())
    assert data["exit_code"] == 0 and data["output"]["written"]
    assert data["passes"][0]["changes"]["batchnorm_folded"] == 6
    assert data["passes"][0]["before"]["macs"] == data["passes"][0]["after"]["macs"]
    assert data["verification"]["passed"] and data["verification"]["samples"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["resnet_basic_block.onnx", "slim.onnx", "report.json", "calib.npz"])


def test_compress_without_data_warns_that_it_did_not_verify(cli, classifier, tmp_path):
    result = cli(classifier, tmp_path / "slim.onnx")
    assert result.code == 0
    assert "verification skipped" in result.err and "--calib" in result.err
    assert (tmp_path / "slim.onnx").exists()


def test_random_inputs_come_with_a_warning(cli, classifier, tmp_path):
    result = cli(classifier, tmp_path / "slim.onnx", "--random-inputs", "3")
    assert result.code == 0
    assert "random inputs" in result.err and "PASS" in result.out


def test_a_failed_gate_exits_1_and_writes_nothing(cli, classifier, tmp_path, temporary_pass):
    temporary_pass(BreakWeights)
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    result = cli(classifier, out, "--passes", "fold,break-test", "--random-inputs", "4", "--report-json", report)
    assert result.code == 1
    assert "gate failed" in result.out and "not written" in result.err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    data = json.loads(report.read_text())
    assert data["exit_code"] == 1 and not data["output"]["written"] and data["verification"]["failures"]


def test_keep_failed_writes_anyway_but_still_exits_1(cli, classifier, tmp_path, temporary_pass):
    temporary_pass(BreakWeights)
    out = tmp_path / "slim.onnx"
    result = cli(classifier, out, "--passes", "break-test", "--random-inputs", "2", "--keep-failed")
    assert result.code == 1 and out.exists()


def test_no_verify_skips_the_gate(cli, classifier, tmp_path, temporary_pass):
    temporary_pass(BreakWeights)
    result = cli(classifier, tmp_path / "slim.onnx", "--passes", "break-test", "--random-inputs", "2", "--no-verify")
    assert result.code == 0 and "--no-verify" in result.err


def test_force_allows_replacing_the_input(cli, classifier):
    result = cli(classifier, classifier, "--force", "--random-inputs", "2")
    assert result.code == 0
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(classifier)).graph.node)


def test_input_shape_fixes_dynamic_dims_in_the_output(cli, classifier, tmp_path):
    out = tmp_path / "slim.onnx"
    assert cli(classifier, out, "--input-shape", "input:2x3x16x16", "--random-inputs", "2").code == 0
    dims = [d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 16, 16]


def test_external_data_flag(cli, classifier, tmp_path):
    out = tmp_path / "slim.onnx"
    assert cli(classifier, out, "--external-data", "--random-inputs", "2").code == 0
    assert (tmp_path / "slim.onnx.data").exists()


# ---------------------------------------------------------------------- bad input: one test each
def check_bad_input(cli, model, out, *args, fragments=()):
    before = sha256(model) if model.exists() and model.is_file() else None
    result = cli(model, out, *args)
    assert_one_line_error(result, *fragments)
    assert not out.exists()
    if before:
        assert sha256(model) == before
    return result


def test_missing_model(cli, tmp_path):
    check_bad_input(cli, tmp_path / "missing.onnx", tmp_path / "out.onnx", fragments=["does not exist"])


def test_garbage_model(cli, tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(os.urandom(2048))
    check_bad_input(cli, bad, tmp_path / "out.onnx", fragments=["garbage.onnx"])


def test_empty_model(cli, tmp_path):
    bad = tmp_path / "empty.onnx"
    bad.write_bytes(b"")
    check_bad_input(cli, bad, tmp_path / "out.onnx", fragments=["is empty"])


def test_truncated_model(cli, tmp_path):
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(models.resnet_basic_block().SerializeToString()[:5000])
    check_bad_input(cli, bad, tmp_path / "out.onnx", fragments=["truncated.onnx"])


def test_model_the_checker_rejects(cli, model_file, tmp_path):
    proto = models.conv_chain()
    proto.graph.node[1].input[0] = "nowhere"
    check_bad_input(cli, model_file(proto, "bad.onnx"), tmp_path / "out.onnx", fragments=["fails onnx.checker"])


def test_ir_version_onnxruntime_refuses(cli, model_file, tmp_path):
    proto = models.conv_chain()
    proto.ir_version = runtime.max_ir_version() + 1
    if proto.ir_version > onnx.IR_VERSION:
        pytest.skip("onnx cannot write an IR newer than onnxruntime loads")
    check_bad_input(cli, model_file(proto, "new.onnx"), tmp_path / "out.onnx", fragments=["IR version"])


def test_opset_onnxruntime_refuses(cli, model_file, tmp_path):
    proto = models.conv_chain()
    proto.opset_import[0].version = runtime.max_opset() + 1
    if proto.opset_import[0].version > onnx.defs.onnx_opset_version():
        pytest.skip("onnx knows no opset newer than onnxruntime supports")
    check_bad_input(cli, model_file(proto, "new.onnx"), tmp_path / "out.onnx", fragments=["opset"])


def test_unknown_pass_lists_the_known_ones(cli, classifier, tmp_path):
    check_bad_input(cli, classifier, tmp_path / "out.onnx", "--passes", "fold,shrink", fragments=["unknown pass 'shrink'", "fold"])


def test_calibration_names_that_do_not_match(cli, classifier, tmp_path):
    check_bad_input(
        cli, classifier, tmp_path / "out.onnx", "--calib", npz(tmp_path, image=images()), fragments=["missing input 'input'"]
    )


def test_calibration_shapes_that_do_not_match(cli, classifier, tmp_path):
    check_bad_input(
        cli, classifier, tmp_path / "out.onnx", "--calib", npz(tmp_path, input=images(size=20)), fragments=["input"]
    )


def test_calibration_dtypes_that_do_not_match(cli, classifier, tmp_path):
    data = npz(tmp_path, input=np.ones((2, 3, 16, 16), np.int64))
    check_bad_input(cli, classifier, tmp_path / "out.onnx", "--calib", data, fragments=["dtype int64"])


def test_output_equal_to_input_is_refused(cli, classifier):
    before = sha256(classifier)
    result = cli(classifier, classifier)
    assert_one_line_error(result, "is the input file", "--force")
    assert sha256(classifier) == before


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_output_folder_not_writable(cli, classifier):
    check_bad_input(cli, classifier, __import__("pathlib").Path("/proc/self/out.onnx"), fragments=["not writable"])


def test_output_folder_missing(cli, classifier, tmp_path):
    check_bad_input(cli, classifier, tmp_path / "no" / "such" / "out.onnx", fragments=["does not exist"])


def test_bad_input_shape(cli, classifier, tmp_path):
    check_bad_input(cli, classifier, tmp_path / "out.onnx", "--input-shape", "input:1x3x99x99", fragments=["fixed at 16"])


def test_option_for_a_pass_not_selected(cli, classifier, tmp_path, temporary_pass):
    check_bad_input(
        cli, classifier, tmp_path / "out.onnx", "--passes", "fold", "--fold-max-bytes", "x", fragments=["--fold-max-bytes"]
    )


def test_calib_and_random_inputs_together(cli, classifier, tmp_path):
    check_bad_input(
        cli, classifier, tmp_path / "out.onnx", "--calib", npz(tmp_path, input=images()), "--random-inputs", "2",
        fragments=["either --calib or --random-inputs"],
    )


def test_bad_threshold(cli, classifier, tmp_path):
    check_bad_input(cli, classifier, tmp_path / "out.onnx", "--min-cosine", "7", fragments=["--min-cosine"])


def test_usage_errors_are_one_line(cli):
    assert_one_line_error(cli(), "missing IN and OUT")
    assert_one_line_error(cli("a.onnx"), "see 'onnxslim-cv --help'")


def test_debug_shows_the_traceback(cli, tmp_path):
    result = cli(tmp_path / "missing.onnx", tmp_path / "out.onnx", "--debug")
    assert result.code == 2 and "Traceback" in result.err


# ---------------------------------------------------------------------- inspect
def test_inspect_text(cli, model_file):
    result = cli("inspect", model_file("mobilenetv3_block"))
    assert result.code == 0
    for fragment in ("opset 13", "params", "MACs", "ops:", "HardSigmoid", "MACs %"):
        assert fragment in result.out


def test_inspect_json(cli, model_file):
    result = cli("inspect", model_file("squeezenet_fire"), "--json")
    data = json.loads(result.out)
    assert data["macs"] > 0 and data["params"] > 0 and data["op_histogram"]["Concat"] == 2
    assert sum(layer["macs"] for layer in data["layers"]) == data["macs"]


def test_inspect_dynamic_model_asks_for_a_shape(cli, model_file):
    proto = models.unet_like()
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "S"
    path = model_file(proto, "dynamic.onnx")
    assert "--input-shape" in cli("inspect", path).out
    fixed = json.loads(cli("inspect", path, "--input-shape", "1x3x32x32", "--json").out)
    assert fixed["macs"] == json.loads(cli("inspect", model_file("unet_like"), "--json").out)["macs"]


def test_inspect_bad_model(cli, tmp_path):
    assert_one_line_error(cli("inspect", tmp_path / "nope.onnx"), "does not exist")


# ---------------------------------------------------------------------- verify
def test_verify_pass_fail_and_bad_input(cli, model_file, tmp_path):
    reference = model_file("resnet_basic_block", batch="N")
    broken = models.resnet_basic_block(batch="N")
    weight = next(i for i in broken.graph.initializer if i.name == "fc1.weight")
    weight.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(weight), "fc1.weight"))
    candidate = model_file(broken, "broken.onnx")
    data = npz(tmp_path, input=images())
    assert cli("verify", reference, reference, "--calib", data).code == 0
    failed = cli("verify", reference, candidate, "--calib", data, "--min-top1-agreement", "0.9", "--json")
    assert failed.code == 1
    report = json.loads(failed.out)
    assert not report["passed"] and report["outputs"][0]["top1_agreement"] < 0.9
    assert_one_line_error(cli("verify", reference, candidate), "--calib")
    assert_one_line_error(cli("verify", reference, model_file("conv_chain"), "--random-inputs", "1"), "different outputs")


# ---------------------------------------------------------------------- bench
def test_bench_one_and_two_models(cli, model_file):
    a, b = model_file("conv_chain"), model_file("conv_chain", name="b.onnx")
    single = cli("bench", a, "--runs", "5")
    assert single.code == 0 and "median ms" in single.out
    pair = json.loads(cli("bench", a, b, "--runs", "10", "--json").out)
    assert pair["ratio"] > 0 and len(pair["timings"]) == 2
    assert_one_line_error(cli("bench", a, b, a), "one or two")


# ---------------------------------------------------------------------- help and entry points
def test_help_teaches(cli):
    result = cli("--help")
    assert result.code == 0
    for fragment in ("--passes", "fold", "inspect", "verify", "bench", "demo", "exit codes", "--calib", "--min-cosine", "--input-size"):
        assert fragment in result.out
    for command in ("inspect", "verify", "bench", "demo"):
        assert cli(command, "--help").code == 0


def test_module_and_console_script_entry_points(tmp_path):
    module = subprocess.run([sys.executable, "-m", "onnxslim_cv", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert module.returncode == 0 and module.stdout.startswith("onnxslim-cv ")
    script = os.path.join(os.path.dirname(sys.executable), "onnxslim-cv")
    assert os.path.exists(script), "console script not installed: pip install -e '.[test]'"
    bad = subprocess.run([script, str(tmp_path / "x.onnx"), str(tmp_path / "y.onnx")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
