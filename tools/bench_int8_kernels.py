#!/usr/bin/env python
"""onnxruntime int8 (QDQ, U8S8) against fp32 convolutions on this CPU, per conv shape.

    python tools/bench_int8_kernels.py [--seconds 1.5] [--markdown out.md]

Why the ``quant`` pass times placements instead of quantizing everything: on x86,
onnxruntime runs int8 convs in NHWC and fp32 convs in its blocked NCHWc layout, and the two
are not equally good at every shape. Each row times a chain of N identical convs (+ Relu)
against a chain of one, in the same process, interleaved, so the per-conv cost is
``(t(N) - t(1)) / (N - 1)`` without the model's input/output conversions. Shapes are the
ones CV backbones start with (few channels, large images) and end with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (also puts the repo on sys.path)

from onnxslim_cv.bench import race  # noqa: E402

CHAIN = 7
SHAPES: Tuple[Tuple[str, int, int, int, int, int], ...] = (
    # label, channels, kernel, groups (0 = depthwise), height, width
    ("depthwise 3x3", 16, 3, 0, 120, 160),
    ("depthwise 3x3", 32, 3, 0, 60, 80),
    ("depthwise 3x3", 64, 3, 0, 30, 40),
    ("depthwise 3x3", 128, 3, 0, 15, 20),
    ("pointwise 1x1", 32, 1, 1, 60, 80),
    ("pointwise 1x1", 64, 1, 1, 30, 40),
    ("dense 3x3", 16, 3, 1, 120, 160),
    ("dense 3x3", 64, 3, 1, 30, 40),
)


def conv_chain(channels: int, kernel: int, groups: int, height: int, width: int, length: int, int8: bool):
    """A model of ``length`` Conv+Relu layers; with ``int8``, QDQ around each (uint8 activations
    with zero point 0 so Relu fuses, int8 per-channel weights), as the quant pass emits them."""
    rng = np.random.default_rng(0)
    groups = channels if groups == 0 else groups
    nodes, inits = [], []
    scale, zero = "act_scale", "act_zero"
    inits += [numpy_helper.from_array(np.array(0.05, np.float32), scale),
              numpy_helper.from_array(np.array(0, np.uint8), zero)]
    current = "x"
    if int8:
        nodes += [helper.make_node("QuantizeLinear", ["x", scale, zero], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", scale, zero], ["x_dq"])]
        current = "x_dq"
    for i in range(length):
        weight = (rng.standard_normal((channels, channels // groups, kernel, kernel)) * 0.1).astype(np.float32)
        bias = np.zeros(channels, np.float32)
        pads = [kernel // 2] * 4
        if int8:
            w_scale = (np.abs(weight).reshape(channels, -1).max(axis=1) / 127).astype(np.float32)
            w_q = np.round(weight / w_scale[:, None, None, None]).astype(np.int8)
            inits += [numpy_helper.from_array(w_q, f"w{i}_q"), numpy_helper.from_array(w_scale, f"w{i}_s"),
                      numpy_helper.from_array(np.zeros(channels, np.int8), f"w{i}_z")]
            nodes += [helper.make_node("DequantizeLinear", [f"w{i}_q", f"w{i}_s", f"w{i}_z"], [f"w{i}"], axis=0),
                      helper.make_node("Conv", [current, f"w{i}"], [f"y{i}"], group=groups, pads=pads),
                      helper.make_node("Relu", [f"y{i}"], [f"r{i}"]),
                      helper.make_node("QuantizeLinear", [f"r{i}", scale, zero], [f"q{i}"]),
                      helper.make_node("DequantizeLinear", [f"q{i}", scale, zero], [f"d{i}"])]
            current = f"d{i}"
        else:
            inits += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
            nodes += [helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [f"y{i}"], group=groups, pads=pads),
                      helper.make_node("Relu", [f"y{i}"], [f"r{i}"])]
            current = f"r{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def measure(seconds: float) -> List[List[str]]:
    rows = []
    for label, channels, kernel, groups, height, width in SHAPES:
        feed = {"x": np.random.default_rng(1).random((1, channels, height, width), dtype=np.float32)}
        models = [conv_chain(channels, kernel, groups, height, width, n, int8)
                  for int8 in (False, True) for n in (1, CHAIN)]
        fp32_1, fp32_n, int8_1, int8_n = race(models, feed, seconds=seconds)
        fp32 = (fp32_n - fp32_1) / (CHAIN - 1) * 1e3
        int8 = (int8_n - int8_1) / (CHAIN - 1) * 1e3
        rows.append([label, str(channels), f"{height}x{width}", f"{fp32:.0f} µs", f"{int8:.0f} µs",
                     benchlib.ratio(int8, fp32)])
        benchlib.progress(f"{label} {channels}ch {height}x{width}: fp32 {fp32:.0f} µs, int8 {int8:.0f} µs")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="timing budget per shape (default 1.5)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table to this file")
    args = parser.parse_args(argv)
    rows = measure(args.seconds)
    text = benchlib.markdown_table(["conv", "channels", "size", "fp32", "int8 (QDQ)", "int8 / fp32"], rows,
                                   align="lrrrrr")
    text += ("\n\nonnxruntime CPU, 1 thread; per conv in a chain of "
             f"{CHAIN} (Conv+Relu), interleaved round-robin in one process.")
    benchlib.publish(text, {}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
