"""Storage of sparse weights: deflate sizes, sparse initializers on save, dense again on load."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxslim_cv import runtime
from onnxslim_cv.ir import normalize_proto
from onnxslim_cv.model_io import load_model, save_model
from onnxslim_cv.sparsity import magnitude_mask
from onnxslim_cv.storage import deflate_size, to_sparse_initializers
from onnxslim_cv.testing import models

from .conftest import run_model


def with_sparsity(proto, sparsities):
    """Magnitude-prune the named initializers of ``proto`` in place."""
    for init in proto.graph.initializer:
        if init.name in sparsities:
            values = numpy_helper.to_array(init)
            pruned = np.where(magnitude_mask(values, sparsities[init.name]), values, 0).astype(values.dtype)
            init.CopyFrom(numpy_helper.from_array(pruned, init.name))
    return proto


def dense_weights(proto):
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def conv_chain_mixed():
    """conv1 dense, conv2 90% zeros (worth storing sparse), conv3 50% zeros (not worth it)."""
    return with_sparsity(models.build("conv_chain"), {"conv2.weight": 0.9, "conv3.weight": 0.5})


FEEDS = {"input": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}


# ---------------------------------------------------------------------- deflate
def test_deflate_size_shrinks_with_sparsity_and_matches_the_file(tmp_path):
    dense = models.build("resnet_basic_block")
    weights = [i.name for i in dense.graph.initializer if len(i.dims) >= 2]
    sparse = with_sparsity(models.build("resnet_basic_block"), {name: 0.7 for name in weights})
    assert dense.ByteSize() == pytest.approx(sparse.ByteSize(), rel=0.01)  # same raw size...
    assert deflate_size(sparse) < 0.7 * deflate_size(dense)  # ...much smaller download
    path = tmp_path / "sparse.onnx"
    onnx.save(sparse, str(path))
    assert deflate_size(path) == deflate_size(str(path)) == deflate_size(sparse)
    assert deflate_size(load_model(path)) < path.stat().st_size


# ---------------------------------------------------------------------- sparse initializers
def test_only_initializers_that_shrink_become_sparse():
    proto = conv_chain_mixed()
    proto.ir_version = 4  # sparse_initializer is IR 6: converting must raise the stamp
    dense = dense_weights(proto)
    size = proto.ByteSize()
    assert to_sparse_initializers(proto) == ["conv2.weight"]
    assert proto.ir_version == 6
    assert [s.values.name for s in proto.graph.sparse_initializer] == ["conv2.weight"]
    assert "conv2.weight" not in {i.name for i in proto.graph.initializer}
    assert proto.ByteSize() < size - 0.5 * dense["conv2.weight"].nbytes
    indices = proto.graph.sparse_initializer[0].indices
    assert indices.data_type == onnx.TensorProto.INT64 and list(indices.dims) == [np.count_nonzero(dense["conv2.weight"])]
    onnx.checker.check_model(proto)


def test_names_and_min_saving_limit_the_conversion():
    proto = conv_chain_mixed()
    assert to_sparse_initializers(proto, names=["conv1.weight", "conv3.weight"]) == []
    assert to_sparse_initializers(proto, min_saving=0.9) == []  # 90% zeros save ~70%, not 90%
    assert to_sparse_initializers(proto, names=["conv2.weight"], min_saving=0.5) == ["conv2.weight"]


def test_sparse_file_runs_in_onnxruntime_and_loads_back_dense(tmp_path):
    proto = conv_chain_mixed()
    dense = dense_weights(proto)
    dense_path, sparse_path = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    onnx.save(proto, str(dense_path))
    to_sparse_initializers(proto)
    onnx.save(proto, str(sparse_path))
    assert sparse_path.stat().st_size < dense_path.stat().st_size
    onnx.checker.check_model(onnx.load(str(sparse_path)))
    np.testing.assert_array_equal(run_model(sparse_path, FEEDS)[0], run_model(dense_path, FEEDS)[0])
    model = load_model(sparse_path)
    for name, values in dense.items():
        np.testing.assert_array_equal(model.tensors()[name].values, values)
    assert model.output_specs()[0].shape == (1, 16, 16, 16)  # shape inference saw dense weights


def test_coordinate_indices_are_densified_too():
    proto = models.build("conv_chain")
    init = next(i for i in proto.graph.initializer if i.name == "conv1.weight")
    values = numpy_helper.to_array(init) * (np.arange(216).reshape(8, 3, 3, 3) % 5 == 0)
    coords = np.argwhere(values != 0).astype(np.int64)  # [nnz, rank] form
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(values[values != 0], "conv1.weight"), numpy_helper.from_array(coords), list(values.shape)
    )
    proto.graph.initializer.remove(init)
    proto.graph.sparse_initializer.append(sparse)
    normalize_proto(proto)
    assert len(proto.graph.sparse_initializer) == 0
    densified = next(i for i in proto.graph.initializer if i.name == "conv1.weight")
    np.testing.assert_array_equal(numpy_helper.to_array(densified), values)


def test_sparse_storage_annotation_applies_at_save_time_only(tmp_path):
    model = load_model(with_sparsity(models.build("conv_chain"), {"conv2.weight": 0.9, "conv3.weight": 0.9}))
    dense_path = save_model(model, tmp_path / "dense.onnx")
    model.annotations["sparse_storage"] = True
    sparse_path = save_model(model, tmp_path / "sparse.onnx")
    written = onnx.load(str(sparse_path))
    assert sorted(s.values.name for s in written.graph.sparse_initializer) == ["conv2.weight", "conv3.weight"]
    assert 6 <= written.ir_version <= runtime.max_ir_version()
    assert sparse_path.stat().st_size < 0.8 * dense_path.stat().st_size
    onnx.checker.check_model(written)
    np.testing.assert_array_equal(run_model(sparse_path, FEEDS)[0], run_model(dense_path, FEEDS)[0])
    assert all(isinstance(t.values, np.ndarray) for t in model.constants())  # in-memory model stays dense
    assert not model.to_proto().graph.sparse_initializer
    model.annotations["sparse_storage"] = ["conv3.weight"]  # a list limits the conversion
    limited = onnx.load(str(save_model(model, tmp_path / "limited.onnx")))
    assert [s.values.name for s in limited.graph.sparse_initializer] == ["conv3.weight"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.onnx", "limited.onnx", "sparse.onnx"]


# ---------------------------------------------------------------------- inspect
def test_inspect_shows_the_deflate_size(cli, model_file):
    path = model_file(with_sparsity(models.build("conv_chain"), {"conv3.weight": 0.8}))
    data = json.loads(cli("inspect", path, "--json").out)
    assert data["deflate_bytes"] == deflate_size(path) < data["size_bytes"]
    text = cli("inspect", path, "--no-layers").out
    assert "deflated" in text.splitlines()[1]
