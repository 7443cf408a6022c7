"""The ``quant`` pass: end to end on builders, its options, bad input, the CLI, one real model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_cv import runtime
from onnxslim_cv.calibration import from_iterable, random_data
from onnxslim_cv.errors import UserError
from onnxslim_cv.ir import Model
from onnxslim_cv.passes.quant import QuantPass
from onnxslim_cv.qdq import is_depthwise_conv
from onnxslim_cv.pipeline import PassContext, make_passes, run_passes
from onnxslim_cv.testing import models as test_models
from onnxslim_cv.testing import zoo

from .conftest import assert_one_line_error, graph_model, sha256, with_scalar_clip_bounds
from .test_qdq import _neighbour_pair_max, _same_sign_pair_max

SAMPLES = 16


# ---------------------------------------------------------------------- helpers


def _proto(name: str) -> onnx.ModelProto:
    if name == "mobilenetv2_block (scalar clip)":
        return with_scalar_clip_bounds(test_models.build("mobilenetv2_block"))
    return test_models.build(name)


def _data(proto, count=SAMPLES):
    return random_data(Model.from_proto(proto).input_specs(), count)


def _quant(proto, data=None, **options):
    """(input Model, quantized Model, report), every supported op int8 unless said otherwise."""
    options.setdefault("placement", "all")
    model = Model.from_proto(proto)
    out, report = QuantPass(**options)(model, PassContext(calibration=data or _data(proto), progress=False))
    return model, out, report


def _cosines(proto, quantized, count=4, seed=100):
    """Per-sample, per-output cosine of the quantized model against the float one, on fresh inputs."""
    reference = runtime.make_session(proto)
    candidate = runtime.make_session(quantized.to_proto() if isinstance(quantized, Model) else quantized)
    cosines = []
    for s in range(count):
        feed = test_models.sample_inputs(proto, seed=seed + s)
        for a, b in zip(runtime.run(reference, feed), runtime.run(candidate, feed)):
            assert a.shape == b.shape
            a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
            cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return cosines


def _signature(model: Model):
    """Nodes (as a sorted list: pipeline statistics may re-toposort the caller's graph) and constants."""
    return sorted((n.name, n.op) for n in model.graph.nodes), {
        t.name: np.array(t.values) for t in model.graph.tensors().values() if hasattr(t, "values")
    }


def _initializers(proto: onnx.ModelProto):
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _activation_zero_points(proto: onnx.ModelProto):
    inits = _initializers(proto)
    return [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]


def _weight_scales(proto: onnx.ModelProto):
    """Scale of every int8 weight DequantizeLinear (int8 constant input)."""
    inits = _initializers(proto)
    return [inits[n.input[1]] for n in proto.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int8]


def _int32_biases(proto: onnx.ModelProto):
    inits = _initializers(proto)
    return {n.name: inits[n.input[0]] for n in proto.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].dtype == np.int32}


# ---------------------------------------------------------------------- end to end
E2E = ["resnet_basic_block", "squeezenet_fire", "detection_head", "mobilenetv2_block (scalar clip)"]


def _shared_bias_model() -> onnx.ModelProto:
    """Two convs reading one bias initializer, as tf2onnx writes equal constants once."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (4, 8, 1, 1)))]
    weights.append(numpy_helper.from_array(np.full(8, 0.1, np.float32), "shared_bias"))
    nodes = [
        helper.make_node("Conv", ["input", "w1", "shared_bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "shared_bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["output"], name="conv3"),
    ]
    graph = helper.make_graph(nodes, "shared_bias", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])], weights)
    return graph_model(graph)


def test_bias_correction_names_each_layers_corrected_bias_apart():
    from onnxslim_cv.passes.quant import _with_biases

    proto = _shared_bias_model()
    deltas = {"conv1": np.full(8, 0.5, np.float32), "conv2": np.full(8, -0.25, np.float32)}
    corrected = _with_biases(Model.from_proto(proto), deltas)
    biases = {n.name: n.inputs[2] for n in corrected.graph.nodes if n.name in deltas}
    assert biases["conv1"].name != biases["conv2"].name  # one name each: the exported model keeps both
    for name, delta in deltas.items():
        np.testing.assert_allclose(biases[name].values, 0.1 + delta)
    exported = corrected.to_proto()
    assert len({i.name for i in exported.graph.initializer}) == len(exported.graph.initializer)
    onnx.checker.check_model(exported, full_check=True)
    # and the whole pass on it
    _, out, report = _quant(proto, output_layers="int8")
    assert report.changes.get("bias_corrected", 0) >= 2
    onnx.checker.check_model(out.to_proto(), full_check=True)
    assert min(_cosines(proto, out)) > 0.99


@pytest.mark.parametrize("name", E2E)
def test_quantized_builder_stays_close_valid_and_fused(name):
    proto = _proto(name)
    model = Model.from_proto(proto)
    nodes_before, values_before = _signature(model)
    out, report = QuantPass(placement="all")(model, PassContext(calibration=_data(proto), progress=False))

    assert min(_cosines(proto, out)) >= 0.98
    emitted = out.to_proto()
    onnx.checker.check_model(emitted, full_check=True)
    assert emitted.ir_version <= runtime.max_ir_version()
    assert runtime.default_opset(emitted) >= 13
    assert any(n.op_type == "QuantizeLinear" for n in emitted.graph.node)

    tensors = report.details["tensors"]
    assert tensors and len(tensors) == report.changes["quantized_tensors"]
    for row in tensors:
        assert row["scale"] > 0 and np.isfinite(row["scale"])
        assert row["dtype"] == "uint8" and 0 <= row["zero_point"] <= 255
        assert row["range"][0] <= 0.0 <= row["range"][1]
    assert report.details["fusion"]["unfused"] == []
    assert report.details["fusion"]["int8_kernels"].get("QLinearConv", 0) >= 1
    assert not report.warnings
    assert report.details["weights"] and all(w["per_channel"] for w in report.details["weights"])

    # the input Model object is left alone
    nodes_after, values_after = _signature(model)
    assert nodes_after == nodes_before
    assert values_after.keys() == values_before.keys()
    assert all(np.array_equal(values_before[k], values_after[k]) for k in values_before)


def test_mobilenetv2_builder_with_one_element_clip_bounds_quantizes():
    proto = test_models.build("mobilenetv2_block")
    _, out, report = _quant(proto)
    assert min(_cosines(proto, out)) >= 0.98
    assert report.details["fusion"]["unfused"] == []


def test_run_passes_library_form_gives_the_same_model():
    proto = test_models.build("conv_chain")
    data = _data(proto)
    model = Model.from_proto(proto)
    out, reports = run_passes(model, make_passes(["quant"], {"quant": {"placement": "all"}}),
                              context=PassContext(calibration=data, progress=False))
    assert [r.name for r in reports] == ["quant"]
    _, direct, _ = _quant(proto, data)
    assert [n.op for n in out.graph.nodes] == [n.op for n in direct.graph.nodes]
    assert len(model.graph.nodes) == len(Model.from_proto(proto).graph.nodes)


def test_from_iterable_calibration_works_like_random_data():
    proto = test_models.build("resnet_basic_block")
    specs = Model.from_proto(proto).input_specs()
    data = from_iterable([test_models.sample_inputs(proto, seed=s) for s in range(SAMPLES)], specs)
    _, out, report = _quant(proto, data)
    assert min(_cosines(proto, out)) >= 0.98
    assert report.changes["int8_ops"] > 0


def test_output_layers_float_keeps_a_cheap_classifier_float_and_int8_quantizes_it():
    proto = test_models.build("resnet_basic_block")
    data = _data(proto)
    _, _, kept = _quant(proto, data)
    assert kept.details["float_nodes"] == {"fc1": "computes a model output (--quant-output-layers float)"}
    assert "QGemm" not in kept.details["fusion"]["int8_kernels"]
    _, _, all_int8 = _quant(proto, data, output_layers="int8")
    assert all_int8.details["float_nodes"] == {}
    assert all_int8.details["fusion"]["int8_kernels"].get("QGemm") == 1
    # fc1 and the Flatten feeding it (a pass-through with no int8 reader left) go float together
    assert all_int8.changes["int8_ops"] == kept.changes["int8_ops"] + 2


def test_exclude_keeps_matching_layers_float():
    proto = test_models.build("resnet_basic_block")
    _, out, report = _quant(proto, exclude=r"^conv[45]$")
    assert report.details["float_nodes"]["conv4"] == "matches --quant-exclude"
    assert report.details["float_nodes"]["conv5"] == "matches --quant-exclude"
    weighted = {w["node"] for w in report.details["weights"]}
    assert not weighted & {"conv4", "conv5"} and {"conv1", "conv6"} <= weighted
    assert min(_cosines(proto, out)) >= 0.98


# ---------------------------------------------------------------------- options
def test_int8_activations_use_int8_and_zero_points_0_or_minus_128():
    proto = test_models.build("resnet_basic_block")
    _, out, report = _quant(proto, act_type="int8")
    for row in report.details["tensors"]:
        assert row["dtype"] == "int8"
        assert row["zero_point"] in (0, -128)
    zero_points = _activation_zero_points(out.to_proto())
    assert len(zero_points) == len(report.details["tensors"])
    assert all(z.dtype == np.int8 and int(z) == 0 for z in zero_points)
    assert min(_cosines(proto, out)) >= 0.98


def test_int8_activations_have_zero_point_zero_everywhere():
    proto = test_models.build("resnet_basic_block")
    _, out, report = _quant(proto, act_type="int8")
    assert all(row["zero_point"] == 0 and row["dtype"] == "int8" for row in report.details["tensors"])
    assert min(_cosines(proto, out)) >= 0.98


def test_per_tensor_weights_have_no_per_channel_scales():
    proto = test_models.build("resnet_basic_block")
    _, out, report = _quant(proto, per_tensor=True)
    weights = report.details["weights"]
    assert len(weights) == 6
    for row in weights:
        assert row["per_channel"] is False
        assert row["weight_scale_min"] == row["weight_scale_max"] > 0
    weight_scales = _weight_scales(out.to_proto())
    assert len(weight_scales) == 6 and all(s.ndim == 0 for s in weight_scales)
    assert min(_cosines(proto, out)) >= 0.98


def test_per_channel_is_the_default():
    _, _, report = _quant(test_models.build("conv_chain"))
    assert all(w["per_channel"] for w in report.details["weights"])
    assert any(w["weight_scale_min"] < w["weight_scale_max"] for w in report.details["weights"])


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibration_method_runs_and_stays_close(method):
    proto = test_models.build("resnet_basic_block")
    _, out, report = _quant(proto, calib_method=method)
    assert report.options["calib_method"] == method
    assert min(_cosines(proto, out)) >= 0.95
    assert all(row["scale"] > 0 for row in report.details["tensors"])


def test_auto_is_the_default_calibration_method_and_says_what_it_chose():
    proto = test_models.build("resnet_basic_block")
    _, out, report = _quant(proto)
    choice = report.details["calibration_method"]
    assert report.options["calib_method"] == "auto"
    assert choice["chosen"] in ("percentile", "mse", "minmax", "entropy")
    assert set(choice["losses"]) == {"percentile", "mse", "minmax", "entropy"}
    assert any(n.startswith(f"calibration method: auto chose {choice['chosen']}") for n in report.notes)
    assert min(_cosines(proto, out)) >= 0.95


@pytest.mark.parametrize("name", ["resnet_basic_block", "detection_head"])
def test_auto_keeps_the_method_with_the_lowest_output_loss_as_measured(name):
    """Each loss auto records is what that method's own model scores, and it keeps the lowest."""
    from onnxslim_cv.passes.quant import _outputs, output_loss

    proto = test_models.build(name)
    data = _data(proto, 24)
    _, _, report = _quant(proto, data)
    choice = report.details["calibration_method"]
    losses = {m: v for m, v in choice["losses"].items()}
    assert choice["chosen"] == min(losses, key=lambda m: (losses[m], list(losses).index(m)))
    assert len(set(losses.values())) > 1  # the methods do give different ranges here
    float_model = Model.from_proto(proto)
    reference = _outputs(float_model, data)
    for method, recorded in losses.items():
        _, out, _ = _quant(proto, data, calib_method=method)
        # rel 1e-4: auto's float outputs come from the calibration session, whose taps keep
        # onnxruntime from fusing Conv + Relu, so they differ from a plain session's in the 7th digit
        assert output_loss(reference, _outputs(out, data), "cosine") == pytest.approx(recorded, rel=1e-4, abs=1e-12)


def test_placement_keeps_more_layers_float_only_when_as_fast():
    from onnxslim_cv.passes.quant import _pick_placement

    variants = {"all int8": [], "first 1 compute ops float": ["c0"], "first 3 compute ops float": ["c0", "c1", "c2"]}
    # a near-tie (within 2%): the candidate with more float layers
    assert _pick_placement({"all int8": 0.340, "first 1 compute ops float": 0.335,
                            "first 3 compute ops float": 0.45}, variants) == "first 1 compute ops float"
    assert _pick_placement({"all int8": 0.330, "first 1 compute ops float": 0.336,
                            "first 3 compute ops float": 0.45}, variants) == "first 1 compute ops float"
    # a clear win: the fastest, whatever it keeps float
    assert _pick_placement({"all int8": 0.30, "first 1 compute ops float": 0.33,
                            "first 3 compute ops float": 0.45}, variants) == "all int8"
    assert _pick_placement({"all int8": 7.0, "first 1 compute ops float": 6.6,
                            "first 3 compute ops float": 6.4}, variants) == "first 3 compute ops float"


def test_output_loss_counts_a_zeroed_output_as_lost():
    """An output map that quantization clipped to all zeros (a text map with faint text) is a
    total loss for that sample, not a perfect match; two all-zero outputs agree."""
    from onnxslim_cv.passes.quant import output_loss

    ref = [[np.array([[0.0, 0.2, 0.9], [0.0, 0.0, 0.0]], np.float32)]]
    zeroed = [[np.zeros((2, 3), np.float32)]]
    assert output_loss(ref, ref, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert output_loss(ref, zeroed, "cosine") == pytest.approx(0.5, abs=1e-6)  # sample 1 lost, sample 2 agrees


@pytest.mark.parametrize("method", ["auto", "percentile", "entropy", "mse"])
def test_too_few_samples_for_a_histogram_method_is_a_clear_error(method):
    proto = test_models.build("conv_chain")
    with pytest.raises(UserError, match=method) as info:
        _quant(proto, _data(proto, 2), calib_method=method)
    assert "minmax" in str(info.value)


def test_minmax_works_with_two_samples():
    proto = test_models.build("conv_chain")
    _, out, _ = _quant(proto, _data(proto, 2), calib_method="minmax")
    assert min(_cosines(proto, out)) >= 0.95


def test_already_quantized_model_is_refused():
    proto = test_models.build("conv_chain")
    data = _data(proto)
    _, out, _ = _quant(proto, data)
    with pytest.raises(UserError, match="already quantized"):
        QuantPass(placement="all")(out, PassContext(calibration=data, progress=False))


def test_missing_calibration_is_refused():
    with pytest.raises(UserError, match="--calib"):
        QuantPass(placement="all")(Model.from_proto(test_models.build("conv_chain")), PassContext(progress=False))


@pytest.mark.parametrize("option, value, flag", [
    ("act_type", "int4", "--act-type"),
    ("calib_method", "bogus", "--calib-method"),
    ("percentile", 10, "--quant-percentile"),
    ("samples", 0, "--quant-samples"),
    ("max_drop", 1.5, "--max-drop"),
    ("metric", "psnr", "--max-drop-metric"),
    ("exclude", "conv[", "--quant-exclude"),
    ("weight_range", "7", "--quant-weight-range"),
])
def test_bad_option_values_are_refused_naming_the_flag(option, value, flag):
    with pytest.raises(UserError, match=flag):
        QuantPass(**{option: value})


def _saturating_model() -> onnx.ModelProto:
    """Non-negative inputs into a 1x1 conv whose weights are all large and positive: any pair of
    8-bit products adds up past an int16, the case kernels without VNNI get wrong."""
    rng = np.random.default_rng(0)
    w1 = rng.uniform(0.5, 1.0, (32, 64, 1, 1)).astype(np.float32)
    w2 = rng.uniform(-1.0, 1.0, (8, 32, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu_in"),
             helper.make_node("Conv", ["r", "w1"], ["c"], name="dense"),
             helper.make_node("Relu", ["c"], ["h"], name="relu"),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "saturating", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return proto


def _saturating_quant(weight_range):
    proto = _saturating_model()
    rng = np.random.default_rng(1)
    samples = [{"x": rng.uniform(0, 1, (1, 64, 8, 8)).astype(np.float32)} for _ in range(SAMPLES)]
    data = from_iterable(samples, Model.from_proto(proto).input_specs())
    _, out, report = _quant(proto, data, output_layers="int8", weight_range=weight_range)
    reference, candidate = runtime.make_session(proto), runtime.make_session(out.to_proto())
    feed = {"x": rng.uniform(0, 1, (1, 64, 8, 8)).astype(np.float32)}
    a, b = (s.run(None, feed)[0].ravel().astype(np.float64) for s in (reference, candidate))
    return 1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), report


def test_auto_weight_range_keeps_products_that_overflow_int16_exact():
    loss, report = _saturating_quant("auto")
    assert report.details["fusion"]["int8_kernels"].get("QLinearConv") == 2
    assert loss < 1e-4  # full-range weights on a saturating kernel: 4.5e-3 (AMD EPYC, AVX2)
    saturates = runtime.int8_products_saturate("uint8")
    counts = {k: report.details["weight_range"][k] for k in ("pair-safe", "full")}
    assert counts == ({"pair-safe": 2, "full": 0} if saturates else {"pair-safe": 0, "full": 2})
    assert any("pair-safe weight ranges on 2 of 2 layers" in note for note in report.notes) == saturates


def test_full_range_weights_lose_accuracy_where_the_probe_says_kernels_saturate():
    if not runtime.int8_products_saturate("uint8"):
        pytest.skip("this CPU's int8 kernels do not saturate (VNNI or not x86)")
    full, _ = _saturating_quant("full")
    safe, _ = _saturating_quant("safe")
    assert full > 20 * safe


def test_safe_weight_range_leaves_depthwise_convs_full():
    proto = _proto("mobilenetv2_block")
    _, out, report = _quant(proto, weight_range="safe")
    nodes = {n.name: n for n in Model.from_proto(proto).graph.nodes}
    ranges = {row["node"]: row["weight_range"] for row in report.details["weights"]}
    assert {r.split(" ")[0] for r in ranges.values()} == {"full", "pair-safe"}
    assert all(r.startswith("full" if is_depthwise_conv(nodes[name]) else "pair-safe") for name, r in ranges.items())
    inits = _initializers(out.to_proto())
    for row in report.details["weights"]:
        q = inits[row["weight"] + "_quantized"].astype(np.int64)
        if row["weight_range"] == "pair-safe (any pairs)":
            assert _same_sign_pair_max(q) <= 128
        elif row["weight_range"] == "pair-safe (adjacent pairs)":
            assert _neighbour_pair_max(q) <= 128
        else:
            assert row["weight_range"] == "full"
    assert min(_cosines(proto, out)) >= 0.98


def test_bias_correction_on_and_off_both_work():
    proto = test_models.build("resnet_basic_block")
    data = _data(proto)
    _, corrected, on = _quant(proto, data, bias_correction="on")
    _, plain, off = _quant(proto, data, bias_correction="off")
    assert on.changes["bias_corrected"] == 6
    assert "bias_corrected" not in off.changes
    assert min(_cosines(proto, corrected)) >= 0.98 and min(_cosines(proto, plain)) >= 0.98

    on_biases, off_biases = _int32_biases(corrected.to_proto()), _int32_biases(plain.to_proto())
    assert len(on_biases) == len(off_biases) == 6
    assert any(not np.array_equal(a, b) for a, b in zip(sorted(on_biases.values(), key=len), sorted(off_biases.values(), key=len)))


def test_bias_correction_auto_means_on():
    proto = test_models.build("conv_chain")
    _, _, report = _quant(proto)
    assert report.changes["bias_corrected"] == 3


def test_tiny_max_drop_keeps_layers_float_and_lowers_the_loss():
    proto = test_models.build("resnet_basic_block")
    _, out, report = _quant(proto, max_drop=1e-6, metric="cosine")
    fallback = report.details["fallback"]
    assert fallback["metric"] == "cosine" and fallback["target"] == 1e-6
    if fallback.get("kept_float"):
        assert fallback["loss"] < fallback["loss_all_int8"]
        assert fallback["loss"] <= 1e-6
        for name in fallback["kept_float"]:
            assert report.details["float_nodes"][name] == "accuracy fallback (--max-drop)"
        assert report.changes["int8_ops"] < 10
    else:
        assert any("not reachable" in w for w in report.warnings)
    assert min(_cosines(proto, out)) >= 0.98


def test_generous_max_drop_keeps_every_layer_int8():
    proto = test_models.build("resnet_basic_block")
    data = _data(proto)
    _, _, plain = _quant(proto, data)
    _, out, report = _quant(proto, data, max_drop=0.5)
    fallback = report.details["fallback"]
    assert fallback["loss_all_int8"] <= 0.5
    assert "kept_float" not in fallback
    assert "accuracy fallback (--max-drop)" not in report.details["float_nodes"].values()
    assert report.changes["int8_ops"] == plain.changes["int8_ops"]
    assert report.details["fusion"] == plain.details["fusion"]


@pytest.mark.parametrize("metric", ["snr", "top1"])
def test_other_max_drop_metrics_run(metric):
    proto = test_models.build("resnet_basic_block")
    _, out, report = _quant(proto, max_drop=0.0, metric=metric)
    fallback = report.details["fallback"]
    assert fallback["metric"] == metric
    final = fallback.get("loss", fallback["loss_all_int8"])
    assert final <= 0.0 or any("not reachable" in w for w in report.warnings)


def test_max_drop_met_keeps_the_weight_report():
    proto = test_models.build("resnet_basic_block")
    data = _data(proto)
    _, _, plain = _quant(proto, data)
    _, _, report = _quant(proto, data, max_drop=0.5)
    assert len(report.details["weights"]) == len(plain.details["weights"]) == 6


def test_cle_runs_and_outputs_stay_close():
    proto = test_models.build("resnet_basic_block")
    _, out, report = _quant(proto, cle=True)
    assert report.changes["equalized_pairs"] >= 1
    assert len(report.details["cle"]["pairs"]) == report.changes["equalized_pairs"]
    assert min(_cosines(proto, out)) >= 0.98
    assert report.details["fusion"]["unfused"] == []


def test_old_opset_is_raised_to_13():
    proto = test_models.build("conv_chain", opset=11)
    _, out, report = _quant(proto)
    assert runtime.default_opset(out.to_proto()) >= 13
    assert any("opset 11 -> 13" in note for note in report.notes)
    assert min(_cosines(proto, out)) >= 0.98


def test_tensor_snr_includes_each_tensors_own_rounding():
    # N(0, 1) input at 8 bits over about +-3.7: ~41 dB, not the ~340 dB of an unquantized tensor
    proto = test_models.build("resnet_basic_block")
    _, _, report = _quant(proto)
    rows = {r["tensor"]: r["snr_db"] for r in report.details["tensors"]}
    assert 30.0 < rows["input"] < 60.0
    assert all(15.0 < snr < 80.0 for snr in rows.values()), rows


# ---------------------------------------------------------------------- CLI
@pytest.fixture
def classifier(model_file):
    return model_file("resnet_basic_block", batch="N")


def _npz(tmp_path, count=SAMPLES, size=16):
    path = tmp_path / "calib.npz"
    np.savez(path, input=np.random.default_rng(0).standard_normal((count, 3, size, size)).astype(np.float32))
    return path


def test_cli_quantizes_writes_a_loadable_model_and_leaves_the_input_alone(cli, classifier, tmp_path):
    out = tmp_path / "int8.onnx"
    before = sha256(classifier)
    result = cli(classifier, out, "--passes", "quant", "--calib", _npz(tmp_path), "--quant-placement", "all")
    assert result.code == 0, result.err
    assert "PASS" in result.out
    emitted = onnx.load(str(out))
    onnx.checker.check_model(emitted, full_check=True)
    assert any(n.op_type == "QuantizeLinear" for n in emitted.graph.node)
    session = runtime.make_session(str(out))
    feed = test_models.sample_inputs(test_models.build("resnet_basic_block", batch="N"), batch=2)
    assert runtime.run(session, feed)[0].shape == (2, 10)
    assert sha256(classifier) == before


def test_cli_options_reach_the_pass(cli, classifier, tmp_path):
    out, report = tmp_path / "int8.onnx", tmp_path / "report.json"
    result = cli(classifier, out, "--passes", "quant", "--calib", _npz(tmp_path), "--quant-placement", "all",
                 "--act-type", "int8", "--calib-method", "minmax", "--quant-samples", "8", "--report-json", report)
    assert result.code == 0, result.err
    data = json.loads(report.read_text())
    quant = next(p for p in data["passes"] if p["name"] == "quant")
    assert quant["options"]["act_type"] == "int8"
    assert quant["options"]["calib_method"] == "minmax"
    assert quant["options"]["samples"] == 8
    zero_points = _activation_zero_points(onnx.load(str(out)))
    assert zero_points and all(z.dtype == np.int8 for z in zero_points)


def test_cli_quant_per_tensor_turns_per_channel_off(cli, classifier, tmp_path):
    out = tmp_path / "int8.onnx"
    result = cli(classifier, out, "--passes", "quant", "--calib", _npz(tmp_path), "--quant-placement", "all",
                 "--quant-per-tensor")
    assert result.code == 0, result.err
    scales = _weight_scales(onnx.load(str(out)))
    assert scales and all(s.ndim == 0 for s in scales)


def test_cli_bogus_calib_method_is_a_one_line_error(cli, classifier, tmp_path):
    out = tmp_path / "int8.onnx"
    result = cli(classifier, out, "--passes", "quant", "--calib", _npz(tmp_path), "--calib-method", "bogus")
    assert_one_line_error(result, "--calib-method")
    assert not out.exists()


def test_cli_quant_without_calib_is_a_one_line_error(cli, classifier, tmp_path):
    out = tmp_path / "int8.onnx"
    assert_one_line_error(cli(classifier, out, "--passes", "quant"), "--calib")
    assert not out.exists()


def test_cli_quantized_input_is_a_one_line_error(cli, classifier, tmp_path):
    first, second = tmp_path / "int8.onnx", tmp_path / "again.onnx"
    calib = _npz(tmp_path)
    assert cli(classifier, first, "--passes", "quant", "--calib", calib, "--quant-placement", "all").code == 0
    assert_one_line_error(cli(first, second, "--passes", "quant", "--calib", calib, "--quant-placement", "all"),
                          "already quantized")
    assert not second.exists()


def test_cli_too_few_samples_is_a_one_line_error(cli, classifier, tmp_path):
    out = tmp_path / "int8.onnx"
    result = cli(classifier, out, "--passes", "quant", "--calib", _npz(tmp_path, count=2), "--quant-placement", "all",
                 "--calib-method", "entropy")
    assert_one_line_error(result, "entropy")
    assert not out.exists()


def test_cli_help_documents_the_quant_flags(cli):
    result = cli("--help")
    assert result.code == 0
    for flag in ("--act-type", "--calib-method", "--quant-per-tensor", "--cle", "--max-drop", "--max-drop-metric",
                 "--quant-placement", "--quant-exclude"):
        assert flag in result.out


# ---------------------------------------------------------------------- a real model
@pytest.mark.shared
@pytest.mark.skipif(zoo.shared_models_dir() is None, reason="shared models folder absent")
def test_resnet20_int8_agrees_with_float_and_fuses_fully():
    from onnxslim_cv.model_io import load_model

    entry = zoo.get("resnet20")
    model = load_model(entry.model_path())
    out, report = QuantPass(placement="all")(model, PassContext(calibration=entry.calibration(32), progress=False))
    assert report.details["fusion"]["unfused"] == []
    assert report.details["fusion"]["int8_kernels"].get("QLinearConv", 0) >= 19
    reference, candidate = runtime.make_session(model.to_proto()), runtime.make_session(out.to_proto())
    agree = total = 0
    for feed in entry.inputs(64):
        a, b = runtime.run(reference, feed)[0], runtime.run(candidate, feed)[0]
        agree += int(np.argmax(a) == np.argmax(b))
        total += 1
    assert total == 64
    assert agree / total >= 0.9


def test_terminal_report_shows_the_lowest_snr_tensors_and_the_float_layers():
    from onnxslim_cv.report import format_passes

    _, _, report = _quant(test_models.build("resnet_basic_block"))
    text = format_passes([report])
    assert "with the lowest SNR vs float" in text
    worst = min(report.details["tensors"], key=lambda row: row["snr_db"])
    assert worst["tensor"] in text and f"{worst['snr_db']:.1f}" in text
    assert "kept float:" in text and "computes a model output" in text


def test_conv_transpose_stays_float_for_onnxruntime_and_goes_int8_for_tensorrt():
    proto = test_models.build("conv_transpose")
    _, out, report = _quant(proto)
    transposes = [n.name for n in out.graph.nodes if n.op == "ConvTranspose"]
    assert transposes and all("no int8 kernel in onnxruntime" in report.details["float_nodes"][t] for t in transposes)
    _, out_int8, report_int8 = _quant(proto, act_type="int8")
    rows = {row["node"]: row for row in report_int8.details["weights"]}
    assert all(rows[t]["per_channel"] for t in transposes)
    weights = {n.outputs[0].name: n for n in out_int8.graph.nodes if n.op == "DequantizeLinear"}
    for node in out_int8.graph.nodes:
        if node.op == "ConvTranspose":
            assert weights[node.inputs[1].name].attrs.get("axis") == 1
    onnx.checker.check_model(out_int8.to_proto(), full_check=True)
    assert min(_cosines(proto, out_int8)) >= 0.98


def test_cli_val_data_drives_max_drop(cli, classifier, tmp_path):
    out, report = tmp_path / "int8.onnx", tmp_path / "report.json"
    val = tmp_path / "val.npz"
    np.savez(val, input=np.random.default_rng(7).standard_normal((8, 3, 16, 16)).astype(np.float32))
    result = cli(classifier, out, "--passes", "quant", "--calib", _npz(tmp_path), "--quant-placement", "all",
                 "--val", val, "--max-drop", "0.5", "--report-json", report)
    assert result.code == 0, result.err
    quant = json.loads(report.read_text())["passes"][0]
    assert quant["details"]["fallback"]["target"] == 0.5


def test_cli_val_arrays_with_image_preprocessing_flags_is_a_one_line_error(cli, classifier, tmp_path):
    out = tmp_path / "int8.onnx"
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):  # calibration images take --mean; the arrays given as --val cannot
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    val = tmp_path / "val.npz"
    np.savez(val, input=np.zeros((2, 3, 16, 16), np.float32))
    result = cli(classifier, out, "--passes", "quant", "--calib", images, "--val", val, "--mean", "1")
    assert_one_line_error(result, "val.npz: --mean only apply to images")
    assert not out.exists()
