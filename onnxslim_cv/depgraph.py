"""Channel dependency graph: which channels of an ONNX graph must be removed together.

Every structural pass (channel pruning, and later low-rank and sensitivity analysis) needs the
same fact: removing output channel 5 of a conv also removes input channel 5 of every layer that
reads it, the matching channel of the residual branch it is added to, the 5th slot of the BN
after it, 5*H*W..(5+1)*H*W-1 of the Gemm after a Flatten, its slot after a Concat offset...
Following the DepGraph idea (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023)
but on the ONNX graph itself, this module tracks each activation tensor's channel axis as an
array of **unit ids** (one id per position; repeated ids when one channel owns a block of
positions, as after Flatten or DepthToSpace) and merges ids with a union-find whenever an op
couples positions (element-wise ops, grouped convs, group norms). After one topological walk:

- a *unit* (union-find root) is the smallest thing that can be removed: all positions, in all
  tensors, that carry it go together;
- a :class:`ChannelGroup` collects the units that appear in exactly the same tensors (a conv's
  output channels; a residual spine shared by several convs; one Concat input's share);
- :class:`Member` records every constant slice that belongs to a unit (weights, biases, BN and
  norm parameters, per-channel constants), and a list of fix-ups records the attributes and
  shape constants that change with the channel counts (conv ``group``, Reshape targets, Split
  sizes, Slice bounds...).

Anything the rules do not understand *freezes* the units it touches (never pruned), with the
reason reported; graph outputs are frozen, so a pruned model keeps its interface.
:func:`prune_channels` removes a set of units physically.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .graph_utils import name_nodes, new_constant, replace_constant_values
from .ir import Model
from .stats import layer_macs

# Ops that act on each channel independently: the output carries the input's layout.
UNARY_OPS = frozenset(
    """Relu LeakyRelu Clip Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Softplus Softsign
    Exp Log Sqrt Abs Neg Erf Gelu Mish Reciprocal Floor Ceil Round Sign Cast Identity Dropout
    ThresholdedRelu Sin Cos Swish""".split()
)
POOL_OPS = frozenset("MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool".split())
ELEMENTWISE_OPS = frozenset("Add Sub Mul Div Max Min Pow Sum Mean PRelu Where Equal Greater Less".split())
REDUCE_OPS = frozenset(
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSumExp ReduceSumSquare".split()
)


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Which unit each position of a tensor's channel axis belongs to."""

    axis: int
    ids: np.ndarray  # int64, one entry per position on ``axis`` (before union)


@dataclass
class Member:
    """A constant slice owned by channels: ``node.inputs[index]`` along ``axis``.

    ``role`` is ``out`` (a layer's own filters: conv weight dim 0, bias), ``in`` (a consumer's
    input slice: conv weight dim 1, Gemm columns) or ``param`` (BN / norm / per-channel
    constants). ``input_tensor`` is the activation an ``in`` member multiplies.
    """

    node: gs.Node
    index: int
    axis: int
    ids: np.ndarray
    role: str
    input_tensor: Optional[str] = None


@dataclass
class Fixup:
    """An attribute or shape constant to recompute once the kept channels are known."""

    kind: str
    node: gs.Node
    data: dict


@dataclass
class WeightLayer:
    """A Conv / ConvTranspose / Gemm / MatMul, with the layouts its MACs scale with."""

    node: gs.Node
    macs: int
    in_ids: Optional[np.ndarray]
    out_ids: Optional[np.ndarray]


@dataclass
class ChannelGroup:
    """Units that appear in exactly the same tensors, hence share one keep-count decision."""

    id: int
    units: List[int]  # union-find roots, in channel order of the first tensor
    tensors: List[str]
    sources: List[str]  # nodes whose outputs create these channels (convs, gemms)
    consumers: List[str]  # weight layers that read them as input channels
    nodes: List[str]  # every node with a member or fix-up in this group
    channels: int  # positions in the first tensor
    frozen: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.frozen

    @property
    def positions_per_unit(self) -> int:
        return max(1, self.channels // max(1, len(self.units)))

    def describe(self) -> str:
        sources = ", ".join(self.sources[:3]) + (f" (+{len(self.sources) - 3})" if len(self.sources) > 3 else "")
        return sources or (self.tensors[0] if self.tensors else f"group {self.id}")


# ---------------------------------------------------------------------------------------------
# Shape helpers (symbolic dims are opaque names; None is unknown)
# ---------------------------------------------------------------------------------------------


def _dims(tensor: gs.Tensor) -> Optional[List[object]]:
    if isinstance(tensor, gs.Constant):
        return list(tensor.values.shape)
    if tensor.shape is None:
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else (d if isinstance(d, str) and d else None) for d in tensor.shape]


def _product(dims: Sequence[object]) -> Optional[Tuple[int, int]]:
    """(product of the static dims, number of dynamic dims).

    Dynamic dims (the batch, in practice) are compared by count only: ONNX shape inference
    often loses the symbol through a ``-1`` Reshape entry, and a CV graph has one such dim.
    """
    total, dynamic = 1, 0
    for d in dims:
        if isinstance(d, int):
            total *= d
        else:
            dynamic += 1
    return total, dynamic


def _const(tensor: Optional[gs.Tensor]) -> Optional[np.ndarray]:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def _input(node: gs.Node, index: int) -> Optional[gs.Tensor]:
    if index < len(node.inputs):
        tensor = node.inputs[index]
        if isinstance(tensor, gs.Constant) or (tensor.name or ""):
            return tensor
    return None


_SELECTION_OPS = frozenset("Reshape Transpose Gather Squeeze Unsqueeze Slice Split Identity Flatten".split())
_SELECTION_MAX_NODES = 16
_SELECTION_PROBE_LIMIT = 1 << 24  # elements of the probe tensor (int64): 128 MB at most


def _run_layout_op(node: gs.Node, x: np.ndarray) -> List[np.ndarray]:
    """``node``'s outputs on ``x`` for the layout ops a channel selection may contain."""
    op, attrs = node.op, node.attrs
    consts = [None if not t.name and not isinstance(t, gs.Constant) else _const(t) for t in node.inputs[1:]]

    def given(index):
        return consts[index - 1] if index - 1 < len(consts) else None

    if op == "Identity":
        return [x]
    if op == "Reshape":
        target = [int(v) for v in given(1)]
        if not attrs.get("allowzero", 0):
            target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
        return [x.reshape(target)]
    if op == "Transpose":
        perm = attrs.get("perm")
        return [np.transpose(x, perm)]
    if op == "Gather":
        return [np.take(x, given(1).astype(np.int64), axis=int(attrs.get("axis", 0)))]
    if op == "Flatten":
        axis = int(attrs.get("axis", 1)) % (x.ndim + 1)
        return [x.reshape(int(np.prod(x.shape[:axis])), -1)]
    if op in ("Squeeze", "Unsqueeze"):
        axes = attrs.get("axes")
        if axes is None and given(1) is not None:
            axes = given(1).tolist()
        if op == "Squeeze":
            axes = [i for i, d in enumerate(x.shape) if d == 1] if axes is None else [int(a) % x.ndim for a in axes]
            return [np.squeeze(x, axis=tuple(axes))]
        rank = x.ndim + len(axes)
        return [np.expand_dims(x, tuple(sorted(int(a) % rank for a in axes)))]
    if op == "Slice":
        starts, ends = given(1).tolist(), given(2).tolist()
        axes = given(3).tolist() if given(3) is not None else list(range(len(starts)))
        steps = given(4).tolist() if given(4) is not None else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            index[int(axis) % x.ndim] = slice(*slice(int(start), int(end), int(step)).indices(x.shape[int(axis) % x.ndim]))
        return [x[tuple(index)]]
    if op == "Split":
        axis = int(attrs.get("axis", 0)) % x.ndim
        sizes = attrs.get("split")
        if sizes is None and given(1) is not None:
            sizes = given(1).tolist()
        if sizes is None:
            count = len(node.outputs)
            chunk = -(-x.shape[axis] // count)
            sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(count)]
        return np.split(x, np.cumsum(sizes)[:-1], axis=axis)
    raise ValueError(op)


def _merged_axis(dims: Sequence[object], out_dims: Sequence[object], axis: int) -> Optional[Tuple[int, int, int]]:
    """Where a Reshape merges the channel ``axis`` with static dims on both sides of it into one
    output axis (``[N, H, W, C] -> [N, H*W*C]``): (output axis, product of the merged dims
    before the channel axis, product after it). None for any other reshape."""
    if not isinstance(dims[axis], int):
        return None
    for start in range(axis - 1, -1, -1):
        if any(not isinstance(d, int) for d in dims[start:axis]):
            break
        head = _product(dims[:start])
        for b in range(len(out_dims)):
            if _product(out_dims[:b]) != head or not isinstance(out_dims[b], int):
                continue
            for end in range(axis, len(dims)):
                if any(not isinstance(d, int) for d in dims[axis + 1 : end + 1]):
                    break
                if _product(dims[: end + 1]) == _product(out_dims[: b + 1]):
                    before = _product(dims[start:axis])[0]
                    after = _product(dims[axis + 1 : end + 1])[0]
                    if before > 1 and out_dims[b] == before * after * dims[axis]:
                        return b, before, after
    return None


def _interleaved_rows(picked: np.ndarray) -> Optional[np.ndarray]:
    """``picked`` as rows of G consecutive positions holding channels ``i, i + C/G, ...``
    (the ``[N, G, C/G]`` transpose of a channel shuffle), for the smallest such G; else None."""
    length = len(picked)
    for groups in range(2, length // 2 + 1):
        if length % groups:
            continue
        rows = picked.reshape(-1, groups)
        if np.array_equal(rows - rows[:, :1], np.broadcast_to(np.arange(groups) * (length // groups), rows.shape)):
            return rows
    return None


def _selected_planes(probe: np.ndarray, value: np.ndarray, axis: int) -> Optional[np.ndarray]:
    """The probe channels ``value`` consists of (whole planes, in order), or None."""
    if value.ndim != probe.ndim or value.shape[axis] == 0:
        return None
    if any(value.shape[i] != probe.shape[i] for i in range(probe.ndim) if i != axis):
        return None
    planes = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
    source = np.moveaxis(probe, axis, 0).reshape(probe.shape[axis], -1)
    picked = np.unravel_index(planes[:, 0], probe.shape)[axis].astype(np.int64)
    return picked if np.array_equal(planes, source[picked]) else None


# ---------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------


class DependencyGraph:
    """Channel units, groups, members and fix-ups of one model (see the module docstring).

    Build with :func:`build_dependency_graph`. Ids in ``layouts`` / members are raw; use
    :meth:`find` (vectorised over arrays) to map them to units.
    """

    def __init__(self, model: Model):
        self.model = model
        self.layouts: Dict[str, Layout] = {}
        self.members: List[Member] = []
        self.fixups: List[Fixup] = []
        self.weight_layers: List[WeightLayer] = []
        self.groups: List[ChannelGroup] = []
        self._parent: List[int] = []
        self._source: List[str] = []
        self._reasons: Dict[int, List[str]] = {}
        self._notes: Dict[int, List[str]] = {}
        self._roots: Optional[np.ndarray] = None

    # -- union-find ---------------------------------------------------------------------------
    def new_ids(self, count: int, source: str) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + count))
        self._source.extend([source] * count)
        return np.arange(start, start + count, dtype=np.int64)

    def _find_one(self, x: int) -> int:
        parent = self._parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self._find_one(int(a)), self._find_one(int(b))
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self._parent[rb] = ra
        for table in (self._reasons, self._notes):
            if rb in table:
                table.setdefault(ra, []).extend(x for x in table.pop(rb) if x not in table.get(ra, []))
        self._roots = None

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge position i of ``a`` with position i of ``b``."""
        pairs = np.unique(np.stack([np.asarray(a, np.int64), np.asarray(b, np.int64)], axis=1), axis=0)
        for x, y in pairs:
            if x != y:
                self.union(x, y)

    def unify_all(self, ids: np.ndarray) -> None:
        ids = np.unique(np.asarray(ids, np.int64))
        for x in ids[1:]:
            self.union(ids[0], x)

    def unify_all_columns(self, rows: np.ndarray) -> None:
        """Merge the ids of each column of ``rows`` (a 2-D array)."""
        for column in np.asarray(rows, np.int64).T:
            self.unify_all(column)

    def find(self, ids: np.ndarray) -> np.ndarray:
        if self._roots is None or len(self._roots) != len(self._parent):
            self._roots = np.array([self._find_one(i) for i in range(len(self._parent))], dtype=np.int64)
        return self._roots[np.asarray(ids, np.int64)]

    def freeze(self, ids: Optional[np.ndarray], reason: str) -> None:
        if ids is None or len(ids) == 0:
            return
        for root in np.unique(self.find(ids)):
            reasons = self._reasons.setdefault(int(root), [])
            if reason not in reasons:
                reasons.append(reason)

    def note(self, ids: np.ndarray, text: str) -> None:
        for root in np.unique(self.find(ids)):
            notes = self._notes.setdefault(int(root), [])
            if text not in notes:
                notes.append(text)

    def frozen_reasons(self, root: int) -> List[str]:
        return self._reasons.get(int(self._find_one(root)), [])

    # -- queries ------------------------------------------------------------------------------
    def layout(self, tensor: gs.Tensor) -> Optional[Layout]:
        return self.layouts.get(tensor.name) if tensor is not None else None

    def group_of(self, name: str) -> List[ChannelGroup]:
        """Groups with a node or tensor called ``name``."""
        return [g for g in self.groups if name in g.nodes or name in g.tensors or name in g.sources]

    @property
    def prunable_groups(self) -> List[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def keep_mask(self, ids: np.ndarray, removed: np.ndarray) -> np.ndarray:
        """Positions of ``ids`` that survive when the units in ``removed`` (roots) go."""
        return ~np.isin(self.find(ids), removed)

    def macs(self, removed: Optional[Iterable[int]] = None) -> int:
        """Estimated MACs of the weight layers after removing ``removed`` units."""
        mask = np.zeros(self.num_ids, dtype=bool)
        mask[np.asarray(sorted(set(removed or ())), dtype=np.int64)] = True
        return int(round(self.macs_function()(mask)))

    def macs_function(self) -> Callable[[np.ndarray], float]:
        """A fast ``removed-mask -> MACs`` function for budget searches.

        The argument is a boolean array indexed by raw unit id (True = removed).
        """
        layers = []
        for layer in self.weight_layers:
            parts = [self.find(ids) for ids in (layer.in_ids, layer.out_ids) if ids is not None and len(ids)]
            layers.append((float(layer.macs), parts))

        def evaluate(removed_mask: np.ndarray) -> float:
            total = 0.0
            for macs, parts in layers:
                fraction = 1.0
                for roots in parts:
                    fraction *= 1.0 - removed_mask[roots].mean()
                total += macs * fraction
            return total

        return evaluate

    def unit_macs(self) -> np.ndarray:
        """MACs each unit saves on its own (first-order), indexed by raw id (roots meaningful)."""
        saved = np.zeros(self.num_ids)
        for layer in self.weight_layers:
            for ids in (layer.in_ids, layer.out_ids):
                if ids is not None and len(ids):
                    np.add.at(saved, self.find(ids), layer.macs / len(ids))
        return saved

    @property
    def num_ids(self) -> int:
        return len(self._parent)

    def summary(self) -> Dict[str, object]:
        conv_channels = 0
        prunable_channels = 0
        for group in self.groups:
            if any(self._is_conv_source(s) for s in group.sources):
                conv_channels += group.channels
                if group.prunable:
                    prunable_channels += group.channels
        return {
            "groups": len(self.groups),
            "prunable_groups": len(self.prunable_groups),
            "channels": sum(g.channels for g in self.groups),
            "prunable_channels": sum(g.channels for g in self.prunable_groups),
            "conv_channels": conv_channels,
            "prunable_conv_channels": prunable_channels,
        }

    def _is_conv_source(self, name: str) -> bool:
        node = self._nodes_by_name.get(name)
        return node is not None and node.op in ("Conv", "ConvTranspose")

    # -- groups -------------------------------------------------------------------------------
    def _finish(self) -> None:
        self._nodes_by_name = {n.name: n for n in self.model.graph.nodes}
        appearance: Dict[int, List[str]] = defaultdict(list)
        first_position: Dict[int, Tuple[int, int]] = {}
        order = [n for n in self.layouts]  # insertion order = topological order
        for t_index, name in enumerate(order):
            roots = self.find(self.layouts[name].ids)
            seen = set()
            for position, root in enumerate(roots.tolist()):
                if root not in seen:
                    seen.add(root)
                    appearance[root].append(name)
                    first_position.setdefault(root, (t_index, position))
        by_key: Dict[Tuple[str, ...], List[int]] = defaultdict(list)
        for root, names in appearance.items():
            by_key[tuple(names)].append(root)
        member_roots: Dict[int, List[Member]] = defaultdict(list)
        for member in self.members:
            for root in np.unique(self.find(member.ids)).tolist():
                member_roots[root].append(member)
        fixup_roots: Dict[int, Set[str]] = defaultdict(set)
        for fixup in self.fixups:
            for root in np.unique(self.find(fixup.data["ids"])).tolist():
                fixup_roots[root].add(fixup.node.name)
        groups = []
        for names, roots in sorted(by_key.items(), key=lambda kv: min(first_position[r] for r in kv[1])):
            roots = sorted(roots, key=lambda r: first_position[r])
            sources, consumers, nodes = [], [], []
            for root in roots:
                for member in member_roots.get(root, []):
                    target = {"out": sources, "in": consumers}.get(member.role)
                    if target is not None and member.node.name not in target:
                        target.append(member.node.name)
                    if member.node.name not in nodes:
                        nodes.append(member.node.name)
                for node_name in sorted(fixup_roots.get(root, ())):
                    if node_name not in nodes:
                        nodes.append(node_name)
            reasons: List[str] = []
            notes: List[str] = []
            for root in roots:
                for reason in self._reasons.get(root, []):
                    if reason not in reasons:
                        reasons.append(reason)
                for text in self._notes.get(root, []):
                    if text not in notes:
                        notes.append(text)
            first = self.layouts[names[0]]
            channels = int(np.isin(self.find(first.ids), roots).sum())
            groups.append(
                ChannelGroup(
                    id=len(groups),
                    units=roots,
                    tensors=list(names),
                    sources=sources,
                    consumers=consumers,
                    nodes=nodes,
                    channels=channels,
                    frozen=reasons,
                    notes=notes,
                )
            )
        self.groups = groups
        self._group_of_root = {root: g for g in groups for root in g.units}

    def group_of_unit(self, root: int) -> ChannelGroup:
        return self._group_of_root[int(root)]

    def freeze_matching(self, pattern: str, reason: str) -> int:
        """Freeze every group with a node or tensor name matching ``pattern``; returns count."""
        regex = re.compile(pattern)
        count = 0
        for group in self.groups:
            names = group.nodes + group.tensors + group.sources
            if not group.frozen and any(regex.search(n) for n in names):
                group.frozen.append(reason)
                count += 1
        return count


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def build_dependency_graph(model: Model, *, refresh_shapes: bool = True) -> DependencyGraph:
    """Walk ``model`` once in topological order and derive its channel groups."""
    graph = model.graph
    graph.toposort()
    if refresh_shapes:
        model.infer_shapes(reset=False)
        unknown = [
            t
            for n in graph.nodes
            for t in n.outputs
            if isinstance(t, gs.Variable) and (t.shape is None or any(d is None or (isinstance(d, int) and d < 0) for d in t.shape))
        ]
        if unknown:
            model.probe_shapes_with_runtime(unknown)
    name_nodes(graph)
    dg = DependencyGraph(model)
    builder = _Builder(dg)
    for node in graph.nodes:
        builder.visit(node)
    builder.freeze_subgraph_captures()
    for tensor in graph.outputs:
        layout = dg.layouts.get(tensor.name)
        if layout is not None:
            dg.freeze(layout.ids, f"graph output {tensor.name}")
    dg._finish()
    return dg


class _Builder:
    def __init__(self, dg: DependencyGraph):
        self.dg = dg
        self.graph = dg.model.graph

    # -- helpers ------------------------------------------------------------------------------
    def lay(self, tensor: Optional[gs.Tensor]) -> Optional[Layout]:
        if tensor is None or isinstance(tensor, gs.Constant):
            return None
        return self.dg.layouts.get(tensor.name)

    def set(self, tensor: gs.Tensor, axis: int, ids: np.ndarray) -> None:
        if tensor is None or not tensor.name:
            return
        dims = _dims(tensor)
        if dims is not None and axis < len(dims) and isinstance(dims[axis], int) and dims[axis] != len(ids):
            self.dg.freeze(ids, f"{tensor.name}: shape {dims} does not match {len(ids)} tracked channels")
            return
        self.dg.layouts[tensor.name] = Layout(axis, np.asarray(ids, np.int64))

    def freeze_inputs(self, node: gs.Node, why: str) -> None:
        for tensor in node.inputs:
            layout = self.lay(tensor)
            if layout is not None:
                self.dg.freeze(layout.ids, f"{node.op} {node.name}: {why}")

    def member(self, node: gs.Node, index: int, axis: int, ids: np.ndarray, role: str, input_tensor=None) -> None:
        self.dg.members.append(Member(node, index, axis, np.asarray(ids, np.int64), role, input_tensor))

    def bias_member(self, node: gs.Node, out_ids: np.ndarray) -> None:
        """A conv's bias is sliced with its output channels; a bias computed at run time cannot be."""
        bias = _input(node, 2)
        if bias is None:
            return
        if isinstance(bias, gs.Constant):
            self.member(node, 2, 0, out_ids, "out")
        else:
            self.dg.freeze(out_ids, f"{node.op} {node.name}: its bias is computed at run time")

    def fixup(self, kind: str, node: gs.Node, **data) -> None:
        self.dg.fixups.append(Fixup(kind, node, data))

    # -- dispatch -----------------------------------------------------------------------------
    def visit(self, node: gs.Node) -> None:
        op = node.op
        domain = node.domain or ""
        tracked = [t for t in node.inputs if self.lay(t) is not None]
        handler = getattr(self, f"op_{op}", None) if domain in ("", "ai.onnx") else None
        if handler is None:
            if op in UNARY_OPS and domain in ("", "ai.onnx"):
                handler = self.op_unary
            elif op in POOL_OPS and domain in ("", "ai.onnx"):
                handler = self.op_pool
            elif op in ELEMENTWISE_OPS and domain in ("", "ai.onnx"):
                handler = self.op_elementwise
            elif op in REDUCE_OPS and domain in ("", "ai.onnx"):
                handler = self.op_reduce
        if handler is None:
            if tracked:
                self.freeze_inputs(node, "op not understood by the channel dependency rules")
            return
        if not tracked and op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return
        handler(node)

    def freeze_subgraph_captures(self) -> None:
        captured: Set[str] = set()

        def walk(graph: gs.Graph) -> None:
            for inner in graph.nodes:
                for tensor in inner.inputs:
                    captured.add(tensor.name)
                for value in inner.attrs.values():
                    if isinstance(value, gs.Graph):
                        walk(value)

        for node in self.graph.nodes:
            for value in node.attrs.values():
                if isinstance(value, gs.Graph):
                    walk(value)
        for name in captured:
            layout = self.dg.layouts.get(name)
            if layout is not None:
                self.dg.freeze(layout.ids, f"{name} is read inside a subgraph")

    # -- weight layers ------------------------------------------------------------------------
    def op_Conv(self, node: gs.Node) -> None:
        x, w = node.inputs[0], _input(node, 1)
        weight = _const(w)
        if weight is None or weight.ndim < 3:
            self.freeze_inputs(node, "weight is not a constant")
            return
        layout = self.lay(x)
        if layout is not None and layout.axis != 1:
            self.dg.freeze(layout.ids, f"Conv {node.name}: input channels are not on axis 1")
            layout = None
        cout, cin_g = weight.shape[0], weight.shape[1]
        group = int(node.attrs.get("group", 1))
        out_ids = self.dg.new_ids(cout, node.name)
        self.member(node, 1, 0, out_ids, "out")
        self.bias_member(node, out_ids)
        in_ids = None
        if group == 1:
            if layout is not None:
                self.member(node, 1, 1, layout.ids, "in", x.name)
                in_ids = layout.ids
        else:
            cout_g = cout // group
            if layout is None or len(layout.ids) != cin_g * group:
                self.dg.freeze(out_ids, f"Conv {node.name}: grouped conv on channels that cannot be pruned")
            else:
                for k in range(group):
                    self.dg.unify_all(
                        np.concatenate([layout.ids[k * cin_g : (k + 1) * cin_g], out_ids[k * cout_g : (k + 1) * cout_g]])
                    )
                self.fixup("conv_group", node, ids=out_ids, per_group=cout_g)
        self.weight_layer(node, in_ids, out_ids)
        self.set(node.outputs[0], 1, out_ids)

    def op_ConvTranspose(self, node: gs.Node) -> None:
        x, weight = node.inputs[0], _const(_input(node, 1))
        layout = self.lay(x)
        group = int(node.attrs.get("group", 1))
        if weight is None or weight.ndim < 3:
            self.freeze_inputs(node, "weight is not a constant")
            return
        if layout is not None and layout.axis != 1:
            self.dg.freeze(layout.ids, f"ConvTranspose {node.name}: input channels are not on axis 1")
            layout = None
        cout_g = weight.shape[1]
        out_ids = self.dg.new_ids(cout_g * group, node.name)
        self.bias_member(node, out_ids)
        in_ids = None
        if group == 1:
            self.member(node, 1, 1, out_ids, "out")
            if layout is not None:
                self.member(node, 1, 0, layout.ids, "in", x.name)
                in_ids = layout.ids
        else:
            # weight [Cin, Cout/group, k...]: group k maps input rows k*cin_g.. to output
            # channels k*cout_g..; like a grouped Conv, only whole groups can go, and then
            # the weight loses the group's rows (axis 0), never columns.
            cin_g = weight.shape[0] // group
            if layout is None or weight.shape[0] % group or len(layout.ids) != weight.shape[0]:
                why = f"ConvTranspose {node.name}: grouped on channels that cannot be pruned"
                self.dg.freeze(out_ids, why)
                if layout is not None:
                    self.dg.freeze(layout.ids, why)
            else:
                for k in range(group):
                    self.dg.unify_all(
                        np.concatenate([layout.ids[k * cin_g : (k + 1) * cin_g], out_ids[k * cout_g : (k + 1) * cout_g]])
                    )
                self.member(node, 1, 0, layout.ids, "out")
                self.fixup("conv_group", node, ids=out_ids, per_group=cout_g)
        self.weight_layer(node, in_ids, out_ids)
        self.set(node.outputs[0], 1, out_ids)

    def op_Gemm(self, node: gs.Node) -> None:
        a, b = node.inputs[0], _const(_input(node, 1))
        layout = self.lay(a)
        if b is None or b.ndim != 2 or node.attrs.get("transA", 0) or isinstance(a, gs.Constant):
            self.freeze_inputs(node, "Gemm without a constant weight (or with transA)")
            return
        trans_b = int(node.attrs.get("transB", 0))
        in_ids = None
        if layout is not None:
            if layout.axis != 1:
                self.dg.freeze(layout.ids, f"Gemm {node.name}: features are not on axis 1")
            else:
                self.member(node, 1, 1 if trans_b else 0, layout.ids, "in", a.name)
                in_ids = layout.ids
        n_out = b.shape[0] if trans_b else b.shape[1]
        out_ids = self.dg.new_ids(n_out, node.name)
        self.member(node, 1, 0 if trans_b else 1, out_ids, "out")
        c = _input(node, 2)
        bias = _const(c)
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] == n_out and n_out > 1:
            self.member(node, 2, bias.ndim - 1, out_ids, "out")
        elif c is not None and bias is None:
            self.dg.freeze(out_ids, f"Gemm {node.name}: its C input is computed at run time")
        self.weight_layer(node, in_ids, out_ids)
        self.set(node.outputs[0], 1, out_ids)

    def op_MatMul(self, node: gs.Node) -> None:
        a, b_tensor = node.inputs[0], _input(node, 1)
        b = _const(b_tensor)
        layout = self.lay(a)
        if b is None or b.ndim != 2 or isinstance(a, gs.Constant):
            self.freeze_inputs(node, "MatMul without a constant 2-D right-hand weight")
            return
        dims = _dims(a)
        if dims is None:
            self.freeze_inputs(node, "input rank unknown")
            return
        rank = len(dims)
        if layout is not None and layout.axis != rank - 1:
            # channels ride along the rows: the weight mixes another axis
            self.weight_layer(node, None, None)
            self.set(node.outputs[0], layout.axis, layout.ids)
            return
        in_ids = None
        if layout is not None:
            self.member(node, 1, 0, layout.ids, "in", a.name)
            in_ids = layout.ids
        out_ids = self.dg.new_ids(b.shape[1], node.name)
        self.member(node, 1, 1, out_ids, "out")
        self.weight_layer(node, in_ids, out_ids)
        self.set(node.outputs[0], rank - 1, out_ids)

    def weight_layer(self, node: gs.Node, in_ids, out_ids) -> None:
        macs = layer_macs(node) or 0
        self.dg.weight_layers.append(WeightLayer(node, macs, in_ids, out_ids))

    # -- channel-wise ops ---------------------------------------------------------------------
    def op_unary(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        if layout is None:
            self.freeze_inputs(node, "channel layout lost")
            return
        self.set(node.outputs[0], layout.axis, layout.ids)

    def op_pool(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        if layout is None or layout.axis != 1:
            self.freeze_inputs(node, "pooling over the channel axis")
            return
        self.set(node.outputs[0], 1, layout.ids)
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            self.dg.freeze(layout.ids, f"{node.op} {node.name}: pooling indices are used")

    def op_BatchNormalization(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        if layout is None or layout.axis != 1:
            self.freeze_inputs(node, "normalising a non-channel axis")
            return
        for index in range(1, 5):
            if _const(_input(node, index)) is None:
                self.freeze_inputs(node, "non-constant BatchNormalization parameters")
                return
            self.member(node, index, 0, layout.ids, "param")
        self.set(node.outputs[0], 1, layout.ids)

    def op_InstanceNormalization(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        if layout is None or layout.axis != 1:
            self.freeze_inputs(node, "normalising a non-channel axis")
            return
        for index in (1, 2):
            if _const(_input(node, index)) is None:
                self.freeze_inputs(node, "non-constant parameters")
                return
            self.member(node, index, 0, layout.ids, "param")
        self.set(node.outputs[0], 1, layout.ids)

    def op_GroupNormalization(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        num_groups = int(node.attrs.get("num_groups", 0))
        channels = len(layout.ids) if layout is not None else 0
        if layout is None or layout.axis != 1 or not num_groups or channels % num_groups:
            self.freeze_inputs(node, "group layout not understood")
            return
        size = channels // num_groups
        for k in range(num_groups):
            self.dg.unify_all(layout.ids[k * size : (k + 1) * size])
        for index in (1, 2):
            values = _const(_input(node, index))
            if values is None:
                self.freeze_inputs(node, "non-constant parameters")
                return
            ids = layout.ids if values.shape[0] == channels else layout.ids[::size]
            self.member(node, index, 0, ids, "param")
        self.fixup("num_groups", node, ids=layout.ids[::size])
        self.set(node.outputs[0], 1, layout.ids)

    def op_LayerNormalization(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims = _dims(node.inputs[0])
        if layout is None or dims is None:
            self.freeze_inputs(node, "input rank unknown")
            return
        rank = len(dims)
        axis = int(node.attrs.get("axis", -1)) % rank
        if layout.axis >= axis:
            for index in (1, 2):
                tensor = _input(node, index)
                values = _const(tensor)
                if tensor is None:
                    continue
                if values is None:
                    self.freeze_inputs(node, "non-constant parameters")
                    return
                param_axis = layout.axis - (rank - values.ndim)
                if param_axis >= 0 and values.shape[param_axis] == len(layout.ids):
                    self.member(node, index, param_axis, layout.ids, "param")
            self.dg.note(layout.ids, f"LayerNormalization {node.name} normalises over these channels (statistics shift when pruned)")
        self.set(node.outputs[0], layout.axis, layout.ids)

    def op_elementwise(self, node: gs.Node) -> None:
        out = node.outputs[0]
        out_dims = _dims(out)
        if out_dims is None:
            self.freeze_inputs(node, "output shape unknown")
            return
        rank = len(out_dims)
        axes = set()
        for tensor in node.inputs:
            layout = self.lay(tensor)
            dims = _dims(tensor)
            if layout is not None and dims is not None:
                axes.add(layout.axis + rank - len(dims))
        if len(axes) != 1:
            self.freeze_inputs(node, "inputs carry channels on different axes")
            return
        axis = axes.pop()
        size = out_dims[axis]
        full: List[Layout] = []
        for tensor in node.inputs:
            if tensor is None or (not isinstance(tensor, gs.Constant) and not tensor.name):
                continue
            dims = _dims(tensor)
            if dims is None:
                self.freeze_inputs(node, f"shape of {tensor.name} unknown")
                return
            local = axis - (rank - len(dims))
            local_size = dims[local] if local >= 0 else 1
            if local_size == 1:
                continue  # broadcast along the channels: not coupled
            if isinstance(tensor, gs.Constant):
                continue  # sliced below once the channel ids are known
            layout = self.lay(tensor)
            if layout is None or layout.axis != local:
                self.freeze_inputs(node, f"{tensor.name} has no channel layout")
                return
            full.append(layout)
        layouts = full
        if not layouts:
            self.freeze_inputs(node, "channels come from an untracked tensor")
            return
        base = layouts[0].ids
        for layout in layouts[1:]:
            if len(layout.ids) != len(base):
                self.freeze_inputs(node, "channel counts differ")
                return
            self.dg.unify(base, layout.ids)
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant):
                dims = list(tensor.values.shape)
                local = axis - (rank - len(dims))
                if local >= 0 and dims[local] == len(base) and len(base) > 1:
                    self.member(node, index, local, base, "param")
        self.set(out, axis, base)

    def op_Transpose(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims = _dims(node.inputs[0])
        perm = node.attrs.get("perm")
        if perm is None:
            perm = list(range(len(dims)))[::-1] if dims is not None else None
        if perm is None:
            self.freeze_inputs(node, "rank unknown")
            return
        self.set(node.outputs[0], list(perm).index(layout.axis), layout.ids)

    def _axes(self, node: gs.Node, rank: int, input_index: int = 1) -> Optional[List[int]]:
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > input_index:
            value = _const(_input(node, input_index))
            if value is None and _input(node, input_index) is not None:
                return None
            axes = value.tolist() if value is not None else None
        if axes is None:
            return []
        return [int(a) % rank for a in np.atleast_1d(axes)]

    def op_Squeeze(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims = _dims(node.inputs[0])
        axes = self._axes(node, len(dims)) if dims is not None else None
        if axes is None:
            self.freeze_inputs(node, "axes unknown")
            return
        if not axes:
            axes = [i for i, d in enumerate(dims) if d == 1]
        if layout.axis in axes:
            self.freeze_inputs(node, "squeezes the channel axis")
            return
        self.set(node.outputs[0], layout.axis - sum(1 for a in axes if a < layout.axis), layout.ids)

    def op_Unsqueeze(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        out_dims = _dims(node.outputs[0])
        dims = _dims(node.inputs[0])
        if dims is None:
            self.freeze_inputs(node, "rank unknown")
            return
        out_rank = len(out_dims) if out_dims is not None else None
        axes = self._axes(node, out_rank) if out_rank is not None else None
        if axes is None:
            self.freeze_inputs(node, "axes unknown")
            return
        axis = layout.axis
        for a in sorted(axes):
            if a <= axis:
                axis += 1
        self.set(node.outputs[0], axis, layout.ids)

    def op_Flatten(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims = _dims(node.inputs[0])
        if dims is None:
            self.freeze_inputs(node, "shape unknown")
            return
        k = int(node.attrs.get("axis", 1)) % (len(dims) + 1) if len(dims) else 0
        a = layout.axis
        if a < k:
            self.freeze_inputs(node, "flattens the channel axis into the batch")
            return
        inner = _product(dims[a + 1 :])
        outer = _product(dims[k:a])
        if inner[1] or outer[1]:
            self.freeze_inputs(node, "feature dims are not static")
            return
        ids = np.tile(np.repeat(layout.ids, inner[0]), outer[0])
        self.set(node.outputs[0], 1, ids)

    def op_Reshape(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims, out_dims = _dims(node.inputs[0]), _dims(node.outputs[0])
        target = _const(_input(node, 1))
        if dims is None or out_dims is None:
            self.freeze_inputs(node, "shapes unknown")
            return
        if target is None:
            self.freeze_inputs(node, "target shape computed at run time (run the fold pass first)")
            return
        a = layout.axis
        outer = _product(dims[:a])
        inner = _product(dims[a + 1 :])
        if inner[1]:
            self.freeze_inputs(node, "dims around the channel axis are not static")
            return
        length = len(layout.ids)
        # the last output axis whose leading dims match (size-1 dims add candidates)
        b = next((i for i in reversed(range(len(out_dims))) if _product(out_dims[:i]) == outer), None)
        size = out_dims[b] if b is not None else None
        inner_out = _product(out_dims[b + 1 :]) if b is not None else (0, 0)
        if b is None or not isinstance(size, int) or inner_out[1] or size * inner_out[0] != length * inner[0]:
            merged = _merged_axis(dims, out_dims, a)
            if merged is not None:  # channels-last features flattened (TensorFlow's Flatten)
                b, before, after = merged
                ids = np.tile(np.repeat(layout.ids, after), before)
                if int(target[b]) == 0:
                    self.freeze_inputs(node, "target copies an input dim into the merged channel axis")
                    return
                if int(target[b]) != -1:
                    self.fixup("reshape", node, position=b, ids=ids)
                self.set(node.outputs[0], b, ids)
                return
            if not self.channel_selection(node):
                self.freeze_inputs(node, "reshape splits the channel axis and no channel selection follows")
            return
        inner_in, inner_o = inner[0], inner_out[0]
        if inner_o % inner_in == 0 and inner_o != inner_in and self.channel_selection(node):
            return  # e.g. ShuffleNet V2's shuffle-and-split, which merges channel pairs first
        if inner_in % inner_o == 0:
            ids = np.repeat(layout.ids, inner_in // inner_o)
        elif inner_o % inner_in == 0:
            span = inner_o // inner_in
            blocks = layout.ids.reshape(-1, span)
            if not (blocks == blocks[:, :1]).all():
                # channels merged into groups ([N, C, H, W] -> [N, G, C/G*H*W], as exported
                # GroupNorm does): the channels of a group can only go together
                for row in blocks:
                    self.dg.unify_all(row)
                self.dg.note(layout.ids, f"Reshape {node.name} keeps channels in blocks of {span}")
            ids = blocks[:, 0].copy()
        else:
            self.freeze_inputs(node, "reshape mixes channels")
            return
        if b < len(target) and target[b] not in (0, -1):
            self.fixup("reshape", node, position=b, ids=ids)
        elif b < len(target) and target[b] == 0 and b != a:
            self.freeze_inputs(node, "target copies a different input dim")
            return
        self.set(node.outputs[0], b, ids)

    def channel_selection(self, node: gs.Node) -> bool:
        """Track a chain of layout ops from ``node`` that only selects and reorders channels.

        Channel shuffles reshape the channel axis apart, transpose and reshape it back
        (ShuffleNet: ``[N, G, C/G, H, W]``), or, as ShuffleNet V2 and its detectors export it,
        merge channel pairs into rows and gather the halves (``[N*C/2, 2, H*W]`` -> transpose
        -> ``[2, N, C/2, H, W]`` -> Gather 0 / 1: the even and the odd channels). Rather than a
        rule per export, the chain is run on a probe (every element numbered) until each path
        ends in a tensor shaped like the input except on the channel axis, whose channel
        planes are whole input planes: those tensors get the selected channels' ids, and a
        ``select`` fix-up replaces the chain by one channel Gather per end when channels go.
        False (nothing recorded) when the chain leaves the layout ops, reaches a graph output
        or mixes elements within planes.
        """
        source = node.inputs[0]
        layout = self.lay(source)
        dims = _dims(source)
        if layout is None or dims is None:
            return False
        probe_dims = [d if isinstance(d, int) else (1 if i == 0 else None) for i, d in enumerate(dims)]
        if any(d is None for d in probe_dims) or int(np.prod(probe_dims)) > _SELECTION_PROBE_LIMIT:
            return False
        probe = np.arange(int(np.prod(probe_dims)), dtype=np.int64).reshape(probe_dims)
        outputs = {t.name for t in self.graph.outputs}
        values: Dict[str, np.ndarray] = {source.name: probe}
        ends: List[Tuple[gs.Tensor, np.ndarray]] = []
        chain: List[gs.Node] = []
        queue = [node]
        while queue:
            current = queue.pop(0)
            if any(current is n for n in chain):
                continue
            if current.op not in _SELECTION_OPS or len(chain) >= _SELECTION_MAX_NODES:
                return False
            data = current.inputs[0] if current.inputs else None
            if data is None or data.name not in values or any(
                not isinstance(t, gs.Constant) for t in current.inputs[1:] if t.name
            ):
                return False
            try:
                results = _run_layout_op(current, values[data.name])
            except Exception:  # an op form the probe does not evaluate: not a selection
                return False
            chain.append(current)
            for tensor, value in zip(current.outputs, results):
                if not tensor.name or tensor.name in outputs:
                    return False
                picked = _selected_planes(probe, value, layout.axis)
                if picked is not None:
                    ends.append((tensor, picked))
                    continue
                values[tensor.name] = value
                if not tensor.outputs:
                    return False
                queue.extend(tensor.outputs)
        if not ends:
            return False
        lengths = {len(picked) for _, picked in ends}
        together = np.concatenate([picked for _, picked in ends])
        covers = np.array_equal(np.sort(together), np.arange(len(layout.ids)))
        if len(ends) > 1 and len(lengths) == 1 and covers:
            # a shuffle-and-split into equal parts (ShuffleNet V2): position j of every part goes
            # together, so the parts stay equal and the kept channels keep their interleaving
            self.dg.unify_all_columns(np.stack([layout.ids[picked] for _, picked in ends]))
        elif len(ends) == 1 and covers:
            rows = _interleaved_rows(ends[0][1])
            if rows is not None:  # a ShuffleNet shuffle: the channels it places side by side go together
                self.dg.unify_all_columns(layout.ids[rows].T)
        for tensor, picked in ends:
            self.set(tensor, layout.axis, layout.ids[picked])
        self.dg.note(layout.ids, f"{node.op} {node.name}: channel selection of {len(chain)} layout ops, "
                                 f"rewritten as channel Gathers when pruned")
        self.fixup("select", node, ids=layout.ids, source=source, axis=layout.axis, ends=ends)
        return True

    def op_Concat(self, node: gs.Node) -> None:
        out_dims = _dims(node.outputs[0])
        if out_dims is None:
            self.freeze_inputs(node, "shape unknown")
            return
        rank = len(out_dims)
        axis = int(node.attrs.get("axis", 1)) % rank
        layouts = [self.lay(t) for t in node.inputs]
        tracked_axes = {l.axis for l in layouts if l is not None}
        if axis in tracked_axes and len(tracked_axes) == 1:
            parts = []
            for tensor, layout in zip(node.inputs, layouts):
                if layout is not None:
                    parts.append(layout.ids)
                    continue
                dims = _dims(tensor)
                if dims is None or not isinstance(dims[axis], int):
                    self.freeze_inputs(node, "shape of an input unknown")
                    return
                fresh = self.dg.new_ids(dims[axis], node.name)
                self.dg.freeze(fresh, f"Concat {node.name}: input {tensor.name or 'constant'} cannot be pruned")
                parts.append(fresh)
            self.set(node.outputs[0], axis, np.concatenate(parts))
            return
        # concatenating along another axis: inputs share their channels
        self.op_elementwise(node)

    def op_Split(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims = _dims(node.inputs[0])
        if dims is None:
            self.freeze_inputs(node, "shape unknown")
            return
        axis = int(node.attrs.get("axis", 0)) % len(dims)
        if axis != layout.axis:
            for out in node.outputs:
                self.set(out, layout.axis, layout.ids)
            return
        sizes = node.attrs.get("split")
        if sizes is None and _input(node, 1) is not None:
            value = _const(_input(node, 1))
            if value is None:
                self.freeze_inputs(node, "split sizes computed at run time")
                return
            sizes = value.tolist()
        if sizes is None:
            n = len(node.outputs)
            length = len(layout.ids)
            chunk = -(-length // n)
            sizes = [min(chunk, length - i * chunk) for i in range(n)]
        offsets = np.cumsum([0] + list(sizes))
        parts = [layout.ids[offsets[i] : offsets[i + 1]] for i in range(len(sizes))]
        if len(node.outputs) != len(parts) or any(len(p) == 0 for p in parts):
            self.freeze_inputs(node, "split sizes not understood")
            return
        for out, part in zip(node.outputs, parts):
            self.set(out, axis, part)
        self.fixup("split", node, parts=parts, ids=layout.ids)

    def op_Slice(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims = _dims(node.inputs[0])
        if dims is None:
            self.freeze_inputs(node, "shape unknown")
            return
        rank = len(dims)
        if "starts" in node.attrs:  # opset < 10
            self.freeze_inputs(node, "old Slice form")
            return
        values = [_const(_input(node, i)) for i in range(1, 5)]
        if values[0] is None or values[1] is None or (_input(node, 3) is not None and values[2] is None) or (
            _input(node, 4) is not None and values[3] is None
        ):
            self.freeze_inputs(node, "slice bounds computed at run time")
            return
        starts, ends = values[0].tolist(), values[1].tolist()
        axes = values[2].tolist() if values[2] is not None else list(range(len(starts)))
        steps = values[3].tolist() if values[3] is not None else [1] * len(starts)
        axes = [int(a) % rank for a in axes]
        if layout.axis not in axes:
            self.set(node.outputs[0], layout.axis, layout.ids)
            return
        i = axes.index(layout.axis)
        length = len(layout.ids)
        if steps[i] != 1:
            if not self.channel_selection(node):
                self.freeze_inputs(node, "strided slice of the channel axis")
            return
        start, stop, _ = slice(int(starts[i]), int(ends[i])).indices(length)
        if stop <= start:
            self.freeze_inputs(node, "empty channel slice")
            return
        self.fixup("slice", node, slot=i, start=start, stop=stop, ids=layout.ids)
        self.set(node.outputs[0], layout.axis, layout.ids[start:stop])

    def op_Gather(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims = _dims(node.inputs[0])
        indices = _const(_input(node, 1))
        if dims is None or indices is None:
            self.freeze_inputs(node, "indices computed at run time")
            return
        axis = int(node.attrs.get("axis", 0)) % len(dims)
        if axis == layout.axis:
            # 1-D indices, or one non-unit dim (torch.onnx's dynamo exporter writes as_strided as a
            # Gather of an [1, C, 1, 1] index tensor): the channels land on that dim
            wide = [d for d, size in enumerate(indices.shape) if size != 1]
            if indices.ndim == 0 or (indices.ndim > 1 and (len(wide) != 1 or indices.size < 2)):
                if not self.channel_selection(node):
                    self.freeze_inputs(node, "gathers single channels")
                return
            slot = wide[0] if indices.ndim > 1 else 0
            picked = indices.reshape(-1).astype(np.int64) % len(layout.ids)
            self.fixup("gather", node, picked=picked, ids=layout.ids, shape=indices.shape, slot=slot)
            self.set(node.outputs[0], axis + slot, layout.ids[picked])
            return
        new_axis = layout.axis
        if axis < layout.axis:
            new_axis += indices.ndim - 1
        self.set(node.outputs[0], new_axis, layout.ids)

    def op_reduce(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims = _dims(node.inputs[0])
        if dims is None:
            self.freeze_inputs(node, "rank unknown")
            return
        axes = self._axes(node, len(dims))
        if axes is None:
            self.freeze_inputs(node, "axes computed at run time")
            return
        if not axes:
            if node.attrs.get("noop_with_empty_axes", 0):
                self.set(node.outputs[0], layout.axis, layout.ids)
                return
            axes = list(range(len(dims)))
        if layout.axis in axes:
            self.freeze_inputs(node, "reduces over the channels")
            return
        keepdims = int(node.attrs.get("keepdims", 1))
        axis = layout.axis if keepdims else layout.axis - sum(1 for a in axes if a < layout.axis)
        self.set(node.outputs[0], axis, layout.ids)

    def _softmax(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims = _dims(node.inputs[0])
        if dims is None:
            self.freeze_inputs(node, "rank unknown")
            return
        opset = self.dg.model.opset
        axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1)) % len(dims)
        touches = layout.axis == axis if opset >= 13 else layout.axis >= axis
        if touches:
            self.freeze_inputs(node, "normalises over the channels")
            return
        self.set(node.outputs[0], layout.axis, layout.ids)

    op_Softmax = op_LogSoftmax = op_Hardmax = _softmax

    def op_Resize(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims, out_dims = _dims(node.inputs[0]), _dims(node.outputs[0])
        a = layout.axis
        if dims is None or out_dims is None or dims[a] != out_dims[a]:
            self.freeze_inputs(node, "resizes the channel axis")
            return
        sizes_index = 3 if node.op == "Resize" else None
        if sizes_index is not None and _input(node, sizes_index) is not None:
            sizes = _const(_input(node, sizes_index))
            if sizes is None:
                self.freeze_inputs(node, "output sizes computed at run time")
                return
            axes = node.attrs.get("axes")
            slot = list(axes).index(a) if axes is not None and a in list(axes) else (a if axes is None else None)
            if slot is not None:
                self.fixup("resize_sizes", node, slot=slot, ids=layout.ids)
        self.set(node.outputs[0], a, layout.ids)

    op_Upsample = op_Resize

    def op_Pad(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims = _dims(node.inputs[0])
        pads = node.attrs.get("pads")
        if pads is None:
            pads = _const(_input(node, 1))
            if pads is None:
                self.freeze_inputs(node, "pads computed at run time")
                return
            pads = pads.tolist()
        axes = list(range(len(dims))) if dims is not None else None
        axes_tensor = _input(node, 3)
        if axes_tensor is not None:
            values = _const(axes_tensor)
            if values is None or dims is None:
                self.freeze_inputs(node, "axes computed at run time")
                return
            axes = [int(x) % len(dims) for x in values.tolist()]
        if axes is None:
            self.freeze_inputs(node, "rank unknown")
            return
        half = len(pads) // 2
        for i, axis in enumerate(axes):
            if axis == layout.axis and (pads[i] or pads[half + i]):
                self.freeze_inputs(node, "pads the channel axis")
                return
        self.set(node.outputs[0], layout.axis, layout.ids)

    def op_DepthToSpace(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        r = int(node.attrs.get("blocksize", 1))
        mode = node.attrs.get("mode", "DCR")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        n = len(layout.ids)
        if layout.axis != 1 or n % (r * r):
            self.freeze_inputs(node, "layout not understood")
            return
        c = n // (r * r)
        if mode == "CRD":
            blocks = layout.ids.reshape(c, r * r)  # channel k owns k*r*r .. k*r*r+r*r-1
        else:
            blocks = layout.ids.reshape(r * r, c).T  # channel k owns k, k+c, k+2c...
        for row in blocks:
            self.dg.unify_all(row)
        self.set(node.outputs[0], 1, blocks[:, 0].copy())

    def op_SpaceToDepth(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        r = int(node.attrs.get("blocksize", 1))
        if layout.axis != 1:
            self.freeze_inputs(node, "layout not understood")
            return
        self.set(node.outputs[0], 1, np.tile(layout.ids, r * r))

    def op_Expand(self, node: gs.Node) -> None:
        layout = self.lay(node.inputs[0])
        dims, out_dims = _dims(node.inputs[0]), _dims(node.outputs[0])
        if dims is None or out_dims is None:
            self.freeze_inputs(node, "shape unknown")
            return
        axis = layout.axis + len(out_dims) - len(dims)
        if out_dims[axis] != len(layout.ids):
            self.freeze_inputs(node, "expands the channel axis")
            return
        self.set(node.outputs[0], axis, layout.ids)

    def op_Shape(self, node: gs.Node) -> None:
        self.freeze_inputs(node, "the channel count is read at run time (run the fold pass first)")


# ---------------------------------------------------------------------------------------------
# Removal
# ---------------------------------------------------------------------------------------------


class PruneError(ValueError):
    """A requested removal would leave the model invalid."""


def prune_channels(model: Model, dg: DependencyGraph, removed_units: Iterable[int]) -> Dict[str, int]:
    """Physically remove the given units (union-find roots) from ``model``.

    Weights and per-channel constants are sliced, attributes and shape constants rewritten and
    shapes re-inferred, so the model stays valid for any batch size. Returns counts of what
    changed. Raises :class:`PruneError` for frozen units or a tensor that would lose every
    channel.
    """
    removed = np.asarray(sorted({int(u) for u in removed_units}), dtype=np.int64)
    counts = {"units": int(len(removed)), "constants": 0, "fixups": 0}
    if not len(removed):
        return counts
    for root in removed:
        reasons = dg.frozen_reasons(int(root))
        if reasons:
            raise PruneError(f"unit {root} is frozen: {reasons[0]}")
    for name, layout in dg.layouts.items():
        if not dg.keep_mask(layout.ids, removed).any():
            raise PruneError(f"pruning would remove every channel of {name}")

    # Slice constants: gather every (node, input) edit first so a shared tensor is cut once.
    edits: Dict[Tuple[int, int], List[Member]] = defaultdict(list)
    nodes: Dict[int, gs.Node] = {}
    for member in dg.members:
        keep = dg.keep_mask(member.ids, removed)
        if keep.all():
            continue
        edits[(id(member.node), member.index)].append(member)
        nodes[id(member.node)] = member.node
    original: Dict[Tuple[int, int], np.ndarray] = {
        key: np.asarray(nodes[key[0]].inputs[key[1]].values) for key in edits
    }
    for key, members in edits.items():
        values = original[key]
        done_axes = set()
        for member in members:
            if member.axis in done_axes:
                continue
            done_axes.add(member.axis)
            keep = dg.keep_mask(member.ids, removed)
            if values.shape[member.axis] != len(keep):
                raise PruneError(
                    f"{member.node.name} input {member.index}: axis {member.axis} has {values.shape[member.axis]} "
                    f"entries, expected {len(keep)}"
                )
            values = np.compress(keep, values, axis=member.axis)
        replace_constant_values(dg.model.graph, nodes[key[0]], key[1], values)
        counts["constants"] += 1

    for fixup in dg.fixups:
        if _apply_fixup(dg, fixup, removed):
            counts["fixups"] += 1
    model.graph.cleanup(remove_unused_graph_inputs=False)
    model.infer_shapes(reset=True)
    return counts


def _apply_fixup(dg: DependencyGraph, fixup: Fixup, removed: np.ndarray) -> bool:
    """Rewrite one attribute or shape constant; False when its channels are all kept."""
    node, data = fixup.node, fixup.data
    graph = dg.model.graph
    keep = dg.keep_mask(data["ids"], removed)
    if keep.all():
        return False
    if fixup.kind == "conv_group":
        node.attrs["group"] = int(keep.sum()) // data["per_group"]
        return True
    if fixup.kind == "num_groups":
        node.attrs["num_groups"] = int(keep.sum())
        return True
    if fixup.kind == "reshape":
        target = np.array(node.inputs[1].values, copy=True)
        target[data["position"]] = int(keep.sum())
        replace_constant_values(graph, node, 1, target.astype(node.inputs[1].values.dtype))
        return True
    if fixup.kind == "split":
        sizes = [int(dg.keep_mask(part, removed).sum()) for part in data["parts"]]
        if "split" in node.attrs:
            node.attrs["split"] = sizes
        elif len(node.inputs) > 1 and _input(node, 1) is not None:
            replace_constant_values(graph, node, 1, np.array(sizes, dtype=np.int64))
        elif dg.model.opset >= 13:
            node.attrs.pop("num_outputs", None)
            constant = new_constant(graph, f"{node.name}_split", np.array(sizes, dtype=np.int64))
            if len(node.inputs) == 1:
                node.inputs.append(constant)
            else:
                node.inputs[1] = constant
        else:
            node.attrs["split"] = sizes
        return True
    if fixup.kind == "slice":
        start = int(keep[: data["start"]].sum())
        stop = start + int(keep[data["start"] : data["stop"]].sum())
        for index, value in ((1, start), (2, stop)):
            values = np.array(node.inputs[index].values, copy=True)
            values[data["slot"]] = value
            replace_constant_values(graph, node, index, values)
        return True
    if fixup.kind == "gather":
        new_index = np.cumsum(keep) - 1
        picked = data["picked"][keep[data["picked"]]]
        dtype = node.inputs[1].values.dtype
        shape = list(data.get("shape", picked.shape))
        shape[data.get("slot", 0)] = len(picked)
        replace_constant_values(graph, node, 1, new_index[picked].astype(dtype).reshape(shape))
        return True
    if fixup.kind == "select":
        # the chain of layout ops gives way to one channel Gather per end (new indices after the cut)
        new_index = np.cumsum(keep) - 1
        for number, (tensor, picked) in enumerate(data["ends"]):
            kept = picked[keep[picked]]
            name = f"{node.name}_select{number}"
            indices = new_constant(graph, f"{name}_indices", new_index[kept].astype(np.int64))
            tensor.inputs.clear()
            graph.nodes.append(gs.Node("Gather", name=name, attrs={"axis": data["axis"]},
                                       inputs=[data["source"], indices], outputs=[tensor]))
        name_nodes(graph)  # a clash renames the new Gather (appended last), never an existing node
        return True
    if fixup.kind == "resize_sizes":
        sizes = np.array(node.inputs[3].values, copy=True)
        sizes[data["slot"]] = int(keep.sum())
        replace_constant_values(graph, node, 3, sizes)
        return True
    raise AssertionError(f"unknown fix-up {fixup.kind}")
