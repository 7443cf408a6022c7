"""What a model costs to store and download, and sparse storage of pruned weights.

Unstructured zeros do not make dense runtimes (onnxruntime CPU, TensorRT without 2:4 kernels)
any faster; what they buy is a smaller download. Two ways to cash that in:

- :func:`deflate_size`: the zip/gzip size of the file, which is what most model stores and
  HTTP transfers actually pay; runs of zeros compress well.
- :func:`to_sparse_initializers`: ONNX ``sparse_initializer`` (COO) entries, smaller on disk
  even uncompressed. onnxruntime densifies them at load, so memory and speed are unchanged.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Iterable, List, Optional, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .ir import Model

DEFLATE_LEVEL = 6  # zlib's and gzip's default: what a plain zip/gzip of the file costs
_CHUNK = 1 << 24
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
# sparse_initializer entered the IR in version 6; older stamps would mislabel the file
_SPARSE_MIN_IR = 6


def deflate_size(model: Union[Model, onnx.ModelProto, str, os.PathLike]) -> int:
    """Bytes of the zlib (level 6) compressed serialized model: its zip/gzip download size.

    Sparse weights compress well, but dense runtimes do not run them faster: this is the
    storage/transfer saving, not a speed-up. A path counts its external data file too; a
    :class:`Model` is measured as it would be saved (sparse storage included).
    """
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        files = [path] + [p for p in [path.parent / (path.name + ".data")] if p.exists()]
        compressor = zlib.compressobj(DEFLATE_LEVEL)
        total = 0
        for file in files:
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(_CHUNK), b""):
                    total += len(compressor.compress(chunk))
        return total + len(compressor.flush())
    if isinstance(model, Model):
        proto = model.to_proto()
        storage = model.annotations.get("sparse_storage")
        if storage:
            to_sparse_initializers(proto, storage if isinstance(storage, (list, tuple, set)) else None)
    else:
        proto = model
    return len(zlib.compress(proto.SerializeToString(), DEFLATE_LEVEL))


def _sparse_from_dense(init: TensorProto) -> Optional[onnx.SparseTensorProto]:
    """COO form of a float initializer if it serializes smaller, else None."""
    if init.data_type not in _FLOAT_TYPES or init.data_location == TensorProto.EXTERNAL:
        return None
    dense = numpy_helper.to_array(init)
    flat = dense.reshape(-1)
    if flat.size == 0:
        return None
    nonzero = np.flatnonzero(flat)
    # values (itemsize) + one int64 linear index per non-zero: pays only below ~1/3 density
    if nonzero.size * (flat.itemsize + 8) >= flat.size * flat.itemsize:
        return None
    values = numpy_helper.from_array(flat[nonzero], init.name)
    # onnx.checker requires INT64 indices; linear (1-D) indices are the compact form
    indices = numpy_helper.from_array(nonzero.astype(np.int64))
    sparse = helper.make_sparse_tensor(values, indices, list(init.dims))
    return sparse if sparse.ByteSize() < init.ByteSize() else None


def to_sparse_initializers(
    proto: onnx.ModelProto, names: Optional[Iterable[str]] = None, min_saving: float = 0.0
) -> List[str]:
    """In place: move float initializers to ``graph.sparse_initializer`` where that is smaller.

    ``names`` limits the candidates; ``min_saving`` is the fraction of a tensor's bytes the
    sparse form must save (0: any saving). Returns the names converted. onnx.checker (non-full)
    and onnxruntime accept the result; onnx shape inference does not see sparse initializers,
    so only do this to a proto about to be written (see ``StagedModel``).
    """
    graph = proto.graph
    wanted = None if names is None else set(names)
    graph_inputs = {value.name for value in graph.input}  # overridable defaults stay dense
    kept, converted = [], []
    for init in graph.initializer:
        sparse = None
        if (wanted is None or init.name in wanted) and init.name not in graph_inputs:
            sparse = _sparse_from_dense(init)
            if sparse is not None and sparse.ByteSize() > (1.0 - min_saving) * init.ByteSize():
                sparse = None
        if sparse is None:
            kept.append(init)
        else:
            graph.sparse_initializer.append(sparse)
            converted.append(init.name)
    if converted:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        proto.ir_version = max(proto.ir_version, _SPARSE_MIN_IR)
    return converted


def densify_sparse_initializers(graph: onnx.GraphProto) -> List[str]:
    """In place: ``graph.sparse_initializer`` entries become dense initializers.

    onnx-graphsurgeon ignores sparse initializers (their consumers would see undefined
    inputs), and every pass works on dense weights. Returns the names densified.
    """
    names = []
    for sparse in graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values).reshape(-1)
        dims = tuple(int(d) for d in sparse.dims)
        indices = numpy_helper.to_array(sparse.indices) if sparse.HasField("indices") else np.zeros(0, np.int64)
        dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
        if indices.ndim == 2:  # [nnz, rank] coordinates
            indices = np.ravel_multi_index(tuple(indices.T), dims) if indices.size else indices.reshape(-1)
        dense[indices.reshape(-1).astype(np.int64)] = values
        graph.initializer.append(numpy_helper.from_array(dense.reshape(dims), sparse.values.name))
        names.append(sparse.values.name)
    del graph.sparse_initializer[:]
    return names
