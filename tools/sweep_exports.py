#!/usr/bin/env python
"""Every pass on real exports: torchvision architectures through both torch.onnx exporters,
Keras applications through tf2onnx, and paddle.vision models through paddle2onnx.

    python tools/sweep_exports.py [--models resnet18,mobilenet_v2,...]
                                  [--exporters torchscript,dynamo,tf2onnx,paddle2onnx]
                                  [--passes fold,prune,quant,sparsify,lowrank] [--folder DIR]
                                  [--torch-python PY] [--tf-python PY] [--paddle-python PY] [--samples 16]
                                  [--json out.json] [--markdown out.md]

The shared models are one export each; a user's models come from whatever exporter they ran.
This sweep exports torchvision's architectures and a YOLOv8-n style detector written in plain
torch (``tools/plain_torch_models.py``; random weights, seed 0: no download; three batches of
random data in training mode first, so BatchNorm holds non-trivial statistics) with
torch.onnx's TorchScript exporter (opset 17) and its dynamo exporter (opset 18, torch's default
since 2.9), and ``keras.applications`` architectures (random weights, the same three training
batches) with tf2onnx (opset 17; channels-last input, as TensorFlow users export them), and
``paddle.vision.models`` (random weights, the same batches) with paddle2onnx (opset 13), then
runs each pass through the command line as a user would, on random inputs (``--random-inputs``:
this checks the graph handling, not accuracy):

- ``fold``; ``prune --prune-ratio 0.3`` (no data, so the pruned model is not expected to match:
  the check is that it is valid and runs); ``quant`` and ``sparsify --sparsity 0.5
  --sparsify-mode uniform`` (OBS refit) and ``lowrank --target-macs 0.75`` on the random
  samples, verified against the original (the cosine gate's outcome is reported, not required).
- Per file: the dependency graph's share of conv channels in prunable groups, as ``prune`` sees
  it (after evaluating constant subgraphs; issue 3: at least
  80% on ResNet- and MobileNet-style graphs) and the commonest reason a group is frozen (other
  than computing a graph output, which is frozen by design).
- Per run: the exit code (0 passed the gate, 1 failed it, 2 error), whether the written model
  passes ``onnx.checker`` (full check) and loads in onnxruntime, the output cosine against the
  original, and the wall time.

Exports need torch (and torchvision for its architectures), TensorFlow and tf2onnx, or
PaddlePaddle and paddle2onnx (not dependencies of this tool): give ``--torch-python`` /
``--tf-python`` / ``--paddle-python`` a Python that has them, or run this script with one.
A model the exporter's framework does not have is skipped. Exported files are cached in
``--folder``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
try:
    import benchlib  # noqa: E402  (also puts the repo on sys.path)
except ImportError:  # the export worker runs in the torch environment, which needs none of this tool
    if "--export-worker" not in sys.argv:
        raise

ARCHITECTURES = {
    # name: (torchvision builder expression, input size)
    "resnet18": ("models.resnet18()", 224),
    "resnet50": ("models.resnet50()", 224),
    "mobilenet_v2": ("models.mobilenet_v2()", 224),
    "mobilenet_v3_small": ("models.mobilenet_v3_small()", 224),
    "mobilenet_v3_large": ("models.mobilenet_v3_large()", 224),
    "efficientnet_b0": ("models.efficientnet_b0()", 224),
    "mnasnet0_5": ("models.mnasnet0_5()", 224),
    "shufflenet_v2": ("models.shufflenet_v2_x1_0()", 224),
    "regnet_y_400mf": ("models.regnet_y_400mf()", 224),
    "densenet121": ("models.densenet121()", 224),
    "googlenet": ("models.googlenet(aux_logits=False, init_weights=True)", 224),
    "convnext_tiny": ("models.convnext_tiny()", 224),
    "lraspp_mobilenet_v3": ("models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)", 320),
    "deeplabv3_mobilenet_v3": ("models.segmentation.deeplabv3_mobilenet_v3_large("
                               "weights=None, weights_backbone=None, aux_loss=False)", 320),
    # plain torch (tools/plain_torch_models.py), no torchvision needed
    "yolov8n": ("plain.yolov8n(320)", 320),
}
KERAS_ARCHITECTURES = {
    # name: (keras.applications builder, input size)
    "resnet50": ("ResNet50", 224),
    "resnet50_v2": ("ResNet50V2", 224),
    "mobilenet_v2": ("MobileNetV2", 224),
    "mobilenet_v3_small": ("MobileNetV3Small", 224),
    "efficientnet_b0": ("EfficientNetB0", 224),
    "efficientnet_v2_b0": ("EfficientNetV2B0", 224),
    "regnetx_002": ("RegNetX002", 224),
    "densenet121": ("DenseNet121", 224),
    "inception_v3": ("InceptionV3", 299),
    "xception": ("Xception", 299),
    "nasnet_mobile": ("NASNetMobile", 224),
    "vgg16": ("VGG16", 224),
}
PADDLE_ARCHITECTURES = {
    # name: (paddle.vision.models builder, input size)
    "resnet50": ("resnet50", 224),
    "mobilenet_v2": ("mobilenet_v2", 224),
    "mobilenet_v3_small": ("mobilenet_v3_small", 224),
    "shufflenet_v2": ("shufflenet_v2_x1_0", 224),
    "squeezenet1_1": ("squeezenet1_1", 224),
    "densenet121": ("densenet121", 224),
    "googlenet": ("googlenet", 224),
    "inception_v3": ("inception_v3", 299),
    "vgg16": ("vgg16", 224),
}
EXPORTERS = {
    "torchscript": {"framework": "torch", "dynamo": False, "opset": 17},
    "dynamo": {"framework": "torch", "dynamo": True, "opset": 18},
    "tf2onnx": {"framework": "keras", "opset": 17},
    "paddle2onnx": {"framework": "paddle", "opset": 13},
}
DEFAULT_PASSES = ("fold", "prune", "quant", "sparsify", "lowrank")


def pass_arguments(name: str, samples: int) -> List[str]:
    random = ["--random-inputs", str(samples)]
    return {
        "fold": ["--passes", "fold", *random],
        "prune": ["--passes", "prune", "--prune-ratio", "0.3", "--no-verify"],
        "quant": ["--passes", "quant", "--quant-samples", str(samples), *random],
        "sparsify": ["--passes", "sparsify", "--sparsity", "0.5", "--sparsify-mode", "uniform",
                     "--sparsify-samples", str(samples), *random],
        "lowrank": ["--passes", "lowrank", "--target-macs", "0.75", "--lowrank-samples", str(samples), *random],
    }[name]


# --------------------------------------------------------------------------------------------
# Export (runs where torch is)
# --------------------------------------------------------------------------------------------


def export_worker(spec: Dict[str, Any]) -> None:
    framework = EXPORTERS[spec["exporter"]]["framework"]
    {"keras": _keras_export, "paddle": _paddle_export, "torch": _torch_export}[framework](spec)


def _torch_export(spec: Dict[str, Any]) -> None:
    import warnings

    import torch

    import plain_torch_models as plain  # noqa: F401  (used by the builder expressions)

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    expression, size = ARCHITECTURES[spec["model"]]
    if expression.startswith("models."):
        from torchvision import models  # noqa: F401  (used by the builder expressions)
    net = eval(expression)  # noqa: S307  (a fixed table above)
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.randn(4, 3, size, size))

    class Single(torch.nn.Module):  # segmentation models return a dict
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            return y["out"] if isinstance(y, dict) else y

    wrapped = Single(net).eval()
    options = EXPORTERS[spec["exporter"]]
    torch.onnx.export(wrapped, (torch.randn(1, 3, size, size),), spec["output"], input_names=["input"],
                      output_names=["output"], opset_version=options["opset"], dynamo=options["dynamo"],
                      external_data=False)


def _keras_export(spec: Dict[str, Any]) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf
    import tf2onnx

    tf.random.set_seed(0)
    builder, size = KERAS_ARCHITECTURES[spec["model"]]
    net = getattr(tf.keras.applications, builder)(weights=None, classifier_activation=None)  # logits
    rng = np.random.default_rng(0)
    for _ in range(3):  # eager training-mode calls update BatchNorm's moving statistics
        net(rng.uniform(0, 255, (4, size, size, 3)).astype(np.float32), training=True)
    signature = (tf.TensorSpec((1, size, size, 3), tf.float32, name="input"),)
    tf2onnx.convert.from_keras(net, input_signature=signature, opset=EXPORTERS[spec["exporter"]]["opset"],
                               output_path=spec["output"])


def _paddle_export(spec: Dict[str, Any]) -> None:
    import paddle

    paddle.seed(0)
    builder, size = PADDLE_ARCHITECTURES[spec["model"]]
    net = getattr(paddle.vision.models, builder)(pretrained=False)
    net.train()
    for _ in range(3):  # BatchNorm's running statistics
        net(paddle.randn([4, 3, size, size]))
    net.eval()
    signature = [paddle.static.InputSpec(shape=[1, 3, size, size], dtype="float32", name="input")]
    output = spec["output"]
    prefix = output[: -len(".onnx")] if output.endswith(".onnx") else output
    paddle.onnx.export(net, prefix, input_spec=signature, opset_version=EXPORTERS[spec["exporter"]]["opset"])
    written = Path(prefix + ".onnx")
    if written != Path(output):
        written.replace(output)


def _architectures(exporter: str) -> Dict[str, Any]:
    return {"keras": KERAS_ARCHITECTURES, "paddle": PADDLE_ARCHITECTURES}.get(EXPORTERS[exporter]["framework"], ARCHITECTURES)


def export(model: str, exporter: str, output: Path, python: str) -> Optional[str]:
    """None when ``output`` exists or was written, else the error's last line."""
    if output.exists():
        return None
    partial = output.with_suffix(".partial")  # renamed once whole, so an interrupted export is not cached
    spec = {"model": model, "exporter": exporter, "output": str(partial)}
    process = subprocess.run([python, str(Path(__file__).resolve()), "--export-worker", json.dumps(spec)],
                             capture_output=True, text=True)
    if process.returncode == 0 and partial.exists():
        invalid = _checker_error(partial)  # tf2onnx writes ops it could not convert and still exits 0
        if invalid is None:
            partial.replace(output)
            return None
        partial.unlink(missing_ok=True)
        return f"the exported file fails onnx.checker: {invalid}"[:200]
    partial.unlink(missing_ok=True)
    return _last_line(process)[:200]


def _checker_error(path: Path) -> Optional[str]:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001  (what the sweep reports)
        return str(exc).strip().splitlines()[0]
    return None


def _last_line(process: subprocess.CompletedProcess) -> str:
    """What a failed run said last on stderr (its one-line error), else its exit code."""
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {process.returncode}"


# --------------------------------------------------------------------------------------------
# Checks (run here)
# --------------------------------------------------------------------------------------------


def graph_summary(path: Path) -> Dict[str, Any]:
    from onnxslim_cv.depgraph import build_dependency_graph
    from onnxslim_cv.model_io import load_model
    from onnxslim_cv.passes.fold import fold_computed_constants
    from onnxslim_cv.pipeline import PassReport

    model = load_model(path)
    fold_computed_constants(model, PassReport("fold"))  # what prune does before building its graph
    dg = build_dependency_graph(model)
    summary = dg.summary()
    reasons: Counter = Counter()
    for group in dg.groups:
        by_design = group.frozen and all(reason.startswith("graph output") for reason in group.frozen)
        if group.frozen and not by_design and any(dg._is_conv_source(s) for s in group.sources):
            reasons[group.frozen[0]] += group.channels
    ops = Counter(node.op for node in model.graph.nodes)
    return {"conv_channels": summary["conv_channels"], "prunable_conv_channels": summary["prunable_conv_channels"],
            "frozen": reasons.most_common(3), "nodes": len(model.graph.nodes), "ops": dict(ops)}


def run_pass(path: Path, name: str, samples: int, folder: Path) -> Dict[str, Any]:
    import onnx

    from onnxslim_cv import runtime

    output = folder / f"{path.stem}.{name}.out.onnx"
    report = folder / f"{path.stem}.{name}.report.json"
    for stale in (output, report):
        stale.unlink(missing_ok=True)
    command = [sys.executable, "-m", "onnxslim_cv", str(path), str(output), *pass_arguments(name, samples), "--keep-failed",
               "--report-json", str(report)]
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True)
    result: Dict[str, Any] = {"rc": process.returncode, "seconds": time.perf_counter() - started}
    if process.returncode not in (0, 1):
        result["error"] = _last_line(process)[:300]
    if output.exists():
        try:
            onnx.checker.check_model(str(output), full_check=True)
            runtime.make_session(str(output))
            result["valid"] = True
        except Exception as exc:  # noqa: BLE001  (what the sweep reports)
            result["valid"] = False
            result["error"] = benchlib.error_text(exc)[:300]
        output.unlink()
    if report.exists():
        data = json.loads(report.read_text())
        verification = data.get("verification") or {}
        cosines = [o.get("cosine_mean") for o in verification.get("outputs") or [] if isinstance(o, dict)]
        cosines = [c for c in cosines if c is not None]
        result["cosine"] = min(cosines) if cosines else None
        passes = data.get("passes") or []
        if passes and passes[0].get("before", {}).get("macs"):
            result["macs"] = passes[-1]["after"]["macs"] / passes[0]["before"]["macs"]
        report.unlink()
    return result


def cell(run: Dict[str, Any]) -> str:
    if run.get("rc") not in (0, 1) or run.get("valid") is False:
        return f"**error**: {run.get('error', '?')}".replace("|", "/")
    parts = ["valid"]
    if run.get("macs") is not None and abs(run["macs"] - 1.0) > 1e-6:
        parts.append(f"MACs {run['macs']:.2f}x")
    if run.get("cosine") is not None:
        parts.append(f"cos {run['cosine']:.4f}")
    parts.append(benchlib.seconds(run["seconds"]))
    return ", ".join(parts)


def table(rows: List[Dict[str, Any]], passes: Sequence[str]) -> str:
    headers = ["model", "exporter", "nodes", "prunable conv channels", "commonest frozen reason (channels)"] + list(passes)
    lines = []
    for row in rows:
        if row.get("export_error"):
            lines.append([row["model"], row["exporter"], "", "", f"export failed: {row['export_error']}".replace("|", "/")]
                         + [""] * len(passes))
            continue
        graph = row["graph"]
        share = graph["prunable_conv_channels"] / max(1, graph["conv_channels"])
        frozen = graph["frozen"][0] if graph["frozen"] else None
        lines.append([row["model"], row["exporter"], str(graph["nodes"]),
                      f"{graph['prunable_conv_channels']}/{graph['conv_channels']} ({share:.0%})",
                      f"{frozen[1]} ch: {frozen[0][:90]}".replace("|", "/") if frozen else ""]
                     + [cell(row["runs"][p]) for p in passes])
    return benchlib.markdown_table(headers, lines, align="l" * len(headers))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    every = list(dict.fromkeys([*ARCHITECTURES, *KERAS_ARCHITECTURES, *PADDLE_ARCHITECTURES]))
    parser.add_argument("--models", default=",".join(every), help="comma-separated, from: " + ", ".join(every)
                        + " (each exported by the exporters whose framework has it)")
    parser.add_argument("--exporters", default="torchscript,dynamo",
                        help="comma-separated, from: " + ", ".join(EXPORTERS) + " (default torchscript,dynamo)")
    parser.add_argument("--passes", default=",".join(DEFAULT_PASSES))
    parser.add_argument("--folder", default="sweep-exports", help="where exports are cached (default ./sweep-exports)")
    parser.add_argument("--torch-python", default=sys.executable, help="a Python with torch and torchvision for the exports")
    parser.add_argument("--tf-python", default=sys.executable, help="a Python with tensorflow and tf2onnx for tf2onnx's exports")
    parser.add_argument("--paddle-python", default=sys.executable,
                        help="a Python with paddlepaddle and paddle2onnx for paddle2onnx's exports")
    parser.add_argument("--samples", type=int, default=16, help="random samples for the data-driven passes")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--export-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export_worker:
        export_worker(json.loads(args.export_worker))
        return 0
    models = [m for m in args.models.split(",") if m]
    exporters = [e for e in args.exporters.split(",") if e]
    passes = [p for p in args.passes.split(",") if p]
    unknown = [m for m in models if m not in every] + [e for e in exporters if e not in EXPORTERS] + [
        p for p in passes if p not in DEFAULT_PASSES]
    if unknown:
        print(f"sweep_exports: unknown: {', '.join(unknown)}", file=sys.stderr)
        return 2
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    benchlib.quiet("")
    started = time.perf_counter()
    rows = []
    for model in models:
        for exporter in exporters:
            if model not in _architectures(exporter):
                continue
            path = folder / f"{model}.{exporter}.onnx"
            benchlib.progress(f"{model} ({exporter}) ...")
            row: Dict[str, Any] = {"model": model, "exporter": exporter, "runs": {}}
            rows.append(row)
            python = {"keras": args.tf_python, "paddle": args.paddle_python}.get(
                EXPORTERS[exporter]["framework"], args.torch_python)
            problem = export(model, exporter, path, python)
            if problem:
                row["export_error"] = problem
                benchlib.progress(f"  export failed: {problem}")
                continue
            row["graph"] = graph_summary(path)
            for name in passes:
                row["runs"][name] = run_pass(path, name, args.samples, folder)
                benchlib.progress(f"  {name}: {cell(row['runs'][name])}")
    text = table(rows, passes)
    minutes = (time.perf_counter() - started) / 60
    text += (f"\n\nWall time {minutes:.1f} min; {args.samples} random samples; "
             f"{benchlib.machine()}; exporters: {', '.join(exporters)}.\n")
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    benchlib.write_json(args.json, {"rows": rows, "minutes": minutes, "samples": args.samples})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
