#!/usr/bin/env python
"""Static int8 quantization: our ``quant`` pass against onnxruntime's ``quantize_static``, on the shared models.

    python tools/bench_quant.py [--models resnet20,squeezenet] [--samples 64] [--eval-limit 200]
                                [--latency-seconds 3] [--threads 1,2] [--ours-options '{"calib_method": "mse"}']
                                [--no-memory | --memory-models squeezenet,resnet20 --memory-samples 64,512]
                                [--markdown out.md] [--json out.json]

For every model, one common fp32 input: the shared file (at the zoo's fixed input shape for
the dynamic models), upgraded to opset 13 with ``onnx.version_converter`` when older, then
our ``fold`` pass. Every variant starts from that file, and it is the reference for latency
and agreement:

* **ORT int8/uint8 x MinMax/Percentile, with and without reduce_range (RR)**:
  ``onnxruntime.quantization.quantize_static`` with ``QuantFormat.QDQ``, ``per_channel=True``,
  ``weight_type=QInt8``, QInt8 or QUInt8 activations and ``reduce_range`` False or True (7-bit
  weights, onnxruntime's remedy on x86 CPUs without VNNI, whose int8 kernels saturate),
  everything else at its defaults (no ``quant_pre_process``);
* **ours**: ``run_passes(load_model(fp32), make_passes(["quant"], {"quant": options}))`` with
  our defaults, or ``--ours-options`` JSON.

All variants calibrate on the same decoded samples (``--samples``, from the back of the zoo's
pool) and are evaluated on the same samples from the front (:func:`benchlib.disjoint_split`).
For each: quality (top-1 on labelled models; the task agreement with fp32 otherwise:
detections F1, text-map IoU, PSNR), onnxruntime latency against fp32 at every ``--threads``
count (interleaved median ratio), the quantization call's wall time and the file size; per
model, ours head to head (interleaved) against the best ORT variant (best quality, ties
broken by 1-thread speed).

Calibration cost (``--memory``, on by default for ``--memory-models``): every (model, tool,
sample count) runs in a fresh worker process (``--worker``, this script again) that decodes the
samples into memory first, then measures the quantization call alone: wall time, peak RSS
(the kernel's high-water mark ``VmHWM``, reset to the current RSS through
``/proc/self/clear_refs`` just before the call; ``ru_maxrss`` where that is not possible, and
recorded in the JSON either way) and the peak's increase over the RSS just before. Small pools are cycled to reach the
sample count. A worker whose RSS passes ``--memory-limit-mb`` is killed (and reported so):
onnxruntime's calibrators keep every intermediate tensor of every sample. Ours and ORT MinMax,
the pair the time target compares, run ``--memory-repeats`` times each, interleaved (the order
rotates every repeat): single runs of the same cell vary by up to 1.5x on this machine. Their
cells show medians, and a ratio is the median of the per-repeat ratios.

Every failure (quantize_static crashing on a model, our pass missing or raising, onnxruntime
rejecting an output) is caught per cell and shown in the table; the rest still runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (also puts the repo on sys.path)

from onnxslim_cv.report import human_bytes  # noqa: E402
from onnxslim_cv.testing import zoo  # noqa: E402

MIN_OPSET = 13
DEFAULT_SAMPLES = 64
DEFAULT_EVAL_LIMIT = 200
DEFAULT_LATENCY_SECONDS = 3.0
DEFAULT_THREADS = (1, 2)
DEFAULT_MEMORY_MODELS = ("squeezenet", "resnet20")
DEFAULT_MEMORY_SAMPLES = (64, 512)
DEFAULT_MEMORY_LIMIT_MB = 6144
DEFAULT_MEMORY_TIMEOUT = 1800.0
DEFAULT_MEMORY_REPEATS = 5

# (name, column label, activation type, calibration method, reduce_range). reduce_range (7-bit
# weights) is onnxruntime's own remedy for CPUs whose int8 kernels saturate (x86 without VNNI),
# so both settings run and the best ORT variant is taken over all of them.
ORT_VARIANTS: Tuple[Tuple[str, str, str, str, bool], ...] = (
    ("ort_s8_minmax", "ORT int8 MinMax", "int8", "minmax", False),
    ("ort_s8_pct", "ORT int8 Pct", "int8", "percentile", False),
    ("ort_u8_minmax", "ORT uint8 MinMax", "uint8", "minmax", False),
    ("ort_u8_pct", "ORT uint8 Pct", "uint8", "percentile", False),
    ("ort_s8_minmax_rr", "ORT int8 MinMax RR", "int8", "minmax", True),
    ("ort_s8_pct_rr", "ORT int8 Pct RR", "int8", "percentile", True),
    ("ort_u8_minmax_rr", "ORT uint8 MinMax RR", "uint8", "minmax", True),
    ("ort_u8_pct_rr", "ORT uint8 Pct RR", "uint8", "percentile", True),
)
OURS = ("ours", "ours")
VARIANTS: Tuple[Tuple[str, str], ...] = tuple((v[0], v[1]) for v in ORT_VARIANTS) + (OURS,)

# Calibration-cost rows: (name, label, tool, method); ORT runs use int8 activations
MEMORY_TOOLS = (
    ("ours", "ours (default method)", "ours", None),
    ("ort_minmax", "ORT MinMax", "ort", "minmax"),
    ("ort_percentile", "ORT Percentile", "ort", "percentile"),
)
MEMORY_ENTROPY = ("ort_entropy", "ORT Entropy", "ort", "entropy")
REPEATED_MEMORY_TOOLS = ("ours", "ort_minmax")
"""The pair the calibration-time target compares: run ``--memory-repeats`` times, interleaved."""

# Targets of issue 6
TOP1_TARGET_MODELS = ("squeezenet", "resnet20")
TOP1_MAX_DROP = 0.003
F1_MIN = 0.9
DETECTORS = ("ultraface", "fastestdet", "ppocr_det")
CLASSIFIER_MAX_LATENCY = 0.45
DETECTOR_MAX_LATENCY = 0.7
MAX_RSS_GROWTH = 1.3


# --------------------------------------------------------------------------------------------
# Quiet: onnxruntime and its quantizer log a lot
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The variants
# --------------------------------------------------------------------------------------------


def prepare_fp32(entry: zoo.SharedModel, path: Path) -> Dict[str, Any]:
    """The common fp32 input: opset >= 13, fixed input shape, after ``fold``; saved to ``path``."""
    from onnx import version_converter

    from onnxslim_cv import runtime
    from onnxslim_cv.model_io import file_size, load_model, read_proto, save_model
    from onnxslim_cv.pipeline import PassContext, make_passes, run_passes

    started = time.perf_counter()
    proto = read_proto(entry.model_path())
    opset = runtime.default_opset(proto)
    if opset < MIN_OPSET:
        proto = version_converter.convert_version(proto, MIN_OPSET)
    model = load_model(proto, input_shapes=entry.input_shapes if entry.dynamic else None)
    folded, reports = run_passes(model, make_passes(["fold"]), context=PassContext(progress=False), measure=False)
    save_model(folded, path)
    return {"opset": [opset, max(opset, MIN_OPSET)], "fold_seconds": reports[0].seconds,
            "size": file_size(path), "seconds": time.perf_counter() - started}


def ort_quantize(fp32: Path, output: Path, calibration, activation: str, method: str,
                 extra_options: Optional[Dict[str, Any]] = None, reduce_range: bool = False) -> None:
    """``quantize_static``: QDQ, per-channel int8 (or 7-bit: ``reduce_range``) weights, int8 or uint8 activations."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from onnxslim_cv.calibration import as_ort_reader

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    activations = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    with benchlib.stdout_to_stderr():
        quantize_static(
            str(fp32), str(output), as_ort_reader(calibration),
            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
            activation_type=activations[activation], calibrate_method=methods[method],
            extra_options=extra_options, reduce_range=reduce_range,
        )


def ours_options(options: Optional[Dict[str, Any]], samples: Optional[int]) -> Dict[str, Any]:
    """``options`` plus ``samples=<calibration count>`` when the pass has such an option and it is
    not given (so a pass default below the count does not silently use fewer samples than ORT)."""
    from onnxslim_cv.pipeline import get_pass

    resolved = dict(options or {})
    names = {option.name for option in get_pass("quant").options}  # UserError when the pass is absent
    if samples and "samples" in names and "samples" not in resolved:
        resolved["samples"] = samples
    return resolved


def ours_quantize(fp32: Path, output: Path, calibration, options: Dict[str, Any]):
    """Our pass on the fp32 file; returns its report."""
    from onnxslim_cv.model_io import load_model, save_model
    from onnxslim_cv.pipeline import PassContext, make_passes, run_passes

    with benchlib.stdout_to_stderr():
        model = load_model(fp32)
        passes = make_passes(["quant"], {"quant": dict(options)})
        result, reports = run_passes(model, passes, context=PassContext(calibration=calibration, progress=False))
        save_model(result, output)
    return reports[-1]


def measure_output(cell: Dict[str, Any], entry, fp32: Path, output: Path, *, classifier: bool, eval_n: int,
                   threads: Sequence[int], latency_seconds: float) -> None:
    from evaluate import evaluate

    from onnxslim_cv.bench import benchmark
    from onnxslim_cv.model_io import file_size

    cell["size"] = file_size(output)
    cell["latency"] = {}
    for t in threads:
        report = benchmark([str(fp32), str(output)], threads=t, seconds=latency_seconds,
                           input_shapes=entry.input_shapes, labels=["fp32", output.name])
        cell["latency"][str(t)] = {"ratio": report.ratio, "ms": [x.median_ms for x in report.timings]}
    quality = evaluate(output, entry, reference=fp32, limit=eval_n)
    cell["quality"] = {k: quality[k] for k in ("samples", "metrics", "primary", "agreement", "agreement_primary")}
    if quality.get("top1_hits"):
        cell["quality"]["top1_hits"] = quality["top1_hits"]
    cell["quality_value"], cell["quality_text"], cell["metric"] = benchlib.quality_of(classifier, quality)


def run_variant(name: str, entry, fp32: Path, folder: Path, calibration, *, classifier: bool, eval_n: int,
                threads: Sequence[int], latency_seconds: float, options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Quantize, save, measure; never raises (a failure is a result)."""
    cell: Dict[str, Any] = {"status": "ok"}
    output = folder / f"{entry.key}.{name}.onnx"
    started = time.perf_counter()
    try:
        if name == "ours":
            cell["options"] = ours_options(options, calibration.count())
            report = ours_quantize(fp32, output, calibration, cell["options"])
            cell.update(pass_seconds=report.seconds, changes=report.changes, notes=report.notes,
                        warnings=report.warnings)
        else:
            _, _, activation, method, reduce_range = next(v for v in ORT_VARIANTS if v[0] == name)
            ort_quantize(fp32, output, calibration, activation, method, reduce_range=reduce_range)
    except Exception as exc:  # quantize_static crashes on some models; our pass may not exist yet
        cell.update(status="error", error=benchlib.error_text(exc), traceback=traceback.format_exc(),
                    seconds=time.perf_counter() - started)
        benchlib.progress(f"  {name}: FAILED {cell['error']}")
        return cell
    cell["seconds"] = time.perf_counter() - started
    cell["path"] = str(output)
    try:
        measure_output(cell, entry, fp32, output, classifier=classifier, eval_n=eval_n, threads=threads,
                       latency_seconds=latency_seconds)
    except Exception as exc:
        cell.update(status="error", error=f"measuring: {benchlib.error_text(exc)}", traceback=traceback.format_exc())
        benchlib.progress(f"  {name}: measuring failed: {cell['error']}")
        return cell
    lat = " / ".join(f"{cell['latency'][str(t)]['ratio']:.2f}x@{t}T" for t in threads)
    benchlib.progress(f"  {name}: {cell['quality_text']}, {lat}, {cell['seconds']:.1f} s")
    return cell


def _latency1(cell: Dict[str, Any], threads: Sequence[int]) -> float:
    value = cell.get("latency", {}).get(str(threads[0]), {}).get("ratio")
    return float("inf") if value is None else value


def ort_best(row: Dict[str, Any], threads: Sequence[int]) -> Tuple[Optional[str], Optional[str]]:
    """(best-quality ORT variant, ties broken by 1-thread latency; fastest ORT variant)."""
    measured = [(name, row["variants"][name]) for name, *_ in ORT_VARIANTS
                if row["variants"].get(name, {}).get("status") == "ok"]
    scored = [(n, c) for n, c in measured if c.get("quality_value") is not None]
    best = max(scored, key=lambda nc: (nc[1]["quality_value"], -_latency1(nc[1], threads)))[0] if scored else None
    fastest = min(measured, key=lambda nc: _latency1(nc[1], threads))[0] if measured else None
    return best, fastest


def paired_top1(ours: Dict[str, Any], other: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Images only ours gets right, images only ``other`` gets right, and the two-sided sign
    test of that split (exact binomial, p = 0.5): whether a top-1 difference between two
    models scored on the same images is more than chance. None without per-image results."""
    a = (ours.get("quality") or {}).get("top1_hits")
    b = (other.get("quality") or {}).get("top1_hits")
    if not a or not b or len(a) != len(b):
        return None
    only_ours = sum(1 for x, y in zip(a, b) if x == "1" and y == "0")
    only_other = sum(1 for x, y in zip(a, b) if x == "0" and y == "1")
    n, k = only_ours + only_other, min(only_ours, only_other)
    p = 1.0 if n == 0 else min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n)
    return {"only_ours": only_ours, "only_other": only_other, "sign_test_p": p}


def versus(row: Dict[str, Any], entry, *, threads: Sequence[int], latency_seconds: float) -> Dict[str, Any]:
    """Ours against the best ORT variant: quality difference, interleaved head-to-head latency."""
    from onnxslim_cv.bench import benchmark

    best, fastest = ort_best(row, threads)
    result: Dict[str, Any] = {"ort_best": best, "ort_fastest": fastest}
    ours = row["variants"].get("ours", {})
    if ours.get("status") != "ok" or best is None:
        result["error"] = "ours failed" if ours.get("status") != "ok" else "no ORT variant succeeded"
        return result
    best_cell = row["variants"][best]
    if ours.get("quality_value") is not None:
        result["quality_delta"] = ours["quality_value"] - best_cell["quality_value"]
    paired = paired_top1(ours, best_cell)
    if paired is not None:
        result["paired"] = paired
    result["head_to_head"] = {}
    try:
        for t in threads:
            report = benchmark([best_cell["path"], ours["path"]], threads=t, seconds=latency_seconds,
                               input_shapes=entry.input_shapes, labels=[best, "ours"])
            result["head_to_head"][str(t)] = report.ratio
    except Exception as exc:
        result["error"] = f"head-to-head: {benchlib.error_text(exc)}"
    if fastest is not None:
        result["vs_fastest"] = _latency1(ours, threads) / _latency1(row["variants"][fastest], threads)
    return result


# --------------------------------------------------------------------------------------------
# Calibration cost: one fresh worker process per (model, tool, samples)
# --------------------------------------------------------------------------------------------


def _status_kb(field: str, pid: str = "self") -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM and ru_maxrss) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def memory_calibration(key: str, samples: int):
    """``samples`` decoded calibration samples of ``key`` in memory, the pool cycled when smaller."""
    from onnxslim_cv.calibration import CalibrationData

    entry = zoo.get(key)
    pool = len(entry.calibration_sample_names())
    distinct = [item for item in entry.calibration(min(samples, pool))]
    items = [distinct[i % len(distinct)] for i in range(samples)]  # cycled: the same arrays again
    description = f"{key}: {samples} samples ({len(distinct)} distinct{', cycled' if samples > len(distinct) else ''})"
    data = CalibrationData(entry.specs(), lambda: ((f"{key} sample {i}", item) for i, item in enumerate(items)),
                           description=description, total=samples)
    return data, len(distinct)


def worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run one quantization as ``spec`` says and measure it; what ``--worker`` prints as JSON."""
    benchlib.quiet("", "onnxruntime.quantization")
    import onnxruntime.quantization  # noqa: F401  (imported before measuring, for both tools alike)

    import onnxslim_cv.passes  # noqa: F401

    data, distinct = memory_calibration(spec["key"], int(spec["samples"]))
    options = ours_options(spec.get("ours_options"), int(spec["samples"])) if spec["tool"] == "ours" else None
    gc.collect()
    rss_before = _status_kb("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = _reset_peak_rss()
    started = time.perf_counter()
    timings = None
    if spec["tool"] == "ours":
        report = ours_quantize(Path(spec["model"]), Path(spec["output"]), data, options)
        timings = report.details.get("timings")
    else:
        ort_quantize(Path(spec["model"]), Path(spec["output"]), data, spec.get("activation", "int8"), spec["method"])
    seconds = time.perf_counter() - started
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = _status_kb("VmHWM")
    # ru_maxrss also holds the parent's RSS at fork() (the kernel carries it across exec), which
    # clear_refs does not reset; VmHWM is this process's own mark, reset just before the call.
    peak = hwm if reset and hwm else maxrss_after
    return {
        "tool": spec["tool"], "method": spec.get("method"), "samples": int(spec["samples"]), "distinct": distinct,
        "seconds": seconds, "rss_before_mb": (rss_before or 0) / 1024, "maxrss_before_mb": maxrss_before / 1024,
        "ru_maxrss_mb": maxrss_after / 1024, "vmhwm_mb": (hwm or 0) / 1024,
        "peak_rss_mb": peak / 1024, "peak_increase_mb": (peak - (rss_before or 0)) / 1024,
        "peak_reset": reset, "options": options, "pass_timings": timings,
    }


def run_worker(spec: Dict[str, Any], *, limit_mb: float, timeout: float) -> Dict[str, Any]:
    """``--worker`` in a fresh process, killed past ``limit_mb`` of RSS (0 = no limit) or ``timeout``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        started, watched_mb, killed = time.perf_counter(), 0.0, None
        while process.poll() is None:
            rss = _status_kb("VmRSS", str(process.pid))
            watched_mb = max(watched_mb, (rss or 0) / 1024)
            if limit_mb and watched_mb > limit_mb:
                killed = "RSS"
                reason = f"killed: RSS over {limit_mb:.0f} MB (--memory-limit-mb)"
            elif time.perf_counter() - started > timeout:
                killed = "timeout"
                reason = f"killed: over {timeout:.0f} s (--memory-timeout)"
            if killed:
                process.kill()
                process.wait()
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed:
        return {"status": "killed", "killed_by": killed, "error": reason, "watched_peak_mb": watched_mb,
                "seconds_at_kill": time.perf_counter() - started}
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            result.setdefault("status", "ok")
            result["watched_peak_mb"] = watched_mb
            return result
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", lines[-1])[:200] if lines else f"exit code {process.returncode}"
    return {"status": "error", "error": last,
            "stderr_tail": lines[-12:]}


def bench_memory(entry, fp32: Path, folder: Path, *, samples: Sequence[int], tools, ours_opts,
                 limit_mb: float, timeout: float, repeats: int = 1) -> List[Dict[str, Any]]:
    """Every tool at every sample count; the repeated pair interleaved, in a rotating order."""
    labels = {name: (f"ours {json.dumps(ours_opts)}" if tool == "ours" and ours_opts else label)
              for name, label, tool, _ in tools}
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {name: {str(n): [] for n in samples} for name, *_ in tools}
    for repeat in range(repeats):
        order = list(tools[repeat % len(tools):]) + list(tools[:repeat % len(tools)])
        for n in samples:
            for name, _, tool, method in order:
                done = runs[name][str(n)]
                if repeat and (name not in REPEATED_MEMORY_TOOLS or done[-1].get("status") != "ok"):
                    continue  # the others once; a killed or failed cell is not run again
                spec = {"key": entry.key, "model": str(fp32), "output": str(folder / f"{entry.key}.mem.{name}.{n}.onnx"),
                        "tool": tool, "method": method, "activation": "int8", "samples": n, "ours_options": ours_opts}
                which = f" (repeat {repeat + 1}/{repeats})" if repeats > 1 and name in REPEATED_MEMORY_TOOLS else ""
                benchlib.progress(f"  calibration cost: {labels[name]}, {n} samples{which} ...")
                result = run_worker(spec, limit_mb=limit_mb, timeout=timeout)
                Path(spec["output"]).unlink(missing_ok=True)
                done.append(result)
                if result.get("status") == "ok":
                    benchlib.progress(f"    {result['seconds']:.2f} s, peak {result['peak_rss_mb']:.0f} MB "
                                      f"(+{result['peak_increase_mb']:.0f} MB)")
                else:
                    benchlib.progress(f"    {result['error']}")
    return [{"name": name, "label": labels[name], "tool": tool, "method": method,
             "runs": {n: _median_run(cell) for n, cell in runs[name].items()}}
            for name, _, tool, method in tools]


def _stats_seconds(run: Dict[str, Any]) -> Optional[float]:
    """Our pass's statistics step (the part comparable with a calibrator), None for onnxruntime."""
    return (run.get("pass_timings") or {}).get("calibration")


def _median_run(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One cell from its repeats: the medians of time, statistics time and RSS; every repeat kept."""
    ok = [r for r in results if r.get("status") == "ok"]
    if not ok:
        return results[-1]
    cell = dict(sorted(ok, key=lambda r: r["seconds"])[len(ok) // 2])
    if len(results) > 1:
        cell["seconds"] = float(statistics.median([r["seconds"] for r in ok]))
        for field in ("peak_rss_mb", "peak_increase_mb"):
            cell[field] = float(statistics.median([r[field] for r in ok]))
        steps = [_stats_seconds(r) for r in ok]
        if all(step is not None for step in steps):
            cell["pass_timings"] = {**(cell.get("pass_timings") or {}), "calibration": float(statistics.median(steps))}
        cell["repeats"] = results
    return cell


def paired_ratio(mine: Optional[Dict[str, Any]], reference: Optional[Dict[str, Any]], *,
                 stats: bool = False) -> Optional[float]:
    """Median over repeats of (ours / reference) time, each repeat paired with the reference's same repeat.

    ``stats``: our statistics step instead of our whole call. None when either side has no time.
    """
    if not _mem_ok(mine) or not _mem_ok(reference):
        return None
    ours_runs, ref_runs = mine.get("repeats") or [mine], reference.get("repeats") or [reference]
    ratios = []
    for a, b in zip(ours_runs, ref_runs):
        if _mem_ok(a) and _mem_ok(b) and b["seconds"] > 0:
            top = _stats_seconds(a) if stats else a["seconds"]
            if top is not None:
                ratios.append(top / b["seconds"])
    return float(statistics.median(ratios)) if ratios else None


# --------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------


def bench_model(entry: zoo.SharedModel, folder: Path, args) -> Dict[str, Any]:
    from evaluate import evaluate

    started = time.perf_counter()
    threads = args.threads
    eval_n, calib_n = benchlib.disjoint_split(entry, args.eval_limit, args.samples)
    fp32 = folder / f"{entry.key}.fp32.onnx"
    prepared = prepare_fp32(entry, fp32)
    calibration = benchlib.in_memory(entry.calibration(calib_n))
    data = benchlib.CachedEntry(entry)  # every variant is evaluated on the same decoded samples
    original = evaluate(entry.model_path(), data, limit=eval_n)
    folded = evaluate(fp32, data, limit=eval_n)
    classifier = folded["primary"]["name"] == "top-1"
    row: Dict[str, Any] = {
        "key": entry.key, "task": entry.task, "classifier": classifier,
        "eval_samples": eval_n, "calibration_samples": calib_n, "calibration": calibration.description,
        "fp32": {**prepared,
                 "original": {k: original[k] for k in ("samples", "metrics", "primary")},
                 "folded": {k: folded[k] for k in ("samples", "metrics", "primary")}},
        "variants": {},
    }
    for name, label in VARIANTS:
        benchlib.progress(f"{entry.key}: {label} ...")
        row["variants"][name] = run_variant(
            name, data, fp32, folder, calibration, classifier=classifier, eval_n=eval_n, threads=threads,
            latency_seconds=args.latency_seconds, options=args.ours_options,
        )
    for cell in row["variants"].values():
        if cell.get("quality_value") is not None and cell.get("metric"):
            row["metric"] = cell["metric"]
    row["fp32"]["latency_ms"] = {}
    for t in threads:
        values = sorted(c["latency"][str(t)]["ms"][0] for c in row["variants"].values() if c.get("latency"))
        row["fp32"]["latency_ms"][str(t)] = values[len(values) // 2] if values else None
    benchlib.progress(f"{entry.key}: ours vs best ORT variant ...")
    row["versus"] = versus(row, data, threads=threads, latency_seconds=args.latency_seconds)
    if args.memory and entry.key in args.memory_models:
        tools = MEMORY_TOOLS + ((MEMORY_ENTROPY,) if args.with_entropy else ())
        row["memory"] = bench_memory(entry, fp32, folder, samples=args.memory_samples, tools=tools,
                                     ours_opts=args.ours_options, limit_mb=args.memory_limit_mb,
                                     timeout=args.memory_timeout, repeats=args.memory_repeats)
    row["seconds"] = time.perf_counter() - started
    return row


# --------------------------------------------------------------------------------------------
# Tables (pure functions of the results dict, so they can be re-rendered from --json)
# --------------------------------------------------------------------------------------------


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _x(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _error_cell(cell: Dict[str, Any], width: int = 56) -> str:
    text = cell.get("error", "error")
    return _md("error: " + (text if len(text) <= width else text[: width - 3] + "..."))


def _latencies(cell: Dict[str, Any], threads: Sequence[str]) -> str:
    return "/".join(_x(cell.get("latency", {}).get(t, {}).get("ratio")) for t in threads)


def _delta_text(row: Dict[str, Any], delta: Optional[float]) -> str:
    if delta is None:
        return "n/a"
    if row.get("classifier"):
        return f"{100 * delta:+.1f} pt"
    if "PSNR" in (row.get("metric") or ""):
        return f"{delta:+.2f} dB"
    return f"{delta:+.4f}"


def quality_table(rows: List[Dict[str, Any]], threads: Sequence[str]) -> str:
    headers = ["model", "fp32 (ms at " + "/".join(f"{t}T" for t in threads) + ")"] + [label for _, label in VARIANTS]
    lines = []
    for row in rows:
        if row.get("error"):
            lines.append([row["key"], _error_cell(row)] + [""] * len(VARIANTS))
            continue
        fp32 = row["fp32"]
        ms = "/".join("n/a" if fp32["latency_ms"].get(t) is None else f"{fp32['latency_ms'][t]:.2f}" for t in threads)
        line = [row["key"], f"{fp32['folded']['primary']['text']} · {ms} ms"]
        for name, _ in VARIANTS:
            cell = row["variants"].get(name, {})
            if cell.get("status") != "ok":
                line.append(_error_cell(cell))
            else:
                line.append(f"{_md(cell['quality_text'])} · {_latencies(cell, threads)}")
        lines.append(line)
    return benchlib.markdown_table(headers, lines, align="ll" + "r" * len(VARIANTS))


def closeness_table(rows: List[Dict[str, Any]]) -> str:
    """How close each variant stays to fp32 on the evaluation samples: the classifiers' top-1
    agreement (which, unlike top-1 against the labels, counts every changed answer rather than the
    net of answers gained and lost), or the task agreement, then the mean output cosine."""
    headers = ["model", "closeness to fp32"] + [label for _, label in VARIANTS] + ["closest"]
    lines = []
    for row in rows:
        if row.get("error"):
            continue
        values = {}
        for name, _ in VARIANTS:
            cell = row["variants"].get(name, {})
            agreement = (cell.get("quality") or {}).get("agreement") or {}
            primary = (cell.get("quality") or {}).get("agreement_primary") or {}
            if cell.get("status") == "ok" and primary:
                values[name] = (primary.get("value"), primary.get("text"), agreement.get("cosine_mean"),
                                primary.get("name", "?"))
        if not values:
            continue
        line = [row["key"], f"{next(iter(values.values()))[3]} · cosine"]
        for name, _ in VARIANTS:
            if name in values:
                _, text, cosine, _ = values[name]
                line.append(f"{_md(text)} · {'n/a' if cosine is None else f'{cosine:.4f}'}")
            else:
                line.append("n/a")
        best = max(values, key=lambda n: (values[n][0] if values[n][0] is not None else -math.inf,
                                          values[n][2] if values[n][2] is not None else -math.inf))
        line.append(_label(best))
        lines.append(line)
    return benchlib.markdown_table(headers, lines, align="ll" + "r" * len(VARIANTS) + "l") if lines else ""


def cost_table(rows: List[Dict[str, Any]]) -> str:
    headers = ["model", "quality column", "eval / calib samples", "fp32 original → folded", "opset",
               "fp32 size"] + [label for _, label in VARIANTS]
    lines = []
    for row in rows:
        if row.get("error"):
            continue
        fp32 = row["fp32"]
        metric = "top-1" if row["classifier"] else f"agreement with fp32 ({row.get('metric') or '?'})"
        line = [row["key"], metric, f"{row['eval_samples']} / {row['calibration_samples']}",
                f"{fp32['original']['primary']['text']} → {fp32['folded']['primary']['text']}",
                "→".join(str(v) for v in dict.fromkeys(fp32["opset"])), human_bytes(fp32["size"])]
        for name, _ in VARIANTS:
            cell = row["variants"].get(name, {})
            if cell.get("size") is None:
                line.append("n/a" if cell.get("seconds") is None else f"{benchlib.seconds(cell['seconds'])} · n/a")
            else:
                line.append(f"{benchlib.seconds(cell['seconds'])} · {human_bytes(cell['size'])}")
        lines.append(line)
    return benchlib.markdown_table(headers, lines, align="lllllr" + "r" * len(VARIANTS))


def _label(name: Optional[str]) -> str:
    return dict(VARIANTS).get(name, name or "n/a")


def versus_table(rows: List[Dict[str, Any]], threads: Sequence[str]) -> str:
    headers = ["model", "ORT best (quality, ties: speed)", "ORT best quality", "ours quality", "ours − ORT best",
               "right only in ours / only in ORT best (sign test p)",
               "ours / ORT best latency " + "/".join(f"{t}T" for t in threads), "fastest ORT",
               f"ours / fastest ORT ({threads[0]}T)"]
    lines = []
    for row in rows:
        if row.get("error"):
            continue
        vs = row.get("versus", {})
        best, ours = vs.get("ort_best"), row["variants"].get("ours", {})
        best_text = row["variants"][best]["quality_text"] if best else "n/a"
        ours_text = ours.get("quality_text", "n/a") if ours.get("status") == "ok" else "n/a"
        head = vs.get("head_to_head") or {}
        paired = vs.get("paired")
        lines.append([
            row["key"], _label(best), _md(best_text), _md(ours_text), _delta_text(row, vs.get("quality_delta")),
            f"{paired['only_ours']} / {paired['only_other']} (p {paired['sign_test_p']:.2f})" if paired else "n/a",
            "/".join(_x(head.get(t)) for t in threads) if head else _md(vs.get("error", "n/a")),
            _label(vs.get("ort_fastest")), _x(vs.get("vs_fastest")),
        ])
    return benchlib.markdown_table(headers, lines, align="llrrrrrlr")


def _mem_ok(run: Optional[Dict[str, Any]]) -> bool:
    return bool(run) and run.get("status") == "ok"


def memory_table(rows: List[Dict[str, Any]], samples: Sequence[str]) -> str:
    headers = ["model", "calibration"]
    headers += [f"time @{n}" for n in samples] + [f"peak RSS @{n} (increase)" for n in samples]
    headers += [f"peak RSS @{samples[-1]}/@{samples[0]}", f"increase @{samples[-1]}/@{samples[0]}",
                "time / ORT MinMax " + "/".join(f"@{n}" for n in samples),
                "stats / ORT MinMax " + "/".join(f"@{n}" for n in samples)]
    lines = []
    for row in rows:
        memory = row.get("memory")
        if not memory:
            continue
        reference = next((m for m in memory if m["name"] == "ort_minmax"), None)
        for tool in memory:
            runs = tool["runs"]
            line = [row["key"], tool["label"]]
            for n in samples:
                run = runs.get(n)
                if _mem_ok(run):
                    step = _stats_seconds(run)
                    line.append(benchlib.seconds(run["seconds"]) + (f" (stats {benchlib.seconds(step)})" if step is not None else ""))
                elif run and run.get("status") == "killed":
                    line.append(f"killed ({run.get('killed_by', '?')})")
                else:
                    line.append(_error_cell(run or {"error": "not run"}, 50))
            for n in samples:
                run = runs.get(n)
                line.append(f"{run['peak_rss_mb']:.0f} MB (+{run['peak_increase_mb']:.0f} MB)" if _mem_ok(run) else
                            ("" if not run else f">{run['watched_peak_mb']:.0f} MB" if run.get("status") == "killed"
                             else "n/a"))
            first, last = runs.get(samples[0]), runs.get(samples[-1])
            both = _mem_ok(first) and _mem_ok(last)
            line.append(benchlib.ratio(last["peak_rss_mb"], first["peak_rss_mb"]) if both else "n/a")
            line.append(benchlib.ratio(last["peak_increase_mb"], first["peak_increase_mb"]) if both else "n/a")
            for stats in (False, True):
                ratios = [paired_ratio(runs.get(n), (reference or {}).get("runs", {}).get(n), stats=stats)
                          for n in samples]
                line.append("" if stats and tool["name"] != "ours" else
                            "/".join("n/a" if r is None else f"{r:.2f}x" for r in ratios))
            lines.append(line)
    if not lines:
        return ""
    return benchlib.markdown_table(headers, lines, align="ll" + "r" * (len(headers) - 2))


def target_checks(row: Dict[str, Any], threads: Sequence[str], samples: Sequence[str]) -> List[List[str]]:
    """[target, measured, met] for ``row``: the issue's bars, where the row has the numbers."""
    checks: List[List[str]] = []

    def add(target: str, measured: str, met: Optional[bool]) -> None:
        checks.append([target, measured, {True: "yes", False: "**NO**", None: "n/a"}[met]])

    ours = row.get("variants", {}).get("ours", {})
    ok = ours.get("status") == "ok"
    vs = row.get("versus", {})
    best = vs.get("ort_best")
    if row["key"] in TOP1_TARGET_MODELS:
        fp32 = row["fp32"]["folded"]["primary"]["value"]
        drop = fp32 - ours["quality_value"] if ok and ours.get("quality_value") is not None else None
        add(f"top-1 drop ≤ {100 * TOP1_MAX_DROP:.1f} pt", "n/a" if drop is None else f"{100 * drop:.1f} pt",
            None if drop is None else drop <= TOP1_MAX_DROP + 1e-12)
        delta = vs.get("quality_delta")
        paired = vs.get("paired")
        split = f" ({paired['only_ours']}/{paired['only_other']} images, p {paired['sign_test_p']:.2f})" if paired else ""
        add("top-1 ≥ ORT best", _delta_text(row, delta) + split, None if delta is None else delta >= -1e-12)
    if row["key"] in DETECTORS and "F1" in (row.get("metric") or ""):
        value = ours.get("quality_value") if ok else None
        add(f"detections F1 vs fp32 ≥ {F1_MIN}", "n/a" if value is None else f"{value:.3f}",
            None if value is None else value >= F1_MIN)
    bar = DETECTOR_MAX_LATENCY if row["key"] in DETECTORS else CLASSIFIER_MAX_LATENCY if row.get("classifier") else None
    if bar is not None:
        t1 = ours.get("latency", {}).get(threads[0], {}).get("ratio") if ok else None
        add(f"int8/fp32 latency {threads[0]}T ≤ {bar}", _x(t1), None if t1 is None else t1 <= bar)
    head = vs.get("head_to_head") or {}
    for t in threads:
        value = head.get(t)
        which = f" ({_label(best)})" if best else ""
        add(f"faster than ORT best{which} at {t}T", _x(value), None if value is None else value < 1.0)
    memory = {m["name"]: m for m in row.get("memory") or []}
    if "ours" in memory:
        if len(samples) >= 2:
            first, last = memory["ours"]["runs"].get(samples[0]), memory["ours"]["runs"].get(samples[-1])
            growth = last["peak_increase_mb"] / first["peak_increase_mb"] if _mem_ok(first) and _mem_ok(last) and \
                first["peak_increase_mb"] > 0 else None
            add(f"calibration RSS increase @{samples[-1]} ≤ {MAX_RSS_GROWTH}x @{samples[0]}", _x(growth),
                None if growth is None else growth <= MAX_RSS_GROWTH)
        if "ort_minmax" in memory:
            for n in samples:
                mine, ref = memory["ours"]["runs"].get(n), memory["ort_minmax"]["runs"].get(n)
                count = len((mine or {}).get("repeats") or [mine])
                median = f"median of {count} paired runs" if count > 1 else "one run"
                value = paired_ratio(mine, ref)
                add(f"whole pass time ≤ ORT MinMax @{n} ({median})", _x(value), None if value is None else value <= 1.0)
                value = paired_ratio(mine, ref, stats=True)
                add(f"calibration statistics time ≤ ORT MinMax @{n} ({median})", _x(value),
                    None if value is None else value <= 1.0)
    return checks


def targets_table(rows: List[Dict[str, Any]], threads: Sequence[str], samples: Sequence[str]) -> str:
    lines = [[row["key"]] + check for row in rows if not row.get("error")
             for check in target_checks(row, threads, samples)]
    return benchlib.markdown_table(["model", "target", "measured", "met"], lines, align="llrl") if lines else ""


def render(results: Dict[str, Any]) -> str:
    """Every table, the notes, the command line and the wall time, from the results dict."""
    settings = results["settings"]
    threads = [str(t) for t in settings["threads"]]
    samples = [str(n) for n in settings.get("memory_samples") or []]
    rows = results["models"]
    parts = [
        "Quality · latency vs fp32 at " + "/".join(f"{t}T" for t in threads) + ":",
        "",
        quality_table(rows, threads),
        "",
        "Setup, quantization wall time · file size:",
        "",
        cost_table(rows),
        "",
        "Ours against onnxruntime's best variant:",
        "",
        versus_table(rows, threads),
    ]
    closeness = closeness_table(rows)
    if closeness:
        parts += ["", "Closeness to fp32 on the same evaluation samples (agreement · mean output cosine):", "",
                  closeness]
    memory = memory_table(rows, samples) if samples else ""
    if memory:
        parts += ["", "Calibration cost (fresh process per cell; time and peak RSS of the quantization call):", "",
                  memory]
    targets = targets_table(rows, threads, samples)
    if targets:
        parts += ["", "Targets:", "", targets]
    failed = [row for row in rows if row.get("error")]
    for row in failed:
        parts += ["", f"{row['key']}: failed before quantizing: {_md(row['error'])}"]
    ours_opts = settings.get("ours_options") or {}
    parts += [
        "",
        "fp32 = the shared model at a fixed input shape, converted to opset 13 when older and run through `fold`: the "
        "common input of every variant and the reference for latency and agreement. Quality = top-1 for classifiers "
        "(fp32 column: the folded model's top-1; the original's is in the setup table), the agreement with fp32 for "
        "the others (detections F1@0.5, text-map IoU@0.3, PSNR; see tools/evaluate.py), on the front of the zoo "
        f"pool; calibration uses {settings['samples']} samples from its back (fewer on small pools), the same "
        "decoded samples for every variant. Latency = onnxruntime CPU, interleaved median ratio against fp32 "
        f"({settings['latency_seconds']:g} s per pair and thread count). ORT = `quantize_static`, QDQ, per-channel "
        "QInt8 weights, QInt8 or QUInt8 activations, MinMax or Percentile (its defaults otherwise, no "
        "`quant_pre_process`). ORT best = the ORT variant of best quality, ties broken by "
        f"{threads[0]}-thread speed; ours / ORT best latency is measured head to head, interleaved; ours / fastest ORT "
        "is the quotient of the two ratios against fp32. Ours = the `quant` pass with "
        + (f"options `{json.dumps(ours_opts)}`" if ours_opts else "its default options") + ".",
    ]
    if memory:
        parts += [
            "",
            "Calibration cost: each cell runs in a fresh process that decodes its samples into memory first; time = "
            "the whole quantization call (load, calibrate, quantize, save); peak RSS = the process's high-water mark "
            "(`VmHWM`) after the call, reset to the current RSS just before it (`ru_maxrss` cannot be: Linux also "
            "counts the parent's RSS at fork in it); increase = that peak minus the RSS before the call "
            "(the quantizer's own memory); the ratio columns compare the largest and smallest sample counts. Pools "
            "smaller than the sample count are cycled (the same decoded arrays again; ImageNet has 500 images). "
            "ORT rows use int8 activations. Ours and ORT MinMax ran "
            f"{settings.get('memory_repeats', 1)} times per cell, interleaved (the order rotating every repeat): their "
            "cells give medians, and time / ORT MinMax is the median of the per-repeat ratios (stats / ORT MinMax: "
            "our statistics step alone, the part comparable with a calibrator, against ORT MinMax's whole call).",
        ]
    machine = f" Machine: {settings['machine']}." if settings.get("machine") else ""
    parts += ["", f"Command: `{results.get('command', '')}`. Wall time {results.get('wall_seconds', 0) / 60:.1f} min.{machine}"]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _int_list(text: str, flag: str) -> List[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"error: {flag} {text!r}: expected comma-separated integers, e.g. 1,2")
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"error: {flag} {text!r}: every value must be >= 1")
    return values


def _keys(text: str, flag: str) -> List[str]:
    keys = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [k for k in keys if k not in zoo.ZOO]
    if unknown:
        raise SystemExit(f"error: {flag}: unknown model {', '.join(unknown)}; known: {', '.join(zoo.ZOO)}")
    return keys


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", metavar="KEYS",
                        help=f"comma-separated subset of: {', '.join(zoo.ZOO)} (default: every available one)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                        help="calibration samples for the quality runs (default %(default)s; fewer on small pools, "
                             "to stay disjoint from the evaluation samples)")
    parser.add_argument("--eval-limit", type=int, default=DEFAULT_EVAL_LIMIT, metavar="N",
                        help="evaluate quality on at most N samples (default %(default)s; 0 = the whole pool minus "
                             "the calibration samples)")
    parser.add_argument("--latency-seconds", type=float, default=DEFAULT_LATENCY_SECONDS, metavar="S",
                        help="latency measurement time per model pair and thread count (default %(default)s)")
    parser.add_argument("--threads", default=",".join(map(str, DEFAULT_THREADS)), metavar="LIST",
                        help="onnxruntime intra-op thread counts for latency (default %(default)s)")
    parser.add_argument("--ours-options", default="{}", metavar="JSON",
                        help="options of our quant pass as JSON, e.g. '{\"calib_method\": \"mse\"}' (default: ours)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables to this markdown file")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the quantized models (prints the folder)")
    memory = parser.add_argument_group("calibration time and peak RSS (one fresh process per cell)")
    memory.add_argument("--memory", dest="memory", action="store_true", default=True,
                        help="measure calibration cost (default)")
    memory.add_argument("--no-memory", dest="memory", action="store_false", help="skip the calibration-cost runs")
    memory.add_argument("--memory-models", default=",".join(DEFAULT_MEMORY_MODELS), metavar="KEYS",
                        help="of the benchmarked models, the ones to measure (default %(default)s)")
    memory.add_argument("--memory-samples", default=",".join(map(str, DEFAULT_MEMORY_SAMPLES)), metavar="LIST",
                        help="calibration sample counts (default %(default)s; small pools are cycled)")
    memory.add_argument("--with-entropy", action="store_true",
                        help="also measure quantize_static Entropy (slow, and memory-hungry)")
    memory.add_argument("--memory-limit-mb", type=float, default=DEFAULT_MEMORY_LIMIT_MB, metavar="MB",
                        help="kill a worker whose RSS passes this (default %(default)g; 0 = no limit)")
    memory.add_argument("--memory-repeats", type=int, default=DEFAULT_MEMORY_REPEATS, metavar="N",
                        help="runs of ours and ORT MinMax per cell, interleaved; the table gives medians and the "
                             "median of the per-run ratios (default %(default)s)")
    memory.add_argument("--memory-timeout", type=float, default=DEFAULT_MEMORY_TIMEOUT, metavar="S",
                        help="kill a worker running longer than this (default %(default)g)")
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.samples < 1:
        raise SystemExit("error: --samples must be >= 1")
    args.eval_limit = None if args.eval_limit == 0 else args.eval_limit
    args.threads = _int_list(args.threads, "--threads")
    args.memory_samples = _int_list(args.memory_samples, "--memory-samples")
    args.memory_models = _keys(args.memory_models, "--memory-models")
    if args.memory_repeats < 1:
        raise SystemExit("error: --memory-repeats must be >= 1")
    try:
        args.ours_options = json.loads(args.ours_options)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: --ours-options: not JSON: {exc}")
    if not isinstance(args.ours_options, dict):
        raise SystemExit("error: --ours-options: expected a JSON object, e.g. '{\"calib_method\": \"mse\"}'")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    benchlib.quiet("", "onnxruntime.quantization")
    if args.worker:
        result = worker(json.loads(args.worker))
        print(json.dumps(result), flush=True)
        return 0
    entries = benchlib.select_models(args.models)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    command = "python tools/bench_quant.py" + (" " + shlex.join(argv_list) if argv_list else "")

    started = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    with benchlib.temp_folder(prefix="onnxslim-cv-bench-quant-", keep=args.keep) as folder:
        for entry in entries:
            benchlib.progress(f"{entry.key}: preparing fp32, evaluating it ...")
            try:
                rows.append(bench_model(entry, folder, args))
            except Exception as exc:  # preparing / evaluating fp32 failed: say so, go on
                benchlib.progress(f"{entry.key}: failed: {benchlib.error_text(exc)}\n{traceback.format_exc()}")
                rows.append({"key": entry.key, "error": benchlib.error_text(exc), "traceback": traceback.format_exc()})
    wall = time.perf_counter() - started
    import onnxruntime

    results = {
        "command": command,
        "wall_seconds": wall,
        "settings": {
            "samples": args.samples, "eval_limit": args.eval_limit, "latency_seconds": args.latency_seconds,
            "threads": args.threads, "ours_options": args.ours_options,
            "memory_samples": args.memory_samples if args.memory else [],
            "memory_models": args.memory_models if args.memory else [],
            "memory_repeats": args.memory_repeats,
            "onnxruntime": onnxruntime.__version__,
            "machine": benchlib.machine(),
        },
        "models": rows,
    }
    benchlib.publish(render(results), results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
