"""Cross-layer equalization (CLE) of consecutive weight layers, ahead of int8 quantization.

Nagel, van Baalen, Blankevoort and Welling, "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019, sec. 4.1. When ``f`` is positively homogeneous
(``f(s x) = s f(x)`` for ``s > 0``: ReLU, LeakyReLU, PReLU, max/average pooling),

    W2 f(W1 x + b1) = (W2 S) f(S^-1 W1 x + S^-1 b1)        with S = diag(s), s > 0,

so the output channels of layer 1 and the matching input channels of layer 2 can be rescaled
without changing the fp32 function. Exported networks often have per-channel weight ranges
spread over orders of magnitude (BN folding multiplies each filter by its own gamma/sigma),
which wastes int8 levels on per-tensor grids. Choosing (their eq. 7-8)

    s_i = sqrt(r1_i / r2_i),  r1_i = max|W1[i, ...]|,  r2_i = max|W2[:, i, ...]|

gives both layers the same range sqrt(r1_i r2_i) on channel i, the optimum of their
per-channel precision objective. For chains (Conv -> depthwise -> Conv, the MobileNet
block) the middle layer belongs to two pairs whose scales interact, so pairs are equalized
one after the other in sweeps until no scale changes more than ``tolerance`` (their iterative
scheme for multi-layer equalization).

How pairs are found: direct pattern matching on the graph-surgeon graph, not
:mod:`onnxslim_cv.depgraph`. The dependency graph answers a pruning question ("which channels
must disappear together"), so it merges a depthwise conv's input and output channels and both
sides of a residual Add into one group; CLE needs every Conv -> Conv edge on its own, together
with the exact ops on the way (only positively homogeneous ones are allowed, and which ones is
not recorded there). Walking the single-reader chain after each Conv answers that directly
and needs no shape inference.

Skipped (reason reported per first-layer node): tensors with several readers or that are
graph outputs (another reader would see the rescaled values), ops that are not positively
homogeneous (``Clip(0,6)`` = ReLU6, HardSwish, Sigmoid, Add...), grouped but not depthwise
convs, non-constant weights, and Gemm second layers that are not the plain
``Flatten(axis=1) -> Gemm(transA=0, constant B)`` form.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import onnx_graphsurgeon as gs

from .graph_utils import name_nodes
from .graph_utils import is_graph_output, replace_constant_values
from .ir import Model

# Per-channel ops that commute with a positive per-channel scale, f(s x) = s f(x).
_HOMOGENEOUS_ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "PRelu", "Identity"})
_HOMOGENEOUS_POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"})
# Ops the walk from one layer to the next understands (Clip only with bounds 0 / infinite).
_BETWEEN_OPS = _HOMOGENEOUS_ACTIVATIONS | _HOMOGENEOUS_POOLS | {"Clip", "Flatten"}
# A channel whose range is below this fraction of the layer's largest range is treated as dead
# (s = 1): equalizing it would divide its bias by a tiny scale and blow up the activation range.
_DEAD_CHANNEL_FRACTION = 1e-6


@dataclass
class EqualizedPair:
    """One equalized pair; ``range_ratio_*`` is max/min of the first layer's per-output-channel
    weight ranges (dead channels ignored) before and after equalization."""

    first: str
    second: str
    activation: Optional[str]  # ops between the two layers, "+"-joined; None when adjacent
    channels: int
    range_ratio_before: float
    range_ratio_after: float


@dataclass
class EqualizationReport:
    pairs: List[EqualizedPair] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # first-layer node -> reason
    iterations: int = 0  # sweeps over the pairs that changed weights
    converged: bool = True


@dataclass
class _Pair:
    first: gs.Node
    second: gs.Node
    between: List[str]
    channels: int
    second_kind: str  # "conv", "depthwise" or "gemm"
    block: int = 1  # Gemm features per channel after Flatten (spatial size)


# ---------------------------------------------------------------------------------------------
# Finding pairs
# ---------------------------------------------------------------------------------------------


def _constant(node: gs.Node, index: int) -> Optional[np.ndarray]:
    if index < len(node.inputs) and isinstance(node.inputs[index], gs.Constant):
        return np.asarray(node.inputs[index].values)
    return None


def _has_input(node: gs.Node, index: int) -> bool:
    return index < len(node.inputs) and (isinstance(node.inputs[index], gs.Constant) or bool(node.inputs[index].name))


def _float_weight(node: gs.Node) -> Optional[np.ndarray]:
    weight = _constant(node, 1)
    if weight is None or not np.issubdtype(weight.dtype, np.floating):
        return None
    return weight


def _conv_kind(node: gs.Node, weight: np.ndarray) -> Optional[str]:
    """'conv' (group 1), 'depthwise' (group == in == out channels) or None (other grouping)."""
    group = int(node.attrs.get("group", 1))
    if group == 1:
        return "conv"
    if weight.shape[1] == 1 and weight.shape[0] == group:
        return "depthwise"
    return None


def _clip_bounds(node: gs.Node) -> Optional[Tuple[float, float]]:
    """(min, max) of a Clip from attributes (opset < 11) or constant inputs; None if dynamic."""
    bounds = [float("-inf"), float("inf")]
    for slot, attr in ((0, "min"), (1, "max")):
        if attr in node.attrs:
            bounds[slot] = float(node.attrs[attr])
        elif _has_input(node, slot + 1):
            value = _constant(node, slot + 1)
            if value is None or value.size != 1:
                return None
            bounds[slot] = float(value.reshape(()))
    return bounds[0], bounds[1]


def _between_problem(node: gs.Node, tensor: gs.Tensor, flattened: bool) -> Optional[str]:
    """Why ``node`` (reading ``tensor``) cannot sit between two equalized layers, or None."""
    op = node.op
    if (node.domain or "") not in ("", "ai.onnx"):
        return f"followed by {node.domain}.{op}"
    if op not in _BETWEEN_OPS:
        return f"followed by {op}"
    if len(node.outputs) != 1 or node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
        return f"followed by {op} in a form not understood"
    if op == "Clip":
        bounds = _clip_bounds(node)
        if bounds is None:
            return "Clip with run-time bounds after it"
        # Clip commutes with s > 0 only when each bound is 0 or infinite (Relu, identity...).
        if all(b == 0 or np.isinf(b) for b in bounds):
            return None
        return f"Clip({bounds[0]:g},{bounds[1]:g}) after it: not positively homogeneous"
    if op == "PRelu":
        return None if _constant(node, 1) is not None else "PRelu with a run-time slope after it"
    if op in _HOMOGENEOUS_ACTIVATIONS:
        return None
    if op in _HOMOGENEOUS_POOLS:
        return None if not flattened else f"{op} after Flatten"
    if op == "Flatten":
        if flattened:
            return "two Flattens before the next layer"
        return None if int(node.attrs.get("axis", 1)) == 1 else "Flatten with axis != 1 after it"
    return None


def _label(node: gs.Node) -> str:
    if node.op == "Clip":
        bounds = _clip_bounds(node)
        return f"Clip({bounds[0]:g},{bounds[1]:g})" if bounds else "Clip"
    return node.op


def _match_second(
    first: gs.Node, channels: int, tensor: gs.Tensor, node: gs.Node, between: List[str], flattened: bool
) -> Union[_Pair, str]:
    """The pair ``first -> ... -> node`` or the reason it cannot be equalized."""
    if (node.domain or "") not in ("", "ai.onnx"):
        return f"followed by {node.domain}.{node.op}"
    if node.inputs[0] is not tensor or any(t is tensor for t in node.inputs[1:]):
        return f"next {node.op} reads it as a weight"
    weight = _float_weight(node)
    if weight is None:
        return f"next {node.op} {node.name} has no constant float weight"
    if node.op == "Conv":
        if flattened:
            return "Conv after Flatten"
        kind = _conv_kind(node, weight)
        if kind is None:
            return f"next Conv {node.name} is grouped (group={node.attrs.get('group')}), not depthwise"
        expected = weight.shape[0] if kind == "depthwise" else weight.shape[1]
        if expected != channels:
            return f"next Conv {node.name} expects {expected} channels, {first.name} makes {channels}"
        return _Pair(first, node, between, channels, kind)
    # Gemm: only Flatten(axis=1) -> Gemm(transA=0) with a constant 2-D B.
    if not flattened:
        return "Gemm without Flatten after it"
    if int(node.attrs.get("transA", 0)) or weight.ndim != 2:
        return f"next Gemm {node.name} has transA or a non-2-D weight"
    features = weight.shape[1] if int(node.attrs.get("transB", 0)) else weight.shape[0]
    if features % channels:
        return f"next Gemm {node.name} has {features} features, not a multiple of {channels} channels"
    return _Pair(first, node, between, channels, "gemm", block=features // channels)


def _pair_after(graph: gs.Graph, first: gs.Node) -> Union[_Pair, str]:
    """Follow the single-reader chain after ``first`` to the next weight layer."""
    weight = _float_weight(first)
    if weight is None or weight.ndim < 3:
        return "no constant float weight"
    if _conv_kind(first, weight) is None:
        return f"grouped conv (group={first.attrs.get('group')}), not depthwise"
    if _has_input(first, 2):
        bias = _constant(first, 2)
        if bias is None or not np.issubdtype(bias.dtype, np.floating):
            return "bias is not a constant float"
    channels = int(weight.shape[0])
    tensor, between, flattened = first.outputs[0], [], False
    while True:
        where = f"{between[-1]} output" if between else "output"
        if is_graph_output(graph, tensor):
            return f"{where} is a graph output"
        readers = list(tensor.outputs)
        if len(readers) != 1:
            return f"{where} has {len(readers)} readers"
        node = readers[0]
        if node.op in ("Conv", "Gemm"):
            return _match_second(first, channels, tensor, node, between, flattened)
        problem = _between_problem(node, tensor, flattened)
        if problem is not None:
            return problem
        between.append(_label(node))
        flattened = flattened or node.op == "Flatten"
        tensor = node.outputs[0]


def find_pairs(model: Model) -> Tuple[List[_Pair], Dict[str, str]]:
    """Every equalizable (first, second) pair, and a reason for each Conv that starts none."""
    graph = model.graph
    name_nodes(graph)
    pairs: List[_Pair] = []
    skipped: Dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "Conv" or (node.domain or "") not in ("", "ai.onnx") or not node.outputs:
            continue
        found = _pair_after(graph, node)
        if isinstance(found, str):
            skipped[node.name] = found
        else:
            pairs.append(found)
    return pairs, skipped


# ---------------------------------------------------------------------------------------------
# Ranges and scaling
# ---------------------------------------------------------------------------------------------


def _output_ranges(pair: _Pair) -> np.ndarray:
    """r1: max |W1| per output channel of the first layer (conv weights are (out, in, ...))."""
    weight = np.asarray(pair.first.inputs[1].values, dtype=np.float64)
    return np.abs(weight).reshape(pair.channels, -1).max(axis=1)


def _input_ranges(pair: _Pair) -> np.ndarray:
    """r2: max |W2| per input channel of the second layer."""
    weight = np.abs(np.asarray(pair.second.inputs[1].values, dtype=np.float64))
    if pair.second_kind == "depthwise":  # input channel i is W2[i, 0, ...]
        return weight.reshape(pair.channels, -1).max(axis=1)
    if pair.second_kind == "conv":
        return np.moveaxis(weight, 1, 0).reshape(pair.channels, -1).max(axis=1)
    if int(pair.second.attrs.get("transB", 0)):  # B is (N, K), column k reads feature k
        return weight.reshape(weight.shape[0], pair.channels, pair.block).max(axis=(0, 2))
    return weight.reshape(pair.channels, pair.block, weight.shape[1]).max(axis=(1, 2))


def _live(ranges: np.ndarray) -> np.ndarray:
    top = float(ranges.max()) if ranges.size else 0.0
    return ranges > top * _DEAD_CHANNEL_FRACTION if top > 0 else np.zeros(ranges.shape, dtype=bool)


def _range_ratio(ranges: np.ndarray) -> float:
    live = ranges[_live(ranges)]
    return float(live.max() / live.min()) if live.size else 1.0


def _equalizing_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """s with r1 / s == r2 * s == sqrt(r1 r2); 1 on dead channels of either layer."""
    scales = np.ones_like(r1)
    live = _live(r1) & _live(r2)
    scales[live] = np.sqrt(r1[live] / r2[live])
    return scales


def _scaled(values: np.ndarray, factors: np.ndarray, axis: int, block: int = 1) -> np.ndarray:
    """A new array: ``values`` times ``factors`` (one per channel, each repeated ``block``
    times) along ``axis``, in the original dtype."""
    per_position = np.repeat(factors, block)
    shape = [1] * values.ndim
    shape[axis] = per_position.size
    return (values.astype(np.float64) * per_position.reshape(shape)).astype(values.dtype)


def _apply(graph: gs.Graph, pair: _Pair, scales: np.ndarray) -> None:
    """W1[i] /= s_i, b1[i] /= s_i, W2[:, i] *= s_i (always new arrays: weights are shared)."""
    first, second = pair.first, pair.second
    inverse = 1.0 / scales
    replace_constant_values(graph, first, 1, _scaled(np.asarray(first.inputs[1].values), inverse, 0))
    bias = _constant(first, 2)
    if bias is not None:  # no bias means a zero bias, which stays zero
        replace_constant_values(graph, first, 2, _scaled(bias, inverse, 0))
    weight = np.asarray(second.inputs[1].values)
    if pair.second_kind == "depthwise":
        axis = 0
    elif pair.second_kind == "conv":
        axis = 1
    else:
        axis = 1 if int(second.attrs.get("transB", 0)) else 0
    replace_constant_values(graph, second, 1, _scaled(weight, scales, axis, pair.block))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def equalize_cross_layer(model: Model, *, iterations: int = 20, tolerance: float = 1e-3) -> EqualizationReport:
    """Equalize every Conv -> [positively homogeneous ops] -> Conv/Gemm pair of ``model``.

    Modifies ``model`` in place (the caller passes a copy); fp32 outputs are unchanged up to
    rounding. Run BN folding first, so each conv carries its BN scale. Pairs are swept in
    topological order; a pair is re-equalized only after a neighbouring pair rescaled one of
    its layers, until every scale of a sweep is within ``tolerance`` of 1 or ``iterations``
    sweeps ran (Nagel et al. 2019, sec. 4.1, iterative multi-layer equalization).
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance!r}")
    graph = model.graph
    graph.toposort()
    pairs, skipped = find_pairs(model)
    report = EqualizationReport(skipped=skipped)
    ratios_before = [_range_ratio(_output_ranges(pair)) for pair in pairs]

    versions: Dict[str, int] = defaultdict(int)  # weight edits per node
    equalized_at: Dict[int, Tuple[int, int]] = {}  # pair -> versions right after its last edit
    report.converged = False
    for _ in range(iterations):
        worst, evaluated = 0.0, 0
        for index, pair in enumerate(pairs):
            first, second = pair.first.name, pair.second.name
            if equalized_at.get(index) == (versions[first], versions[second]):
                continue
            evaluated += 1
            scales = _equalizing_scales(_output_ranges(pair), _input_ranges(pair))
            change = float(np.abs(scales - 1.0).max()) if scales.size else 0.0
            worst = max(worst, change)
            if change > 0:
                _apply(graph, pair, scales)
                versions[first] += 1
                versions[second] += 1
            equalized_at[index] = (versions[first], versions[second])
        if evaluated == 0:
            report.converged = True
            break
        report.iterations += 1
        if worst < tolerance:
            report.converged = True
            break

    for pair, before in zip(pairs, ratios_before):
        report.pairs.append(
            EqualizedPair(
                first=pair.first.name,
                second=pair.second.name,
                activation="+".join(pair.between) or None,
                channels=pair.channels,
                range_ratio_before=before,
                range_ratio_after=_range_ratio(_output_ranges(pair)),
            )
        )
    return report
