"""Small, deterministic computer-vision test models built with ``onnx.helper`` and numpy.

The compression passes (BatchNormalization folding, structured channel pruning, quantization)
need models that contain the graph patterns found in real exported CNNs - bias-free Conv + BN,
residual Adds, Concats, depthwise and grouped convs, squeeze-excite gates, Flatten/Reshape into
fully-connected layers, Resize, ConvTranspose, multi-output heads - but are small enough that a
test builds, transforms and runs them in milliseconds. Every builder here returns such a model.
A second group covers the other ways channels get coupled that a structured pruner must handle:
channel Split/Slice, DepthToSpace/SpaceToDepth, channel shuffle, Gemm squeeze-excite, per-channel
normalizations and activations (InstanceNorm, GroupNorm, LayerNorm over NHWC, PRelu), stacked
MatMul layers. :func:`resnet50` is the exception in size: the full network, for performance tests.

Conventions shared by all builders:

* Keyword-only arguments ``opset`` (11 to 21), ``seed`` and ``batch``; a ``str`` batch makes the
  leading dim of inputs and outputs symbolic (dynamic batch).
* Same arguments give a byte-identical ``SerializeToString()``; weights come from
  ``np.random.default_rng(seed)``.
* Weights look trained rather than freshly initialised: He-scaled conv/gemm weights and
  BatchNormalization nodes (kept unfolded) with non-trivial gamma, beta, running mean and
  running variance, so that folding changes numbers and activations stay well scaled.
* PyTorch-export-like names: graph input ``input``, nodes ``conv1``, ``bn1``, ``relu1``...,
  initializers ``conv1.weight``, ``bn1.running_var``...; a node's output tensor carries the node's
  name unless it is a graph output. Ops exported as several nodes (HardSwish, LayerNorm and
  GroupNorm at older opsets) name their parts ``<name>.<part>`` and the last part's output
  ``<name>``; the multi-output Split names its outputs ``<name>_0``, ``<name>_1``...
* ``ir_version`` is :data:`DEFAULT_IR_VERSION` (onnx 1.23 would stamp an IR version that
  onnxruntime 1.31 refuses), only the default domain is imported, no ``value_info`` is stored
  and the graph outputs declare their full shapes.

Use :data:`BUILDERS` / :func:`build` to iterate over all models and :func:`sample_inputs` to get
matching random inputs.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_IR_VERSION = 8
"""IR version stamped on every built model (accepted by onnxruntime 1.31 for all opsets here)."""

MIN_OPSET = 11
"""Oldest supported opset: Clip takes min/max as inputs and Resize has its roi input from here."""

MAX_OPSET = 21
"""Newest opset the builders are tested against."""

IN_CHANNELS = 3
"""Channels of the ``input`` image tensor of every model."""

Batch = Union[int, str]

__all__ = [
    "BUILDERS",
    "DEFAULT_IR_VERSION",
    "IN_CHANNELS",
    "MAX_OPSET",
    "MIN_OPSET",
    "build",
    "channel_shuffle",
    "channels_last_flatten",
    "conv_chain",
    "conv_transpose",
    "depth_to_space",
    "detection_head",
    "flatten_gemm",
    "group_conv",
    "group_norm",
    "matmul_classifier",
    "mobilenetv2_block",
    "mobilenetv3_block",
    "norm_zoo",
    "reshape_matmul",
    "resnet50",
    "resnet_basic_block",
    "resnet_bottleneck_block",
    "sample_inputs",
    "se_gemm",
    "shufflenet_v2",
    "split_concat",
    "squeezenet_fire",
    "unet_like",
]


# --------------------------------------------------------------------------------------------
# Graph construction helper
# --------------------------------------------------------------------------------------------


class _GraphBuilder:
    """Accumulates nodes and initializers with PyTorch-like names and seeded weights."""

    def __init__(self, name: str, *, opset: int, seed: int, batch: Batch, fast_weights: bool = False) -> None:
        if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
            raise ValueError(f"opset must be an int in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")
        if isinstance(batch, bool) or not (
            (isinstance(batch, int) and batch >= 1) or (isinstance(batch, str) and batch)
        ):
            raise ValueError(f"batch must be a positive int or a non-empty str, got {batch!r}")
        self.name = name
        self.opset = opset
        self.batch = batch
        self.rng = np.random.default_rng(seed)
        # float32 normals straight from the generator: about 4x faster than float64 + cast, for
        # the large models; the small builders keep the float64 stream their weights came from.
        self.fast_weights = fast_weights
        self.nodes: List[onnx.NodeProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self._counters: Dict[str, int] = {}
        self._used_names: set = set()

    # -- naming and raw nodes ------------------------------------------------------------------

    def fresh(self, prefix: str) -> str:
        count = self._counters.get(prefix, 0) + 1
        self._counters[prefix] = count
        return f"{prefix}{count}"

    def initializer(self, name: str, array: np.ndarray) -> str:
        return self._add_initializer(name, np.ascontiguousarray(array))

    def scalar(self, name: str, value: int) -> str:
        """A 0-d int64 initializer (:meth:`initializer` would store a 1-element vector)."""
        return self._add_initializer(name, np.array(value, dtype=np.int64))

    def _add_initializer(self, name: str, array: np.ndarray) -> str:
        if name in self._used_names:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._used_names.add(name)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(
        self,
        op_type: str,
        inputs: Sequence[str],
        name: str,
        output: Optional[str] = None,
        **attrs,
    ) -> str:
        """Add one single-output node; its output tensor is ``output`` or else ``name``."""
        out = output or name
        if out in self._used_names:
            raise ValueError(f"duplicate tensor name {out!r}")
        self._used_names.add(out)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    # -- weights -------------------------------------------------------------------------------

    def _normal(self, shape: Tuple[int, ...], std: float) -> np.ndarray:
        if self.fast_weights:
            return self.rng.standard_normal(size=shape, dtype=np.float32) * np.float32(std)
        return self.rng.normal(0.0, std, size=shape).astype(np.float32)

    def _he_normal(self, shape: Tuple[int, ...], fan_in: int, gain: float = 1.0) -> np.ndarray:
        return self._normal(shape, gain * math.sqrt(2.0 / fan_in))

    def _bias(self, n: int, fan_in: int) -> np.ndarray:
        bound = 1.0 / math.sqrt(fan_in)
        return self.rng.uniform(-bound, bound, size=n).astype(np.float32)

    # -- layers --------------------------------------------------------------------------------

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        kernel: int,
        *,
        stride: int = 1,
        pad: Optional[int] = None,
        group: int = 1,
        bias: bool = True,
        output: Optional[str] = None,
        gain: float = 1.0,
    ) -> str:
        """Conv with He-normal weights, times ``gain``."""
        if cin % group or cout % group:
            raise ValueError(f"channels {cin}->{cout} not divisible by group {group}")
        name = self.fresh("conv")
        fan_in = cin // group * kernel * kernel
        weight = self._he_normal((cout, cin // group, kernel, kernel), fan_in, gain)
        inputs = [x, self.initializer(f"{name}.weight", weight)]
        if bias:
            inputs.append(self.initializer(f"{name}.bias", self._bias(cout, fan_in)))
        pad = kernel // 2 if pad is None else pad
        return self.node(
            "Conv",
            inputs,
            name,
            output,
            dilations=[1, 1],
            group=group,
            kernel_shape=[kernel, kernel],
            pads=[pad] * 4,
            strides=[stride, stride],
        )

    def conv_transpose(
        self, x: str, cin: int, cout: int, kernel: int, *, stride: int, pad: int, bias: bool = False, group: int = 1
    ) -> str:
        name = self.fresh("deconv")
        # Each output pixel sums cin / group * (kernel / stride)^2 products: scale for that fan-in.
        fan_in = max(1, round(cin // group * (kernel / stride) ** 2))
        inputs = [x, self.initializer(f"{name}.weight", self._he_normal((cin, cout // group, kernel, kernel), fan_in))]
        if bias:
            inputs.append(self.initializer(f"{name}.bias", self._bias(cout, fan_in)))
        return self.node(
            "ConvTranspose",
            inputs,
            name,
            dilations=[1, 1],
            group=group,
            kernel_shape=[kernel, kernel],
            pads=[pad] * 4,
            strides=[stride, stride],
        )

    def bn(self, x: str, channels: int, output: Optional[str] = None) -> str:
        name = self.fresh("bn")
        rng = self.rng
        gamma = rng.uniform(0.5, 1.5, channels)
        beta = rng.uniform(-0.3, 0.3, channels)
        mean = rng.uniform(-0.3, 0.3, channels)
        var = rng.uniform(0.5, 2.0, channels)
        inputs = [x]
        for suffix, value in (("weight", gamma), ("bias", beta), ("running_mean", mean), ("running_var", var)):
            inputs.append(self.initializer(f"{name}.{suffix}", value.astype(np.float32)))
        return self.node("BatchNormalization", inputs, name, output, epsilon=1e-5, momentum=0.9)

    def relu(self, x: str, output: Optional[str] = None) -> str:
        return self.node("Relu", [x], self.fresh("relu"), output)

    def relu6(self, x: str, output: Optional[str] = None) -> str:
        """``Clip(x, 0, 6)`` as exported for ReLU6 (min/max are inputs from opset 11)."""
        name = self.fresh("clip")
        lo = self.initializer(f"{name}.min", np.array(0.0, dtype=np.float32))
        hi = self.initializer(f"{name}.max", np.array(6.0, dtype=np.float32))
        return self.node("Clip", [x, lo, hi], name, output)

    def hardsigmoid(self, x: str, output: Optional[str] = None) -> str:
        return self.node("HardSigmoid", [x], self.fresh("hardsigmoid"), output, alpha=1.0 / 6.0, beta=0.5)

    def hardswish(self, x: str, output: Optional[str] = None) -> str:
        """HardSwish op from opset 14; below, the ``x * HardSigmoid(x)`` decomposition."""
        name = self.fresh("hardswish")
        if self.opset >= 14:
            return self.node("HardSwish", [x], name, output)
        gate = self.node("HardSigmoid", [x], f"{name}.hardsigmoid", alpha=1.0 / 6.0, beta=0.5)
        return self.node("Mul", [x, gate], f"{name}.mul", output or name)

    def sigmoid(self, x: str, output: Optional[str] = None) -> str:
        return self.node("Sigmoid", [x], self.fresh("sigmoid"), output)

    def add(self, a: str, b: str, output: Optional[str] = None) -> str:
        return self.node("Add", [a, b], self.fresh("add"), output)

    def mul(self, a: str, b: str, output: Optional[str] = None) -> str:
        return self.node("Mul", [a, b], self.fresh("mul"), output)

    def concat(self, xs: Sequence[str], axis: int, output: Optional[str] = None) -> str:
        return self.node("Concat", list(xs), self.fresh("concat"), output, axis=axis)

    def global_avg_pool(self, x: str) -> str:
        return self.node("GlobalAveragePool", [x], self.fresh("avgpool"))

    def max_pool(self, x: str, kernel: int, stride: int, pad: int = 0) -> str:
        return self.node(
            "MaxPool",
            [x],
            self.fresh("maxpool"),
            kernel_shape=[kernel, kernel],
            pads=[pad] * 4,
            strides=[stride, stride],
        )

    def flatten(self, x: str) -> str:
        return self.node("Flatten", [x], self.fresh("flatten"), axis=1)

    def reshape(self, x: str, shape: Sequence[int], output: Optional[str] = None) -> str:
        name = self.fresh("reshape")
        target = self.initializer(f"{name}.shape", np.array(shape, dtype=np.int64))
        return self.node("Reshape", [x, target], name, output)

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        return self.node("Transpose", [x], self.fresh("transpose"), perm=list(perm))

    def gemm(self, x: str, fin: int, fout: int, *, he: bool = True, output: Optional[str] = None) -> str:
        """``nn.Linear`` as exported: Gemm with a [out, in] weight and transB=1."""
        name = self.fresh("fc")
        w = self._normal((fout, fin), math.sqrt((2.0 if he else 1.0) / fin))
        inputs = [
            x,
            self.initializer(f"{name}.weight", w),
            self.initializer(f"{name}.bias", self._bias(fout, fin)),
        ]
        return self.node("Gemm", inputs, name, output, alpha=1.0, beta=1.0, transB=1)

    def matmul_add(
        self, x: str, fin: int, fout: int, output: Optional[str] = None, *, bias: bool = True, he: bool = False
    ) -> str:
        """A linear layer as MatMul with a [in, out] weight followed by a bias Add (if ``bias``)."""
        name = self.fresh("matmul")
        w = self._normal((fin, fout), math.sqrt((2.0 if he else 1.0) / fin))
        if not bias:
            return self.node("MatMul", [x, self.initializer(f"{name}.weight", w)], name, output)
        y = self.node("MatMul", [x, self.initializer(f"{name}.weight", w)], name)
        b = self.initializer(f"{name}.bias", self._bias(fout, fin))
        return self.node("Add", [y, b], self.fresh("add"), output)

    def resize_nearest_x2(self, x: str) -> str:
        """Nearest ×2 upsampling via scales, as ``nn.Upsample(scale_factor=2)`` exports it."""
        name = self.fresh("resize")
        if self.opset >= 13:
            roi = ""  # optional from opset 13
        else:
            roi = self.initializer(f"{name}.roi", np.zeros(0, dtype=np.float32))
        scales = self.initializer(f"{name}.scales", np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32))
        return self.node(
            "Resize",
            [x, roi, scales],
            name,
            coordinate_transformation_mode="asymmetric",
            mode="nearest",
            nearest_mode="floor",
        )

    def split(self, x: str, sizes: Sequence[int], axis: int) -> List[str]:
        """Split into ``sizes`` (an attribute below opset 13, an int64 input from 13).

        The only multi-output node here: its outputs are named ``<node>_0``, ``<node>_1``...
        """
        name = self.fresh("split")
        outs = [f"{name}_{i}" for i in range(len(sizes))]
        for out in outs:
            if out in self._used_names:
                raise ValueError(f"duplicate tensor name {out!r}")
            self._used_names.add(out)
        if self.opset >= 13:
            inputs, attrs = [x, self.initializer(f"{name}.split", np.array(sizes, dtype=np.int64))], {}
        else:
            inputs, attrs = [x], {"split": list(sizes)}
        self.nodes.append(helper.make_node("Split", inputs, outs, name=name, axis=axis, **attrs))
        return outs

    def slice(self, x: str, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int]) -> str:
        """Slice with constant int64 ``starts``/``ends``/``axes`` inputs (unit steps)."""
        name = self.fresh("slice")
        inputs = [x]
        for key, value in (("starts", starts), ("ends", ends), ("axes", axes)):
            inputs.append(self.initializer(f"{name}.{key}", np.array(value, dtype=np.int64)))
        return self.node("Slice", inputs, name)

    def _affine(self, shape: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
        """Trained-looking normalization scale and shift (same ranges as BN gamma/beta)."""
        gamma = self.rng.uniform(0.5, 1.5, shape).astype(np.float32)
        beta = self.rng.uniform(-0.3, 0.3, shape).astype(np.float32)
        return gamma, beta

    def instance_norm(self, x: str, channels: int) -> str:
        name = self.fresh("instancenorm")
        gamma, beta = self._affine((channels,))
        inputs = [x, self.initializer(f"{name}.weight", gamma), self.initializer(f"{name}.bias", beta)]
        return self.node("InstanceNormalization", inputs, name, epsilon=1e-5)

    def prelu(self, x: str, channels: int) -> str:
        """``nn.PReLU(channels)`` as exported: the slope is unsqueezed to [C, 1, 1]."""
        name = self.fresh("prelu")
        slope = self.rng.uniform(0.1, 0.4, (channels, 1, 1)).astype(np.float32)
        return self.node("PRelu", [x, self.initializer(f"{name}.weight", slope)], name)

    def pad_spatial(self, x: str, pad: int) -> str:
        """Constant zero Pad of H and W only (pads as an int64 input from opset 11)."""
        name = self.fresh("pad")
        pads = self.initializer(f"{name}.pads", np.array([0, 0, pad, pad, 0, 0, pad, pad], dtype=np.int64))
        return self.node("Pad", [x, pads], name, mode="constant")

    def avg_pool(self, x: str, kernel: int, stride: int) -> str:
        return self.node(
            "AveragePool",
            [x],
            self.fresh("avgpool"),
            kernel_shape=[kernel, kernel],
            pads=[0] * 4,
            strides=[stride, stride],
        )

    def layer_norm_last_axis(self, x: str, channels: int) -> str:
        """``nn.LayerNorm(C)`` over the last axis: the op from opset 17, below it the export's
        ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div/Mul/Add decomposition."""
        name = self.fresh("layernorm")
        gamma, beta = self._affine((channels,))
        weight = self.initializer(f"{name}.weight", gamma)
        bias = self.initializer(f"{name}.bias", beta)
        if self.opset >= 17:
            return self.node("LayerNormalization", [x, weight, bias], name, axis=-1, epsilon=1e-5)
        mean = self.node("ReduceMean", [x], f"{name}.mean", axes=[-1], keepdims=1)
        centered = self.node("Sub", [x, mean], f"{name}.sub")
        two = self.initializer(f"{name}.exponent", np.array(2.0, dtype=np.float32))
        squared = self.node("Pow", [centered, two], f"{name}.pow")
        var = self.node("ReduceMean", [squared], f"{name}.var", axes=[-1], keepdims=1)
        eps = self.initializer(f"{name}.epsilon", np.array(1e-5, dtype=np.float32))
        std = self.node("Sqrt", [self.node("Add", [var, eps], f"{name}.add_eps")], f"{name}.sqrt")
        y = self.node("Mul", [self.node("Div", [centered, std], f"{name}.div"), weight], f"{name}.mul")
        return self.node("Add", [y, bias], f"{name}.add", name)

    def group_norm(self, x: str, channels: int, groups: int, spatial: Tuple[int, int]) -> str:
        """``nn.GroupNorm``: the opset-21 op (per-channel scale/bias [C]); below 21 the PyTorch
        export Reshape [0, G, -1] -> InstanceNormalization (ones/zeros [G]) -> Reshape back ->
        Mul gamma [C, 1, 1] -> Add beta [C, 1, 1]."""
        if channels % groups:
            raise ValueError(f"channels {channels} not divisible by groups {groups}")
        name = self.fresh("groupnorm")
        if self.opset >= 21:
            gamma, beta = self._affine((channels,))
            inputs = [x, self.initializer(f"{name}.weight", gamma), self.initializer(f"{name}.bias", beta)]
            return self.node("GroupNormalization", inputs, name, epsilon=1e-5, num_groups=groups)
        gamma, beta = self._affine((channels, 1, 1))
        grouped = self.initializer(f"{name}.group_shape", np.array([0, groups, -1], dtype=np.int64))
        y = self.node("Reshape", [x, grouped], f"{name}.reshape")
        ones = self.initializer(f"{name}.instance_scale", np.ones(groups, dtype=np.float32))
        zeros = self.initializer(f"{name}.instance_shift", np.zeros(groups, dtype=np.float32))
        y = self.node("InstanceNormalization", [y, ones, zeros], f"{name}.instancenorm", epsilon=1e-5)
        back = self.initializer(f"{name}.channel_shape", np.array([0, channels, *spatial], dtype=np.int64))
        y = self.node("Reshape", [y, back], f"{name}.reshape_back")
        y = self.node("Mul", [y, self.initializer(f"{name}.weight", gamma)], f"{name}.mul")
        return self.node("Add", [y, self.initializer(f"{name}.bias", beta)], f"{name}.add", name)

    def conv_bn_act(
        self,
        x: str,
        cin: int,
        cout: int,
        kernel: int,
        *,
        stride: int = 1,
        group: int = 1,
        bias: bool = False,
        act: Optional[str] = "relu",
        output: Optional[str] = None,
        gain: float = 1.0,
    ) -> str:
        """Bias-free (by default) Conv -> BatchNormalization -> optional activation."""
        y = self.conv(x, cin, cout, kernel, stride=stride, group=group, bias=bias, gain=gain)
        if act is None:
            return self.bn(y, cout, output=output)
        y = self.bn(y, cout)
        return {"relu": self.relu, "relu6": self.relu6, "hardswish": self.hardswish}[act](y, output=output)

    # -- model ---------------------------------------------------------------------------------

    def _graph(
        self, image_size: int, outputs: Sequence[onnx.ValueInfoProto], batch: Batch, *, weightless: bool = False
    ) -> onnx.GraphProto:
        """The graph; ``weightless`` turns float weights into typed graph inputs (for fast shape
        inference on big models) and keeps the small constants that inference reads."""
        shape = [batch, IN_CHANNELS, image_size, image_size]
        inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)]
        initializers = self.initializers
        if weightless:
            initializers = []
            for init in self.initializers:
                if init.data_type == TensorProto.FLOAT and math.prod(init.dims) > 16:
                    inputs.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
                else:
                    initializers.append(init)
        return helper.make_graph(self.nodes, self.name, inputs, list(outputs), initializer=initializers)

    def _model(self, graph: onnx.GraphProto) -> onnx.ModelProto:
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset)],
            producer_name="onnxslim_cv.testing",
        )
        model.ir_version = DEFAULT_IR_VERSION
        return model

    def finish(
        self,
        image_size: int,
        outputs: Sequence[str],
        *,
        known_shapes: Optional[Dict[str, Sequence[int]]] = None,
    ) -> onnx.ModelProto:
        """Wrap the graph in a model whose outputs declare full shapes.

        The output shapes come from running shape inference on a batch-1 copy, so every
        non-batch dim is concrete even behind Reshapes; the leading dim is then replaced by the
        requested ``batch`` (int or symbol). ``known_shapes`` gives the non-batch dims of
        outputs that ONNX shape inference cannot reach (it has no inference for the opset-21
        GroupNormalization); inference then runs non-strict and must not contradict them.
        """
        known_shapes = known_shapes or {}
        untyped = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        probe = onnx.shape_inference.infer_shapes(
            self._model(self._graph(image_size, untyped, 1, weightless=True)), strict_mode=not known_shapes
        )
        declared = []
        for out in probe.graph.output:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in out.type.tensor_type.shape.dim]
            if out.name in known_shapes:
                given = [1, *known_shapes[out.name]]
                if dims and dims != given:
                    raise AssertionError(f"{self.name}: {out.name!r} inferred as {dims}, expected {given}")
                dims = given
            if not dims or dims[0] != 1 or any(d is None or d <= 0 for d in dims):
                raise AssertionError(f"{self.name}: could not infer a static shape for {out.name!r}: {dims}")
            elem_type = out.type.tensor_type.elem_type or TensorProto.FLOAT
            declared.append(helper.make_tensor_value_info(out.name, elem_type, [self.batch] + dims[1:]))
        return self._model(self._graph(image_size, declared, self.batch))


def _check_divisible(builder: str, image_size: int, stride: int) -> None:
    if image_size <= 0 or image_size % stride:
        raise ValueError(f"{builder}: image_size must be a positive multiple of {stride}, got {image_size}")


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def conv_chain(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: Sequence[int] = (8, 16, 16),
) -> onnx.ModelProto:
    """Plain Conv-BN-Relu chain: the simplest BN-folding and pruning case.

    The first convs carry a bias (folding must merge it) and the last one is bias-free, the
    common PyTorch export, so folding must create a bias. Output ``output`` is the feature map.
    """
    g = _GraphBuilder("conv_chain", opset=opset, seed=seed, batch=batch)
    x, cin = "input", IN_CHANNELS
    for i, cout in enumerate(channels):
        last = i == len(channels) - 1
        y = g.bn(g.conv(x, cin, cout, 3, bias=not last), cout)
        x, cin = g.relu(y, output="output" if last else None), cout
    return g.finish(image_size, ["output"])


def _basic_block(g: _GraphBuilder, x: str, cin: int, cout: int, stride: int) -> str:
    y = g.conv_bn_act(x, cin, cout, 3, stride=stride)
    y = g.conv_bn_act(y, cout, cout, 3, act=None)
    shortcut = x
    if stride != 1 or cin != cout:
        shortcut = g.bn(g.conv(x, cin, cout, 1, stride=stride, pad=0, bias=False), cout)
    return g.relu(g.add(y, shortcut))


def _classifier(g: _GraphBuilder, x: str, channels: int, num_classes: int, output: str = "logits") -> str:
    return g.gemm(g.flatten(g.global_avg_pool(x)), channels, num_classes, he=False, output=output)


def resnet_basic_block(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    width: int = 8,
    num_classes: int = 10,
) -> onnx.ModelProto:
    """ResNet basic blocks: residual Adds tie the channels of the two branches together.

    Stem, an identity block (pruning its second conv must also prune the stem) and a stride-2
    block with a 1x1 conv+BN projection shortcut, then GAP/Flatten/Gemm head -> ``logits``.
    """
    _check_divisible("resnet_basic_block", image_size, 2)
    g = _GraphBuilder("resnet_basic_block", opset=opset, seed=seed, batch=batch)
    x = g.conv_bn_act("input", IN_CHANNELS, width, 3)
    x = _basic_block(g, x, width, width, 1)
    x = _basic_block(g, x, width, 2 * width, 2)
    _classifier(g, x, 2 * width, num_classes)
    return g.finish(image_size, ["logits"])


def resnet_bottleneck_block(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    width: int = 8,
    expansion: int = 4,
    num_classes: int = 10,
) -> onnx.ModelProto:
    """ResNet bottleneck: 1x1 reduce / 3x3 / 1x1 expand, where only the inner convs prune freely.

    The stride sits on the 3x3 (torchvision v1.5) and on the 1x1 projection shortcut; the
    block's output channels are bound by the residual Add. GAP/Flatten/Gemm -> ``logits``.
    """
    _check_divisible("resnet_bottleneck_block", image_size, 2)
    g = _GraphBuilder("resnet_bottleneck_block", opset=opset, seed=seed, batch=batch)
    stem, out = 2 * width, expansion * width
    x = g.conv_bn_act("input", IN_CHANNELS, stem, 3)
    y = g.conv_bn_act(x, stem, width, 1)
    y = g.conv_bn_act(y, width, width, 3, stride=2)
    y = g.conv_bn_act(y, width, out, 1, act=None)
    shortcut = g.bn(g.conv(x, stem, out, 1, stride=2, pad=0, bias=False), out)
    x = g.relu(g.add(y, shortcut))
    _classifier(g, x, out, num_classes)
    return g.finish(image_size, ["logits"])


def _inverted_residual(
    g: _GraphBuilder, x: str, cin: int, cout: int, expand: int, stride: int, output: Optional[str] = None
) -> str:
    """Expand 1x1 -> depthwise 3x3 -> linear 1x1 projection (no residual here)."""
    y = g.conv_bn_act(x, cin, expand, 1, act="relu6")
    y = g.conv_bn_act(y, expand, expand, 3, stride=stride, group=expand, act="relu6")
    return g.conv_bn_act(y, expand, cout, 1, act=None, output=output)


def mobilenetv2_block(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: int = 8,
    expand_ratio: int = 4,
    out_channels: int = 16,
) -> onnx.ModelProto:
    """MobileNetV2 inverted residuals: depthwise convs (group == channels) and ReLU6 as Clip.

    A depthwise conv's channels can only be pruned together with the expand conv feeding it.
    The first block (stride 1) has a residual Add, the second (stride 2) has none.
    Output ``output`` is the feature map.
    """
    _check_divisible("mobilenetv2_block", image_size, 2)
    g = _GraphBuilder("mobilenetv2_block", opset=opset, seed=seed, batch=batch)
    x = g.conv_bn_act("input", IN_CHANNELS, channels, 3, act="relu6")
    expand = channels * expand_ratio
    x = g.add(_inverted_residual(g, x, channels, channels, expand, 1), x)
    _inverted_residual(g, x, channels, out_channels, expand, 2, output="output")
    return g.finish(image_size, ["output"])


def mobilenetv3_block(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: int = 16,
    expand_channels: int = 32,
    se_channels: int = 8,
) -> onnx.ModelProto:
    """MobileNetV3 block: HardSwish and a squeeze-excite gate multiplied into the depthwise path.

    The SE convs (with bias) and the Mul bind the depthwise channels to the SE expand conv.
    HardSwish is the real op from opset 14 and ``x * HardSigmoid(x)`` below it; the SE gate is
    HardSigmoid(alpha=1/6, beta=0.5). Output ``output`` follows the residual Add.
    """
    g = _GraphBuilder("mobilenetv3_block", opset=opset, seed=seed, batch=batch)
    x = g.conv_bn_act("input", IN_CHANNELS, channels, 3, act="hardswish")
    y = g.conv_bn_act(x, channels, expand_channels, 1, act="hardswish")
    y = g.conv_bn_act(y, expand_channels, expand_channels, 3, group=expand_channels, act="hardswish")
    s = g.global_avg_pool(y)
    s = g.relu(g.conv(s, expand_channels, se_channels, 1, pad=0, bias=True))
    s = g.hardsigmoid(g.conv(s, se_channels, expand_channels, 1, pad=0, bias=True))
    y = g.mul(y, s)
    g.add(g.conv_bn_act(y, expand_channels, channels, 1, act=None), x, output="output")
    return g.finish(image_size, ["output"])


def _fire(g: _GraphBuilder, x: str, cin: int, squeeze: int, expand: int) -> Tuple[str, int]:
    s = g.relu(g.conv(x, cin, squeeze, 1, pad=0))
    e1 = g.relu(g.conv(s, squeeze, expand, 1, pad=0))
    e3 = g.relu(g.conv(s, squeeze, expand, 3))
    return g.concat([e1, e3], axis=1), 2 * expand


def squeezenet_fire(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 32,
    num_classes: int = 10,
) -> onnx.ModelProto:
    """SqueezeNet Fire modules: channel Concats, biased convs and no BatchNormalization at all.

    Pruning a Concat input shifts the channel ranges the next squeeze conv reads. Stem conv
    (stride 2) + MaxPool, two Fire modules, conv 1x1 classifier -> Relu -> GAP -> Flatten ->
    Softmax -> ``probs``.
    """
    _check_divisible("squeezenet_fire", image_size, 4)
    g = _GraphBuilder("squeezenet_fire", opset=opset, seed=seed, batch=batch)
    x = g.relu(g.conv("input", IN_CHANNELS, 16, 3, stride=2))
    x = g.max_pool(x, 3, 2, pad=1)
    x, c = _fire(g, x, 16, 4, 8)
    x, c = _fire(g, x, c, 6, 12)
    x = g.relu(g.conv(x, c, num_classes, 1, pad=0))
    x = g.flatten(g.global_avg_pool(x))
    g.node("Softmax", [x], g.fresh("softmax"), "probs", axis=1)
    return g.finish(image_size, ["probs"])


def group_conv(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: int = 16,
    groups: int = 4,
) -> onnx.ModelProto:
    """Grouped (not depthwise) 3x3 conv: channels can only be pruned evenly per group.

    1x1 conv-bn-relu, grouped 3x3 conv-bn-relu, 1x1 conv-bn -> ``output``.
    """
    if channels % groups or groups in (1, channels):
        raise ValueError(f"group_conv: need 1 < groups < channels dividing channels, got {groups}, {channels}")
    g = _GraphBuilder("group_conv", opset=opset, seed=seed, batch=batch)
    x = g.conv_bn_act("input", IN_CHANNELS, channels, 1)
    x = g.conv_bn_act(x, channels, channels, 3, group=groups)
    g.conv_bn_act(x, channels, channels, 1, act=None, output="output")
    return g.finish(image_size, ["output"])


def flatten_gemm(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: int = 8,
    hidden: int = 32,
    num_classes: int = 10,
) -> onnx.ModelProto:
    """Flatten of an unpooled feature map into Gemm: one conv channel owns H*W Gemm columns.

    Stride-2 conv-bn-relu -> Flatten -> Gemm -> Relu -> Gemm -> ``logits``.
    """
    _check_divisible("flatten_gemm", image_size, 2)
    g = _GraphBuilder("flatten_gemm", opset=opset, seed=seed, batch=batch)
    x = g.conv_bn_act("input", IN_CHANNELS, channels, 3, stride=2)
    features = channels * (image_size // 2) ** 2
    x = g.relu(g.gemm(g.flatten(x), features, hidden))
    g.gemm(x, hidden, num_classes, he=False, output="logits")
    return g.finish(image_size, ["logits"])


def reshape_matmul(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: int = 8,
    num_classes: int = 10,
    explicit_features: bool = True,
    channels_last: bool = False,
) -> onnx.ModelProto:
    """Reshape + MatMul + Add instead of Flatten + Gemm: the pruner must rewrite a shape constant.

    Stride-2 conv-bn-relu -> Reshape -> MatMul with a [C*H*W, K] weight -> Add -> ``logits``.
    ``explicit_features`` picks the Reshape target: ``[-1, C*H*W]`` (must be updated when
    channels are pruned) or ``[0, -1]`` (stays valid). ``channels_last`` transposes the
    features to NHWC first (:func:`channels_last_flatten`).
    """
    name = "channels_last_flatten" if channels_last else "reshape_matmul"
    _check_divisible(name, image_size, 2)
    g = _GraphBuilder(name, opset=opset, seed=seed, batch=batch)
    x = g.conv_bn_act("input", IN_CHANNELS, channels, 3, stride=2)
    if channels_last:
        x = g.transpose(x, [0, 2, 3, 1])
    features = channels * (image_size // 2) ** 2
    x = g.reshape(x, [-1, features] if explicit_features else [0, -1])
    g.matmul_add(x, features, num_classes, output="logits")
    return g.finish(image_size, ["logits"])


def channels_last_flatten(**kwargs) -> onnx.ModelProto:
    """Conv features flattened channels-last, as tf2onnx exports Keras's ``Conv2D -> Flatten ->
    Dense``: channel c owns every C-th feature, not a block of H*W. :func:`reshape_matmul` with
    ``channels_last=True``: a Transpose to NHWC before the ``[-1, H*W*C]`` Reshape."""
    return reshape_matmul(channels_last=True, **kwargs)


def unet_like(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 32,
    base_channels: int = 8,
) -> onnx.ModelProto:
    """Tiny U-Net: a skip connection concatenated with a Resize-upsampled decoder path.

    Encoder conv-bn-relu (skip) -> MaxPool 2x2 -> conv-bn-relu -> Resize nearest x2 (roi is an
    empty initializer at opset 11-12, omitted from 13) -> Concat [up, skip] -> conv-bn-relu ->
    1x1 conv to one channel -> Sigmoid -> ``mask``.
    """
    _check_divisible("unet_like", image_size, 2)
    g = _GraphBuilder("unet_like", opset=opset, seed=seed, batch=batch)
    c = base_channels
    skip = g.conv_bn_act("input", IN_CHANNELS, c, 3)
    x = g.max_pool(skip, 2, 2)
    x = g.conv_bn_act(x, c, 2 * c, 3)
    x = g.resize_nearest_x2(x)
    x = g.concat([x, skip], axis=1)
    x = g.conv_bn_act(x, 3 * c, c, 3)
    g.sigmoid(g.conv(x, c, 1, 1, pad=0), output="mask")
    return g.finish(image_size, ["mask"])


def conv_transpose(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: int = 8,
    kernel_size: int = 4,
    groups: int = 1,
) -> onnx.ModelProto:
    """Bias-free ConvTranspose + BN: its weight is [Cin, Cout / groups, k, k], so BN scales axis 1.

    Stride-2 conv-bn-relu -> ConvTranspose (stride 2, even kernel, pads (k-2)/2, restores the
    input size; ``groups`` > 1 makes it grouped, as in learned depthwise upsampling) -> BN ->
    Relu -> 3x3 conv -> ``output``.
    """
    if kernel_size < 2 or kernel_size % 2:
        raise ValueError(f"conv_transpose: kernel_size must be even and >= 2, got {kernel_size}")
    if groups < 1 or channels % groups:
        raise ValueError(f"conv_transpose: groups must divide channels, got {groups}, {channels}")
    _check_divisible("conv_transpose", image_size, 2)
    g = _GraphBuilder("conv_transpose", opset=opset, seed=seed, batch=batch)
    x = g.conv_bn_act("input", IN_CHANNELS, channels, 3, stride=2)
    x = g.conv_transpose(x, channels, channels, kernel_size, stride=2, pad=(kernel_size - 2) // 2, group=groups)
    x = g.relu(g.bn(x, channels))
    g.conv(x, channels, IN_CHANNELS, 3, output="output")
    return g.finish(image_size, ["output"])


def detection_head(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 32,
    channels: Tuple[int, int] = (8, 16),
    num_classes: int = 3,
    num_anchors: int = 2,
) -> onnx.ModelProto:
    """Two-level detector head: feature maps feed both the next stage and head convs.

    Levels at stride 2 and 4; per level a class conv -> Sigmoid and a box conv, each Transposed
    to NHWC and Reshaped (``[0, -1, K]``) to [N, H*W*A, K], then Concatenated across levels.
    The head convs' output channels encode anchors x classes and must never be pruned.
    Outputs ``scores`` [N, anchors, num_classes] and ``boxes`` [N, anchors, 4].
    """
    _check_divisible("detection_head", image_size, 4)
    g = _GraphBuilder("detection_head", opset=opset, seed=seed, batch=batch)
    levels = []
    x, cin = "input", IN_CHANNELS
    for cout in channels:
        x, cin = g.conv_bn_act(x, cin, cout, 3, stride=2), cout
        levels.append((x, cout))
    scores, boxes = [], []
    for feat, c in levels:
        cls = g.sigmoid(g.conv(feat, c, num_anchors * num_classes, 3))
        scores.append(g.reshape(g.transpose(cls, [0, 2, 3, 1]), [0, -1, num_classes]))
        box = g.conv(feat, c, num_anchors * 4, 3)
        boxes.append(g.reshape(g.transpose(box, [0, 2, 3, 1]), [0, -1, 4]))
    g.concat(scores, axis=1, output="scores")
    g.concat(boxes, axis=1, output="boxes")
    return g.finish(image_size, ["scores", "boxes"])


def split_concat(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
) -> onnx.ModelProto:
    """Channel Split into two branches, Concat back, then a channel Slice across both halves.

    Conv-bn-relu (16 ch) -> Split on axis 1 into [8, 8] (sizes as an attribute below opset 13,
    as an int64 input from 13) -> conv-bn-relu 8->8 on each half -> Concat -> Slice of channels
    [4, 12) (constant starts/ends/axes inputs) -> 1x1 conv -> ``output``. The split ties the
    stem's channels to both branches, and the Slice reads four channels of each branch and
    leaves the other eight unused.
    """
    g = _GraphBuilder("split_concat", opset=opset, seed=seed, batch=batch)
    x = g.conv_bn_act("input", IN_CHANNELS, 16, 3)
    halves = [g.conv_bn_act(h, 8, 8, 3) for h in g.split(x, [8, 8], axis=1)]
    x = g.slice(g.concat(halves, axis=1), [4], [12], [1])
    g.conv(x, 8, 8, 1, pad=0, output="output")
    return g.finish(image_size, ["output"])


def depth_to_space(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    mode: str = "DCR",
) -> onnx.ModelProto:
    """Pixel shuffle and unshuffle: channels and space trade places in blocks of 2x2.

    Conv-bn-relu 3->16 -> DepthToSpace (blocksize 2, ``mode`` "DCR" or "CRD") -> conv-bn-relu
    4->8 at twice the resolution -> SpaceToDepth (blocksize 2) -> 1x1 conv 32->8 -> ``output``.
    Each DepthToSpace output channel is made of four input channels, so channels can only be
    pruned in the matching groups of four (strided for DCR, contiguous for CRD), and every
    SpaceToDepth output channel belongs to one input channel.
    """
    if mode not in ("DCR", "CRD"):
        raise ValueError(f"depth_to_space: mode must be 'DCR' or 'CRD', got {mode!r}")
    g = _GraphBuilder("depth_to_space", opset=opset, seed=seed, batch=batch)
    x = g.conv_bn_act("input", IN_CHANNELS, 16, 3)
    x = g.node("DepthToSpace", [x], g.fresh("depthtospace"), blocksize=2, mode=mode)
    x = g.conv_bn_act(x, 4, 8, 3)
    x = g.node("SpaceToDepth", [x], g.fresh("spacetodepth"), blocksize=2)
    g.conv(x, 32, 8, 1, pad=0, output="output")
    return g.finish(image_size, ["output"])


def channel_shuffle(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: int = 16,
    groups: int = 2,
) -> onnx.ModelProto:
    """ShuffleNet channel shuffle: Reshape to 5-D, Transpose the group axis, Reshape back.

    Conv-bn-relu 3->C -> Reshape [0, G, C/G, H, W] -> Transpose perm [0, 2, 1, 3, 4] ->
    Reshape [0, C, H, W] -> 3x3 conv -> ``output``. Channel ``g * C/G + i`` lands at
    ``i * G + g``: the pruner must permute, not just cut, and keep the groups equal in size.
    The batch entry of both Reshape targets is 0, so dynamic batch works.
    """
    if groups < 2 or channels % groups:
        raise ValueError(f"channel_shuffle: need groups >= 2 dividing channels, got {groups}, {channels}")
    g = _GraphBuilder("channel_shuffle", opset=opset, seed=seed, batch=batch)
    x = g.conv_bn_act("input", IN_CHANNELS, channels, 3)
    x = g.reshape(x, [0, groups, channels // groups, image_size, image_size])
    x = g.transpose(x, [0, 2, 1, 3, 4])
    x = g.reshape(x, [0, channels, image_size, image_size])
    g.conv(x, channels, channels, 3, output="output")
    return g.finish(image_size, ["output"])


def shufflenet_v2(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: int = 16,
    units: int = 2,
) -> onnx.ModelProto:
    """ShuffleNet V2 stride-1 units as the official code (and FastestDet) export them.

    Two conv-bn-relu 3->C/2 branches concatenated (a downsampling unit's output, C channels),
    then ``units`` times: Reshape ``[-1, 2, H*W]`` (channel pairs become rows) -> Transpose
    ``[1, 0, 2]`` -> Reshape ``[2, -1, C/2, H, W]`` -> Gather 0 (the even channels, passed on)
    and Gather 1 (the odd ones, into the branch: 1x1 conv-bn-relu, depthwise 3x3 conv-bn,
    1x1 conv-bn-relu) -> Concat; a 1x1 conv C->8 -> ``output``. Each channel's path through
    the shuffles depends on its index bits, so the groups are small and interleaved.
    """
    if channels % 4:
        raise ValueError(f"shufflenet_v2: channels must be a multiple of 4, got {channels}")
    g = _GraphBuilder("shufflenet_v2", opset=opset, seed=seed, batch=batch)
    half = channels // 2
    x = g.concat([g.conv_bn_act("input", IN_CHANNELS, half, 3), g.conv_bn_act("input", IN_CHANNELS, half, 3)], axis=1)
    for _ in range(units):
        rows = g.reshape(x, [-1, 2, image_size * image_size])
        rows = g.transpose(rows, [1, 0, 2])
        pairs = g.reshape(rows, [2, -1, half, image_size, image_size])
        kept, branch = (g.node("Gather", [pairs, g.scalar(g.fresh("shuffle.index"), i)], g.fresh("gather"), axis=0) for i in (0, 1))
        y = g.conv_bn_act(branch, half, half, 1)
        y = g.conv_bn_act(y, half, half, 3, group=half, act=None)
        y = g.conv_bn_act(y, half, half, 1)
        x = g.concat([kept, y], axis=1)
    g.conv(x, channels, 8, 1, pad=0, output="output")
    return g.finish(image_size, ["output"])


def se_gemm(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: int = 16,
    se_channels: int = 4,
) -> onnx.ModelProto:
    """Squeeze-excite whose FC layers are Gemms (``nn.Linear``) rather than 1x1 convs.

    Conv-bn-relu 3->C -> GlobalAveragePool -> Flatten -> Gemm C->S -> Relu -> Gemm S->C ->
    Sigmoid -> Reshape [0, C, 1, 1] -> Mul with the conv output -> 1x1 conv -> ``output``.
    The gated conv's channels are bound to the Gemm input columns and the second Gemm's rows.
    """
    g = _GraphBuilder("se_gemm", opset=opset, seed=seed, batch=batch)
    x = g.conv_bn_act("input", IN_CHANNELS, channels, 3)
    s = g.flatten(g.global_avg_pool(x))
    s = g.relu(g.gemm(s, channels, se_channels))
    s = g.sigmoid(g.gemm(s, se_channels, channels))
    x = g.mul(x, g.reshape(s, [0, channels, 1, 1]))
    g.conv(x, channels, channels, 1, pad=0, output="output")
    return g.finish(image_size, ["output"])


def norm_zoo(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: int = 16,
) -> onnx.ModelProto:
    """A chain of channel-wise and channel-preserving ops, each carrying per-channel state or not.

    Conv 3->C (bias) -> InstanceNormalization (per-channel scale/bias) -> PRelu (slope
    [C, 1, 1]) -> conv -> LeakyRelu -> Pad (H and W only, constant) -> 3x3 conv with pad 0 ->
    Clip(0, 6) -> AveragePool 2x2 -> Resize nearest x2 -> conv -> Transpose to NHWC ->
    LayerNormalization over the channels (the op from opset 17, decomposed below) -> Transpose
    back -> MaxPool 2x2 -> conv C->8 -> ``output``.
    """
    _check_divisible("norm_zoo", image_size, 4)
    g = _GraphBuilder("norm_zoo", opset=opset, seed=seed, batch=batch)
    c = channels
    x = g.prelu(g.instance_norm(g.conv("input", IN_CHANNELS, c, 3), c), c)
    x = g.node("LeakyRelu", [g.conv(x, c, c, 3)], g.fresh("leakyrelu"), alpha=0.1)
    x = g.relu6(g.conv(g.pad_spatial(x, 1), c, c, 3, pad=0))
    x = g.resize_nearest_x2(g.avg_pool(x, 2, 2))
    x = g.transpose(g.conv(x, c, c, 3), [0, 2, 3, 1])
    x = g.transpose(g.layer_norm_last_axis(x, c), [0, 3, 1, 2])
    g.conv(g.max_pool(x, 2, 2), c, 8, 3, output="output")
    return g.finish(image_size, ["output"])


def group_norm(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: int = 16,
    groups: int = 4,
) -> onnx.ModelProto:
    """GroupNorm without any BatchNormalization: channels can only be pruned by whole groups.

    Conv 3->C (bias) -> GroupNorm (G groups) -> Relu -> 3x3 conv -> ``output``. From opset 21
    the ``GroupNormalization`` op with per-channel scale/bias [C]; below 21 PyTorch's export
    Reshape [0, G, -1] -> InstanceNormalization (scale ones [G], bias zeros [G]) -> Reshape
    [0, C, H, W] -> Mul gamma [C, 1, 1] -> Add beta [C, 1, 1]. ONNX shape inference (1.23)
    has no rule for GroupNormalization-21, so at opset 21 no shape is known past it.
    """
    if groups < 2 or channels % groups:
        raise ValueError(f"group_norm: need groups >= 2 dividing channels, got {groups}, {channels}")
    g = _GraphBuilder("group_norm", opset=opset, seed=seed, batch=batch)
    x = g.conv("input", IN_CHANNELS, channels, 3)
    x = g.relu(g.group_norm(x, channels, groups, (image_size, image_size)))
    g.conv(x, channels, channels, 3, output="output")
    # ONNX shape inference stops at the opset-21 GroupNormalization (onnxruntime runs it).
    shapes = {"output": [channels, image_size, image_size]} if opset >= 21 else None
    return g.finish(image_size, ["output"], known_shapes=shapes)


def matmul_classifier(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 16,
    channels: int = 8,
    hidden: int = 10,
    num_classes: int = 10,
) -> onnx.ModelProto:
    """Two MatMul layers after a Reshape: the second one consumes the first one's features.

    Stride-2 conv-bn-relu -> Reshape [-1, C*H*W] -> MatMul [C*H*W, hidden] -> Add bias -> Relu
    -> MatMul [hidden, num_classes] (no bias) -> ``logits``. Pruning hidden features removes
    columns of the first weight and its bias and rows of the second weight.
    """
    _check_divisible("matmul_classifier", image_size, 2)
    g = _GraphBuilder("matmul_classifier", opset=opset, seed=seed, batch=batch)
    x = g.conv_bn_act("input", IN_CHANNELS, channels, 3, stride=2)
    features = channels * (image_size // 2) ** 2
    x = g.reshape(x, [-1, features])
    x = g.relu(g.matmul_add(x, features, hidden, he=True))
    g.matmul_add(x, hidden, num_classes, output="logits", bias=False)
    return g.finish(image_size, ["logits"])


RESNET50_BRANCH_GAIN = 0.3
"""Scale (x He) of the last conv in each ResNet-50 residual branch: with full He weights the
random BatchNorms do not normalize and the residual stream grows ~100x over 16 blocks."""

RESNET50_STAGES: Tuple[Tuple[int, int], ...] = ((64, 3), (128, 4), (256, 6), (512, 3))
"""ResNet-50's (bottleneck width, block count) per stage; expansion 4."""


def resnet50(
    *,
    opset: int = 13,
    seed: int = 0,
    batch: Batch = 1,
    image_size: int = 224,
    num_classes: int = 1000,
) -> onnx.ModelProto:
    """Full ResNet-50 topology (torchvision layout) with random weights, ~25.6M parameters.

    For performance tests of whole-model passes rather than for pattern coverage: 7x7 stride-2
    conv 64 + BN + Relu + MaxPool 3x3/2 stem, bottleneck stages of 3, 4, 6 and 3 blocks with
    widths 64/128/256/512 and expansion 4, stride on the 3x3 conv and 1x1 conv+BN projection
    shortcuts in each stage's first block, then GlobalAveragePool -> Flatten -> Gemm 2048 ->
    ``num_classes`` -> ``logits``. Names run conv1..conv53 and bn1..bn53 in torchvision's order
    (a block's three convs, then its projection). The last conv of each residual branch is
    drawn at :data:`RESNET50_BRANCH_GAIN` times He scale, so that (as in trained ResNets) the
    branches stay small next to the identity path and activations keep a steady scale through
    all 16 blocks. Weights are drawn as float32 normals, so building takes well under a second.
    """
    _check_divisible("resnet50", image_size, 32)
    g = _GraphBuilder("resnet50", opset=opset, seed=seed, batch=batch, fast_weights=True)
    x = g.conv_bn_act("input", IN_CHANNELS, 64, 7, stride=2)
    x = g.max_pool(x, 3, 2, pad=1)
    cin = 64
    for stage, (width, blocks) in enumerate(RESNET50_STAGES):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            out = 4 * width
            y = g.conv_bn_act(x, cin, width, 1)
            y = g.conv_bn_act(y, width, width, 3, stride=stride)
            y = g.conv_bn_act(y, width, out, 1, act=None, gain=RESNET50_BRANCH_GAIN)
            shortcut = x
            if stride != 1 or cin != out:
                shortcut = g.bn(g.conv(x, cin, out, 1, stride=stride, pad=0, bias=False), out)
            x, cin = g.relu(g.add(y, shortcut)), out
    _classifier(g, x, cin, num_classes)
    return g.finish(image_size, ["logits"])


BUILDERS: Dict[str, Callable[..., onnx.ModelProto]] = {
    "conv_chain": conv_chain,
    "resnet_basic_block": resnet_basic_block,
    "resnet_bottleneck_block": resnet_bottleneck_block,
    "mobilenetv2_block": mobilenetv2_block,
    "mobilenetv3_block": mobilenetv3_block,
    "squeezenet_fire": squeezenet_fire,
    "group_conv": group_conv,
    "flatten_gemm": flatten_gemm,
    "reshape_matmul": reshape_matmul,
    "channels_last_flatten": channels_last_flatten,
    "unet_like": unet_like,
    "conv_transpose": conv_transpose,
    "detection_head": detection_head,
    "split_concat": split_concat,
    "depth_to_space": depth_to_space,
    "channel_shuffle": channel_shuffle,
    "shufflenet_v2": shufflenet_v2,
    "se_gemm": se_gemm,
    "norm_zoo": norm_zoo,
    "group_norm": group_norm,
    "matmul_classifier": matmul_classifier,
    "resnet50": resnet50,
}
"""All test-model builders by name."""


def build(name: str, **kwargs) -> onnx.ModelProto:
    """Build the model ``BUILDERS[name](**kwargs)``; unknown names raise ``KeyError``."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown test model {name!r}; available: {', '.join(BUILDERS)}") from None
    return builder(**kwargs)


def sample_inputs(model: onnx.ModelProto, *, batch: int = 1, seed: int = 0) -> Dict[str, np.ndarray]:
    """Deterministic standard-normal inputs for every graph input of ``model``.

    Symbolic or unknown dims take the value ``batch``. Float inputs get N(0, 1) values in their
    dtype (float32 for all models here); other element types are rejected.
    """
    rng = np.random.default_rng(seed)
    initializer_names = {init.name for init in model.graph.initializer}
    feeds: Dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in initializer_names:
            continue
        tensor_type = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if not np.issubdtype(dtype, np.floating):
            raise TypeError(f"sample_inputs: input {value.name!r} has non-float dtype {dtype}")
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds
