#!/usr/bin/env python
"""Time ``analyze_layers`` (per-layer sparsity sensitivity) on a ~5M-parameter ImageNet CNN.

    python tools/bench_analyze.py [--arch mobilenetv2|resnet] [--samples 64]
                                  [--sparsities 0.3,0.5,0.7,0.9] [--random] [--full-check N]

Models, built with the test-model builders at 224x224 with 1000 classes: ``mobilenetv2``
(default), MobileNetV2 at width 1.4 (6.2M params, 0.58 GMACs, as in Sandler et al. 2018), the
standard small ImageNet backbone of that size; ``resnet``, ResNet-50's topology at widths
32/64/128/192 (5.2M params, 0.97 GMACs), a compute-heavier net of the same size.
Calibration: the first ``--samples`` ImageNet images of the shared folder (torchvision
preprocessing, decoded before the clock starts), or random normal inputs when the folder is
absent or with ``--random``. Prints params, GMACs, the wall and CPU seconds ``analyze_layers``
takes (issue #4's target: under 120 s on 2 cores) and the per-layer table. ``--full-check N``
also measures the first N layers with whole-model sessions and prints the largest loss
difference (the suffix models must agree).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from onnxslim_cv import sensitivity  # noqa: E402
from onnxslim_cv.calibration import ImagePreprocess, from_path, random_data  # noqa: E402
from onnxslim_cv.ir import Model  # noqa: E402
from onnxslim_cv.stats import model_stats  # noqa: E402
from onnxslim_cv.testing import models as test_models  # noqa: E402
from onnxslim_cv.testing import zoo  # noqa: E402

STAGES = ((32, 3), (64, 4), (128, 6), (192, 3))
STEM = 32
MOBILENETV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
"""(expansion, channels, blocks, stride) per stage, as in Sandler et al. 2018."""


def _divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def mobilenetv2(width: float = 1.4, image_size: int = 224, num_classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 at a width multiplier (1.4: 6.1M params, 0.58 GMACs in the paper)."""
    g = test_models._GraphBuilder("mobilenetv2", opset=13, seed=seed, batch=1, fast_weights=True)
    cin = _divisible(32 * width)
    x = g.conv_bn_act("input", test_models.IN_CHANNELS, cin, 3, stride=2, act="relu6")
    for expansion, channels, blocks, stride in MOBILENETV2:
        cout = _divisible(channels * width)
        for block in range(blocks):
            s = stride if block == 0 else 1
            hidden = cin * expansion
            y = x if expansion == 1 else g.conv_bn_act(x, cin, hidden, 1, act="relu6")
            y = g.conv_bn_act(y, hidden, hidden, 3, stride=s, group=hidden, act="relu6")
            y = g.conv_bn_act(y, hidden, cout, 1, act=None, gain=test_models.RESNET50_BRANCH_GAIN if s == 1 and cin == cout else 1.0)
            x = g.add(y, x) if s == 1 and cin == cout else y
            cin = cout
    last = _divisible(1280 * max(1.0, width))
    x = g.conv_bn_act(x, cin, last, 1, act="relu6")
    test_models._classifier(g, x, last, num_classes)
    return g.finish(image_size, ["logits"])


def small_resnet(stages=STAGES, stem: int = STEM, image_size: int = 224, num_classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 topology at the given (bottleneck width, blocks) per stage."""
    g = test_models._GraphBuilder("small_resnet", opset=13, seed=seed, batch=1, fast_weights=True)
    x = g.conv_bn_act("input", test_models.IN_CHANNELS, stem, 7, stride=2)
    x = g.max_pool(x, 3, 2, pad=1)
    cin = stem
    for stage, (width, blocks) in enumerate(stages):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            out = 4 * width
            y = g.conv_bn_act(x, cin, width, 1)
            y = g.conv_bn_act(y, width, width, 3, stride=stride)
            y = g.conv_bn_act(y, width, out, 1, act=None, gain=test_models.RESNET50_BRANCH_GAIN)
            shortcut = x
            if stride != 1 or cin != out:
                shortcut = g.bn(g.conv(x, cin, out, 1, stride=stride, pad=0, bias=False), out)
            x, cin = g.relu(g.add(y, shortcut)), out
    test_models._classifier(g, x, cin, num_classes)
    return g.finish(image_size, ["logits"])


def calibration(model: Model, samples: int, force_random: bool):
    root = zoo.shared_models_dir()
    images = root / "imagenet" / "images" if root else None
    if not force_random and images is not None and images.is_dir():
        preprocess = ImagePreprocess(
            size=(224, 224), resize_mode="center-crop", scale=1 / 255,
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        )
        data = from_path(images, model.input_specs(), preprocess=preprocess, limit=samples)
        return data, f"{samples} ImageNet images from {images}"
    return random_data(model.input_specs(), samples, seed=0), f"{samples} random normal inputs"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("mobilenetv2", "resnet"), default="mobilenetv2",
                        help="mobilenetv2: MobileNetV2 1.4 (6.1M params, 0.58 GMACs); resnet: ResNet-50 topology "
                        "at widths 32/64/128/192 (5.2M params, 0.97 GMACs)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--sparsities", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--random", action="store_true", help="random inputs even when ImageNet images are available")
    parser.add_argument("--full-check", type=int, default=0, metavar="N")
    args = parser.parse_args(argv)

    if args.arch == "resnet":
        model = Model.from_proto(small_resnet())
        label = f"ResNet-50 topology, stages {STAGES}, stem {STEM}"
    else:
        model = Model.from_proto(mobilenetv2())
        label = "MobileNetV2 1.4"
    stats = model_stats(model)
    print(f"model: {label}, 224x224: {stats.params / 1e6:.2f}M params, {stats.macs / 1e9:.2f} GMACs")
    data, description = calibration(model, args.samples, args.random)
    # decode the images once up front, so the timing is the analysis, not JPEG decoding
    cached = [item for item in data]
    from onnxslim_cv.calibration import from_iterable

    data = from_iterable(cached, model.input_specs())
    sparsities = [float(s) for s in args.sparsities.split(",")]
    print(f"data: {description}; sparsities {sparsities}")

    started, cpu = time.perf_counter(), time.process_time()
    curves = sensitivity.analyze_layers(model, data, sparsities=sparsities, samples=args.samples, progress=False)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(f"analyze_layers: {len(curves)} layers x {len(sparsities)} sparsities on {args.samples} samples "
          f"in {seconds:.1f} s wall, {cpu:.1f} s CPU (target < 120 s wall on 2 cores; CPU / 2 is the wall "
          f"time on two otherwise idle cores); peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(sensitivity.format_table(curves, "cosine"))

    if args.full_check:
        names = [c.name for c in curves[: args.full_check]]
        started = time.perf_counter()
        full = sensitivity.analyze_layers(model, data, sparsities=sparsities, samples=args.samples,
                                          layers=names, method="full", progress=False)
        worst = max(
            abs(a - b)
            for fast, slow in zip(curves, full)
            for metric in fast.loss
            for a, b in zip(fast.loss[metric], slow.loss[metric])
        )
        print(f"whole-model check of {len(names)} layers: {time.perf_counter() - started:.1f} s, "
              f"largest loss difference {worst:.2e}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
