"""Reports: the JSON written by ``--report-json`` and the tables printed on the terminal."""

from __future__ import annotations

import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .pipeline import PassReport
from .stats import ModelStats
from .verify import VerifyReport


def human(value: Optional[float], unit: str = "") -> str:
    """1234567 -> '1.23M'; None -> 'n/a'."""
    if value is None:
        return "n/a"
    value = float(value)
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f}{suffix}{unit}"
    return f"{value:.0f}{unit}"


def human_bytes(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    for threshold, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= threshold:
            return f"{value / threshold:.2f} {suffix}"
    return f"{value:.0f} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, align: Optional[str] = None) -> str:
    """A plain aligned text table; ``align`` holds 'l' or 'r' per column."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    lines = []
    for index, row in enumerate(cells):
        parts = [cell.ljust(w) if a == "l" else cell.rjust(w) for cell, w, a in zip(row, widths, align)]
        lines.append("  ".join(parts).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _arrow(before, after, fmt=human) -> str:
    return f"{fmt(before)} -> {fmt(after)}"


def _ratio(before, after) -> str:
    if before in (None, 0) or after is None:
        return ""
    return f"({after / before:.2f}x)"


def format_passes(reports: List[PassReport]) -> str:
    rows = []
    for report in reports:
        before, after = report.before, report.after
        rows.append(
            [
                report.name,
                f"{report.seconds:.2f}s",
                _arrow(before.num_nodes if before else None, after.num_nodes if after else None, lambda v: str(v)),
                f"{_arrow(before.params if before else None, after.params if after else None)} "
                f"{_ratio(before.params if before else None, after.params if after else None)}",
                f"{_arrow(before.macs if before else None, after.macs if after else None)} "
                f"{_ratio(before.macs if before else None, after.macs if after else None)}",
                _arrow(before.size_bytes if before else None, after.size_bytes if after else None, human_bytes),
            ]
        )
    lines = [table(["pass", "time", "nodes", "params", "MACs", "size"], rows, align="lrllll")]
    for report in reports:
        details = []
        if report.changes:
            details.append(", ".join(f"{kind.replace('_', ' ')}: {n}" for kind, n in report.changes.items()))
        else:
            details.append("no changes")
        details.extend(report.notes)
        lines.append(f"  {report.name}: " + "; ".join(details))
        for warning in report.warnings:
            lines.append(f"  {report.name}: warning: {warning}")
        groups = report.details.get("groups") if isinstance(report.details, dict) else None
        if groups:
            lines.extend(_format_pruned_groups(report.name, groups))
        tensors = report.details.get("tensors") if isinstance(report.details, dict) else None
        if tensors:
            lines.extend(_format_quantized(report.name, tensors, report.details.get("float_nodes") or {}))
    return "\n".join(lines)


# ---------------------------------------------------------------------- quantization
MAX_TENSOR_ROWS = 10


def _format_quantized(name: str, tensors: Sequence[Dict[str, Any]], float_nodes: Dict[str, str]) -> List[str]:
    """The quantized tensors with the least SNR against float (where accuracy goes) and the
    layers left float with their reasons; --report-json has every tensor."""
    def snr(row) -> float:
        value = row.get("snr_db")
        return float("inf") if value is None or value != value else float(value)

    worst = sorted(tensors, key=snr)[:MAX_TENSOR_ROWS]
    rows = [
        [
            _clip(row["tensor"], 48),
            f"{row['scale']:.3g}",
            str(row["zero_point"]),
            f"[{row['range'][0]:.3g}, {row['range'][1]:.3g}]",
            "n/a" if snr(row) == float("inf") else f"{snr(row):.1f}",
        ]
        for row in worst
    ]
    lines = [f"  {name}: {len(tensors)} tensors quantized; the {len(rows)} with the lowest SNR vs float:"]
    lines.append(_indent(table(["tensor", "scale", "zero point", "range", "SNR dB"], rows, align="lrrlr"), "    "))
    if float_nodes:
        lines.append(f"  {name}: kept float:")
        lines.append(_indent(table(["node", "why"], [[_clip(n, 48), why] for n, why in float_nodes.items()], align="ll"), "    "))
    return lines


# ---------------------------------------------------------------------- channel groups
MAX_GROUP_ROWS = 25
_REASON_PATTERNS = (
    (re.compile(r"^graph output .*$"), "graph output"),
    (re.compile(r"^.* is read inside a subgraph$"), "read inside a subgraph"),
    (re.compile(r"^.*: shape .* does not match \d+ tracked channels$"), "shape does not match the tracked channels"),
    (re.compile(r"^excluded by --prune-exclude .*$"), None),
    (re.compile(r"^ratio 0 in recipe .*$"), "ratio 0 in recipe"),
)
_OP_REASON = re.compile(r"^([A-Z][A-Za-z0-9]*) .+?: (.+)$")


def reason_kind(reason: str) -> str:
    """A frozen reason without the node / tensor names, so equal causes can be counted together."""
    for pattern, kind in _REASON_PATTERNS:
        if pattern.match(reason):
            return kind or reason
    match = _OP_REASON.match(reason)
    if match:
        return f"{match.group(1)}: {match.group(2)}"
    return reason


def short_names(names: Sequence[str], limit: int = 3) -> str:
    """'a, b, c (+2)'; '-' when empty."""
    names = list(names or [])
    if not names:
        return "-"
    text = ", ".join(names[:limit])
    return text + (f" (+{len(names) - limit})" if len(names) > limit else "")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _frozen_summary(groups: Sequence[Dict[str, Any]], limit: int = 3) -> Optional[str]:
    """'3 groups frozen: graph output (2), Reshape: ... (1)' or None when nothing is frozen."""
    frozen = [g for g in groups if g.get("frozen")]
    if not frozen:
        return None
    counts: Dict[str, int] = {}
    for group in frozen:
        for kind in dict.fromkeys(reason_kind(r) for r in group["frozen"]):
            counts[kind] = counts.get(kind, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{_clip(kind, 70)} ({n})" for kind, n in ranked[:limit])
    if len(ranked) > limit:
        text += f", {len(ranked) - limit} other reason(s)"
    return f"{len(frozen)}/{len(groups)} channel groups frozen: {text}"


def _channels_after(group: Dict[str, Any]) -> int:
    units = int(group.get("units") or 0)
    channels = int(group.get("channels") or 0)
    kept = group.get("kept_units")
    if not units or kept is None:
        return channels
    return channels * int(kept) // units


def _format_pruned_groups(name: str, groups: Sequence[Dict[str, Any]]) -> List[str]:
    """The groups a structural pass changed (channels before -> after) and why others were frozen."""
    lines: List[str] = []
    changed = [g for g in groups if g.get("kept_units") is not None and g["kept_units"] < g.get("units", 0)]
    if changed:
        shown = changed[:MAX_GROUP_ROWS]
        wide_before = max(len(str(g["channels"])) for g in shown)
        wide_after = max(len(str(_channels_after(g))) for g in shown)
        rows = [
            [
                g["id"],
                _clip(short_names(g.get("sources", [])), 60),
                f"{g['channels']:>{wide_before}} -> {_channels_after(g):>{wide_after}}",
            ]
            for g in shown
        ]
        lines.append(f"  {name}: {len(changed)} channel group(s) changed")
        lines.append(_indent(table(["group", "sources", "channels"], rows, align="rlr"), "    "))
        if len(changed) > MAX_GROUP_ROWS:
            lines.append(f"    ... and {len(changed) - MAX_GROUP_ROWS} more")
    frozen = _frozen_summary(groups)
    if frozen:
        lines.append(f"  {name}: {frozen}")
    return lines


def dependency_graph_dict(dg) -> Dict[str, Any]:
    """The JSON form of a :class:`~onnxslim_cv.depgraph.DependencyGraph`'s groups, for ``inspect``."""
    return {
        "groups": [
            {
                "id": g.id,
                "channels": g.channels,
                "units": len(g.units),
                "prunable": g.prunable,
                "frozen": list(g.frozen),
                "sources": list(g.sources),
                "consumers": list(g.consumers),
                "tensors": list(g.tensors),
                "notes": list(g.notes),
            }
            for g in dg.groups
        ],
        "dependency_graph": dg.summary(),
    }


def format_groups(data: Dict[str, Any]) -> str:
    """Channel groups table plus summary line, from :func:`dependency_graph_dict`."""
    groups, summary = data["groups"], data["dependency_graph"]
    lines = ["channel groups (channels removed together; frozen ones are never pruned):"]
    if groups:
        rows = []
        for g in groups:
            if g["prunable"]:
                status = "prunable"
            else:
                extra = f" (+{len(g['frozen']) - 1})" if len(g["frozen"]) > 1 else ""
                status = "frozen: " + _clip(g["frozen"][0], 90) + extra
            rows.append(
                [
                    g["id"],
                    g["channels"],
                    status,
                    _clip(short_names(g["sources"]), 60),
                    len(g["consumers"]),
                    _clip("; ".join(g["notes"]), 60) or "-",
                ]
            )
        lines.append(_indent(table(["group", "channels", "status", "sources", "consumers", "notes"], rows, align="rrllrl")))
    else:
        lines.append("  (no channel groups: no tensor with a channel axis was found)")
    lines.append(
        f"  {summary['prunable_groups']}/{summary['groups']} groups prunable, "
        f"{summary['prunable_conv_channels']}/{summary['conv_channels']} conv channels in prunable groups"
    )
    return "\n".join(lines)


def _fmt_float(value: Optional[float], digits: int = 5) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def format_verification(report: VerifyReport) -> str:
    verdict = "PASS" if report.passed else "FAIL"
    lines = [f"verification on {report.data}: {verdict}"]
    rows = []
    for out in report.outputs:
        rows.append(
            [
                out.name,
                "x".join(str(d) for d in out.shape),
                f"{out.max_abs_error:.3g}",
                f"{_fmt_float(out.cosine_mean)} / {_fmt_float(out.cosine_min)}",
                "inf" if out.snr_db is None else f"{out.snr_db:.1f}",
                "-" if out.top1_agreement is None else f"{100 * out.top1_agreement:.2f}%",
                "-" if out.top5_agreement is None else f"{100 * out.top5_agreement:.2f}%",
            ]
        )
    lines.append(
        _indent(table(["output", "shape", "max|err|", "cosine mean / min", "SNR dB", "top-1 agree", "top-5 agree"], rows, align="llrrrrr"))
    )
    if report.latency:
        lines.append(
            f"  latency ({report.latency['threads']} thread(s), interleaved): "
            f"{report.latency['timings'][0]['median_ms']:.3f} ms -> {report.latency['timings'][1]['median_ms']:.3f} ms "
            f"(ratio {report.latency['ratio']:.3f})"
        )
    for failure in report.failures:
        lines.append(f"  gate failed: {failure}")
    return "\n".join(lines)


def format_inspect(path: str, stats: ModelStats, *, layers: bool = True, deflate_bytes: Optional[int] = None) -> str:
    deflated = "" if deflate_bytes is None else f" ({human_bytes(deflate_bytes)} deflated)"
    lines = [
        f"{path}",
        f"  IR {stats.ir_version}, opset {stats.opset}, {stats.num_nodes} nodes, {human_bytes(stats.size_bytes)}{deflated}",
    ]
    for kind, specs in (("input", stats.inputs), ("output", stats.outputs)):
        for spec in specs:
            lines.append(f"  {kind:6s} {spec['name']}: {spec['shape']} {spec['dtype']}")
    macs = human(stats.macs) if stats.macs is not None else (
        f"n/a (dynamic dims; known layers {human(stats.macs_known)}; fix them with --input-shape)"
    )
    lines.append(f"  params {human(stats.params)} ({stats.params:,}), MACs {macs}")
    lines.append(f"  weight sparsity {100 * stats.weight_sparsity:.2f}% zeros")
    lines.append("  ops: " + ", ".join(f"{op} {n}" for op, n in stats.op_histogram.items()))
    if layers and stats.layers:
        total = stats.macs or stats.macs_known or 0
        rows = []
        for layer in stats.layers:
            share = f"{100 * layer.macs / total:.1f}%" if layer.macs is not None and total else "-"
            rows.append(
                [
                    layer.name or "(unnamed)",
                    layer.op_type,
                    "x".join(str(d) for d in layer.output_shape) if layer.output_shape else "?",
                    human(layer.params),
                    human(layer.macs) if layer.macs is not None else "?",
                    share,
                    "-" if layer.weight_sparsity is None else f"{100 * layer.weight_sparsity:.1f}%",
                ]
            )
        lines.append("")
        lines.append(_indent(table(["layer", "op", "output", "params", "MACs", "MACs %", "zeros"], rows, align="lllrrrr")))
    return "\n".join(lines)


def format_bench(data: Dict[str, Any]) -> str:
    rows = [
        [t["model"], f"{t['median_ms']:.3f}", f"{t['p90_ms']:.3f}", f"{t['mean_ms']:.3f}", t["runs"]]
        for t in data["timings"]
    ]
    lines = [f"onnxruntime CPU, {data['threads']} intra-op thread(s), interleaved runs"]
    lines.append(_indent(table(["model", "median ms", "p90 ms", "mean ms", "runs"], rows, align="lrrrr")))
    if data.get("ratio") is not None:
        lines.append(
            f"  ratio B/A: {data['ratio']:.3f} (median of per-iteration ratios; ratio of medians {data['ratio_of_medians']:.3f})"
        )
    return "\n".join(lines)


def _indent(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line if line else line for line in text.splitlines())


def environment() -> Dict[str, str]:
    import onnx
    import onnxruntime

    from . import __version__

    return {
        "onnxslim_cv": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(data: Any) -> str:
    return json.dumps(_jsonable(data), indent=2, allow_nan=False)


def write_json(data: Any, path: os.PathLike) -> None:
    """Atomic like model writes: a failed run never leaves half a report."""
    from .model_io import write_atomically

    text = to_json(data)
    write_atomically(path, lambda handle: handle.write(text + "\n"))
