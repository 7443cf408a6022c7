"""Where int8 goes, and how it is written: QDQ placement, emission and the fusion check.

onnxruntime turns ``DequantizeLinear -> op -> QuantizeLinear`` groups into int8 kernels
(QLinearConv, QGemm, QLinearAdd, ...), but only for the ops and patterns it knows; anything
else runs in float between a dequantize and a quantize, which on small CV models easily makes
the "int8" model slower than fp32 (onnxruntime's own quantizer does this to SE blocks and
hard-swish chains). So placement is a graph decision, not a per-op flag:

- compute ops (Conv, Gemm, MatMul) always run int8 unless kept float;
- element-wise ops with int8 kernels (Add, Mul, Concat, pooling, Sigmoid, LeakyRelu)
  run int8 when one of their inputs is already int8, so a chain never leaves int8 for them;
- data-movement ops (MaxPool, Reshape, Transpose, nearest Resize, ...) carry their input's
  quantization through unchanged (tied scales), which lets onnxruntime drop their QDQ;
- Relu / Clip right after an int8 op are fused by quantizing *their* output (zero point at
  the bottom of the range), never with a QDQ pair between conv and activation;
- a Div / Mul by a positive scalar after an int8 op is folded into the quantize scale;
- Concat inputs share one scale when their ranges are alike, so QLinearConcat is a copy.

The check that this worked reads onnxruntime's optimized graph (``fusion_report``).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph_utils import is_graph_output, producer, unique_name
from .ir import Model, constant_value

COMPUTE_OPS = frozenset({"Conv", "Gemm", "MatMul"})
QLINEAR_OPS = frozenset(
    {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"}
)
PASSTHROUGH_OPS = frozenset(
    {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather",
     "DepthToSpace", "Split", "Resize"}
)
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                           "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul",
                           "DynamicQuantizeLinear", "QLinearConcat"})
# Ops whose output range is known without calibration.
FIXED_RANGES = {"Sigmoid": (0.0, 1.0)}

ACT_TYPES = ("uint8", "int8")


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------


@dataclass
class QuantPlan:
    """Which nodes run int8 and which tensors carry int8 values between them.

    ``ties`` maps a quantized tensor to the tensor whose scale it must share (pass-through
    outputs share their input's, Concat inputs share the output's); ``float_nodes`` says why a
    node that could have been int8 stayed float.
    """

    int8_nodes: List[str] = field(default_factory=list)
    quantized: List[str] = field(default_factory=list)
    fused_activations: Dict[str, str] = field(default_factory=dict)  # activation node -> producer node
    ties: Dict[str, str] = field(default_factory=dict)
    concats: Dict[str, List[str]] = field(default_factory=dict)
    """Concat output -> inputs: tied after calibration when their ranges are alike."""
    float_nodes: Dict[str, str] = field(default_factory=dict)
    fixed_ranges: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    keep: Dict[str, str] = field(default_factory=dict)
    """The nodes asked to stay float, with the reason (kept for re-planning)."""
    ops: Dict[str, str] = field(default_factory=dict)
    """int8 node -> op type (for checking onnxruntime's kernels by count)."""
    absorbed: Dict[str, Tuple[str, str, float]] = field(default_factory=dict)
    """Div/Mul by a positive scalar folded into a quantize scale: node -> (input, output, factor)."""

    def root(self, name: str) -> str:
        while name in self.ties:
            name = self.ties[name]
        return name

    def tie_concats(self, ranges: Dict[str, Tuple[float, float]], *, tolerance: float = 2.0) -> int:
        """Share one scale across each Concat whose inputs' ranges are within ``tolerance`` x of
        the union: QLinearConcat is then a copy. A narrow input (a sigmoid next to raw box
        offsets) keeps its own scale instead of losing its precision."""
        def span(lo: float, hi: float) -> float:
            return max(hi, 0.0) - min(lo, 0.0)

        tied = 0
        for output, inputs in self.concats.items():
            members = [output] + inputs
            union = span(min(ranges[m][0] for m in members), max(ranges[m][1] for m in members))
            if all(span(*ranges[m]) * tolerance >= union for m in inputs):
                for m in inputs:
                    if self.root(m) != self.root(output):
                        self.ties[self.root(m)] = self.root(output)
                tied += 1
        return tied

    def classes(self) -> Dict[str, List[str]]:
        """Tensors that must share quantization parameters, by representative."""
        result: Dict[str, List[str]] = {}
        for name in self.quantized:
            result.setdefault(self.root(name), []).append(name)
        return result


def is_quantized_model(model: Model) -> Optional[str]:
    """The op that shows ``model`` is already quantized, or None."""
    for node in model.graph.nodes:
        if node.op in QUANTIZED_OPS:
            return node.op
    return None


def _is_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) or constant_value(tensor) is not None


def _activation_inputs(node: gs.Node) -> List[gs.Tensor]:
    if node.op in ("Reshape", "Slice", "Gather", "Squeeze", "Unsqueeze", "Resize", "Split", "Clip"):
        return [node.inputs[0]] if node.inputs else []
    return [t for t in node.inputs if t is not None and t.name and not _is_constant(t)]


def _weight_ok(node: gs.Node) -> bool:
    """Compute ops quantize with a constant float weight (or two activations for MatMul)."""
    if node.op in ("Conv", "Gemm", "ConvTranspose"):
        if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            return False
        if node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) != 1:
            return False
        if node.op == "Gemm" and (node.attrs.get("transA", 0) or len(node.inputs[1].shape) != 2):
            return False
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
            return False
        return node.inputs[1].values.dtype == np.float32
    if node.op == "MatMul":
        weight = node.inputs[1]
        if isinstance(weight, gs.Constant):
            return weight.values.dtype == np.float32 and weight.values.ndim == 2
        return True
    return False


def _resize_is_nearest(node: gs.Node) -> bool:
    return node.attrs.get("mode", "nearest") in ("nearest", b"nearest")


def _clip_bounds(node: gs.Node) -> Optional[Tuple[float, float]]:
    lo, hi = -np.inf, np.inf
    if "min" in node.attrs:
        lo = float(node.attrs["min"])
    if "max" in node.attrs:
        hi = float(node.attrs["max"])
    for index in (1, 2):
        if len(node.inputs) > index and node.inputs[index] is not None and node.inputs[index].name:
            value = constant_value(node.inputs[index])
            if value is None or np.size(value) != 1:
                return None
            if index == 1:
                lo = float(np.asarray(value).reshape(-1)[0])
            else:
                hi = float(np.asarray(value).reshape(-1)[0])
    return lo, hi


def plan_quantization(
    model: Model,
    *,
    act_type: str = "uint8",
    keep_float=(),
    exclude: Optional[str] = None,
) -> QuantPlan:
    """Decide placement on a folded float model (see the module docstring for the rules).

    ``keep_float``: node names to leave in float, or ``{name: reason}``.
    """
    graph = model.graph
    graph.toposort()
    keep = dict(keep_float) if isinstance(keep_float, dict) else dict.fromkeys(keep_float, "kept float")
    pattern = re.compile(exclude) if exclude else None
    plan = QuantPlan(keep=keep)
    quantized: Dict[str, None] = {}  # ordered set
    int8: Set[str] = set()

    def mark(tensor: gs.Tensor) -> None:
        if tensor.name and not _is_constant(tensor):
            quantized.setdefault(tensor.name)

    def outputs_of(node: gs.Node) -> List[gs.Tensor]:
        """The node's outputs, or its fused activation's output instead."""
        result = []
        for out in node.outputs:
            readers = list(out.outputs)
            if (
                len(readers) == 1
                and readers[0].op in FUSED_ACTIVATIONS
                and not is_graph_output(graph, out)
                and readers[0].name not in keep
                and _fusable_activation(readers[0], act_type)
            ):
                plan.fused_activations[readers[0].name] = node.name
                result.append(readers[0].outputs[0])
            else:
                result.append(out)
        return result

    for node in graph.nodes:
        name = node.name
        if name in plan.fused_activations:
            continue
        if name in keep or (pattern and (pattern.search(name) or any(pattern.search(t.name) for t in node.outputs))):
            if node.op in COMPUTE_OPS | QLINEAR_OPS:
                plan.float_nodes[name] = keep.get(name, "matches --quant-exclude")
            continue
        inputs = _activation_inputs(node)
        factor = _scalar_factor(node)
        if factor is not None and inputs:
            source, result = inputs[0], node.outputs[0]
            if (
                source.name in quantized
                and producer(source) is not None
                and producer(source).name in int8
                and len(source.outputs) == 1
                and not is_graph_output(graph, source)
                and not is_graph_output(graph, result)
                and source.name not in plan.concats
                and source.name not in plan.ties
                and source.name not in plan.fixed_ranges
                and not any(source.name == t for t in plan.ties.values())
            ):
                # x / c then quantize(s) == quantize(x, s * c): the division disappears.
                del quantized[source.name]
                mark(result)
                plan.absorbed[name] = (source.name, result.name, factor)
                continue
        if node.op in COMPUTE_OPS or node.op == "ConvTranspose":
            if node.op == "ConvTranspose" and act_type != "int8":
                # onnxruntime's CPU EP has no int8 ConvTranspose: QDQ around it would only add
                # a dequantize and lose precision. TensorRT (--act-type int8) runs it in int8.
                plan.float_nodes[name] = "ConvTranspose: no int8 kernel in onnxruntime CPU (int8 with --act-type int8)"
                continue
            if not _weight_ok(node):
                plan.float_nodes[name] = "weight is not a constant float tensor (or a grouped ConvTranspose)"
                continue
            int8.add(name)
            for tensor in inputs:
                mark(tensor)
            for out in outputs_of(node):
                mark(out)
        elif node.op in QLINEAR_OPS:
            if not inputs or not any(t.name in quantized for t in inputs):
                continue  # a float island: int8 here would only add a quantize
            if any(is_graph_output(graph, out) for out in node.outputs):
                # A model output keeps float precision; the op is cheap next to the convs.
                plan.float_nodes[name] = "produces a model output"
                continue
            int8.add(name)
            for tensor in inputs:
                mark(tensor)
            outs = outputs_of(node)
            for out in outs:
                mark(out)
            if node.op in FIXED_RANGES and outs[0] is node.outputs[0]:
                plan.fixed_ranges[node.outputs[0].name] = FIXED_RANGES[node.op]
            if node.op == "Concat":
                plan.concats[outs[0].name] = [t.name for t in inputs]
        elif node.op in PASSTHROUGH_OPS:
            if not inputs or inputs[0].name not in quantized:
                continue
            if node.op == "Resize" and not _resize_is_nearest(node):
                continue
            int8.add(name)
            source = inputs[0].name
            for out in node.outputs:
                mark(out)
                if plan.root(out.name) != plan.root(source):
                    plan.ties[out.name] = plan.root(source)
    _drop_dead_end_passthroughs(graph, plan, int8, quantized)
    plan.int8_nodes = [n.name for n in graph.nodes if n.name in int8]
    plan.ops = {n.name: n.op for n in graph.nodes if n.name in int8}
    plan.quantized = list(quantized)
    return plan


def _drop_dead_end_passthroughs(graph: gs.Graph, plan: QuantPlan, int8: Set[str], quantized: Dict[str, None]) -> None:
    """Pass-through ops carry int8 only to reach int8 readers; ones that lead only to float
    ops go back to float (onnxruntime's uint8 MaxPool outside its NHWC path is several times
    slower than the float one, and the dequantize has to happen anyway)."""
    absorbed_sources = {source for source, _, _ in plan.absorbed.values()}
    for node in reversed(list(graph.nodes)):
        if node.name not in int8 or node.op not in PASSTHROUGH_OPS:
            continue
        readers = [r for out in node.outputs for r in out.outputs]
        if any(is_graph_output(graph, out) for out in node.outputs):
            continue
        if any(r.name in int8 or r.name in plan.fused_activations or r.name in plan.absorbed for r in readers):
            continue
        if any(out.name in absorbed_sources for out in node.outputs):
            continue
        int8.discard(node.name)
        for out in node.outputs:
            quantized.pop(out.name, None)
            plan.ties.pop(out.name, None)
            for tensor in [t for t, root in plan.ties.items() if root == out.name]:
                plan.ties.pop(tensor)


def output_layers(model: Model, *, max_share: Optional[float] = None) -> List[str]:
    """Compute nodes whose results reach a model output without passing another compute node.

    Their outputs are the model's answer (logits, box offsets, score maps): quantizing them to
    256 levels costs the most accuracy per MAC, and they are usually a small share of the work.
    With ``max_share``, only the cheapest of them are returned, as many as fit together in that
    fraction of the model's MACs (SqueezeNet's 1000-way classifier conv is a quarter of it).
    """
    graph = model.graph
    found: List[str] = []
    seen: Set[int] = set()
    stack = [t for t in graph.outputs]
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        node = producer(tensor)
        if node is None:
            continue
        if node.op in COMPUTE_OPS:
            if node.name not in found:
                found.append(node.name)
            continue
        stack.extend(t for t in node.inputs if t is not None and t.name and not _is_constant(t))
    if max_share is None or not found:
        return found
    from .stats import layer_macs

    macs = {n.name: layer_macs(n) for n in graph.nodes}
    total = max(sum(m for m in macs.values() if m), 1)
    chosen, used = [], 0.0
    for name in sorted((n for n in found if macs.get(n)), key=lambda n: macs[n]):
        share = macs[name] / total
        if used + share > max_share:
            break
        chosen.append(name)
        used += share
    return chosen


def _scalar_factor(node: gs.Node) -> Optional[float]:
    """For Div(x, c) / Mul(x, c) with a positive scalar constant c: x / result (c or 1/c)."""
    if node.op not in ("Div", "Mul") or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    operands = [constant_value(t) for t in node.inputs]
    if node.op == "Div":
        value = operands[1]
        if operands[0] is not None or value is None:
            return None
    else:
        if (operands[0] is None) == (operands[1] is None):
            return None
        value = operands[1] if operands[1] is not None else operands[0]
        if operands[0] is not None:  # Mul(c, x): x is the second input
            return None
    if value.size != 1 or value.dtype != np.float32:
        return None
    c = float(value.reshape(()))
    if not np.isfinite(c) or c <= 0:
        return None
    return c if node.op == "Div" else 1.0 / c


def _fusable_activation(node: gs.Node, act_type: str) -> bool:
    if node.op == "Relu":
        return True
    if node.op == "Clip":
        bounds = _clip_bounds(node)
        return bounds is not None and bounds[0] >= 0.0
    return False


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


@dataclass
class QuantParams:
    scale: float
    zero_point: int
    dtype: str  # "uint8" | "int8"
    lo: float
    hi: float

    @property
    def np_dtype(self):
        return np.uint8 if self.dtype == "uint8" else np.int8


WEIGHTED_OPS = ("Conv", "Gemm", "ConvTranspose", "MatMul")


def has_constant_weight(node: gs.Node) -> bool:
    """A compute op whose second input is a constant weight (what ``emit_qdq`` quantizes per channel)."""
    return node.op in WEIGHTED_OPS and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant)


def is_depthwise_conv(node: gs.Node) -> bool:
    """One input and one output channel per group: onnxruntime runs these on a kernel of their own."""
    if node.op != "Conv":
        return False
    groups = int(node.attrs.get("group", 1))
    shape = getattr(node.inputs[1], "shape", None)
    return groups > 1 and shape is not None and shape[1] == 1 and shape[0] == groups


def params_from_range(lo: float, hi: float, act_type: str) -> QuantParams:
    """Asymmetric uint8 (zero point anywhere) or symmetric int8 (zero point 0) for [lo, hi].

    Relu only fuses into onnxruntime's int8 kernels when the zero point sits at the bottom of
    the type, which uint8 gives for free on [0, hi]; int8 targets TensorRT (zero point 0 only)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError(f"range [{lo}, {hi}] is not finite")
    if act_type == "uint8":
        span = max(hi - lo, 1e-8)
        scale = span / 255.0
        zero_point = int(np.clip(round(-lo / scale), 0, 255))
        return QuantParams(np.float32(scale).item(), zero_point, "uint8", lo, hi)
    # int8 is for TensorRT, which only takes zero point 0: symmetric even for Relu outputs.
    bound = max(abs(lo), abs(hi), 1e-8)
    return QuantParams(np.float32(bound / 127.0).item(), 0, "int8", lo, hi)


PAIR_LIMIT = 128
"""The most two same-sign int8 weights may add up to on a CPU that sums each pair of uint8 x int8
products into a saturating int16: 255 * 128 = 32640 fits, 255 * 129 does not."""


def _top_two(values: np.ndarray) -> np.ndarray:
    """The two largest entries of each row of a non-negative [rows, k] array (0 pads k = 1)."""
    if values.shape[1] == 1:
        return np.concatenate([values, np.zeros_like(values)], axis=1)
    return -np.partition(-values, 1, axis=1)[:, :2]


def _safe_levels(pairs: Sequence[Tuple[np.ndarray, np.ndarray]], top: np.ndarray) -> np.ndarray:
    """Per row, the largest int8 bound (63..127) at which no (first, second) pair of the same
    sign rounds to a sum past ``PAIR_LIMIT``; ``top`` is each row's largest |weight|.

    Rounding moves a pair's sum by at most one level, so no bound above 129 * top / s passes,
    s being the row's largest same-sign pair sum: the search starts there, a step or two above
    the answer, instead of at 127."""
    worst = np.zeros(top.shape[0], dtype=np.float32)
    for first, second in pairs:
        same = np.sign(first) == np.sign(second)
        worst = np.maximum(worst, np.where(same, np.abs(first + second), 0).max(axis=1))
    with np.errstate(divide="ignore"):
        start = np.where(worst > 0, np.floor(129.0 * top / np.maximum(worst, 1e-30)), 127.0)
    start = np.clip(start, 63, 127).astype(np.float32)
    levels = np.full(top.shape[0], 63.0, dtype=np.float32)
    pending = np.arange(top.shape[0])
    for step in range(65):
        bound = start[pending] - step
        keep = bound >= 64  # 63 always passes
        pending, bound = pending[keep], bound[keep]
        if pending.size == 0:
            break
        scale = (top[pending] / bound).astype(np.float32)[:, None]
        ok = np.ones(pending.size, dtype=bool)
        for first, second in pairs:
            a, b = np.round(first[pending] / scale), np.round(second[pending] / scale)
            ok &= np.where(np.sign(a) == np.sign(b), np.abs(a + b), 0).max(axis=1) <= PAIR_LIMIT
        levels[pending[ok]] = bound[ok]
        pending = pending[~ok]
    return levels


def pair_safe_levels(rows: np.ndarray) -> np.ndarray:
    """Per row of a [rows, k] weight, the largest int8 bound (63..127) at which no two same-sign
    weights round to a sum past ``PAIR_LIMIT``.

    Whatever order a kernel pairs the products in and whatever the uint8 inputs are, no pair
    can then overflow an int16. 63 always qualifies (onnxruntime's ``reduce_range``: 7 bits);
    rows where one weight dominates keep up to the full 8 bits."""
    rows = np.asarray(rows, dtype=np.float32)
    top = np.maximum(np.abs(rows).max(axis=1), 1e-12).astype(np.float32)
    positive, negative = _top_two(np.maximum(rows, 0)), _top_two(np.maximum(-rows, 0))
    pairs = [(positive[:, :1], positive[:, 1:]), (-negative[:, :1], -negative[:, 1:])]
    return _safe_levels(pairs, top)


def adjacent_pair_levels(weight: np.ndarray) -> np.ndarray:
    """``pair_safe_levels`` for a conv weight [out, in, *kernel] whose kernel pairs neighbours only.

    onnxruntime's x86 int8 conv reads the weight of each output channel in (kernel position,
    input channel) order and pairs entries 2i and 2i+1 (``runtime.int8_pairs_are_adjacent``
    checks this on the installed runtime); so only those pairs must stay under the limit, which
    leaves most channels between 7 and 8 bits instead of at 7. With an odd channel count the
    pairs may also be laid out per kernel position (channels padded to even): both are checked."""
    weight = np.asarray(weight, dtype=np.float32)
    out, channels = weight.shape[0], weight.shape[1]
    top = np.maximum(np.abs(weight.reshape(out, -1)).max(axis=1), 1e-12).astype(np.float32)
    by_position = np.moveaxis(weight, 1, -1)  # [out, *kernel, in]
    layouts = [by_position.reshape(out, -1)]
    if channels % 2:
        padding = np.zeros(by_position.shape[:-1] + (1,), np.float32)
        layouts.append(np.concatenate([by_position, padding], axis=-1).reshape(out, -1))
    pairs = []
    for flat in layouts:
        if flat.shape[1] % 2:
            flat = np.concatenate([flat, np.zeros((out, 1), np.float32)], axis=1)
        pairs.append((flat[:, 0::2], flat[:, 1::2]))
    return _safe_levels(pairs, top)


WEIGHT_PAIRINGS = ("any", "adjacent")


def quantize_weight(weight: np.ndarray, axis: Optional[int], pairs: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per channel along ``axis`` (per tensor when None): (int8 values, scales).

    ``pairs`` narrows each channel's range for CPUs whose int8 kernels add pairs of products
    into a saturating int16 (``runtime.int8_products_saturate``): ``"any"`` keeps every pair of
    same-sign weights under ``PAIR_LIMIT`` (``pair_safe_levels``; per tensor, over the whole
    tensor), ``"adjacent"`` only the pairs a conv kernel forms (``adjacent_pair_levels``; conv
    weights with ``axis`` 0, else as ``"any"``). None keeps the full [-127, 127]."""
    if pairs is not None and pairs not in WEIGHT_PAIRINGS:
        raise ValueError(f"weight pairing must be one of {WEIGHT_PAIRINGS}, got {pairs!r}")
    weight = np.asarray(weight, dtype=np.float32)
    if axis is None:
        levels = float(pair_safe_levels(weight.reshape(1, -1))[0]) if pairs else 127.0
        bound = np.float32(max(float(np.abs(weight).max()), 1e-12))
        scale = np.asarray(bound / np.float32(levels), dtype=np.float32)
        q = np.clip(np.round(weight / scale), -levels, levels).astype(np.int8)
        return q, scale
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    if pairs == "adjacent" and axis == 0 and weight.ndim >= 3:
        levels = adjacent_pair_levels(weight)
    elif pairs:
        levels = pair_safe_levels(moved)
    else:
        levels = np.full(moved.shape[0], 127.0, np.float32)
    bound = np.maximum(np.abs(moved).max(axis=1), 1e-12).astype(np.float32)
    scale = (bound / levels).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -levels.reshape(shape), levels.reshape(shape)).astype(np.int8)
    return q, scale


def weight_axis(node: gs.Node, per_channel: bool) -> Optional[int]:
    """The output-channel axis of a compute op's weight (None: per tensor)."""
    if not per_channel:
        return None
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "ConvTranspose":
        return 1  # weight [in, out, kh, kw] (group 1)
    return None  # MatMul: per tensor (QLinearMatMul wants a scalar B scale)


# --------------------------------------------------------------------------------------------
# Emission
# --------------------------------------------------------------------------------------------


class _Names:
    def __init__(self, graph: gs.Graph):
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}

    def __call__(self, base: str) -> str:
        name = unique_name(base, self.taken)
        self.taken.add(name)
        return name


def emit_qdq(
    model: Model,
    plan: QuantPlan,
    params: Dict[str, QuantParams],
    *,
    per_channel: bool = True,
    weight_pairs: Optional[Mapping[str, str]] = None,
) -> Dict[str, Dict[str, object]]:
    """Rewrite ``model`` in place into QDQ form; returns per-weight quantization facts.

    ``model.annotations["dequantized"]`` maps each quantized float tensor to the tensor that now
    carries its dequantized value (what the rest of the graph reads).

    ``params`` holds one entry per quantized activation tensor (tied tensors share values);
    ``weight_pairs`` maps the nodes whose weights keep a pair-safe range (CPUs whose int8 kernels
    saturate) to the pairing to guard, ``"any"`` or ``"adjacent"`` (see ``quantize_weight``);
    the others use the full [-127, 127].
    """
    graph = model.graph
    names = _Names(graph)
    tensors = graph.tensors()
    int8 = set(plan.int8_nodes)
    weights: Dict[str, Dict[str, object]] = {}

    def scalar(base: str, value, dtype) -> gs.Constant:
        return gs.Constant(names(base), np.asarray(value, dtype=dtype))

    dequantized: Dict[str, str] = {}
    absorbed_outputs = {result: (node, source, factor) for node, (source, result, factor) in plan.absorbed.items()}
    nodes_by_name = {n.name: n for n in graph.nodes}

    # Activations: T -> Q -> DQ -> (every reader of T).
    for tname in plan.quantized:
        tensor = tensors[tname]
        p = params[tname]
        if tname in absorbed_outputs:
            node_name, source_name, factor = absorbed_outputs[tname]
            scaled = scalar(f"{tname}_prescale", p.scale * factor, np.float32)
            scale = scalar(f"{tname}_scale", p.scale, np.float32)
            zero = scalar(f"{tname}_zero_point", p.zero_point, p.np_dtype)
            quant = gs.Variable(names(f"{tname}_quantized"), dtype=p.np_dtype, shape=tensor.shape)
            dequant = gs.Variable(names(f"{tname}_dequantized"), dtype=np.float32, shape=tensor.shape)
            readers = list(tensor.outputs)
            graph.nodes.append(gs.Node("QuantizeLinear", names(f"{tname}_QuantizeLinear"), inputs=[tensors[source_name], scaled, zero], outputs=[quant]))
            graph.nodes.append(gs.Node("DequantizeLinear", names(f"{tname}_DequantizeLinear"), inputs=[quant, scale, zero], outputs=[dequant]))
            for reader in readers:
                _swap_input(reader, tensor, dequant)
            dequantized[tname] = dequant.name
            absorbed = nodes_by_name[node_name]
            absorbed.inputs.clear()
            absorbed.outputs.clear()
            continue
        readers = list(tensor.outputs)
        is_output = is_graph_output(graph, tensor)
        scale = scalar(f"{tname}_scale", p.scale, np.float32)
        zero = scalar(f"{tname}_zero_point", p.zero_point, p.np_dtype)
        quant = gs.Variable(names(f"{tname}_quantized"), dtype=p.np_dtype, shape=tensor.shape)
        if is_output:
            # Keep the graph output's name: the producer writes a new tensor, DQ writes the output.
            source = gs.Variable(names(f"{tname}_float"), dtype=np.float32, shape=tensor.shape)
            node = producer(tensor)
            node.outputs[node.outputs.index(tensor)] = source
            for reader in readers:
                _swap_input(reader, tensor, source)
            graph.nodes.append(gs.Node("QuantizeLinear", names(f"{tname}_QuantizeLinear"), inputs=[source, scale, zero], outputs=[quant]))
            graph.nodes.append(gs.Node("DequantizeLinear", names(f"{tname}_DequantizeLinear"), inputs=[quant, scale, zero], outputs=[tensor]))
            # Float readers of the output (rare) keep reading the float source.
            dequantized[tname] = tname
            continue
        dequant = gs.Variable(names(f"{tname}_dequantized"), dtype=np.float32, shape=tensor.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", names(f"{tname}_QuantizeLinear"), inputs=[tensor, scale, zero], outputs=[quant]))
        graph.nodes.append(gs.Node("DequantizeLinear", names(f"{tname}_DequantizeLinear"), inputs=[quant, scale, zero], outputs=[dequant]))
        for reader in readers:
            _swap_input(reader, tensor, dequant)
        dequantized[tname] = dequant.name
    model.annotations["dequantized"] = dequantized

    # Weights, biases and constant operands of int8 nodes.
    for node in list(graph.nodes):
        if node.name not in int8:
            continue
        if has_constant_weight(node):
            weight = node.inputs[1]
            axis = weight_axis(node, per_channel)
            pairs = (weight_pairs or {}).get(node.name)
            q, wscale = quantize_weight(weight.values, axis, pairs)
            wq = gs.Constant(names(f"{weight.name}_quantized"), q)
            ws = gs.Constant(names(f"{weight.name}_scale"), wscale)
            wz = gs.Constant(names(f"{weight.name}_zero_point"), np.zeros(wscale.shape, np.int8))
            wd = gs.Variable(names(f"{weight.name}_dequantized"), dtype=np.float32, shape=list(weight.shape))
            attrs = {"axis": axis} if axis is not None else {}
            graph.nodes.append(gs.Node("DequantizeLinear", names(f"{weight.name}_DequantizeLinear"), attrs=attrs, inputs=[wq, ws, wz], outputs=[wd]))
            node.inputs[1] = wd
            facts = {"node": node.name, "op": node.op, "weight": weight.name, "per_channel": axis is not None,
                     "weight_range": f"pair-safe ({pairs} pairs)" if pairs else "full", "weight_scale_min": float(np.min(wscale)), "weight_scale_max": float(np.max(wscale))}
            bias_index = 2
            if len(node.inputs) > bias_index and node.inputs[bias_index] is not None and node.inputs[bias_index].name:
                bias = node.inputs[bias_index]
                x_params = params.get(_source_name(node.inputs[0]))
                if x_params is not None and isinstance(bias, gs.Constant) and bias.values.ndim == 1:
                    bscale = (np.float32(x_params.scale) * wscale).astype(np.float32)
                    bscale = np.broadcast_to(bscale, bias.values.shape).astype(np.float32)
                    bq = np.clip(np.round(bias.values.astype(np.float64) / bscale), -(2 ** 31) + 1, 2 ** 31 - 1).astype(np.int32)
                    bqc = gs.Constant(names(f"{bias.name}_quantized"), bq)
                    bsc = gs.Constant(names(f"{bias.name}_scale"), bscale)
                    bzc = gs.Constant(names(f"{bias.name}_zero_point"), np.zeros(bscale.shape, np.int32))
                    bd = gs.Variable(names(f"{bias.name}_dequantized"), dtype=np.float32, shape=list(bias.shape))
                    graph.nodes.append(gs.Node("DequantizeLinear", names(f"{bias.name}_DequantizeLinear"), attrs={"axis": 0}, inputs=[bqc, bsc, bzc], outputs=[bd]))
                    node.inputs[bias_index] = bd
            weights[node.name] = facts
        elif node.op in ("Add", "Mul"):
            for index, operand in enumerate(node.inputs):
                value = constant_value(operand)
                if value is None or value.dtype != np.float32:
                    continue
                lo, hi = float(min(value.min(), 0.0)), float(max(value.max(), 0.0))
                act = next(iter(params.values())).dtype
                p = params_from_range(lo, hi if hi > lo else lo + 1e-6, act)
                q = np.asarray(np.clip(np.round(value / p.scale) + p.zero_point, *(_limits(p.dtype))), dtype=p.np_dtype)
                cq = gs.Constant(names(f"{operand.name or node.name}_quantized"), q)
                cs = scalar(f"{operand.name or node.name}_scale", p.scale, np.float32)
                cz = scalar(f"{operand.name or node.name}_zero_point", p.zero_point, p.np_dtype)
                cd = gs.Variable(names(f"{operand.name or node.name}_dequantized"), dtype=np.float32, shape=list(value.shape))
                graph.nodes.append(gs.Node("DequantizeLinear", names(f"{node.name}_const{index}_DequantizeLinear"), inputs=[cq, cs, cz], outputs=[cd]))
                node.inputs[index] = cd
    _guard_float_layers(graph, plan, names)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return weights


def _guard_float_layers(graph: gs.Graph, plan: QuantPlan, names: "_Names") -> None:
    """Keep float layers float in onnxruntime too.

    onnxruntime quantizes a float Conv/Gemm it finds between a DequantizeLinear and a
    QuantizeLinear with its own per-tensor weights (its weight/bias quantization transformer),
    so a layer kept float for accuracy would silently run int8 again. An ``Add`` of zeros
    between the dequantize and the layer breaks that pattern at the cost of one element-wise
    pass; other runtimes see an exact no-op.
    """
    int8 = set(plan.int8_nodes)
    quantized = set(plan.quantized)
    for node in list(graph.nodes):
        if node.op not in COMPUTE_OPS or node.name in int8 or not node.inputs:
            continue
        source = node.inputs[0]
        feeder = producer(source)
        if feeder is None or feeder.op != "DequantizeLinear":
            continue
        outputs = [node.outputs[0]]
        readers = list(node.outputs[0].outputs)
        if len(readers) == 1 and readers[0].op in FUSED_ACTIVATIONS:
            outputs.append(readers[0].outputs[0])
        if not any(out.name in quantized or any(r.op == "QuantizeLinear" for r in out.outputs) for out in outputs):
            continue
        shape = source.shape
        if node.op == "Conv" and shape and len(shape) >= 2 and isinstance(shape[1], int):
            zeros = np.zeros((shape[1],) + (1,) * (len(shape) - 2), np.float32)
        elif shape and isinstance(shape[-1], int):
            zeros = np.zeros((shape[-1],), np.float32)
        else:
            continue
        guarded = gs.Variable(names(f"{source.name}_float_guard"), dtype=np.float32, shape=source.shape)
        constant = gs.Constant(names(f"{node.name}_float_guard_zeros"), zeros)
        graph.nodes.append(gs.Node("Add", names(f"{node.name}_float_guard"), inputs=[source, constant], outputs=[guarded]))
        node.inputs[0] = guarded


def _swap_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for index, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[index] = new


def _limits(dtype: str) -> Tuple[int, int]:
    return (0, 255) if dtype == "uint8" else (-128, 127)


def _source_name(tensor: gs.Tensor) -> str:
    """The float tensor a DequantizeLinear output stands for."""
    node = producer(tensor)
    if node is not None and node.op == "DequantizeLinear":
        q = producer(node.inputs[0])
        if q is not None and q.op == "QuantizeLinear":
            return q.inputs[0].name
    return tensor.name


# --------------------------------------------------------------------------------------------
# Did onnxruntime fuse it?
# --------------------------------------------------------------------------------------------


@dataclass
class FusionReport:
    """What onnxruntime's optimizer made of a QDQ model."""

    int8_kernels: Dict[str, int]
    float_ops: Dict[str, int]
    leftover_quantize: int
    leftover_dequantize: int
    unfused: List[str]
    """Nodes that were meant to run int8 but run in float between DQ and Q."""

    def to_dict(self):
        return {
            "int8_kernels": self.int8_kernels,
            "float_ops": self.float_ops,
            "leftover_quantize": self.leftover_quantize,
            "leftover_dequantize": self.leftover_dequantize,
            "unfused": self.unfused,
        }


_KERNEL_OF = {
    "Conv": ("QLinearConv",),
    "Gemm": ("QGemm",),
    "MatMul": ("QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger"),
    "Add": ("QLinearAdd",),
    "Mul": ("QLinearMul",),
    "Concat": ("QLinearConcat",),
    "AveragePool": ("QLinearAveragePool",),
    "GlobalAveragePool": ("QLinearGlobalAveragePool",),
    "Sigmoid": ("QLinearSigmoid",),
    "LeakyRelu": ("QLinearLeakyRelu",),
}
_INT8_KERNEL = re.compile(r"^(QLinear\w+|QGemm|MatMulIntegerToFloat|ConvInteger|MatMulInteger|DynamicQuantize\w*)$")


def optimized_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's optimized form of ``proto`` (what actually runs)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="onnxslim-cv-opt-") as folder:
        path = os.path.join(folder, "optimized.onnx")
        options = ort.SessionOptions()
        options.optimized_model_filepath = path
        options.log_severity_level = 3
        # Extended, not All: the NCHWc/NHWC layout rewrites of level 99 do not change which
        # QDQ groups fused, and the file stays loadable anywhere.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(path)


def fusion_report(proto: onnx.ModelProto, plan: Optional[QuantPlan] = None) -> FusionReport:
    optimized = optimized_graph(proto)
    kernels: Dict[str, int] = {}
    floats: Dict[str, int] = {}
    for node in optimized.graph.node:
        bucket = kernels if _INT8_KERNEL.match(node.op_type) else floats
        bucket[node.op_type] = bucket.get(node.op_type, 0) + 1
    leftover_q = floats.pop("QuantizeLinear", 0)
    leftover_dq = floats.pop("DequantizeLinear", 0)
    unfused: List[str] = []
    if plan is not None:
        # By name where onnxruntime kept it (a float Conv/Add left between DQ and Q) ...
        by_name = {node.name: node.op_type for node in optimized.graph.node}
        planned_ops: Dict[str, int] = {}
        for node_name in plan.int8_nodes:
            op = plan.ops.get(node_name)
            if op:
                planned_ops[op] = planned_ops.get(op, 0) + 1
            found = by_name.get(node_name)
            if found is not None and not _INT8_KERNEL.match(found) and found in COMPUTE_OPS | QLINEAR_OPS:
                unfused.append(f"{node_name} ({found})")
        # ... and by count, since fused float nodes (FusedConv) get new names.
        for op, kernel in _KERNEL_OF.items():
            want = planned_ops.get(op, 0)
            got = sum(kernels.get(k, 0) for k in kernel)
            if want > got:
                unfused.append(f"{want - got} of {want} planned int8 {op} ran in float")
    return FusionReport(kernels, floats, leftover_q, leftover_dq, unfused)
