"""Verification: run the reference and the candidate in onnxruntime on the same inputs.

Per output: max abs error, cosine similarity per sample (mean and worst), SNR in dB, and
top-1 / top-5 agreement for classifier-shaped outputs. Metrics are accumulated batch by
batch, so memory does not grow with the number of samples. The gate (``--min-cosine``,
``--min-top1-agreement``, ``--max-latency-ratio``) decides whether a compressed model ships.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import onnx
from tqdm.auto import tqdm

from . import runtime
from .errors import UserError
from .model_io import PathLike

DEFAULT_MIN_COSINE = 0.99
_VERIFY_BATCH = 8


@dataclass
class Thresholds:
    """The gate. ``min_cosine`` applies to every output's mean per-sample cosine."""

    min_cosine: Optional[float] = DEFAULT_MIN_COSINE
    min_top1_agreement: Optional[float] = None
    max_latency_ratio: Optional[float] = None

    def validate(self) -> None:
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise UserError(f"--min-cosine {self.min_cosine}: must be within [-1, 1]")
        if self.min_top1_agreement is not None and not 0.0 <= self.min_top1_agreement <= 1.0:
            raise UserError(f"--min-top1-agreement {self.min_top1_agreement}: a fraction within [0, 1], e.g. 0.99")
        if self.max_latency_ratio is not None and self.max_latency_ratio <= 0:
            raise UserError(f"--max-latency-ratio {self.max_latency_ratio}: must be > 0")


@dataclass
class OutputMetrics:
    name: str
    shape: List[Any]
    samples: int = 0
    max_abs_error: float = 0.0
    cosine_mean: float = 1.0
    cosine_min: float = 1.0
    snr_db: Optional[float] = None
    """None means no error at all (infinite SNR)."""
    top1_agreement: Optional[float] = None
    top5_agreement: Optional[float] = None
    nonfinite: int = 0
    """Candidate values that are NaN or inf (always a failure)."""


@dataclass
class VerifyReport:
    reference: str
    candidate: str
    data: str
    samples: int
    outputs: List[OutputMetrics]
    thresholds: Dict[str, Optional[float]]
    latency: Optional[Dict[str, Any]] = None
    failures: List[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return data


class _Accumulator:
    """Streaming metrics for one output."""

    def __init__(self, name: str):
        self.name = name
        self.shape: List[Any] = []
        self.samples = 0
        self.max_abs = 0.0
        self.cos_sum = 0.0
        self.cos_min = 1.0
        self.signal = 0.0
        self.noise = 0.0
        self.top1 = 0
        self.top5 = 0
        self.classified = 0
        self.top5_possible = True
        self.nonfinite = 0

    def add(self, ref: np.ndarray, cand: np.ndarray, batch: int) -> None:
        if ref.shape != cand.shape:
            raise UserError(
                f"output '{self.name}' has shape {list(cand.shape)} in the candidate but {list(ref.shape)} in the reference"
            )
        per_sample = ref.ndim >= 1 and ref.shape[0] == batch and batch > 0
        self.shape = (["N"] + list(ref.shape[1:])) if per_sample else list(ref.shape)
        ref64 = ref.astype(np.float64, copy=False)
        cand64 = cand.astype(np.float64, copy=False)
        finite = np.isfinite(cand64)
        self.nonfinite += int(finite.size - np.count_nonzero(finite))
        if ref.size == 0:
            return
        diff = np.where(finite, ref64 - cand64, 0.0)
        self.max_abs = max(self.max_abs, float(np.abs(diff).max()))
        self.signal += float(np.square(ref64).sum())
        self.noise += float(np.square(diff).sum())
        rows_ref = ref64.reshape(batch, -1) if per_sample else ref64.reshape(1, -1)
        rows_cand = np.where(finite, cand64, 0.0).reshape(rows_ref.shape)
        for r, c in zip(rows_ref, rows_cand):
            self.cos_sum += (cos := _cosine(r, c))
            self.cos_min = min(self.cos_min, cos)
            self.samples += 1
        classes = _classifier_classes(ref.shape)
        if per_sample and classes:
            logits_ref = rows_ref.reshape(batch, classes)
            logits_cand = rows_cand.reshape(batch, classes)
            top_ref = logits_ref.argmax(axis=1)
            self.top1 += int(np.count_nonzero(top_ref == logits_cand.argmax(axis=1)))
            if classes > 5:
                top5_cand = np.argpartition(-logits_cand, 5, axis=1)[:, :5]
                self.top5 += int(np.count_nonzero((top5_cand == top_ref[:, None]).any(axis=1)))
            else:
                self.top5_possible = False
            self.classified += batch

    def result(self) -> OutputMetrics:
        snr = None
        if self.noise > 0:
            snr = 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf
        return OutputMetrics(
            name=self.name,
            shape=self.shape,
            samples=self.samples,
            max_abs_error=self.max_abs,
            cosine_mean=self.cos_sum / self.samples if self.samples else 1.0,
            cosine_min=self.cos_min,
            snr_db=snr,
            top1_agreement=self.top1 / self.classified if self.classified else None,
            top5_agreement=self.top5 / self.classified if self.classified and self.top5_possible else None,
            nonfinite=self.nonfinite,
        )


COSINE_ATOL = 1e-6
"""Per-element absolute floor: outputs that agree within float32 noise count as equal.

Without it, an output that is ~0 everywhere (a sigmoid map on an image with no text) has a
cosine of noise against noise, and a bit-exact rewrite would fail the gate.
"""


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    floor = a.size * COSINE_ATOL**2
    dot = float(np.dot(a, b)) + floor
    norms = float(np.dot(a, a) + floor) * float(np.dot(b, b) + floor)
    return float(dot / np.sqrt(norms))


def _classifier_classes(shape: Sequence[int]) -> Optional[int]:
    """Class count for [N, K] or [N, K, 1, 1] outputs (K >= 2); None for anything else."""
    dims = list(shape)
    while len(dims) > 2 and dims[-1] == 1:
        dims.pop()
    if len(dims) == 2 and dims[1] >= 2:
        return int(dims[1])
    return None


def _source(model: Union[PathLike, onnx.ModelProto], tmp_paths: List[str]) -> Union[str, bytes]:
    """A path or bytes onnxruntime can open; protos over 2 GB go through a temp file."""
    if isinstance(model, onnx.ModelProto):
        try:
            return model.SerializeToString()
        except ValueError:
            import tempfile

            from .model_io import save_model

            directory = tempfile.mkdtemp(prefix="onnxslim-cv-verify-")
            path = f"{directory}/candidate.onnx"
            save_model(model, path, external_data=True)
            tmp_paths.append(directory)
            return path
    return str(model)


def _label(model) -> str:
    return "<in-memory model>" if isinstance(model, onnx.ModelProto) else str(model)


def _model_batch(session) -> Optional[int]:
    dims = [meta.shape[0] for meta in session.get_inputs() if meta.shape]
    fixed = {d for d in dims if isinstance(d, int)}
    return fixed.pop() if len(fixed) == 1 else None


def verify(
    reference: Union[PathLike, onnx.ModelProto],
    candidate: Union[PathLike, onnx.ModelProto],
    data: Iterable[Dict[str, np.ndarray]],
    *,
    thresholds: Optional[Thresholds] = None,
    progress: Optional[bool] = None,
    latency_threads: int = 1,
) -> VerifyReport:
    """Compare two models on ``data`` (a CalibrationData or any iterable of input dicts).

    Raises UserError when the models do not have the same inputs and outputs. Gate failures
    are listed in ``report.failures`` (the CLI turns them into exit code 1).
    """
    import shutil

    thresholds = thresholds or Thresholds()
    thresholds.validate()
    started = time.perf_counter()
    tmp_paths: List[str] = []
    try:
        try:
            ref_session = runtime.make_session(_source(reference, tmp_paths))
        except Exception as exc:
            raise UserError(f"onnxruntime cannot load the reference {_label(reference)}: {_first_line(exc)}")
        try:
            cand_session = runtime.make_session(_source(candidate, tmp_paths))
        except Exception as exc:
            raise UserError(f"onnxruntime cannot load the candidate {_label(candidate)}: {_first_line(exc)}")
        ref_inputs = {m.name for m in ref_session.get_inputs()}
        cand_inputs = {m.name for m in cand_session.get_inputs()}
        if ref_inputs != cand_inputs:
            raise UserError(f"the models have different inputs: {sorted(ref_inputs)} vs {sorted(cand_inputs)}")
        output_names = [m.name for m in ref_session.get_outputs()]
        cand_outputs = {m.name for m in cand_session.get_outputs()}
        if set(output_names) != cand_outputs:
            raise UserError(f"the models have different outputs: {sorted(output_names)} vs {sorted(cand_outputs)}")

        batch = _model_batch(cand_session) or _model_batch(ref_session) or _VERIFY_BATCH
        batches = data.batches(batch) if hasattr(data, "batches") else iter(data)
        total = data.count() if hasattr(data, "count") else None
        accumulators = {name: _Accumulator(name) for name in output_names}
        samples = 0
        with tqdm(total=total, desc="verify", unit="sample", disable=_bar_disabled(progress), leave=False) as bar:
            for feed in batches:
                n = _batch_size(feed)
                try:
                    ref_out = runtime.run(ref_session, feed, output_names)
                    cand_out = runtime.run(cand_session, feed, output_names)
                except Exception as exc:
                    raise UserError(f"onnxruntime failed on the verification data: {_first_line(exc)}")
                for name, r, c in zip(output_names, ref_out, cand_out):
                    accumulators[name].add(np.asarray(r), np.asarray(c), n)
                samples += n
                bar.update(n)
        if samples == 0:
            raise UserError("verification got no samples (empty data)")
        outputs = [accumulators[name].result() for name in output_names]
        latency = None
        if thresholds.max_latency_ratio is not None:
            from .bench import benchmark

            bench = benchmark([_source(reference, tmp_paths), _source(candidate, tmp_paths)], threads=latency_threads)
            latency = bench.to_dict()
        report = VerifyReport(
            reference=_label(reference),
            candidate=_label(candidate),
            data=getattr(data, "description", type(data).__name__),
            samples=samples,
            outputs=outputs,
            thresholds=asdict(thresholds),
            latency=latency,
        )
        report.failures = gate_failures(report, thresholds)
        report.seconds = time.perf_counter() - started
        return report
    finally:
        for path in tmp_paths:
            shutil.rmtree(path, ignore_errors=True)


def gate_failures(report: VerifyReport, thresholds: Thresholds) -> List[str]:
    failures = []
    for out in report.outputs:
        if out.nonfinite:
            failures.append(f"output '{out.name}': {out.nonfinite} NaN/inf values in the candidate")
        if thresholds.min_cosine is not None and out.cosine_mean < thresholds.min_cosine:
            failures.append(f"output '{out.name}': cosine {out.cosine_mean:.5f} < --min-cosine {thresholds.min_cosine}")
        if (
            thresholds.min_top1_agreement is not None
            and out.top1_agreement is not None
            and out.top1_agreement < thresholds.min_top1_agreement
        ):
            failures.append(
                f"output '{out.name}': top-1 agreement {out.top1_agreement:.4f} < --min-top1-agreement "
                f"{thresholds.min_top1_agreement}"
            )
    if thresholds.min_top1_agreement is not None and not any(o.top1_agreement is not None for o in report.outputs):
        failures.append("--min-top1-agreement was given but no output is classifier-shaped ([N, K] or [N, K, 1, 1])")
    if thresholds.max_latency_ratio is not None and report.latency is not None:
        ratio = report.latency["ratio"]
        if ratio > thresholds.max_latency_ratio:
            failures.append(f"latency ratio {ratio:.3f} > --max-latency-ratio {thresholds.max_latency_ratio}")
    return failures


def _batch_size(feed: Dict[str, np.ndarray]) -> int:
    for value in feed.values():
        return int(value.shape[0]) if np.ndim(value) else 1
    return 0


def _bar_disabled(progress: Optional[bool]) -> Optional[bool]:
    """tqdm's ``disable``: None hides the bar when stderr is not a terminal."""
    return None if progress is None else not progress


def _first_line(exc: BaseException) -> str:
    from .model_io import _first_line as first

    return first(exc)
