"""onnxruntime latency, measured interleaved so that two models share the machine's noise.

Timing A for ten seconds and then B for ten seconds on a shared 2-core machine measures the
machine as much as the models. Here every iteration runs each model once, alternating which
goes first, so drift (thermal, other processes) hits both alike, and the ratio B/A is the
median of per-iteration ratios.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import onnx

from . import runtime
from .errors import UserError

_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


@dataclass
class Timing:
    model: str
    median_ms: float
    p90_ms: float
    mean_ms: float
    runs: int


@dataclass
class BenchReport:
    threads: int
    timings: List[Timing]
    ratio: Optional[float]
    """Median over iterations of time(B) / time(A); None for a single model."""
    ratio_of_medians: Optional[float]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def random_feed(session, input_shapes: Optional[Dict[str, Sequence[int]]] = None, seed: int = 0) -> Dict[str, np.ndarray]:
    """Random inputs of the session's input shapes; dynamic dims need ``input_shapes``."""
    rng = np.random.default_rng(seed)
    input_shapes = input_shapes or {}
    feed = {}
    for meta in session.get_inputs():
        if meta.name in input_shapes:
            shape = list(input_shapes[meta.name])
        else:
            shape = []
            for axis, dim in enumerate(meta.shape):
                if isinstance(dim, int) and dim > 0:
                    shape.append(dim)
                elif axis == 0:
                    shape.append(1)
                else:
                    raise UserError(
                        f"input '{meta.name}' has dynamic dims {meta.shape}; pass --input-shape {meta.name}:1x3x224x224"
                    )
        dtype = _TYPES.get(meta.type, np.float32)
        if np.dtype(dtype).kind == "f":
            feed[meta.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feed[meta.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feed[meta.name] = rng.integers(0, 10, shape).astype(dtype)
    return feed


def benchmark(
    models: Sequence[Union[str, bytes, onnx.ModelProto]],
    *,
    threads: int = 1,
    warmup: int = 5,
    runs: Optional[int] = None,
    seconds: float = 5.0,
    input_shapes: Optional[Dict[str, Sequence[int]]] = None,
    labels: Optional[Sequence[str]] = None,
) -> BenchReport:
    """Median / p90 latency of one or two models, interleaved, and the ratio B/A."""
    if not 1 <= len(models) <= 2:
        raise UserError("bench takes one or two models")
    if threads < 1:
        raise UserError(f"--threads {threads}: must be >= 1")
    sessions = []
    for index, model in enumerate(models):
        try:
            sessions.append(runtime.make_session(model, threads=threads))
        except Exception as exc:
            name = labels[index] if labels else f"model {index + 1}"
            raise UserError(f"onnxruntime cannot load {name}: {str(exc).splitlines()[0][:200]}")
    feed = random_feed(sessions[0], input_shapes)
    if len(sessions) == 2:
        names_a = {m.name for m in sessions[0].get_inputs()}
        names_b = {m.name for m in sessions[1].get_inputs()}
        if names_a != names_b:
            raise UserError(f"the two models have different inputs: {sorted(names_a)} vs {sorted(names_b)}")
    for session in sessions:
        for _ in range(warmup):
            session.run(None, feed)

    if runs is None:
        started = time.perf_counter()
        for session in sessions:
            session.run(None, feed)
        one_round = max(time.perf_counter() - started, 1e-6)
        runs = int(min(max(seconds / one_round, 20), 5000))
    times: List[List[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for iteration in range(runs):
        for index in order if iteration % 2 == 0 else reversed(order):
            start = time.perf_counter()
            sessions[index].run(None, feed)
            times[index].append(time.perf_counter() - start)

    labels = list(labels) if labels else [_label(m, i) for i, m in enumerate(models)]
    timings = [
        Timing(
            model=labels[i],
            median_ms=1e3 * statistics.median(t),
            p90_ms=1e3 * float(np.percentile(t, 90)),
            mean_ms=1e3 * statistics.fmean(t),
            runs=len(t),
        )
        for i, t in enumerate(times)
    ]
    ratio = ratio_of_medians = None
    if len(sessions) == 2:
        ratio = statistics.median(b / a for a, b in zip(times[0], times[1]))
        ratio_of_medians = timings[1].median_ms / timings[0].median_ms
    return BenchReport(threads=threads, timings=timings, ratio=ratio, ratio_of_medians=ratio_of_medians)


def node_times(models: Sequence[Union[str, bytes, onnx.ModelProto]], feed: Dict[str, np.ndarray], *,
               runs: Optional[int] = None, seconds: float = 2.0, threads: int = 1, warmup: int = 5) -> List[Dict[str, float]]:
    """Median onnxruntime kernel time (ms) of every executed node of each model, from its profiler.

    The models run interleaved, one run each per iteration (as :func:`benchmark`), so that
    drift hits them alike. For attributing time to the model's own nodes the sessions optimize
    at the extended level: fusions (Conv + BN + Relu) keep the surviving node's name, the
    fused-away nodes are absent. The full level's NCHWc layout pass renames every conv after its
    output tensor and runs somewhat faster overall, so these are per-node shares, not the
    deployed latency.
    """
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        sessions = [runtime.make_session(model, threads=threads, optimize="extended",
                                         profile_prefix=os.path.join(folder, f"profile{index}"))
                    for index, model in enumerate(models)]
        started = time.perf_counter()
        for _ in range(warmup):
            for session in sessions:
                session.run(None, feed)
        if runs is None:  # as many as fit in ``seconds`` (the profiler's overhead included)
            runs = int(min(max(seconds * warmup / max(time.perf_counter() - started, 1e-6), 20), 2000))
        for iteration in range(runs):
            for session in sessions if iteration % 2 == 0 else reversed(sessions):
                session.run(None, feed)
        results = []
        for session in sessions:
            with open(session.end_profiling()) as handle:
                events = json.load(handle)
            samples: Dict[str, List[float]] = {}
            for event in events:
                name = event.get("name", "")
                if event.get("cat") == "Node" and name.endswith("_kernel_time"):
                    samples.setdefault(name[: -len("_kernel_time")], []).append(event["dur"] / 1e3)
            # the first ``warmup`` runs of every node are discarded
            results.append({name: statistics.median(values[warmup:] or values) for name, values in samples.items()})
    return results


def _label(model, index: int) -> str:
    if isinstance(model, (bytes, onnx.ModelProto)):
        return f"model {'AB'[index]}"
    return str(model)


def race(models: Sequence[Any], feed: Dict[str, np.ndarray], *, seconds: float = 1.5, threads: int = 1,
         min_rounds: int = 5, max_rounds: int = 10_000, eliminate: Optional[float] = None,
         eliminate_after: int = 10) -> List[float]:
    """Median milliseconds of each model on ``feed``, timed round-robin in one loop.

    For choosing between several candidates quickly: every round runs each model once (in a
    rotating order), so machine noise hits all of them alike, and the total time is bounded
    by ``seconds`` whatever the number of candidates; small models stop at ``max_rounds``
    (a median of a few hundred runs is already steady) instead of filling the time.

    ``eliminate`` (a fraction, e.g. 0.02): from ``eliminate_after`` rounds on, a candidate
    whose lower quartile is above the current leader's upper quartile times ``1 + eliminate``
    is clearly slower and stops running (its median is from the rounds it ran), and the race
    ends once one candidate is left. Near-ties still get the whole budget; a clear winner
    (SqueezeNet's all-int8 model at half the time of its float-stem variants) is found in a
    few dozen runs instead of 1.5 s.
    """
    sessions = [runtime.make_session(m, threads=threads) for m in models]
    for session in sessions:  # warm up: first runs allocate and pick kernels
        for _ in range(2):
            session.run(None, feed)
    samples: List[List[float]] = [[] for _ in sessions]
    running = list(range(len(sessions)))
    deadline = time.perf_counter() + seconds
    rounds = 0
    while rounds < min_rounds or time.perf_counter() < deadline:
        shift = rounds % len(running)
        for index in running[shift:] + running[:shift]:
            started = time.perf_counter()
            sessions[index].run(None, feed)
            samples[index].append(time.perf_counter() - started)
        rounds += 1
        if rounds >= max(max_rounds, min_rounds):
            break
        if eliminate is not None and rounds >= eliminate_after and len(running) > 1:
            running = _still_close(running, samples, eliminate)
            if len(running) == 1:
                break
    return [statistics.median(times) * 1e3 for times in samples]


def _still_close(running: List[int], samples: List[List[float]], margin: float) -> List[int]:
    """The candidates not clearly slower than the leader (see :func:`race`)."""
    quartiles = {i: np.percentile(samples[i], [25, 75]) for i in running}
    leader = min(running, key=lambda i: statistics.median(samples[i]))
    bound = quartiles[leader][1] * (1.0 + margin)
    return [i for i in running if i == leader or quartiles[i][0] <= bound]
