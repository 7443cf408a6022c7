"""The fold pass: outputs stay equal, and each cleanup rule does what it says."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_cv import runtime
from onnxslim_cv.model_io import load_model
from onnxslim_cv.pipeline import run_passes
from onnxslim_cv.testing import models

from .conftest import max_relative_error, run_model

MAX_RELATIVE_ERROR = 1e-5


def fold(proto, **options):
    from onnxslim_cv.passes.fold import FoldPass

    model, (report,) = run_passes(load_model(proto), [FoldPass(**options)])
    emitted = model.to_proto()
    onnx.checker.check_model(emitted, full_check=True)
    assert emitted.ir_version <= runtime.max_ir_version()
    return emitted, report, model


def op_count(proto, op):
    return sum(1 for node in proto.graph.node if node.op_type == op)


def make(nodes, inputs, outputs, initializers=(), opset=13):
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def tensor(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def const(name, values):
    return numpy_helper.from_array(np.asarray(values), name)


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("builder", sorted(models.BUILDERS))
def test_every_test_model_keeps_its_outputs(builder, opset):
    source = models.build(builder, opset=opset)
    folded, report, _ = fold(source)
    feeds = models.sample_inputs(source, seed=1)
    assert max_relative_error(run_model(source, feeds), run_model(folded, feeds)) <= MAX_RELATIVE_ERROR
    batchnorms = op_count(source, "BatchNormalization")
    assert op_count(folded, "BatchNormalization") == 0
    assert report.changes.get("batchnorm_folded", 0) == batchnorms
    assert len(folded.graph.node) == len(source.graph.node) - batchnorms - report.details["nodes_removed"] + batchnorms


@pytest.mark.parametrize("builder", ["resnet_basic_block", "mobilenetv3_block", "detection_head", "reshape_matmul"])
def test_dynamic_batch_stays_dynamic(builder):
    source = models.build(builder, batch="N")
    folded, _, _ = fold(source)
    for batch in (1, 3):
        feeds = models.sample_inputs(source, batch=batch, seed=2)
        assert max_relative_error(run_model(source, feeds), run_model(folded, feeds)) <= MAX_RELATIVE_ERROR


def test_batchnorm_scales_are_kept_for_later_passes():
    _, _, model = fold(models.conv_chain())
    record = model.annotations["batchnorm"]
    assert set(record) == {"conv1", "conv2", "conv3"}
    source = onnx.numpy_helper.to_array(
        next(i for i in models.conv_chain().graph.initializer if i.name == "bn1.weight")
    )
    np.testing.assert_array_equal(record["conv1"]["gamma"], source)


def test_weight_names_survive_folding():
    source = models.resnet_basic_block()
    folded, _, _ = fold(source)
    conv_weights = {i for n in source.graph.node if n.op_type in ("Conv", "Gemm") for i in n.input[1:2]}
    assert conv_weights <= {i.name for i in folded.graph.initializer}


def test_fold_twice_changes_nothing_more():
    once, _, _ = fold(models.mobilenetv3_block())
    twice, report, _ = fold(once)
    assert len(twice.graph.node) == len(once.graph.node)
    assert report.changes == {}


def test_identity_and_dropout_are_removed_but_graph_outputs_keep_their_names():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Dropout", ["b"], ["c"]),
        helper.make_node("Relu", ["c"], ["d"]),
        helper.make_node("Identity", ["d"], ["y"]),  # graph output behind an Identity
    ]
    source = make(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])])
    folded, report, _ = fold(source)
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Relu"]
    assert folded.graph.output[0].name == "y"
    assert report.changes == {"identity_removed": 2, "dropout_removed": 1}
    x = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(source, x)[0], run_model(folded, x)[0])


def test_identity_between_graph_input_and_output_stays():
    source = make([helper.make_node("Identity", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])])
    folded, _, _ = fold(source)
    assert [n.op_type for n in folded.graph.node] == ["Identity"]


def test_dropout_whose_mask_is_used_stays():
    nodes = [helper.make_node("Dropout", ["x"], ["y", "mask"])]
    source = make(nodes, [tensor("x", [2])], [tensor("y", [2]), tensor("mask", [2], TensorProto.BOOL)])
    folded, _, _ = fold(source)
    assert op_count(folded, "Dropout") == 1


def test_shape_arithmetic_on_static_shapes_folds_away():
    """x.view(x.size(0), -1) as exported with a static input: Shape/Gather/Unsqueeze/Concat."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [const("zero", np.array(0, np.int64)), const("axes", np.array([0], np.int64)), const("minus_one", np.array([-1], np.int64))]
    source = make(nodes, [tensor("x", [2, 3, 4])], [tensor("y", [2, 12])], inits)
    folded, report, _ = fold(source)
    assert [n.op_type for n in folded.graph.node] == ["Reshape"]
    assert report.changes["shape_ops_folded"] == 1
    target = next(i for i in folded.graph.initializer if i.name == folded.graph.node[0].input[1])
    assert onnx.numpy_helper.to_array(target).tolist() == [2, -1]


def dynamic_head_model():
    """PP-OCR's classifier head: Shape -> Slice(0:1) -> Concat(-1 features) -> Reshape, dynamic batch."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["p"]),
        helper.make_node("Shape", ["p"], ["s"]),
        helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
        helper.make_node("Slice", ["s32", "start", "end", "axes"], ["n"]),
        helper.make_node("Cast", ["n"], ["n64"], to=TensorProto.INT64),
        helper.make_node("Concat", ["n64", "features"], ["target"], axis=0),
        helper.make_node("Reshape", ["p", "target"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["y"]),
    ]
    inits = [
        const("start", np.array([0], np.int32)),
        const("end", np.array([1], np.int32)),
        const("axes", np.array([0], np.int32)),
        const("features", np.array([4], np.int64)),
        const("w", np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)),
    ]
    return make(nodes, [tensor("x", ["N", 4, 5, 5])], [tensor("y", ["N", 2])], inits)


def test_reshape_target_computed_from_a_dynamic_batch_becomes_a_constant():
    source = dynamic_head_model()
    folded, report, _ = fold(source)
    assert report.changes["dynamic_reshapes_folded"] == 1
    assert [n.op_type for n in folded.graph.node] == ["GlobalAveragePool", "Reshape", "MatMul"]
    for batch in (1, 4):
        x = {"x": np.random.default_rng(batch).standard_normal((batch, 4, 5, 5)).astype(np.float32)}
        np.testing.assert_allclose(run_model(source, x)[0], run_model(folded, x)[0], rtol=1e-6)


def test_folding_does_not_blow_up_the_file():
    """ConstantOfShape makes a 4 MB tensor from 16 bytes: leave it to run time."""
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Add", ["x", "big"], ["y"]),
    ]
    source = make(nodes, [tensor("x", [1000, 1000])], [tensor("y", [1000, 1000])], [const("shape", np.array([1000, 1000], np.int64))])
    folded, report, _ = fold(source)
    assert op_count(folded, "ConstantOfShape") == 1
    assert report.changes["constants_left_unfolded_size"] == 1
    assert folded.ByteSize() < 10_000
    bigger, _, _ = fold(source, max_bytes=10_000_000)
    assert op_count(bigger, "ConstantOfShape") == 0


def test_a_partly_folded_multi_output_node_keeps_its_output_positions():
    """Split's first output folds; the second feeds a Tile left unfolded (too big)."""
    nodes = [
        helper.make_node("Split", ["c"], ["first", "second"], axis=0),
        helper.make_node("Tile", ["second", "repeats"], ["tiled"]),
        helper.make_node("Add", ["x", "first"], ["y"]),
        helper.make_node("Add", ["z", "tiled"], ["w"]),
    ]
    inits = [
        const("c", np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)),
        const("repeats", np.array([1000, 500], np.int64)),
    ]
    inputs = [tensor("x", [1, 2]), tensor("z", [1000, 1000])]
    source = make(nodes, inputs, [tensor("y", [1, 2]), tensor("w", [1000, 1000])], inits, opset=11)
    folded, report, _ = fold(source)
    assert sorted(n.op_type for n in folded.graph.node) == ["Add", "Add", "Split", "Tile"]
    assert report.changes["constant_tensors_folded"] == 1
    feeds = {"x": np.ones((1, 2), np.float32), "z": np.zeros((1000, 1000), np.float32)}
    for ref, out in zip(run_model(source, feeds), run_model(folded, feeds)):
        np.testing.assert_array_equal(ref, out)


def test_duplicate_nodes_are_merged():
    nodes = [
        helper.make_node("Slice", ["x", "s", "e"], ["a"]),
        helper.make_node("Slice", ["x", "s", "e"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    inits = [const("s", np.array([0], np.int64)), const("e", np.array([2], np.int64))]
    source = make(nodes, [tensor("x", [4])], [tensor("y", [2])], inits)
    folded, report, _ = fold(source)
    assert op_count(folded, "Slice") == 1
    assert report.changes["duplicate_nodes_merged"] == 1


def test_nodes_on_equal_constants_with_different_names_are_merged():
    nodes = [
        helper.make_node("Div", ["x", "two"], ["a"]),
        helper.make_node("Div", ["x", "also_two"], ["b"]),
        helper.make_node("Sub", ["a", "b"], ["y"]),
    ]
    inits = [const("two", np.array(2.0, np.float32)), const("also_two", np.array(2.0, np.float32))]
    source = make(nodes, [tensor("x", [3])], [tensor("y", [3])], inits)
    folded, report, _ = fold(source)
    assert op_count(folded, "Div") == 1 and len(folded.graph.initializer) == 1


def conv_then(op, constant, opset=13):
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node(op, ["c", "k"], ["y"])]
    return make(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", [1, 4, 6, 6])], [const("w", weight), const("k", constant)], opset)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), (1,), ()])
def test_per_channel_constants_after_a_conv_fold_into_it(op, shape):
    constant = (np.random.default_rng(1).uniform(0.5, 2.0, size=shape)).astype(np.float32)
    source = conv_then(op, constant)
    folded, report, _ = fold(source)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert report.changes == {f"{op.lower()}_folded_into_conv": 1}
    x = {"x": np.random.default_rng(2).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    assert max_relative_error(run_model(source, x), run_model(folded, x)) <= MAX_RELATIVE_ERROR


def test_constants_that_vary_over_space_stay():
    source = conv_then("Add", np.ones((1, 1, 6, 6), np.float32))
    folded, _, _ = fold(source)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Add"]


def test_matmul_plus_bias_becomes_gemm():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    inits = [const("w", rng.standard_normal((5, 3)).astype(np.float32)), const("b", rng.standard_normal((3,)).astype(np.float32))]
    source = make(nodes, [tensor("x", [2, 5])], [tensor("y", [2, 3])], inits)
    folded, report, _ = fold(source)
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    x = {"x": rng.standard_normal((2, 5)).astype(np.float32)}
    assert max_relative_error(run_model(source, x), run_model(folded, x)) <= MAX_RELATIVE_ERROR


def test_a_row_shaped_gemm_bias_becomes_one_dimensional():
    """[1, N] -> [N]: same outputs, and the form onnxruntime's quantize_static accepts (MNIST)."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"]),
             helper.make_node("Gemm", ["y", "w2", "b2"], ["z"], transB=1)]
    inits = [const("w", rng.standard_normal((5, 3)).astype(np.float32)),
             const("b", rng.standard_normal((1, 3)).astype(np.float32)),
             const("w2", rng.standard_normal((4, 3)).astype(np.float32)),
             const("b2", rng.standard_normal((1, 4)).astype(np.float32))]
    source = make(nodes, [tensor("x", [2, 5])], [tensor("z", [2, 4])], inits)
    folded, report, _ = fold(source)
    assert [n.op_type for n in folded.graph.node] == ["Gemm", "Gemm"]
    biases = {i.name: list(i.dims) for i in folded.graph.initializer if i.name in ("b", "b2")}
    assert biases == {"b": [3], "b2": [4]}
    assert report.changes["gemm_bias_flattened"] == 2
    x = {"x": rng.standard_normal((2, 5)).astype(np.float32)}
    assert max_relative_error(run_model(source, x), run_model(folded, x)) <= MAX_RELATIVE_ERROR


def test_matmul_on_3d_inputs_stays():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    inits = [const("w", np.ones((5, 3), np.float32)), const("b", np.ones((3,), np.float32))]
    source = make(nodes, [tensor("x", [2, 4, 5])], [tensor("y", [2, 4, 3])], inits)
    folded, _, _ = fold(source)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Add"]


def test_batchnorm_after_a_gemm_folds_into_it():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("BatchNormalization", ["g", "gamma", "beta", "mean", "var"], ["y"]),
    ]
    inits = [
        const("w", rng.standard_normal((4, 6)).astype(np.float32)),
        const("b", rng.standard_normal((4,)).astype(np.float32)),
        const("gamma", rng.uniform(0.5, 1.5, 4).astype(np.float32)),
        const("beta", rng.standard_normal(4).astype(np.float32)),
        const("mean", rng.standard_normal(4).astype(np.float32)),
        const("var", rng.uniform(0.5, 2, 4).astype(np.float32)),
    ]
    source = make(nodes, [tensor("x", [3, 6])], [tensor("y", [3, 4])], inits)
    folded, _, _ = fold(source)
    assert [n.op_type for n in folded.graph.node] == ["Gemm"]
    x = {"x": rng.standard_normal((3, 6)).astype(np.float32)}
    assert max_relative_error(run_model(source, x), run_model(folded, x)) <= MAX_RELATIVE_ERROR


def test_batchnorm_whose_input_has_other_readers_stays():
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"]),
        helper.make_node("Add", ["bn", "c"], ["y"]),
    ]
    inits = [
        const("w", rng.standard_normal((2, 2, 1, 1)).astype(np.float32)),
        *(const(n, rng.uniform(0.5, 1.5, 2).astype(np.float32)) for n in ("gamma", "beta", "mean", "var")),
    ]
    source = make(nodes, [tensor("x", [1, 2, 3, 3])], [tensor("y", [1, 2, 3, 3])], inits)
    folded, report, _ = fold(source)
    assert op_count(folded, "BatchNormalization") == 1
    assert any("BatchNormalization left" in note for note in report.notes)


def test_quantization_nodes_are_never_evaluated():
    """Folding DequantizeLinear of int8 weights would silently undo quantization."""
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    inits = [const("q", np.ones((3, 2), np.int8)), const("scale", np.array(0.1, np.float32)), const("zero", np.array(0, np.int8))]
    source = make(nodes, [tensor("x", [1, 3])], [tensor("y", [1, 2])], inits)
    folded, _, _ = fold(source)
    assert op_count(folded, "DequantizeLinear") == 1
