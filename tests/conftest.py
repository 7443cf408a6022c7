"""Shared fixtures: model files built with onnx.helper, CLI runner, output comparison."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional

import numpy as np
import onnx
import pytest

from onnxslim_cv import runtime
from onnxslim_cv.cli import main
from onnxslim_cv.pipeline import _REGISTRY
from onnxslim_cv.testing import models

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str) -> ModuleType:
    """``tools/NAME.py`` imported as module ``NAME`` (the benchmark scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model_file(tmp_path) -> Callable[..., Path]:
    """Write a builder's model (or any ModelProto) to a file and return the path."""

    def write(model_or_name, name: Optional[str] = None, **kwargs) -> Path:
        proto = models.build(model_or_name, **kwargs) if isinstance(model_or_name, str) else model_or_name
        path = tmp_path / (name or (f"{model_or_name}.onnx" if isinstance(model_or_name, str) else "model.onnx"))
        onnx.save(proto, str(path))
        return path

    return write


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, err={self.err!r})"


@pytest.fixture
def cli(capsys) -> Callable[..., CliResult]:
    """Run the CLI in-process; returns exit code and captured output."""

    def run(*args) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def assert_one_line_error(result: CliResult, *fragments: str) -> None:
    """Bad input: exit 2, exactly one error line on stderr, no traceback."""
    assert result.code == 2, result
    errors = [line for line in result.err.splitlines() if "error:" in line]
    assert len(errors) == 1, result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def graph_model(graph: onnx.GraphProto, opset: int = 13) -> onnx.ModelProto:
    """A hand-built graph as a model onnxruntime loads (onnx 1.23 would stamp IR 14 on it)."""
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def unprunable_model() -> onnx.ModelProto:
    """Conv 3->8 -> Softmax over the channels -> 1x1 conv 8->4 (the graph output): every channel
    group is frozen, the first by the Softmax, the second as a graph output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (4, 8, 1, 1)), ("b2", (4,)))]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Softmax", ["conv1"], ["softmax1"], name="softmax1", axis=1),
        helper.make_node("Conv", ["softmax1", "w2", "b2"], ["output"], name="conv2"),
    ]
    graph = helper.make_graph(nodes, "unprunable", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])], weights)
    return graph_model(graph)


def run_model(model, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
    source = model if isinstance(model, (str, Path)) else model
    session = runtime.make_session(str(source) if isinstance(source, Path) else source)
    return runtime.run(session, feeds)


def max_relative_error(reference: List[np.ndarray], candidate: List[np.ndarray]) -> float:
    """Largest |ref - cand| over the largest |ref|, across outputs."""
    worst = 0.0
    for ref, cand in zip(reference, candidate):
        assert ref.shape == cand.shape
        scale = max(float(np.abs(ref).max()), 1e-12)
        worst = max(worst, float(np.abs(ref.astype(np.float64) - cand).max()) / scale)
    return worst


@pytest.fixture
def temporary_pass():
    """Register a pass class for one test, then remove it from the registry."""
    added: List[str] = []

    def register(cls):
        from onnxslim_cv.pipeline import register_pass

        register_pass(cls)
        added.append(cls.name)
        return cls

    yield register
    for name in added:
        _REGISTRY.pop(name, None)


def with_scalar_clip_bounds(proto):
    """Clip min/max as 0-d initializers (what PyTorch exports) instead of the builders' [1]."""
    from onnx import numpy_helper

    bounds = {n.input[i] for n in proto.graph.node if n.op_type == "Clip" for i in (1, 2) if len(n.input) > i}
    for init in proto.graph.initializer:
        if init.name in bounds:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).reshape(()), init.name))
    return proto


def sample_data(proto, count: int, seed: int):
    """``count`` single-sample batches of the builders' deterministic inputs, as calibration data."""
    from onnxslim_cv.calibration import from_iterable
    from onnxslim_cv.ir import Model
    from onnxslim_cv.testing import models as test_models

    specs = Model.from_proto(proto).input_specs()
    return from_iterable([test_models.sample_inputs(proto, batch=1, seed=seed + i) for i in range(count)], specs)


def outputs_on(model, feeds) -> List[np.ndarray]:
    """Every output of ``model`` (a Model or ModelProto) on ``feeds``, concatenated over them."""
    from onnxslim_cv import runtime
    from onnxslim_cv.ir import Model

    proto = model.to_proto() if isinstance(model, Model) else model
    session = runtime.make_session(proto)
    return [np.concatenate(x) for x in zip(*[runtime.run(session, feed) for feed in feeds])]


def relative_output_error(reference, candidate, feeds) -> float:
    """Squared output error of ``candidate`` relative to the energy of ``reference``'s outputs."""
    a, b = outputs_on(reference, feeds), outputs_on(candidate, feeds)
    return float(sum(np.square(x - y).sum() for x, y in zip(a, b)) / sum(np.square(x).sum() for x in a))


def chunk_read_through_shape() -> onnx.ModelProto:
    """Conv 3->16 -> Relu -> ``chunk(2, 1)`` as TorchScript exports it (the halves' bounds
    computed from ``Shape``) -> Concat -> 1x1 conv 16->4: frozen until the Shape arithmetic is
    evaluated."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (16, 3, 3, 3)), ("w2", (4, 16, 1, 1)))]
    weights += [numpy_helper.from_array(np.array(v, np.int64), n)
                for n, v in (("one", [1]), ("two", [2]), ("zero", [0]), ("big", [1 << 30]))]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["h"], name="relu1"),
        helper.make_node("Shape", ["h"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "one"], ["c"], name="channels", axis=0),
        helper.make_node("Div", ["c", "two"], ["half"], name="half"),
        helper.make_node("Slice", ["h", "zero", "half", "one"], ["a"], name="first_half"),
        helper.make_node("Slice", ["h", "half", "big", "one"], ["b"], name="second_half"),
        helper.make_node("Relu", ["b"], ["b1"], name="relu2"),
        helper.make_node("Concat", ["a", "b1"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "w2"], ["output"], name="conv2"),
    ]
    graph = helper.make_graph(nodes, "chunk", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])], weights)
    return graph_model(graph)
