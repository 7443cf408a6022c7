"""``fold``: safe cleanup that leaves outputs equal and every later pass relies on.

- Identity and inference-mode Dropout removed;
- constant subgraphs evaluated once (including shape arithmetic on static shapes) and a
  Reshape target computed from a dynamic shape rewritten as a constant with ``0`` (copy)
  entries, so classifier heads such as ``Shape -> Slice -> Concat -> Reshape`` become plain;
- BatchNormalization folded into the preceding Conv / ConvTranspose / Gemm (the BN scales
  are kept in ``model.annotations['batchnorm']`` for the BN-scale pruning criterion);
- per-channel constant Add / Sub / Mul / Div after a Conv / ConvTranspose / Gemm folded into
  its weights and bias; MatMul + bias Add on 2-D inputs turned into Gemm; a ``[1, N]`` Gemm
  bias written as ``[N]``;
- dead nodes removed and the graph topologically sorted.

Why our own code rather than onnxslim: structural passes key masks and reports on weight
names and read the BN scales this pass removes, so the folding must keep names stable and
record what it folds; the rules CV exports need are few (see tools/bench_fold.py for the
node counts side by side with onnxslim).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxslim_cv import runtime
from onnxslim_cv.graph_utils import (
    bypass,
    channel_vector,
    is_graph_output,
    new_constant,
    producer,
    replace_constant_values,
    replace_uses,
    sole_consumer,
)
from onnxslim_cv.ir import Model
from onnxslim_cv.pipeline import Pass, PassContext, PassOption, PassReport, register_pass

_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
# Never evaluate these: folding a DequantizeLinear of int8 weights would undo quantization.
_KEEP_OPS = _NONDETERMINISTIC | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_WEIGHTED = ("Conv", "ConvTranspose", "Gemm")
_DEFAULT_MAX_FOLD_BYTES = 1 << 20


def _positive_int(value) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def fold_first(model: Model, context: PassContext, report: PassReport, why: str, *,
               computed_constants_only: bool = False) -> None:
    """Run ``fold`` in place before another pass (``why`` it needs the folded graph), noting what
    it changed; ``computed_constants_only``: just :func:`fold_computed_constants`."""
    if computed_constants_only:
        folded = PassReport("fold")
        fold_computed_constants(model, folded)
    else:
        folded = FoldPass().run(model, context)
    if folded.changes:
        changes = ", ".join(f"{k} {v}" for k, v in sorted(folded.changes.items()))
        report.notes.append(f"folded first ({why}): {changes}")


@register_pass
class FoldPass(Pass):
    name = "fold"
    summary = "fold BatchNorm and bias/scale constants into conv weights, fold constant subgraphs, drop Identity/Dropout and dead nodes"
    options = (
        PassOption(
            "max_bytes",
            _DEFAULT_MAX_FOLD_BYTES,
            "do not materialise a folded constant larger than this many bytes when it would be "
            "bigger than the constants it is computed from (keeps ConstantOfShape/Tile/Expand "
            "from bloating the file)",
            parse=_positive_int,
            flag="--fold-max-bytes",
            metavar="N",
        ),
    )

    def run(self, model: Model, context: PassContext) -> PassReport:
        report = PassReport(self.name)
        graph = model.graph
        nodes_before = len(graph.nodes)
        fold_computed_constants(model, report, max_bytes=self.config["max_bytes"])
        merge_duplicate_nodes(graph, report)
        # A bias Add between a ConvTranspose and its BN only goes once the BN has, so repeat.
        while fold_batchnorm(model, report) + fold_channel_affine(model, report):
            pass
        matmul_add_to_gemm(model, report)
        flatten_gemm_bias(model, report)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        removed = nodes_before - len(graph.nodes)
        report.notes.append(f"{nodes_before} -> {len(graph.nodes)} nodes")
        leftover = sum(1 for n in graph.nodes if n.op == "BatchNormalization")
        if leftover:
            report.notes.append(f"{leftover} BatchNormalization left (not after a Conv/ConvTranspose/Gemm)")
        report.details["nodes_removed"] = removed
        return report


def fold_computed_constants(model: Model, report: PassReport, *, max_bytes: int = _DEFAULT_MAX_FOLD_BYTES) -> None:
    """Identity / Dropout bypassed, constant subgraphs (the ``Shape`` arithmetic exporters
    write for channel counts and reshape targets) evaluated: the part of ``fold`` that leaves
    the layers, their weights and BatchNorm as they are (a weight that a constant subgraph
    computes becomes the value the runtime would compute)."""
    graph = model.graph
    remove_identities(graph, report)
    for _ in range(8):  # each round can expose more (shapes become static, heads become plain)
        model.infer_shapes(reset=False)
        changed = fold_constants(model, report, max_bytes=max_bytes)
        changed += fold_dynamic_reshape_shapes(model, report)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if not changed:
            break
    model.infer_shapes(reset=False)


# ---------------------------------------------------------------------- Identity / Dropout
def remove_identities(graph: gs.Graph, report: PassReport) -> None:
    for node in list(graph.nodes):
        if node.op == "Identity" and len(node.inputs) == 1:
            if bypass(graph, node):
                report.count("identity_removed")
        elif node.op == "Dropout" and _is_inference_dropout(graph, node):
            if bypass(graph, node):
                report.count("dropout_removed")


def _is_inference_dropout(graph: gs.Graph, node: gs.Node) -> bool:
    if len(node.outputs) > 1 and (node.outputs[1].outputs or is_graph_output(graph, node.outputs[1])):
        return False  # the mask is used
    if len(node.inputs) >= 3 and not node.inputs[2].is_empty():
        training = node.inputs[2]
        return isinstance(training, gs.Constant) and not bool(np.asarray(training.values).any())
    return True


# ---------------------------------------------------------------------- constant folding
def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(value, gs.Graph) for value in node.attrs.values())


def _static_shape(tensor: gs.Tensor) -> Optional[List[int]]:
    shape = tensor.shape
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _shape_slice(node: gs.Node, rank: int) -> slice:
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    return slice(start, int(end) if end is not None else rank)


def fold_constants(model: Model, report: PassReport, *, max_bytes: int) -> int:
    """Evaluate every node whose inputs are all constant; returns how many tensors became constant."""
    graph = model.graph
    graph.toposort()
    changed = 0
    # Shape / Size of tensors whose shapes are fully known.
    for node in graph.nodes:
        if node.op in ("Shape", "Size") and node.outputs and not is_graph_output(graph, node.outputs[0]):
            shape = _static_shape(node.inputs[0])
            if shape is None:
                continue
            if node.op == "Shape":
                value = np.array(shape[_shape_slice(node, len(shape))], dtype=np.int64)
            else:
                value = np.array(int(np.prod(shape)), dtype=np.int64)
            _make_constant(node.outputs[0], value)
            changed += 1
            report.count("shape_ops_folded")
    graph.cleanup(remove_unused_graph_inputs=False).toposort()

    foldable: List[gs.Node] = []
    computed: Set[str] = set()
    leaf_bytes: Dict[str, int] = {}
    for node in graph.nodes:
        if (
            (node.domain or "") not in ("", "ai.onnx")
            or node.op in _KEEP_OPS
            or _has_subgraph(node)
            or not node.inputs
        ):
            continue
        ok = True
        cone = 0
        for tensor in node.inputs:
            if tensor.is_empty():
                continue
            if isinstance(tensor, gs.Constant):
                cone += int(np.asarray(tensor.values).nbytes)
            elif tensor.name in computed:
                cone += leaf_bytes[tensor.name]
            else:
                ok = False
                break
        if not ok:
            continue
        foldable.append(node)
        for out in node.outputs:
            computed.add(out.name)
            leaf_bytes[out.name] = cone
    if not foldable:
        return changed

    # Outputs that something outside the folded region needs.
    folded_ids = {id(node) for node in foldable}
    boundary: List[gs.Variable] = []
    for node in foldable:
        for out in node.outputs:
            if is_graph_output(graph, out):
                continue  # keep the model's interface computed
            if any(id(consumer) not in folded_ids for consumer in out.outputs):
                boundary.append(out)
    if not boundary:
        return changed
    values = _evaluate(model, foldable, boundary)
    for tensor in boundary:
        value = values.get(tensor.name)
        if value is None:
            continue
        if value.nbytes > max_bytes and value.nbytes > 2 * leaf_bytes[tensor.name]:
            report.count("constants_left_unfolded_size")
            continue
        _make_constant(tensor, value)
        changed += 1
        report.count("constant_tensors_folded")
    return changed


def _evaluate(model: Model, nodes: List[gs.Node], outputs: List[gs.Variable]) -> Dict[str, np.ndarray]:
    """Run the constant nodes in onnxruntime (optimisations off).

    All at once first; if onnxruntime rejects that (an op it lacks at this opset), node by
    node, leaving out the ones it cannot evaluate.
    """
    try:
        return _run_nodes(model, nodes, [t.name for t in outputs], {})
    except Exception:
        pass
    values: Dict[str, np.ndarray] = {}
    for node in nodes:
        if any(not t.is_empty() and not isinstance(t, gs.Constant) and t.name not in values for t in node.inputs):
            continue  # an input could not be computed
        try:
            values.update(_run_nodes(model, [node], [t.name for t in node.outputs], values))
        except Exception:
            continue
    wanted = {t.name for t in outputs}
    return {name: value for name, value in values.items() if name in wanted}


def _run_nodes(model: Model, nodes: List[gs.Node], outputs: List[str], known: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Evaluate nodes whose inputs are all constants (or values in ``known``)."""
    initializers = []
    seen = set()
    for node in nodes:
        for tensor in node.inputs:
            if tensor.is_empty() or tensor.name in seen:
                continue
            seen.add(tensor.name)
            if isinstance(tensor, gs.Constant):
                initializers.append(numpy_helper.from_array(np.asarray(tensor.values), tensor.name))
            elif tensor.name in known:
                initializers.append(numpy_helper.from_array(known[tensor.name], tensor.name))
    node_protos = [OnnxExporter.export_node(node) for node in nodes]
    output_infos = [helper.make_value_info(name, onnx.TypeProto()) for name in outputs]
    graph = helper.make_graph(node_protos, "fold", [], output_infos, initializer=initializers)
    proto = helper.make_model(graph, opset_imports=list(_opsets(model)))
    proto.ir_version = runtime.max_ir_version()
    session = runtime.make_session(proto, optimize=False)
    return dict(zip(outputs, session.run(outputs, {})))


def _make_constant(tensor: gs.Variable, value: np.ndarray) -> None:
    """Turn a computed tensor into a constant, keeping its producer's other outputs in place."""
    node = producer(tensor)
    if node is not None:
        # A placeholder keeps the positions of the producer's other outputs (Split, TopK...).
        node.outputs[node.outputs.index(tensor)] = gs.Variable(f"{tensor.name}__folded")
    tensor.to_constant(np.asarray(value))


def _opsets(model: Model):
    yield helper.make_opsetid("", model.opset)
    for domain in model.graph.import_domains or []:
        if domain.domain not in ("", "ai.onnx"):
            yield domain


# ---------------------------------------------------------------------- dynamic Reshape targets
def _symbolic_shape_value(tensor: gs.Tensor, depth: int = 0):
    """The value of a 1-D int shape tensor as a list of ints and ``(tensor, axis)`` dims.

    Follows Shape / Gather / Slice / Concat / Cast / Unsqueeze / Squeeze; None if anything
    else is on the way.
    """
    if depth > 16:
        return None
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        if values.dtype.kind not in "iu" or values.ndim > 1:
            return None
        return [int(v) for v in values.reshape(-1)]
    node = producer(tensor)
    if node is None:
        return None
    op = node.op
    if op == "Shape":
        source = node.inputs[0]
        if source.shape is None:
            return None
        rank = len(source.shape)
        dims = []
        for axis in range(rank)[_shape_slice(node, rank)]:
            dim = source.shape[axis]
            dims.append(int(dim) if isinstance(dim, (int, np.integer)) and dim >= 0 else (source, axis))
        return dims
    if op == "Cast" and helper.tensor_dtype_to_np_dtype(node.attrs["to"]).kind in "iu":
        return _symbolic_shape_value(node.inputs[0], depth + 1)
    if op in ("Unsqueeze", "Squeeze"):
        return _symbolic_shape_value(node.inputs[0], depth + 1)
    if op == "Concat" and int(node.attrs.get("axis", 0)) == 0:
        parts = [_symbolic_shape_value(t, depth + 1) for t in node.inputs]
        if any(p is None for p in parts):
            return None
        return [d for part in parts for d in part]
    if op == "Gather" and int(node.attrs.get("axis", 0)) == 0 and isinstance(node.inputs[1], gs.Constant):
        data = _symbolic_shape_value(node.inputs[0], depth + 1)
        if data is None:
            return None
        indices = np.asarray(node.inputs[1].values).reshape(-1)
        try:
            return [data[int(i)] for i in indices]
        except IndexError:
            return None
    if op == "Slice":
        data = _symbolic_shape_value(node.inputs[0], depth + 1)
        if data is None:
            return None
        if len(node.inputs) >= 3:
            args = [t for t in node.inputs[1:]]
            if not all(isinstance(t, gs.Constant) or t.is_empty() for t in args):
                return None
            starts = np.asarray(args[0].values).reshape(-1)
            ends = np.asarray(args[1].values).reshape(-1)
            axes = np.asarray(args[2].values).reshape(-1) if len(args) > 2 and not args[2].is_empty() else [0]
            steps = np.asarray(args[3].values).reshape(-1) if len(args) > 3 and not args[3].is_empty() else [1]
        else:
            starts, ends = node.attrs.get("starts", []), node.attrs.get("ends", [])
            axes, steps = node.attrs.get("axes", [0]), [1]
        if len(starts) != 1 or list(axes) not in ([0], [-1]):
            return None
        end = int(ends[0])
        end = min(end, len(data)) if end >= 0 else end
        return data[int(starts[0]) : end : int(steps[0])]
    return None


def fold_dynamic_reshape_shapes(model: Model, report: PassReport) -> int:
    """Reshape targets computed from a dynamic shape, rewritten as constants.

    An entry equal to the data input's own dim at the same position becomes ``0`` (copy the
    input dim); one remaining unknown entry becomes ``-1``. Exporters emit these chains for
    ``x.view(x.size(0), -1)``; after the rewrite the head is a plain Reshape every pass
    understands, and the model stays valid for any batch size.
    """
    changed = 0
    for node in list(model.graph.nodes):
        if node.op != "Reshape" or isinstance(node.inputs[1], gs.Constant) or int(node.attrs.get("allowzero", 0)):
            continue
        data = node.inputs[0]
        value = _symbolic_shape_value(node.inputs[1])
        if value is None or data.shape is None:
            continue
        target: List[int] = []
        unknown = 0
        for position, entry in enumerate(value):
            if isinstance(entry, int):
                if entry == 0 and position >= len(data.shape):
                    target = []
                    break
                target.append(entry)
                continue
            source, axis = entry
            same_dim = position < len(data.shape) and (
                (source is data and axis == position)
                or (isinstance(data.shape[position], str) and data.shape[position] == source.shape[axis])
            )
            if same_dim:
                target.append(0)
            else:
                target.append(-1)
                unknown += 1
        if not target or unknown > 1 or (unknown == 1 and -1 in [v for v in value if isinstance(v, int)]):
            continue
        node.inputs[1] = new_constant(model.graph, f"{node.name or node.outputs[0].name}_shape", np.array(target, dtype=np.int64))
        changed += 1
        report.count("dynamic_reshapes_folded")
    return changed


# ---------------------------------------------------------------------- duplicate nodes
def _attr_key(value):
    if isinstance(value, gs.Constant):
        values = np.asarray(value.values)
        return ("tensor", values.dtype.str, values.shape, values.tobytes())
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    return repr(value)


_SMALL_CONSTANT = 4096


def _input_key(tensor: gs.Tensor):
    """Tensors by identity; small constants by value (exporters repeat ``2.0`` under new names)."""
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
        if values.size <= _SMALL_CONSTANT:
            return ("constant", values.dtype.str, values.shape, values.tobytes())
    return id(tensor)


def merge_duplicate_nodes(graph: gs.Graph, report: PassReport) -> None:
    """Common-subexpression elimination: the same op on the same inputs computes the same thing.

    Exporters repeat slices and shape arithmetic per branch (UltraFace decodes its boxes with
    duplicated Slice/Div nodes).
    """
    graph.toposort()
    seen: Dict[tuple, gs.Node] = {}
    for node in list(graph.nodes):
        if node.op in _KEEP_OPS or _has_subgraph(node) or not node.outputs:
            continue
        key = (
            node.domain,
            node.op,
            tuple(_input_key(t) for t in node.inputs),
            tuple(sorted((name, _attr_key(value)) for name, value in node.attrs.items())),
            len(node.outputs),
        )
        original = seen.get(key)
        if original is None:
            seen[key] = node
            continue
        if any(is_graph_output(graph, out) for out in node.outputs):
            continue
        for duplicate_out, original_out in zip(node.outputs, original.outputs):
            replace_uses(duplicate_out, original_out)
        node.inputs.clear()
        node.outputs.clear()
        report.count("duplicate_nodes_merged")


# ---------------------------------------------------------------------- BatchNorm folding
def _bn_scale_shift(bn: gs.Node):
    params = bn.inputs[1:5]
    if len(params) != 4 or not all(isinstance(t, gs.Constant) for t in params):
        return None
    if int(bn.attrs.get("training_mode", 0)):
        return None
    # Same precision as the runtime's own Conv+BN fusion: on deep nets (PP-OCR det) a scale
    # rounded from float64 drifts further from the unfused model than the float32 one.
    dtype = np.float64 if np.asarray(params[0].values).dtype == np.float64 else np.float32
    gamma, beta, mean, var = (np.asarray(t.values, dtype=dtype) for t in params)
    eps = dtype(bn.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    return scale.astype(np.float64), shift.astype(np.float64), gamma


def fold_batchnorm(model: Model, report: PassReport) -> int:
    graph = model.graph
    folded = 0
    record = model.annotations.setdefault("batchnorm", {})
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or not bn.inputs:
            continue
        if len(bn.outputs) > 1 and any(o.outputs or is_graph_output(graph, o) for o in bn.outputs[1:]):
            continue
        layer = producer(bn.inputs[0])
        if layer is None or layer.op not in _WEIGHTED or sole_consumer(graph, bn.inputs[0]) is not bn:
            continue
        factors = _bn_scale_shift(bn)
        if factors is None:
            continue
        scale, shift, gamma = factors
        if not _apply_channel_affine(graph, layer, scale, shift):
            continue
        record[layer.name] = {"batchnorm": bn.name, "gamma": gamma.astype(np.float32)}
        out = bn.outputs[0]
        layer.outputs[0] = out
        bn.inputs.clear()
        bn.outputs.clear()
        report.count("batchnorm_folded")
        folded += 1
    return folded


# ---------------------------------------------------------------------- per-channel affine folding
def _out_channels(layer: gs.Node) -> Optional[int]:
    weight = layer.inputs[1]
    if not isinstance(weight, gs.Constant):
        return None
    shape = weight.values.shape
    if layer.op == "Conv":
        return int(shape[0])
    if layer.op == "ConvTranspose":
        return int(shape[1]) * int(layer.attrs.get("group", 1))
    if layer.op == "Gemm":
        return int(shape[0] if layer.attrs.get("transB", 0) else shape[1])
    return None


def _apply_channel_affine(graph: gs.Graph, layer: gs.Node, scale: np.ndarray, shift: np.ndarray) -> bool:
    """Rewrite ``layer`` so it computes ``layer(x) * scale + shift`` per output channel."""
    weight = layer.inputs[1]
    if not isinstance(weight, gs.Constant):
        return False
    channels = _out_channels(layer)
    if channels is None or scale.shape != (channels,) or shift.shape != (channels,):
        return False
    if layer.op == "Gemm" and layer.attrs.get("transA", 0) not in (0,):
        pass  # transA does not change the output-channel axis
    dtype = weight.values.dtype
    w = np.asarray(weight.values, dtype=np.float64)
    has_bias = len(layer.inputs) > 2 and not layer.inputs[2].is_empty()
    if has_bias and not isinstance(layer.inputs[2], gs.Constant):
        return False
    if layer.op == "Conv":
        w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
        bias = np.asarray(layer.inputs[2].values, dtype=np.float64) if has_bias else np.zeros(channels)
        bias = bias.reshape(-1) * scale + shift
    elif layer.op == "ConvTranspose":
        group = int(layer.attrs.get("group", 1))
        per_group = w.shape[1]
        grouped = w.reshape((group, w.shape[0] // group, per_group) + w.shape[2:])
        grouped = grouped * scale.reshape((group, 1, per_group) + (1,) * (w.ndim - 2))
        w = grouped.reshape(w.shape)
        bias = np.asarray(layer.inputs[2].values, dtype=np.float64) if has_bias else np.zeros(channels)
        bias = bias.reshape(-1) * scale + shift
    else:  # Gemm: Y = alpha * A' B' + beta * C
        alpha = float(layer.attrs.get("alpha", 1.0))
        beta = float(layer.attrs.get("beta", 1.0))
        trans_b = int(layer.attrs.get("transB", 0))
        w = w * alpha * (scale.reshape(-1, 1) if trans_b else scale.reshape(1, -1))
        if has_bias:
            c = np.asarray(layer.inputs[2].values, dtype=np.float64) * beta
            bias = c * scale + shift  # broadcasts over the last (output) axis
        else:
            bias = shift
        layer.attrs["alpha"] = 1.0
        layer.attrs["beta"] = 1.0
    replace_constant_values(graph, layer, 1, w.astype(dtype))
    bias = bias.astype(dtype)
    if has_bias:
        replace_constant_values(graph, layer, 2, bias)
    else:
        bias_tensor = new_constant(graph, f"{layer.name or weight.name}.bias", bias)
        while len(layer.inputs) < 2:
            layer.inputs.append(gs.Variable.empty())
        if len(layer.inputs) == 2:
            layer.inputs.append(bias_tensor)
        else:
            layer.inputs[2] = bias_tensor
    return True


def fold_channel_affine(model: Model, report: PassReport) -> int:
    """Conv/ConvTranspose/Gemm followed by Add/Sub/Mul/Div with a per-channel constant."""
    graph = model.graph
    folded = 0
    changed = True
    while changed:
        changed = False
        for layer in list(graph.nodes):
            if layer.op not in _WEIGHTED or not layer.outputs:
                continue
            out = layer.outputs[0]
            follower = sole_consumer(graph, out)
            if follower is None or follower.op not in ("Add", "Sub", "Mul", "Div") or len(follower.inputs) != 2:
                continue
            position = 0 if follower.inputs[0] is out else 1
            other = follower.inputs[1 - position]
            if not isinstance(other, gs.Constant) or (follower.op in ("Sub", "Div") and position != 0):
                continue
            channels = _out_channels(layer)
            rank = len(out.shape) if out.shape is not None else (2 if layer.op == "Gemm" else None)
            if channels is None or rank is None:
                continue
            values = np.asarray(other.values)
            if values.dtype.kind != "f":
                continue
            vector = channel_vector(values, rank, channels, channel_axis=1)
            if vector is None or (values.ndim > rank):
                continue
            follower_out = follower.outputs[0]
            if follower_out.shape is not None and out.shape is not None and len(follower_out.shape) != len(out.shape):
                continue  # the constant broadcasts the result to a higher rank
            vector = vector.astype(np.float64)
            if follower.op == "Add":
                scale, shift = np.ones(channels), vector
            elif follower.op == "Sub":
                scale, shift = np.ones(channels), -vector
            elif follower.op == "Mul":
                scale, shift = vector, np.zeros(channels)
            else:
                if np.any(vector == 0):
                    continue
                scale, shift = 1.0 / vector, np.zeros(channels)
            if not _apply_channel_affine(graph, layer, scale, shift):
                continue
            layer.outputs[0] = follower_out
            follower.inputs.clear()
            follower.outputs.clear()
            report.count(f"{follower.op.lower()}_folded_into_{layer.op.lower()}")
            changed = True
            folded += 1
    return folded


# ---------------------------------------------------------------------- MatMul + Add -> Gemm
def matmul_add_to_gemm(model: Model, report: PassReport) -> None:
    graph = model.graph
    for matmul in list(graph.nodes):
        if matmul.op != "MatMul" or len(matmul.inputs) != 2:
            continue
        a, b = matmul.inputs
        if not isinstance(b, gs.Constant) or b.values.ndim != 2 or a.shape is None or len(a.shape) != 2:
            continue
        out = matmul.outputs[0]
        add = sole_consumer(graph, out)
        if add is None or add.op != "Add" or len(add.inputs) != 2:
            continue
        bias = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        if not isinstance(bias, gs.Constant) or bias.values.dtype.kind != "f":
            continue
        n = b.values.shape[1]
        if bias.values.size not in (1, n) or bias.values.ndim > 2 or (bias.values.ndim == 2 and bias.values.shape[0] != 1):
            continue
        gemm = gs.Node("Gemm", name=matmul.name or add.name, inputs=[a, b, bias], outputs=[add.outputs[0]])
        matmul.inputs.clear()
        matmul.outputs.clear()
        add.inputs.clear()
        add.outputs.clear()
        graph.nodes.append(gemm)
        report.count("matmul_add_to_gemm")


def flatten_gemm_bias(model: Model, report: PassReport) -> None:
    """A Gemm bias of shape ``[1, N]`` becomes ``[N]`` (the same broadcast against ``[M, N]``).

    Exports write the 2-D form (MNIST's classifier; MatMul + Add turned Gemm above), and
    onnxruntime's ``quantize_static`` cannot handle it: its int32-bias scale check compares an
    array in an ``if`` and raises ("The truth value of an array ... is ambiguous").
    """
    for node in model.graph.nodes:
        if node.op != "Gemm" or len(node.inputs) < 3:
            continue
        bias = node.inputs[2]
        if not isinstance(bias, gs.Constant) or bias.values.ndim != 2 or bias.values.shape[0] != 1:
            continue
        replace_constant_values(model.graph, node, 2, bias.values.reshape(-1))
        report.count("gemm_bias_flattened")
