"""Weight sparsity: which layers may be sparsified, their weights as matrices, and masks.

Every weight-sparsity tool (the ``sparsify`` pass, the sensitivity analysis, mask export and
``apply-masks``) sees a layer's weight the same way: a matrix ``[rows, reduction]`` whose
columns are the reduction (input-channel) dimension, ordered so that *consecutive columns are
consecutive input channels at one kernel position* (``kh, kw, cin``). That is the layout
NVIDIA's 2:4 sparse tensor cores prune along, so an N:M mask is simply "N kept in every M
consecutive columns", and it is also the layout of the layer Hessian ``X^T X`` the
reconstruction uses.

- Conv ``[Cout, Cin/g, kh, kw]`` -> ``[Cout, kh*kw*Cin/g]`` (per group: rows of group g);
- ConvTranspose ``[Cin, Cout/g, kh, kw]`` -> ``[Cout/g*kh*kw*g, Cin/g]`` (each output tap is a
  linear map of one input pixel's channels);
- Gemm ``B`` (``transB`` honoured) and MatMul ``[K, N]`` -> ``[N, K]``.

Masks are boolean arrays of the *weight's own shape* (True = kept), keyed by initializer
name, so they survive any layout question and can be applied to another model of the same
architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .errors import UserError
from .ir import Model

SPARSIFIABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class SparseLayer:
    """A layer whose weight may be sparsified."""

    node: str
    op: str
    weight: str  # initializer name (the mask key)
    shape: Tuple[int, ...]
    groups: int = 1
    trans_b: bool = False
    depthwise: bool = False
    first: bool = False
    last: bool = False
    macs: int = 0
    tags: List[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))

    @property
    def reduction(self) -> int:
        """Columns of :func:`as_matrix` (the dimension N:M patterns run along)."""
        if self.op == "Conv":
            return int(np.prod(self.shape[1:]))
        if self.op == "ConvTranspose":
            return int(self.shape[0]) // self.groups
        if self.op == "Gemm":
            return int(self.shape[1] if self.trans_b else self.shape[0])
        return int(self.shape[0])

    @property
    def channels_in(self) -> int:
        """Input channels per group (the run of consecutive columns an N:M group lives in)."""
        if self.op == "Conv":
            return int(self.shape[1])
        return self.reduction


def _weight_constant(node: gs.Node) -> Optional[gs.Constant]:
    if len(node.inputs) < 2:
        return None
    tensor = node.inputs[1]
    if not isinstance(tensor, gs.Constant):
        return None
    values = np.asarray(tensor.values)
    if values.dtype.kind != "f":
        return None
    return tensor


def _compute_descendants(graph: gs.Graph, starts: Sequence[gs.Node], wanted: set) -> set:
    """Names of wanted nodes reachable from ``starts`` (excluding the starts themselves)."""
    seen: set = set()
    found: set = set()
    stack = [t for node in starts for t in node.outputs]
    while stack:
        tensor = stack.pop()
        for consumer in tensor.outputs:
            if id(consumer) in seen:
                continue
            seen.add(id(consumer))
            if consumer.name in wanted:
                found.add(consumer.name)
            stack.extend(consumer.outputs)
    return found


def sparsifiable_layers(
    model: Model,
    *,
    include_depthwise: bool = False,
    include_first: bool = False,
    include_last: bool = False,
) -> Tuple[List[SparseLayer], Dict[str, str]]:
    """The layers to sparsify, in graph order, and the reason each other candidate is left alone.

    First layers (no other weight layer upstream: they see the raw image, have few weights and
    matter most) and last layers (no weight layer downstream: the classifier or box head) are
    left dense by default, as are depthwise convs (9 weights per channel: each zero costs
    far more accuracy than it saves). Weights shared by several nodes are left dense too.
    """
    from .stats import layer_macs

    graph = model.graph
    graph.toposort()
    candidates = [n for n in graph.nodes if n.op in SPARSIFIABLE and _weight_constant(n) is not None]
    names = {n.name for n in candidates}
    uses: Dict[str, int] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                uses[tensor.name] = uses.get(tensor.name, 0) + 1
    has_upstream = set()
    for node in candidates:
        has_upstream |= _compute_descendants(graph, [node], names)
    layers: List[SparseLayer] = []
    skipped: Dict[str, str] = {}
    for node in candidates:
        weight = _weight_constant(node)
        values = np.asarray(weight.values)
        groups = int(node.attrs.get("group", 1)) if node.op in ("Conv", "ConvTranspose") else 1
        layer = SparseLayer(
            node=node.name,
            op=node.op,
            weight=weight.name,
            shape=tuple(int(d) for d in values.shape),
            groups=groups,
            trans_b=bool(node.attrs.get("transB", 0)) if node.op == "Gemm" else False,
            macs=int(layer_macs(node) or 0),
        )
        if node.op == "Conv":
            layer.depthwise = groups > 1 and values.shape[1] == 1
        elif node.op == "ConvTranspose":
            layer.depthwise = groups > 1 and values.shape[0] == groups
        layer.first = node.name not in has_upstream
        layer.last = not _compute_descendants(graph, [node], names)
        if node.op in ("Gemm", "MatMul") and values.ndim != 2:
            skipped[node.name] = "weight is not a matrix"
        elif node.op == "Gemm" and node.attrs.get("transA", 0):
            skipped[node.name] = "Gemm with transA"
        elif node.op in ("Conv", "ConvTranspose") and values.ndim < 3:
            skipped[node.name] = "conv weight of unexpected rank"
        elif uses.get(weight.name, 0) > 1:
            skipped[node.name] = f"weight {weight.name} is shared by several nodes"
        elif layer.depthwise and not include_depthwise:
            skipped[node.name] = "depthwise (include with --sparsify-include-depthwise)"
        elif layer.first and not include_first:
            skipped[node.name] = "first layer (include with --sparsify-include-first)"
        elif layer.last and not include_last:
            skipped[node.name] = "last layer (include with --sparsify-include-last)"
        else:
            layers.append(layer)
    return layers, skipped


# ---------------------------------------------------------------------------- layouts
def as_matrix(layer: SparseLayer, weight: np.ndarray) -> np.ndarray:
    """``weight`` as ``[rows, reduction]`` (see the module docstring); a copy."""
    w = np.asarray(weight)
    if layer.op == "Conv":
        return np.ascontiguousarray(np.moveaxis(w, 1, -1).reshape(w.shape[0], -1))
    if layer.op == "ConvTranspose":
        g = layer.groups
        cin_g = w.shape[0] // g
        # [g, cin_g, cout_g, *k] -> [g, cout_g, *k, cin_g] -> rows (g, cout_g, k), columns cin_g
        grouped = w.reshape(g, cin_g, *w.shape[1:])
        moved = np.moveaxis(grouped, 1, -1)
        return np.ascontiguousarray(moved.reshape(-1, cin_g))
    if layer.op == "Gemm":
        return np.ascontiguousarray(w if layer.trans_b else w.T)
    return np.ascontiguousarray(w.T)


def from_matrix(layer: SparseLayer, matrix: np.ndarray) -> np.ndarray:
    """Inverse of :func:`as_matrix`."""
    shape = layer.shape
    if layer.op == "Conv":
        moved = matrix.reshape(shape[0], *shape[2:], shape[1])
        return np.ascontiguousarray(np.moveaxis(moved, -1, 1))
    if layer.op == "ConvTranspose":
        g = layer.groups
        cin_g = shape[0] // g
        moved = matrix.reshape(g, *shape[1:], cin_g)
        return np.ascontiguousarray(np.moveaxis(moved, -1, 1).reshape(shape))
    if layer.op == "Gemm":
        return np.ascontiguousarray(matrix if layer.trans_b else matrix.T)
    return np.ascontiguousarray(matrix.T)


def group_rows(layer: SparseLayer) -> List[np.ndarray]:
    """Row indices of :func:`as_matrix` per conv group (one entry for ungrouped layers).

    Rows of different groups see different input channels, so each group has its own Hessian.
    """
    rows = int(np.prod(layer.shape)) // layer.reduction
    if layer.groups == 1:
        return [np.arange(rows)]
    per = rows // layer.groups
    return [np.arange(g * per, (g + 1) * per) for g in range(layer.groups)]


# ---------------------------------------------------------------------------- masks
def magnitude_mask(values: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask zeroing exactly ``round(sparsity * size)`` smallest-|w| entries (ties by position)."""
    values = np.asarray(values)
    zeros = int(round(float(sparsity) * values.size))
    keep = np.ones(values.size, dtype=bool)
    if zeros > 0:
        order = np.argsort(np.abs(values).reshape(-1), kind="stable")
        keep[order[:zeros]] = False
    return keep.reshape(values.shape)


def parse_nm(text) -> Tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: N kept in every M consecutive input-channel weights."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        n, m = text
    else:
        parts = str(text).strip().split(":")
        if len(parts) != 2:
            raise ValueError(f"N:M pattern {text!r}: expected two integers like 2:4")
        try:
            n, m = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"N:M pattern {text!r}: expected two integers like 2:4")
    if not (0 < n < m):
        raise ValueError(f"N:M pattern {text!r}: need 0 < N < M (N weights kept in every M)")
    return int(n), int(m)


def nm_eligible(layer: SparseLayer, m: int) -> Optional[str]:
    """None if an N:M pattern along input channels fits the layer, else why not."""
    if layer.channels_in % m:
        return f"{layer.channels_in} input channels per kernel position is not a multiple of {m}"
    return None


def nm_mask_matrix(matrix: np.ndarray, n: int, m: int, scores: Optional[np.ndarray] = None) -> np.ndarray:
    """Keep-mask of ``matrix`` (``[rows, reduction]``): the N highest scores of every M columns."""
    scores = np.abs(matrix) if scores is None else scores
    rows, cols = matrix.shape
    blocks = scores.reshape(rows, cols // m, m)
    order = np.argsort(-blocks, axis=-1, kind="stable")
    keep = np.zeros_like(blocks, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return keep.reshape(rows, cols)


def nm_mask(layer: SparseLayer, weight: np.ndarray, n: int, m: int) -> np.ndarray:
    """Magnitude N:M keep-mask in the weight's own shape."""
    keep = nm_mask_matrix(as_matrix(layer, weight), n, m)
    return from_matrix(layer, keep)


def holds_nm(layer: SparseLayer, weight: np.ndarray, n: int, m: int) -> bool:
    """True when every M consecutive input-channel weights have at most N non-zeros."""
    matrix = as_matrix(layer, weight)
    rows, cols = matrix.shape
    if cols % m:
        return False
    return bool(((matrix.reshape(rows, cols // m, m) != 0).sum(axis=-1) <= n).all())


def global_sparsities(
    layers: Sequence[SparseLayer], weights: Dict[str, np.ndarray], sparsity: float, *, normalize: bool = False
) -> Dict[str, float]:
    """Per-layer sparsity from one magnitude threshold over all layers' weights.

    ``normalize`` divides each layer's magnitudes by its RMS first, so layers with small
    weights (often the wide late ones) are not emptied just for their scale.
    """
    scores = []
    for layer in layers:
        values = np.abs(np.asarray(weights[layer.weight], dtype=np.float64)).reshape(-1)
        if normalize:
            rms = float(np.sqrt(np.mean(np.square(values)))) or 1.0
            values = values / rms
        scores.append(values)
    everything = np.concatenate(scores) if scores else np.zeros(0)
    zeros = int(round(sparsity * everything.size))
    if zeros == 0:
        return {layer.node: 0.0 for layer in layers}
    order = np.argsort(everything, kind="stable")
    pruned = np.zeros(everything.size, dtype=bool)
    pruned[order[:zeros]] = True
    result: Dict[str, float] = {}
    start = 0
    for layer, values in zip(layers, scores):
        result[layer.node] = float(pruned[start:start + values.size].mean()) if values.size else 0.0
        start += values.size
    return result


def sparsity_of(values: np.ndarray) -> float:
    values = np.asarray(values)
    return float((values == 0).mean()) if values.size else 0.0


def check_sparsity(value) -> float:
    """Parser for sparsity fractions: a number in [0, 1)."""
    number = float(value)
    if math.isnan(number) or not 0.0 <= number < 1.0:
        raise ValueError("sparsity must be in [0, 1)")
    return number


def layer_weights(model: Model, layers: Sequence[SparseLayer]) -> Dict[str, np.ndarray]:
    tensors = model.tensors()
    return {layer.weight: np.asarray(tensors[layer.weight].values) for layer in layers}


def find_layer(layers: Sequence[SparseLayer], name: str) -> SparseLayer:
    for layer in layers:
        if layer.node == name or layer.weight == name:
            return layer
    raise UserError(f"no sparsifiable layer named {name!r}")
