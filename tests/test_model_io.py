"""Loading (with every kind of bad file), atomic saving, external data."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxslim_cv import model_io, runtime
from onnxslim_cv.errors import UserError
from onnxslim_cv.model_io import StagedModel, load_model, parse_input_shapes, save_model
from onnxslim_cv.testing import models

from .conftest import run_model


def test_loads_a_path_and_a_proto_alike(model_file):
    path = model_file("conv_chain")
    from_path = load_model(path)
    from_proto = load_model(onnx.load(str(path)))
    assert from_path.source == str(path)
    assert [n.op for n in from_path.graph.nodes] == [n.op for n in from_proto.graph.nodes]


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        load_model(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        load_model(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UserError, match="not a valid ONNX file|not an ONNX model"):
        load_model(path)


def test_text_file(tmp_path):
    path = tmp_path / "readme.onnx"
    path.write_text("this is not a model\n")
    with pytest.raises(UserError, match="not a valid ONNX file|not an ONNX model|no IR version"):
        load_model(path)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_file(tmp_path, keep):
    data = models.resnet_basic_block().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(UserError):
        load_model(path)


def test_graph_the_checker_rejects(tmp_path):
    node = helper.make_node("Relu", ["undefined_tensor"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UserError, match="fails onnx.checker"):
        load_model(path)


def test_ir_version_onnxruntime_cannot_load(tmp_path):
    model = models.conv_chain()
    model.ir_version = runtime.max_ir_version() + 1
    if model.ir_version > onnx.IR_VERSION:
        pytest.skip("the installed onnx cannot write an IR version newer than onnxruntime loads")
    path = tmp_path / "new_ir.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UserError, match=f"IR version {model.ir_version}.*at most IR {runtime.max_ir_version()}"):
        load_model(path)


def test_opset_onnxruntime_cannot_load(tmp_path):
    opset = runtime.max_opset() + 1
    if opset > onnx.defs.onnx_opset_version():
        pytest.skip("the installed onnx knows no opset newer than onnxruntime supports")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = runtime.max_ir_version()
    path = tmp_path / "new_opset.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UserError, match=f"opset {opset}"):
        load_model(path)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    model = load_model(models.conv_chain())
    out = save_model(model, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    reloaded = onnx.load(str(out))
    onnx.checker.check_model(reloaded, full_check=True)
    assert reloaded.ir_version <= runtime.max_ir_version()


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", explode)
    with pytest.raises(OSError):
        save_model(load_model(models.conv_chain()), tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_invalid_model_is_never_written(tmp_path):
    model = models.conv_chain()
    model.graph.node[0].input[0] = "undefined_tensor"
    with pytest.raises(RuntimeError, match="invalid model"):
        save_model(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_staged_model_appears_only_on_commit(tmp_path):
    destination = tmp_path / "out.onnx"
    with StagedModel(load_model(models.conv_chain()), destination) as staged:
        assert staged.path.exists() and not destination.exists()
    assert list(tmp_path.iterdir()) == []  # discarded on leaving the block
    with StagedModel(load_model(models.conv_chain()), destination) as staged:
        staged.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_external_data_round_trip(tmp_path):
    proto = models.resnet_basic_block()
    out = save_model(load_model(proto), tmp_path / "big.onnx", external_data=True)
    data_file = tmp_path / "big.onnx.data"
    assert data_file.exists() and data_file.stat().st_size > out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    reloaded = load_model(out)
    feeds = models.sample_inputs(proto)
    np.testing.assert_allclose(run_model(out, feeds)[0], run_model(proto, feeds)[0], rtol=1e-5, atol=1e-6)
    assert model_io.file_size(out) == out.stat().st_size + data_file.stat().st_size
    assert len(list(reloaded.constants())) > 0


def test_models_over_the_protobuf_limit_go_to_external_data(tmp_path, monkeypatch):
    """Models over 2 GB cannot be serialized; the threshold decides (lowered here to test it)."""
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    out = save_model(load_model(models.resnet_basic_block()), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").exists()
    onnx.checker.check_model(str(out))
    runtime.make_session(str(out))


def test_loading_external_data_whose_side_file_is_missing(tmp_path):
    out = save_model(load_model(models.conv_chain()), tmp_path / "m.onnx", external_data=True)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(UserError, match="external data"):
        load_model(out)


def test_output_path_checks(tmp_path, model_file):
    source = model_file("conv_chain")
    with pytest.raises(UserError, match="is the input file"):
        model_io.check_output_path(source, input_path=source)
    assert model_io.check_output_path(source, input_path=source, force=True) == source
    with pytest.raises(UserError, match="is a folder"):
        model_io.check_output_path(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        model_io.check_output_path(tmp_path / "missing" / "out.onnx")
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        model_io.check_output_path(not_a_folder / "out.onnx")


def test_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            pytest.skip("running with privileges that ignore folder permissions")
        except OSError:
            pass
        with pytest.raises(UserError, match="not writable"):
            model_io.check_output_path(locked / "out.onnx")
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_unwritable_output_folder_even_for_root():
    with pytest.raises(UserError, match="not writable"):
        model_io.check_output_path("/proc/self/out.onnx")


def test_parse_input_shapes():
    assert parse_input_shapes(["x:1x3x224x224"], ["x", "y"]) == {"x": (1, 3, 224, 224)}
    assert parse_input_shapes(["1x3x32x32"], ["only"]) == {"only": (1, 3, 32, 32)}
    assert parse_input_shapes(["name:with:colons:1,3,8,8"], ["name:with:colons"]) == {"name:with:colons": (1, 3, 8, 8)}
    with pytest.raises(UserError, match="has no input name"):
        parse_input_shapes(["1x3x32x32"], ["a", "b"])
    with pytest.raises(UserError, match="expected NAME"):
        parse_input_shapes(["x:1xax3"], ["x"])


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    from onnxslim_cv.masks import save_masks
    from onnxslim_cv.report import write_json

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = plain.stat().st_mode & 0o777  # 0o666 less the umask; mkstemp alone gives 0o600
    write_json({"a": 1}, tmp_path / "report.json")
    save_masks({"w": np.ones(3, bool)}, tmp_path / "masks.npz")
    model_io.write_atomically(tmp_path / "raw.bin", lambda handle: handle.write(b"\0"), binary=True)
    save_model(load_model(models.conv_chain()), tmp_path / "model.onnx")
    for name in ("report.json", "masks.npz", "raw.bin", "model.onnx"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.npz", "model.onnx", "plain.txt", "raw.bin", "report.json"]


def test_a_failed_atomic_write_leaves_nothing(tmp_path):
    def fail(handle):
        handle.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        model_io.write_atomically(tmp_path / "out.json", fail)
    assert list(tmp_path.iterdir()) == []
