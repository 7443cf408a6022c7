#!/usr/bin/env python
"""How far onnxruntime's latency can follow MACs when channels are removed, on this CPU.

    python tools/bench_conv_scaling.py [--seconds 2] [--models squeezenet,resnet20,...] [--markdown out.md]

The prune target "latency ratio <= 1.1x the MACs ratio" assumes time falls with MACs. Two
measurements say where it cannot:

1. Single convs (1 thread): a chain of N identical Conv+Relu layers timed against a chain of
   one, interleaved in one process, so the per-conv cost ``(t(N) - t(1)) / (N - 1)`` excludes
   the model's input and output. Each shape is timed at several channel counts (input =
   output channels, as when a group is pruned uniformly); the table gives each count's time
   and MACs against the widest, and time ratio / MACs ratio (1 = time follows MACs).
2. Whole shared models (1 thread, onnxruntime's profiler via ``bench.node_times``): the share
   of the fp32 model's kernel time spent outside dense (non-depthwise) convs, Gemm and MatMul
   (at onnxruntime's extended optimization level, where nodes keep their names). Removing
   channels shrinks those ops' work at most linearly in the channel count while the dense
   convs' MACs shrink quadratically, so that share sets a floor under latency/MACs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (also puts the repo on sys.path)

from bench_int8_kernels import conv_chain  # noqa: E402  (the same Conv+Relu chains, dense, fp32)
from onnxslim_cv import runtime  # noqa: E402
from onnxslim_cv.bench import node_times, race, random_feed  # noqa: E402

CHAIN = 6
SHAPES: Tuple[Tuple[str, int, int, int, Tuple[int, ...]], ...] = (
    # label, kernel, height, width, channel counts (widest first)
    ("3x3, 32x32 (ResNet-20 stage 1)", 3, 32, 32, (32, 24, 16, 8)),
    ("3x3, 16x16 (ResNet-20 stage 2)", 3, 16, 16, (64, 48, 32, 16)),
    ("3x3, 8x8 (ResNet-20 stage 3)", 3, 8, 8, (128, 96, 64, 32)),
    ("1x1, 40x40 (MobileNet expand)", 1, 40, 40, (96, 64, 48, 32, 16)),
    ("1x1, 12x48 (PP-OCR cls late)", 1, 12, 48, (128, 96, 64, 32)),
)


def per_conv_us(channels: int, kernel: int, height: int, width: int, seconds: float) -> float:
    feed = {"x": np.random.default_rng(1).standard_normal((1, channels, height, width)).astype(np.float32)}
    long_ms, short_ms = race([conv_chain(channels, kernel, 1, height, width, CHAIN, int8=False),
                              conv_chain(channels, kernel, 1, height, width, 1, int8=False)], feed, seconds=seconds, threads=1)
    return max(long_ms - short_ms, 1e-6) / (CHAIN - 1) * 1e3


def conv_rows(seconds: float) -> List[List[str]]:
    rows = []
    for label, kernel, height, width, counts in SHAPES:
        times = [per_conv_us(c, kernel, height, width, seconds) for c in counts]
        benchlib.progress(f"{label}: " + ", ".join(f"{c} ch {t:.1f} us" for c, t in zip(counts, times)))
        for channels, t in zip(counts, times):
            macs = (channels / counts[0]) ** 2
            rows.append([label, str(channels), f"{t:.1f} us", f"{t / times[0]:.2f}", f"{macs:.3f}",
                         f"{(t / times[0]) / macs:.2f}"])
    return rows


def _kind(node: onnx.NodeProto) -> str:
    if node.op_type in ("Conv", "ConvTranspose"):
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return "dense" if group == 1 else "depthwise/grouped"
    return "dense" if node.op_type in ("Gemm", "MatMul") else "other"


def model_rows(keys: Sequence[str], seconds: float) -> List[List[str]]:
    rows = []
    for entry in benchlib.select_models(",".join(keys)):
        with benchlib.temp_folder() as folder:
            path = folder / f"{entry.key}.onnx"
            benchlib.prepare_fp32(entry, path)
            proto = onnx.load(str(path))
            for index, node in enumerate(proto.graph.node):  # the profiler reports nodes by name
                node.name = node.name or f"{node.op_type}_{index}"
            onnx.save(proto, str(path))
            feed = random_feed(runtime.make_session(str(path)), entry.input_shapes)
            times = node_times([str(path)], feed, seconds=seconds)[0]
        kinds = {node.name: _kind(node) for node in proto.graph.node}
        total = sum(times.values())
        shares = {k: sum(t for n, t in times.items() if kinds.get(n, "other") == k) / total
                  for k in ("dense", "depthwise/grouped", "other")}
        benchlib.progress(f"{entry.key}: {total:.3f} ms of kernels, " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
        rows.append([entry.key, f"{total:.3f} ms", f"{len(times)}", f"{shares['dense']:.0%}",
                     f"{shares['depthwise/grouped']:.0%}", f"{shares['other']:.0%}"])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per pair of chains (default 2)")
    parser.add_argument("--models", default="squeezenet,resnet20,ppocr_cls,ppocr_det,ultraface,fastestdet",
                        help="shared models whose time is split by op kind (default: the six of tools/bench_prune.py; '' = none)")
    parser.add_argument("--markdown", help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    text = benchlib.markdown_table(["conv", "channels", "time per conv", "time / widest", "MACs / widest",
                                    "time ratio / MACs ratio"], conv_rows(args.seconds))
    keys = [k for k in args.models.split(",") if k.strip()]
    if keys:
        benchlib.require_shared_models()
        text += "\n\n" + benchlib.markdown_table(
            ["model", "kernel time (fp32, 1 thread)", "nodes timed", "dense convs / Gemm / MatMul",
             "depthwise / grouped convs", "other ops"], model_rows(keys, args.seconds))
    benchlib.publish(text, {}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
