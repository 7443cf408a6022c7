#!/usr/bin/env python
"""Fit the conv latency model the ``lowrank`` pass uses to refuse factorizations that run slower.

    python tools/fit_latency_model.py [--shapes 250] [--seed 0] [--json out.json]

Times single Conv nodes (1x1, 3x3, 3x1, 1x3; 4..256 channels; 7..56 pixels square) in
onnxruntime, 1 thread, batch 1, best of 4 repeats, and fits by least squares weighted by 1/time

    time_us = NODE + MAC * macs + IM2COL * (Cin * k * out positions, for k > 1) + OUT * outputs + IN * inputs

then prints the coefficients next to the ones in ``onnxslim_cv/factorize.py`` and the model's
median and 90th-percentile relative error on the measured shapes, with both coefficient sets.
Only the ratios between coefficients matter to the pass (it compares a layer with its factors).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402,F401  (puts the repo on sys.path)

from onnxslim_cv import factorize  # noqa: E402

KERNELS = ((1, 1), (3, 3), (3, 1), (1, 3))
CHANNELS = (4, 8, 16, 32, 64, 128, 256)
SIZES = (7, 14, 28, 56)


def _session(cin: int, cout: int, size: int, kernel, seed: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array((rng.standard_normal((cout, cin, *kernel)) * 0.1).astype(np.float32), "w")
    pads = [kernel[0] // 2, kernel[1] // 2, kernel[0] // 2, kernel[1] // 2]
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), pads=pads)
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, size, size])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _time_us(session, x: np.ndarray) -> float:
    for _ in range(10):
        session.run(None, {"x": x})
    started, runs = time.perf_counter(), 0
    while time.perf_counter() - started < 0.05:
        session.run(None, {"x": x})
        runs += 1
    runs = max(20, runs)
    best = []
    for _ in range(4):
        started = time.perf_counter()
        for _ in range(runs):
            session.run(None, {"x": x})
        best.append((time.perf_counter() - started) / runs)
    return min(best) * 1e6


def features(cin: int, cout: int, size: int, kernel) -> List[float]:
    area = kernel[0] * kernel[1]
    positions = size * size
    return [1.0, cin * cout * area * positions, cin * area * positions if area > 1 else 0.0, cout * positions, cin * positions]


def measure(count: int, seed: int) -> List[Dict[str, float]]:
    rng = np.random.default_rng(seed)
    shapes = [
        (cin, cout, size, kernel)
        for cin, cout, size, kernel in itertools.product(CHANNELS, CHANNELS, SIZES, KERNELS)
        if 2e4 <= cin * cout * size * size * kernel[0] * kernel[1] <= 4e8
    ]
    picks = rng.choice(len(shapes), size=min(count, len(shapes)), replace=False)
    rows = []
    for number, index in enumerate(sorted(picks), start=1):
        cin, cout, size, kernel = shapes[index]
        x = rng.standard_normal((1, cin, size, size)).astype(np.float32)
        rows.append({"cin": cin, "cout": cout, "size": size, "kh": kernel[0], "kw": kernel[1],
                     "us": _time_us(_session(cin, cout, size, kernel, seed), x)})
        if number % 25 == 0:
            benchlib.progress(f"{number}/{len(picks)} shapes timed")
    return rows


def fit(rows: Sequence[Dict[str, float]]) -> np.ndarray:
    x = np.array([features(r["cin"], r["cout"], r["size"], (r["kh"], r["kw"])) for r in rows])
    y = np.array([r["us"] for r in rows])
    weight = 1.0 / y
    coefficients, *_ = np.linalg.lstsq(x * weight[:, None], y * weight, rcond=None)
    return coefficients


def relative_errors(rows, coefficients) -> np.ndarray:
    x = np.array([features(r["cin"], r["cout"], r["size"], (r["kh"], r["kw"])) for r in rows])
    y = np.array([r["us"] for r in rows])
    return np.abs(x @ coefficients / y - 1.0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=int, default=250, help="conv shapes to time (default 250)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the timings and the fit")
    args = parser.parse_args(argv)
    if args.shapes < 10:
        parser.error("--shapes must be at least 10")
    rows = measure(args.shapes, args.seed)
    fitted = fit(rows)
    current = np.array([factorize.LATENCY_NODE, factorize.LATENCY_MAC, factorize.LATENCY_IM2COL,
                        factorize.LATENCY_OUT, factorize.LATENCY_IN])
    names = ["NODE (us)", "MAC (us per MAC)", "IM2COL (us per element)", "OUT (us per element)", "IN (us per element)"]
    print(benchlib.markdown_table(["coefficient", "fitted now", "in factorize.py"],
                                  [[n, f"{a:.4g}", f"{b:.4g}"] for n, a, b in zip(names, fitted, current)]))
    print()
    for label, coefficients in (("fitted now", fitted), ("factorize.py", current)):
        errors = relative_errors(rows, coefficients)
        print(f"{label}: relative error on {len(rows)} shapes: median {np.median(errors):.1%}, 90th percentile {np.percentile(errors, 90):.1%}")
    benchlib.write_json(args.json, {"rows": rows, "fitted": fitted.tolist(), "current": current.tolist()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
