"""Model statistics: parameters, MACs per layer, op histogram, weight sparsity, size.

MACs count the multiply-accumulates of the layers that dominate CV inference (Conv,
ConvTranspose, Gemm, MatMul); element-wise ops, pooling and normalisation are a rounding
error next to them and are left out, as in most papers' tables. An unknown batch dim counts
as 1; any other unknown dim makes that layer's MACs unknown (``--input-shape`` fixes it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .ir import Model

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_PARAM_KINDS = ("f", "c")


def _is_parameter(tensor: gs.Constant) -> bool:
    """Float tensors, and the integer weights of quantized models (inputs 0 of DequantizeLinear).

    Other integer initializers are shape arithmetic, indices and zero points.
    """
    kind = np.dtype(tensor.values.dtype).kind
    if kind in _PARAM_KINDS:
        return True
    return any(node.op == "DequantizeLinear" and node.inputs[0] is tensor for node in tensor.outputs)


@dataclass
class LayerStats:
    name: str
    op_type: str
    params: int
    macs: Optional[int]
    output_shape: Optional[List[object]]
    weight_sparsity: Optional[float]


@dataclass
class ModelStats:
    params: int
    macs: Optional[int]
    """Total MACs, None when a layer's shape is unknown (see ``macs_known``)."""
    macs_known: int
    """MACs of the layers whose shapes are known (a lower bound when ``macs`` is None)."""
    size_bytes: int
    num_nodes: int
    op_histogram: Dict[str, int]
    weight_sparsity: float
    ir_version: int
    opset: int
    inputs: List[Dict[str, object]]
    outputs: List[Dict[str, object]]
    layers: List[LayerStats] = field(default_factory=list)

    def to_dict(self, *, layers: bool = True) -> Dict[str, object]:
        data = asdict(self)
        if not layers:
            data.pop("layers")
        return data


def _numel(shape: Optional[Sequence[object]], *, batch_axis: bool = True) -> Optional[int]:
    if shape is None:
        return None
    total = 1
    for axis, dim in enumerate(shape):
        if isinstance(dim, (int, np.integer)) and dim >= 0:
            total *= int(dim)
        elif axis == 0 and batch_axis:
            continue  # unknown batch counts as 1
        else:
            return None
    return total


def _weight(node: gs.Node, index: int) -> Optional[np.ndarray]:
    if len(node.inputs) > index and isinstance(node.inputs[index], gs.Constant):
        return node.inputs[index].values
    return None


def _dim(shape, axis) -> Optional[int]:
    if shape is None or len(shape) <= abs(axis) - (1 if axis < 0 else 0):
        return None
    dim = shape[axis]
    return int(dim) if isinstance(dim, (int, np.integer)) and dim >= 0 else None


def layer_macs(node: gs.Node) -> Optional[int]:
    """MACs of one weight layer from its tensor shapes, or None if a shape is unknown."""
    op = node.op
    if op == "Conv":
        weight_shape = node.inputs[1].shape
        out = _numel(node.outputs[0].shape)
        if out is None or weight_shape is None:
            return None
        per_output = _numel(weight_shape[1:], batch_axis=False)
        return None if per_output is None else out * per_output
    if op == "ConvTranspose":
        weight_shape = node.inputs[1].shape
        inp = _numel(node.inputs[0].shape)
        if inp is None or weight_shape is None:
            return None
        # weight is [C_in, C_out/group, k...]: each input element feeds C_out/group * k outputs
        per_input = _numel(weight_shape[1:], batch_axis=False)
        return None if per_input is None else inp * per_input
    if op == "Gemm":
        out = _numel(node.outputs[0].shape)
        a_shape = node.inputs[0].shape
        if out is None or a_shape is None or len(a_shape) != 2:
            return None
        k = _dim(a_shape, 0 if node.attrs.get("transA", 0) else 1)
        return None if k is None else out * k
    if op == "MatMul":
        out = _numel(node.outputs[0].shape)
        a_shape = node.inputs[0].shape
        if out is None or a_shape is None or len(a_shape) == 0:
            return None
        k = _dim(a_shape, -1)
        return None if k is None else out * k
    return None


def model_stats(model: Model, *, size_bytes: Optional[int] = None, refresh_shapes: bool = False) -> ModelStats:
    """Statistics of a model; ``size_bytes`` defaults to the serialized size."""
    if refresh_shapes:
        model.infer_shapes(reset=False)
    graph = model.graph
    params = 0
    zeros = 0
    weight_elements = 0
    for tensor in model.constants():
        if _is_parameter(tensor):
            params += int(tensor.values.size)

    unsized = [
        tensor
        for node in graph.nodes
        if node.op in WEIGHT_OPS and layer_macs(node) is None
        for tensor in (node.inputs[0], node.outputs[0])
        if isinstance(tensor, gs.Variable)
    ]
    if unsized:
        model.probe_shapes_with_runtime(unsized)

    layers: List[LayerStats] = []
    macs_total: Optional[int] = 0
    macs_known = 0
    for node in graph.nodes:
        if node.op not in WEIGHT_OPS:
            continue
        layer_params = sum(
            int(t.values.size) for t in node.inputs if isinstance(t, gs.Constant) and t.values.dtype.kind in _PARAM_KINDS
        )
        weight = _weight(node, 1)
        if weight is None and node.op == "MatMul":
            weight = _weight(node, 0)
        sparsity = None
        if weight is not None and weight.dtype.kind in _PARAM_KINDS and weight.size:
            nz = int(np.count_nonzero(weight))
            sparsity = 1.0 - nz / weight.size
            zeros += weight.size - nz
            weight_elements += weight.size
        macs = layer_macs(node)
        if macs is None:
            macs_total = None
        else:
            macs_known += macs
            if macs_total is not None:
                macs_total += macs
        out_shape = list(node.outputs[0].shape) if node.outputs and node.outputs[0].shape is not None else None
        layers.append(LayerStats(node.name, node.op, layer_params, macs, out_shape, sparsity))

    if size_bytes is None:
        size_bytes = model.estimated_size()
    return ModelStats(
        params=params,
        macs=macs_total,
        macs_known=macs_known,
        size_bytes=int(size_bytes),
        num_nodes=len(graph.nodes),
        op_histogram=dict(sorted(Counter(n.op for n in graph.nodes).items(), key=lambda kv: (-kv[1], kv[0]))),
        weight_sparsity=(zeros / weight_elements) if weight_elements else 0.0,
        ir_version=model.ir_version,
        opset=model.opset,
        inputs=[{"name": s.name, "shape": s.shape_str(), "dtype": str(s.dtype)} for s in model.input_specs()],
        outputs=[{"name": s.name, "shape": s.shape_str(), "dtype": str(s.dtype)} for s in model.output_specs()],
        layers=layers,
    )
