#!/usr/bin/env python
"""Structured pruning against the L1 filter-pruning baseline, at equal MACs, on the shared models.

    python tools/bench_prune.py [--models resnet20,squeezenet] [--ratios 0.1,0.3] [--samples 256]
                                [--eval-limit 200] [--latency-seconds 2] [--markdown out.md] [--json out.json]
                                [--allocation auto|ranking|sensitivity|marginal] [--target-macs 0.8,0.7]
                                [--calib-mirror auto|none|hflip|flips|crops]

For every model and ratio R, three runs of ``fold,prune`` on the model as loaded (dynamic
models at the zoo's fixed input shape):

1. **L1 (Li et al. 2017)**: ``ratio=R, criterion=l1, recovery=none, round_to=1``: the same
   fraction of filters removed in every prunable group, smallest L1 norm first, no refit and
   no calibration data;
2. **ours, no reconstruction**: ``target_macs`` = the MACs ratio the baseline achieved,
   ``recovery=none``, default criterion and ``round_to`` and no calibration data, so groups
   are ranked globally by weights alone;
3. **ours + reconstruction**: the same target with calibration data (``recovery=auto`` =
   least-squares refit; groups are then also allocated by calibrated output error).

``--allocation`` sets the third run's ``allocation`` (default: the pass default, auto, which
prunes with every allocation and keeps the one with the lowest calibration loss; the
quality cell then names the one chosen). ``--calib-mirror`` sets its ``calib_mirror`` (the
copies added to small calibration sets; default: the pass default, auto).
``--target-macs F,...`` replaces the ratios by fixed MACs targets and runs only the third
method at each (the issue's quality targets are stated that way).

For each result: MACs after / before (the prune pass's own statistics), onnxruntime latency
against the original fp32 file (1 thread, interleaved, median ratio; < 1 is faster), quality
(top-1 on labelled models, the task agreement with the fp32 original on the others, as
``tools/bench.py`` reports them) and pass time. A target the pass cannot reach (a ``UserError``)
is recorded as "unreachable"; any other exception is caught per cell and recorded too.

Evaluation and calibration samples are disjoint: evaluation reads the front of the zoo's pool
and calibration its back (see :func:`benchlib.disjoint_split`); on the 20-24 image detection
sets that means about half each.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (also puts the repo on sys.path)
from evaluate import evaluate  # noqa: E402

from onnxslim_cv.errors import UserError  # noqa: E402
from onnxslim_cv.model_io import load_model, save_model  # noqa: E402
from onnxslim_cv.pipeline import PassContext, make_passes, run_passes  # noqa: E402
from onnxslim_cv.passes import prune as prune_pass  # noqa: E402
from onnxslim_cv.testing import zoo  # noqa: E402

DEFAULT_MODELS = ("squeezenet", "resnet20", "ppocr_cls", "ppocr_det", "ultraface", "fastestdet")
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_SAMPLES = 256
DEFAULT_EVAL_LIMIT = 200
DEFAULT_LATENCY_SECONDS = 2.0

METHODS = (
    ("l1", "L1 (Li et al. 2017)"),
    ("ours", "ours, no reconstruction"),
    ("ours_lsq", "ours + reconstruction"),
)


def method_options(method: str, ratio: float, target: Optional[float], allocation: Optional[str] = None,
                   calib_mirror: Optional[str] = None) -> Dict[str, Any]:
    if method == "l1":
        return {"ratio": ratio, "criterion": "l1", "recovery": "none", "round_to": 1}
    if method == "ours":
        return {"target_macs": target, "recovery": "none"}
    return {"target_macs": target, **({"allocation": allocation} if allocation else {}),
            **({"calib_mirror": calib_mirror} if calib_mirror else {})}


def _error_text(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_cell(
    entry: zoo.SharedModel,
    model,
    folder: Path,
    name: str,
    options: Dict[str, Any],
    calibration,
    *,
    eval_limit: int,
    latency_seconds: float,
) -> Dict[str, Any]:
    """One ``fold,prune`` run, saved and measured; never raises (failures are results)."""
    cell: Dict[str, Any] = {"options": dict(options), "calibrated": calibration is not None}
    started = time.perf_counter()
    try:
        passes = make_passes(["fold", "prune"], {"prune": dict(options)})
        context = PassContext(calibration=calibration, progress=False)
        result, reports = run_passes(model, passes, context=context)
    except UserError as exc:
        cell.update(status="unreachable" if "target_macs" in options else "error", error=_error_text(exc),
                    seconds=time.perf_counter() - started)
        benchlib.progress(f"  {name}: {cell['status']}: {cell['error']}")
        return cell
    except Exception as exc:  # a crash of the pass is a result of the benchmark, not of the script
        cell.update(status="error", error=_error_text(exc), traceback=traceback.format_exc(),
                    seconds=time.perf_counter() - started)
        benchlib.progress(f"  {name}: CRASH {cell['error']}\n" + "".join(cell["traceback"].splitlines(True)[-6:]))
        return cell
    report = reports[-1]
    cell.update(
        status="ok",
        macs=[report.before.macs, report.after.macs],
        macs_ratio=report.after.macs / report.before.macs if report.before.macs else None,
        params=[report.before.params, report.after.params],
        pass_seconds=report.seconds,
        fold_seconds=reports[0].seconds,
        changes=report.changes,
        notes=report.notes,
        warnings=[w for r in reports for w in r.warnings],
        estimated_macs_ratio=report.details.get("estimated_macs_ratio"),
        allocation=report.details.get("allocation"),
    )
    try:
        output = folder / f"{entry.key}.{name}.onnx"
        save_model(result, output)
        timing = benchlib.latency(entry.model_path(), output, input_shapes=entry.input_shapes, seconds=latency_seconds)
        cell["latency_ratio"] = timing.ratio
        cell["latency_ms"] = [t.median_ms for t in timing.timings]
        quality = evaluate(output, entry, reference=entry.model_path(), limit=eval_limit)
        cell["quality"] = {k: quality[k] for k in ("samples", "metrics", "primary", "agreement", "agreement_primary")}
    except Exception as exc:  # a pruned model that onnxruntime rejects is a result too
        cell.update(status="error", error=f"measuring: {_error_text(exc)}", traceback=traceback.format_exc())
        benchlib.progress(f"  {name}: measuring failed: {cell['error']}")
    cell["seconds"] = time.perf_counter() - started
    return cell


def bench_model(
    entry: zoo.SharedModel,
    ratios: Sequence[float],
    folder: Path,
    *,
    samples: int,
    eval_limit: Optional[int],
    latency_seconds: float,
    allocation: Optional[str] = None,
    targets: Optional[Sequence[float]] = None,
    calib_mirror: Optional[str] = None,
) -> Dict[str, Any]:
    started = time.perf_counter()
    eval_n, calib_n = benchlib.disjoint_split(entry, eval_limit, samples)
    original = entry.model_path()
    model = load_model(original, input_shapes=entry.input_shapes if entry.dynamic else None)
    calibration = benchlib.in_memory(entry.calibration(calib_n))
    data = benchlib.CachedEntry(entry)  # every variant is evaluated on the same decoded samples
    baseline = evaluate(original, data, limit=eval_n)
    row: Dict[str, Any] = {
        "key": entry.key,
        "eval_samples": eval_n,
        "calibration_samples": calib_n,
        "calibration": calibration.description,
        "baseline": {k: baseline[k] for k in ("samples", "metrics", "primary")},
        "agreement_metric": None,
        "ratios": [],
    }
    plan = [(None, t) for t in targets] if targets else [(r, None) for r in ratios]
    for ratio, fixed_target in plan:
        benchlib.progress(f"{entry.key} " + (f"target {fixed_target:g}" if ratio is None else f"ratio {ratio:g}") + " ...")
        cells: Dict[str, Any] = {"ratio": ratio}
        target = fixed_target
        for method, _ in METHODS:
            name = f"r{ratio:g}.{method}" if ratio is not None else f"t{fixed_target:g}.{method}"
            if fixed_target is not None and method != "ours_lsq":
                cells[method] = {"status": "skipped", "error": "fixed MACs target: only ours + reconstruction runs"}
                continue
            if method != "l1" and target is None:
                cells[method] = {"status": "skipped", "error": "no baseline MACs ratio"}
                continue
            options = method_options(method, ratio, target, allocation, calib_mirror)
            if method == "ours_lsq":
                options["samples"] = calib_n
            cells[method] = run_cell(
                data, model, folder, name, options, calibration if method == "ours_lsq" else None,
                eval_limit=eval_n, latency_seconds=latency_seconds,
            )
            if method == "l1" and cells[method].get("macs_ratio") is not None:
                target = cells[method]["macs_ratio"]
            if cells[method].get("quality", {}).get("agreement_primary"):
                row["agreement_metric"] = cells[method]["quality"]["agreement_primary"]["name"]
        cells["target_macs"] = target
        row["ratios"].append(cells)
    row["seconds"] = time.perf_counter() - started
    return row


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def is_classifier(row: Dict[str, Any]) -> bool:
    return row["baseline"]["primary"]["name"] == "top-1"


def quality_text(row: Dict[str, Any], cell: Dict[str, Any]) -> str:
    """Top-1 on labelled models, the agreement with fp32 on the others (as tools/bench.py)."""
    quality = cell.get("quality")
    if quality is None:
        return "n/a"
    if is_classifier(row):
        return quality["primary"]["text"]
    return quality["agreement_primary"]["text"]


def _cells(row: Dict[str, Any], cell: Dict[str, Any]) -> List[str]:
    status = cell.get("status")
    if status == "unreachable":
        return ["unreachable", "", ""]
    if status == "skipped":
        return ["n/a", "", ""]
    if status == "error" and "macs_ratio" not in cell:
        return [f"error: {cell['error'][:80]}", "", ""]
    macs = "n/a" if cell.get("macs_ratio") is None else f"{cell['macs_ratio']:.3f}"
    latency = "n/a" if cell.get("latency_ratio") is None else f"{cell['latency_ratio']:.2f}x"
    quality = quality_text(row, cell) if status == "ok" else f"error: {cell['error'][:80]}"
    if status == "ok" and cell.get("allocation"):
        quality += f" ({cell['allocation']['chosen']})"
    return [macs, latency, quality]


def results_table(rows: List[Dict[str, Any]]) -> str:
    headers = ["model", "ratio"]
    for _, label in METHODS:
        headers += [f"{label}: MACs", "latency", "quality"]
    table_rows = []
    for row in rows:
        for cells in row["ratios"]:
            line = [row["key"], f"{cells['ratio']:g}" if cells["ratio"] is not None else f"MACs {cells['target_macs']:g}"]
            for method, _ in METHODS:
                line += _cells(row, cells[method])
            table_rows.append(line)
    return benchlib.markdown_table(headers, table_rows, align="lr" + "rrr" * len(METHODS))


def models_table(rows: List[Dict[str, Any]]) -> str:
    """Per model: what quality means, the fp32 value, the data used, mean pass times."""
    table_rows = []
    for row in rows:
        base = row["baseline"]["primary"]
        metric = "top-1" if is_classifier(row) else f"agreement with fp32 ({row['agreement_metric'] or '?'})"
        times = []
        for method, _ in METHODS:
            values = [c[method]["pass_seconds"] for c in row["ratios"] if c[method].get("pass_seconds") is not None]
            times.append(benchlib.seconds(sum(values) / len(values)) if values else "n/a")
        table_rows.append([
            row["key"], metric, f"{base['name']} {base['text']}", row["eval_samples"], row["calibration_samples"],
            " / ".join(times), benchlib.seconds(row["seconds"]),
        ])
    return benchlib.markdown_table(
        ["model", "quality column", "fp32 original", "eval samples", "calib samples",
         "mean prune time L1 / ours / ours+rec", "model wall time"],
        table_rows, align="llrrrrr",
    )


def render(rows: List[Dict[str, Any]], args, wall: float) -> str:
    return "\n".join([
        results_table(rows),
        "",
        models_table(rows),
        "",
        "Each cell: MACs after / before the prune pass; latency = pruned / original fp32 file, onnxruntime CPU, "
        f"1 thread, interleaved median ratio ({args.latency_seconds:g} s per pair); quality = top-1 for "
        "classifiers, agreement with the fp32 original for the others (see tools/evaluate.py), on the first "
        "eval samples of the zoo pool. L1 = `ratio=R, criterion=l1, recovery=none, round_to=1` without "
        "calibration; ours = `target_macs=<L1's MACs ratio>, recovery=none` (default criterion, round_to auto) "
        "without calibration; ours + reconstruction = the same target with calibration samples disjoint from "
        f"the evaluation ones (recovery auto = lsq, allocation {args.allocation or 'auto'}; under auto, the one chosen is "
        "in brackets). "
        f"Wall time {wall / 60:.1f} min.",
    ])


def _parse_ratios(text: str, flag: str = "--ratios") -> List[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"error: {flag} {text!r}: expected comma-separated numbers, e.g. 0.1,0.3")
    if not values or any(not 0 < v < 1 for v in values):
        raise SystemExit(f"error: {flag} {text!r}: every value must be in (0, 1)")
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", metavar="KEYS",
                        help=f"comma-separated subset of: {', '.join(zoo.ZOO)} (default: the available ones of "
                             f"{', '.join(DEFAULT_MODELS)})")
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS),
                        help="comma-separated baseline pruning ratios (default %(default)s)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                        help="calibration samples for the reconstruction runs (default %(default)s; fewer on "
                             "small pools, to stay disjoint from the evaluation samples)")
    parser.add_argument("--eval-limit", type=int, default=DEFAULT_EVAL_LIMIT, metavar="N",
                        help="evaluate quality on at most N samples (default %(default)s; 0 = the whole pool "
                             "minus the calibration samples)")
    parser.add_argument("--latency-seconds", type=float, default=DEFAULT_LATENCY_SECONDS, metavar="S",
                        help="latency measurement time per pruned model (default %(default)s)")
    parser.add_argument("--allocation", choices=prune_pass.ALLOCATIONS,
                        help="allocation of the 'ours + reconstruction' runs (default: the pass default, auto)")
    parser.add_argument("--calib-mirror", choices=prune_pass.MIRRORS,
                        help="calib_mirror of the 'ours + reconstruction' runs (default: the pass default, auto)")
    parser.add_argument("--target-macs", metavar="F,...",
                        help="instead of the ratios: run only 'ours + reconstruction' at these MACs targets")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables to this markdown file")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the pruned models (prints the folder)")
    args = parser.parse_args(argv)

    ratios = _parse_ratios(args.ratios)
    targets = _parse_ratios(args.target_macs, "--target-macs") if args.target_macs else None
    if args.samples < 1:
        raise SystemExit("error: --samples must be >= 1")
    if args.models:
        entries = benchlib.select_models(args.models)
    else:
        available = {e.key for e in benchlib.select_models(None)}
        entries = [zoo.get(k) for k in DEFAULT_MODELS if k in available]
        missing = [k for k in DEFAULT_MODELS if k not in available]
        if missing:
            benchlib.progress(f"skipping absent models: {', '.join(missing)}")
    eval_limit = None if args.eval_limit == 0 else args.eval_limit

    started = time.perf_counter()
    rows = []
    with benchlib.temp_folder(prefix="onnxslim-cv-bench-prune-", keep=args.keep) as folder:
        for entry in entries:
            benchlib.progress(f"{entry.key}: loading, evaluating the fp32 original ...")
            try:
                rows.append(bench_model(entry, ratios, folder, samples=args.samples, eval_limit=eval_limit,
                                        latency_seconds=args.latency_seconds, allocation=args.allocation,
                                        targets=targets, calib_mirror=args.calib_mirror))
            except Exception as exc:  # loading / evaluating the original failed: say so, go on
                benchlib.progress(f"{entry.key}: failed before pruning: {_error_text(exc)}\n{traceback.format_exc()}")
    wall = time.perf_counter() - started
    text = render(rows, args, wall)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
        benchlib.progress(f"wrote {args.markdown}")
    crashes = [
        {"model": row["key"], "ratio": cells["ratio"], "method": method, "error": cells[method]["error"],
         "traceback": cells[method].get("traceback")}
        for row in rows for cells in row["ratios"] for method, _ in METHODS
        if cells[method].get("status") == "error"
    ]
    benchlib.write_json(args.json, {
        "ratios": ratios, "samples": args.samples, "eval_limit": eval_limit,
        "latency_seconds": args.latency_seconds, "wall_seconds": wall, "models": rows, "errors": crashes,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
