"""tools/bench_prune.py: options per method, argument parsing and the results table, on
hand-made rows (no shared models needed)."""

from __future__ import annotations

import pytest

from .conftest import load_tool


@pytest.fixture(scope="module")
def bench_prune():
    return load_tool("bench_prune")


def test_only_the_reconstruction_run_gets_the_allocation(bench_prune):
    assert bench_prune.method_options("l1", 0.3, None, "sensitivity") == {
        "ratio": 0.3, "criterion": "l1", "recovery": "none", "round_to": 1}
    assert "allocation" not in bench_prune.method_options("ours", 0.3, 0.6, "sensitivity")
    assert bench_prune.method_options("ours_lsq", 0.3, 0.6, "sensitivity") == {"target_macs": 0.6, "allocation": "sensitivity"}
    assert bench_prune.method_options("ours_lsq", 0.3, 0.6) == {"target_macs": 0.6}


@pytest.mark.parametrize("text", ["0.5,x", "0.5,1.0", ""])
def test_bad_lists_name_their_flag(bench_prune, text):
    with pytest.raises(SystemExit, match="--target-macs"):
        bench_prune._parse_ratios(text, "--target-macs")


def _quality(text):
    return {"samples": 10, "metrics": {}, "primary": {"name": "top-1", "value": 0.5, "text": text},
            "agreement": None, "agreement_primary": None}


def test_fixed_target_rows_show_the_target_and_only_the_reconstruction_run(bench_prune):
    skipped = {"status": "skipped", "error": "fixed MACs target"}
    row = {
        "key": "resnet20",
        "baseline": {"primary": {"name": "top-1", "value": 0.81, "text": "81.00%"}},
        "ratios": [{
            "ratio": None, "target_macs": 0.7, "l1": skipped, "ours": skipped,
            "ours_lsq": {"status": "ok", "macs_ratio": 0.688, "latency_ratio": 0.71, "quality": _quality("69.61%")},
        }],
    }
    table = bench_prune.results_table([row])
    line = next(l for l in table.splitlines() if "resnet20" in l)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:2] == ["resnet20", "MACs 0.7"]
    assert cells[2:8] == ["n/a", "", "", "n/a", "", ""]
    assert cells[8:] == ["0.688", "0.71x", "69.61%"]


def test_the_allocation_auto_chose_is_named_in_the_quality_cell(bench_prune):
    row = {"key": "squeezenet", "baseline": {"primary": {"name": "top-1", "value": 0.6, "text": "60.00%"}}}
    cell = {"status": "ok", "macs_ratio": 0.79, "latency_ratio": 0.8, "quality": _quality("54.00%"),
            "allocation": {"chosen": "marginal", "candidates": {}}}
    assert bench_prune._cells(row, cell) == ["0.790", "0.80x", "54.00% (marginal)"]
    assert bench_prune._cells(row, dict(cell, allocation=None))[2] == "54.00%"
