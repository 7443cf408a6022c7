"""Small graph-rewrite helpers on the graph-surgeon IR, shared by every pass."""

from __future__ import annotations

from typing import Container, List, Optional

import numpy as np
import onnx_graphsurgeon as gs


def producer(tensor: gs.Tensor) -> Optional[gs.Node]:
    """The node that computes ``tensor``, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> List[gs.Node]:
    return list(tensor.outputs)


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.inputs)


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor) -> Optional[gs.Node]:
    """The only node reading ``tensor``, if it has exactly one and is not a graph output."""
    if is_graph_output(graph, tensor) or len(tensor.outputs) != 1:
        return None
    return tensor.outputs[0]


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of ``old`` read ``new`` instead."""
    for node in list(old.outputs):
        for index, tensor in enumerate(node.inputs):
            if tensor is old:
                node.inputs[index] = new


def bypass(graph: gs.Graph, node: gs.Node) -> bool:
    """Remove a node whose first output equals its first input (Identity, inference Dropout).

    When the output is a graph output, its name is part of the model's interface, so the
    producer of the input is rewired to write the graph output directly. Returns False when
    the node cannot go (the input is itself a graph input, output or constant).
    """
    source, result = node.inputs[0], node.outputs[0]
    if is_graph_output(graph, result):
        upstream = producer(source)
        if upstream is None or is_graph_output(graph, source) or is_graph_input(graph, source):
            return False
        replace_uses(source, result)
        upstream.outputs[upstream.outputs.index(source)] = result
    else:
        replace_uses(result, source)
    node.inputs.clear()
    node.outputs.clear()
    return True


def unique_name(base: str, taken: Container[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not in ``taken``."""
    name, suffix = base, 0
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def new_constant(graph: gs.Graph, base_name: str, values: np.ndarray) -> gs.Constant:
    """A constant with a name not used in the graph yet (``base_name`` when free)."""
    return gs.Constant(unique_name(base_name, graph.tensors()), np.ascontiguousarray(values))


def replace_constant_values(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray) -> gs.Constant:
    """Give ``node`` new values for its constant input ``index``.

    The tensor keeps its name when this node is its only reader (names of weights are what
    masks and reports key on); a weight shared with other nodes gets a fresh copy instead.
    """
    tensor = node.inputs[index]
    values = np.ascontiguousarray(values)
    if isinstance(tensor, gs.Constant) and len(tensor.outputs) == 1:
        tensor.values = values
        return tensor
    base = tensor.name if tensor.name else f"{node.name}_input{index}"
    replacement = new_constant(graph, base, values)
    node.inputs[index] = replacement
    return replacement


def channel_vector(values: np.ndarray, out_rank: int, channels: int, channel_axis: int = 1) -> Optional[np.ndarray]:
    """A broadcast constant as one value per channel, if it only varies along ``channel_axis``.

    Used to fold ``Conv -> Add/Mul(constant)`` into the conv: the constant must be a scalar or
    vary along the channel axis only once right-aligned against the output rank.
    """
    values = np.asarray(values)
    if values.ndim > out_rank:
        return None
    if values.size == 1:
        return np.full(channels, values.reshape(()), dtype=values.dtype)
    shape = (1,) * (out_rank - values.ndim) + values.shape
    varying = [axis for axis, size in enumerate(shape) if size != 1]
    if varying != [channel_axis] or shape[channel_axis] != channels:
        return None
    return values.reshape(channels)


def name_nodes(graph: gs.Graph) -> int:
    """Give unnamed (or duplicate-named) nodes unique names (``Conv_12``): plans, groups and
    reports refer to nodes by name."""
    taken = set()
    existing = {node.name for node in graph.nodes if node.name}
    count = 0
    for index, node in enumerate(graph.nodes):
        if node.name and node.name not in taken:
            taken.add(node.name)
            continue
        name = unique_name(f"{node.name or node.op}_{index}", existing)
        node.name = name
        taken.add(name)
        existing.add(name)
        count += 1
    return count


def strip_output_softmax(model) -> int:
    """Make classifier outputs ``[N, K]`` / ``[N, K, 1, 1]`` computed by a Softmax return its input.

    Losses on probabilities weigh the confidently classified samples (a peaked vector barely
    moves) over the close calls where top-1 changes; the logits keep those differences. For
    measuring, not emitting: the caller works on a copy. Returns how many outputs changed.
    """
    from .verify import _classifier_classes  # the class-vector shapes verify scores top-1 on

    graph = model.graph
    changed = 0
    for index, tensor in enumerate(list(graph.outputs)):
        node = producer(tensor)
        if node is None or node.op != "Softmax" or len(tensor.outputs) or not node.inputs:
            continue
        shape = list(tensor.shape or [])
        if not shape or not all(isinstance(d, int) for d in shape[1:]) or _classifier_classes(shape) is None:
            continue
        logits = node.inputs[0]
        if any(t is logits for t in graph.outputs):
            continue
        logits.dtype = logits.dtype or tensor.dtype
        logits.shape = logits.shape or tensor.shape
        graph.outputs[index] = logits
        changed += 1
    if changed:
        graph.cleanup()
    return changed
