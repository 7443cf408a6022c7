"""tools/bench_quant.py: the table rendering (pure, always runs) and one calibration-cost worker
run on a shared model (skipped when the shared models folder is absent)."""

from __future__ import annotations

import re

import pytest

from onnxslim_cv.testing import zoo

from .conftest import load_tool


@pytest.fixture(scope="module")
def bench_quant():
    return load_tool("bench_quant")


def _cell(value, text, r1, r2, seconds=0.5, size=300_000):
    return {"status": "ok", "quality_value": value, "quality_text": text, "metric": "top-1", "seconds": seconds,
            "size": size, "path": "x.onnx",
            "latency": {"1": {"ratio": r1, "ms": [1.0, r1]}, "2": {"ratio": r2, "ms": [0.6, 0.6 * r2]}}}


def fake_results():
    variants = {
        "ort_s8_minmax": _cell(0.80, "80.00%", 0.50, 0.60),
        "ort_s8_pct": _cell(0.81, "81.00%", 0.48, 0.58),
        "ort_u8_minmax": {"status": "error", "error": "ValueError: The truth value of an array | is ambiguous",
                          "seconds": 0.1},
        "ort_u8_pct": _cell(0.81, "81.00%", 0.45, 0.55),
        "ours": _cell(0.812, "81.20%", 0.40, 0.52),
    }
    mem_run = lambda seconds, peak, inc: {"status": "ok", "seconds": seconds, "peak_rss_mb": peak,  # noqa: E731
                                          "peak_increase_mb": inc}
    row = {
        "key": "resnet20", "task": "classification", "classifier": True, "metric": "top-1",
        "eval_samples": 100, "calibration_samples": 16, "calibration": "resnet20: 16 CIFAR-10 test images",
        "fp32": {"opset": [7, 13], "size": 1_090_000, "latency_ms": {"1": 1.0, "2": 0.6},
                 "original": {"primary": {"name": "top-1", "value": 0.815, "text": "81.50%"}},
                 "folded": {"primary": {"name": "top-1", "value": 0.815, "text": "81.50%"}}},
        "variants": variants,
        "versus": {"ort_best": "ort_u8_pct", "ort_fastest": "ort_u8_pct", "quality_delta": 0.002,
                   "head_to_head": {"1": 0.9, "2": 1.1}, "vs_fastest": 0.89},
        "memory": [
            {"name": "ours", "label": "ours (default method)", "runs": {"64": mem_run(1.0, 200, 20),
                                                                       "512": mem_run(5.0, 210, 24)}},
            {"name": "ort_minmax", "label": "ORT MinMax", "runs": {"64": mem_run(2.0, 300, 120),
                                                                   "512": {"status": "killed", "killed_by": "RSS", "error": "killed: RSS",
                                                                           "watched_peak_mb": 6200}}},
        ],
    }
    return {"command": "python tools/bench_quant.py --models resnet20", "wall_seconds": 90.0,
            "settings": {"samples": 16, "eval_limit": 100, "latency_seconds": 1.0, "threads": [1, 2],
                         "ours_options": {}, "memory_samples": [64, 512]},
            "models": [row, {"key": "mnist", "error": "RuntimeError: boom"}]}


def test_render_fake_results(bench_quant):
    text = bench_quant.render(fake_results())
    assert "| resnet20" in text
    assert "81.20% · 0.40x/0.52x" in text  # ours: quality · latency 1T/2T
    assert "80.00% · 0.50x/0.60x" in text
    assert "error: ValueError: The truth value of an array \\| is ambiguous" in text  # pipe escaped
    assert "+0.2 pt" in text  # ours - ORT best
    assert "0.90x/1.10x" in text  # head to head
    assert "ORT uint8 Pct" in text
    assert ">6200 MB" in text and "killed (RSS)" in text  # the killed worker
    assert "1.05x" in text and "1.20x" in text  # peak RSS and increase ratios 512/64
    assert "0.50x/n/a" in text  # calibration time vs ORT MinMax
    assert "mnist: failed before quantizing: RuntimeError: boom" in text
    assert "Command: `python tools/bench_quant.py --models resnet20`. Wall time 1.5 min." in text
    machine = fake_results()
    machine["settings"]["machine"] = "AMD EPYC, 2 logical cores, onnxruntime 1.31.1"
    assert text.endswith("Wall time 1.5 min.")  # older results without the machine line still render
    assert bench_quant.render(machine).endswith("Wall time 1.5 min. Machine: AMD EPYC, 2 logical cores, onnxruntime 1.31.1.")
    checks = {c[0]: c[1:] for c in bench_quant.target_checks(fake_results()["models"][0], ["1", "2"], ["64", "512"])}
    assert checks["top-1 drop ≤ 0.3 pt"] == ["0.3 pt", "yes"]  # 81.5 - 81.2, within rounding
    assert checks["top-1 ≥ ORT best"][1] == "yes"
    assert checks["int8/fp32 latency 1T ≤ 0.45"] == ["0.40x", "yes"]
    assert checks["faster than ORT best (ORT uint8 Pct) at 2T"] == ["1.10x", "**NO**"]
    assert checks["calibration RSS increase @512 ≤ 1.3x @64"] == ["1.20x", "yes"]
    assert checks["whole pass time ≤ ORT MinMax @64 (one run)"] == ["0.50x", "yes"]
    assert checks["whole pass time ≤ ORT MinMax @512 (one run)"][1] == "n/a"
    assert checks["calibration statistics time ≤ ORT MinMax @512 (one run)"][1] == "n/a"


def test_repeated_memory_cells_give_medians_and_paired_ratios(bench_quant, monkeypatch, tmp_path):
    seconds = {"ours": iter([3.0, 1.0, 2.0]), "ort_minmax": iter([1.0, 2.0, 4.0]), "ort_percentile": iter([9.0])}
    calls = []

    def fake_worker(spec, *, limit_mb, timeout):
        name = {"ours": "ours", "minmax": "ort_minmax", "percentile": "ort_percentile"}[spec["method"] or "ours"]
        calls.append(name)
        value = next(seconds[name])
        run = {"status": "ok", "seconds": value, "peak_rss_mb": 100 * value, "peak_increase_mb": 10 * value}
        if name == "ours":
            run["pass_timings"] = {"calibration": value / 2}
        return run

    monkeypatch.setattr(bench_quant, "run_worker", fake_worker)
    monkeypatch.setattr(bench_quant.benchlib, "progress", lambda message: None)
    rows = bench_quant.bench_memory(zoo.ZOO["resnet20"], tmp_path / "m.onnx", tmp_path, samples=[64],
                                    tools=bench_quant.MEMORY_TOOLS, ours_opts={}, limit_mb=0, timeout=1, repeats=3)
    # percentile once; the compared pair three times, the order rotating
    assert calls == ["ours", "ort_minmax", "ort_percentile", "ort_minmax", "ours", "ours", "ort_minmax"]
    ours, minmax, percentile = (row["runs"]["64"] for row in rows)
    assert ours["seconds"] == 2.0 and ours["pass_timings"]["calibration"] == 1.0 and ours["peak_increase_mb"] == 20
    assert minmax["seconds"] == 2.0 and len(minmax["repeats"]) == 3
    assert "repeats" not in percentile
    # per repeat: 3/1, 1/2, 2/4 -> median 0.5 (the ratio of the medians would be 1.0)
    assert bench_quant.paired_ratio(ours, minmax) == pytest.approx(0.5)
    assert bench_quant.paired_ratio(ours, minmax, stats=True) == pytest.approx(0.25)
    assert bench_quant.paired_ratio(percentile, minmax) == pytest.approx(9.0)  # one run: paired with repeat 1
    assert bench_quant.paired_ratio(ours, {"status": "killed"}) is None
    row = {"key": "memory-only", "variants": {}, "memory": rows}
    checks = {c[0]: c[1:] for c in bench_quant.target_checks(row, ["1"], ["64"])}
    assert checks["whole pass time ≤ ORT MinMax @64 (median of 3 paired runs)"] == ["0.50x", "yes"]
    assert checks["calibration statistics time ≤ ORT MinMax @64 (median of 3 paired runs)"] == ["0.25x", "yes"]
    table = bench_quant.memory_table([row], ["64"])
    assert re.search(r"\|\s*2\.00 s \(stats 1\.00 s\)\s*\|.*\|\s*0\.50x\s*\|\s*0\.25x\s*\|", table)


def test_a_killed_memory_cell_is_not_repeated(bench_quant, monkeypatch, tmp_path):
    calls = []

    def fake_worker(spec, *, limit_mb, timeout):
        calls.append(spec["method"])
        if spec["method"] == "minmax":
            return {"status": "killed", "killed_by": "RSS", "error": "killed", "watched_peak_mb": 7000}
        return {"status": "ok", "seconds": 1.0, "peak_rss_mb": 100, "peak_increase_mb": 10}

    monkeypatch.setattr(bench_quant, "run_worker", fake_worker)
    monkeypatch.setattr(bench_quant.benchlib, "progress", lambda message: None)
    rows = bench_quant.bench_memory(zoo.ZOO["resnet20"], tmp_path / "m.onnx", tmp_path, samples=[64],
                                    tools=bench_quant.MEMORY_TOOLS[:2], ours_opts={}, limit_mb=0, timeout=1, repeats=3)
    assert calls.count("minmax") == 1 and calls.count(None) == 3
    assert rows[1]["runs"]["64"]["status"] == "killed"
    assert bench_quant.paired_ratio(rows[0]["runs"]["64"], rows[1]["runs"]["64"]) is None


def test_closeness_table_reads_each_variants_agreement_with_fp32(bench_quant):
    results = fake_results()
    row = results["models"][0]
    for name, (agree, cosine) in {"ort_s8_minmax": (0.93, 0.990), "ort_s8_pct": (0.95, 0.995),
                                  "ort_u8_pct": (0.96, 0.994), "ours": (0.96, 0.996)}.items():
        row["variants"][name]["quality"] = {
            "agreement": {"top1_agreement": agree, "cosine_mean": cosine},
            "agreement_primary": {"name": "top-1 agreement", "value": agree, "text": f"{100 * agree:.2f}%"}}
    table = bench_quant.closeness_table(results["models"])
    line = next(line for line in table.splitlines() if line.startswith("| resnet20"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "top-1 agreement · cosine"
    assert cells[2:6] == ["93.00% · 0.9900", "95.00% · 0.9950", "n/a", "96.00% · 0.9940"]
    assert cells[6:10] == ["n/a"] * 4  # the reduce_range variants, not measured here
    assert cells[10] == "96.00% · 0.9960"
    assert cells[11] == "ours"  # tied agreement with ORT uint8 Pct, higher cosine
    assert "Closeness to fp32" in bench_quant.render(results)
    assert bench_quant.closeness_table([{"key": "x", "error": "boom"}]) == ""


def test_paired_top1_counts_the_images_each_model_alone_gets_right(bench_quant):
    ours = {"quality": {"top1_hits": "1101100111"}}
    other = {"quality": {"top1_hits": "1011101101"}}
    paired = bench_quant.paired_top1(ours, other)
    assert (paired["only_ours"], paired["only_other"]) == (2, 2)  # images 1, 8 against 2, 9
    assert paired["sign_test_p"] == 1.0
    lopsided = bench_quant.paired_top1({"quality": {"top1_hits": "1" * 12}}, {"quality": {"top1_hits": "0" * 12}})
    assert lopsided["only_ours"] == 12 and lopsided["sign_test_p"] == pytest.approx(2 / 2**12)
    assert bench_quant.paired_top1({"quality": {"top1_hits": "10"}}, {"quality": {"top1_hits": "1"}}) is None
    assert bench_quant.paired_top1({"quality": {}}, other) is None

    results = fake_results()
    row = results["models"][0]
    row["versus"]["paired"] = {"only_ours": 9, "only_other": 12, "sign_test_p": 0.664}
    text = bench_quant.render(results)
    assert re.search(r"\|\s*9 / 12 \(p 0\.66\)\s*\|", text)
    checks = {c[0]: c[1:] for c in bench_quant.target_checks(row, ["1", "2"], ["64", "512"])}
    assert checks["top-1 ≥ ORT best"] == ["+0.2 pt (9/12 images, p 0.66)", "yes"]


def test_ort_best_prefers_quality_then_speed(bench_quant):
    row = fake_results()["models"][0]
    best, fastest = bench_quant.ort_best(row, [1, 2])
    assert best == "ort_u8_pct"  # ties with ort_s8_pct on quality, faster at 1 thread
    assert fastest == "ort_u8_pct"


@pytest.mark.shared
@pytest.mark.skipif(zoo.shared_models_dir() is None, reason="shared models folder absent")
def test_worker_measures_quantize_static(bench_quant, tmp_path):
    entry = zoo.get("resnet20")
    fp32 = tmp_path / "resnet20.fp32.onnx"
    prepared = bench_quant.prepare_fp32(entry, fp32)
    assert prepared["opset"][1] >= 13 and fp32.is_file()
    spec = {"key": "resnet20", "model": str(fp32), "output": str(tmp_path / "q.onnx"), "tool": "ort",
            "method": "minmax", "activation": "int8", "samples": 4}
    result = bench_quant.run_worker(spec, limit_mb=0, timeout=120)
    assert result["status"] == "ok", result
    assert result["seconds"] > 0 and result["peak_rss_mb"] > 0
    assert result["samples"] == 4 and "peak_increase_mb" in result and result["peak_rss_mb"] >= result["rss_before_mb"]
    assert (tmp_path / "q.onnx").is_file()
