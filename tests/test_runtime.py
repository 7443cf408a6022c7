"""What the installed onnxruntime loads, found by asking it."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxslim_cv import runtime
from onnxslim_cv.testing import models


def relu_model(ir_version: int, opset: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    model.ir_version = ir_version
    return model


def test_max_ir_version_loads_and_the_next_one_does_not():
    top = runtime.max_ir_version()
    runtime.make_session(relu_model(top, 13))
    if top + 1 <= onnx.IR_VERSION:
        with pytest.raises(Exception):
            runtime.make_session(relu_model(top + 1, 13))


def test_max_opset_loads_and_the_next_one_does_not():
    top = runtime.max_opset()
    runtime.make_session(relu_model(runtime.max_ir_version(), top))
    if top + 1 <= onnx.defs.onnx_opset_version():
        with pytest.raises(Exception):
            runtime.make_session(relu_model(runtime.max_ir_version(), top + 1))


def test_run_casts_inputs_to_the_declared_dtype():
    model = models.conv_chain()
    session = runtime.make_session(model)
    x = models.sample_inputs(model)["input"]
    (as_float32,) = runtime.run(session, {"input": x})
    (from_float64,) = runtime.run(session, {"input": x.astype(np.float64)})
    np.testing.assert_allclose(as_float32, from_float64, rtol=1e-6)


def test_working_sessions_do_not_spin_and_pinned_benchmark_sessions_keep_the_default():
    proto = models.build("conv_chain")
    working = runtime.make_session(proto).get_session_options()
    assert working.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    pinned = runtime.make_session(proto, threads=1).get_session_options()
    assert pinned.intra_op_num_threads == 1
    with pytest.raises(Exception):  # not set: onnxruntime's default (spinning) applies
        pinned.get_session_config_entry("session.intra_op.allow_spinning")


def test_working_sessions_free_their_buffers_and_benchmark_sessions_keep_the_arena():
    proto = models.build("conv_chain")
    working = runtime.make_session(proto)
    assert working.get_session_options().enable_cpu_mem_arena is False
    pinned = runtime.make_session(proto, threads=1)
    assert pinned.get_session_options().enable_cpu_mem_arena is True  # latency as deployed
    feed = models.sample_inputs(proto, seed=3)
    np.testing.assert_array_equal(working.run(None, feed)[0], pinned.run(None, feed)[0])


def _saturation_output(act_type, weight, depthwise, optimize=True):
    return runtime._probe_output(runtime._saturation_probe(act_type, weight, depthwise), optimize=optimize)


@pytest.mark.parametrize("act_type", ["uint8", "int8"])
@pytest.mark.parametrize("depthwise", [False, True])
def test_saturation_probe_computes_64_unfused_and_7_bit_weights_never_saturate(act_type, depthwise):
    # unfused, the QDQ math itself: 64 when the inputs and weights are at the top of their types
    assert np.all(_saturation_output(act_type, 127, depthwise, optimize=False) == 64.0)
    # fused into onnxruntime's int8 kernel, [-63, 63] weights fit an int16 pair: 64 * 63 / 127 -> 32
    assert np.all(_saturation_output(act_type, 63, depthwise) == 32.0)


@pytest.mark.parametrize("act_type", ["uint8", "int8"])
@pytest.mark.parametrize("depthwise", [False, True])
def test_int8_products_saturate_says_whether_the_fused_kernel_misses_64(act_type, depthwise):
    fused = _saturation_output(act_type, 127, depthwise)
    assert runtime.int8_products_saturate(act_type, depthwise) == bool(np.any(fused != 64.0))


@pytest.mark.parametrize("act_type", ["uint8", "int8"])
def test_neighbouring_pairs_are_the_ones_a_saturating_kernel_overflows(act_type):
    if not runtime.int8_products_saturate(act_type):
        pytest.skip("this CPU's int8 kernels do not saturate, so they show no pairing")
    assert runtime.int8_pairs_are_adjacent(act_type)
    # channels 0 and 1 (one neighbouring pair) at 127 overflow; 0 and 2 (not a pair) do not
    for channels, overflows in (((0, 1), True), ((0, 2), False)):
        weights = np.full((16, 4, 3, 3), -20)
        weights[:, list(channels)] = 127
        probe = runtime._conv_probe(act_type, weights, y_scale=0.25)
        fused, exact = runtime._probe_output(probe), runtime._probe_output(probe, optimize=False)
        assert bool(np.abs(fused - exact).max() > 0.25) == overflows, channels


def _run_all(proto, feed, names):
    session = runtime.make_session(proto, optimize=False)
    return dict(zip(names, runtime.run(session, feed, names)))


def test_only_outputs_computes_an_early_tensor_alone_and_the_same():
    proto = models.build("resnet_basic_block")
    feed = models.sample_inputs(proto, seed=0)
    early = proto.graph.node[1].output[0]
    cut = onnx.ModelProto()
    cut.CopyFrom(proto)
    runtime.only_outputs(cut, [early])
    assert len(cut.graph.node) == 2 and [o.name for o in cut.graph.output] == [early]
    used = {name for node in cut.graph.node for name in node.input}
    assert {init.name for init in cut.graph.initializer} <= used  # the later layers' weights are gone
    expected = _run_all(runtime.with_outputs(proto, [early]), feed, [early])[early]
    np.testing.assert_array_equal(_run_all(cut, feed, [early])[early], expected)


def test_only_outputs_keeps_the_graph_when_only_inputs_are_asked_for():
    proto = models.build("resnet_basic_block")
    name = proto.graph.input[0].name
    runtime.only_outputs(proto, [name])
    assert len(proto.graph.node) > 0 and name in [o.name for o in proto.graph.output]
    feed = models.sample_inputs(proto, seed=0)
    np.testing.assert_array_equal(_run_all(proto, feed, [name])[name], feed[name])


def test_only_outputs_keeps_what_a_subgraph_reads_from_the_outer_graph():
    branch = helper.make_graph([helper.make_node("Relu", ["a"], ["r"])], "then", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["a"], ["n"])], "else", [],
                              [helper.make_tensor_value_info("n", TensorProto.FLOAT, [2])])
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["a"]),  # read only inside the branches
        helper.make_node("If", ["flag"], ["y"], then_branch=branch, else_branch=other),
        helper.make_node("Exp", ["x"], ["unrelated"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("unrelated", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    runtime.only_outputs(proto, ["y"])
    assert [n.op_type for n in proto.graph.node] == ["Sigmoid", "If"]
    x = np.array([-1.0, 2.0], np.float32)
    got = _run_all(proto, {"x": x, "flag": np.array(True)}, ["y"])["y"]
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-x)), rtol=1e-6)
