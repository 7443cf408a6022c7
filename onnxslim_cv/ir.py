"""The one IR every pass works on: an onnx-graphsurgeon graph plus the model-level facts.

Why graph-surgeon: passes rewrite graphs (slice weights, splice nodes, drop branches), and
gs gives producer/consumer links, tensor objects shared by reference and cheap copies, while
exporting standard ONNX. What gs does not carry (metadata, the original file, annotations
passes leave for later passes) lives on :class:`Model`.

Conventions every pass follows:
- never modify a weight array in place: assign a new array to ``Constant.values``
  (``Model.copy`` shares weight arrays between copies to stay cheap);
- after changing shapes, call :meth:`Model.infer_shapes` so later passes see fresh shapes.
"""

from __future__ import annotations

import copy as _copy
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from . import runtime
from .errors import UserError
from .specs import Dim, TensorSpec

# Tensors with at least this many elements are treated as weights (not shape arithmetic) when
# we strip a model down for shape inference.
_SHAPE_DATA_MAX_ELEMENTS = 64


class Model:
    """A model being compressed.

    Attributes:
        graph: the graph-surgeon graph (nodes, tensors, opset, IR version, producer).
        metadata: ``metadata_props`` of the original model.
        source: where it was loaded from (a path), for reports.
        annotations: facts one pass leaves for later ones within a pipeline (for example the
            BatchNormalization scales ``fold`` removed, which the BN-scale pruning criterion
            reads). Not serialized.
    """

    def __init__(
        self,
        graph: gs.Graph,
        *,
        metadata: Optional[Dict[str, str]] = None,
        model_doc_string: str = "",
        model_version: int = 0,
        domain: str = "",
        source: Optional[str] = None,
        annotations: Optional[Dict[str, Any]] = None,
    ):
        self.graph = graph
        self.metadata = dict(metadata or {})
        self.model_doc_string = model_doc_string
        self.model_version = model_version
        self.domain = domain
        self.source = source
        self.annotations: Dict[str, Any] = annotations if annotations is not None else {}

    # ------------------------------------------------------------------ import / export
    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, *, source: Optional[str] = None, copy: bool = True) -> "Model":
        """Import, normalising exporter quirks so every pass sees one canonical form.

        - initializers also listed as graph inputs (IR-3 era exports) become plain weights;
        - weights in ``Constant`` nodes (paddle2onnx style) become initializers;
        - ``Identity`` nodes that pass on an initializer (torch.onnx's deduplicated parameters)
          become initializers of their own.
        """
        if copy:
            proto = _copy_proto(proto)
        normalize_proto(proto)
        graph = gs.import_onnx(proto)
        # Materialise weights now: gs loads lazily per Constant object, so copies made before
        # first access would each load their own array, and the proto would stay alive.
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                tensor.values  # noqa: B018 - loads and caches
        return cls(
            graph,
            metadata={p.key: p.value for p in proto.metadata_props},
            model_doc_string=proto.doc_string,
            model_version=proto.model_version,
            domain=proto.domain,
            source=source,
        )

    def to_proto(self, *, ir_version: Optional[int] = None) -> onnx.ModelProto:
        """Export to standard ONNX with an IR version the installed onnxruntime loads."""
        self.graph.toposort()
        proto = gs.export_onnx(self.graph, do_type_check=False)
        proto.ir_version = ir_version or emit_ir_version(self.graph.ir_version or 0, proto.opset_import)
        proto.doc_string = self.model_doc_string
        proto.model_version = self.model_version
        proto.domain = self.domain
        del proto.metadata_props[:]
        for key, value in self.metadata.items():
            proto.metadata_props.add(key=key, value=value)
        return proto

    def copy(self) -> "Model":
        """Independent nodes and tensors; weight arrays are shared (never edit them in place)."""
        graph = self.graph.copy()
        return Model(
            graph,
            metadata=self.metadata,
            model_doc_string=self.model_doc_string,
            model_version=self.model_version,
            domain=self.domain,
            source=self.source,
            annotations=_copy.deepcopy(self.annotations),
        )

    # ------------------------------------------------------------------ facts
    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    @property
    def ir_version(self) -> int:
        return int(self.graph.ir_version or 0)

    def input_specs(self) -> List[TensorSpec]:
        return [tensor_spec(t) for t in self.graph.inputs]

    def output_specs(self) -> List[TensorSpec]:
        return [tensor_spec(t) for t in self.graph.outputs]

    def tensors(self) -> Dict[str, gs.Tensor]:
        return self.graph.tensors()

    def constants(self) -> Iterator[gs.Constant]:
        for tensor in self.graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                yield tensor

    # ------------------------------------------------------------------ shapes
    def set_input_shapes(self, shapes: Dict[str, Tuple[int, ...]]) -> None:
        """Fix dynamic input dims (``--input-shape NAME:1x3x224x224``) and re-infer shapes.

        Only dynamic dims may change: a fixed dim baked into the graph (a Reshape target, a
        Gemm size) would silently break if overridden.
        """
        by_name = {t.name: t for t in self.graph.inputs}
        for name, shape in shapes.items():
            if name not in by_name:
                raise UserError(f"--input-shape names '{name}', but the model's inputs are: {', '.join(by_name)}")
            tensor = by_name[name]
            old = tensor.shape
            if old is not None and len(old) != len(shape):
                raise UserError(
                    f"--input-shape {name}: gives {len(shape)} dims but the input has rank {len(old)} "
                    f"({_shape_str(old)})"
                )
            if old is not None:
                for axis, (was, new) in enumerate(zip(old, shape)):
                    if isinstance(was, int) and was >= 0 and was != new:
                        raise UserError(
                            f"--input-shape {name}: dim {axis} is fixed at {was} in the model, cannot set it to {new}"
                        )
            if any(d <= 0 for d in shape):
                raise UserError(f"--input-shape {name}: dims must be positive, got {_shape_str(shape)}")
            tensor.shape = list(shape)
        self.infer_shapes(reset=True)

    def infer_shapes(self, *, reset: bool = True) -> None:
        """Refresh every intermediate tensor's shape and dtype with ONNX shape inference.

        Weights are turned into typed graph inputs first, so the model handed to inference is
        tiny whatever the weight size (and models over 2 GB need no special path).
        ``reset`` forgets old intermediate shapes first: after a pass changed channel counts,
        stale value_info would contradict the new shapes.
        """
        graph = self.graph
        graph.toposort()
        proto = self.weightless_proto(keep_value_info=not reset)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
        except Exception:
            inferred = proto  # shape inference is best effort; callers handle unknown shapes
        known: Dict[str, onnx.ValueInfoProto] = {}
        for value_info in list(inferred.graph.value_info) + list(inferred.graph.output):
            known[value_info.name] = value_info
        graph_io = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
        for name, tensor in graph.tensors().items():
            if not isinstance(tensor, gs.Variable) or name in graph_io:
                continue
            value_info = known.get(name)
            if value_info is None:
                if reset:
                    tensor.shape = None
                continue
            dtype, shape = _type_from_value_info(value_info)
            if dtype is not None:
                tensor.dtype = dtype
            tensor.shape = shape
        # Graph outputs: fill in what inference learned about unknown dims, keep declared names.
        for tensor in graph.outputs:
            value_info = known.get(tensor.name)
            if value_info is None:
                continue
            dtype, shape = _type_from_value_info(value_info)
            if tensor.dtype is None and dtype is not None:
                tensor.dtype = dtype
            if shape is not None and (tensor.shape is None or len(tensor.shape) == len(shape)):
                merged = []
                for i, dim in enumerate(shape):
                    old = tensor.shape[i] if tensor.shape is not None else None
                    merged.append(dim if isinstance(dim, int) else (old if old is not None else dim))
                tensor.shape = merged

    def weightless_proto(self, *, keep_value_info: bool = True) -> onnx.ModelProto:
        """The model as ONNX with its weights turned into typed graph inputs.

        Shape inference and size estimates need the graph, not gigabytes of weights: built
        from a graph copy, so no weight is ever serialized (models over 2 GB included).
        Small integer constants stay, since shape inference reads their values.
        """
        graph = self.graph.copy()
        weights: Dict[str, gs.Variable] = {}
        for node in graph.nodes:
            for index, tensor in enumerate(node.inputs):
                if isinstance(tensor, gs.Constant) and _is_weight_like(tensor):
                    if tensor.name not in weights:
                        weights[tensor.name] = gs.Variable(tensor.name, dtype=tensor.dtype, shape=list(tensor.shape))
                    node.inputs[index] = weights[tensor.name]
        graph.inputs = list(graph.inputs) + list(weights.values())
        proto = gs.export_onnx(graph, do_type_check=False)
        proto.ir_version = emit_ir_version(max(proto.ir_version or 0, 4), proto.opset_import)
        if not keep_value_info:
            del proto.graph.value_info[:]
        return proto

    def estimated_size(self) -> int:
        """Serialized size in bytes, without serializing the weights."""
        weights = sum(int(t.values.nbytes) for t in self.constants() if _is_weight_like(t))
        return self.weightless_proto().ByteSize() + weights

    def probe_shapes_with_runtime(self, tensors: List[gs.Tensor], *, seed: int = 0) -> bool:
        """Fill in shapes ONNX inference could not, by running the model once in onnxruntime.

        ONNX shape inference gives up on Reshape targets computed at run time (paddle2onnx's
        ``Shape -> Cast -> Slice -> Concat`` heads); the runtime knows. Needs static inputs;
        returns False when it cannot run (then shapes stay unknown).
        """
        specs = self.input_specs()
        if not tensors or not all(spec.is_static for spec in specs):
            return False
        names = [t.name for t in tensors if t.name]
        try:
            proto = runtime.with_outputs(self.to_proto(), names)
            session = runtime.make_session(proto, optimize=False)
            rng = np.random.default_rng(seed)
            feed = {
                spec.name: rng.standard_normal(spec.shape).astype(spec.dtype)
                if spec.dtype.kind == "f"
                else np.zeros(spec.shape, spec.dtype)
                for spec in specs
            }
            values = session.run(names, feed)
        except Exception:
            return False
        for tensor, value in zip([t for t in tensors if t.name], values):
            tensor.shape = list(np.shape(value))
            if tensor.dtype is None:
                tensor.dtype = np.asarray(value).dtype
        return True


# ---------------------------------------------------------------------- helpers
def _shape_str(shape) -> str:
    return "x".join(str(d) if d is not None else "?" for d in shape)


def _copy_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(proto)
    return clone


def tensor_spec(tensor: gs.Tensor) -> TensorSpec:
    shape: Optional[Tuple[Dim, ...]] = None
    if tensor.shape is not None:
        shape = tuple(
            int(d) if isinstance(d, (int, np.integer)) and d >= 0 else (d if isinstance(d, str) and d else None)
            for d in tensor.shape
        )
    dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.float32)
    return TensorSpec(tensor.name, shape, dtype)


def _type_from_value_info(value_info: onnx.ValueInfoProto):
    tensor_type = value_info.type.tensor_type
    dtype = None
    if tensor_type.elem_type:
        try:
            dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        except Exception:
            dtype = None
    if not tensor_type.HasField("shape"):
        return dtype, None
    shape: List[Any] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        elif dim.HasField("dim_param"):
            shape.append(dim.dim_param)
        else:
            shape.append(None)
    return dtype, shape


def _is_weight_like(tensor: gs.Constant) -> bool:
    """Weights (moved out for shape inference) as opposed to shape arithmetic (kept)."""
    values = tensor.values
    is_shape_data = np.dtype(values.dtype) in (np.dtype(np.int64), np.dtype(np.int32))
    return values.size >= _SHAPE_DATA_MAX_ELEMENTS and not is_shape_data


def emit_ir_version(current: int, opset_imports) -> int:
    """The IR version to stamp on an emitted model.

    Keep the model's own version where possible (older runtimes downstream may need it), but
    at least IR 4 (initializers no longer listed as inputs) and what the opsets require, and
    never above what the installed onnxruntime loads.
    """
    opsets = [helper.make_opsetid(o.domain, o.version) for o in opset_imports]
    try:
        needed = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    except Exception:
        needed = 3
    target = max(int(current or 0), 4, needed)
    ceiling = runtime.max_ir_version()
    if needed > ceiling:
        raise UserError(
            f"the model's opsets need IR version {needed}, newer than onnxruntime loads ({ceiling})"
        )
    return min(target, ceiling)


def normalize_proto(proto: onnx.ModelProto) -> None:
    """In place: initializers out of graph inputs, Constant-node weights and Identity copies of
    initializers into initializers, sparse initializers made dense (graph-surgeon ignores them)."""
    graph = proto.graph
    if len(graph.sparse_initializer):
        from .storage import densify_sparse_initializers

        densify_sparse_initializers(graph)
    initializer_names = {init.name for init in graph.initializer}
    if any(inp.name in initializer_names for inp in graph.input):
        inputs = [inp for inp in graph.input if inp.name not in initializer_names]
        del graph.input[:]
        graph.input.extend(inputs)
    kept_nodes = []
    initializers = {init.name: init for init in graph.initializer}
    graph_outputs = {out.name for out in graph.output}
    for node in graph.node:  # topological order, so chains of Identity resolve in one sweep
        tensor = _constant_node_tensor(node)
        if tensor is None:
            tensor = _constant_identity_tensor(node, initializers, graph_outputs)
        if tensor is None:
            kept_nodes.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        initializers[tensor.name] = tensor
    if len(kept_nodes) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept_nodes)


def _constant_identity_tensor(node: onnx.NodeProto, initializers: Dict[str, onnx.TensorProto],
                              graph_outputs) -> Optional[onnx.TensorProto]:
    """A copy of the weight an ``Identity`` passes on, under the Identity's output name.

    torch.onnx's TorchScript exporter stores parameters with equal values once and reads the
    others through ``Identity``; as separate weights each layer can be sliced, sparsified or
    quantized on its own (a graph output stays the Identity's)."""
    if (node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.input) != 1
            or node.input[0] not in initializers or node.output[0] in graph_outputs):
        return None
    tensor = onnx.TensorProto()
    tensor.CopyFrom(initializers[node.input[0]])
    return tensor


def _constant_node_tensor(node: onnx.NodeProto) -> Optional[onnx.TensorProto]:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attribute = node.attribute[0]
    name = attribute.name
    if name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attribute.t)
        return tensor
    if name == "value_float":
        return numpy_helper.from_array(np.array(attribute.f, dtype=np.float32))
    if name == "value_floats":
        return numpy_helper.from_array(np.array(list(attribute.floats), dtype=np.float32))
    if name == "value_int":
        return numpy_helper.from_array(np.array(attribute.i, dtype=np.int64))
    if name == "value_ints":
        return numpy_helper.from_array(np.array(list(attribute.ints), dtype=np.int64))
    return None  # sparse or string constants stay as nodes


def constant_value(tensor: gs.Tensor) -> Optional[np.ndarray]:
    """The value of a constant tensor (initializer), or None for a runtime value."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None
