"""The pass framework: registry, options, purity of run_passes, reports."""

import numpy as np
import pytest

from onnxslim_cv.errors import UserError
from onnxslim_cv.model_io import load_model
from onnxslim_cv.pipeline import (
    Pass,
    PassContext,
    PassOption,
    PassReport,
    available_passes,
    get_pass,
    parse_pass_list,
    run_passes,
)
from onnxslim_cv.testing import models


class ScaleWeights(Pass):
    """A toy pass: multiplies every Conv weight, to watch the framework around it."""

    name = "scale-weights-test"
    summary = "test pass"
    options = (PassOption("factor", 2.0, "multiplier", parse=float, flag="--test-factor"),)
    demo_options = None

    def validate(self):
        if self.config["factor"] == 0:
            raise UserError("--test-factor must not be 0")

    def run(self, model, context):
        report = PassReport(self.name)
        for node in model.graph.nodes:
            if node.op == "Conv":
                weight = node.inputs[1]
                weight.values = weight.values * self.config["factor"]
                report.count("conv_scaled")
        return report


def test_fold_is_registered_with_its_module():
    assert "fold" in available_passes()
    assert get_pass("fold").__module__ == "onnxslim_cv.passes.fold"


def test_unknown_pass_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown pass 'nope'; known passes: .*fold"):
        get_pass("nope")
    with pytest.raises(UserError, match="unknown pass"):
        parse_pass_list("fold,nope")
    with pytest.raises(UserError, match="empty"):
        parse_pass_list(" , ")


def test_pass_list_keeps_the_given_order():
    assert parse_pass_list("fold, fold") == ["fold", "fold"]


def test_options_are_parsed_validated_and_unknown_ones_refused(temporary_pass):
    cls = temporary_pass(ScaleWeights)
    assert cls(factor="3").config == {"factor": 3.0}
    assert cls().config == {"factor": 2.0}
    with pytest.raises(UserError, match="--test-factor 'x'"):
        cls(factor="x")
    with pytest.raises(UserError, match="must not be 0"):
        cls(factor=0)
    with pytest.raises(UserError, match="has no option colour; its options are: factor"):
        cls(colour=1)


def test_duplicate_flags_are_refused(temporary_pass):
    temporary_pass(ScaleWeights)

    class Clash(ScaleWeights):
        name = "clash-test"

    with pytest.raises(TypeError, match="already used"):
        temporary_pass(Clash)


def test_run_passes_leaves_the_input_model_alone(temporary_pass):
    temporary_pass(ScaleWeights)
    model = load_model(models.conv_chain())
    before = {t.name: t.values.copy() for t in model.constants()}
    nodes_before = [n.op for n in model.graph.nodes]
    result, reports = run_passes(model, ["scale-weights-test", "fold"])
    assert [n.op for n in model.graph.nodes] == nodes_before
    for tensor in model.constants():
        np.testing.assert_array_equal(tensor.values, before[tensor.name])
    conv = next(t for t in result.constants() if t.name == "conv1.weight")
    assert not np.allclose(conv.values, before["conv1.weight"])
    assert [r.name for r in reports] == ["scale-weights-test", "fold"]


def test_reports_measure_every_pass():
    model = load_model(models.resnet_basic_block())
    _, (report,) = run_passes(model, ["fold"])
    assert report.before.num_nodes > report.after.num_nodes
    assert report.before.macs == report.after.macs > 0
    assert report.before.params > report.after.params  # BN parameters folded away
    assert report.seconds > 0
    assert report.changes["batchnorm_folded"] == 6
    data = report.to_dict()
    assert data["before"]["macs"] == report.before.macs and "layers" not in data["before"]


def test_library_call_form(temporary_pass):
    cls = temporary_pass(ScaleWeights)
    model = load_model(models.conv_chain())
    result, report = cls(factor=0.5)(model)
    assert report.changes == {"conv_scaled": 3}
    assert result is not model


def test_a_pass_that_needs_data_says_so(temporary_pass):
    class NeedsData(ScaleWeights):
        name = "needs-data-test"
        options = ()
        requires_calibration = True

        def validate(self):
            pass

    temporary_pass(NeedsData)
    with pytest.raises(UserError, match="needs calibration data"):
        run_passes(load_model(models.conv_chain()), ["needs-data-test"], context=PassContext())
