"""Mask files and apply-masks: exact round trips, one-line errors, only masked weights change."""

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_cv import runtime
from onnxslim_cv.errors import UserError
from onnxslim_cv.masks import apply_masks, check_masks, load_masks, masks_from_model, save_masks
from onnxslim_cv.model_io import load_model
from onnxslim_cv.sparsity import magnitude_mask, sparsifiable_layers

from .conftest import assert_one_line_error, run_model, sha256

AWKWARD = "/backbone/fc:0.weight"  # what torch.onnx names weights it cannot attribute


def matmul_model(seed=0):
    """x[2, 6] @ W1[6, 8] -> Relu -> @ W2[8, 4]; W1 has an awkward initializer name."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((6, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", AWKWARD], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "fc2.weight"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w1, AWKWARD), numpy_helper.from_array(w2, "fc2.weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model, w1, w2


def random_masks(shapes, density=0.4, seed=1):
    rng = np.random.default_rng(seed)
    return {name: rng.random(shape) < density for name, shape in shapes.items()}


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# ---------------------------------------------------------------------- files
def test_round_trip_keeps_awkward_names_and_values_exactly(tmp_path):
    names = [AWKWARD, "conv1.weight", "a:b/c.d", "__names__", "mask_0", "ünï/cödé", "x" * 300]
    masks = random_masks({name: (3, 2, i + 1) for i, name in enumerate(names)})
    path = save_masks(masks, tmp_path / "masks.npz")
    loaded = load_masks(path)
    assert list(loaded) == names
    for name in names:
        assert loaded[name].dtype == bool
        np.testing.assert_array_equal(loaded[name], masks[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.npz"]  # no temp file left


def test_save_replaces_atomically_and_refuses_a_missing_folder(tmp_path):
    path = tmp_path / "masks"  # no .npz suffix: written as given, not as masks.npz
    save_masks({"a": np.ones(3, bool)}, path)
    save_masks({"b": np.zeros(2, bool)}, path)
    assert list(load_masks(path)) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks"]
    with pytest.raises(UserError, match="does not exist"):
        save_masks({"a": np.ones(3, bool)}, tmp_path / "missing" / "m.npz")


def test_plain_npz_and_01_integers_are_accepted(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, **{"conv1.weight": np.array([[0, 1], [1, 1]], np.uint8), "fc.weight": np.array([True, False])})
    loaded = load_masks(path)
    assert loaded["conv1.weight"].dtype == bool
    np.testing.assert_array_equal(loaded["conv1.weight"], [[False, True], [True, True]])
    np.testing.assert_array_equal(loaded["fc.weight"], [True, False])


@pytest.mark.parametrize(
    "write, fragment",
    [
        (None, "does not exist"),
        (lambda p: p.write_text("not a zip"), "not a readable .npz"),
        (lambda p: p.write_bytes(b""), "not a readable .npz"),
        (lambda p: p.write_bytes(npy_bytes(np.ones(3, bool))), "single .npy array"),
        (lambda p: np.savez(p, w=np.array([0.0, 1.0], np.float32)), "float32 values"),
        (lambda p: np.savez(p, w=np.array([0, 2])), "integers other than 0 and 1"),
        (lambda p: np.savez(p, w=np.array([None, 1], dtype=object)), "not a readable .npz"),
        (lambda p: np.savez(p), "holds no masks"),
        (lambda p: np.savez(p, __names__=np.array(["a", "b"]), mask_0=np.ones(1, bool)), "damaged"),
    ],
)
def test_bad_mask_files_are_one_line_user_errors(tmp_path, write, fragment):
    path = tmp_path / "masks.npz"
    if write is not None:
        write(path)
    with pytest.raises(UserError) as info:
        load_masks(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------- model side
def test_masks_from_model_is_the_nonzero_pattern_and_skips_dense_weights():
    proto, w1, _ = matmul_model()
    w1[w1 < 0] = 0
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, AWKWARD))
    model = load_model(proto)
    masks = masks_from_model(model)
    assert list(masks) == [AWKWARD]  # fc2.weight has no zeros
    np.testing.assert_array_equal(masks[AWKWARD], w1 != 0)


def test_check_masks_names_the_first_problem():
    model = load_model(matmul_model()[0])
    with pytest.raises(UserError, match=r"mask 'nope' matches no weight of the model; its weights are e\.g\. .*fc2\.weight"):
        check_masks(model, {"nope": np.ones((6, 8), bool)})
    with pytest.raises(UserError, match=r"mask 'fc2.weight' has shape \[4, 8\] but the weight has \[8, 4\]"):
        check_masks(model, {"fc2.weight": np.ones((4, 8), bool), "zzz": np.ones(1, bool)})
    check_masks(model, {"fc2.weight": np.ones((8, 4), bool)})  # fits: no error


def test_apply_masks_zeros_exactly_the_masked_entries_of_a_copy(model_file):
    source = load_model(model_file("resnet_basic_block"))
    layers, _ = sparsifiable_layers(source, include_first=True, include_last=True, include_depthwise=True)
    before = {layer.weight: np.array(source.tensors()[layer.weight].values) for layer in layers}
    masks = {name: magnitude_mask(values, 0.6) for name, values in before.items()}
    work = source.copy()
    result = apply_masks(work, masks)
    tensors = work.tensors()
    for name, mask in masks.items():
        after = tensors[name].values
        np.testing.assert_array_equal(after[mask], before[name][mask])
        assert not after[~mask].any()
        assert result[name] == pytest.approx(1 - mask.mean())
        np.testing.assert_array_equal(source.tensors()[name].values, before[name])  # source untouched
    untouched = [t for t in work.constants() if t.name not in masks and t.values.dtype.kind == "f"]
    assert untouched and all(np.array_equal(t.values, source.tensors()[t.name].values) for t in untouched)


# ---------------------------------------------------------------------- CLI
def test_apply_masks_cli_writes_a_valid_masked_model(cli, model_file, tmp_path):
    proto, w1, w2 = matmul_model()
    path = model_file(proto, "init.onnx")
    before = sha256(path)
    masks = random_masks({AWKWARD: w1.shape})
    out = tmp_path / "ticket.onnx"
    result = cli("apply-masks", path, save_masks(masks, tmp_path / "masks.npz"), out)
    assert result.code == 0, result.err
    assert "applied 1 masks" in result.out and "deflated" in result.out
    assert f"{100 * (1 - masks[AWKWARD].mean()):.2f}%" in result.out
    assert sha256(path) == before
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    x = np.random.default_rng(2).standard_normal((2, 6)).astype(np.float32)
    expected = np.maximum(x @ (w1 * masks[AWKWARD]), 0) @ w2
    np.testing.assert_allclose(run_model(out, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.onnx", "masks.npz", "ticket.onnx"]


def test_all_true_masks_keep_the_outputs(cli, model_file, tmp_path):
    path = model_file("flatten_gemm")
    model = load_model(path)
    masks = {t.name: np.ones(t.values.shape, bool) for t in model.constants() if t.values.ndim >= 2}
    out = tmp_path / "same.onnx"
    assert cli("apply-masks", path, save_masks(masks, tmp_path / "m.npz"), out).code == 0
    feeds = {"input": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(out, feeds)[0], run_model(path, feeds)[0])
    runtime.make_session(str(out))


def test_mismatched_masks_exit_2_and_write_nothing(cli, model_file, tmp_path):
    path = model_file(matmul_model()[0], "init.onnx")
    out = tmp_path / "out.onnx"
    wrong_shape = save_masks({"fc2.weight": np.ones((4, 8), bool)}, tmp_path / "shape.npz")
    assert_one_line_error(cli("apply-masks", path, wrong_shape, out), "has shape [4, 8]")
    wrong_name = save_masks({"conv9.weight": np.ones((4, 8), bool)}, tmp_path / "name.npz")
    assert_one_line_error(cli("apply-masks", path, wrong_name, out), "matches no weight", "fc2.weight")
    assert_one_line_error(cli("apply-masks", path, tmp_path / "none.npz", out), "does not exist")
    assert_one_line_error(cli("apply-masks", path, wrong_name), "OUT")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.onnx", "name.npz", "shape.npz"]


def test_existing_output_needs_force(cli, model_file, tmp_path):
    path = model_file(matmul_model()[0], "init.onnx")
    masks = save_masks({"fc2.weight": np.zeros((8, 4), bool)}, tmp_path / "m.npz")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    assert_one_line_error(cli("apply-masks", path, masks, out), "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert cli("apply-masks", path, masks, out, "--force").code == 0
    weight = next(i for i in onnx.load(str(out)).graph.initializer if i.name == "fc2.weight")
    assert not numpy_helper.to_array(weight).any()
    assert cli("apply-masks", "--help").code == 0
