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
    lines (for probes whose failure is an answer); ``profile_prefix`` turns its profiler on."""
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 4 if quiet else _LOG_ERRORS_ONLY
    if threads is not None:
        session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = 1
    else:
        # working sessions (calibration, refits) alternate with numpy's BLAS: threads that spin
        # after each run starve it (ResNet-20's prune refit: 39 s of numpy instead of 2 s)
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


def run(session: ort.InferenceSession, feed: Dict[str, np.ndarray], outputs: Optional[Sequence[str]] = None):
    """Run with inputs cast to what the session declares (npz files often hold float64)."""
    typed = {}
    for meta in session.get_inputs():
        if meta.name in feed:
            dtype = _ORT_TYPES.get(meta.type)
            value = feed[meta.name]
            typed[meta.name] = np.ascontiguousarray(value, dtype=dtype) if dtype is not None else value
    return session.run(list(outputs) if outputs else None, typed)


def _saturation_probe(act_type: str, weight_value: int, depthwise: bool = False) -> onnx.ModelProto:
    """A QDQ conv, as we emit it, whose quantized inputs sit at the top of ``act_type`` (255 or
    127) against int8 weights at ``weight_value``: a 1x1 conv over 64 channels, or a 8x8
    depthwise conv on an 8x8 input; either way the exact output is 64 * weight_value / 127."""
    channels = 64
    outputs, kernel, size = (channels, 8, 8) if depthwise else (16, 1, 4)
    fan_in = kernel * kernel if depthwise else channels
    act = TensorProto.UINT8 if act_type == "uint8" else TensorProto.INT8
    top = 255.0 if act_type == "uint8" else 127.0
    initializers = [
        helper.make_tensor("xs", TensorProto.FLOAT, [], [1.0 / top]),
        helper.make_tensor("xz", act, [], [0]),
        helper.make_tensor("wq", TensorProto.INT8, [outputs, channels // outputs if depthwise else channels, kernel, kernel],
                           [weight_value] * (outputs * fan_in)),
        helper.make_tensor("ws", TensorProto.FLOAT, [outputs], [1.0 / 127.0] * outputs),
        helper.make_tensor("wz", TensorProto.INT8, [outputs], [0] * outputs),
        helper.make_tensor("ys", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("yz", act, [], [0]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], group=channels if depthwise else 1),
        helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, outputs, size - kernel + 1, size - kernel + 1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(max_ir_version(), 8)
    return model


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
    probe = _saturation_probe(act_type, 127, depthwise)
    shape = [d.dim_value for d in probe.graph.input[0].type.tensor_type.shape.dim]
    x = np.ones(shape, dtype=np.float32)  # quantizes to the top of the type
    try:
        out = make_session(probe, quiet=True).run(None, {"x": x})[0]
    except Exception:
        return False  # no int8 conv kernel here, so nothing to saturate
    return bool(np.abs(out - 64.0).max() > 1.0)
