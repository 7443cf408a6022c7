"""tools/bench_lowrank.py: the pure helpers (tables, target checks from measured rows, argument
parsing) on hand-made rows, the exit status without the shared folder, and one small run on
MNIST (skipped when the shared models folder is absent)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any, Dict, Optional

import pytest

from onnxslim_cv.testing import zoo

from .conftest import TOOLS, load_tool

SCRIPT = TOOLS / "bench_lowrank.py"


@pytest.fixture(scope="module")
def bench_lowrank():
    return load_tool("bench_lowrank")


# --------------------------------------------------------------------------------------------
# Hand-made measured rows
# --------------------------------------------------------------------------------------------


def _quality(value: float, text: str, name: str = "top-1") -> Dict[str, Any]:
    primary = {"name": name, "value": value, "text": text}
    return {"samples": 100, "metrics": {}, "primary": primary, "agreement": None, "agreement_primary": None}


def classifier_row(key: str, top1: float, cells) -> Dict[str, Any]:
    return {
        "key": key, "task": "classification", "classifier": True, "metric": "top-1", "eval_samples": 100,
        "calibration_samples": 16, "data": "test", "seconds": 12.0,
        "fp32": {"macs": 40_000_000, "params": 270_000, "latency_ms": 0.5, "self_latency_ratio": 1.01,
                 "quality": _quality(top1, f"{100 * top1:.2f}%"), "quality_value": top1,
                 "quality_text": f"{100 * top1:.2f}%"},
        "cells": list(cells),
    }


def ok_cell(method: str, target: float, *, top1: float, macs: float, latency: float,
            report_macs: Optional[float] = None, forms=None, allocation: str = "error") -> Dict[str, Any]:
    forms = forms if forms is not None else {"spatial": 12, "tucker2": 4}
    return {
        "name": f"t{target:g}.{method}", "method": method, "target": target, "status": "ok",
        "macs_ratio": macs, "params_ratio": macs * 0.9, "report_macs_ratio": macs if report_macs is None else report_macs,
        "latency_ratio": latency, "latency_per_macs": latency / macs, "quality": _quality(top1, f"{100 * top1:.2f}%"),
        "quality_value": top1, "quality_text": f"{100 * top1:.2f}%", "metric": "top-1", "forms": forms,
        "layers_factored": sum(forms.values()), "pass_seconds": 3.5, "seconds": 5.0, "allocation_by": allocation,
    }


def failed_cell(method: str, target: float, status: str, error: str) -> Dict[str, Any]:
    return {"name": f"t{target:g}.{method}", "method": method, "target": target, "status": status, "error": error,
            "seconds": 1.0}


def _cells(line: str):
    """The cells of one markdown table line (an escaped ``\\|`` stays inside its cell)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def _checks(bench_lowrank, rows):
    """The top-1 and whole-model latency checks (the factored-layer check has its own test)."""
    checks = bench_lowrank.target_checks(rows)
    assert len(checks) == 4 and "tiny factor layers" in checks[2]["target"] and "MACs removed" in checks[3]["target"]
    return checks[0], checks[1]


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def test_configs_and_options(bench_lowrank):
    runs = bench_lowrank.configs([0.75, 0.5], ["weight", "data"])
    assert [r["name"] for r in runs] == ["t0.75.weight", "t0.75.data", "t0.5.weight", "t0.5.data"]
    assert bench_lowrank.pass_options(runs[1], 32) == {"target_macs": 0.75, "method": "data", "samples": 32}
    runs = bench_lowrank.configs([0.5], ["data"], round_to=4)  # --round-to: the pass's rank step
    assert bench_lowrank.pass_options(runs[0], 32) == {"target_macs": 0.5, "method": "data", "samples": 32, "round_to": 4}


def test_forms(bench_lowrank):
    layers = [{"form": "tucker2"}, {"form": "spatial"}, {"form": "spatial"}, {"form": "svd"}]
    forms = bench_lowrank.forms_of(layers)
    assert list(forms.items()) == [("spatial", 2), ("svd", 1), ("tucker2", 1)]
    assert bench_lowrank.forms_text(forms) == "spatial 2, svd 1, tucker2 1"
    assert bench_lowrank.forms_text({}) == "–"


def test_results_table(bench_lowrank):
    row = classifier_row("resnet20", 0.80, [
        ok_cell("weight", 0.5, top1=0.70, macs=0.4997, latency=0.62),
        ok_cell("data", 0.5, top1=0.76, macs=0.50, latency=0.64, report_macs=0.45, allocation="marginal"),
        failed_cell("data", 0.1, "unreachable", "UserError: lowrank: --target-macs 0.1 is unreachable: factoring "
                    "every eligible layer at its smallest rank keeps 0.322 of the model's MACs"),
        failed_cell("weight", 0.1, "error", "lowrank: RuntimeError: boom | bad"),
    ])
    table = bench_lowrank.results_table([row])
    lines = [_cells(line) for line in table.splitlines()]
    headers = lines[0]
    assert "task metric" not in headers  # classifiers only
    assert headers[:4] == ["model", "method", "target", "MACs"]
    body = {(line[0], line[1], line[2]): dict(zip(headers, line)) for line in lines[2:] if len(line) == len(headers)}
    fp32 = body[("resnet20", "fp32 (folded)", "–")]
    assert fp32["MACs"].startswith("1.000x") and "self 1.01x" in fp32["latency"] and fp32["quality"] == "80.00%"
    weight = body[("resnet20", "weight (SVD, no data)", "0.5")]
    assert weight["MACs"] == "0.500x" and weight["latency"] == "0.62x" and weight["latency/MACs"] == "1.24"
    assert weight["drop"] == "10.00 pt" and weight["forms"] == "spatial 12, tucker2 4" and weight["layers"] == "16"
    data = body[("resnet20", "data (whitened + refit)", "0.5")]
    assert data["MACs"] == "0.500x (pass: 0.450)"  # the file and the report disagree: both shown
    assert data["drop"] == "4.00 pt" and data["allocation"] == "marginal" and weight["allocation"] == "error"
    assert "unreachable (at best 0.322x)" in table
    assert "error: lowrank: RuntimeError: boom \\| bad" in table  # escaped, still one cell per column
    assert all(len(line) == len(headers) for line in lines)


def test_results_table_agreement_model(bench_lowrank):
    row = classifier_row("ultraface", 0.0, [ok_cell("weight", 0.5, top1=0.9, macs=0.5, latency=0.7)])
    row.update(classifier=False, metric="box F1@0.5")
    row["fp32"]["quality"] = _quality(29.3, "29.33/img", "faces/image")
    row["fp32"]["quality_text"] = "F1 1.0000"
    cell = row["cells"][0]
    cell["quality"]["primary"] = {"name": "faces/image", "value": 27.0, "text": "27.00/img"}
    cell["quality_text"] = "F1 0.9000"
    table = bench_lowrank.results_table([row])
    assert "task metric" in table.splitlines()[0] and "27.00/img" in table
    assert bench_lowrank.benchlib.drop(row, cell)[1] == "10.00 pt"


def test_factored_layer_times(bench_lowrank):
    fp32 = {"conv1": 2.0, "conv2": 4.0, "dw": 3.0, "relu": 1.0}
    after = {"conv1/factor0": 0.5, "conv1": 0.7, "conv2/factor0": 1.0, "conv2/factor1": 0.3, "conv2": 0.9, "dw": 3.1, "relu": 1.0}
    layers = [{"node": "conv1", "macs_before": 100, "macs_after": 50}, {"node": "conv2", "macs_before": 300, "macs_after": 100},
              {"node": "gone", "macs_before": 1000, "macs_after": 10}]  # not in the profile: left out of both sides
    factored = bench_lowrank.factored_layer_times(fp32, after, layers)
    assert factored["layers_timed"] == 2 and factored["layers"] == 3
    assert factored["time_before_ms"] == pytest.approx(6.0) and factored["time_after_ms"] == pytest.approx(3.4)
    assert factored["time_ratio"] == pytest.approx(3.4 / 6.0) and factored["macs_ratio"] == pytest.approx(150 / 400)
    assert factored["share_of_fp32_time"] == pytest.approx(0.6)
    assert bench_lowrank.factored_text(factored) == "0.57x / 0.38x (60%), 2 of 3 layers found"
    assert bench_lowrank.factored_text(None) == ""


def _with_factored(cell, time_ratio, macs_ratio, share=0.5):
    cell["factored"] = {"time_ratio": time_ratio, "macs_ratio": macs_ratio, "share_of_fp32_time": share,
                        "layers_timed": 3, "layers": 3}
    return cell


def test_factored_layers_target(bench_lowrank):
    rows = [classifier_row("resnet20", 0.80, [
        _with_factored(ok_cell("data", 0.5, top1=0.76, macs=0.5, latency=0.7), 0.6, 0.4),
        _with_factored(ok_cell("weight", 0.5, top1=0.70, macs=0.5, latency=0.7), 0.5, 0.45, share=0.7),
    ])]
    (check,) = [c for c in bench_lowrank.target_checks(rows) if "tiny factor layers" in c["target"]]
    assert check["met"] is True and check["worst_factored_time_per_macs"] == pytest.approx(1.5)
    assert "2/2 runs" in check["measured"] and "resnet20 data 0.5: 0.60x time at 0.40x MACs" in check["measured"]
    rows[0]["cells"][1]["factored"]["time_ratio"] = 1.05  # the factored layers got slower
    (check,) = [c for c in bench_lowrank.target_checks(rows) if "tiny factor layers" in c["target"]]
    assert check["met"] is False and "resnet20 weight 0.5: 1.05x" in check["measured"]
    rows[0]["cells"] = [ok_cell("data", 0.5, top1=0.76, macs=0.5, latency=0.7)]  # not profiled
    (check,) = [c for c in bench_lowrank.target_checks(rows) if "tiny factor layers" in c["target"]]
    assert check["met"] is None


def test_latency_bound_and_its_target(bench_lowrank):
    # the factored layers had 60% of the time and keep 25% of their MACs: at best 1 - 0.6 * 0.75 = 0.55
    cell = _with_factored(ok_cell("data", 0.5, top1=0.76, macs=0.5, latency=0.6), 0.5, 0.25, share=0.6)
    assert bench_lowrank.latency_bound(cell) == pytest.approx(0.55)
    assert bench_lowrank.latency_per_bound(cell) == pytest.approx(0.6 / 0.55)
    assert bench_lowrank.latency_bound(ok_cell("data", 0.5, top1=0.76, macs=0.5, latency=0.6)) is None  # not profiled
    rows = [classifier_row("resnet20", 0.80, [cell])]
    check = bench_lowrank.target_checks(rows)[3]
    assert check["met"] is True and check["worst_latency_per_bound"] == pytest.approx(0.6 / 0.55)
    assert "1/1 runs; worst 1.09 (resnet20 data 0.5: latency 0.60x against a bound of 0.55x)" == check["measured"]
    line = bench_lowrank.result_lines(rows[0])[1]
    assert line[bench_lowrank.RESULT_HEADERS.index("latency/bound")] == "1.09"
    cell["latency_ratio"] = 0.65  # 1.18x the bound
    check = bench_lowrank.target_checks(rows)[3]
    assert check["met"] is False and check["above"] == ["resnet20 data 0.5: 1.18"]
    rows[0]["cells"] = [ok_cell("data", 0.5, top1=0.76, macs=0.5, latency=0.7)]
    assert bench_lowrank.target_checks(rows)[3]["met"] is None


def test_targets_met(bench_lowrank):
    rows = [
        classifier_row("resnet20", 0.80, [ok_cell("weight", 0.5, top1=0.70, macs=0.50, latency=0.60),
                                          ok_cell("data", 0.5, top1=0.76, macs=0.4997, latency=0.65)]),
        classifier_row("mnist", 0.98, [ok_cell("data", 0.5, top1=0.98, macs=0.44, latency=0.77)]),
    ]
    top1, latency = _checks(bench_lowrank, rows)
    assert top1["met"] is True and abs(top1["kept"] - 0.95) < 1e-9 and "keeps 95.0% of fp32" in top1["measured"]
    assert latency["met"] is True and latency["slower"] == []
    assert abs(latency["worst_latency_per_macs"] - 0.77 / 0.44) < 1e-9
    assert "3/3 runs faster" in latency["measured"] and "mnist data 0.5" in latency["measured"]
    table = bench_lowrank.targets_table([top1, latency])
    assert "**NO**" not in table and table.count("| yes") == 2


def test_targets_failing(bench_lowrank):
    rows = [classifier_row("resnet20", 0.80, [
        ok_cell("weight", 0.5, top1=0.75, macs=0.50, latency=0.6),
        ok_cell("data", 0.5, top1=0.70, macs=0.50, latency=1.05),  # 87.5% kept, and slower than fp32
        ok_cell("data", 0.75, top1=0.79, macs=1.0, latency=1.02),  # nothing removed: no latency claim
    ])]
    top1, latency = _checks(bench_lowrank, rows)
    assert top1["met"] is False and abs(top1["kept"] - 0.875) < 1e-9
    assert latency["met"] is False
    assert latency["slower"] == ["resnet20 data 0.5: 1.05x at MACs 0.500x"]
    assert abs(latency["worst_latency_per_macs"] - 2.1) < 1e-9
    assert "1/2 runs faster" in latency["measured"]
    assert bench_lowrank.targets_table([top1, latency]).count("**NO**") == 2


def test_target_macs_not_reached_fails(bench_lowrank):
    rows = [classifier_row("resnet20", 0.80, [ok_cell("data", 0.5, top1=0.79, macs=0.56, latency=0.7)])]
    top1, _ = _checks(bench_lowrank, rows)
    assert top1["met"] is False and "keeps more than 0.5 of the MACs" in top1["measured"]


def test_targets_not_run_or_failed(bench_lowrank):
    top1, latency = _checks(bench_lowrank, [classifier_row("mnist", 0.98, [
        ok_cell("weight", 0.5, top1=0.97, macs=0.44, latency=0.8)])])
    assert top1["met"] is None and "not run" in top1["measured"] and "--methods data" in top1["measured"]
    assert latency["met"] is True

    rows = [classifier_row("resnet20", 0.80, [
        failed_cell("data", 0.5, "error", "lowrank: ValueError: bad shapes"),
        ok_cell("weight", 0.5, top1=0.75, macs=0.5, latency=0.6),
        failed_cell("weight", 0.1, "unreachable", "UserError: unreachable"),  # nothing written: not a failure
    ])]
    top1, latency = _checks(bench_lowrank, rows)
    assert top1["met"] is False and "bad shapes" in top1["measured"]
    assert latency["met"] is False and "not measured (failed): resnet20 data 0.5" in latency["measured"]

    top1, latency = _checks(bench_lowrank, [{"key": "resnet20", "error": "RuntimeError: no file"}])
    assert top1["met"] is False and latency["met"] is False


def test_render(bench_lowrank):
    rows = [classifier_row("resnet20", 0.80, [ok_cell("data", 0.5, top1=0.76, macs=0.5, latency=0.6)]),
            {"key": "superres", "error": "RuntimeError: could not load"}]
    text = bench_lowrank.render({"command": "python tools/bench_lowrank.py --models resnet20", "wall_seconds": 90,
                                 "settings": {"latency_seconds": 2.0}, "models": rows,
                                 "code": {"git_head": "abc1234", "files": {"onnxslim_cv.passes.lowrank": "0123456789ab"},
                                          "changed_during_run": ["onnxslim_cv.passes.lowrank"]}})
    assert text.startswith("Command: `python tools/bench_lowrank.py --models resnet20`")
    for heading in ("### Results", "### Models", "### Targets"):
        assert heading in text
    assert "failed: RuntimeError: could not load" in text
    assert "(2 s per pair" in text and "Wall time 1.5 min." in text
    assert "git abc1234" in text and "lowrank 0123456789ab" in text
    assert "Changed on disk during the run: onnxslim_cv.passes.lowrank" in text


def test_parse_args_defaults(bench_lowrank):
    args = bench_lowrank.parse_args([])
    assert args.targets == [0.75, 0.5] and args.methods == ["weight", "data"]
    assert args.models is None and args.eval_limit is None and args.calib == 128 and args.round_to is None
    args = bench_lowrank.parse_args(["--models", "resnet20, mnist", "--targets", "0.5", "--methods", "data",
                                     "--eval-limit", "50", "--latency-seconds", "0.5", "--round-to", "4"])
    assert args.models == ["resnet20", "mnist"] and args.targets == [0.5] and args.methods == ["data"]
    assert args.eval_limit == 50 and args.latency_seconds == 0.5 and args.round_to == 4


@pytest.mark.parametrize("argv, fragment", [
    (["--targets", "0.5,abc"], "--targets"),
    (["--targets", "1.5"], "(0, 1)"),
    (["--targets", ""], "at least one"),
    (["--methods", "weight,magic"], "--methods"),
    (["--models", "resnet20,nosuchmodel"], "--models"),
    (["--calib", "0"], "--calib"),
    (["--eval-limit", "-1"], "--eval-limit"),
    (["--latency-seconds", "0"], "--latency-seconds"),
    (["--round-to", "0"], "--round-to"),
    (["--bogus"], "unrecognized"),
])
def test_bad_arguments_exit_2(bench_lowrank, capsys, argv, fragment):
    with pytest.raises(SystemExit) as info:
        bench_lowrank.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], err


def _env_without_shared(tmp_path) -> Dict[str, str]:
    env = dict(os.environ)
    env[zoo.ENV_VAR] = str(tmp_path / "missing")
    return env


def test_exits_2_without_shared_folder(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--models", "resnet20"], env=_env_without_shared(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "error: the shared models folder is absent" in result.stderr
    assert result.stdout == ""


def test_bad_arguments_exit_2_without_shared_folder(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--methods", "magic"], env=_env_without_shared(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "error:" in result.stderr and result.stdout == ""


# --------------------------------------------------------------------------------------------
# One small real run
# --------------------------------------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.skipif(zoo.shared_models_dir() is None, reason="shared models folder absent")
def test_mnist_small_run(bench_lowrank, tmp_path, capsys):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["--models", "mnist", "--targets", "0.5", "--eval-limit", "200", "--calib", "16",
            "--latency-seconds", "0.5", "--json", str(out), "--markdown", str(md)]
    assert bench_lowrank.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("Command: `python tools/bench_lowrank.py --models mnist --targets 0.5")
    assert "### Results" in text and "### Targets" in text and "error:" not in text
    assert md.read_text().startswith("Command: `python tools/bench_lowrank.py --models mnist")

    results = json.loads(out.read_text())
    (row,) = results["models"]
    assert row["eval_samples"] == 200 and row["calibration_samples"] == 16 and row["classifier"]
    cells = {cell["name"]: cell for cell in row["cells"]}
    assert set(cells) == {"t0.5.weight", "t0.5.data"}
    for cell in cells.values():
        assert cell["status"] == "ok", cell.get("traceback")
        # counted on the written file: MACs within the target, consistent with the pass's own figure
        assert 0 < cell["macs_ratio"] <= 0.5 + 1e-6
        assert abs(cell["macs_ratio"] - cell["report_macs_ratio"]) < 0.005
        assert 0 < cell["params_ratio"] < 1
        assert cell["layers_factored"] >= 1 and sum(cell["forms"].values()) == cell["layers_factored"]
        assert cell["latency_ratio"] > 0 and cell["latency_per_macs"] > 0
        assert 0.5 < cell["quality_value"] <= 1.0 and cell["pass_seconds"] > 0
    assert results["errors"] == []
    assert [t["met"] for t in results["targets"]][0] is None  # resnet20 not run
