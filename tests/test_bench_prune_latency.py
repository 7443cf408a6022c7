"""tools/bench_prune_latency.py: the per-class breakdown, the work bound and the table."""

from __future__ import annotations

import pytest

from onnxslim_cv.ir import Model
from onnxslim_cv.testing import models as test_models

from .conftest import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("bench_prune_latency")


def test_work_of_each_node_is_macs_for_weight_layers_and_output_size_otherwise(tool):
    proto = test_models.build("conv_chain", channels=(8, 16))
    model = Model.from_proto(proto)
    work = tool.node_work(model)
    convs = [n for n in model.graph.nodes if n.op == "Conv"]
    relus = [n for n in model.graph.nodes if n.op == "Relu"]
    assert convs and relus
    for node in convs:
        weight = node.inputs[1].values
        out = node.outputs[0].shape
        assert work[node.name] == ("dense conv", weight.size * out[-1] * out[-2])  # MACs of one sample
    for node in relus:
        shape = node.outputs[0].shape
        assert work[node.name] == ("other", shape[0] * shape[1] * shape[2] * shape[3])


def test_breakdown_weights_each_node_by_its_fp32_time(tool):
    before = {"conv": 6.0, "dw": 3.0, "relu": 1.0}
    after = {"conv": 2.0, "dw": 2.0, "relu": 0.9}
    work_before = {"conv": ("dense conv", 400), "dw": ("depthwise / grouped conv", 100), "relu": ("other", 10),
                   "gone": ("other", 5)}
    work_after = {"conv": ("dense conv", 100), "dw": ("depthwise / grouped conv", 50), "relu": ("other", 5)}
    result = tool.breakdown(before, after, work_before, work_after)
    # 0.6 * 0.25 + 0.3 * 0.5 + 0.1 * 0.5
    assert result["bound"] == pytest.approx(0.35)
    assert result["kernel_ratio"] == pytest.approx(4.9 / 10.0)
    dense = result["classes"]["dense conv"]
    assert dense == pytest.approx({"share": 0.6, "time_ratio": 2.0 / 6.0, "work_ratio": 0.25})
    assert result["classes"]["other"]["work_ratio"] == pytest.approx(0.5)


def test_a_node_removed_by_pruning_counts_as_no_work(tool):
    result = tool.breakdown({"a": 1.0, "b": 1.0}, {"a": 1.0}, {"a": ("other", 4), "b": ("other", 4)}, {"a": ("other", 4)})
    assert result["bound"] == pytest.approx(0.5)


def test_table_and_bad_arguments(tool):
    cell = {"target": 0.5, "macs_ratio": 0.5, "latency_ratio": 0.6, "bound": 0.55, "kernel_ratio": 0.6,
            "classes": {"dense conv": {"share": 0.9, "time_ratio": 0.6, "work_ratio": 0.5}}}
    text = tool.table([{"key": "resnet20", "cells": [cell, {"target": 0.1, "error": "unreachable"}]}])
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()[2:]]
    assert rows[0][:8] == ["resnet20", "0.5", "0.500x", "0.60x", "1.20", "0.55x", "1.09", "90%, 0.60x / 0.50x"]
    assert rows[1][:3] == ["resnet20", "0.1", "unreachable"]
    for argv in (["--targets", "0.5,x"], ["--targets", "1.5"], ["--seconds", "0"]):
        with pytest.raises(SystemExit) as info:
            tool.parse_args(argv)
        assert info.value.code == 2
    assert tool.parse_args(["--targets", "0.7, 0.3"]).targets == [0.7, 0.3]
