"""Reports: the JSON written by ``--report-json`` and the tables printed on the terminal."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
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


def format_inspect(path: str, stats: ModelStats, *, layers: bool = True) -> str:
    lines = [
        f"{path}",
        f"  IR {stats.ir_version}, opset {stats.opset}, {stats.num_nodes} nodes, {human_bytes(stats.size_bytes)}",
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
    path = Path(path)
    text = to_json(data)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
