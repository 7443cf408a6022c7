"""Channel groups on the command line: ``inspect --groups`` and the prune pass's group table."""

import json
import os

import onnx
import pytest

from onnxslim_cv.depgraph import build_dependency_graph
from onnxslim_cv.model_io import load_model
from onnxslim_cv.pipeline import PassReport
from onnxslim_cv.report import MAX_GROUP_ROWS, format_passes, reason_kind, short_names
from onnxslim_cv.testing import models

from .conftest import assert_one_line_error, chunk_read_through_shape, sha256, unprunable_model


# ---------------------------------------------------------------------- inspect --groups
def test_inspect_groups_lists_groups_after_the_normal_output(cli, model_file):
    path = model_file("resnet_basic_block")
    before = sha256(path)
    result = cli("inspect", path, "--groups")
    assert result.code == 0, result.err
    out = result.out
    # the normal inspect output is still there, the groups come after it
    assert "params" in out and "MACs %" in out
    assert out.index("MACs %") < out.index("channel groups")
    assert "prunable" in out and "conv1, conv3" in out
    assert "frozen: graph output logits" in out
    assert "4/5 groups prunable, 48/48 conv channels in prunable groups" in out
    assert sha256(path) == before


def test_inspect_groups_shows_frozen_reasons(cli, model_file):
    path = model_file("squeezenet_fire")
    before = sha256(path)
    result = cli("inspect", path, "--groups", "--no-layers")
    assert result.code == 0, result.err
    assert "MACs %" not in result.out
    assert "frozen: Softmax softmax1: normalises over the channels" in result.out
    assert "7/8 groups prunable, 66/76 conv channels in prunable groups" in result.out
    assert sha256(path) == before
    result = cli("inspect", model_file("channel_shuffle"), "--groups", "--no-layers")
    assert "frozen: graph output output" in result.out
    assert "1/2 groups prunable, 16/32 conv channels in prunable groups" in result.out


def test_inspect_groups_shows_the_graph_prune_builds(cli, model_file):
    # the channel count is read through Shape: prune evaluates that first, and so does inspect
    path = model_file(chunk_read_through_shape(), "chunk.onnx")
    before = sha256(path)
    data = json.loads(cli("inspect", path, "--groups", "--json").out)
    assert data["dependency_graph"]["prunable_conv_channels"] == 16
    assert not build_dependency_graph(load_model(path)).prunable_groups  # the file as it is
    assert sha256(path) == before


def test_inspect_without_groups_has_no_group_section(cli, model_file):
    result = cli("inspect", model_file("resnet_basic_block"))
    assert result.code == 0 and "channel groups" not in result.out
    data = json.loads(cli("inspect", model_file("resnet_basic_block"), "--json").out)
    assert "groups" not in data and "dependency_graph" not in data


@pytest.mark.parametrize("name", ["squeezenet_fire", "channel_shuffle", "resnet_basic_block"])
def test_inspect_groups_json_matches_the_dependency_graph(cli, model_file, name):
    path = model_file(name)
    before = sha256(path)
    result = cli("inspect", path, "--groups", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["macs"] > 0 and "layers" in data  # the normal keys stay
    dg = build_dependency_graph(load_model(path))
    assert data["dependency_graph"] == dg.summary()
    assert len(data["groups"]) == len(dg.groups)
    for row, group in zip(data["groups"], dg.groups):
        assert set(row) == {"id", "channels", "units", "prunable", "frozen", "sources", "consumers", "tensors", "notes"}
        assert row["id"] == group.id and row["channels"] == group.channels and row["units"] == len(group.units)
        assert row["prunable"] == group.prunable and row["frozen"] == group.frozen
        assert row["sources"] == group.sources and row["consumers"] == group.consumers
        assert row["tensors"] == group.tensors and row["notes"] == group.notes
    summary = data["dependency_graph"]
    assert summary["groups"] == len(data["groups"])
    assert summary["prunable_groups"] == sum(g["prunable"] for g in data["groups"])
    assert summary["channels"] == sum(g["channels"] for g in data["groups"])
    assert sha256(path) == before


def test_inspect_groups_json_frozen_reasons(cli, model_file):
    data = json.loads(cli("inspect", model_file(unprunable_model()), "--groups", "--json").out)
    reasons = [r for g in data["groups"] for r in g["frozen"]]
    assert any(r.startswith("Softmax softmax1") for r in reasons)
    assert any(r.startswith("graph output") for r in reasons)
    assert data["dependency_graph"]["prunable_groups"] == 0


def test_inspect_groups_with_input_shape(cli, model_file):
    proto = models.unet_like()
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "S"
    path = model_file(proto, "dynamic.onnx")
    before = sha256(path)
    fixed = json.loads(cli("inspect", path, "--input-shape", "1x3x32x32", "--groups", "--json").out)
    static = json.loads(cli("inspect", model_file("unet_like"), "--groups", "--json").out)
    assert fixed["dependency_graph"] == static["dependency_graph"]
    assert sha256(path) == before


def test_inspect_groups_garbage_model(cli, tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(os.urandom(2048))
    before = sha256(bad)
    for extra in ([], ["--json"]):
        result = cli("inspect", bad, "--groups", *extra)
        assert_one_line_error(result, "garbage.onnx")
        assert result.out == ""
    assert sha256(bad) == before


def test_inspect_groups_missing_model(cli, tmp_path):
    assert_one_line_error(cli("inspect", tmp_path / "nope.onnx", "--groups"), "does not exist")


def test_inspect_help_mentions_groups(cli):
    result = cli("inspect", "--help")
    assert result.code == 0 and "--groups" in result.out


# ---------------------------------------------------------------------- prune report
def _prune(cli, model_file, tmp_path, name, *extra):
    path = model_file(name)
    before = sha256(path)
    out = tmp_path / "slim.onnx"
    result = cli(
        path, out, "--passes", "fold,prune", "--prune-ratio", "0.5", "--prune-round-to", "1", "--random-inputs", "4", *extra
    )
    assert sha256(path) == before
    return result, out


def test_prune_report_shows_changed_groups(cli, model_file, tmp_path):
    report = tmp_path / "report.json"
    result, out = _prune(cli, model_file, tmp_path, "resnet_basic_block", "--report-json", report)
    assert result.code == 0, result.err
    assert "prune: 4 channel group(s) changed" in result.out
    lines = result.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["group", "sources", "channels"])
    rows = [line.split() for line in lines[header + 2 : header + 6]]
    assert rows[0][:3] == ["0", "conv1,", "conv3"] and rows[0][-3:] == ["8", "->", "4"]
    assert rows[2][-3:] == ["16", "->", "8"]
    assert "prune: 1/5 channel groups frozen: graph output (1)" in result.out
    # the table agrees with the JSON rows of the pass
    groups = json.loads(report.read_text())["passes"][1]["details"]["groups"]
    changed = [g for g in groups if g["kept_units"] < g["units"]]
    assert len(changed) == 4
    assert all(g["channels"] * g["kept_units"] // g["units"] == g["channels"] // 2 for g in changed)
    assert out.exists()


def test_prune_report_on_a_model_with_nothing_prunable(cli, model_file, tmp_path):
    result, _ = _prune(cli, model_file, tmp_path, unprunable_model())
    assert result.code == 0, result.err
    assert "channel group(s) changed" not in result.out
    assert "prune: 2/2 channel groups frozen:" in result.out
    assert "Softmax: normalises over the channels (1)" in result.out and "graph output (1)" in result.out


def test_prune_report_squeezenet(cli, model_file, tmp_path):
    result, _ = _prune(cli, model_file, tmp_path, "squeezenet_fire")
    assert result.code == 0, result.err
    assert "prune: 7 channel group(s) changed" in result.out
    assert "Softmax: normalises over the channels (1)" in result.out


def test_quiet_suppresses_the_group_table(cli, model_file, tmp_path):
    result, out = _prune(cli, model_file, tmp_path, "resnet_basic_block", "--quiet")
    assert result.code == 0, result.err
    assert "channel group" not in result.out and "group" not in result.out
    assert out.exists()


# ---------------------------------------------------------------------- formatting
def _row(i, channels=16, kept=8, frozen=()):
    return {
        "id": i,
        "sources": [f"conv{i}", f"conv{i}b", f"conv{i}c", f"conv{i}d"],
        "consumers": [],
        "nodes": [],
        "channels": channels,
        "units": channels,
        "kept_units": kept,
        "frozen": list(frozen),
        "notes": [],
    }


def test_group_table_is_capped():
    rows = [_row(i) for i in range(MAX_GROUP_ROWS + 7)]
    rows += [_row(100 + i, kept=16, frozen=[f"graph output out{i}"]) for i in range(3)]
    rows += [_row(200, kept=16, frozen=["Reshape r1: reshape splits the channel axis", "graph output z"])]
    rows += [_row(201, kept=16, frozen=["Reshape r2: reshape splits the channel axis"])]
    rows += [_row(202, kept=16, frozen=["Softmax s: normalises over the channels"])]
    rows += [_row(203, kept=16, frozen=["Pad p: pads the channel axis"])]
    report = PassReport("prune", details={"groups": rows})
    text = format_passes([report])
    assert f"prune: {MAX_GROUP_ROWS + 7} channel group(s) changed" in text
    assert "... and 7 more" in text
    assert "conv0, conv0b, conv0c (+1)" in text
    assert "16 -> 8" in text
    assert f"prune: 7/{len(rows)} channel groups frozen: graph output (4), Reshape: reshape splits the channel axis (2)" in text
    assert "Pad: pads the channel axis (1), 1 other reason(s)" in text
    assert len(text.splitlines()) < MAX_GROUP_ROWS + 12


def test_pass_without_groups_prints_no_group_lines():
    text = format_passes([PassReport("fold", changes={"batchnorm_folded": 2})])
    assert "channel group" not in text


def test_reason_kind_and_short_names():
    assert reason_kind("graph output logits") == "graph output"
    assert reason_kind("Reshape model/r:0: reshape splits the channel axis") == "Reshape: reshape splits the channel axis"
    assert reason_kind("x is read inside a subgraph") == "read inside a subgraph"
    assert reason_kind("excluded by --prune-exclude head") == "excluded by --prune-exclude head"
    assert short_names([]) == "-"
    assert short_names(["a", "b"]) == "a, b"
    assert short_names(["a", "b", "c", "d", "e"]) == "a, b, c (+2)"
