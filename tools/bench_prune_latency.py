#!/usr/bin/env python
"""Where a pruned model's latency stops following its MACs, op class by op class.

    python tools/bench_prune_latency.py [--models resnet20,ppocr_det] [--targets 0.7,0.5,0.3]
                                        [--seconds 3] [--markdown out.md] [--json out.json]

For every model and MACs target, ``fold,prune`` with ``target_macs`` and no calibration data
(the channel counts then come from the global ranking; with data the allocation differs, the
runtime's behaviour at a given channel count does not). Then, against the fp32 file:

- latency: onnxruntime, 1 thread, interleaved median ratio (as ``tools/bench_prune.py``);
- onnxruntime's profiler, both files interleaved (:func:`onnxslim_cv.bench.node_times`): each
  node's kernel time, summed by op class (dense Conv / Gemm / MatMul, grouped and depthwise
  Conv, everything else), as the class's share of the fp32 kernel time and its time ratio;
- each node's *work* ratio: its MACs ratio for Conv / Gemm / MatMul, its output elements'
  ratio for the rest (a Relu or an Add does work in proportion to what it writes);
- the work bound: ``sum(fp32 node time * node work ratio) / sum(fp32 node time)``, the
  latency ratio if every node's time fell exactly with its own work.

latency / MACs is what issue 3's target compares (≤ 1.1); latency / bound says how much of the
gap is the runtime not following the work (kernel efficiency at small channel counts,
per-node overhead), the rest being MACs that are not the time (depthwise convs and
element-wise ops do work in proportion to channels, not channels squared).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (also puts the repo on sys.path)

from onnxslim_cv.errors import UserError  # noqa: E402
from onnxslim_cv.testing import zoo  # noqa: E402

DEFAULT_MODELS = ("squeezenet", "resnet20", "ppocr_cls", "ppocr_det", "ultraface", "fastestdet")
DEFAULT_TARGETS = (0.7, 0.5, 0.3)
CLASSES = ("dense conv", "depthwise / grouped conv", "other")
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def op_class(node) -> str:
    if node.op in ("Conv", "ConvTranspose"):
        return "depthwise / grouped conv" if int(node.attrs.get("group", 1)) > 1 else "dense conv"
    if node.op in ("Gemm", "MatMul"):
        return "dense conv"
    return "other"


def node_work(model) -> Dict[str, Any]:
    """node name -> (op class, work): MACs for weight layers, output elements for the rest."""
    from onnxslim_cv.stats import _numel, layer_macs

    model.infer_shapes(reset=False)
    work: Dict[str, Any] = {}
    for node in model.graph.nodes:
        amount = layer_macs(node) if node.op in WEIGHT_OPS else None
        if amount is None:
            sizes = [_numel(t.shape, batch_axis=False) for t in node.outputs]
            amount = sum(s for s in sizes if s is not None) or None
        work[node.name] = (op_class(node), amount)
    return work


def breakdown(before: Dict[str, float], after: Dict[str, float], work_before: Dict[str, Any],
              work_after: Dict[str, Any]) -> Dict[str, Any]:
    """Per op class: share of the fp32 kernel time, time ratio, work ratio; and the work bound.

    ``before`` / ``after``: profiled kernel ms per node name (the pruned file keeps the names);
    a node gone from the pruned model counts as no time and no work, one whose work is unknown
    as unchanged work.
    """
    total = sum(before.values())
    classes = {name: {"time_before": 0.0, "time_after": 0.0, "work_time": 0.0} for name in CLASSES}
    bound = 0.0
    for name, ms in before.items():
        kind, amount = work_before.get(name, ("other", None))
        _, amount_after = work_after.get(name, (kind, 0 if name not in after else None))
        ratio = amount_after / amount if amount and amount_after is not None else 1.0
        entry = classes[kind]
        entry["time_before"] += ms
        entry["time_after"] += after.get(name, 0.0)
        entry["work_time"] += ms * ratio
        bound += ms * ratio
    result = {"bound": bound / total if total else None, "kernel_ratio": sum(after.values()) / total if total else None,
              "classes": {}}
    for kind, entry in classes.items():
        if entry["time_before"] > 0:
            result["classes"][kind] = {
                "share": entry["time_before"] / total,
                "time_ratio": entry["time_after"] / entry["time_before"],
                "work_ratio": entry["work_time"] / entry["time_before"],
            }
    return result


def bench_model(entry: zoo.SharedModel, folder: Path, targets: Sequence[float], args) -> Dict[str, Any]:
    from onnxslim_cv import runtime
    from onnxslim_cv.bench import node_times, random_feed
    from onnxslim_cv.model_io import load_model, save_model

    fp32 = folder / f"{entry.key}.fp32.onnx"
    benchlib.prepare_fp32(entry, fp32)
    named = benchlib.named_fp32(fp32, folder)  # the profiler names nodes by these; pruning keeps them
    work_before = node_work(load_model(named))
    feed = random_feed(runtime.make_session(str(named)))
    row: Dict[str, Any] = {"key": entry.key, "cells": []}
    for target in targets:
        cell: Dict[str, Any] = {"target": target}
        try:
            pruned, report = benchlib.run_pass(load_model(named), "prune", {"target_macs": target}, None,
                                               seed=0, measure=True)
        except UserError as exc:
            cell["error"] = benchlib.error_text(exc)
            row["cells"].append(cell)
            benchlib.progress(f"  {entry.key} {target:g}: {cell['error']}")
            continue
        path = folder / f"{entry.key}.t{target:g}.onnx"
        save_model(pruned, path)
        cell["macs_ratio"] = report.after.macs / report.before.macs
        cell["latency_ratio"] = benchlib.latency(named, path, seconds=args.seconds).ratio
        before, after = node_times([str(named), str(path)], feed, seconds=args.seconds)
        cell.update(breakdown(before, after, work_before, node_work(load_model(path))))
        row["cells"].append(cell)
        benchlib.progress(f"  {entry.key} {target:g}: MACs {cell['macs_ratio']:.3f}, latency {cell['latency_ratio']:.2f}x, "
                          f"work bound {cell['bound']:.2f}")
    return row


def table(rows: List[Dict[str, Any]]) -> str:
    headers = ["model", "target", "MACs", "latency", "latency/MACs", "work bound", "latency/bound"]
    headers += [f"{kind}: share, time / work" for kind in CLASSES]
    lines = []
    for row in rows:
        if row.get("error"):
            lines.append([row["key"], "", f"failed: {row['error'][:100]}"] + [""] * (len(headers) - 3))
            continue
        for cell in row["cells"]:
            if cell.get("error"):
                lines.append([row["key"], f"{cell['target']:g}", cell["error"][:100]] + [""] * (len(headers) - 3))
                continue
            line = [row["key"], f"{cell['target']:g}", f"{cell['macs_ratio']:.3f}x", f"{cell['latency_ratio']:.2f}x",
                    f"{cell['latency_ratio'] / cell['macs_ratio']:.2f}", f"{cell['bound']:.2f}x",
                    f"{cell['latency_ratio'] / cell['bound']:.2f}"]
            for kind in CLASSES:
                c = cell["classes"].get(kind)
                line.append("" if c is None else f"{100 * c['share']:.0f}%, {c['time_ratio']:.2f}x / {c['work_ratio']:.2f}x")
            lines.append(line)
    return benchlib.markdown_table(headers, lines, align="ll" + "r" * (len(headers) - 2))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", metavar="KEYS", help=f"comma-separated (default: {', '.join(DEFAULT_MODELS)}, those present)")
    parser.add_argument("--targets", default=",".join(f"{t:g}" for t in DEFAULT_TARGETS), metavar="LIST",
                        help="prune --target-macs values (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=3.0, metavar="S",
                        help="latency and profiling time per pair (default %(default)s)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table to this markdown file")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the written models (prints the folder)")
    args = parser.parse_args(argv)
    try:
        args.targets = [float(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--targets {args.targets!r}: comma-separated numbers in (0, 1]")
    if not args.targets or not all(0 < t <= 1 for t in args.targets):
        parser.error(f"--targets {args.targets!r}: comma-separated numbers in (0, 1]")
    if not args.seconds > 0:
        parser.error("--seconds must be > 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    benchlib.require_shared_models()
    if args.models:
        entries = benchlib.select_models(args.models)
    else:
        available = {e.key for e in zoo.available()}
        entries = [zoo.get(k) for k in DEFAULT_MODELS if k in available]
    benchlib.quiet()
    import onnxslim_cv.passes  # noqa: F401  (registers the passes)

    started = time.perf_counter()
    rows = benchlib.bench_each(entries, bench_model, args.targets, args, prefix="onnxslim-cv-bench-prune-latency-")
    wall = time.perf_counter() - started
    text = "\n".join([
        table(rows), "",
        "prune --target-macs without calibration data. latency: pruned / fp32 file, 1 thread, interleaved median. "
        "Work bound: the latency ratio if every node's profiled fp32 time fell with its own work (MACs for Conv / "
        "Gemm / MatMul, output elements otherwise). Per class: share of the fp32 kernel time, then the class's "
        "profiled time ratio / work ratio. Profiles at onnxruntime's extended level (node names kept), so shares are "
        f"approximate for the deployed run. Wall time {wall / 60:.1f} min.",
    ])
    benchlib.publish(text, {"targets": args.targets, "seconds": args.seconds, "wall_seconds": wall, "models": rows}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
