"""What a modified copy of a model changes, and sessions that run only that part.

Pruning one channel group, or refitting a few layers, changes a copy of the model from some
nodes onwards; everything upstream computes the original's values. onnxruntime runs every node
of a session whatever outputs a run asks for, so passes that evaluate many such copies (prune's
sensitivity curves, the stage-by-stage refits) run only the changed part, fed with the original
model's values where it begins (:func:`changed_region`, :func:`region_session`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import runtime
from .ir import Model


@dataclass(frozen=True)
class ChangedRegion:
    """The nodes of a candidate that differ from its original, or read something that does."""

    names: frozenset  # the changed nodes' names
    nodes: int  # how many
    tensors: frozenset  # the tensors they compute
    feeds: Tuple[str, ...]  # tensors they read from unchanged nodes or the graph inputs
    outputs: Tuple[str, ...]  # graph outputs they compute (the others equal the original's)


def _same_constant(a: gs.Constant, b: gs.Constant) -> bool:
    if a is b:
        return True
    x, y = a.values, b.values
    if x is y:  # Model.copy shares weight arrays
        return True
    x, y = np.asarray(x), np.asarray(y)
    return x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y)


def _same_attrs(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, gs.Constant) or isinstance(other, gs.Constant):
            if not (isinstance(value, gs.Constant) and isinstance(other, gs.Constant) and _same_constant(value, other)):
                return False
            continue
        try:
            if isinstance(value, np.ndarray) or isinstance(other, np.ndarray):
                if not np.array_equal(np.asarray(value), np.asarray(other)):
                    return False
            elif value != other:
                return False
        except Exception:  # attribute kinds we cannot compare: treat as changed
            return False
    return True


def changed_region(original: Model, candidate: Model) -> Optional[ChangedRegion]:
    """Which nodes of ``candidate`` (a modified copy of ``original``, same node names) can
    compute other values than ``original``'s: those whose op, attributes, weights or inputs
    differ, and everything downstream. None when no cut can be made (subgraphs, unnamed or
    duplicate node names, other graph inputs or outputs)."""
    before = {}
    for node in original.graph.nodes:
        if not node.name or node.name in before or list(node.subgraphs()):
            return None
        before[node.name] = node
    if [(t.name, t.dtype) for t in original.graph.inputs] != [(t.name, t.dtype) for t in candidate.graph.inputs]:
        return None
    if [t.name for t in candidate.graph.outputs] != [t.name for t in original.graph.outputs]:
        return None
    produced = {id(t) for n in original.graph.nodes for t in n.outputs}
    graph_inputs = {t.name for t in original.graph.inputs}
    changed: set = set()
    changed_tensors: set = set()
    seen: set = set()
    for node in candidate.graph.nodes:  # topological order
        if not node.name or node.name in seen or list(node.subgraphs()):
            return None
        seen.add(node.name)
        old = before.get(node.name)
        differs = (
            old is None or old.op != node.op or old.domain != node.domain
            or len(old.inputs) != len(node.inputs)
            or [t.name for t in old.outputs] != [t.name for t in node.outputs]
            or not _same_attrs(old.attrs, node.attrs)
        )
        if not differs:
            for new_t, old_t in zip(node.inputs, old.inputs):
                if isinstance(new_t, gs.Constant) or isinstance(old_t, gs.Constant):
                    differs = not (isinstance(new_t, gs.Constant) and isinstance(old_t, gs.Constant) and _same_constant(new_t, old_t))
                elif new_t.name != old_t.name or new_t.name in changed_tensors:
                    differs = True
                elif new_t.name and id(old_t) not in produced and old_t.name not in graph_inputs:
                    differs = True  # a tensor the original does not compute
                if differs:
                    break
        if differs:
            changed.add(node.name)
            changed_tensors.update(t.name for t in node.outputs if t.name)
    feeds: List[str] = []
    for node in candidate.graph.nodes:
        if node.name not in changed:
            continue
        for t in node.inputs:
            if isinstance(t, gs.Constant) or not t.name or t.name in changed_tensors or t.name in feeds:
                continue
            feeds.append(t.name)
    outputs = tuple(t.name for t in candidate.graph.outputs if t.name in changed_tensors)
    return ChangedRegion(frozenset(changed), len(changed), frozenset(changed_tensors), tuple(feeds), outputs)


def region_session(candidate: Model, region: ChangedRegion, example: Dict[str, np.ndarray], outputs: Sequence[str]):
    """A session of ``region``'s nodes of ``candidate`` that lead to ``outputs`` (tensors the
    region computes), reading the region's feeds: dtypes and shapes as in ``example`` (the
    values of one batch), the batch dim symbolic. Feeds the kept nodes do not read are dropped;
    :func:`runtime.run` passes a session only the inputs it declares."""
    work = candidate.copy()
    graph = work.graph
    feeds: Dict[str, gs.Variable] = {}
    for index, name in enumerate(region.feeds):
        value = np.asarray(example[name])
        shape: List[Any] = list(value.shape)
        if shape:  # one symbol per feed: a shape tensor's dim 0 is no batch
            shape[0] = f"feed{index}_d0"
        feeds[name] = gs.Variable(name, dtype=value.dtype, shape=shape)
    nodes = [n for n in graph.nodes if n.name in region.names]
    for n in nodes:
        for i, t in enumerate(list(n.inputs)):
            if not isinstance(t, gs.Constant) and t.name in feeds:
                n.inputs[i] = feeds[t.name]
    wanted = set(outputs)
    graph.nodes = nodes
    graph.inputs = [feeds[name] for name in region.feeds]
    graph.outputs = [t for n in nodes for t in n.outputs if t.name in wanted]
    proto = work.to_proto()
    for value in proto.graph.output:  # intermediate shapes may pin the batch
        value.type.tensor_type.ClearField("shape")
    del proto.graph.value_info[:]
    proto = runtime.only_outputs(proto, list(outputs))
    used = {name for node in proto.graph.node for name in node.input}
    kept = [value for value in proto.graph.input if value.name in used]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    return runtime.make_session(proto)

