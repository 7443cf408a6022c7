#!/usr/bin/env python
"""Low-rank factorization: MACs, latency and quality of the ``lowrank`` pass on the shared models.

    python tools/bench_lowrank.py [--models resnet20,squeezenet] [--targets 0.75,0.5] [--methods weight,data]
                                  [--eval-limit N] [--calib 128] [--latency-seconds S] [--seed 0]
                                  [--json out.json] [--markdown out.md] [--keep]

For every model, one fp32 input: the shared file (at the zoo's fixed input shape for the
dynamic models) through ``fold``. It is the input of every run, the quality baseline, the
reference of the agreement metrics and the latency reference. Then, per ``--targets`` value F
and ``--methods`` method, the ``lowrank`` pass once with ``target_macs=F, method=<method>``:
``weight`` is the plain weight SVD with no data (its per-layer budgets come from the relative
layer errors), ``data`` the whitened SVD and least-squares refit on calibration samples (the
pass's default allocation: with data, ``auto`` picks among its rules by the calibration loss;
the allocation column says which), ``samples`` = the calibration count. Its result is written through
``save_model`` (which runs onnx.checker) and loaded in onnxruntime.

Columns, all measured on the written file (not taken from the pass's report): MACs and params
after / before (:func:`onnxslim_cv.stats.model_stats` of the reloaded file against the folded
fp32 file); onnxruntime latency against the folded fp32 file (:func:`benchlib.latency`: 1 thread,
interleaved, median of the per-iteration ratios; < 1 is faster); latency / MACs (the latency
ratio over the MACs ratio: 1 = latency falls as much as the MACs, > 1 = less); quality (top-1
for classifiers, the agreement with fp32 otherwise: detections F1@0.5, text-map IoU@0.3, PSNR
against the fp32 output) and its drop against fp32; the factorization forms and the number of
layers factored (the pass's report); the factored layers alone: their onnxruntime profiler
kernel time after / before (the layer's node plus its ``/factorK`` nodes, against the same node
in the fp32 file, :func:`onnxslim_cv.bench.node_times`), their MACs after / before, and the
share of the fp32 file's kernel time they took; the pass's wall time. The fp32 row's latency
column is the fp32 file timed against itself: the noise floor of the latency ratios.

Then the issue's targets, checked from the measured numbers: ResNet-20 at 50% of its MACs
(data-aware) keeps >= 90% of its fp32 top-1; latency follows MACs (every run that removes
MACs is faster than fp32; the worst latency / MACs is listed); and no slowdown from tiny
factor layers (the factored layers' own profiled time falls in every run; the worst time /
MACs is listed, with the share of the time those layers had, which bounds what factoring
them can save).

Evaluation and calibration samples are disjoint (:func:`benchlib.disjoint_split`): evaluation
reads the front of the zoo pool (the whole pool minus the calibration samples by default),
calibration its back. An unreachable target or any failure is caught per run and shown in the
table. Without the shared models folder the script says so and exits 2, like the other benches.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (also puts the repo on sys.path)

from onnxslim_cv import runtime  # noqa: E402
from onnxslim_cv.bench import node_times, random_feed  # noqa: E402
from onnxslim_cv.report import human  # noqa: E402
from onnxslim_cv.testing import zoo  # noqa: E402

DEFAULT_TARGETS = (0.75, 0.5)
METHODS = ("weight", "data")
DEFAULT_METHODS = METHODS
DEFAULT_CALIB = 128
DEFAULT_MODELS = ("squeezenet", "resnet20", "mnist", "ppocr_det", "ppocr_cls", "ultraface", "fastestdet", "superres")
"""The eight shared models: every one has Conv / Gemm layers the pass can factor."""

METHOD_LABEL = {"weight": "weight (SVD, no data)", "data": "data (whitened + refit)"}

# Targets of the issue
TOP1_TARGET_MODEL = "resnet20"
TOP1_TARGET_MACS = 0.5
TOP1_TARGET_METHOD = "data"
TOP1_MIN_KEPT = 0.90  # of the fp32 top-1
MACS_TOLERANCE = 0.005  # the written file may keep this much more than the asked-for MACs fraction
REPORT_MISMATCH = 0.005  # the file's MACs ratio and the pass's own figure should agree to this
MAX_LATENCY_PER_BOUND = 1.1  # latency at most this much above what the factored layers' MACs allow

SEED = 0
"""``PassContext.seed`` of every run (``--seed``)."""


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

PASS_SOURCES = ("onnxslim_cv.passes.lowrank", "onnxslim_cv.factorize", "onnxslim_cv.obs", "onnxslim_cv.sensitivity",
                "onnxslim_cv.reconstruct")
"""Modules whose code decides the numbers: hashed at the start and the end of a run."""


def code_version() -> Dict[str, Any]:
    """The git HEAD and the sha256 (12 hex digits) of the pass's source files as they are on disk,
    so numbers from runs of a work in progress can be told apart."""
    import hashlib
    import importlib
    import subprocess

    files: Dict[str, Optional[str]] = {}
    for name in PASS_SOURCES:
        try:
            path = Path(importlib.import_module(name).__file__)
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        except Exception:  # a module that is absent or does not import: hashed as unknown
            files[name] = None
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=benchlib.REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        head = None
    return {"git_head": head, "files": files}


def configs(targets: Sequence[float], methods: Sequence[str], round_to: Optional[int] = None) -> List[Dict[str, Any]]:
    """Every (target, method) run, in table order: per target, the methods in the given order
    (``round_to``: the pass's rank step, when not its default)."""
    extra = {} if round_to is None else {"round_to": round_to}
    return [{"name": f"t{target:g}.{method}", "target": target, "method": method, **extra}
            for target in targets for method in methods]


def pass_options(run: Dict[str, Any], samples: int) -> Dict[str, Any]:
    options = {"target_macs": run["target"], "method": run["method"], "samples": samples}
    if run.get("round_to") is not None:
        options["round_to"] = run["round_to"]
    return options


def file_stats(path: Path) -> Dict[str, Any]:
    """MACs and params of a written file, reloaded (never the pass's own figures)."""
    from onnxslim_cv.model_io import load_model
    from onnxslim_cv.stats import model_stats

    stats = model_stats(load_model(path), refresh_shapes=True)
    return {"macs": stats.macs, "macs_known": stats.macs_known, "params": stats.params, "nodes": stats.num_nodes}


def forms_of(layers: Sequence[Dict[str, Any]]) -> Dict[str, int]:
    """``{form: layers}`` of the pass's factored-layer rows, sorted by count then name."""
    counts: Dict[str, int] = {}
    for layer in layers:
        counts[layer["form"]] = counts.get(layer["form"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def forms_text(forms: Dict[str, int]) -> str:
    """``{"spatial": 12, "tucker2": 4}`` -> ``"spatial 12, tucker2 4"`` (``"–"`` when empty)."""
    return ", ".join(f"{k} {v}" for k, v in forms.items()) if forms else "–"


def factored_layer_times(fp32_times: Dict[str, float], times: Dict[str, float], layers: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Profiled kernel time of the factored layers before and after, against their MACs.

    ``fp32_times`` / ``times``: :func:`onnxslim_cv.bench.node_times` of the named fp32 file and
    of the written one (profiled interleaved), where a factored layer is its own name plus ``<name>/factorK``. This
    separates the issue's "no slowdown from tiny factor layers" (these layers' time against
    their MACs) from the time of everything lowrank does not touch (depthwise convs,
    activations, concats), which is why a whole model's latency falls less than its MACs.
    """
    names = [layer["node"] for layer in layers]
    found = [name for name in names if name in fp32_times]
    before = sum(fp32_times[name] for name in found)
    after = sum(value for key, value in times.items()
                for name in found if key == name or key.startswith(name + "/factor"))
    macs_before = sum(layer["macs_before"] for layer in layers if layer["node"] in found)
    macs_after = sum(layer["macs_after"] for layer in layers if layer["node"] in found)
    total = sum(fp32_times.values())
    return {
        "layers_timed": len(found), "layers": len(names),
        "time_before_ms": before, "time_after_ms": after,
        "time_ratio": after / before if before else None,
        "macs_ratio": macs_after / macs_before if macs_before else None,
        "share_of_fp32_time": before / total if total else None,
    }


def run_cell(entry, data, model, fp32_path: Path, fp32: Dict[str, Any], folder: Path, run: Dict[str, Any],
             calibration, *, classifier: bool, eval_n: int, calib_n: int, latency_seconds: float,
             named: Optional[Path] = None, feed=None) -> Dict[str, Any]:
    """One lowrank run, written, measured and evaluated; never raises (a failure is a result)."""
    from evaluate import evaluate

    from onnxslim_cv.errors import UserError
    from onnxslim_cv.model_io import save_model

    cell: Dict[str, Any] = {k: run[k] for k in ("name", "target", "method")}
    cell["options"] = pass_options(run, calib_n)
    cell["status"] = "ok"
    stage = "lowrank"
    started = time.perf_counter()
    try:
        try:
            result, report = benchlib.run_pass(model, "lowrank", cell["options"],
                                               calibration if run["method"] == "data" else None, seed=SEED, measure=True)
        except UserError as exc:
            if "unreachable" in str(exc):
                cell.update(status="unreachable", error=benchlib.error_text(exc))
                raise _Reported()
            raise
        details = report.details
        layers = details.get("layers", [])
        allocation = details.get("allocation") or {}
        cell.update(
            pass_seconds=report.seconds, changes=report.changes, notes=report.notes, warnings=report.warnings,
            layers=layers, layers_factored=len(layers), forms=forms_of(layers),
            kept_macs=allocation.get("kept_macs"), allocation_by=allocation.get("by"),
            report_macs_ratio=(report.after.macs / report.before.macs
                               if report.before and report.after and report.before.macs and report.after.macs is not None
                               else None),
            skipped=details.get("skipped"),
        )
        stage = "saving"
        path = folder / f"{entry.key}.{run['name']}.onnx"
        save_model(result, path)  # runs onnx.checker
        stage = "measuring the file"
        stats = file_stats(path)
        cell["macs"], cell["params"] = stats["macs"], stats["params"]
        cell["macs_ratio"] = stats["macs"] / fp32["macs"] if stats["macs"] is not None and fp32["macs"] else None
        cell["params_ratio"] = stats["params"] / fp32["params"] if fp32["params"] else None
        stage = "latency"
        timing = benchlib.latency(fp32_path, path, seconds=latency_seconds)
        cell["latency_ratio"] = timing.ratio
        cell["latency_ms"] = [t.median_ms for t in timing.timings]
        cell["latency_per_macs"] = (timing.ratio / cell["macs_ratio"]
                                    if timing.ratio is not None and cell["macs_ratio"] else None)
        if named is not None and layers:
            stage = "profiling the factored layers"
            before, after = node_times([str(named), str(path)], feed)  # interleaved, as the latency
            cell["factored"] = factored_layer_times(before, after, layers)
        stage = "evaluating"
        quality = evaluate(path, data, reference=None if classifier else fp32_path, limit=eval_n)
        cell["quality"] = {k: quality[k] for k in ("samples", "metrics", "primary", "agreement", "agreement_primary")}
        cell["quality_value"], cell["quality_text"], cell["metric"] = benchlib.quality_of(classifier, quality)
    except _Reported:
        benchlib.progress(f"  {run['name']}: {cell['status']}: {cell['error']}")
    except Exception as exc:  # a crash of the pass (or a file onnxruntime rejects) is a result
        cell.update(status="error", error=f"{stage}: {benchlib.error_text(exc)}", traceback=traceback.format_exc())
        benchlib.progress(f"  {run['name']}: FAILED {cell['error']}\n"
                          + "".join(cell["traceback"].splitlines(True)[-8:]))
    cell["seconds"] = time.perf_counter() - started
    if cell["status"] == "ok":
        benchlib.progress(
            f"  {run['name']}: MACs {_ratio(cell['macs_ratio'], 3)}, latency {_ratio(cell['latency_ratio'])}, "
            f"{cell['quality_text']}, {cell['layers_factored']} layers ({forms_text(cell['forms'])}), "
            f"pass {cell['pass_seconds']:.1f} s, total {cell['seconds']:.1f} s")
    return cell


class _Reported(Exception):
    """An expected outcome (unreachable target) already written into the cell."""


def bench_model(entry: zoo.SharedModel, folder: Path, runs: Sequence[Dict[str, Any]], args) -> Dict[str, Any]:
    from evaluate import evaluate

    from onnxslim_cv.model_io import load_model

    started = time.perf_counter()
    eval_n, calib_n = benchlib.disjoint_split(entry, args.eval_limit, args.calib)
    needs_data = any(run["method"] == "data" for run in runs)
    calibration = benchlib.in_memory(entry.calibration(calib_n)) if needs_data else None
    data = benchlib.CachedEntry(entry)  # every variant is evaluated on the same decoded samples
    fp32_path = folder / f"{entry.key}.fp32.onnx"
    benchlib.prepare_fp32(entry, fp32_path)
    model_stats_fp32 = file_stats(fp32_path)
    model = load_model(fp32_path)  # the runs start from the file, as written
    classifier = entry.is_labelled  # top-1 (as bench_quant / bench_sparsify: the labelled models are the classifiers)
    fp32_quality = evaluate(fp32_path, data, reference=None if classifier else fp32_path, limit=eval_n)
    noise = benchlib.latency(fp32_path, fp32_path, seconds=args.latency_seconds)
    named = benchlib.named_fp32(fp32_path, folder)
    feed = random_feed(runtime.make_session(str(named)))
    row: Dict[str, Any] = {
        "key": entry.key, "task": entry.task, "classifier": classifier,
        "eval_samples": fp32_quality["samples"], "calibration_samples": calib_n if needs_data else 0,
        "calibration": calibration.description if calibration is not None else None, "data": entry.data,
        "fp32": {
            **model_stats_fp32,
            "latency_ms": noise.timings[0].median_ms,
            "self_latency_ratio": noise.ratio,
            "quality": {k: fp32_quality[k] for k in ("samples", "metrics", "primary", "agreement", "agreement_primary")},
        },
        "cells": [],
    }
    row["fp32"]["quality_value"], row["fp32"]["quality_text"], row["metric"] = benchlib.quality_of(classifier, fp32_quality)
    benchlib.progress(f"{entry.key}: fp32 {fp32_quality['summary']}; {human(model_stats_fp32['macs'])} MACs, "
                      f"{_ms(row['fp32']['latency_ms'])} (self ratio {_ratio(noise.ratio)}); eval {row['eval_samples']}, "
                      f"calib {row['calibration_samples']} samples")
    for run in runs:
        benchlib.progress(f"{entry.key} {run['name']} ...")
        row["cells"].append(run_cell(entry, data, model, fp32_path, row["fp32"], folder, run, calibration,
                                     classifier=classifier, eval_n=eval_n, calib_n=calib_n,
                                     latency_seconds=args.latency_seconds, named=named, feed=feed))
    row["seconds"] = time.perf_counter() - started
    benchlib.progress(f"{entry.key}: done in {row['seconds']:.0f} s")
    return row


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ratio(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def kept_top1(row: Dict[str, Any], cell: Dict[str, Any]) -> Optional[float]:
    """The run's top-1 as a fraction of fp32's (classifiers only)."""
    if not row.get("classifier") or cell.get("status") != "ok" or cell.get("quality_value") is None:
        return None
    base = row["fp32"].get("quality_value")
    return cell["quality_value"] / base if base else None


def _macs_text(cell: Dict[str, Any]) -> str:
    """The file's MACs ratio, with the pass's own figure when they disagree."""
    text = _ratio(cell.get("macs_ratio"), 3)
    reported = cell.get("report_macs_ratio")
    measured = cell.get("macs_ratio")
    if measured is not None and reported is not None and abs(measured - reported) > REPORT_MISMATCH:
        text += f" (pass: {reported:.3f})"
    return text


def _ms(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3g} ms"


def factored_text(factored: Optional[Dict[str, Any]]) -> str:
    """``0.62x / 0.50x (45%)``: the factored layers' profiled time and MACs ratios, and their share of fp32's time."""
    if not factored or factored.get("time_ratio") is None or not factored.get("macs_ratio"):
        return ""
    text = f"{factored['time_ratio']:.2f}x / {factored['macs_ratio']:.2f}x ({benchlib.percent(factored['share_of_fp32_time'], 0)})"
    if factored.get("layers_timed") != factored.get("layers"):
        text += f", {factored['layers_timed']} of {factored['layers']} layers found"
    return text


def latency_bound(cell: Dict[str, Any]) -> Optional[float]:
    """The latency ratio the run would have if the factored layers' time fell exactly with their
    MACs and nothing else changed: ``1 - share * (1 - their MACs ratio)``, share = their part of
    the fp32 file's profiled time. What lowrank can deliver at those MACs, however well its
    factors run: the rest of the model (depthwise convs, activations, concats) keeps its time."""
    factored = cell.get("factored") or {}
    share, macs = factored.get("share_of_fp32_time"), factored.get("macs_ratio")
    if share is None or macs is None:
        return None
    return 1.0 - share * (1.0 - macs)


def latency_per_bound(cell: Dict[str, Any]) -> Optional[float]:
    bound, latency = latency_bound(cell), cell.get("latency_ratio")
    return latency / bound if bound and latency is not None else None


def _quality_cell(row: Dict[str, Any], text: str) -> str:
    return text  # the agreement texts name their metric ("F1 0.93", "IoU 0.88", "PSNR 31.2 dB")


def error_cell(cell: Dict[str, Any], limit: int = 140) -> str:
    """``unreachable: <why>`` or ``error: <stage>: <Type>: <message>`` for a failed run."""
    text = cell.get("error") or ""
    if cell.get("status") == "unreachable":
        found = re.search(r"keeps ([0-9.]+) of the model's MACs", text)
        if found:  # the full message is in the JSON
            return f"unreachable (at best {found.group(1)}x)"
        return f"unreachable: {_md(text.split('is unreachable: ', 1)[-1][:limit])}"
    return f"error: {_md(text[:limit])}"


RESULT_HEADERS = ["model", "method", "target", "MACs", "params", "latency", "latency/MACs", "latency/bound", "quality", "drop",
                  "task metric", "forms", "layers", "factored layers: time / MACs (share of fp32 time)", "pass time",
                  "allocation"]


def result_lines(row: Dict[str, Any]) -> List[List[str]]:
    """The fp32 line and one line per run of one model (RESULT_HEADERS columns)."""
    fp32 = row["fp32"]
    task = "" if row["classifier"] else fp32["quality"]["primary"]["text"]
    lines = [[row["key"], "fp32 (folded)", "–", f"1.000x ({human(fp32['macs'])})", f"1.000x ({human(fp32['params'])})",
              f"{_ms(fp32['latency_ms'])} (self {_ratio(fp32.get('self_latency_ratio'))})", "", "",
              _quality_cell(row, fp32["quality_text"]), "", task, "", "", "", "", ""]]
    for cell in row["cells"]:
        line = [row["key"], METHOD_LABEL.get(cell["method"], cell["method"]), f"{cell['target']:g}"]
        if cell["status"] != "ok":
            filled = [error_cell(cell)]
            if cell.get("pass_seconds") is not None:  # the pass ran, a later stage failed
                filled += [""] * 7 + [forms_text(cell.get("forms") or {}), str(cell.get("layers_factored", "")), "",
                                      benchlib.seconds(cell["pass_seconds"])]
            line += filled + [""] * (len(RESULT_HEADERS) - len(line) - len(filled))
            lines.append(line)
            continue
        per, per_bound = cell.get("latency_per_macs"), latency_per_bound(cell)
        line += [
            _macs_text(cell), _ratio(cell.get("params_ratio"), 3), _ratio(cell.get("latency_ratio")),
            "n/a" if per is None else f"{per:.2f}", "n/a" if per_bound is None else f"{per_bound:.2f}",
            _quality_cell(row, cell["quality_text"]), benchlib.drop(row, cell)[1],
            "" if row["classifier"] else cell["quality"]["primary"]["text"],
            forms_text(cell["forms"]), str(cell["layers_factored"]), factored_text(cell.get("factored")),
            benchlib.seconds(cell["pass_seconds"]),
            cell.get("allocation_by") or "",  # the rule the budgets came from (auto's choice)
        ]
        lines.append(line)
    return lines


def results_table(rows: List[Dict[str, Any]]) -> str:
    lines: List[List[str]] = []
    for row in rows:
        if row.get("error"):
            lines.append([row["key"], "fp32 (folded)", "–", f"failed: {_md(row['error'][:140])}"]
                         + [""] * (len(RESULT_HEADERS) - 4))
            continue
        lines += result_lines(row)
    headers, align = list(RESULT_HEADERS), "lll" + "r" * 8 + "lrrrl"
    if all(row.get("classifier", True) for row in rows):  # no agreement metric: no task metric column
        index = headers.index("task metric")
        headers.pop(index)
        align = align[:index] + align[index + 1:]
        lines = [line[:index] + line[index + 1:] for line in lines]
    return benchlib.markdown_table(headers, lines, align=align)


def models_table(rows: List[Dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        if row.get("error"):
            lines.append([row["key"], "", "", "", "", f"failed: {_md(row['error'][:140])}"])
            continue
        what = "top-1" if row["classifier"] else f"agreement with fp32 ({row['metric']})"
        base = row["fp32"]["quality"]["primary"]
        lines.append([row["key"], what, f"{base['name']} {base['text']}", str(row["eval_samples"]),
                      str(row["calibration_samples"]), f"{row['seconds'] / 60:.1f} min"])
    return benchlib.markdown_table(["model", "quality column", "fp32 task metric", "eval samples", "calib samples",
                                    "model wall time"], lines, align="lllrrr")


def _find(row: Dict[str, Any], target: float, method: str) -> Optional[Dict[str, Any]]:
    for cell in row.get("cells", []):
        if cell["method"] == method and abs(cell["target"] - target) < 1e-9:
            return cell
    return None


MET_TEXT = {True: "yes", False: "**NO**", None: "n/a"}


def target_checks(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's two targets, from the measured numbers: ``[{target, measured, met}]``
    (``met`` None when the run lacks the numbers)."""
    checks: List[Dict[str, Any]] = []

    # (1) ResNet-20 at 50% of its MACs keeps >= 90% of its fp32 top-1, data-aware
    target = (f"ResNet-20 at {100 * TOP1_TARGET_MACS:g}% of its MACs keeps ≥ {100 * TOP1_MIN_KEPT:g}% of its fp32 "
              f"top-1 ({TOP1_TARGET_METHOD}-aware)")
    row = next((r for r in rows if r.get("key") == TOP1_TARGET_MODEL), None)
    hint = (f"not run (needs --models {TOP1_TARGET_MODEL} --targets {TOP1_TARGET_MACS:g} "
            f"--methods {TOP1_TARGET_METHOD})")
    if row is None:
        checks.append({"target": target, "measured": hint, "met": None})
    elif row.get("error"):
        checks.append({"target": target, "measured": f"failed: {row['error']}", "met": False})
    else:
        cell = _find(row, TOP1_TARGET_MACS, TOP1_TARGET_METHOD)
        if cell is None:
            checks.append({"target": target, "measured": hint, "met": None})
        elif cell["status"] != "ok":
            checks.append({"target": target, "measured": f"{cell['status']}: {cell.get('error', '')}", "met": False})
        else:
            kept = kept_top1(row, cell)
            macs = cell.get("macs_ratio")
            macs_ok = macs is not None and macs <= TOP1_TARGET_MACS + MACS_TOLERANCE
            measured = (f"top-1 {row['fp32']['quality_text']} → {cell['quality_text']}: keeps "
                        f"{benchlib.percent(kept, 1)} of fp32 at MACs {_ratio(macs, 3)}")
            if not macs_ok:
                measured += f" (the file keeps more than {TOP1_TARGET_MACS:g} of the MACs)"
            checks.append({"target": target, "measured": measured, "kept": kept, "macs_ratio": macs,
                           "met": kept is not None and kept >= TOP1_MIN_KEPT - 1e-12 and macs_ok})

    # (2) latency follows MACs: every run that removes MACs is faster than fp32
    target = "latency follows MACs: no slowdown (latency ratio < 1 wherever MACs ratio < 1)"
    checked, slower, not_measured = [], [], []
    worst = None
    for row in rows:
        if row.get("error"):
            not_measured.append(f"{row['key']} (fp32 failed)")
            continue
        for cell in row.get("cells", []):
            name = f"{row['key']} {cell['method']} {cell['target']:g}"
            if cell["status"] == "unreachable":
                continue  # nothing was written
            if cell["status"] != "ok" or cell.get("latency_ratio") is None or cell.get("macs_ratio") is None:
                not_measured.append(name)
                continue
            if cell["macs_ratio"] >= 1.0:
                continue  # nothing removed: no claim
            checked.append(name)
            if cell["latency_ratio"] >= 1.0:
                slower.append(f"{name}: {cell['latency_ratio']:.2f}x at MACs {cell['macs_ratio']:.3f}x")
            per = cell.get("latency_per_macs")
            if per is not None and (worst is None or per > worst[0]):
                worst = (per, name, cell["latency_ratio"], cell["macs_ratio"])
    if not checked:
        measured = "no run removed MACs" + (f"; not measured: {', '.join(not_measured)}" if not_measured else "")
        checks.append({"target": target, "measured": measured, "met": None if not not_measured else False})
    else:
        measured = f"{len(checked) - len(slower)}/{len(checked)} runs faster than fp32"
        if worst is not None:
            measured += (f"; worst latency/MACs {worst[0]:.2f} ({worst[1]}: latency {worst[2]:.2f}x at MACs "
                         f"{worst[3]:.3f}x)")
        if slower:
            measured += "; slower: " + "; ".join(slower)
        if not_measured:
            measured += "; not measured (failed): " + ", ".join(not_measured)
        checks.append({"target": target, "measured": measured, "worst_latency_per_macs": worst[0] if worst else None,
                       "slower": slower, "met": not slower and not not_measured})

    # (3) no slowdown from tiny factor layers: the factored layers' own profiled time falls
    target = "no slowdown from tiny factor layers: the factored layers' profiled time < fp32's in every run"
    runs, slower, worst = [], [], None
    for row in rows:
        for cell in row.get("cells", []):
            factored = cell.get("factored") if cell.get("status") == "ok" else None
            if not factored or factored.get("time_ratio") is None or not factored.get("macs_ratio"):
                continue
            name = f"{row['key']} {cell['method']} {cell['target']:g}"
            runs.append(name)
            ratio, per = factored["time_ratio"], factored["time_ratio"] / factored["macs_ratio"]
            if ratio >= 1.0:
                slower.append(f"{name}: {ratio:.2f}x")
            if worst is None or per > worst[0]:
                worst = (per, name, ratio, factored["macs_ratio"], factored.get("share_of_fp32_time"))
    if not runs:
        checks.append({"target": target, "measured": "not profiled", "met": None})
    else:
        measured = (f"{len(runs) - len(slower)}/{len(runs)} runs; worst time/MACs {worst[0]:.2f} ({worst[1]}: "
                    f"{worst[2]:.2f}x time at {worst[3]:.2f}x MACs, those layers were "
                    f"{benchlib.percent(worst[4], 0)} of the fp32 time)")
        if slower:
            measured += "; slower: " + "; ".join(slower)
        checks.append({"target": target, "measured": measured, "worst_factored_time_per_macs": worst[0],
                       "slower": slower, "met": not slower})

    # (4) latency follows the MACs lowrank removes: within 10% of the latency those MACs allow
    target = (f"latency follows the MACs removed: latency ≤ {MAX_LATENCY_PER_BOUND:g}x the bound "
              "1 − share × (1 − factored MACs ratio) in every profiled run")
    runs, above, worst = [], [], None
    for row in rows:
        for cell in row.get("cells", []):
            per = latency_per_bound(cell) if cell.get("status") == "ok" else None
            if per is None:
                continue
            name = f"{row['key']} {cell['method']} {cell['target']:g}"
            runs.append(name)
            if per > MAX_LATENCY_PER_BOUND:
                above.append(f"{name}: {per:.2f}")
            if worst is None or per > worst[0]:
                worst = (per, name, cell["latency_ratio"], latency_bound(cell))
    if not runs:
        checks.append({"target": target, "measured": "not profiled", "met": None})
    else:
        measured = (f"{len(runs) - len(above)}/{len(runs)} runs; worst {worst[0]:.2f} ({worst[1]}: latency "
                    f"{worst[2]:.2f}x against a bound of {worst[3]:.2f}x)")
        if above:
            measured += "; above: " + "; ".join(above)
        checks.append({"target": target, "measured": measured, "worst_latency_per_bound": worst[0],
                       "above": above, "met": not above})
    return checks


def targets_table(checks: List[Dict[str, Any]]) -> str:
    return benchlib.markdown_table(["target", "measured", "met"],
                                   [[_md(c["target"]), _md(c["measured"]), MET_TEXT[c["met"]]] for c in checks],
                                   align="lll")


def render(results: Dict[str, Any]) -> str:
    rows = results["models"]
    settings = results.get("settings", {})
    parts = [f"Command: `{results['command']}`", "", "### Results", "", results_table(rows), ""]
    parts += ["### Models", "", models_table(rows), ""]
    parts += ["### Targets", "", targets_table(target_checks(rows)), ""]
    parts += [
        "fp32 = the shared model at the zoo's fixed input shape through `fold`: the input of every run, the quality "
        "baseline, the reference of the agreement metrics and of the latency. Runs: the `lowrank` pass with "
        "`target_macs` = target and `method` = weight (plain weight SVD, no data; per-layer budgets by relative "
        "layer error) or data (whitened SVD and least-squares refit on the calibration samples, disjoint from the "
        "evaluation ones; budgets by the pass's default allocation, `auto`: each rule's plan factored and the one "
        "closest to fp32 on the calibration samples kept; the allocation column names the rule), default forms / "
        "round_to / min_saving. MACs and params: after / "
        "before, counted by `stats.model_stats` on the written, reloaded file (\"pass:\" shows the pass's own figure "
        "when it differs). Latency: written file / fp32 file, onnxruntime CPU, 1 thread, interleaved, median of the "
        f"per-iteration ratios ({settings.get('latency_seconds', benchlib.DEFAULT_LATENCY_SECONDS):g} s per pair; "
        "< 1 is faster); the fp32 line gives its median time and fp32 against itself (the noise floor). "
        "latency/MACs = latency ratio / MACs ratio (1 = latency falls as much as the MACs). latency/bound = latency "
        "ratio / (1 − share × (1 − the factored layers' MACs ratio)), share = those layers' part of the fp32 "
        "file's profiled time: 1 when the model's latency falls as much as the MACs lowrank removed allow, the "
        "rest of the model keeping its time. Quality = top-1 for "
        "classifiers, the agreement with fp32 otherwise (box F1@0.5, text-map IoU@0.3, PSNR against the fp32 "
        "output; see tools/evaluate.py); drop = fp32 - run in top-1 points, 1 - agreement in points, or the task "
        "PSNR drop in dB (super-resolution); task metric = the model's own metric on its data. Forms and layers: "
        "the pass's report. Factored layers: onnxruntime profiler kernel time of those layers (each layer's node and "
        "its `/factorK` nodes, extended optimization level so that fused nodes keep their names), after / before, "
        "their MACs after / before, and the share of the fp32 file's kernel time they took (what factoring can "
        "save at most). Every file passes onnx.checker (save_model) and loads in onnxruntime.",
        "",
        f"Wall time {results['wall_seconds'] / 60:.1f} min." + _code_text(results.get("code")),
    ]
    return "\n".join(parts)


def _code_text(code: Optional[Dict[str, Any]]) -> str:
    if not code:
        return ""
    files = ", ".join(f"{name.rsplit('.', 1)[-1]} {digest or '?'}" for name, digest in code.get("files", {}).items())
    text = f" Code: git {code.get('git_head') or '?'}; sha256 of the sources: {files}."
    if code.get("changed_during_run"):
        text += f" **Changed on disk during the run: {', '.join(code['changed_during_run'])}.**"
    return text


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _float_list(parser: argparse.ArgumentParser, text: str, flag: str) -> List[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.75,0.5")
    if not values:
        parser.error(f"{flag} {text!r}: give at least one value")
    if any(not 0 < v < 1 for v in values):
        parser.error(f"{flag} {text!r}: every value must be in (0, 1)")
    return list(dict.fromkeys(values))


def _choices(parser: argparse.ArgumentParser, text: str, flag: str, allowed: Sequence[str]) -> List[str]:
    values = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        parser.error(f"{flag} {text!r}: choose from {', '.join(allowed)}")
    return values


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The options; a bad value exits 2 with one ``error:`` line (argparse's usage)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", metavar="KEYS",
                        help=f"comma-separated subset of: {', '.join(zoo.ZOO)} (default: {', '.join(DEFAULT_MODELS)}, "
                             "those present)")
    parser.add_argument("--targets", default=",".join(f"{t:g}" for t in DEFAULT_TARGETS), metavar="LIST",
                        help="fractions of the model's MACs to keep (target_macs; default %(default)s)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="LIST",
                        help=f"lowrank methods: {', '.join(METHODS)} (default %(default)s)")
    parser.add_argument("--eval-limit", type=int, default=0, metavar="N",
                        help="evaluate on at most N samples (default 0 = the whole pool minus the calibration samples)")
    parser.add_argument("--calib", type=int, default=DEFAULT_CALIB, metavar="N",
                        help="calibration samples of the data runs (default %(default)s; fewer on small pools, to "
                             "stay disjoint from the evaluation samples)")
    parser.add_argument("--latency-seconds", type=float, default=benchlib.DEFAULT_LATENCY_SECONDS, metavar="S",
                        help="onnxruntime timing per (fp32, run) pair (default %(default)s)")
    parser.add_argument("--round-to", type=int, metavar="N",
                        help="the pass's --lowrank-round-to (ranks in multiples of N; default: the pass's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the passes (default %(default)s)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables to this markdown file")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the written models (prints the folder)")
    args = parser.parse_args(argv)
    if args.calib < 1:
        parser.error("--calib must be >= 1")
    if args.eval_limit < 0:
        parser.error("--eval-limit must be >= 0")
    if not args.latency_seconds > 0:
        parser.error("--latency-seconds must be > 0")
    if args.round_to is not None and args.round_to < 1:
        parser.error("--round-to must be >= 1")
    args.eval_limit = None if args.eval_limit == 0 else args.eval_limit
    args.targets = _float_list(parser, args.targets, "--targets")
    args.methods = _choices(parser, args.methods, "--methods", METHODS)
    if args.models is not None:
        keys = list(dict.fromkeys(part.strip() for part in args.models.split(",") if part.strip()))
        unknown = [k for k in keys if k not in zoo.ZOO]
        if unknown or not keys:
            parser.error(f"--models {args.models!r}: choose from {', '.join(zoo.ZOO)}")
        args.models = keys
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    global SEED
    args = parse_args(argv)
    SEED = args.seed
    benchlib.require_shared_models()  # exits 2 saying how to provide it, like the other benches
    if args.models:
        entries = benchlib.select_models(",".join(args.models))
    else:
        available = {e.key for e in zoo.available()}
        entries = [zoo.get(k) for k in DEFAULT_MODELS if k in available]
        missing = [k for k in DEFAULT_MODELS if k not in available]
        if missing:
            benchlib.progress(f"skipping absent models: {', '.join(missing)}")
    benchlib.quiet()
    import onnxslim_cv.passes  # noqa: F401  (registers the passes)

    argv_list = sys.argv[1:] if argv is None else list(argv)
    command = "python tools/bench_lowrank.py" + (" " + shlex.join(argv_list) if argv_list else "")
    print(f"Command: `{command}`", flush=True)
    print(flush=True)
    benchlib.progress(f"$ {command}")
    runs = configs(args.targets, args.methods, args.round_to)

    code = code_version()
    started = time.perf_counter()
    rows = benchlib.bench_each(entries, bench_model, runs, args, prefix="onnxslim-cv-bench-lowrank-")
    wall = time.perf_counter() - started
    code_after = code_version()
    if code_after != code:
        code["changed_during_run"] = sorted(k for k in code["files"] if code["files"][k] != code_after["files"].get(k))
        code["files_after"] = code_after["files"]
        benchlib.progress(f"warning: pass sources changed on disk during the run: {', '.join(code['changed_during_run'])}"
                          " (the numbers are of the code imported at the start)")
    import onnxruntime

    results: Dict[str, Any] = {
        "command": command,
        "wall_seconds": wall,
        "settings": {
            "targets": args.targets, "methods": args.methods, "eval_limit": args.eval_limit, "calib": args.calib,
            "latency_seconds": args.latency_seconds, "seed": args.seed, "round_to": args.round_to,
            "onnxruntime": onnxruntime.__version__,
        },
        "code": code,
        "models": rows,
    }
    results["targets"] = target_checks(rows)
    results["errors"] = [
        {"model": row["key"], "target": cell["target"], "method": cell["method"], "status": cell["status"],
         "error": cell.get("error"), "traceback": cell.get("traceback")}
        for row in rows for cell in row.get("cells", []) if cell["status"] != "ok"
    ] + [{"model": row["key"], "status": "error", "error": row["error"], "traceback": row.get("traceback")}
         for row in rows if row.get("error")]
    text = render(results)
    benchlib.publish(text, results, args, shown=text.split("\n", 2)[2])  # the command line is printed at the top
    return 0


if __name__ == "__main__":
    sys.exit(main())
