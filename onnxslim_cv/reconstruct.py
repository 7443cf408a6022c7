"""Least-squares reconstruction of layers whose inputs lost channels.

After channel removal, each consumer layer (Conv, Gemm, MatMul) sees fewer input channels.
Following He et al., "Channel Pruning for Accelerating Very Deep Neural Networks" (ICCV 2017)
and Luo et al., "ThiNet" (ICCV 2017), its remaining weights and bias are refit so that, on
calibration data, its output matches the *original* layer's output:

    min_W' || W X - (W' X'_kept + b') ||^2 + lam || W' - W_kept ||^2

where X is the original model's input to the layer and X' the pruned model's (so errors made
upstream are corrected downstream: layers are processed in dependency order, in stages). The
ridge term pulls towards the unpruned weights rather than zero, so a layer with few samples
(a classifier after global pooling) stays close to where it was. Only the normal equations
(X'^T X' and X'^T Y, the size of the weights) are accumulated, batch by batch, so memory does
not depend on the number of samples.

A ConvTranspose is fit per output tap: every input pixel's channel vector maps to the
``Cout * kh * kw`` values it scatters, a plain linear map. That is exact when the stride is at
least the kernel (each output pixel comes from one tap, as in the 2x2 stride-2 upsamplers of
segmentation heads) and a proxy when taps overlap. Its bias is one value per output channel, so
the per-tap offsets of the fit are averaged into it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from . import activations, regions, runtime
from .graph_utils import new_constant, replace_constant_values
from .ir import Model

RECONSTRUCTABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MAX_ROWS_ELEMENTS = 1 << 23  # bounds the patch matrix of one batch (~32 MB in float32)


def _pair(values, n, default):
    values = list(values) if values is not None else []
    return values if len(values) == n else [default] * n


def conv_geometry(node: gs.Node, in_hw: Tuple[int, int], kernel: Tuple[int, int]):
    """Strides, dilations, begin pads and output size of a 2-D conv, honouring auto_pad."""
    strides = _pair(node.attrs.get("strides"), 2, 1)
    dilations = _pair(node.attrs.get("dilations"), 2, 1)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    out_hw = []
    begins = []
    for i in range(2):
        effective = (kernel[i] - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = -(-in_hw[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + effective - in_hw[i])
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        elif auto_pad == "VALID":
            begin = 0
            out = (in_hw[i] - effective) // strides[i] + 1
        else:
            begin = pads[i]
            out = (in_hw[i] + pads[i] + pads[i + 2] - effective) // strides[i] + 1
        out_hw.append(out)
        begins.append(begin)
    return strides, dilations, begins, out_hw


def conv_patches(x: np.ndarray, node: gs.Node, kernel: Tuple[int, int], positions: np.ndarray) -> np.ndarray:
    """Im2col rows of a 2-D conv input at the given flat output positions.

    Returns ``[N * len(positions), C * kh * kw]`` in the order of ``weight.reshape(Cout, -1)``.
    Out-of-image taps read zeros (the conv's zero padding).
    """
    n, c, h, w = x.shape
    strides, dilations, begins, out_hw = conv_geometry(node, (h, w), kernel)
    oy, ox = np.divmod(positions, out_hw[1])
    ky = np.arange(kernel[0]) * dilations[0]
    kx = np.arange(kernel[1]) * dilations[1]
    iy = oy[:, None, None] * strides[0] - begins[0] + ky[None, :, None]  # [P, kh, 1]
    ix = ox[:, None, None] * strides[1] - begins[1] + kx[None, None, :]  # [P, 1, kw]
    iy, ix = np.broadcast_arrays(iy, ix)
    valid = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    gathered = x[:, :, np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)]  # [N, C, P, kh, kw]
    gathered = gathered * valid[None, None]
    return gathered.transpose(0, 2, 1, 3, 4).reshape(n * len(positions), c * kernel[0] * kernel[1])


def output_positions(node: gs.Node, x_shape, kernel) -> int:
    _, _, _, out_hw = conv_geometry(node, (x_shape[2], x_shape[3]), kernel)
    return int(out_hw[0] * out_hw[1])


@dataclass
class Consumer:
    """A layer to refit: its node name, and which original input / output positions it keeps."""

    name: str
    in_keep: np.ndarray
    out_keep: np.ndarray
    gram: Optional[np.ndarray] = None
    cross: Optional[np.ndarray] = None
    rows: int = 0
    target_energy: float = 0.0
    error_before: float = 0.0
    error_after: float = 0.0
    skipped: Optional[str] = None


@dataclass
class _FullEquations:
    gram: np.ndarray  # [D+1, D+1] over every input column, plus the ones column
    cross: np.ndarray  # [D+1, R] against every output row of the original layer
    energy: np.ndarray  # [R] squared target per output row
    rows: int = 0


class SliceCache:
    """Each consumer's normal equations on its *unpruned* inputs, for refits that only drop columns.

    While one channel group is measured at several ratios (prune's sensitivity curves), the
    first stage's consumers read the original inputs minus the removed channels
    (:func:`reconstruct` checks that on the first batch of every call), and their rows are
    sampled at the same positions each time, so every ratio's ``X'^T X'`` and ``X'^T Y`` are
    sub-blocks of the full ones. Accumulated once, they spare the later ratios the original
    model's runs and the patch products. An entry depends only on the original model, the data
    and the layer, so it serves every group the layer consumes; the oldest are dropped past
    ``max_bytes`` (0: none kept). It also holds the original model's values on the data
    (:class:`OriginalValues`, up to ``values_bytes``). Use one cache per (model, data) pair.
    """

    def __init__(self, max_bytes: int = 512 << 20, values_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._entries: Dict[str, _FullEquations] = {}
        self.values_bytes = values_bytes
        self._values: Optional[OriginalValues] = None
        self._original: Optional[Model] = None
        self._proto = None
        self._grows: Dict[frozenset, bool] = {}

    def original_facts(self, original: Model, names: Sequence[str]):
        """(``original``'s proto, whether its batch can grow with ``names`` tapped), kept for the
        next calls on the same model (each used to export it and probe a session)."""
        if self._original is not original:
            self._original, self._proto, self._grows = original, original.to_proto(), {}
        key = frozenset(names)
        if key not in self._grows:
            self._grows[key] = activations.batch_can_grow(runtime.with_outputs(self._proto, list(names)))
        return self._proto, self._grows[key]

    def original_values(self, original: Model, data, dynamic_batch: bool, batch_size: int) -> Optional["OriginalValues"]:
        """The store of ``original``'s values on ``data`` (made on first use); None for another
        model or data than the first call's, or when ``values_bytes`` is 0."""
        if not self.values_bytes:
            return None
        if self._values is None:
            proto = self._proto if self._original is original else None
            self._values = OriginalValues(original, data, dynamic_batch, batch_size, self.values_bytes, proto)
        held = self._values
        if held.original is not original or held.data is not data or held.dynamic_batch != dynamic_batch:
            return None
        return held

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _bytes(self) -> int:
        return sum(e.gram.nbytes + e.cross.nbytes for e in self._entries.values())

    def make_room(self, nodes: Sequence[gs.Node], keep: Sequence[str] = ()) -> bool:
        """Whether the full equations of ``nodes`` fit, after dropping the oldest entries not in ``keep``."""
        extra = 0
        for node in nodes:
            matrix, _ = _as_matrix(node)
            extra += 8 * (matrix.shape[1] + 1) * (matrix.shape[1] + 1 + matrix.shape[0])
        held = self._bytes()
        for name in [n for n in self._entries if n not in set(keep)]:
            if held + extra <= self.max_bytes:
                break
            entry = self._entries.pop(name)
            held -= entry.gram.nbytes + entry.cross.nbytes
        return held + extra <= self.max_bytes

    def accumulate(self, node: gs.Node, x: np.ndarray, rng, positions_per_sample: int) -> None:
        matrix, _ = _as_matrix(node)
        kernel, positions = _sample(node, x.shape, rng, positions_per_sample)
        rows = _rows(node, np.asarray(x, dtype=np.float32), kernel, positions)
        gram, cross, energy = _equations(rows, rows, matrix)
        entry = self._entries.get(node.name)
        if entry is None:
            entry = self._entries[node.name] = _FullEquations(np.zeros(gram.shape), np.zeros(cross.shape), np.zeros(energy.shape))
        entry.gram += gram
        entry.cross += cross
        entry.energy += energy
        entry.rows += rows.shape[0]

    def fill(self, consumer: "Consumer", node: gs.Node) -> None:
        """Set ``consumer``'s equations to the sub-blocks of its kept input columns and output rows."""
        entry = self._entries[node.name]
        keep = consumer.in_keep
        if node.op == "Conv":
            keep = np.repeat(keep, int(np.prod(node.inputs[1].values.shape[2:])))
        columns = np.append(keep, True)
        outputs = np.repeat(consumer.out_keep, _taps(node))
        consumer.gram = entry.gram[np.ix_(columns, columns)]
        consumer.cross = entry.cross[np.ix_(columns, outputs)]
        consumer.rows = entry.rows
        consumer.target_energy = float(entry.energy[outputs].sum())


class OriginalValues:
    """The original model's values of any tensors on the calibration batches, computed once.

    Prune's sensitivity curves refit the consumers of one group at many ratios, and compare
    several allocations: every call used to run the original model up to each stage's inputs
    again, and the pruned copy from the graph inputs, although the copy computes the original's
    values up to the group's first changed node. This keeps the batches and the original's
    values per tensor (the least recently used dropped past ``max_bytes``), so the calls
    run only the part of the pruned copy that changed (:mod:`onnxslim_cv.regions`).
    """

    def __init__(self, original: Model, data, dynamic_batch: bool, batch_size: int, max_bytes: int, proto=None):
        """``data``: calibration data, batched here by ``batch_size`` (or the model's fixed
        batch), or a list of feeds (batches) to use as they are."""
        self.original, self.data, self.dynamic_batch = original, data, dynamic_batch
        self.max_bytes = max_bytes
        self.proto = original.to_proto() if proto is None else proto
        if isinstance(data, list):
            batches = data
        else:
            probe = activations.tap_session(self.proto, [], dynamic_batch=dynamic_batch)
            size = activations.session_batch_size(probe, batch_size)
            batches = data.batches(size) if hasattr(data, "batches") else iter(data)
        self.feeds: List[Dict[str, np.ndarray]] = []
        held = 0
        for feed in batches:
            held += sum(np.asarray(v).nbytes for v in feed.values())
            if held > max_bytes // 4:  # the inputs alone would crowd out the values: keep nothing
                self.feeds = []
                break
            self.feeds.append(feed)
        self.usable = bool(self.feeds)
        self._values: Dict[str, List[np.ndarray]] = {}  # insertion order = least recently used first
        self._too_big: set = set()  # tensor sets that did not fit: not tried again

    def _bytes(self) -> int:
        return sum(v.nbytes for arrays in self._values.values() for v in arrays)

    def get(self, names: Sequence[str]) -> Optional[List[Dict[str, np.ndarray]]]:
        """Per batch, ``{name: value}``; None when they alone would exceed ``max_bytes`` (judged
        from the first batch, and remembered) or the inputs did not fit in the first place."""
        inputs = {t.name for t in self.original.graph.inputs}
        missing = [n for n in dict.fromkeys(names) if n not in self._values and n not in inputs]
        key = frozenset(names)
        if not self.usable or key in self._too_big:
            return None
        if missing:
            session = activations.tap_session(self.proto, missing, dynamic_batch=self.dynamic_batch, only=True)
            fresh: Dict[str, List[np.ndarray]] = {n: [] for n in missing}
            held = sum(v.nbytes for n in names if n in self._values for v in self._values[n])
            for number, feed in enumerate(self.feeds):
                values = [np.asarray(v) for v in runtime.run(session, feed, missing)]
                batch = sum(v.nbytes for v in values)
                if held + batch * (len(self.feeds) - number) > self.max_bytes:  # judged from this batch's size
                    self._too_big.add(key)
                    return None
                held += batch
                for name, value in zip(missing, values):
                    fresh[name].append(value)
            self._values.update(fresh)
        for name in names:  # most recently used last
            if name in self._values:
                self._values[name] = self._values.pop(name)
        held = self._bytes()
        wanted = set(names)
        for name in [n for n in self._values if n not in wanted]:
            if held <= self.max_bytes:
                break
            held -= sum(v.nbytes for v in self._values.pop(name))
        return [
            {name: (feed[name] if name in inputs else self._values[name][i]) for name in names}
            for i, feed in enumerate(self.feeds)
        ]


def _taps(node: gs.Node) -> int:
    """Rows of :func:`_as_matrix` per output channel (kh * kw for a ConvTranspose, else 1)."""
    return int(np.prod(node.inputs[1].values.shape[2:])) if node.op == "ConvTranspose" else 1


def _per_channel(node: gs.Node, row_offsets: np.ndarray) -> np.ndarray:
    """Per-row offsets of :func:`_as_matrix` as one bias per output channel.

    For a ConvTranspose, each output pixel sums the taps that land on it: one when the stride
    is at least the kernel (the mean over taps), about (k / s)^2 when taps overlap.
    """
    taps = _taps(node)
    if taps == 1:
        return row_offsets
    strides = _pair(node.attrs.get("strides"), 2, 1)
    kernel = node.inputs[1].values.shape[2:]
    landing = min(strides[0], kernel[0]) * min(strides[1], kernel[1])
    return row_offsets.reshape(-1, taps).sum(axis=1) / landing


def _as_matrix(node: gs.Node) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The layer as ``W [Cout, D]`` (conv weights flattened) and its bias (or None).

    A ConvTranspose gives ``[Cout * kh * kw, Cin]``: one row per output channel and tap, one
    column per input channel; its bias stays per output channel.
    """
    weight = np.asarray(node.inputs[1].values)
    bias = np.asarray(node.inputs[2].values) if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) else None
    if node.op == "Conv":
        return weight.reshape(weight.shape[0], -1), bias
    if node.op == "ConvTranspose":
        return np.moveaxis(weight, 0, -1).reshape(-1, weight.shape[0]), bias
    if node.op == "Gemm":
        matrix = weight if node.attrs.get("transB", 0) else weight.T
        if bias is not None and bias.size != matrix.shape[0]:
            bias = np.broadcast_to(bias.reshape(-1), (matrix.shape[0],)) if bias.size == 1 else None
        return matrix, bias
    return weight.T, None  # MatMul


def reconstructable(node: gs.Node) -> Optional[str]:
    """None if ``node`` can be refit, else the reason it cannot."""
    if node.op not in RECONSTRUCTABLE:
        return "not a Conv / ConvTranspose / Gemm / MatMul"
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return "weight is not a constant"
    if node.op in ("Conv", "ConvTranspose"):
        weight = node.inputs[1].values
        if int(node.attrs.get("group", 1)) != 1:
            return "grouped conv"
        if weight.ndim != 4:
            return "only 2-D convs are refit"
    if node.op == "Gemm":
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0:
            return "Gemm with transA / alpha / beta"
        if len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant):
            return "Gemm bias is not a constant"
    if node.op == "MatMul" and node.inputs[1].values.ndim != 2:
        return "batched MatMul weight"
    return None


def _rows(node: gs.Node, x: np.ndarray, kernel, positions) -> np.ndarray:
    if node.op == "Conv":
        return conv_patches(x, node, kernel, positions)
    if node.op == "ConvTranspose":  # one row per input pixel
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])[positions]
    return x.reshape(-1, x.shape[-1]) if positions is None else x.reshape(-1, x.shape[-1])[positions]


def stage_levels(model: Model, names: Sequence[str]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """(tensor -> how many of ``names`` lie on its longest path from the inputs, node -> the
    same for its inputs): a node of ``names`` is refit in stage ``node_level[node]``."""
    wanted = set(names)
    level: Dict[str, int] = {}
    node_level: Dict[str, int] = {}
    for node in model.graph.nodes:  # topological order
        depth = max([level.get(t.name, 0) for t in node.inputs if isinstance(t, gs.Variable)] or [0])
        node_level[node.name] = depth
        out_depth = depth + (1 if node.name in wanted else 0)
        for tensor in node.outputs:
            level[tensor.name] = out_depth
    return level, node_level


def _stages(model: Model, names: Sequence[str]) -> List[List[str]]:
    """Consumers grouped so that no consumer feeds another one of its own stage."""
    _, node_level = stage_levels(model, names)
    stages: Dict[int, List[str]] = {}
    for name in names:
        stages.setdefault(node_level[name], []).append(name)
    return [stages[k] for k in sorted(stages)]


def reconstruct(
    original: Model,
    pruned: Model,
    consumers: Sequence[Consumer],
    data,
    *,
    ridge: float = 1e-2,
    positions_per_sample: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    progress=None,
    cache: Optional[SliceCache] = None,
) -> List[Consumer]:
    """Refit every consumer of ``pruned`` in place (see the module docstring).

    ``cache``: the first stage's equations are sliced from (or first added to) it whenever that
    stage's inputs are the original ones minus channels."""
    orig_nodes = {n.name: n for n in original.graph.nodes}
    new_nodes = {n.name: n for n in pruned.graph.nodes}
    by_name = {c.name: c for c in consumers}
    todo = []
    for consumer in consumers:
        reason = reconstructable(orig_nodes[consumer.name])
        if reason:
            consumer.skipped = reason
        else:
            todo.append(consumer.name)
    stages = _stages(pruned, todo)
    input_names = sorted({orig_nodes[n].inputs[0].name for n in todo})
    if cache is not None and todo:
        original_proto, dynamic_batch = cache.original_facts(original, input_names)
    else:
        original_proto = original.to_proto() if todo else None
        dynamic_batch = activations.batch_can_grow(runtime.with_outputs(original_proto, input_names)) if todo else False
    store = cache.original_values(original, data, dynamic_batch, batch_size) if cache is not None and todo else None
    # one stream per layer: its rows do not depend on the other layers, its stage or the cache
    rngs = {name: np.random.default_rng([seed, zlib.crc32(name.encode())]) for name in todo}
    # the pruned copy's values at reached taps, up to half the store's budget (512 MB by default)
    frontier = _Frontier(pruned, store.max_bytes // 2) if store is not None else None
    for index, stage in enumerate(stages):
        names = sorted({orig_nodes[n].inputs[0].name for n in stage})
        references = store.get(names) if store is not None else None
        changed = _changed_part(original, pruned, names, store, frontier) if references is not None else None
        # this stage's taps inside the changed part, for the frontier
        computed: Dict[str, List[np.ndarray]] = {name: [] for name in (changed[1] if changed else [])}
        # each stage's sessions compute only what leads to its taps (onnxruntime would run the whole model)
        original_session = None if references is not None else (
            activations.tap_session(original_proto, names, dynamic_batch=dynamic_batch, only=True))
        pruned_session = None if changed is not None else (
            activations.tap_session(pruned, names, dynamic_batch=dynamic_batch, only=True))
        if references is not None:
            batches = iter(store.feeds)
        else:
            size = activations.session_batch_size(pruned_session, batch_size)
            batches = data.batches(size) if hasattr(data, "batches") else iter(data)
        kept = {orig_nodes[n].inputs[0].name: (by_name[n].in_keep, -1 if orig_nodes[n].op == "MatMul" else 1) for n in stage}
        sliced = None  # the first stage's pruned inputs are usually the original ones minus channels
        missing: Optional[List[str]] = None  # with ``cache``: the stage's consumers it must still gather
        for number, feed in enumerate(batches):
            if references is not None:
                reference = references[number]
            else:
                reference = dict(zip(names, runtime.run(original_session, feed, names)))
            if missing is None:
                if sliced:
                    current = {name: np.compress(keep, reference[name], axis) for name, (keep, axis) in kept.items()}
                else:
                    if changed is not None:
                        session, inside, feeds = changed
                        current = dict(reference)
                        current.update(frontier.batch(names, number))
                        if inside:
                            current.update(zip(inside, runtime.run(session, feeds(number), inside)))
                    else:
                        current = dict(zip(names, runtime.run(pruned_session, feed, names)))
                    if sliced is None:
                        sliced = index == 0 and all(_is_slice(reference[name], current[name], *kept[name]) for name in names)
                        if sliced and cache is not None:
                            absent = [n for n in stage if n not in cache]
                            if cache.make_room([orig_nodes[n] for n in absent], keep=stage):
                                missing = absent
                                if not missing:
                                    break  # the whole stage is already in the cache
            if missing is not None:
                for name in missing:
                    cache.accumulate(orig_nodes[name], reference[orig_nodes[name].inputs[0].name], rngs[name], positions_per_sample)
                continue
            for name in stage:
                _accumulate(by_name[name], orig_nodes[name], reference, current, rngs[name], positions_per_sample)
            for name, values in computed.items():
                values.append(current[name])
        if frontier is not None and missing is None and references is not None:
            later = [orig_nodes[n].inputs[0].name for later_stage in stages[index + 1:] for n in later_stage]
            frontier.add(computed, len(references), later)
        for name in stage:
            if missing is not None:
                cache.fill(by_name[name], orig_nodes[name])
            _solve(by_name[name], orig_nodes[name], new_nodes[name], pruned, ridge)
        if progress is not None:
            progress.update(1)
    return list(consumers)


def _changed_part(original: Model, pruned: Model, names: Sequence[str], store: OriginalValues,
                  frontier: Optional["_Frontier"] = None):
    """(session, taps it computes, feeds of batch ``i`` as a function of ``i``) running only the
    nodes of ``pruned`` that differ from ``original`` and lead to ``names``, from the original's
    values where that part begins and, with ``frontier``, from the pruned copy's own values at
    earlier stages' taps; the other taps are the original's values or the frontier's. None
    when no such cut can be made or its feeds do not fit the store."""
    region = regions.changed_region(original, pruned)
    if region is None:
        return None
    covered = frontier.covered_nodes() if frontier is not None else set()
    known = frontier.usable(region, covered) if frontier is not None else []
    inside = [name for name in names if name in region.tensors and name not in known]
    if not inside:
        return None, [], None
    part = region
    if known:  # start from the known taps: their producers and what leads only to them drop out
        kept = frozenset(n for n in region.names if n not in covered)
        part = regions.ChangedRegion(kept, len(kept), region.tensors, tuple(region.feeds) + tuple(known), region.outputs)
    originals = store.get(list(region.feeds))
    if originals is None:
        return None

    def feeds(number: int) -> Dict[str, np.ndarray]:
        return {**originals[number], **{name: frontier.values[name][number] for name in known}}

    try:
        return regions.region_session(pruned, part, feeds(0), inside), inside, feeds
    except Exception:  # onnxruntime refused the cut: run the whole pruned model instead
        return None


class _Frontier:
    """The pruned copy's values at the taps of stages already refit, on the store's batches.

    A stage's taps are final when it runs: the layers upstream of them belong to earlier stages
    (:func:`_stages`), and later refits only change what lies downstream. So each stage can
    start from the taps of the stages before it instead of from the first changed node, and
    the stage-by-stage refit of a deep model runs its changed part about once, not once per
    stage. A known tensor is kept while a node that later taps depend on reads it; past
    ``max_bytes`` the frontier empties and stays unused, and stages start from the first
    changed node again.
    """

    def __init__(self, pruned: Model, max_bytes: int):
        self.max_bytes = max_bytes
        self.values: Dict[str, List[np.ndarray]] = {}
        self.inputs: Dict[str, List[str]] = {}
        self.outputs: Dict[str, List[str]] = {}
        self.producer: Dict[str, str] = {}
        for node in pruned.graph.nodes:
            self.inputs[node.name] = [t.name for t in node.inputs if isinstance(t, gs.Variable) and t.name]
            self.outputs[node.name] = [t.name for t in node.outputs]
            for t in node.outputs:
                self.producer[t.name] = node.name
        self.disabled = max_bytes <= 0

    def batch(self, names: Sequence[str], number: int) -> Dict[str, np.ndarray]:
        return {name: self.values[name][number] for name in names if name in self.values}

    def covered_nodes(self) -> set:
        """Nodes whose outputs are all known: never run again."""
        return {name for name, outs in self.outputs.items() if outs and all(o in self.values for o in outs)}

    def usable(self, region, covered: set) -> List[str]:
        """The known tensors a session can read in place of computing them (those of the
        changed region whose producer is among the ``covered`` nodes)."""
        return [name for name in self.values if name in region.tensors and self.producer.get(name) in covered]

    def add(self, computed: Dict[str, List[np.ndarray]], batches: int, later_taps: Sequence[str]) -> None:
        """Record a stage's taps, then keep only what ``later_taps`` can still need."""
        if self.disabled:
            return
        for name, values in computed.items():
            if len(values) == batches:
                self.values[name] = values
        read: set = set()
        seen: set = set()
        stack = [t for t in later_taps if t not in self.values]
        while stack:  # the nodes the later taps need, up to known tensors
            node = self.producer.get(stack.pop())
            if node is None or node in seen:
                continue
            seen.add(node)
            for name in self.inputs[node]:
                (read.add if name in self.values else stack.append)(name)
        for name in [n for n in self.values if n not in read]:
            del self.values[name]
        if sum(v.nbytes for values in self.values.values() for v in values) > self.max_bytes:
            self.values.clear()
            self.disabled = True


def _is_slice(full: np.ndarray, part: np.ndarray, keep: np.ndarray, axis: int) -> bool:
    """True when ``part`` is ``full`` without the dropped channels (up to float noise).

    Checked on one batch, it lets the first stage skip the pruned model's runs: nothing
    upstream was refit yet, so removal alone changed its inputs, unless an op mixes channels
    (a LayerNormalization over them, say), which this check catches.
    """
    if full.ndim != part.ndim or full.shape[axis] != keep.size:
        return False
    expected = np.compress(keep, full, axis)
    if expected.shape != part.shape:
        return False
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    return bool(np.all(np.abs(expected - part) <= 1e-5 * scale + 1e-7))


def refit_or_compensate(
    original: Model, pruned: Model, consumers: Sequence[Consumer], data, means: Dict[str, np.ndarray], *, seed: int = 0, progress=None,
    cache: Optional[SliceCache] = None,
) -> Tuple[List[Consumer], int]:
    """``--prune-recovery lsq``: refit every consumer; those that could not be refit still get
    the mean of what they lost (:func:`bias_compensation`). Returns the consumers and how many
    biases were compensated."""
    refit = reconstruct(original, pruned, consumers, data, seed=seed, progress=progress, cache=cache)
    skipped = [c for c in refit if c.skipped]
    return refit, bias_compensation(original, pruned, skipped, means) if skipped else 0


def _sample(node: gs.Node, shape, rng, positions_per_sample: int):
    """``(kernel, positions)``: where one batch of the original input ``shape`` gives its rows."""
    if node.op == "ConvTranspose":
        pixels = shape[0] * shape[2] * shape[3]
        budget = positions_per_sample * shape[0]
        return None, np.sort(rng.choice(pixels, size=min(pixels, budget), replace=False))
    if node.op == "Conv":
        kernel = tuple(node.inputs[1].values.shape[2:])
        total = output_positions(node, shape, kernel)
        columns = shape[1] * kernel[0] * kernel[1]
        budget = max(1, min(positions_per_sample, MAX_ROWS_ELEMENTS // max(1, columns * shape[0])))
        return kernel, np.sort(rng.choice(total, size=min(total, budget), replace=False))
    rows = int(np.prod(shape[:-1]))
    return None, None if rows <= 4096 else np.sort(rng.choice(rows, size=4096, replace=False))


def _accumulate(consumer: Consumer, node: gs.Node, reference, current, rng, positions_per_sample) -> None:
    x = reference[node.inputs[0].name]
    x_new = current[node.inputs[0].name]
    matrix, _ = _as_matrix(node)
    matrix = matrix[np.repeat(consumer.out_keep, _taps(node))]
    kernel, positions = _sample(node, x.shape, rng, positions_per_sample)
    rows_orig = _rows(node, np.asarray(x, dtype=np.float32), kernel, positions)
    rows_new = _rows(node, np.asarray(x_new, dtype=np.float32), kernel, positions)
    gram, cross, energy = _equations(rows_new, rows_orig, matrix)
    if consumer.gram is None:
        consumer.gram = np.zeros(gram.shape)
        consumer.cross = np.zeros(cross.shape)
    consumer.gram += gram
    consumer.cross += cross
    consumer.rows += rows_new.shape[0]
    consumer.target_energy += float(energy.sum())


def _equations(rows_new: np.ndarray, rows_orig: np.ndarray, matrix: np.ndarray):
    """One batch's ``X'^T X'``, ``X'^T Y`` (``X'`` with a ones column for the bias, ``Y`` the
    original layer's output) and ``Y``'s energy per output row: float32 products (the normal
    equations always were), summed by the callers in float64."""
    target = rows_orig @ matrix.T.astype(np.float32)
    design = np.concatenate([rows_new, np.ones((rows_new.shape[0], 1), np.float32)], axis=1)
    return design.T @ design, design.T @ target, np.square(target, dtype=np.float64).sum(axis=0)


def _solve(consumer: Consumer, orig_node: gs.Node, node: gs.Node, pruned: Model, ridge: float) -> None:
    if consumer.gram is None or consumer.rows == 0:
        consumer.skipped = "no calibration rows"
        return
    gram, cross = consumer.gram, consumer.cross
    current, current_bias = _as_matrix(node)  # pruned weights, [Cout_kept, D_kept]
    _, orig_bias = _as_matrix(orig_node)
    dim = gram.shape[0] - 1
    if current.shape[1] != dim:
        consumer.skipped = f"shape mismatch ({current.shape[1]} vs {dim})"
        return
    prior = np.concatenate([current.T, np.zeros((1, current.shape[0]))], axis=0).astype(np.float64)
    # the prior's bias row: the target excludes the bias, so the prior offset is zero
    scale = float(np.trace(gram[:dim, :dim])) / max(dim, 1)
    lam = ridge * scale if scale > 0 else ridge
    regulariser = np.full(dim + 1, lam)
    regulariser[dim] = 0.0
    system = gram + np.diag(regulariser)
    try:
        solution = np.linalg.solve(system, cross + regulariser[:, None] * prior)
    except np.linalg.LinAlgError:
        solution = np.linalg.lstsq(system, cross + regulariser[:, None] * prior, rcond=None)[0]

    def error(params):
        # relative squared output error on the calibration rows, from the normal equations
        residual = consumer.target_energy + float(np.sum(params * (gram @ params)) - 2 * np.sum(params * cross))
        return max(residual, 0.0) / max(consumer.target_energy, 1e-30)

    taps = _taps(node)
    bias_delta = _per_channel(node, solution[dim])
    if taps > 1:
        # every tap reads the same pixels, so the best bias shared by a channel's rows is the
        # mean of their free offsets; the written one counts the taps landing on each pixel
        solution[dim] = np.repeat(solution[dim].reshape(-1, taps).mean(axis=1), taps)
    consumer.error_before = error(prior)
    consumer.error_after = error(solution)
    if consumer.error_after > consumer.error_before:
        consumer.skipped = "refit did not reduce the error"
        return
    new_matrix = solution[:dim].T.astype(np.float32)
    new_bias = bias_delta.astype(np.float32)
    base_bias = orig_bias[consumer.out_keep] if orig_bias is not None else np.zeros(new_matrix.shape[0], np.float32)
    _write(pruned, node, new_matrix, (base_bias + new_bias).astype(np.float32))


def _write(model: Model, node: gs.Node, matrix: np.ndarray, bias: np.ndarray) -> None:
    graph = model.graph
    weight = node.inputs[1].values
    if node.op == "Conv":
        replace_constant_values(graph, node, 1, matrix.reshape(weight.shape).astype(weight.dtype))
        _set_bias(graph, node, 2, bias.astype(weight.dtype))
    elif node.op == "ConvTranspose":
        values = np.moveaxis(matrix.reshape(*weight.shape[1:], weight.shape[0]), -1, 0)
        replace_constant_values(graph, node, 1, values.astype(weight.dtype))
        _set_bias(graph, node, 2, bias.astype(weight.dtype))
    elif node.op == "Gemm":
        values = matrix if node.attrs.get("transB", 0) else matrix.T
        replace_constant_values(graph, node, 1, values.astype(weight.dtype))
        _set_bias(graph, node, 2, bias.astype(weight.dtype))
    else:  # MatMul: bias goes into a following Add
        replace_constant_values(graph, node, 1, matrix.T.astype(weight.dtype))
        if np.any(bias != 0):
            _add_bias_after(graph, node, bias.astype(weight.dtype))


def _set_bias(graph: gs.Graph, node: gs.Node, index: int, bias: np.ndarray) -> None:
    if len(node.inputs) > index and isinstance(node.inputs[index], gs.Constant):
        replace_constant_values(graph, node, index, bias.reshape(node.inputs[index].values.shape) if node.inputs[index].values.size == bias.size else bias)
    else:
        constant = new_constant(graph, f"{node.name}.bias", bias)
        while len(node.inputs) < index:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(constant)


def _add_bias_after(graph: gs.Graph, node: gs.Node, bias: np.ndarray) -> None:
    output = node.outputs[0]
    consumers = list(output.outputs)
    for consumer in consumers:
        if consumer.op == "Add":
            other = [t for t in consumer.inputs if t is not output]
            if len(other) == 1 and isinstance(other[0], gs.Constant) and other[0].values.size == bias.size:
                index = consumer.inputs.index(other[0])
                replace_constant_values(graph, consumer, index, (other[0].values.reshape(-1) + bias).reshape(other[0].values.shape))
                return
    fresh = gs.Variable(f"{output.name}_unbiased", dtype=output.dtype, shape=output.shape)
    node.outputs[0] = fresh
    constant = new_constant(graph, f"{node.name}.bias", bias)
    add = gs.Node("Add", name=f"{node.name}_bias", inputs=[fresh, constant], outputs=[output])
    graph.nodes.append(add)


def bias_compensation(
    original: Model, pruned: Model, consumers: Sequence[Consumer], means: Dict[str, np.ndarray]
) -> int:
    """Fold the removed channels' mean contribution into each consumer's bias.

    A removed channel that carried a constant signal (a BN beta after ReLU, say) would
    otherwise shift every output it fed; its mean ``E[x_c]`` times the consumer's weights is
    exactly that shift (up to border effects of padded convs). Returns the number of layers.
    """
    orig_nodes = {n.name: n for n in original.graph.nodes}
    new_nodes = {n.name: n for n in pruned.graph.nodes}
    changed = 0
    for consumer in consumers:
        node = orig_nodes[consumer.name]
        if reconstructable(node) or node.inputs[0].name not in means:
            continue
        removed = ~consumer.in_keep
        if not removed.any():
            continue
        matrix, bias = _as_matrix(node)
        mean = means[node.inputs[0].name]
        if node.op == "Conv":
            kernel_area = int(np.prod(node.inputs[1].values.shape[2:]))
            per_column = np.repeat(mean, kernel_area)
            removed_columns = np.repeat(removed, kernel_area)
        else:
            per_column = mean
            removed_columns = removed
        shift = _per_channel(node, matrix[:, removed_columns] @ per_column[removed_columns])
        shift = shift[consumer.out_keep]
        target = new_nodes[consumer.name]
        current, current_bias = _as_matrix(target)
        base = current_bias if current_bias is not None else np.zeros(current.shape[0], np.float32)
        _write(pruned, target, current, (base + shift).astype(np.float32))
        changed += 1
    return changed
