#!/usr/bin/env python
"""Our ``fold`` pass side by side with onnxslim on every shared real model.

    python tools/bench_fold.py [--models ultraface,ppocr_det] [--seconds 3] [--json out.json]

onnxslim (``onnxslim.slim``) is the maintained general-purpose graph slimmer; ``fold`` exists
because the structural passes need stable weight names and the BatchNorm scales it records
(see passes/fold.py). This script shows what that costs or gains, per model:

* node count of the original file, ours and onnxslim's (Constant nodes count as nodes);
* wall time of each, proto in -> proto out (ours: load + checks + fold + export);
* max relative output error against the original on the zoo's calibration images
  (per output: max |ref - out| / max |ref| over the samples; the worst output);
* onnxruntime latency against the original file (1 thread, interleaved, ratio < 1 is faster);
* the fraction of weights that were not rewritten (same values still present) whose name
  is preserved (weights: float initializers or Constant tensors with more than one element).

Both tools get the zoo's fixed input shape for the dynamic models. If onnxslim is not
installed, only ours runs and the script says how to install it.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (also puts the repo on sys.path)

from onnxslim_cv import runtime  # noqa: E402
from onnxslim_cv.model_io import load_model, save_model  # noqa: E402
from onnxslim_cv.pipeline import run_passes  # noqa: E402
from onnxslim_cv.testing import zoo  # noqa: E402

ERROR_SAMPLES = 8


def _onnxslim():
    try:
        import onnxslim
    except ImportError:
        return None
    return onnxslim


def run_ours(entry: zoo.SharedModel, proto: onnx.ModelProto) -> onnx.ModelProto:
    model = load_model(proto, input_shapes=entry.input_shapes if entry.dynamic else None)
    result, _ = run_passes(model, ["fold"], measure=False)
    return result.to_proto()


def run_onnxslim(onnxslim, entry: zoo.SharedModel, proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # slim edits the proto it is given
    shapes = [f"{entry.input_name}:{','.join(map(str, entry.input_shape))}"] if entry.dynamic else None
    return onnxslim.slim(copy, input_shapes=shapes)


def weights(proto: onnx.ModelProto) -> Dict[str, np.ndarray]:
    """Float tensors with more than one element, from initializers and Constant nodes."""
    found: Dict[str, np.ndarray] = {}
    tensors = [(t.name, t) for t in proto.graph.initializer]
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    tensors.append((node.output[0], attribute.t))
    for name, tensor in tensors:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f" and array.size > 1:
            found[name] = array
    return found


def _fingerprint(array: np.ndarray) -> str:
    return f"{array.dtype}{array.shape}" + hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def names_preserved(original: onnx.ModelProto, result: onnx.ModelProto) -> Dict[str, Any]:
    """Of the original weights still present with identical values, how many kept their name."""
    before, after = weights(original), weights(result)
    present = {_fingerprint(a) for a in after.values()}
    kept = [name for name, a in before.items() if _fingerprint(a) in present]
    same_name = [name for name in kept if name in after and _fingerprint(after[name]) == _fingerprint(before[name])]
    return {
        "weights": len(before),
        "unchanged": len(kept),
        "name_kept": len(same_name),
        "fraction": len(same_name) / len(kept) if kept else None,
    }


def max_relative_error(original_path, candidate_path, feeds: List[Dict[str, np.ndarray]]) -> float:
    """Per output, max |ref - out| over all samples divided by max |ref| over all samples; the
    worst output. (A per-sample scale would blow up on a text map that is ~1e-8 everywhere.)"""
    reference = runtime.make_session(str(original_path))
    candidate = runtime.make_session(str(candidate_path))
    ref_names = [o.name for o in reference.get_outputs()]
    cand_names = [o.name for o in candidate.get_outputs()]
    names = ref_names if set(ref_names) == set(cand_names) else None
    errors = np.zeros(len(ref_names))
    scales = np.zeros(len(ref_names))
    for feed in feeds:
        ref_out = reference.run(names, feed)
        cand_out = candidate.run(names, feed)
        for index, (a, b) in enumerate(zip(ref_out, cand_out)):
            errors[index] = max(errors[index], float(np.abs(a.astype(np.float64) - b).max()))
            scales[index] = max(scales[index], float(np.abs(a).max()))
    return float(np.max(errors / np.maximum(scales, 1e-12)))


def compare(entry: zoo.SharedModel, folder: Path, seconds: float, onnxslim) -> Dict[str, Any]:
    original_path = entry.model_path()
    original = onnx.load(str(original_path))
    feeds = list(entry.calibration(ERROR_SAMPLES))
    row: Dict[str, Any] = {
        "key": entry.key,
        "nodes_original": len(original.graph.node),
        "constant_nodes_original": sum(n.op_type == "Constant" for n in original.graph.node),
    }
    tools = [("ours", lambda p: run_ours(entry, p))]
    if onnxslim is not None:
        tools.append(("onnxslim", lambda p: run_onnxslim(onnxslim, entry, p)))
    for label, transform in tools:
        try:
            with benchlib.Timer() as timer:
                result = transform(original)
            path = folder / f"{entry.key}.{label}.onnx"
            save_model(result, path) if label == "ours" else onnx.save(result, str(path))
            timing = benchlib.latency(original_path, path, input_shapes=entry.input_shapes, seconds=seconds)
            row[label] = {
                "nodes": len(result.graph.node),
                "seconds": timer.seconds,
                "max_relative_error": max_relative_error(original_path, path, feeds),
                "latency_ratio": timing.ratio,
                "names": names_preserved(original, result),
            }
        except Exception as exc:  # a tool failing on a real model is a result, not a crash
            row[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}
    return row


def _cell(row: Dict[str, Any], label: str, field: str) -> str:
    result = row.get(label)
    if result is None:
        return "not installed"
    if "error" in result:
        return "failed" if field != "nodes" else f"failed ({result['error']})"
    value = result[field]
    if field == "seconds":
        return benchlib.seconds(value)
    if field == "max_relative_error":
        return f"{value:.1e}"
    if field == "latency_ratio":
        return f"{value:.2f}x"
    if field == "names":
        fraction = value["fraction"]
        return "n/a" if fraction is None else f"{value['name_kept']}/{value['unchanged']} ({100 * fraction:.0f}%)"
    return str(value)


def results_table(rows: List[Dict[str, Any]]) -> str:
    table_rows = []
    for row in rows:
        original = str(row["nodes_original"])
        if row["constant_nodes_original"]:
            original += f" ({row['nodes_original'] - row['constant_nodes_original']} w/o Constant)"
        table_rows.append(
            [row["key"], original]
            + [f"{_cell(row, 'ours', f)} / {_cell(row, 'onnxslim', f)}"
               for f in ("nodes", "seconds", "max_relative_error", "latency_ratio", "names")]
        )
    return benchlib.markdown_table(
        ["model", "nodes original", "nodes ours / onnxslim", "time ours / onnxslim", "max rel. error ours / onnxslim",
         "latency ours / onnxslim", "weight names kept ours / onnxslim"],
        table_rows,
        align="lrrrrrr",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", metavar="KEYS", help=f"comma-separated subset of: {', '.join(zoo.ZOO)}")
    parser.add_argument("--seconds", type=float, default=benchlib.DEFAULT_LATENCY_SECONDS,
                        help="latency measurement time per model and tool (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the slimmed models (prints the folder)")
    args = parser.parse_args(argv)

    entries = benchlib.select_models(args.models)
    onnxslim = _onnxslim()
    if onnxslim is None:
        print("onnxslim is not installed, so only our fold pass runs; install it with: pip install onnxslim",
              file=sys.stderr)
    rows = []
    with benchlib.temp_folder(keep=args.keep) as folder:
        for entry in entries:
            benchlib.progress(f"{entry.key} ...")
            rows.append(compare(entry, folder, args.seconds, onnxslim))
    print(results_table(rows))
    version = getattr(onnxslim, "__version__", "?") if onnxslim else "not installed"
    print()
    print(
        f"onnxslim {version}. Error on {ERROR_SAMPLES} calibration images per model; latency = slimmed / original "
        "file, onnxruntime CPU, 1 thread, interleaved median ratio; names kept = weights left numerically "
        "unchanged that keep their original name."
    )
    benchlib.write_json(args.json, {"onnxslim": version, "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
