"""``quant``: static int8 quantization to QDQ ONNX, calibrated, placed for speed, checked.

The pipeline inside the pass, in order:

1. BN folding (the ``fold`` pass) and an opset raise to 13 when per-channel weights need it;
2. optional cross-layer equalization (``--cle``, Nagel et al. 2019);
3. placement (``onnxslim_cv.qdq.plan_quantization``): which ops run int8, which tensors carry
   int8 between them, Relu/Clip fused, Concat scales shared; with ``--quant-placement auto``
   the high-resolution, few-channel stem that onnxruntime runs faster in float (NCHWc fp32
   beats its NHWC int8 kernels there) is found by timing candidates on this machine;
4. streaming calibration of the quantized tensors (``onnxslim_cv.calib_stats``): memory does
   not grow with the number of samples; ``--calib-method auto`` (the default) then keeps the
   method whose int8 model is closest to fp32 on the calibration samples;
5. QDQ emission (int8 symmetric per-channel weights, int32 biases, uint8 or int8 activations);
   weights keep a pair-safe range (7 to 8 bits per channel) where this machine's onnxruntime
   kernels saturate 8-bit products (``runtime.int8_products_saturate``: x86 without VNNI),
   guarding only the neighbouring pairs a conv kernel forms (``runtime.int8_pairs_are_adjacent``);
6. bias correction: the mean shift int8 weights add to each layer's output, (W_q - W) E[x]
   with E[x] from the calibration pass, is subtracted from its bias (Nagel et al. 2019, sec. 4.2);
7. accuracy-aware fallback (``--max-drop``): the layers that add the most quantization noise
   are each put back to float alone and ranked by the loss left; the fewest, in that order,
   stay float until the metric holds;
8. a report per quantized tensor (scale, zero point, range, SNR) and of onnxruntime's fusion.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_cv import activations, runtime
from onnxslim_cv.errors import UserError
from onnxslim_cv.graph_utils import name_nodes, new_constant
from onnxslim_cv.ir import Model
from onnxslim_cv.pipeline import Pass, PassContext, PassOption, PassReport, positive_int, progress_bar, regex, register_pass
from onnxslim_cv.qdq import (
    ACT_TYPES,
    COMPUTE_OPS,
    QuantParams,
    QuantPlan,
    emit_qdq,
    fusion_report,
    has_constant_weight,
    is_depthwise_conv,
    is_quantized_model,
    output_layers,
    params_from_range,
    plan_quantization,
)

CALIB_METHODS = ("auto", "minmax", "percentile", "entropy", "mse")
AUTO_METHODS = ("percentile", "mse", "minmax", "entropy")  # ties go to the earlier one
METHOD_SAMPLES = 64  # calibration samples on which --calib-method auto compares the methods
METRICS = ("cosine", "snr", "top1")
DEFAULT_SAMPLES = 256
FALLBACK_SAMPLES = 64
MIN_HISTOGRAM_SAMPLES = 8
PLACEMENT_SECONDS = 1.5  # total timing budget for the candidate placements
PLACEMENT_ROUNDS = 300  # ... reached sooner by small models: 300 runs of each candidate are plenty
PLACEMENT_MARGIN = 0.02  # candidates this close to the fastest count as equally fast
PLACEMENT_DROP = 0.25
"""A candidate whose lower quartile is this much over the leader's upper quartile after 10 rounds
stops racing (SqueezeNet's float stems run 1.6-2x the all-int8 time). Only far-off candidates:
with a 2% bar, one UltraFace race dropped its fastest placement (first 2 float) early on noise and
kept one that measured 13% slower in the benchmark."""
OUTPUT_LAYER_SHARE = 0.02  # output layers stay float while together under 2% of the MACs
BIAS_SAMPLES = 64
SNR_SAMPLES = 8
SENSITIVITY_CANDIDATES = 24  # layers measured one by one for --max-drop (the noisiest first)


def _fraction(value) -> float:
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise ValueError("must be in [0, 1)")
    return number


def _percent(value) -> float:
    number = float(value)
    if not 50.0 < number <= 100.0:
        raise ValueError("must be a percentile in (50, 100]")
    return number


@register_pass
class QuantPass(Pass):
    name = "quant"
    summary = (
        "static int8 quantization (QDQ): per-channel int8 weights, calibrated uint8/int8 activations, "
        "placement onnxruntime fuses into int8 kernels, bias correction, optional CLE and accuracy fallback"
    )
    uses_calibration = True
    requires_calibration = True
    demo_options = {"samples": 64}
    options = (
        PassOption("act_type", "uint8", "activation type: uint8 (asymmetric; the fast U8S8 VNNI path on x86, "
                   "and what onnxruntime fuses Relu into) or int8 (symmetric, zero point 0 everywhere: for "
                   "TensorRT, which fuses conv and activation itself; onnxruntime CPU then keeps convs "
                   "followed by Relu in float)", choices=ACT_TYPES, flag="--act-type",
                   metavar="TYPE"),
        PassOption("calib_method", "auto", "activation range from calibration data: minmax, percentile "
                   "(--quant-percentile of each tail), entropy (KL, TensorRT style), mse (least quantization "
                   "error), or auto: all four from the same histograms, keeping the one whose int8 outputs are "
                   "closest to fp32 (cosine) on the calibration samples; all stream, so memory does not grow "
                   "with --quant-samples",
                   choices=CALIB_METHODS, flag="--calib-method", metavar="METHOD"),
        PassOption("percentile", 99.999, "percentile kept by --calib-method percentile (and by auto's percentile "
                   "candidate)", parse=_percent, metavar="P"),
        PassOption("samples", DEFAULT_SAMPLES, "calibration samples to use (at most)", parse=positive_int, metavar="N"),
        PassOption("per_tensor", False, "one scale per weight tensor instead of one per output channel "
                   "(per-channel is the default and almost always more accurate)", is_switch=True),
        PassOption("weight_range", "auto", "int8 weight range: full ([-127, 127] per output channel), or safe "
                   "for CPUs that add each pair of uint8 x int8 products into a saturating int16 (x86 without "
                   "VNNI: AVX2, AVX-512F): per channel the widest range in which no two same-sign weights "
                   "the kernel pairs (neighbours in its read order, where the runtime shows it pairs that way) "
                   "round to a sum past 128, so no pair can overflow (at least 7 bits, onnxruntime's "
                   "reduce_range; up to 8). auto asks this machine's onnxruntime "
                   "with a probe conv per kernel kind and takes safe only where it saturates (depthwise convs "
                   "have a kernel that does not). Give full for a VNNI, ARM or TensorRT deployment target",
                   choices=("auto", "full", "safe"), metavar="RANGE"),
        PassOption("cle", False, "cross-layer equalization before quantizing (Nagel et al. 2019): helps models "
                   "whose per-channel weight ranges differ wildly (depthwise nets)", is_switch=True, flag="--cle"),
        PassOption("bias_correction", "auto", "correct each int8 layer's mean output error on calibration data "
                   "(auto = on)", choices=("auto", "on", "off"), metavar="MODE"),
        PassOption("placement", "auto", "auto: time candidate placements on this machine and keep the fastest "
                   "(the high-resolution stem often runs faster in fp32); all: every supported op in int8",
                   choices=("auto", "all"), metavar="MODE"),
        PassOption("output_layers", "float", "the layers that compute the model's outputs (logits, box and score "
                   "heads): float keeps their precision (the cheapest, while together under 2%% of the MACs); int8 "
                   "quantizes them too",
                   choices=("float", "int8"), metavar="MODE"),
        PassOption("exclude", None, "keep nodes whose name (or output tensor name) matches this regex in float",
                   parse=regex, metavar="REGEX"),
        PassOption("max_drop", None, "accuracy target against fp32: keep the fewest layers float until the loss "
                   "is at most this (see --max-drop-metric), measured on --val data or else on calibration data",
                   parse=_fraction, flag="--max-drop", metavar="X"),
        PassOption("metric", "cosine", "loss measured by --max-drop: cosine (1 - mean cosine of the outputs), "
                   "snr (noise/signal power of the outputs, 0.01 = 20 dB) or top1 (1 - top-1 agreement)",
                   choices=METRICS, flag="--max-drop-metric", metavar="METRIC"),
    )

    def run(self, model: Model, context: PassContext) -> PassReport:
        report = PassReport(self.name, options=dict(self.config))
        config = dict(self.config)
        found = is_quantized_model(model)
        if found:
            raise UserError(f"quant: the model is already quantized ({found} present); give the float model")
        if context.calibration is None:
            raise UserError("quant needs calibration data: add --calib PATH")
        data = context.calibration.limited(config["samples"])
        started = time.perf_counter()

        from onnxslim_cv.passes.fold import fold_first

        fold_first(model, context, report, "BN in the convs, the int8 kernels' form")
        _raise_opset(model, report)
        name_nodes(model.graph)
        if config["cle"]:
            _equalize(model, report)
        float_model = model  # the float reference for correction and fallback
        act_type = config["act_type"]
        config["weight_pairs"] = _weight_pairs(config["weight_range"], act_type, model, report)

        heads = output_layers(float_model, max_share=OUTPUT_LAYER_SHARE) if config["output_layers"] == "float" else []
        base_float = dict.fromkeys(heads, "computes a model output (--quant-output-layers float)")
        plan = plan_quantization(float_model, act_type=act_type, exclude=config["exclude"], keep_float=base_float)
        if not plan.int8_nodes:
            report.notes.append("nothing to quantize: no Conv/Gemm/MatMul with constant float weights")
            return report
        method = config["calib_method"]
        timings: Dict[str, float] = {}
        mark = time.perf_counter()
        stats = _calibrate(float_model, plan, data, method, context)
        if method == "auto":
            timings["calibration"] = time.perf_counter() - mark
            mark = time.perf_counter()
            corrections = (_bias_correction(float_model, plan, stats, config, data, context)
                           if config["bias_correction"] in ("auto", "on") else {})
            method, plan, ranges, choice = _choose_method(float_model, plan, stats, config, act_type, data,
                                                          corrections, context)
            report.details["calibration_method"] = choice
            report.notes.append(_method_note(choice))
            timings["calibration_method"] = time.perf_counter() - mark
        else:
            ranges = _ranges(plan, stats, method, config, act_type)
            timings["calibration"] = time.perf_counter() - mark

        placement_note = None
        mark = time.perf_counter()
        if config["placement"] == "auto":
            stem, placement_note = _choose_float_stem(float_model, plan, ranges, act_type, config, data, base_float)
            if stem:
                keep = {**base_float, **dict.fromkeys(stem, "float stem: faster in fp32 on this CPU (--quant-placement)")}
                plan = plan_quantization(float_model, act_type=act_type, exclude=config["exclude"], keep_float=keep)
                missing = [t for t in plan.quantized if t not in ranges and plan.root(t) not in ranges]
                if missing:
                    stats = _calibrate(float_model, plan, data, method, context)
                    ranges = _ranges(plan, stats, method, config, act_type)
        if placement_note:
            report.notes.append(placement_note)
        timings["placement"] = time.perf_counter() - mark
        mark = time.perf_counter()

        params = _params(plan, ranges, act_type)
        corrections: Dict[str, np.ndarray] = {}
        bias_mode = config["bias_correction"]
        if bias_mode in ("auto", "on"):
            corrections = _bias_correction(float_model, plan, stats, config, data, context)
        quantized, weights = _emit(float_model, plan, params, config, corrections)
        timings["bias_correction_and_emit"] = time.perf_counter() - mark
        mark = time.perf_counter()

        if config["max_drop"] is not None:
            evaluation = context.validation if context.validation is not None else data
            quantized, plan, params, weights = _fallback(
                float_model, quantized, plan, params, weights, ranges, corrections, config,
                evaluation.limited(FALLBACK_SAMPLES), context, report,
            )

        timings["fallback"] = time.perf_counter() - mark
        mark = time.perf_counter()
        fusion = fusion_report(quantized.to_proto(), plan)
        snr = _tensor_snr(float_model, quantized, plan, data.limited(SNR_SAMPLES))
        _fill_report(report, plan, params, weights, fusion, snr, corrections)
        timings["report"] = time.perf_counter() - mark
        report.details["seconds"] = round(time.perf_counter() - started, 3)
        report.details["timings"] = {k: round(v, 3) for k, v in timings.items()}
        model.graph = quantized.graph
        model.annotations = quantized.annotations
        return report


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _raise_opset(model: Model, report: PassReport) -> None:
    """Per-channel DequantizeLinear (``axis``) needs opset 13; convert older exports first."""
    if model.opset >= 13:
        return
    before = model.opset
    proto = onnx.version_converter.convert_version(model.to_proto(), 13)
    converted = Model.from_proto(proto, source=model.source, copy=False)
    model.graph = converted.graph
    model.infer_shapes(reset=True)
    report.notes.append(f"opset {before} -> 13 (per-channel DequantizeLinear needs 13)")


def _weight_pairs(option: str, act_type: str, model: Model, report: PassReport) -> Dict[str, str]:
    """The weighted layers whose onnxruntime kernel on this CPU would overflow on full-range
    weights, each with the pairing its pair-safe range guards (``qdq.quantize_weight``).

    Depthwise convs run a kernel that widens to 16 bits before multiplying, so they keep the
    full range even where the dense kernels saturate (``runtime.int8_products_saturate``).
    Convs guard only the neighbouring pairs their kernel forms when the runtime shows that it
    pairs that way, which it can only show where it saturates; anything else guards every pair."""
    layers = [n for n in model.graph.nodes if has_constant_weight(n)]
    if option == "full":
        chosen: List[gs.Node] = []
    elif option == "safe":
        chosen = [n for n in layers if not is_depthwise_conv(n)]
    else:
        chosen = [n for n in layers if runtime.int8_products_saturate(act_type, is_depthwise_conv(n))]
    adjacent = bool(chosen) and runtime.int8_products_saturate(act_type) and runtime.int8_pairs_are_adjacent(act_type)
    pairs = {n.name: "adjacent" if adjacent and n.op == "Conv" else "any" for n in chosen}
    if pairs and option == "auto":
        report.notes.append(
            f"pair-safe weight ranges on {len(pairs)} of {len(layers)} layers: this CPU's onnxruntime int8 kernels "
            "add pairs of products into a saturating int16 (x86 without VNNI), which full-range weights overflow"
            + ("; convs guard only the neighbouring pairs their kernel forms" if adjacent else "")
            + "; give --quant-weight-range full for a VNNI, ARM or TensorRT target")
    report.details["weight_range"] = {"pair-safe": len(pairs), "full": len(layers) - len(pairs),
                                      "conv_pairs": "adjacent" if adjacent else "any"}
    return pairs


def _equalize(model: Model, report: PassReport) -> None:
    from onnxslim_cv.equalize import equalize_cross_layer

    result = equalize_cross_layer(model)
    report.count("equalized_pairs", len(result.pairs))
    report.details["cle"] = {
        "pairs": [vars(p) for p in result.pairs],
        "skipped": dict(result.skipped),
    }
    report.notes.append(f"cross-layer equalization: {len(result.pairs)} layer pairs")


def _calibrate(model, plan: QuantPlan, data, method, context):
    from onnxslim_cv import calib_stats

    derived = _derived_tensors(plan)
    names = [t for t in plan.quantized if t not in plan.fixed_ranges and t not in derived]
    count = data.count()
    histogram_method = "percentile" if method == "auto" else method  # auto: the histogram serves every method
    if calib_stats.needs_histogram(histogram_method) and count is not None and count < MIN_HISTOGRAM_SAMPLES:
        raise UserError(
            f"quant: --calib-method {method} needs at least {MIN_HISTOGRAM_SAMPLES} calibration samples to estimate "
            f"a distribution, got {count}; give more samples or use --calib-method minmax"
        )
    # The inputs' channel means for bias correction come from the same pass over the data.
    axes = {node.inputs[0].name: 1 for node in _corrected_layers(model, plan)}
    with progress_bar(context, total=None, desc=f"quant: calibrate ({method})", unit="batch") as bar:
        stats = calib_stats.collect_stats(model, names, data, method=histogram_method, progress=bar, channel_axes=axes,
                                          keep_outputs=METHOD_SAMPLES if method == "auto" else 0)
    if stats.samples == 0:
        raise UserError("quant: the calibration data is empty")
    return stats


def _derived_tensors(plan: QuantPlan) -> Dict[str, List[str]]:
    """Quantized tensors whose range follows from others, so calibration need not tap them.

    A pass-through output (MaxPool, Reshape, Transpose, Split, ...) shares its input's scale
    anyway; a Concat output is the union of its inputs. Fewer tapped tensors make the
    calibration pass proportionally faster on shuffle-heavy graphs.
    """
    quantized = set(plan.quantized)
    derived: Dict[str, List[str]] = {}
    for tensor, source in plan.ties.items():
        if tensor in quantized and source in quantized:
            derived[tensor] = [source]
    for output, inputs in plan.concats.items():
        if output in quantized and inputs and all(t in quantized for t in inputs):
            derived.setdefault(output, list(inputs))
    # never derive a tensor from itself through a cycle of ties/concats
    for tensor in list(derived):
        seen, stack = set(), list(derived[tensor])
        while stack:
            t = stack.pop()
            if t == tensor:
                del derived[tensor]
                break
            if t not in seen:
                seen.add(t)
                stack.extend(derived.get(t, []))
    return derived


def _ranges(plan: QuantPlan, stats, method: str, config, act_type: str) -> Dict[str, Tuple[float, float]]:
    """One range per tie class: the union of its members' calibrated ranges.

    A tensor too small for the method's statistics (a pooled vector: one value per channel and
    sample) takes its min/max instead: clipping the tail of a few hundred values is noise.
    """
    from onnxslim_cv import calib_stats

    kwargs = {"symmetric": act_type == "int8"}
    if method == "percentile":
        kwargs["percentile"] = config["percentile"]
    enough = calib_stats.min_values(method, config["percentile"])
    own: Dict[str, Tuple[float, float]] = {}
    derived = _derived_tensors(plan)
    for name in plan.quantized:
        if name in plan.fixed_ranges:
            own[name] = plan.fixed_ranges[name]
        elif name in derived:
            continue
        elif stats.tensors[name].count < enough:
            own[name] = stats.tensors[name].range("minmax", symmetric=kwargs["symmetric"])
        else:
            own[name] = stats.tensors[name].range(method, **kwargs)
    pending = [name for name in plan.quantized if name not in own]
    while pending:
        ready = [n for n in pending if all(t in own for t in derived[n])]
        if not ready:  # pragma: no cover - _derived_tensors removes cycles
            raise RuntimeError(f"quant: cannot derive ranges of {pending[:3]}")
        for name in ready:
            own[name] = (min(own[t][0] for t in derived[name]), max(own[t][1] for t in derived[name]))
        pending = [n for n in pending if n not in own]
    plan.tie_concats(own)
    ranges: Dict[str, Tuple[float, float]] = {}
    for root, members in plan.classes().items():
        lo = min(own[m][0] for m in members)
        hi = max(own[m][1] for m in members)
        for name in members:
            ranges[name] = (float(lo), float(hi))
    return ranges


def _choose_method(float_model, plan: QuantPlan, stats, config, act_type: str, data, corrections, context):
    """The calibration method whose int8 model is closest to fp32 on the calibration samples.

    Which tail clipping is right depends on the network: percentile suits classifiers whose
    activations have rare outliers, while a text-probability map (PP-OCR det) loses its
    faint text to it and wants mse or min/max. The histograms are already there, so every
    method's ranges cost little; each distinct set is emitted as the pass would emit it (with
    the bias ``corrections``, which do not depend on the ranges) and run on ``METHOD_SAMPLES``
    calibration samples.
    Returns (method, its plan with Concat ties for its ranges, ranges, report details).
    """
    import copy

    from onnxslim_cv.sensitivity import ReferenceOutputs

    sample = data.limited(METHOD_SAMPLES)
    kept = getattr(stats, "reference", None)
    if kept:  # the float outputs of these samples, kept by the calibration pass
        grow = any(activations.feed_batch(feed) > 1 for feed, _ in kept)
        reference = ReferenceOutputs.from_pairs(kept, [t.name for t in float_model.graph.outputs], grow=grow)
    else:
        reference = ReferenceOutputs(float_model, sample)
    candidates: Dict[str, Tuple[QuantPlan, Dict[str, Tuple[float, float]]]] = {}
    losses: Dict[str, float] = {}
    same_as: Dict[str, str] = {}
    with progress_bar(context, total=len(AUTO_METHODS), desc="quant: compare calibration methods",
                      unit="method") as bar:
        for method in AUTO_METHODS:
            own_plan = copy.deepcopy(plan)
            ranges = _ranges(own_plan, stats, method, config, act_type)
            twin = next((m for m, (p, r) in candidates.items() if r == ranges and p.ties == own_plan.ties), None)
            if twin is not None:
                same_as[method] = twin
            else:
                candidates[method] = (own_plan, ranges)
                model, _ = _emit(float_model, own_plan, _params(own_plan, ranges, act_type), config, corrections)
                losses[method] = reference.loss(model)["cosine"]
            bar.update(1)
    chosen = min(losses, key=lambda m: (losses[m], AUTO_METHODS.index(m)))
    own_plan, ranges = candidates[chosen]
    details = {"chosen": chosen, "metric": "cosine", "samples": sample.count(),
               "losses": {m: losses.get(same_as.get(m, m)) for m in AUTO_METHODS}, "same_ranges": same_as}
    return chosen, own_plan, ranges, details


def _method_note(choice) -> str:
    losses = ", ".join(f"{m} {v:.3g}" for m, v in choice["losses"].items() if v is not None)
    on = f"{choice['samples']} calibration samples" if choice["samples"] else "the calibration samples"
    return f"calibration method: auto chose {choice['chosen']} (1 - cosine of the outputs against fp32 on {on}: {losses})"


def _params(plan: QuantPlan, ranges, act_type: str) -> Dict[str, QuantParams]:
    params = {}
    for root, members in plan.classes().items():
        lo, hi = ranges[members[0]]
        p = params_from_range(lo, hi, act_type)
        for name in members:
            params[name] = p
    return params


def _with_biases(float_model: Model, corrections: Dict[str, np.ndarray]) -> Model:
    """A copy of the float model with ``corrections`` added to the named layers' biases."""
    model = float_model.copy()
    if not corrections:
        return model
    nodes = {n.name: n for n in model.graph.nodes}
    for name, delta in corrections.items():
        node = nodes[name]
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            bias = node.inputs[2]
            # a new name per layer: exporters (tf2onnx) share one bias tensor between layers
            corrected = (bias.values + delta).astype(np.float32)
            node.inputs[2] = new_constant(model.graph, bias.name + "_corrected", corrected)
        else:
            while len(node.inputs) < 2:
                node.inputs.append(gs.Variable.empty())
            node.inputs.append(new_constant(model.graph, f"{node.name}_bias_corrected", delta.astype(np.float32)))
    return model


def _emit(float_model: Model, plan: QuantPlan, params, config, corrections):
    model = _with_biases(float_model, corrections)
    weights = emit_qdq(model, plan, params, per_channel=not config["per_tensor"], weight_pairs=config["weight_pairs"])
    return model, weights


def _corrected_layers(model: Model, plan: QuantPlan) -> List[gs.Node]:
    int8 = set(plan.int8_nodes)
    return [n for n in model.graph.nodes
            if n.name in int8 and n.op in ("Conv", "Gemm") and isinstance(n.inputs[1], gs.Constant)]


def _bias_correction(float_model, plan, stats, config, data, context) -> Dict[str, np.ndarray]:
    """Per output channel, the mean shift that int8 weights add, removed through the bias.

    Nagel et al. 2019 (sec. 4.2): with W~ = dequantized int8 weights, E[y~ - y] = (W~ - W) E[x],
    so subtracting it makes each layer's output unbiased. E[x] per input channel is measured on
    the float model's calibration activations (the paper derives it from BN statistics, which
    folded exports no longer have). Local to each layer, so corrections do not compound the
    way correcting against the fully quantized network's drift does.
    """
    from onnxslim_cv.qdq import quantize_weight, weight_axis

    layers = _corrected_layers(float_model, plan)
    moments = dict(getattr(stats, "moments", {}) or {})
    axes = {n.inputs[0].name: 1 for n in layers if n.inputs[0].name not in moments}
    if axes:  # layers the calibration pass did not see (placement changed the plan)
        with progress_bar(context, total=None, desc="quant: input means", unit="batch") as bar:
            moments.update(activations.channel_moments(float_model, axes, data.limited(BIAS_SAMPLES), progress=bar))
    corrections = {}
    for node in layers:
        weight = node.inputs[1].values.astype(np.float32)
        axis = weight_axis(node, not config["per_tensor"])
        q, scale = quantize_weight(weight, axis, config["weight_pairs"].get(node.name))
        if axis is None:
            dequant = q.astype(np.float32) * scale
        else:
            shape = [1] * weight.ndim
            shape[axis] = -1
            dequant = q.astype(np.float32) * scale.reshape(shape)
        delta = (dequant - weight).astype(np.float64)
        mean = moments[node.inputs[0].name].mean
        if node.op == "Conv":
            groups = int(node.attrs.get("group", 1))
            out_channels, per_group = delta.shape[0], delta.shape[1]
            if mean.shape[0] != per_group * groups:
                continue
            summed = delta.reshape(out_channels, per_group, -1).sum(axis=2)  # [Cout, Cin/g]
            means = mean.reshape(groups, per_group)[np.arange(out_channels) // (out_channels // groups)]
            shift = np.sum(summed * means, axis=1)
        else:
            transposed = bool(node.attrs.get("transB", 0))
            if mean.shape[0] != (delta.shape[1] if transposed else delta.shape[0]):
                continue
            shift = (delta @ mean if transposed else mean @ delta) * float(node.attrs.get("alpha", 1.0))
        if np.all(np.isfinite(shift)):
            corrections[node.name] = (-shift).astype(np.float32)
    return corrections


# --------------------------------------------------------------------------------------------
# Placement by measurement
# --------------------------------------------------------------------------------------------


def _spatial(tensor) -> Optional[int]:
    shape = tensor.shape
    if not shape or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        return None
    return int(shape[2] * shape[3])


def _stem_candidates(model: Model, plan: QuantPlan) -> List[List[str]]:
    """Growing prefixes of compute nodes (in graph order) at the highest resolutions.

    onnxruntime's int8 kernels lose to its fp32 NCHWc kernels on large images with few
    channels (depthwise most of all), which is where CV models spend their first layers.
    """
    int8 = set(plan.int8_nodes)
    computes = [n for n in model.graph.nodes if n.name in int8 and n.op in COMPUTE_OPS]
    sizes = sorted({s for n in computes if (s := _spatial(n.outputs[0])) is not None}, reverse=True)
    candidates: List[List[str]] = []
    if computes and _small_input(computes[0]):
        candidates.append([computes[0].name])
    for level in sizes[:3]:
        at_level = [i for i, n in enumerate(computes) if (_spatial(n.outputs[0]) or 0) >= level]
        if not at_level:
            continue
        # up to the last compute node at resolution >= level, and up to the last depthwise
        # one there (the pointwise convs after it are where int8 pays)
        ends = [max(at_level)]
        depthwise = [i for i in at_level if is_depthwise_conv(computes[i])]
        if depthwise and max(depthwise) != max(at_level):
            ends.append(max(depthwise))
        for last in ends:
            prefix = [n.name for n in computes[: last + 1]]
            if len(prefix) < len(computes) and prefix not in candidates:
                candidates.append(prefix)
    return candidates


def _small_input(node) -> bool:
    shape = node.inputs[0].shape
    return bool(shape) and len(shape) == 4 and isinstance(shape[1], int) and shape[1] <= 4


def _choose_float_stem(float_model, plan, ranges, act_type, config, data, base_float) -> Tuple[List[str], Optional[str]]:
    """Time the all-int8 model against a few float-stem candidates on one real input."""
    from onnxslim_cv.bench import race

    candidates = _stem_candidates(float_model, plan)
    if not candidates:
        return [], None
    variants = {"all int8": []}
    for prefix in candidates:
        variants[f"first {len(prefix)} compute ops float"] = prefix
    protos = []
    for keep in variants.values():
        p = plan_quantization(float_model, act_type=act_type, exclude=config["exclude"],
                              keep_float={**base_float, **dict.fromkeys(keep, "stem")})
        # Timing does not depend on the exact ranges: tensors not calibrated get a neutral one.
        params = _params(p, {t: ranges.get(t, (0.0, 1.0)) for t in p.quantized}, act_type)
        model, _ = _emit(float_model, p, params, config, {})
        protos.append(model.to_proto())
    try:
        feed = next(iter(data.batches(1)))
        times = dict(zip(variants, race(protos, feed, seconds=PLACEMENT_SECONDS, max_rounds=PLACEMENT_ROUNDS,
                                                eliminate=PLACEMENT_DROP)))
    except Exception as exc:  # timing is an optimisation: never fail the pass on it
        return [], f"placement: timing failed ({type(exc).__name__}), every supported op int8"
    best = _pick_placement(times, variants)
    summary = ", ".join(f"{k} {v:.2f} ms" for k, v in times.items())
    return variants[best], f"placement: {best} (measured, 1 thread: {summary})"


def _pick_placement(times: Dict[str, float], variants: Dict[str, List[str]]) -> str:
    """Among the candidates within ``PLACEMENT_MARGIN`` of the fastest, the one keeping the most
    layers float: equally fast within the timing noise, and a float layer adds no quantization
    noise. (Breaking near-ties towards int8 instead let ResNet-20's placement, and with it its
    top-1, flip between runs: all int8 0.34 ms against first conv float 0.33 ms.)"""
    fastest = min(times.values())
    tied = [name for name, ms in times.items() if ms <= fastest * (1.0 + PLACEMENT_MARGIN)]
    return max(tied, key=lambda name: (len(variants[name]), -times[name]))


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


def _outputs(model: Model, data) -> List[List[np.ndarray]]:
    session = activations.tap_session(model, [])
    names = [o.name for o in session.get_outputs()]
    results = []
    for values in activations.iterate(session, data, names):
        results.append([values[n] for n in names])
    return results


def output_loss(reference: List[List[np.ndarray]], candidate: List[List[np.ndarray]], metric: str) -> float:
    """Loss of ``candidate`` against ``reference`` outputs (batches x outputs), 0 = identical."""
    if metric == "top1":
        agree = total = 0
        for ref, cand in zip(reference, candidate):
            a, b = ref[0], cand[0]
            a = a.reshape(a.shape[0], -1) if a.ndim > 2 else a
            b = b.reshape(b.shape[0], -1) if b.ndim > 2 else b
            agree += int(np.sum(np.argmax(a, axis=1) == np.argmax(b, axis=1)))
            total += a.shape[0]
        return 1.0 - agree / max(total, 1)
    if metric == "snr":
        noise = signal = 0.0
        for ref, cand in zip(reference, candidate):
            for a, b in zip(ref, cand):
                a = a.astype(np.float64)
                noise += float(np.sum((a - b) ** 2))
                signal += float(np.sum(a ** 2))
        return noise / max(signal, 1e-30)
    from onnxslim_cv.verify import _cosine

    # verify's cosine: an output that quantization zeroed where fp32's is not counts as lost
    # (cosine 0), not as a perfect match; two all-zero outputs agree.
    cosines = []
    for ref, cand in zip(reference, candidate):
        for a, b in zip(ref, cand):
            a = a.reshape(a.shape[0], -1).astype(np.float64)
            b = b.reshape(b.shape[0], -1).astype(np.float64)
            cosines.extend(_cosine(x, y) for x, y in zip(a, b))
    return 1.0 - float(np.mean(cosines)) if cosines else 0.0


def _noise_ratios(float_model, quantized, tensors: List[str], data) -> Dict[str, float]:
    """Noise / signal power of each tensor in the int8 model against the float model.

    Where a tensor is quantized, the int8 model's value is its dequantized one (what the
    rest of the graph reads); elsewhere the tensor of the same name.
    """
    dequantized = quantized.annotations["dequantized"]
    names_q = {t: dequantized.get(t, t) for t in tensors}
    ref_session = activations.tap_session(float_model, tensors)
    q_session = activations.tap_session(quantized, [names_q[t] for t in tensors])
    noise = dict.fromkeys(tensors, 0.0)
    signal = dict.fromkeys(tensors, 0.0)
    batch = activations.batch_size_for(float_model, tensors, budget=activations.TAP_BUDGET_BYTES // 2)
    for ref, cand in zip(activations.iterate(ref_session, data, tensors, batch_size=batch),
                         activations.iterate(q_session, data, [names_q[t] for t in tensors], batch_size=batch)):
        for t in tensors:
            a = ref[t].astype(np.float64)
            noise[t] += float(np.sum((a - cand[names_q[t]]) ** 2))
            signal[t] += float(np.sum(a ** 2))
    return {t: noise[t] / max(signal[t], 1e-30) for t in tensors}


def _layer_noise(float_model, quantized, plan, data) -> Dict[str, float]:
    """Noise each int8 compute node adds: output noise/signal minus its input's (ranking key)."""
    int8 = set(plan.int8_nodes)
    pairs = {}
    for node in float_model.graph.nodes:
        if node.name in int8 and node.op in COMPUTE_OPS:
            pairs[node.name] = (node.inputs[0].name, node.outputs[0].name)
    ratio = _noise_ratios(float_model, quantized, sorted({t for pair in pairs.values() for t in pair}), data)
    return {name: ratio[out] - ratio[inp] for name, (inp, out) in pairs.items()}


def _fallback(float_model, quantized, plan, params, weights, ranges, corrections, config, data, context, report):
    metric, target = config["metric"], config["max_drop"]
    reference = _outputs(float_model, data)
    loss = output_loss(reference, _outputs(quantized, data), metric)
    report.details["fallback"] = {"metric": metric, "target": target, "loss_all_int8": loss}
    if loss <= target:
        report.notes.append(f"accuracy target met with every layer int8 ({metric} loss {loss:.4g} <= {target})")
        return quantized, plan, params, weights
    act_type = config["act_type"]

    def build_keeping(names):
        keep = {**plan.keep, **dict.fromkeys(names, "accuracy fallback (--max-drop)")}
        p = plan_quantization(float_model, act_type=act_type, exclude=config["exclude"], keep_float=keep)
        prm = _params(p, {t: ranges.get(t, ranges.get(p.root(t), (0.0, 1.0))) for t in p.quantized}, act_type)
        kept_corrections = {n: d for n, d in corrections.items() if n not in keep}
        model, weights = _emit(float_model, p, prm, config, kept_corrections)
        return model, p, prm, weights, output_loss(reference, _outputs(model, data), metric)

    # Sensitivity: the noisiest layers (by the noise each adds to its own output) are ranked
    # again by the loss left when each alone goes back to float, measured end to end.
    noise = sorted(_layer_noise(float_model, quantized, plan, data).items(), key=lambda kv: -kv[1])
    proxy = [name for name, _ in noise]
    shortlist = proxy[:SENSITIVITY_CANDIDATES]
    with progress_bar(context, total=len(shortlist), desc="quant: layer sensitivity", unit="layer") as bar:
        alone = {}
        for name in shortlist:
            alone[name] = build_keeping([name])[4]
            bar.update(1)
    order = sorted(shortlist, key=lambda n: alone[n]) + proxy[len(shortlist):]
    report.details["fallback"]["sensitivity"] = {n: alone[n] for n in order if n in alone}

    def build(k: int):
        return build_keeping(order[:k])

    # Exponential then binary search over how many of the noisiest layers stay float.
    tried = {}
    low, high = 0, None
    k = 1
    with progress_bar(context, total=None, desc="quant: fallback search", unit="try") as bar:
        while k <= len(order):
            tried[k] = build(k)
            bar.update(1)
            if tried[k][4] <= target:
                high = k
                break
            low = k
            k *= 2
        if high is None:
            tried[len(order)] = build(len(order))
            if tried[len(order)][4] > target:
                report.warn(f"quant: --max-drop {target} not reachable even with every compute layer float "
                            f"({metric} loss {tried[len(order)][4]:.4g}); keeping every layer int8")
                return quantized, plan, params, weights
            high = len(order)
        while high - low > 1:
            mid = (low + high) // 2
            tried[mid] = build(mid)
            bar.update(1)
            if tried[mid][4] <= target:
                high = mid
            else:
                low = mid
    model, p, prm, kept_weights, final = tried[high]
    kept = order[:high]
    report.details["fallback"].update(loss=final, kept_float=kept, tries=len(tried))
    report.notes.append(
        f"accuracy fallback: {len(kept)} layer(s) kept float ({', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}); "
        f"{metric} loss {loss:.4g} -> {final:.4g} (target {target})"
    )
    return model, p, prm, kept_weights


def _tensor_snr(float_model, quantized, plan, data) -> Dict[str, float]:
    """SNR (dB) of every quantized activation in the int8 model against the float model."""
    ratio = _noise_ratios(float_model, quantized, list(plan.quantized), data)
    return {t: float(-10 * np.log10(max(r, 1e-30))) for t, r in ratio.items()}


def _fill_report(report, plan, params, weights, fusion, snr, corrections) -> None:
    report.count("int8_ops", len(plan.int8_nodes))
    report.count("quantized_tensors", len(plan.quantized))
    report.count("fused_activations", len(plan.fused_activations))
    applied = [name for name in corrections if name in set(plan.int8_nodes)]
    if applied:
        report.count("bias_corrected", len(applied))
    layers = []
    for name in plan.quantized:
        p = params[name]
        layers.append({
            "tensor": name, "scale": p.scale, "zero_point": p.zero_point, "dtype": p.dtype,
            "range": [p.lo, p.hi], "snr_db": round(snr.get(name, float("nan")), 2),
        })
    report.details["tensors"] = layers
    report.details["weights"] = list(weights.values())
    report.details["float_nodes"] = dict(plan.float_nodes)  # fallback layers carry their reason
    report.details["fusion"] = fusion.to_dict()
    report.notes.append(
        f"{len(plan.int8_nodes)} ops int8, {len(plan.quantized)} activations quantized, "
        f"{len(plan.fused_activations)} activations fused; onnxruntime kernels: "
        + ", ".join(f"{k} {v}" for k, v in sorted(fusion.int8_kernels.items()))
    )
    if fusion.unfused:
        report.warn(f"quant: {len(fusion.unfused)} planned int8 op(s) did not fuse in onnxruntime: "
                    + ", ".join(fusion.unfused[:5]))
