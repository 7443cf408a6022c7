"""Streaming access to intermediate activations on calibration data.

Passes that learn from data (pruning importance and reconstruction, quantization ranges) need
intermediate tensors, never all of them at once: a session exposes the requested tensors as
extra outputs and the data are walked batch by batch, so memory does not grow with the number
of samples.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import onnx

from . import runtime
from .ir import Model

DEFAULT_BATCH = 16


def tap_session(model: Union[Model, onnx.ModelProto], names: Sequence[str], *, threads: Optional[int] = None,
                dynamic_batch: Optional[bool] = None, only: bool = False):
    """An onnxruntime session whose outputs include ``names``.

    A model exported with a fixed batch of 1 would make every calibration pass run one sample
    at a time; when its graph allows it (``dynamic_batch``; None probes with
    :func:`batch_can_grow`), this session's copy gets a symbolic batch dim. ``only``: the
    session computes ``names`` alone, without the nodes they do not depend on
    (:func:`runtime.only_outputs`), for passes that walk a model stage by stage. ``model`` may
    be a ModelProto serialized once for many sessions (it is copied, not changed).
    """
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        proto = model.to_proto()
    proto = runtime.only_outputs(proto, names) if only else runtime.with_outputs(proto, names)
    if dynamic_batch is None:
        dynamic_batch = batch_can_grow(proto)
    return runtime.make_session(_relax_batch(proto) if dynamic_batch else proto, threads=threads)


def batch_can_grow(proto: onnx.ModelProto) -> bool:
    """True for a batch-1 export that runs batch 2 correctly once its batch dim is symbolic."""
    if not _fixed_batch_one(proto):
        return False
    try:
        session = runtime.make_session(_relax_batch(proto), quiet=True)
        feed = {}
        for meta in session.get_inputs():
            shape = [2] + [d if isinstance(d, int) else 1 for d in meta.shape[1:]]
            feed[meta.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        outputs = session.run(None, feed)
    except Exception:
        return False
    return all(np.ndim(o) > 0 and np.shape(o)[0] == 2 for o in outputs)


def _fixed_batch_one(proto) -> bool:
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if not inputs:
        return False
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value != 1:
            return False
    return True


def _relax_batch(proto: onnx.ModelProto) -> onnx.ModelProto:
    relaxed = onnx.ModelProto()
    relaxed.CopyFrom(proto)
    for value in list(relaxed.graph.input) + list(relaxed.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del relaxed.graph.value_info[:]
    return relaxed


def feed_batch(feed: Dict[str, np.ndarray]) -> int:
    """The batch size of a feed: its first input's leading dim (1 for a scalar, 0 for no input)."""
    for value in feed.values():
        return int(np.shape(value)[0]) if np.ndim(value) else 1
    return 0


def iterate(session, data, names: Sequence[str], *, batch_size: int = DEFAULT_BATCH,
            with_feeds: bool = False) -> Iterator:
    """``{name: activation}`` for every batch of ``data`` (a CalibrationData or iterable of feeds);
    ``(feed, {name: activation})`` with ``with_feeds``."""
    batch_size = session_batch_size(session, batch_size)
    batches = data.batches(batch_size) if hasattr(data, "batches") else iter(data)
    names = list(names)
    for feed in batches:
        values = dict(zip(names, runtime.run(session, feed, names)))
        yield (feed, values) if with_feeds else values


def prefetch(iterator: Iterator, depth: int = 1) -> Iterator:
    """``iterator``'s items, with the next ``depth`` computed in a background thread.

    onnxruntime releases the GIL while it runs, so the next batch's inference overlaps the
    caller's numpy work on the current one (histograms, moments): on two cores calibration
    takes about the longer of the two instead of their sum. Memory: ``depth`` extra batches.
    """
    import queue
    import threading

    items: "queue.Queue" = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                items.put((True, item))
            items.put((True, done))
        except BaseException as exc:  # re-raised in the caller's thread
            items.put((False, exc))

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                items.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)


TAP_BUDGET_BYTES = 256 << 20
REFERENCE_BUDGET_BYTES = 256 << 20
"""Calibration inputs and the float model's outputs on them kept in memory for comparisons
(sensitivity's ReferenceOutputs, quant's calibration-method choice); past it they are recomputed."""


def batch_size_for(model: Model, names: Sequence[str], *, preferred: int = DEFAULT_BATCH,
                   budget: int = TAP_BUDGET_BYTES) -> int:
    """The largest batch (<= ``preferred``) whose tapped activations fit in ``budget`` bytes.

    Tapping every intermediate tensor of a large model at batch 16 can hold gigabytes per
    batch (ResNet-50 at 224x224: about 1.6 GB); the batch shrinks instead, so peak memory
    stays bounded whatever the model, as well as independent of the number of samples.
    """
    tensors = model.tensors()
    per_sample = 0
    for name in names:
        tensor = tensors.get(name)
        shape = getattr(tensor, "shape", None)
        if not shape:
            continue
        size = 1
        for dim in list(shape)[1:]:
            size *= dim if isinstance(dim, int) and dim > 0 else 1
        per_sample += 4 * size
    if per_sample == 0:
        return preferred
    return max(1, min(preferred, budget // per_sample))


def session_batch_size(session, preferred: int) -> int:
    """``preferred``, unless an input fixes its batch dim (many exports are batch 1)."""
    for meta in session.get_inputs():
        shape = meta.shape
        if shape and isinstance(shape[0], int) and shape[0] > 0:
            return int(shape[0])
    return preferred


class ChannelMoments:
    """Per-position mean, mean square and mean |x| along one axis, merged batch by batch.

    ``mean_only`` keeps just the mean (quant's bias correction needs no more): a third of the
    reductions, and no float64 copy of the tensor, on the calibration pass's busy core.
    """

    def __init__(self, axis: int, *, mean_only: bool = False):
        self.axis = axis
        self.mean_only = mean_only
        self.count = 0
        self.total: Optional[np.ndarray] = None
        self.total_sq: Optional[np.ndarray] = None
        self.total_abs: Optional[np.ndarray] = None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        channels = x.shape[self.axis]
        if self.mean_only:  # float64 accumulation of the same values: the same sums, no copy
            sums = np.moveaxis(x, self.axis, 0).reshape(channels, -1).sum(axis=1, dtype=np.float64)
            self.total = sums if self.total is None else self.total + sums
            self.count += x.size // max(channels, 1)
            return
        x = np.moveaxis(np.asarray(x, dtype=np.float64), self.axis, 0).reshape(channels, -1)
        if self.total is None:
            self.total = np.zeros(x.shape[0])
            self.total_sq = np.zeros(x.shape[0])
            self.total_abs = np.zeros(x.shape[0])
        self.total += x.sum(axis=1)
        self.total_sq += np.square(x).sum(axis=1)
        self.total_abs += np.abs(x).sum(axis=1)
        self.count += x.shape[1]

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def mean_square(self) -> np.ndarray:
        self._needs_all("mean_square")
        return self.total_sq / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        self._needs_all("mean_abs")
        return self.total_abs / max(self.count, 1)

    def _needs_all(self, what: str) -> None:
        if self.mean_only:
            raise ValueError(f"{what} was not accumulated (ChannelMoments(mean_only=True))")

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.mean_square - np.square(self.mean), 0.0)


def channel_moments(
    model: Model,
    axes: Dict[str, int],
    data,
    *,
    batch_size: int = DEFAULT_BATCH,
    progress=None,
) -> Dict[str, ChannelMoments]:
    """Moments of each tensor in ``axes`` (name -> channel axis) over ``data``."""
    names: List[str] = list(axes)
    moments = {name: ChannelMoments(axis) for name, axis in axes.items()}
    if not names:
        return moments
    session = tap_session(model, names)
    for values in prefetch(iterate(session, data, names, batch_size=batch_size)):
        for name in names:
            moments[name].update(values[name])
        if progress is not None:
            progress.update(1)
    return moments
