#!/usr/bin/env python
"""What a pipeline of passes does to every shared real model, measured end to end.

    python tools/bench.py --passes fold [--models resnet20,squeezenet] [--json out.json]

For each model: load it through the library (dynamic models at the zoo's fixed input
shape), run the passes with the zoo's calibration images, save the result to a temp folder,
then report nodes / params / MACs before and after (the pipeline's own statistics of the
loaded model), file size on disk, onnxruntime latency against the original file (1 thread,
interleaved; ratio < 1 is faster), accuracy before and after (top-1 on labelled models, the
task agreement with the fp32 original for the others; see tools/evaluate.py) and pass time.
The markdown table is what the README quotes.

Other benchmarks (prune, quant, ...) reuse :func:`bench_model` and :func:`results_table`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (also puts the repo on sys.path)
from evaluate import evaluate  # noqa: E402

from onnxslim_cv.model_io import file_size, load_model, save_model  # noqa: E402
from onnxslim_cv.pipeline import PassContext, make_passes, parse_pass_list, run_passes  # noqa: E402
from onnxslim_cv.report import human, human_bytes  # noqa: E402  (the CLI's formats)
from onnxslim_cv.testing import zoo  # noqa: E402

DEFAULT_CALIB_SIZE = 32


def parse_options(values: Optional[Sequence[str]]) -> Dict[str, Dict[str, Any]]:
    """``--option fold.max_bytes=1000`` (repeatable) -> ``{"fold": {"max_bytes": "1000"}}``;
    the pass parses the string as its CLI flag would."""
    options: Dict[str, Dict[str, Any]] = {}
    for value in values or []:
        name, _, assignment = value.partition(".")
        key, equals, setting = assignment.partition("=")
        if not name or not key or not equals:
            raise SystemExit(f"error: --option {value!r}: expected PASS.OPTION=VALUE, e.g. fold.max_bytes=1000")
        options.setdefault(name, {})[key.replace("-", "_")] = setting
    return options


def bench_model(
    entry: zoo.SharedModel,
    passes: Sequence[str],
    folder: Path,
    *,
    options: Optional[Dict[str, Dict[str, Any]]] = None,
    calib_size: int = DEFAULT_CALIB_SIZE,
    limit: Optional[int] = None,
    latency_seconds: float = benchlib.DEFAULT_LATENCY_SECONDS,
    baseline: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Run ``passes`` on one shared model and measure it; returns one JSON-able row.

    ``baseline`` is the original's evaluation when the caller already has it (several
    configurations of one model then evaluate the original once).
    """
    original = entry.model_path()
    model = load_model(original, input_shapes=entry.input_shapes if entry.dynamic else None)
    calibration = entry.calibration(calib_size)
    instances = make_passes(passes, options or {})
    result_model, reports = run_passes(model, instances, context=PassContext(calibration=calibration, progress=False))
    output = folder / f"{entry.key}.{'-'.join(passes)}.onnx"
    save_model(result_model, output)

    before, after = reports[0].before, reports[-1].after
    timing = benchlib.latency(original, output, input_shapes=entry.input_shapes, seconds=latency_seconds)
    baseline = baseline or evaluate(original, entry, limit=limit)
    compressed = evaluate(output, entry, reference=original, limit=limit)
    return {
        "key": entry.key,
        "passes": list(passes),
        "options": {r.name: r.options for r in reports},
        "calibration": calibration.description,
        "nodes": [before.num_nodes, after.num_nodes],
        "params": [before.params, after.params],
        "macs": [before.macs, after.macs],
        "file_bytes": [file_size(original), file_size(output)],
        "latency_ratio": timing.ratio,
        "latency_ms": [t.median_ms for t in timing.timings],
        "accuracy_before": baseline,
        "accuracy_after": compressed,
        "pass_seconds": sum(r.seconds for r in reports),
        "changes": {r.name: r.changes for r in reports},
        "warnings": [w for r in reports for w in r.warnings],
        "output": str(output),
    }


def _arrow(values: Sequence[Any], fmt=human, with_ratio: bool = True) -> str:
    before, after = values
    text = f"{fmt(before)} → {fmt(after)}"
    return f"{text} ({benchlib.ratio(after, before)})" if with_ratio else text


def accuracy_text(row: Dict[str, Any]) -> str:
    """Top-1 before -> after on labelled models, the agreement with fp32 on the others."""
    before, after = row["accuracy_before"], row["accuracy_after"]
    if before["primary"]["name"] == "top-1":
        agreement = after["agreement_primary"]["text"]
        return f"top-1 {before['primary']['text']} → {after['primary']['text']} (agree {agreement})"
    return f"{after['agreement_primary']['text']} vs fp32 ({before['primary']['name']} " \
           f"{before['primary']['text']} → {after['primary']['text']})"


def results_table(rows: List[Dict[str, Any]]) -> str:
    table_rows = [
        [
            row["key"],
            _arrow(row["nodes"], str),
            _arrow(row["params"]),
            _arrow(row["macs"]),
            _arrow(row["file_bytes"], human_bytes),
            "n/a" if row["latency_ratio"] is None else f"{row['latency_ratio']:.2f}x",
            accuracy_text(row),
            benchlib.seconds(row["pass_seconds"]),
        ]
        for row in rows
    ]
    return benchlib.markdown_table(
        ["model", "nodes", "params", "MACs", "file size", "latency", "accuracy", "pass time"],
        table_rows,
        align="lrrrrrlr",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", required=True, help="comma-separated passes, as onnxslim-cv --passes")
    parser.add_argument("--option", action="append", metavar="PASS.OPTION=VALUE", help="a pass option (repeatable)")
    parser.add_argument("--models", metavar="KEYS", help=f"comma-separated subset of: {', '.join(zoo.ZOO)}")
    parser.add_argument("--calib-size", type=int, default=DEFAULT_CALIB_SIZE, metavar="N",
                        help=f"calibration images per model (default {DEFAULT_CALIB_SIZE})")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate accuracy on at most N samples")
    parser.add_argument("--seconds", type=float, default=benchlib.DEFAULT_LATENCY_SECONDS,
                        help="latency measurement time per model (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the compressed models (prints the folder)")
    args = parser.parse_args(argv)

    passes = parse_pass_list(args.passes)
    options = parse_options(args.option)
    entries = benchlib.select_models(args.models)
    rows = []
    with benchlib.temp_folder(keep=args.keep) as folder:
        for entry in entries:
            benchlib.progress(f"{entry.key}: {','.join(passes)} ...")
            rows.append(bench_model(entry, passes, folder, options=options, calib_size=args.calib_size,
                                    limit=args.limit, latency_seconds=args.seconds))
    print(results_table(rows))
    print()
    print(
        f"Passes `{','.join(passes)}`; nodes/params/MACs of the model as loaded (PP-OCR weights in Constant nodes "
        "already turned into initializers); latency = compressed / original file, onnxruntime CPU, 1 thread, "
        "interleaved median ratio, so what loading normalises counts too (ultraface lists its initializers as "
        "graph inputs, which stops onnxruntime's own folding); accuracy on the full shared sets unless --limit."
    )
    benchlib.write_json(args.json, {"passes": passes, "options": options, "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
