"""Sensitivity analysis, and per-layer budgets chosen from it.

Layers do not tolerate compression equally: the stem and thin bottlenecks break long before
wide 3x3 convs do, so one sparsity (or channel ratio) everywhere wastes accuracy. We measure,
per layer, the loss at the model outputs when only that layer is compressed, then give every
layer the largest level whose loss stays under one common threshold (:func:`allocate`).

- :func:`analyze_layers`: weight sparsity. Each sparsifiable layer is magnitude-pruned
  (:func:`onnxslim_cv.sparsity.magnitude_mask`) alone to several sparsities.
- :func:`analyze_groups`: channel pruning. Each prunable channel group of the dependency
  graph loses a fraction of its channels alone, removed physically and bias-compensated as
  ``prune --prune-recovery bias`` does.

Losses use the definitions of quant's ``--max-drop-metric``: higher is worse, 0 = unchanged.
``cosine`` is 1 - mean per-sample cosine over every output, ``snr`` noise/signal power over
every output, ``top1`` 1 - top-1 agreement of the classifier-shaped outputs (absent when the
model has none).

Recipes (``onnxslim-cv analyze --recipe-out``), the formats the passes read:

- channel groups, prune's ``--prune-recipe``:
  ``{"target_macs": F, "round_to": N, "groups": {"^name$": ratio, ...}}``, each regex a name
  (node or tensor) found in that group only, so it selects exactly one group;
- layers, the sparsify pass's recipe: ``{"target_sparsity": S, "layers": {node_name: sparsity}}``.
"""

from __future__ import annotations

import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import activations, channel_obs, regions, runtime
from .errors import UserError
from .ir import Model
from .reconstruct import OriginalValues, SliceCache
from .sparsity import SparseLayer, find_layer, sparsifiable_layers

METRICS = ("cosine", "snr", "top1")
DEFAULT_SPARSITIES = (0.3, 0.5, 0.7, 0.9)
DEFAULT_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
DEFAULT_SAMPLES = 64
ALLOCATION_RULES = ("equal", "marginal")
SESSION_BUDGET_BYTES = 768 << 20
"""Weights held by the suffix sessions alive at once; more layers take another reference pass."""
STACK_BUDGET_BYTES = 2 << 30
"""Largest activation x levels x batch x parallel layers (about a quarter of the suffix runs' peak)."""
MAX_WORKERS = 4
"""Layers measured at once (each session with cores / workers threads)."""
CACHE_BUDGET_BYTES = activations.REFERENCE_BUDGET_BYTES
"""Inputs and reference outputs kept in memory between the group evaluations."""
MEASURE_BUDGET_MACS = 4e12
"""Multiply-adds a pass's per-layer curves may cost (each layer's suffix x levels x samples) before
they are measured on fewer samples than the pass asks for: about a minute of onnxruntime on this
project's 2-core machine (ResNet-50 runs at about 40 GMAC/s per thread here). SqueezeNet,
ResNet-20 and MobileNetV2 stay within it at 64 samples; ResNet-50 at 224 x 224 would need 4e13,
ten times as much, and gets 16."""
MIN_MEASURE_SAMPLES = 16
"""The fewest samples a budget cut leaves (a classifier's logits, a detector's maps per sample)."""


@dataclass
class SensitivityCurve:
    """Loss at the model outputs when only this layer (or channel group) is compressed.

    ``levels`` are sparsities (layers) or removed-channel ratios (groups), ascending from 0.0
    (loss 0 by definition). For groups ``macs_at`` holds the whole model's MACs at each level,
    ``pattern`` a regex that selects this group alone in a prune recipe and ``group`` its id.
    """

    name: str
    kind: str  # "layer" | "group"
    levels: List[float]
    loss: Dict[str, List[float]]
    params: int
    macs: int
    members: List[str] = field(default_factory=list)
    op: str = ""
    macs_at: List[int] = field(default_factory=list)
    pattern: Optional[str] = None
    group: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        data = {
            "name": self.name,
            "kind": self.kind,
            "op": self.op,
            "levels": list(self.levels),
            "loss": {k: [_finite(v) for v in values] for k, values in self.loss.items()},
            "params": int(self.params),
            "macs": int(self.macs),
            "members": list(self.members),
        }
        if self.kind == "group":
            data.update(macs_at=[int(m) for m in self.macs_at], pattern=self.pattern, group=self.group)
        return data


def _finite(value: float) -> Optional[float]:
    return float(value) if value is not None and math.isfinite(value) else None


def check_levels(values: Sequence[float], what: str, *, allow_zero: bool = True) -> List[float]:
    """``[0.0] + sorted(values)``: each in [0, 1) (ratios in (0, 1)); UserError otherwise."""
    levels = set()
    for value in values:
        number = float(value)
        low_ok = number >= 0 if allow_zero else number > 0
        if math.isnan(number) or not low_ok or number >= 1:
            interval = "[0, 1)" if allow_zero else "(0, 1)"
            raise UserError(f"{what} {value!r}: must be in {interval}")
        if number > 0:
            levels.add(number)
    if not levels:
        raise UserError(f"no {what} above 0 to measure")
    return [0.0] + sorted(levels)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


class _Losses:
    """The three losses over all outputs, accumulated batch by batch (verify's metrics)."""

    def __init__(self, outputs: Sequence[str]):
        from .verify import _Accumulator

        self.accumulators = [_Accumulator(name) for name in outputs]

    def add(self, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], batch: int) -> None:
        for acc, ref, cand in zip(self.accumulators, reference, candidate):
            acc.add(np.asarray(ref), np.asarray(cand), batch)

    def result(self) -> Dict[str, float]:
        accs = self.accumulators
        if any(a.nonfinite for a in accs):
            return {m: math.inf for m in METRICS if m != "top1" or any(a.classified for a in accs)}
        samples = sum(a.samples for a in accs)
        signal = sum(a.signal for a in accs)
        noise = sum(a.noise for a in accs)
        losses = {
            "cosine": max(0.0, 1.0 - sum(a.cos_sum for a in accs) / samples) if samples else 0.0,
            "snr": noise / signal if signal > 0 else (math.inf if noise > 0 else 0.0),
        }
        classified = sum(a.classified for a in accs)
        if classified:
            losses["top1"] = 1.0 - sum(a.top1 for a in accs) / classified
        return losses


def _curve_losses(results: Sequence[Dict[str, float]]) -> Dict[str, List[float]]:
    """Per metric, [0.0 at level 0] + the measured losses; metrics missing anywhere are dropped."""
    metrics = [m for m in METRICS if all(m in r for r in results)]
    return {m: [0.0] + [float(r[m]) for r in results] for m in metrics}


# ---------------------------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------------------------


def _limit(data, samples: Optional[int]):
    if samples is not None and hasattr(data, "limited"):
        return data.limited(samples)
    return data


def samples_text(data, cap: Optional[int]) -> str:
    """How many samples a curve measured on ``data`` capped at ``cap`` sees, for report notes
    (fewer than ``cap`` when the calibration set is smaller)."""
    count = _count(_limit(data, cap))
    if count is not None:
        return f"{count} samples"
    return f"up to {cap} samples" if cap is not None else "every sample"


def _batches(data, size: int) -> Iterator[Dict[str, np.ndarray]]:
    return data.batches(size) if hasattr(data, "batches") else iter(data)


def _count(data) -> Optional[int]:
    return data.count() if hasattr(data, "count") else None


class _Bar:
    """``progress``: a tqdm-like object (updated, not closed), or a bool / None for our own bar."""

    def __init__(self, progress, total: Optional[int], desc: str, unit: str):
        if progress is not None and hasattr(progress, "update"):
            self.bar, self.own = progress, False
        else:
            from tqdm.auto import tqdm

            disable = None if progress is None else not progress
            self.bar, self.own = tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False), True

    def __enter__(self):
        return self.bar

    def __exit__(self, *exc):
        if self.own:
            self.bar.close()
        return False


def _typed(session, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``feed`` cast to the dtypes the session declares (as runtime.run feeds it)."""
    types = {meta.name: runtime._ORT_TYPES.get(meta.type) for meta in session.get_inputs()}
    return {k: np.asarray(v, dtype=types[k]) if types.get(k) is not None else v for k, v in feed.items()}


def _grows(model: Model) -> bool:
    """True for a fixed batch-1 export that runs larger batches once its batch dim is symbolic."""
    return activations.batch_can_grow(model.to_proto())


def _fixed_batch(session) -> Optional[int]:
    size = activations.session_batch_size(session, 0)
    return size or None


# ---------------------------------------------------------------------------------------------
# Layers: suffix models
# ---------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """How one layer is measured: its suffix (or, failing that, the whole model)."""

    layer: SparseLayer
    feeds: List[str]  # tensors the session reads besides the weight
    outputs: List[str]  # model outputs it computes (the others are unchanged)
    full: bool = False
    reason: str = ""
    weight_bytes: int = 0
    session: Any = None
    stack: int = 1  # sparsity levels one session run computes
    threads: Optional[int] = None  # onnxruntime intra-op threads of its session


def _downstream(node: gs.Node) -> set:
    seen = {id(node)}
    stack = [node]
    while stack:
        current = stack.pop()
        for tensor in current.outputs:
            for consumer in tensor.outputs:
                if id(consumer) not in seen:
                    seen.add(id(consumer))
                    stack.append(consumer)
    return seen


def _plan(model: Model, layer: SparseLayer) -> _Plan:
    """The layer plus every node downstream of it: only that part of the model changes.

    Its inputs are the layer's input and every tensor it reads from upstream (residual
    shortcuts, Concat partners, shape tensors), fed from the reference run of the same batch.
    """
    graph = model.graph
    nodes = {n.name: n for n in graph.nodes}
    node = nodes[layer.node]
    inside = _downstream(node)
    suffix = [n for n in graph.nodes if id(n) in inside]
    outputs_all = [t.name for t in graph.outputs]
    weight_bytes = sum(
        int(t.values.nbytes) for n in suffix for t in n.inputs if isinstance(t, gs.Constant)
    )
    plan = _Plan(layer, [], [], weight_bytes=weight_bytes)
    reason = ""
    if any(list(n.subgraphs()) for n in suffix):
        reason = "a node downstream has subgraphs"
    elif any(isinstance(t, gs.Constant) and t.name == layer.weight for n in graph.nodes if n is not node for t in n.inputs):
        reason = "the weight is shared with another node"
    if reason:
        plan.full, plan.reason = True, reason
        plan.feeds = [t.name for t in graph.inputs]
        plan.outputs = outputs_all
        plan.weight_bytes = sum(int(t.values.nbytes) for t in model.constants())
        return plan
    produced = {id(t) for n in suffix for t in n.outputs}
    feeds: List[str] = []
    for n in suffix:
        for t in n.inputs:
            if isinstance(t, gs.Constant) or not t.name or id(t) in produced or t.name in feeds:
                continue
            feeds.append(t.name)
    plan.feeds = feeds
    plan.outputs = [t.name for t in graph.outputs if id(t) in produced]
    return plan


def _symbolic_dims(shape: Optional[Sequence[Any]], observed: Tuple[int, ...], prefix: str) -> List[Any]:
    """Dim 0 symbolic; other dims as the model infers them when that matches what was fed."""
    inferred = list(shape) if shape is not None and len(shape) == len(observed) else [None] * len(observed)
    dims: List[Any] = []
    for axis, size in enumerate(observed):
        known = inferred[axis]
        if axis > 0 and isinstance(known, (int, np.integer)) and int(known) == int(size):
            dims.append(int(size))
        else:
            dims.append(f"{prefix}_d{axis}")
    return dims


def _relax_outputs(proto: onnx.ModelProto, grow: bool) -> onnx.ModelProto:
    if grow:
        for value in proto.graph.output:
            dims = value.type.tensor_type.shape.dim
            if dims:
                dims[0].Clear()
                dims[0].dim_param = "batch"
    del proto.graph.value_info[:]  # intermediate shapes may pin batch 1
    return proto


_COPY_LOCK = threading.Lock()


def _weight_variable(model: Model, layer: SparseLayer) -> gs.Variable:
    values = np.asarray(model.tensors()[layer.weight].values)
    return gs.Variable(layer.weight, dtype=values.dtype, shape=list(values.shape))


def _suffix_proto(model: Model, plan: _Plan, values: Dict[str, np.ndarray], grow: bool, stack: int = 1) -> onnx.ModelProto:
    """The suffix as a model; feeds declared with the dtypes of the reference values.

    ``stack`` > 1 computes that many sparsity levels in one run: the layer is cloned once per
    level (weight inputs ``<weight>__level<k>``), the clones' outputs are concatenated along
    the batch and every other node reads its upstream inputs tiled as often, so the rest of
    the suffix runs once at ``stack`` times the batch (larger batches run faster per sample).
    """
    with _COPY_LOCK:  # layers are prepared from worker threads; the graph copy walks shared nodes
        work = model.copy()
    graph = work.graph
    node = next(n for n in graph.nodes if n.name == plan.layer.node)
    inside = _downstream(node)
    suffix = [n for n in graph.nodes if id(n) in inside]
    produced = {id(t) for n in suffix for t in n.outputs}
    weight = _weight_variable(work, plan.layer)
    tensors = work.tensors()
    feeds: Dict[str, gs.Variable] = {}
    for index, name in enumerate(plan.feeds):
        value = np.asarray(values[name])
        feeds[name] = gs.Variable(
            name, dtype=value.dtype, shape=_symbolic_dims(getattr(tensors.get(name), "shape", None), value.shape, f"in{index}")
        )
    tiled: Dict[str, gs.Variable] = {}
    extra: List[gs.Node] = []

    def upstream(name: str, for_layer: bool) -> gs.Variable:
        if stack == 1 or for_layer:
            return feeds[name]
        if name not in tiled:
            tiled[name] = gs.Variable(f"{name}__tiled", dtype=feeds[name].dtype)
            extra.append(gs.Node("Concat", name=f"{name}__tile", attrs={"axis": 0}, inputs=[feeds[name]] * stack, outputs=[tiled[name]]))
        return tiled[name]

    for n in suffix:
        for i, t in enumerate(list(n.inputs)):
            if isinstance(t, gs.Constant):
                if t.name == plan.layer.weight:
                    n.inputs[i] = weight
            elif t.name and id(t) not in produced:
                n.inputs[i] = upstream(t.name, n is node)
    weights = [weight]
    if stack > 1:
        weights = [
            gs.Variable(f"{weight.name}__level{k}", dtype=weight.dtype, shape=list(weight.shape)) for k in range(stack)
        ]
        outputs = list(node.outputs)
        node.outputs.clear()
        for k, w in enumerate(weights):
            parts = [gs.Variable(f"{o.name}__level{k}", dtype=o.dtype) for o in outputs]
            inputs = [w if t is weight else t for t in node.inputs]
            extra.append(gs.Node(node.op, name=f"{node.name}__level{k}", attrs=dict(node.attrs), inputs=inputs, outputs=parts))
        for index, out in enumerate(outputs):
            parts = [e.outputs[index] for e in extra if e.name.startswith(f"{node.name}__level")]
            extra.append(gs.Node("Concat", name=f"{out.name}__levels", attrs={"axis": 0}, inputs=parts, outputs=[out]))
        node.inputs.clear()
        suffix = [n for n in suffix if n is not node]
    graph.nodes = extra + suffix
    graph.inputs = [feeds[name] for name in plan.feeds] + weights
    graph.outputs = [t for t in graph.outputs if t.name in set(plan.outputs)]
    return _relax_outputs(work.to_proto(), grow or stack > 1)


def _full_proto(model: Model, plan: _Plan, grow: bool) -> onnx.ModelProto:
    """The whole model with the layer's weight as an input (the fallback, and the check)."""
    with _COPY_LOCK:
        work = model.copy()
    weight = _weight_variable(work, plan.layer)
    for n in work.graph.nodes:
        for i, t in enumerate(list(n.inputs)):
            if isinstance(t, gs.Constant) and t.name == plan.layer.weight:
                n.inputs[i] = weight
    work.graph.inputs = list(work.graph.inputs) + [weight]
    proto = work.to_proto()
    if grow:
        for value in proto.graph.input:
            if value.name == plan.layer.weight:
                continue
            dims = value.type.tensor_type.shape.dim
            if dims:
                dims[0].Clear()
                dims[0].dim_param = "batch"
    return _relax_outputs(proto, grow)


def _lean_session(proto: onnx.ModelProto, quiet: bool = False, threads: Optional[int] = None):
    """A CPU session without onnxruntime's memory arena.

    One suffix session per layer stays alive across the batches, and an arena keeps its peak
    activations for the session's lifetime: gigabytes over a network's layers. Without it,
    memory is returned after every run, at no measurable speed cost.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 4 if quiet else 3
    options.enable_cpu_mem_arena = False
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _prepare(model: Model, plan: _Plan, values: Dict[str, np.ndarray], grow: bool, stack: int) -> None:
    """Build ``plan.session``: stacked suffix, else plain suffix, else the whole model."""
    plan.stack = 1
    threads = plan.threads
    if not plan.full:
        if stack > 1:
            try:
                plan.session = _lean_session(_suffix_proto(model, plan, values, grow, stack), quiet=True, threads=threads)
                plan.stack = stack
                return
            except Exception:
                pass  # measured level by level below
        try:
            plan.session = _lean_session(_suffix_proto(model, plan, values, grow), quiet=True, threads=threads)
            return
        except Exception as exc:  # the whole model always works: measure with it instead
            plan.full, plan.reason = True, f"suffix model failed: {str(exc).splitlines()[0][:120]}"
            plan.feeds = [t.name for t in model.graph.inputs]
            plan.outputs = [t.name for t in model.graph.outputs]
    plan.session = _lean_session(_full_proto(model, plan, grow), threads=threads)


def _stackable(plan: _Plan, values: Dict[str, np.ndarray], n: int) -> bool:
    """Every upstream tensor the suffix reads carries the batch on axis 0."""
    return not plan.full and all(np.ndim(values[name]) > 0 and np.shape(values[name])[0] == n for name in plan.feeds)


def _measure(model: Model, plan: _Plan, values: Dict[str, np.ndarray], weights: List[np.ndarray], n: int,
             grow: bool, stack: int) -> List[Dict[str, np.ndarray]]:
    """The suffix outputs at each sparsity level for one batch."""
    if plan.session is None:
        _prepare(model, plan, values, grow, stack if _stackable(plan, values, n) else 1)
    feed = {name: values[name] for name in plan.feeds}
    if plan.stack > 1 and _stackable(plan, values, n):
        for k, weight in enumerate(weights):
            feed[f"{plan.layer.weight}__level{k}"] = weight
        try:
            got = runtime.run(plan.session, feed, plan.outputs)
        except Exception:
            got = None
        if got is not None and all(np.ndim(o) > 0 and np.shape(o)[0] == plan.stack * n for o in got):
            return [
                {name: np.asarray(o)[k * n:(k + 1) * n] for name, o in zip(plan.outputs, got)}
                for k in range(plan.stack)
            ]
        _prepare(model, plan, values, grow, 1)  # the stacked form does not fit this graph
        feed = {name: values[name] for name in plan.feeds}
    try:
        result = []
        for weight in weights:
            feed[plan.layer.weight] = weight
            result.append(dict(zip(plan.outputs, runtime.run(plan.session, feed, plan.outputs))))
        return result
    except Exception as exc:
        if plan.full:
            raise
        plan.full, plan.reason = True, f"suffix model failed: {str(exc).splitlines()[0][:120]}"
        plan.feeds = [t.name for t in model.graph.inputs]
        plan.outputs = [t.name for t in model.graph.outputs]
        plan.session = None
        return _measure(model, plan, values, weights, n, grow, stack)


def distinct_arrays(arrays: Sequence[np.ndarray]) -> Tuple[List[np.ndarray], List[int]]:
    """The distinct arrays among ``arrays`` (first occurrences, in order) and, for each input,
    the index of its equal among them."""
    distinct: List[np.ndarray] = []
    index: List[int] = []
    for array in arrays:
        for k, seen in enumerate(distinct):
            if seen is array or (seen.shape == np.shape(array) and np.array_equal(seen, array)):
                index.append(k)
                break
        else:
            index.append(len(distinct))
            distinct.append(np.asarray(array))
    return distinct, index


def masked_weights(weight: np.ndarray, sparsities: Sequence[float]) -> List[np.ndarray]:
    """``weight`` with :func:`magnitude_mask`'s zeros at each sparsity, from one sort.

    Same rule as ``magnitude_mask`` (the ``round(s * size)`` smallest |w|, ties by position),
    without sorting the weight again for every level.
    """
    weight = np.asarray(weight)
    order = np.argsort(np.abs(weight).reshape(-1), kind="stable")
    result = []
    for sparsity in sparsities:
        flat = weight.reshape(-1).copy()
        flat[order[: int(round(float(sparsity) * weight.size))]] = 0
        result.append(flat.reshape(weight.shape))
    return result


def _parallelism(layers: int) -> Tuple[int, int]:
    """(layers measured at once, onnxruntime threads each).

    Two single-threaded sessions side by side finish about 20% sooner on two cores than one
    session with two threads: a CNN's many small ops split poorly across threads.
    """
    cores = os.cpu_count() or 1
    workers = max(1, min(MAX_WORKERS, cores, layers))
    return workers, max(1, cores // workers)


def _largest_activation(model: Model) -> int:
    """Bytes per sample of the largest intermediate float tensor whose shape is known."""
    largest = 0
    for tensor in model.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.shape:
            size = 4
            for dim in list(tensor.shape)[1:]:
                size *= dim if isinstance(dim, int) and dim > 0 else 1
            largest = max(largest, size)
    return largest


def _chunks(plans: Sequence[_Plan], budget: int) -> List[List[_Plan]]:
    chunks: List[List[_Plan]] = []
    current: List[_Plan] = []
    used = 0
    for plan in plans:
        if current and used + plan.weight_bytes > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(plan)
        used += plan.weight_bytes
    if current:
        chunks.append(current)
    return chunks


def _node_macs(model: Model, data=None) -> Tuple[Model, Dict[int, int]]:
    """A copy of ``model`` with its dynamic input dims taken from the first sample of ``data``,
    and each of its nodes' multiply-adds per sample (weight layers; unknown shapes count 0)."""
    from .stats import layer_macs

    work = model.copy()
    if data is not None:
        first = next(iter(_batches(_limit(data, 1), 1)), None)
        for tensor in work.graph.inputs:
            if first is not None and tensor.name in first and tensor.shape is not None:
                value = np.asarray(first[tensor.name])
                if len(tensor.shape) == value.ndim:
                    tensor.shape = [dim if isinstance(dim, int) and dim > 0 else size
                                    for dim, size in zip(tensor.shape, value.shape)]
    work.infer_shapes(reset=False)
    return work, {id(n): layer_macs(n) or 0 for n in work.graph.nodes}


def suffix_macs(model: Model, layers: Sequence[SparseLayer], data=None) -> int:
    """Multiply-adds per sample of every layer's suffix, summed: what one sample at one level
    costs :func:`analyze_layers`.

    Dynamic input dims are taken from the first sample of ``data``; weight layers whose shapes
    stay unknown count 0."""
    work, macs = _node_macs(model, data)
    by_name = {n.name: n for n in work.graph.nodes}
    return sum(_downstream_macs(by_name, macs, [layer.node]) for layer in layers)


def _downstream_macs(by_name: Dict[str, gs.Node], macs: Dict[int, int], names: Sequence[str]) -> int:
    """Multiply-adds of the named nodes and everything downstream of any of them, each node once."""
    inside: set = set()
    for name in names:
        node = by_name.get(name)
        if node is not None:
            inside |= _downstream(node)
    return int(sum(macs[i] for i in inside))


def group_suffix_macs(model: Model, groups: Sequence[Any], data=None) -> int:
    """Multiply-adds per sample of what each channel group's pruned copy runs in
    :func:`analyze_groups` (its source nodes and everything downstream of them), summed over
    ``groups`` (depgraph channel groups). Input dims as :func:`suffix_macs` takes them."""
    work, macs = _node_macs(model, data)
    by_name = {n.name: n for n in work.graph.nodes}
    return sum(_downstream_macs(by_name, macs, group.sources or group.nodes) for group in groups)


def model_macs(model: Model, data=None) -> int:
    """Multiply-adds per sample of the whole model (input dims as :func:`suffix_macs` takes them)."""
    return int(sum(_node_macs(model, data)[1].values()))


def samples_within(per_sample: float, wanted: int, *, budget: Optional[float] = None, floor: int = MIN_MEASURE_SAMPLES) -> int:
    """``wanted``, or fewer (not below ``floor``) when ``wanted`` samples at ``per_sample``
    multiply-adds each would cost more than ``budget`` (default :data:`MEASURE_BUDGET_MACS`)."""
    budget = MEASURE_BUDGET_MACS if budget is None else budget
    if per_sample * wanted <= budget:
        return wanted
    return max(min(floor, wanted), int(budget // per_sample))


def budget_note(samples: int, wanted: int, per_sample: float, cost: str, data=None) -> Optional[str]:
    """The report line saying curves saw ``samples`` rather than ``wanted`` samples and why
    (``cost``: what one sample pays for); None when they saw all ``data`` had anyway."""
    available = _count(data) if data is not None else None
    if samples >= wanted or (available is not None and available <= samples):
        return None
    return (f"curves on {samples} samples, not {wanted}: at {per_sample:.2g} multiply-adds per sample ({cost}) "
            f"{wanted} would exceed the {MEASURE_BUDGET_MACS:.0e} budget")


def affordable_samples(model: Model, layers: Sequence[SparseLayer], levels: int, wanted: int, data=None, *,
                       budget: Optional[float] = None, floor: int = MIN_MEASURE_SAMPLES) -> Tuple[int, int]:
    """(samples, MACs per sample) for :func:`analyze_layers` curves at ``levels`` levels:
    :func:`samples_within` of what every layer's suffix costs at every level."""
    per_sample = suffix_macs(model, layers, data) * max(1, levels)
    return samples_within(per_sample, wanted, budget=budget, floor=floor), per_sample


def _resolve_layers(model: Model, layers, include_depthwise: bool, include_first: bool, include_last: bool) -> List[SparseLayer]:
    if layers is None:
        found, _ = sparsifiable_layers(
            model, include_depthwise=include_depthwise, include_first=include_first, include_last=include_last
        )
        return found
    everything, _ = sparsifiable_layers(model, include_depthwise=True, include_first=True, include_last=True)
    return [layer if isinstance(layer, SparseLayer) else find_layer(everything, str(layer)) for layer in layers]


def analyze_layers(
    model: Model,
    data,
    *,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    layers: Optional[Sequence[Any]] = None,
    include_depthwise: bool = False,
    include_first: bool = False,
    include_last: bool = False,
    samples: Optional[int] = DEFAULT_SAMPLES,
    progress=None,
    method: str = "auto",
    weights_at: Optional[Callable[[SparseLayer, np.ndarray, Sequence[float]], List[np.ndarray]]] = None,
) -> List[SensitivityCurve]:
    """Loss at the outputs when only one layer is magnitude-pruned, per layer and sparsity.

    ``layers`` (SparseLayers or node/weight names) defaults to what the sparsify pass touches.
    Why it is fast: one reference run per batch taps every tensor the layers' *suffixes* read;
    each suffix (the layer and all nodes downstream) is one session built once, with the
    weight as an input and all sparsities stacked along the batch, so nothing upstream is
    recomputed and one run measures every level; layers run side by side on the cores. Batches are
    processed one at a time (the tapped activations bounded like
    :func:`activations.batch_size_for`). A layer whose suffix cannot be cut out (subgraphs, a
    shared weight, a suffix onnxruntime refuses) is measured with the whole model instead;
    ``method="full"`` does that for every layer (slow; it checks the suffixes).
    ``weights_at(layer, weight, sparsities)`` replaces plain magnitude pruning by another way of
    making the sparse weights (the sparsify pass's refit ones, say).
    """
    if method not in ("auto", "full"):
        raise ValueError(f"method must be 'auto' or 'full', got {method!r}")
    levels = check_levels(sparsities, "sparsity")
    data = _limit(data, samples)
    work = model.copy()
    work.infer_shapes(reset=False)
    chosen = _resolve_layers(work, layers, include_depthwise, include_first, include_last)
    if not chosen:
        return []
    outputs = [t.name for t in work.graph.outputs]
    inputs = {t.name for t in work.graph.inputs}
    plans = [_plan(work, layer) for layer in chosen]
    if method == "full":
        for plan in plans:
            plan.full, plan.reason = True, "method full"
            plan.feeds, plan.outputs = sorted(inputs), outputs
    grow = _grows(work)
    weights = work.tensors()
    peak = 4 * _largest_activation(work)
    workers, threads = _parallelism(len(plans))
    for plan in plans:
        plan.threads = threads
    results: Dict[int, List[_Losses]] = {}
    total = _count(data)
    seen = 0
    with _Bar(progress, len(plans), "analyze: layers", "layer") as bar:
        for chunk in _chunks(plans, SESSION_BUDGET_BYTES):
            taps = sorted({name for plan in chunk for name in plan.feeds if name not in inputs and name not in outputs})
            batch = activations.batch_size_for(work, taps + outputs, preferred=activations.DEFAULT_BATCH)
            reference = activations.tap_session(work, taps, dynamic_batch=grow)
            fixed = _fixed_batch(reference)
            stack = 1 if fixed or method == "full" else len(levels) - 1
            batch = fixed or max(1, min(batch, STACK_BUDGET_BYTES // max(1, workers * stack * peak)))
            # progress counts layers: each batch is a share of a layer when the sample count is known
            step = 1.0 / -(-total // batch) if total else 0.0
            masked, level_of = {}, {}
            for plan in chunk:
                made = (weights_at(plan.layer, weights[plan.layer.weight].values, levels[1:]) if weights_at
                        else masked_weights(weights[plan.layer.weight].values, levels[1:]))
                # levels that got the same weights (a rank grid coarser than the levels) run once
                masked[id(plan)], level_of[id(plan)] = distinct_arrays(made)
                results[id(plan)] = [_Losses(outputs) for _ in levels[1:]]
            names = outputs + taps

            def reference_batches():
                for feed in _batches(data, batch):
                    if fixed and activations.feed_batch(feed) != fixed:
                        continue  # a fixed-batch export cannot run the short last batch
                    values = dict(zip(names, runtime.run(reference, feed, names)))
                    values.update(_typed(reference, feed))
                    yield values

            def measure(plan: _Plan, values: Dict[str, np.ndarray], n: int) -> None:
                if plan.outputs:  # else it reaches no output: nothing changes
                    ref_out = [values[o] for o in outputs]
                    distinct = masked[id(plan)]
                    got = _measure(work, plan, values, distinct, n, grow, min(stack, len(distinct)))
                    for losses, k in zip(results[id(plan)], level_of[id(plan)]):
                        losses.add(ref_out, [got[k].get(o, values[o]) for o in outputs], n)

            with ThreadPoolExecutor(workers) as pool:
                for values in activations.prefetch(reference_batches()):
                    n = activations.feed_batch({name: values[name] for name in inputs})
                    seen += n
                    for _ in pool.map(measure, chunk, [values] * len(chunk), [n] * len(chunk)):
                        if step:
                            bar.update(step)
            if not step:
                bar.update(len(chunk))
            for plan in chunk:
                plan.session = None  # free the chunk's sessions before the next chunk's
            if not seen:
                raise UserError("sensitivity analysis got no samples (empty data)")
    curves = []
    for plan in plans:
        curves.append(
            SensitivityCurve(
                name=plan.layer.node,
                kind="layer",
                levels=list(levels),
                loss=_curve_losses([losses.result() for losses in results[id(plan)]]),
                params=plan.layer.params,
                macs=plan.layer.macs,
                members=[plan.layer.weight],
                op=plan.layer.op,
            )
        )
    return curves


# ---------------------------------------------------------------------------------------------
# Channel groups
# ---------------------------------------------------------------------------------------------


class ReferenceOutputs:
    """Batches of inputs with ``model``'s outputs, kept in memory when small enough.

    :meth:`loss` compares a candidate (a compressed copy) with them.
    """

    def __init__(self, model: Model, data, grow: Optional[bool] = None):
        self.data = data
        self.grow = _grows(model) if grow is None else grow
        self.session = activations.tap_session(model, [], dynamic_batch=grow)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.fixed = _fixed_batch(self.session)
        self.batch = self.fixed or activations.DEFAULT_BATCH
        self.cache: Optional[List[Tuple[Dict[str, np.ndarray], List[np.ndarray]]]] = None
        cache, used = [], 0
        for pair in self._compute():
            used += sum(v.nbytes for v in pair[0].values()) + sum(np.asarray(v).nbytes for v in pair[1])
            if used > CACHE_BUDGET_BYTES:
                cache = None
                break
            cache.append(pair)
        self.cache = cache
        if self.cache is not None and not self.cache:
            raise UserError("sensitivity analysis got no samples (empty data)")

    @classmethod
    def from_pairs(cls, pairs: List[Tuple[Dict[str, np.ndarray], List[np.ndarray]]], outputs: Sequence[str], *,
                   grow: bool) -> "ReferenceOutputs":
        """Reference outputs computed elsewhere (the quant pass keeps them from its calibration run).

        ``pairs``: batches of ``(feed, [output values])`` in ``outputs`` order; ``grow``: whether
        a candidate's batch dim must be made symbolic to take these feeds."""
        if not pairs:
            raise UserError("sensitivity analysis got no samples (empty data)")
        self = cls.__new__(cls)
        self.data, self.session, self.grow = None, None, grow
        self.outputs, self.fixed, self.batch = list(outputs), None, None
        self.cache = list(pairs)
        return self

    def _compute(self):
        for feed in _batches(self.data, self.batch):
            if self.fixed and activations.feed_batch(feed) != self.fixed:
                continue
            yield feed, [np.asarray(v) for v in runtime.run(self.session, feed, self.outputs)]

    def pairs(self):
        return iter(self.cache) if self.cache is not None else self._compute()

    def loss(self, candidate: Model, original: Optional[Model] = None) -> Dict[str, float]:
        """``candidate``'s losses against the reference outputs.

        ``original``: the model the reference outputs are from, when ``candidate`` is a copy of it
        with some nodes changed (a pruned group). Then only the changed nodes and everything
        downstream of them run, fed with ``original``'s values at the cut (tapped once and kept,
        least recently used dropped past the cache budget, :class:`OriginalValues`): onnxruntime runs every node
        of a session, so the unchanged prefix would otherwise be recomputed for every candidate.
        Same values as the whole candidate up to float rounding where the cut splits a fusion.
        """
        if original is not None and self.cache is not None:
            cut = regions.changed_region(original, candidate)
            if cut is not None and cut.outputs and cut.nodes < len(candidate.graph.nodes):
                values = self._cut_values(original, cut.feeds)
                if values is not None:
                    return self._suffix_loss(candidate, cut, values)
        session = activations.tap_session(candidate, [], dynamic_batch=self.grow)
        losses = _Losses(self.outputs)
        for feed, ref in self.pairs():
            losses.add(ref, runtime.run(session, feed, self.outputs), activations.feed_batch(feed))
        return losses.result()

    def _cut_values(self, original: Model, feeds: Tuple[str, ...]) -> Optional[List[Dict[str, np.ndarray]]]:
        """Per cached batch, ``original``'s values of ``feeds`` (kept for the next candidates,
        up to the cache budget); None when they would not fit."""
        store = getattr(self, "_originals", None)
        if store is None or store.original is not original:
            store = self._originals = OriginalValues(original, [feed for feed, _ in self.cache], self.grow, 0, CACHE_BUDGET_BYTES)
        return store.get(list(feeds))

    def _suffix_loss(self, candidate: Model, cut: regions.ChangedRegion, values: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
        session = regions.region_session(candidate, cut, values[0], cut.outputs)
        losses = _Losses(self.outputs)
        for (feed, ref), cut_feed in zip(self.cache, values):
            got = dict(zip(cut.outputs, runtime.run(session, cut_feed, list(cut.outputs))))
            candidate_outputs = [got[name] if name in got else r for name, r in zip(self.outputs, ref)]
            losses.add(ref, candidate_outputs, activations.feed_batch(feed))
        return losses.result()


class GroupBudget:
    """Exact whole-model MACs of a per-group ratio allocation, with prune's rounding.

    Removes, per group, the ``_allowed_removal`` count of its least important units exactly as
    ``prune`` does for a recipe's ratios, so a budget met here is met by the pass.
    """

    def __init__(self, dg, scores, limits, fixed: Sequence[int] = ()):
        from .passes import prune as P

        self.dg = dg
        self.limits = limits
        self.orders = {g.id: P._ordered_units(g, scores) for g in dg.prunable_groups}
        self.fixed = [int(u) for u in fixed]
        self.evaluate = dg.macs_function()
        self.total = float(dg.macs())

    def removed(self, ratios: Dict[int, float]) -> List[int]:
        from .passes import prune as P

        removed = list(self.fixed)
        for gid, ratio in ratios.items():
            n, step, minimum = self.limits[gid]
            count = P._allowed_removal(n, step, minimum, int(math.floor(float(ratio) * n + 1e-9)))
            removed.extend(self.orders[gid][:count])
        return removed

    def kept(self, ratios: Dict[int, float]) -> float:
        """Fraction of the model's MACs kept."""
        mask = np.zeros(self.dg.num_ids, dtype=bool)
        removed = self.removed(ratios)
        if removed:
            mask[np.asarray(removed, dtype=np.int64)] = True
        return self.evaluate(mask) / self.total if self.total else 1.0

    def kept_fn(self, curves: Sequence["SensitivityCurve"]) -> Callable[[Dict[str, float]], float]:
        """``allocate``'s ``achieved``: curve name -> ratio, to kept MACs fraction."""
        ids = {c.name: c.group for c in curves}
        return lambda levels: self.kept({ids[name]: level for name, level in levels.items()})


_FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")


def _group_patterns(dg, groups) -> Dict[int, Optional[str]]:
    """Per group, an anchored regex of a name no other group has (prune matches names with search).

    Activation outputs (``relu2``) come first: BN folding renames conv and BN outputs, and a
    recipe written for the model as given is often applied after ``fold``.
    """
    owners: Dict[str, set] = {}
    for group in dg.groups:
        for name in group.nodes + group.tensors + group.sources:
            owners.setdefault(name, set()).add(group.id)
    producers = {t.name: n.op for n in dg.model.graph.nodes for t in n.outputs}
    patterns = {}
    for group in groups:
        unique = [n for n in group.tensors + group.sources + group.nodes if owners.get(n) == {group.id}]
        unique.sort(key=lambda name: producers.get(name) in _FOLDABLE or name not in group.tensors)
        patterns[group.id] = f"^{re.escape(unique[0])}$" if unique else None
    return patterns


def _group_params(dg, group) -> int:
    units = np.asarray(group.units)
    total = 0
    for member in dg.members:
        inside = np.isin(dg.find(member.ids), units)
        if inside.any():
            values = member.node.inputs[member.index].values
            total += int(values.size // max(1, values.shape[member.axis]) * int(inside.sum()))
    return total


def group_setup(model: Model, data=None, *, criterion: str = "l2", round_to: int = 1, min_channels: int = 1,
                exclude: Optional[str] = None, moments: bool = True, scores: Optional[np.ndarray] = None,
                limits: Optional[Dict[int, Tuple[int, int, int]]] = None):
    """``(working copy, dependency graph, unit scores, limits, channel moments)`` as prune sees them.

    ``data`` also gives dynamic models the shapes MACs need; ``moments=False`` skips the
    channel statistics (only the bias compensation and the data criteria use them). ``scores``:
    the unit scores prune already computed on ``model`` (the copy's graph has the same unit ids);
    ``limits``: prune's per-group rounding, when it refined ``round_to`` in some groups.
    """
    from .depgraph import build_dependency_graph
    from .passes import prune as P

    work = model.copy()
    dg = build_dependency_graph(work)
    P._ensure_macs(work, dg, data)
    if exclude:
        dg.freeze_matching(exclude, f"excluded by {exclude}")
    stats = None
    if data is not None and (moments or criterion in P.DATA_CRITERIA):
        stats = activations.channel_moments(work, P.consumer_axes(dg), data)
    if criterion in P.DATA_CRITERIA and stats is None:
        raise UserError(f"criterion {criterion} needs calibration data")
    if scores is None:
        covariances = channel_obs.consumer_covariances(work, dg, data) if criterion == "obs" else None
        scores = P.unit_scores(work, dg, criterion, stats, covariances)
    elif len(scores) != dg.num_ids:
        raise RuntimeError("unit scores do not match the model's dependency graph")
    if limits is None:
        limits = P._group_limits(dg, round_to, min_channels)
    return work, dg, scores, limits, stats


def analyze_groups(
    model: Model,
    data,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    samples: Optional[int] = DEFAULT_SAMPLES,
    progress=None,
    criterion: str = "l2",
    round_to: int = 1,
    min_channels: int = 1,
    exclude: Optional[str] = None,
    groups: Optional[Sequence[int]] = None,
    recovery: str = "bias",
    scores: Optional[np.ndarray] = None,
    limits: Optional[Dict[int, Tuple[int, int, int]]] = None,
) -> List[SensitivityCurve]:
    """Loss at the outputs when only one channel group loses ``ratio`` of its channels.

    The least important units (``criterion``, as prune scores them; counts rounded as prune
    rounds them with ``round_to`` / ``min_channels``) are removed physically from a copy,
    then recovered as ``--prune-recovery`` would (``recovery``: none, bias = mean bias
    compensation, lsq = least-squares refit of the group's consumers), and the part of the copy
    that differs from the model is run on the model's own values where it starts
    (:meth:`ReferenceOutputs.loss` with ``original``). ``macs_at`` records the model's MACs per
    level for :func:`allocate`. ``groups`` limits the analysis to these group ids; ``scores``:
    prune's unit scores for ``model``, when it has them (else computed by ``criterion``);
    ``limits``: prune's per-group rounding (else from ``round_to`` / ``min_channels``).
    """
    from .passes import prune as P

    levels = check_levels(ratios, "ratio", allow_zero=False)
    data = _limit(data, samples)
    work, dg, scores, limits, moments = group_setup(
        model, data, criterion=criterion, round_to=round_to, min_channels=min_channels, exclude=exclude, scores=scores,
        limits=limits,
    )
    prunable = {g.id: g for g in dg.prunable_groups}
    if groups is not None:
        missing = [gid for gid in groups if gid not in prunable]
        if missing:
            raise UserError(f"channel groups {missing} are not prunable in this model")
        chosen = [prunable[gid] for gid in groups]
    else:
        chosen = list(prunable.values())
    if not chosen:
        return []
    means = {name: m.mean for name, m in (moments or {}).items()}
    budget = GroupBudget(dg, scores, limits)
    unit_macs = dg.unit_macs()
    patterns = _group_patterns(dg, chosen)
    reference = ReferenceOutputs(work, data)
    cache = SliceCache()  # the levels of a group (and groups sharing a consumer) refit from one pass
    names = [g.describe() for g in chosen]
    curves = []
    with _Bar(progress, len(chosen) * (len(levels) - 1), "analyze: channel groups", "eval") as bar:
        for group, name in zip(chosen, names):
            measured: Dict[int, Dict[str, float]] = {}
            results, macs_at = [], [int(round(budget.total))]
            for ratio in levels[1:]:
                removed = budget.removed({group.id: ratio})
                count = len(removed)
                if count not in measured:
                    if count == 0:
                        measured[count] = {m: 0.0 for m in METRICS}
                    else:
                        measured[count] = reference.loss(P.pruned_copy(work, dg, removed, recovery, data, means, cache), work)
                results.append(measured[count])
                macs_at.append(int(round(budget.kept({group.id: ratio}) * budget.total)))
                bar.update(1)
            if names.count(name) > 1:
                name = f"{name} #{group.id}"
            curves.append(
                SensitivityCurve(
                    name=name,
                    kind="group",
                    levels=list(levels),
                    loss=_curve_losses(results),
                    params=_group_params(dg, group),
                    macs=int(round(float(unit_macs[group.units].sum()))),
                    members=list(group.sources or group.nodes),
                    op="channels",
                    macs_at=macs_at,
                    pattern=patterns[group.id],
                    group=group.id,
                )
            )
    return curves


# ---------------------------------------------------------------------------------------------
# Allocation
# ---------------------------------------------------------------------------------------------


class Allocation(dict):
    """``name -> level`` chosen by :func:`allocate`, plus how the search ended.

    ``threshold``: the common loss every uncapped curve sits at; ``achieved``: the budget
    quantity reached (sparsity for layers, kept MACs fraction for groups); ``reached``: False
    only when ``strict=False`` and even the largest levels miss the target.
    """

    def __init__(self, levels: Dict[str, float], *, target: float, achieved: float, threshold: float,
                 reached: bool, metric: str, cost: str, kind: str, rule: str = "equal"):
        super().__init__(levels)
        self.rule = rule
        self.target = target
        self.achieved = achieved
        self.threshold = threshold
        self.reached = reached
        self.metric = metric
        self.cost = cost
        self.kind = kind

    def to_dict(self) -> Dict[str, Any]:
        return {
            "kind": self.kind,
            "rule": self.rule,
            "metric": self.metric,
            "cost": self.cost,
            "target": self.target,
            "achieved": self.achieved,
            "reached": self.reached,
            "threshold": _finite(self.threshold),
            "levels": dict(self),
        }


def _monotone(curve: SensitivityCurve, metric: str, max_level: Optional[float]) -> Tuple[np.ndarray, np.ndarray]:
    """(levels, running max of the loss), cut at ``max_level`` (interpolated there)."""
    x = np.asarray(curve.levels, dtype=np.float64)
    y = np.asarray(curve.loss[metric], dtype=np.float64)
    y = np.where(np.isnan(y), np.inf, y)
    y = np.maximum.accumulate(y)
    if max_level is not None and max_level < x[-1]:
        keep = x < max_level
        capped = _loss_at(x, y, max_level)
        x = np.append(x[keep], max_level)
        y = np.append(y[keep], capped)
    return x, y


def _loss_at(x: np.ndarray, y: np.ndarray, level: float) -> float:
    i = int(np.searchsorted(x, level, side="right")) - 1
    if i >= len(x) - 1:
        return float(y[-1])
    if not np.isfinite(y[i + 1]):
        return float(y[i]) if level == x[i] else math.inf
    return float(y[i] + (y[i + 1] - y[i]) * (level - x[i]) / (x[i + 1] - x[i]))


def _level_for(x: np.ndarray, y: np.ndarray, threshold: float) -> float:
    """The largest level whose interpolated loss is <= threshold (y is non-decreasing)."""
    i = int(np.searchsorted(y, threshold, side="right")) - 1
    if i < 0:
        return 0.0
    if i >= len(x) - 1:
        return float(x[-1])
    if not np.isfinite(y[i + 1]) or y[i + 1] <= y[i]:
        return float(x[i])
    return float(x[i] + (x[i + 1] - x[i]) * (threshold - y[i]) / (y[i + 1] - y[i]))


def _first_level(x: np.ndarray, y: np.ndarray, threshold: float) -> float:
    """The smallest level whose interpolated loss reaches ``threshold`` (y is non-decreasing)."""
    i = int(np.searchsorted(y, threshold, side="left"))
    if i == 0:
        return 0.0
    if i >= len(x):
        return float(x[-1])
    return float(x[i - 1] + (x[i] - x[i - 1]) * (threshold - y[i - 1]) / (y[i] - y[i - 1]))


def allocate(
    curves: Sequence[SensitivityCurve],
    *,
    target: float,
    metric: str = "cosine",
    cost: str = "params",
    max_level: Optional[float] = None,
    achieved: Optional[Callable[[Dict[str, float]], float]] = None,
    strict: bool = True,
    rule: str = "equal",
) -> Allocation:
    """Per-curve levels meeting a global ``target``: equal degradation everywhere, or least total loss.

    ``rule="marginal"`` instead minimises the *sum* of the curves' losses under the budget (see
    :func:`_marginal_levels`): unlike equal loss it weighs what each level saves, so a big
    layer with a moderate loss gives more than a small one with a flat curve.

    This is AIMET's greedy compression-ratio selection (Qualcomm AIMET, "Greedy Compression
    Ratio Selection"): for a loss threshold ``t`` every curve takes the largest level whose
    (linearly interpolated, running-max monotone) loss is <= ``t``, and ``t`` is binary-searched
    to the smallest value meeting the target (where curves are flat at that loss, as top-1
    often is at 0, they move together across the flat stretch just far enough, so the target
    is met rather than overshot). Equal degradation because, with roughly additive
    per-layer losses, spending the budget where a unit of compression costs least loss (the
    flat curves) minimises the total: at the optimum every layer's marginal loss is the same,
    and equal loss levels are the robust, derivative-free stand-in for that.

    Targets: layer curves: the sparsity, the fraction of the curves' params (``cost="params"``)
    or MACs (``cost="macs"``) zeroed; group curves (``cost="macs"`` only): the fraction of the
    model's MACs kept. Group savings are added up from ``macs_at``, an approximation: a layer
    between two pruned groups keeps ``(1-a)(1-b)`` of its MACs, not ``1-a-b``, so the sum
    overstates the saving; pass ``achieved`` (e.g. :meth:`GroupBudget.kept_fn`) to count
    exactly. An unreachable target raises UserError, or with ``strict=False`` returns the
    largest levels with ``reached=False`` for the caller to warn about.
    """
    if not curves:
        raise UserError("nothing to allocate: no layer or group was analysed")
    if metric not in METRICS:
        raise UserError(f"metric {metric!r}: choose one of {', '.join(METRICS)}")
    if rule not in ALLOCATION_RULES:
        raise UserError(f"allocation rule {rule!r}: choose one of {', '.join(ALLOCATION_RULES)}")
    kinds = {c.kind for c in curves}
    if len(kinds) != 1:
        raise UserError("allocate: curves of layers and of channel groups cannot share one budget")
    kind = kinds.pop()
    if cost not in ("params", "macs"):
        raise UserError(f"cost {cost!r}: choose params or macs")
    if kind == "group" and cost != "macs":
        raise UserError("channel-group budgets are MACs targets (cost='macs')")
    target = float(target)
    if kind == "layer" and not 0.0 <= target < 1.0:
        raise UserError(f"target sparsity {target}: must be in [0, 1)")
    if kind == "group" and not 0.0 < target <= 1.0:
        raise UserError(f"target MACs {target}: the kept fraction, in (0, 1]")
    for curve in curves:
        if metric not in curve.loss:
            raise UserError(f"metric {metric} was not measured for {curve.name} (top1 needs a classifier-shaped output)")
    shapes = [_monotone(c, metric, max_level) for c in curves]

    if kind == "layer":
        weights = np.array([float(c.params if cost == "params" else c.macs) for c in curves])
        if weights.sum() <= 0:
            raise UserError(f"allocate: the layers have no known {cost}")
        gains = [w / weights.sum() * x for w, (x, _) in zip(weights, shapes)]
    else:
        model_macs = float(max(c.macs_at[0] for c in curves))
        savings = [np.asarray([c.macs_at[0] - m for m in c.macs_at], dtype=np.float64) for c in curves]
        gains = [np.interp(x, c.levels, s) / (model_macs or 1.0) for c, s, (x, _) in zip(curves, savings, shapes)]
    if achieved is None:
        if kind == "layer":

            def achieved(levels: Dict[str, float]) -> float:
                return float(sum(w * levels[c.name] for w, c in zip(weights, curves)) / weights.sum())
        else:

            def achieved(levels: Dict[str, float]) -> float:
                saved = sum(float(np.interp(levels[c.name], c.levels, s)) for c, s in zip(curves, savings))
                return 1.0 - saved / model_macs if model_macs else 1.0

    def meets(value: float) -> bool:
        return value >= target - 1e-12 if kind == "layer" else value <= target + 1e-12

    def at(threshold: float) -> Dict[str, float]:
        return {c.name: _level_for(x, y, threshold) for c, (x, y) in zip(curves, shapes)}

    def result(levels, threshold, reached) -> Allocation:
        return Allocation(levels, target=target, achieved=float(achieved(levels)), threshold=threshold,
                          reached=reached, metric=metric, cost=cost, kind=kind, rule=rule)

    finite = [float(v) for _, y in shapes for v in y if np.isfinite(v)]
    top = max(finite) if finite else 0.0
    most = at(top)
    if not meets(achieved(most)):
        if strict:
            what = "sparsity" if kind == "layer" else "kept MACs fraction"
            raise UserError(
                f"target {what} {target:g} is unreachable: at the largest analysed levels it is {achieved(most):.4f} "
                f"(measure larger levels or lower the target)"
            )
        return result(most, top, False)
    if rule == "marginal":
        levels, price = _marginal_levels(curves, shapes, gains, lambda lv: meets(achieved(lv)))
        return result(levels, price, True)
    hi = _smallest_meeting(lambda t: meets(achieved(at(t))), top, steps=200)
    # On flat stretches (top-1 loss is 0 up to some level) the threshold alone overshoots: every
    # level between the first reaching it and the last staying at it has the same loss, so move
    # all curves together across that range just far enough to meet the target.
    upper = at(hi)
    lower = {c.name: min(_first_level(x, y, hi), upper[c.name]) for c, (x, y) in zip(curves, shapes)}

    def blend(share: float) -> Dict[str, float]:
        return {name: lower[name] + share * (upper[name] - lower[name]) for name in upper}

    return result(blend(_smallest_meeting(lambda share: meets(achieved(blend(share))), 1.0, steps=60)), hi, True)


def _marginal_levels(curves, shapes, gains, ok: Callable[[Dict[str, float]], bool]) -> Tuple[Dict[str, float], float]:
    """Levels minimising the summed loss subject to ``ok`` (the budget), and the price that set them.

    The Lagrangian relaxation of the allocation knapsack (as in rate-distortion bit allocation,
    Shoham & Gersho 1988): at a price ``p`` per unit of budget every curve independently takes
    the measured level minimising ``loss - p * gain``, so all sit at the same marginal loss per
    unit saved; ``p`` is bisected to the cheapest price meeting the budget. Between the last
    price that misses and the first that meets, the curves that moved are blended just far
    enough. Price steps are coarse (whole measured levels) and the pass rounds channel counts,
    so the budget may be overshot: a final pass hands the surplus back, one curve at a time,
    to the curves with the highest loss.
    """

    def pick(price: float) -> Dict[str, float]:
        levels = {}
        for curve, (x, y), gain in zip(curves, shapes, gains):
            objective = np.where(np.isfinite(y), y - price * gain, np.inf)
            levels[curve.name] = float(x[int(np.argmin(objective))])
        return levels

    high = 1.0
    while not ok(pick(high)):
        high *= 4.0
        if high > 1e12:
            raise RuntimeError("marginal allocation: no price meets a budget the largest levels meet")
    low = 0.0
    for _ in range(80):
        mid = (low + high) / 2
        if ok(pick(mid)):
            high = mid
        else:
            low = mid
    below, above = pick(low), pick(high)

    def blend(share: float) -> Dict[str, float]:
        return {name: below[name] + share * (above[name] - below[name]) for name in above}

    levels = blend(_smallest_meeting(lambda share: ok(blend(share)), 1.0, steps=40))
    losses = {c.name: _loss_at(x, y, levels[c.name]) for c, (x, y) in zip(curves, shapes)}
    for name in sorted(levels, key=lambda n: -losses[n]):
        if levels[name] <= 0:
            continue
        current = levels[name]

        def lowered(value: float, name=name) -> Dict[str, float]:
            return {**levels, name: value}

        levels[name] = _smallest_meeting(lambda v: ok(lowered(v)), current, steps=24)
    return levels, high


def _smallest_meeting(ok: Callable[[float], bool], high: float, *, steps: int) -> float:
    """Smallest x in [0, high] with ``ok(x)`` for a monotone ``ok`` that holds at ``high`` (bisection)."""
    if ok(0.0):
        return 0.0
    lo, hi = 0.0, high
    for _ in range(steps):
        mid = (lo + hi) / 2
        if mid <= lo or mid >= hi:
            break
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------------------------------------
# Output: recipes, tables, plots
# ---------------------------------------------------------------------------------------------


def recipe(curves: Sequence[SensitivityCurve], allocation: Allocation, *, round_to: int = 1) -> Tuple[Dict[str, Any], List[str]]:
    """The recipe the passes read (see the module docstring), and the curves left out of it."""
    if allocation.kind == "layer":
        return {"target_sparsity": allocation.target, "layers": {c.name: float(allocation[c.name]) for c in curves}}, []
    groups, missing = {}, []
    for curve in curves:
        if curve.pattern is None:
            missing.append(curve.name)
        else:
            groups[curve.pattern] = float(allocation[curve.name])
    return {"target_macs": allocation.target, "round_to": round_to, "groups": groups}, missing


def _loss_text(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return "inf"
    return "0" if value == 0 else f"{value:.2e}"


def format_table(curves: Sequence[SensitivityCurve], metric: str, allocation: Optional[Allocation] = None) -> str:
    """Per layer (group): op, params, loss at each level, and the chosen level."""
    from .report import human, table

    if not curves:
        return "(nothing analysed)"
    kind = curves[0].kind
    levels = curves[0].levels[1:]
    label = "sparsity" if kind == "layer" else "ratio"
    headers = ["layer" if kind == "layer" else "channel group", "op", "params", "MACs"]
    headers += [f"{label} {level:g}" for level in levels]
    if allocation is not None:
        headers += [f"chosen {label}", f"{metric} loss"]
    rows = []
    for curve in curves:
        losses = curve.loss.get(metric)
        row = [curve.name, curve.op, human(curve.params), human(curve.macs)]
        row += [_loss_text(v) for v in (losses[1:] if losses else [None] * len(levels))]
        if allocation is not None:
            level = allocation.get(curve.name, 0.0)
            x, y = _monotone(curve, metric, None) if losses else (None, None)
            row += [f"{level:.3f}", _loss_text(_loss_at(x, y, level) if losses else None)]
        rows.append(row)
    text = f"{metric} loss (higher is worse, 0 = unchanged) when only that {'layer' if kind == 'layer' else 'group'} is compressed\n"
    text += table(headers, rows, align="llrr" + "r" * (len(headers) - 4))
    if allocation is not None:
        text += "\n" + summary_line(curves, allocation)
    return text


def summary_line(curves: Sequence[SensitivityCurve], allocation: Allocation) -> str:
    verdict = "" if allocation.reached else " (target NOT reached: every layer at its largest level)"
    if allocation.kind == "layer":
        weights = sum(c.params for c in curves)
        return (
            f"allocation: {allocation.cost} sparsity {allocation.achieved:.4f} over {len(curves)} layers "
            f"({weights} params) for target {allocation.target:g}, equal {allocation.metric} loss "
            f"{_loss_text(allocation.threshold)}{verdict}"
        )
    return (
        f"allocation: keeps {allocation.achieved:.4f} of the model's MACs for target {allocation.target:g} "
        f"({len(curves)} groups), equal {allocation.metric} loss {_loss_text(allocation.threshold)}{verdict}"
    )


PLOT_HINT = "install onnxslim-cv[plot] (pip install 'onnxslim-cv[plot]') to use --plot"


def require_matplotlib() -> None:
    """UserError naming the extra when matplotlib is missing (an optional dependency)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"--plot needs matplotlib: {PLOT_HINT}") from None


def plot(curves: Sequence[SensitivityCurve], path, *, metric: str = "cosine", allocation: Optional[Allocation] = None) -> None:
    """PNG: loss curves (log y) and, with an allocation, the chosen level per layer."""
    require_matplotlib()
    from matplotlib.figure import Figure

    panels = 2 if allocation is not None else 1
    height = 4.5 if allocation is None else max(4.5, 0.18 * len(curves) + 1.5)
    figure = Figure(figsize=(7 * panels, height))
    axes = figure.subplots(1, panels, squeeze=False)[0]
    label = "sparsity" if curves and curves[0].kind == "layer" else "removed channel ratio"
    ax = axes[0]
    for curve in curves:
        losses = curve.loss.get(metric)
        if not losses:
            continue
        y = [max(v, 1e-12) if math.isfinite(v) else np.nan for v in losses[1:]]
        ax.plot(curve.levels[1:], y, marker="o", linewidth=1, markersize=3, label=curve.name)
    if allocation is not None and allocation.threshold > 0:
        ax.axhline(allocation.threshold, color="black", linestyle="--", linewidth=1, label="allocation threshold")
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel(f"{metric} loss")
    ax.set_title("per-layer sensitivity" if label == "sparsity" else "per-group sensitivity")
    ax.grid(True, which="both", alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    if allocation is not None:
        bars = axes[1]
        names = [c.name for c in curves]
        bars.barh(range(len(names)), [allocation.get(n, 0.0) for n in names])
        bars.set_yticks(range(len(names)))
        bars.set_yticklabels(names, fontsize=6)
        bars.invert_yaxis()
        bars.set_xlabel(f"chosen {label}")
        bars.set_title(f"allocation for target {allocation.target:g} (achieved {allocation.achieved:.3f})")
    figure.tight_layout()
    figure.savefig(str(path), dpi=110)
