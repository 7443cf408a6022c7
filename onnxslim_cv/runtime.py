"""onnxruntime facts and sessions: what the installed runtime loads, and how we run models.

The emitted IR version and opset must be ones the installed onnxruntime accepts (onnx 1.23
stamps IR 14 on new models; onnxruntime 1.31 refuses it). Rather than keeping a version table
that goes stale, we ask the runtime once per process with a one-node model.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from .errors import UserError

ModelSource = Union[str, os.PathLike, bytes, onnx.ModelProto]

# onnxruntime warns loudly about old opsets and initializers listed as inputs; our own
# messages say what matters, so sessions log errors only.
_LOG_ERRORS_ONLY = 3


def _probe_model(ir_version: int, opset: int) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model.SerializeToString()


def _loads(model_bytes: bytes) -> bool:
    try:
        session_options = ort.SessionOptions()
        session_options.log_severity_level = _LOG_ERRORS_ONLY
        ort.InferenceSession(model_bytes, session_options, providers=["CPUExecutionProvider"])
        return True
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def max_ir_version() -> int:
    """Highest model IR version the installed onnxruntime loads."""
    for ir in range(onnx.IR_VERSION, 2, -1):
        if _loads(_probe_model(ir, 13)):
            return ir
    raise RuntimeError("onnxruntime loads no IR version at all; the installation is broken")


@functools.lru_cache(maxsize=None)
def max_opset() -> int:
    """Highest ai.onnx opset the installed onnxruntime loads."""
    ir = max_ir_version()
    for opset in range(onnx.defs.onnx_opset_version(), 6, -1):
        if _loads(_probe_model(ir, opset)):
            return opset
    raise RuntimeError("onnxruntime loads no ai.onnx opset at all; the installation is broken")


def default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 1


@functools.lru_cache(maxsize=None)
def native_block_size() -> int:
    """Channel block of onnxruntime's NCHWc conv kernels on this CPU (16 on AVX-512, else 8).

    A conv whose channel counts are not multiples of it computes the padded count, and one
    narrower than it reads plain NCHW (a layout switch before it): counts in multiples of the
    block are the ones whose time follows their MACs.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return 16 if " avx512f" in line else 8
    except OSError:
        pass
    return 8


def check_runtime_can_load(model: onnx.ModelProto, what: str) -> None:
    """Refuse a model whose IR version or opset the installed onnxruntime cannot load."""
    if model.ir_version > max_ir_version():
        raise UserError(
            f"{what} has IR version {model.ir_version}; onnxruntime {ort.__version__} loads at most "
            f"IR {max_ir_version()} (re-export it, or set model.ir_version = {max_ir_version()})"
        )
    opset = default_opset(model)
    if opset > max_opset():
        raise UserError(
            f"{what} uses ai.onnx opset {opset}; onnxruntime {ort.__version__} supports at most "
            f"opset {max_opset()}"
        )
    if opset < 7:
        raise UserError(
            f"{what} uses ai.onnx opset {opset}; onnxruntime only supports opset 7 and newer "
            "(convert it with onnx.version_converter first)"
        )


def make_session(
    model: ModelSource,
    *,
    threads: Optional[int] = None,
    optimize: Union[bool, str] = True,
    optimized_model_path: Optional[str] = None,
    quiet: bool = False,
    profile_prefix: Optional[str] = None,
) -> ort.InferenceSession:
    """A CPU session. ``threads`` pins intra-op threads (benchmarks use 1 for stable numbers;
    without it the threads do not spin between runs, which would starve numpy in between);
    ``optimize``: True (every graph optimization), False (none) or ``"extended"`` (fusions, but
    not the NCHWc layout pass that renames convs); ``quiet`` silences onnxruntime's own error
    lines (for probes whose failure is an answer); ``profile_prefix`` turns its profiler on.

    Working sessions (no ``threads``) also run without onnxruntime's CPU memory arena. The arena
    grows to each session's largest run and keeps it until the session goes; the passes hold
    several sessions at once on large calibration batches: on a ResNet-50 (128x128, 64 samples,
    ``prune --target-macs 0.7``) the peak RSS was 7.0 GB with the arena and 4.4 GB without, for
    the same wall time and bit-identical weights."""
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 4 if quiet else _LOG_ERRORS_ONLY
    if threads is not None:
        session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = 1
    else:
        # working sessions (calibration, refits) alternate with numpy's BLAS: threads that spin
        # after each run starve it (ResNet-20's prune refit: 39 s of numpy instead of 2 s)
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session_options.enable_cpu_mem_arena = False
    session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session_options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if optimize == "extended"
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if profile_prefix:
        session_options.enable_profiling = True
        session_options.profile_file_prefix = profile_prefix
    if optimized_model_path:
        session_options.optimized_model_filepath = optimized_model_path
    if isinstance(model, onnx.ModelProto):
        source: Union[str, bytes] = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        source = str(Path(model))
    else:
        source = model
    return ort.InferenceSession(source, session_options, providers=["CPUExecutionProvider"])


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """``proto`` (changed in place) with the tensors ``names`` added as graph outputs."""
    present = {o.name for o in proto.graph.output}
    for name in names:
        if name and name not in present:
            proto.graph.output.append(helper.make_value_info(name, onnx.TypeProto()))
            present.add(name)
    return proto


def only_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """``proto`` (changed in place) computing ``names`` and nothing else: those become the only
    graph outputs, and nodes (and weights) they do not depend on are dropped.

    onnxruntime runs every node of a graph whatever outputs a run asks for (a tap on ResNet-18's
    first block cost the whole model, 63 ms against 8 ms for that block alone), so a pass that
    needs an early activation should not pay for the rest of the network. When only graph
    inputs are asked for, the graph is kept whole (onnxruntime refuses one without nodes)."""
    graph = proto.graph
    wanted = [name for name in dict.fromkeys(names) if name]
    targets = set(wanted)
    needed = set(wanted)
    keep = []
    for node in reversed(graph.node):  # nodes are stored in topological order
        if any(output in needed for output in node.output):
            keep.append(node)
            needed.update(node.input)
            needed.update(_outer_names(node))
    if not keep:  # only graph inputs asked for: onnxruntime refuses a graph without nodes
        return with_outputs(proto, names)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    known = {}  # the wanted tensors' declared types, copied before their lists are cleared
    for value in list(graph.output) + list(graph.value_info) + list(graph.input):
        if value.name in targets and value.type.HasField("tensor_type"):
            known[value.name] = onnx.ValueInfoProto()
            known[value.name].CopyFrom(value)
    del graph.output[:]
    for name in wanted:
        graph.output.append(known[name] if name in known else helper.make_value_info(name, onnx.TypeProto()))
    dropped = {init.name for init in graph.initializer if init.name not in needed}
    used = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)
    inputs = [value for value in graph.input if value.name not in dropped]  # old exports list weights as inputs too
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.value_info[:]
    return proto


def _outer_names(node: onnx.NodeProto) -> set:
    """Every tensor name read inside ``node``'s subgraphs (they may come from the outer graph)."""
    names = set()
    for attribute in node.attribute:
        graphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for sub in graphs:
            for inner in sub.node:
                names.update(inner.input)
                names.update(_outer_names(inner))
    return names


def run(session: ort.InferenceSession, feed: Dict[str, np.ndarray], outputs: Optional[Sequence[str]] = None):
    """Run with inputs cast to what the session declares (npz files often hold float64)."""
    typed = {}
    for meta in session.get_inputs():
        if meta.name in feed:
            dtype = _ORT_TYPES.get(meta.type)
            value = feed[meta.name]
            typed[meta.name] = np.ascontiguousarray(value, dtype=dtype) if dtype is not None else value
    return session.run(list(outputs) if outputs else None, typed)


def _conv_probe(act_type: str, weights: np.ndarray, group: int = 1, y_scale: float = 1.0) -> onnx.ModelProto:
    """A QDQ conv, as we emit it, over an input of ones that quantizes to the top of ``act_type``
    (255 or 127), with int8 ``weights`` [out, in / group, k, k] at scale 1/127; no padding."""
    outputs, per_group, kernel = weights.shape[0], weights.shape[1], weights.shape[2]
    channels = per_group * group
    act = TensorProto.UINT8 if act_type == "uint8" else TensorProto.INT8
    top = 255.0 if act_type == "uint8" else 127.0
    initializers = [
        helper.make_tensor("xs", TensorProto.FLOAT, [], [1.0 / top]),
        helper.make_tensor("xz", act, [], [0]),
        helper.make_tensor("wq", TensorProto.INT8, list(weights.shape), weights.astype(np.int8).ravel().tolist()),
        helper.make_tensor("ws", TensorProto.FLOAT, [outputs], [1.0 / 127.0] * outputs),
        helper.make_tensor("wz", TensorProto.INT8, [outputs], [0] * outputs),
        helper.make_tensor("ys", TensorProto.FLOAT, [], [y_scale]),
        helper.make_tensor("yz", act, [], [0]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], group=group),
        helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"]),
    ]
    size = kernel + 3
    graph = helper.make_graph(
        nodes, "int8_conv_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, outputs, 4, 4])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(max_ir_version(), 8)
    return model


def _saturation_probe(act_type: str, weight_value: int, depthwise: bool = False) -> onnx.ModelProto:
    """A 1x1 conv over 64 channels, or a 8x8 depthwise conv, every weight at ``weight_value``:
    the exact output is 64 * weight_value / 127."""
    if depthwise:
        return _conv_probe(act_type, np.full((64, 1, 8, 8), weight_value), group=64)
    return _conv_probe(act_type, np.full((16, 64, 1, 1), weight_value))


def _probe_output(probe: onnx.ModelProto, *, optimize: bool = True) -> np.ndarray:
    shape = [d.dim_value for d in probe.graph.input[0].type.tensor_type.shape.dim]
    return make_session(probe, optimize=optimize, quiet=True).run(None, {"x": np.ones(shape, np.float32)})[0]


@functools.lru_cache(maxsize=None)
def int8_products_saturate(act_type: str = "uint8", depthwise: bool = False) -> bool:
    """Whether onnxruntime's int8 conv kernel for ``act_type`` activations overflows on this CPU.

    x86 CPUs without VNNI (AVX2, AVX-512F) multiply 8-bit values with ``vpmaddubsw``, which adds
    each pair of products into a saturating int16: 255 * 127 * 2 = 64770 clips at 32767
    (onnxruntime's quantization docs, "reduce_range"). Real activations and weights reach it and
    the outputs drift (SqueezeNet's cosine to fp32 falls to 0.86); on this AVX2 runtime int8
    activations fare worse still. We ask the installed runtime with a conv that hits exactly
    that case rather than reading CPU flags, so ARM, VNNI and future kernels answer for themselves.
    Depthwise convs have their own kernel (it widens to int16 first and does not saturate on AVX2),
    so they are asked separately.
    """
    try:
        out = _probe_output(_saturation_probe(act_type, 127, depthwise))
    except Exception:
        return False  # no int8 conv kernel here, so nothing to saturate
    return bool(np.abs(out - 64.0).max() > 1.0)


@functools.lru_cache(maxsize=None)
def int8_pairs_are_adjacent(act_type: str = "uint8") -> bool:
    """Whether this onnxruntime's int8 conv kernel pairs only the products of neighbouring weights.

    ``qdq.adjacent_pair_levels`` assumes the kernel reads each output channel's weights in
    (kernel position, input channel) order and pairs entries 2i and 2i+1. Two convs check it
    (1x1 over 64 channels, 3x3 over 4): input channels alternate +127 / -64, so those pairs
    never overflow, while any other pairing (two taps of one channel, channels two apart)
    puts two 127s together and overflows. The fused output must match the unfused QDQ math.
    """
    try:
        for kernel, channels in ((1, 64), (3, 4)):
            weights = np.where(np.arange(channels) % 2 == 0, 127, -64).reshape(1, channels, 1, 1)
            probe = _conv_probe(act_type, np.broadcast_to(weights, (16, channels, kernel, kernel)), y_scale=0.125)
            if np.abs(_probe_output(probe) - _probe_output(probe, optimize=False)).max() > 0.25:
                return False
    except Exception:
        return False
    return True
