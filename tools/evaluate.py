#!/usr/bin/env python
"""Task accuracy of a model on the shared data, and its agreement with a reference model.

    python tools/evaluate.py MODEL --zoo KEY [--reference REF] [--limit N] [--json]
    python tools/evaluate.py --all [--limit N] [--json]

Cosine similarity says little about whether a compressed detector still finds the same
faces, so every model is scored with a metric of its task, on real inputs, with the
preprocessing of ``onnxslim_cv.testing.zoo`` (which reproduces MODELS.md):

* classifiers (SqueezeNet, ResNet-20, MNIST, PP-OCR cls): top-1 (top-5 for ImageNet) on the
  labelled set; against a reference: top-1 agreement and mean output cosine;
* PP-OCR det (segmentation): mean text probability and share of pixels above 0.3; against a
  reference: IoU of the maps binarised at 0.3, pooled over all images;
* ultraface / FastestDet: detections per image after the MODELS.md thresholds and NMS;
  against a reference: F1 of detections matched at IoU >= 0.5 (same class for FastestDet);
* super-resolution: Y-channel PSNR on the ImageNet 672 crops (bicubic as the baseline);
  against a reference: PSNR of the output against the reference output.

``--all`` scores every shared fp32 model and compares with MODELS.md. ``evaluate()`` is the
importable form the benchmarks use.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402  (also puts the repo on sys.path)

from onnxslim_cv import runtime  # noqa: E402
from onnxslim_cv.testing import zoo  # noqa: E402

ULTRAFACE_SCORE, ULTRAFACE_NMS = 0.7, 0.3
FASTESTDET_SCORE, FASTESTDET_NMS = 0.65, 0.4
MATCH_IOU = 0.5
TOP5_MIN_CLASSES = 100  # top-5 is reported for ImageNet only, as in MODELS.md


# --------------------------------------------------------------------------------------------
# Small metric helpers
# --------------------------------------------------------------------------------------------


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two flattened outputs; two all-zero outputs count as identical."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norms)


def mean_cosine(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    return float(np.mean([cosine(o, r) for o, r in zip(outputs, reference)]))


def as_probabilities(scores: np.ndarray) -> np.ndarray:
    """Class scores as probabilities: kept when they already are (a Softmax output), else softmaxed (logits)."""
    x = np.asarray(scores, np.float64).ravel()
    if x.size and x.min() >= 0 and abs(x.sum() - 1.0) <= 1e-3:
        return x
    x = np.exp(x - x.max())
    return x / x.sum()


def kl_divergence(reference: np.ndarray, candidate: np.ndarray, eps: float = 1e-12) -> float:
    """KL(reference || candidate) of two class-score vectors, in nats: how far the candidate's
    whole distribution moved, where top-1 agreement only sees the argmax."""
    p, q = as_probabilities(reference), as_probabilities(candidate)
    return float(np.sum(p * (np.log(p + eps) - np.log(q + eps))))


def psnr(image: np.ndarray, target: np.ndarray, peak: float = 1.0) -> float:
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(target, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x1, y1, x2, y2) box against many."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> List[int]:
    """Greedy class-agnostic hard NMS (what MODELS.md's counts were measured with)."""
    order = np.argsort(-scores, kind="stable")
    keep: List[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        order = rest[box_iou(boxes[best], boxes[rest]) <= threshold] if rest.size else rest
    return keep


Detections = Tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes [K, 4], scores [K], classes [K]


def ultraface_detections(outputs: Sequence[np.ndarray]) -> Detections:
    scores, boxes = outputs[0][0, :, 1], outputs[1][0]
    keep = scores > ULTRAFACE_SCORE
    boxes, scores = boxes[keep], scores[keep]
    chosen = nms(boxes, scores, ULTRAFACE_NMS)
    return boxes[chosen], scores[chosen], np.zeros(len(chosen), np.int64)


def fastestdet_detections(outputs: Sequence[np.ndarray]) -> Detections:
    rows = outputs[0][0]
    classes = rows[:, 5:].argmax(axis=1)
    scores = rows[:, 4] ** 0.6 * rows[:, 5:].max(axis=1) ** 0.4
    keep = scores > FASTESTDET_SCORE
    cx, cy, w, h = (rows[keep, i] for i in range(4))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    scores, classes = scores[keep], classes[keep]
    chosen = nms(boxes, scores, FASTESTDET_NMS)
    return boxes[chosen], scores[chosen], classes[chosen]


def match_counts(candidate: Detections, reference: Detections, iou: float = MATCH_IOU) -> Tuple[int, int, int]:
    """(true positives, false positives, false negatives) of candidate detections against the
    reference's, greedy by candidate score, one match per reference box, same class only."""
    boxes, scores, classes = candidate
    ref_boxes, _, ref_classes = reference
    used = np.zeros(len(ref_boxes), bool)
    tp = 0
    for index in np.argsort(-scores, kind="stable"):
        if not len(ref_boxes):
            break
        overlap = box_iou(boxes[index], ref_boxes)
        overlap[used | (ref_classes != classes[index])] = -1
        best = int(overlap.argmax())
        if overlap[best] >= iou:
            used[best] = True
            tp += 1
    return tp, len(boxes) - tp, len(ref_boxes) - tp


def f1(tp: int, fp: int, fn: int) -> float:
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


# --------------------------------------------------------------------------------------------
# Per task
# --------------------------------------------------------------------------------------------


class _Runner:
    """The candidate session and, optionally, the reference's on the same inputs."""

    def __init__(self, model_path, reference, threads: Optional[int]):
        self.session = runtime.make_session(str(model_path), threads=threads)
        self.reference = runtime.make_session(str(reference), threads=threads) if reference else None

    def __call__(self, feed) -> Tuple[List[np.ndarray], Optional[List[np.ndarray]]]:
        outputs = runtime.run(self.session, feed)
        ref = runtime.run(self.reference, feed) if self.reference is not None else None
        return outputs, ref


def _classification(entry, run: _Runner, limit) -> Dict[str, Any]:
    n = correct1 = correct5 = agree = 0
    cosines: List[float] = []
    divergences: List[float] = []
    hits: List[str] = []
    classes = None
    for feed, label in entry.labelled(limit):
        outputs, ref = run(feed)
        scores = outputs[0].reshape(-1)
        classes = scores.size
        ranked = np.argsort(-scores, kind="stable")
        hits.append("1" if ranked[0] == label else "0")
        correct1 += int(ranked[0] == label)
        correct5 += int(label in ranked[:5])
        n += 1
        if ref is not None:
            agree += int(ref[0].reshape(-1).argmax() == ranked[0])
            cosines.append(mean_cosine(outputs, ref))
            divergences.append(kl_divergence(ref[0], scores))
    metrics: Dict[str, Any] = {"top1": correct1 / n if n else None, "correct": correct1}
    summary = f"top-1 {benchlib.percent(metrics['top1'])} ({correct1}/{n})"
    if classes and classes >= TOP5_MIN_CLASSES:
        metrics["top5"] = correct5 / n
        summary += f", top-5 {benchlib.percent(metrics['top5'])}"
    result = {"samples": n, "metrics": metrics, "summary": summary,
              "primary": {"name": "top-1", "value": metrics["top1"], "text": benchlib.percent(metrics["top1"])},
              "top1_hits": "".join(hits)}  # per sample, in order: for paired comparisons of two models
    if run.reference is not None:
        result["agreement"] = {"top1_agreement": agree / n if n else None, "cosine_mean": float(np.mean(cosines)),
                               "kl_mean": float(np.mean(divergences))}
        result["agreement_primary"] = {
            "name": "top-1 agreement", "value": agree / n if n else None, "text": benchlib.percent(agree / n if n else None)
        }
    return result


def _ppocr_det(entry, run: _Runner, limit) -> Dict[str, Any]:
    n, prob_sum, above = 0, 0.0, 0.0
    intersection = union = 0
    cosines: List[float] = []
    for feed in entry.inputs(limit):
        outputs, ref = run(feed)
        probability = outputs[0]
        prob_sum += float(probability.mean())
        above += float((probability > zoo.PPOCR_DET_THRESHOLD).mean())
        n += 1
        if ref is not None:
            mask, ref_mask = probability > zoo.PPOCR_DET_THRESHOLD, ref[0] > zoo.PPOCR_DET_THRESHOLD
            intersection += int(np.count_nonzero(mask & ref_mask))
            union += int(np.count_nonzero(mask | ref_mask))
            cosines.append(mean_cosine(outputs, ref))
    metrics: Dict[str, Any] = {"mean_probability": prob_sum / n, "text_fraction": above / n}
    summary = f"mean prob {metrics['mean_probability']:.3f}, {benchlib.percent(metrics['text_fraction'], 1)} > 0.3"
    native = _ppocr_det_native(run.session)
    if native is not None:
        metrics["sample_native"] = native
        summary += (
            f"; sample.jpg @{native['height']}x{native['width']}: mean prob {native['mean_probability']:.3f}, "
            f"{benchlib.percent(native['text_fraction'], 1)} > 0.3, {native['regions']} regions"
        )
    result = {"samples": n, "metrics": metrics, "summary": summary,
              "primary": {"name": "text px > 0.3", "value": metrics["text_fraction"],
                          "text": benchlib.percent(metrics["text_fraction"], 2)}}
    if run.reference is not None:
        iou = intersection / union if union else 1.0
        result["agreement"] = {"iou_at_0.3": iou, "cosine_mean": float(np.mean(cosines))}
        result["agreement_primary"] = {"name": "map IoU@0.3", "value": iou, "text": f"IoU {iou:.4f}"}
    return result


def _ppocr_det_native(session) -> Optional[Dict[str, Any]]:
    """MODELS.md's sanity numbers need sample.jpg at 544x800; only a dynamic-shape model takes it."""
    dims = session.get_inputs()[0].shape
    if all(isinstance(d, int) for d in dims[2:]):
        return None
    root = zoo.shared_models_dir()
    feed = zoo.ppocr_det_preprocess_native(zoo.open_rgb(root / "ocr" / "images" / "sample.jpg"))
    probability = runtime.run(session, {session.get_inputs()[0].name: feed})[0][0, 0]
    return {
        "height": feed.shape[2],
        "width": feed.shape[3],
        "mean_probability": float(probability.mean()),
        "text_fraction": float((probability > zoo.PPOCR_DET_THRESHOLD).mean()),
        "regions": len(zoo.text_regions(probability)),
    }


def _detection(entry, run: _Runner, limit) -> Dict[str, Any]:
    decode = ultraface_detections if entry.key == "ultraface" else fastestdet_detections
    per_image: List[int] = []
    tp = fp = fn = 0
    cosines: List[float] = []
    for feed in entry.inputs(limit):
        outputs, ref = run(feed)
        found = decode(outputs)
        per_image.append(len(found[0]))
        if ref is not None:
            counts = match_counts(found, decode(ref))
            tp, fp, fn = tp + counts[0], fp + counts[1], fn + counts[2]
            cosines.append(mean_cosine(outputs, ref))
    n = len(per_image)
    what = "faces" if entry.key == "ultraface" else "detections"
    metrics = {"per_image": per_image, "total": int(sum(per_image)), "mean_per_image": sum(per_image) / n}
    summary = f"{metrics['total']} {what} on {n} images ({metrics['mean_per_image']:.2f}/image)"
    result = {"samples": n, "metrics": metrics, "summary": summary,
              "primary": {"name": f"{what}/image", "value": metrics["mean_per_image"],
                          "text": f"{metrics['mean_per_image']:.2f}/img"}}
    if run.reference is not None:
        score = f1(tp, fp, fn)
        result["agreement"] = {"f1": score, "tp": tp, "fp": fp, "fn": fn, "cosine_mean": float(np.mean(cosines))}
        result["agreement_primary"] = {"name": "box F1@0.5", "value": score, "text": f"F1 {score:.4f}"}
    return result


def _superres(entry, run: _Runner, limit) -> Dict[str, Any]:
    from PIL import Image

    model_db: List[float] = []
    bicubic_db: List[float] = []
    versus_ref: List[float] = []
    cosines: List[float] = []
    size = zoo.SUPERRES_SCALE * zoo.SUPERRES_SIZE
    for path in zoo.superres_psnr_files(limit):
        image = zoo.open_rgb(path)
        target = np.asarray(zoo.superres_crop(image).convert("YCbCr").getchannel("Y"), np.float32) / 255.0
        feed = {entry.input_name: zoo.superres_preprocess(image)}
        outputs, ref = run(feed)
        model_db.append(psnr(np.clip(outputs[0][0, 0], 0, 1), target))
        low = Image.fromarray(np.round(feed[entry.input_name][0, 0] * 255).astype(np.uint8))
        bicubic = np.asarray(low.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
        bicubic_db.append(psnr(bicubic, target))
        if ref is not None:
            versus_ref.append(psnr(outputs[0], ref[0]))
            cosines.append(mean_cosine(outputs, ref))
    n = len(model_db)
    metrics = {"psnr_db": float(np.mean(model_db)), "bicubic_psnr_db": float(np.mean(bicubic_db))}
    summary = f"PSNR {metrics['psnr_db']:.2f} dB (bicubic {metrics['bicubic_psnr_db']:.2f} dB) on {n} crops"
    result = {"samples": n, "metrics": metrics, "summary": summary,
              "primary": {"name": "PSNR", "value": metrics["psnr_db"], "text": f"{metrics['psnr_db']:.2f} dB"}}
    if run.reference is not None:
        worst = min(versus_ref)
        result["agreement"] = {"psnr_vs_reference_db_min": worst, "cosine_mean": float(np.mean(cosines))}
        text = "identical" if math.isinf(worst) else f"{worst:.1f} dB"
        result["agreement_primary"] = {"name": "PSNR vs reference (min)", "value": worst, "text": f"PSNR {text}"}
    return result


def evaluate(model_path, entry, reference=None, limit: Optional[int] = None, *, threads: Optional[int] = None) -> Dict[str, Any]:
    """Score ``model_path`` on ``entry``'s data (a :class:`zoo.SharedModel` or its key).

    Returns a dict with ``metrics``/``summary``/``primary`` (the task metric) and, with a
    ``reference`` model, ``agreement``/``agreement_primary`` (the candidate against it).
    ``limit`` caps the number of evaluated samples (images, digits, crops).
    """
    entry = zoo.get(entry) if isinstance(entry, str) else entry
    started = time.perf_counter()
    run = _Runner(model_path, reference, threads)
    if entry.is_labelled:
        result = _classification(entry, run, limit)
    elif entry.task == "segmentation":
        result = _ppocr_det(entry, run, limit)
    elif entry.task == "detection":
        result = _detection(entry, run, limit)
    elif entry.task == "super-resolution":
        result = _superres(entry, run, limit)
    else:  # pragma: no cover - the registry has no other task
        raise ValueError(f"no evaluation for task {entry.task}")
    result.update(
        key=entry.key, model=str(model_path), reference=str(reference) if reference else None, task=entry.task,
        data=entry.data, expected=entry.expected, seconds=time.perf_counter() - started,
    )
    result.setdefault("agreement", None)
    result.setdefault("agreement_primary", None)
    return result


# --------------------------------------------------------------------------------------------
# MODELS.md check for --all
# --------------------------------------------------------------------------------------------

ULTRAFACE_COUNTS = [44, 19, 25, 5, 2, 16, 9, 111, 6, 5, 4, 10, 5, 2, 3, 9, 122, 59, 67, 5, 1, 14, 49, 8]


def matches_models_md(result: Dict[str, Any]) -> Optional[bool]:
    """Whether a full-set fp32 result reproduces MODELS.md (None when a limit made it partial)."""
    m = result["metrics"]
    key = result["key"]
    close = lambda value, expected, tol: value is not None and abs(value - expected) <= tol  # noqa: E731
    if key == "squeezenet":
        return result["samples"] == 500 and close(m["top1"], 0.598, 5e-4) and close(m["top5"], 0.824, 5e-4)
    if key == "resnet20":
        return result["samples"] == 2500 and close(m["top1"], 0.8096, 5e-5)
    if key == "mnist":
        return result["samples"] == 5000 and close(m["top1"], 0.9834, 5e-5)
    if key == "ppocr_cls":
        return result["samples"] == 12 and m["correct"] == 12
    if key == "ultraface":
        return result["samples"] == 24 and m["per_image"] == ULTRAFACE_COUNTS
    if key == "fastestdet":
        return result["samples"] == 20 and close(m["mean_per_image"], 2.75, 5e-3)
    if key == "superres":
        return result["samples"] == 10 and close(m["psnr_db"], 28.71, 5e-3) and close(m["bicubic_psnr_db"], 28.44, 5e-3)
    if key == "ppocr_det":
        native = m.get("sample_native")
        return bool(native) and close(native["mean_probability"], 0.040, 5e-4) and \
            close(native["text_fraction"], 0.040, 5e-4) and native["regions"] == 6
    return None


def evaluate_all(limit: Optional[int] = None, threads: Optional[int] = None) -> List[Dict[str, Any]]:
    results = []
    for entry in zoo.available():
        benchlib.progress(f"evaluating {entry.key} ...")
        result = evaluate(entry.model_path(), entry, limit=limit, threads=threads)
        result["matches_models_md"] = matches_models_md(result)
        results.append(result)
    return results


def all_table(results: Iterable[Dict[str, Any]]) -> str:
    rows = []
    for r in results:
        match = {True: "yes", False: "NO", None: "partial"}[r.get("matches_models_md")]
        rows.append([r["key"], r["task"], r["samples"], r["summary"], r["expected"], match])
    return benchlib.markdown_table(
        ["model", "task", "samples", "measured (fp32, onnxruntime)", "MODELS.md", "match"], rows, align="llrlll"
    )


def single_table(result: Dict[str, Any]) -> str:
    rows = [["task metric", result["summary"]]]
    if result.get("agreement"):
        primary = result["agreement_primary"]
        rows.append(["vs reference", f"{primary['name']}: {primary['text']}"])
        for name, value in result["agreement"].items():
            text = benchlib.percent(value) if name == "top1_agreement" else (
                f"{value:.6f}" if isinstance(value, float) else str(value))
            rows.append([f"  {name}", text])
    rows.append(["samples", result["samples"]])
    rows.append(["MODELS.md (fp32)", result["expected"]])
    return benchlib.markdown_table([f"{result['key']}: {Path(result['model']).name}", ""], rows, align="ll")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help="ONNX model to evaluate")
    parser.add_argument("--zoo", metavar="KEY", choices=list(zoo.ZOO),
                        help="whose data and preprocessing to use (default: inferred from a shared model path)")
    parser.add_argument("--reference", metavar="REF", help="reference model (e.g. the fp32 original) to compare with")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate at most N samples")
    parser.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads (default: all)")
    parser.add_argument("--all", action="store_true", help="evaluate every shared fp32 model against MODELS.md")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    benchlib.require_shared_models()
    if args.all:
        results = evaluate_all(args.limit, args.threads)
        print(json.dumps(results, indent=2, default=float) if args.json else all_table(results))
        return 0 if all(r["matches_models_md"] is not False for r in results) else 1
    if not args.model:
        parser.error("give MODEL (with --zoo KEY) or --all")
    entry = zoo.get(args.zoo) if args.zoo else zoo.find_by_path(args.model)
    if entry is None:
        parser.error(f"{args.model} is not a shared model; say whose data to use with --zoo ({', '.join(zoo.ZOO)})")
    if not Path(args.model).is_file():
        parser.error(f"{args.model}: no such file")
    result = evaluate(args.model, entry, reference=args.reference, limit=args.limit, threads=args.threads)
    print(json.dumps(result, indent=2, default=float) if args.json else single_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
