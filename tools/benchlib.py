"""Helpers every benchmark script in tools/ shares: model selection, markdown tables, latency
ratios, temp folders and timing. Kept here so prune/quant/sparsify/lowrank benchmarks report
the same columns the same way as ``bench.py`` and ``bench_fold.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the repo copy of onnxslim_cv; passes/ still needs `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from onnxslim_cv.bench import BenchReport, benchmark  # noqa: E402
from onnxslim_cv.testing import zoo  # noqa: E402

DEFAULT_LATENCY_SECONDS = 3.0


# --------------------------------------------------------------------------------------------
# Model selection
# --------------------------------------------------------------------------------------------


def require_shared_models() -> Path:
    """The shared folder, or exit 2 saying how to provide it (benchmarks have nothing to run on)."""
    root = zoo.shared_models_dir()
    if root is None:
        print(
            f"error: the shared models folder is absent; set ${zoo.ENV_VAR} or place it at "
            f"{REPO_ROOT.parent / 'shared' / 'models'}",
            file=sys.stderr,
        )
        sys.exit(2)
    return root


def select_models(names: Optional[str]) -> List[zoo.SharedModel]:
    """``--models a,b`` -> registry entries (all available ones when None); exits on unknown keys."""
    require_shared_models()
    if not names:
        return zoo.available()
    selected = []
    for name in (part.strip() for part in names.split(",")):
        if not name:
            continue
        if name not in zoo.ZOO:
            print(f"error: unknown model '{name}'; known: {', '.join(zoo.ZOO)}", file=sys.stderr)
            sys.exit(2)
        selected.append(zoo.ZOO[name])
    return selected


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """A GitHub markdown table with padded columns (readable raw and rendered).

    ``align`` holds 'l' or 'r' per column; default: first column left, the rest right.
    """
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(3, max(len(row[i]) for row in cells)) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if a == "r" else "-" * w for w, a in zip(widths, align)]
    return "\n".join([line(cells[0]), "| " + " | ".join(rule) + " |"] + [line(r) for r in cells[1:]])


def percent(value: Optional[float], digits: int = 2) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def ratio(after: Optional[float], before: Optional[float], digits: int = 2) -> str:
    """``after / before`` as '0.87x' ('n/a' when unknown)."""
    if after is None or before in (None, 0):
        return "n/a"
    return f"{after / before:.{digits}f}x"


def seconds(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def write_json(path: Optional[str], data: Any) -> None:
    """Write ``data`` (numpy scalars, inf and NaN allowed) to ``path``; no-op when None."""
    if not path:
        return

    def clean(value):
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value

    Path(path).write_text(json.dumps(clean(data), indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def latency(
    path_a, path_b, *, input_shapes: Optional[Dict[str, Sequence[int]]] = None,
    seconds: float = DEFAULT_LATENCY_SECONDS,
) -> BenchReport:
    """onnxruntime latency of B against A: 1 thread, interleaved, ``report.ratio`` = B / A."""
    return benchmark(
        [str(path_a), str(path_b)], threads=1, seconds=seconds, input_shapes=input_shapes,
        labels=[Path(path_a).name, Path(path_b).name],
    )


@contextlib.contextmanager
def temp_folder(prefix: str = "onnxslim-cv-bench-", keep: bool = False) -> Iterator[Path]:
    """A scratch folder for models the benchmark writes; removed afterwards unless ``keep``."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        if keep:
            print(f"kept models in {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> "Timer":
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self.started


def machine() -> str:
    """CPU model, logical cores and onnxruntime version, printed with a benchmark's tables: latency
    ratios (int8 / fp32 above all) depend on all three, and a VM does not always land on the same host."""
    import os
    import platform

    import onnxruntime

    cpu = ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, onnxruntime {onnxruntime.__version__}"


def progress(message: str) -> None:
    """One status line on stderr, so stdout carries only the tables."""
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Data splits
# --------------------------------------------------------------------------------------------


def disjoint_split(entry: zoo.SharedModel, eval_limit: Optional[int], calib_limit: int) -> "tuple[int, int]":
    """(evaluation samples, calibration samples) for ``entry`` that share no sample.

    Evaluation reads the front of the model's pool and calibration its back (or a separate
    pool, for the PP-OCR classifier), so the two are disjoint while their sum fits the pool.
    When both asked-for counts do not fit, evaluation keeps at least half of the pool and
    calibration gets the rest (the 20-24 image detection sets split about evenly).
    """
    pool = len(entry.sample_names())
    wanted = pool if eval_limit is None else min(eval_limit, pool)
    if entry.calibration_pool is not None:
        return wanted, min(calib_limit, len(entry.calibration_sample_names()))
    if wanted + calib_limit <= pool:
        return wanted, calib_limit
    evaluation = min(wanted, max(pool - calib_limit, (pool + 1) // 2))
    return evaluation, min(calib_limit, pool - evaluation)


class FoldedEntry:
    """A labelled zoo model whose calibration samples are block ``fold`` of ``folds`` of its pool.

    The default split (:func:`disjoint_split`) always calibrates on the back of the pool and
    evaluates on the front, so every run is scored on the same images. Rotating the block
    (``--fold K/N`` of the benchmarks) calibrates on each part of the pool in turn and evaluates
    on all the rest, which shows how much a result owes to that one split. Block ``K`` is
    ``calibration(size, offset=K * size)``, with ``size = min(calib, pool // folds)``;
    :meth:`labelled` and :meth:`inputs` yield every other sample of the pool, in pool order.
    """

    @staticmethod
    def can_fold(entry: zoo.SharedModel) -> bool:
        """Labelled, and calibrated from its evaluation pool (not a separate one like PP-OCR cls)."""
        return entry.is_labelled and entry.calibration_pool is None

    def __init__(self, entry: zoo.SharedModel, fold: int, folds: int, calib: int):
        if not self.can_fold(entry):
            raise ValueError(f"{entry.key}: folds need a labelled model calibrated from its evaluation pool")
        if not 0 <= fold < folds:
            raise ValueError(f"fold {fold} of {folds}: need 0 <= fold < folds")
        names = entry.sample_names()
        pool = len(names)
        self.size = min(calib, pool // folds)
        if self.size < 1:
            raise ValueError(f"{entry.key}: {pool} samples cannot make {folds} folds")
        self._entry = entry
        self.fold, self.folds = fold, folds
        calibration = set(entry.calibration_sample_names(self.size, offset=fold * self.size))
        self.skip = {i for i, name in enumerate(names) if name in calibration}
        self.eval_samples = pool - len(self.skip)
        self._labelled: Optional[list] = None
        self._inputs: Optional[list] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._entry, name)

    def calibration_data(self):
        return self._entry.calibration(self.size, offset=self.fold * self.size)

    def labelled(self, limit: Optional[int] = None):
        if self._labelled is None:
            self._labelled = [item for i, item in enumerate(self._entry.labelled(None)) if i not in self.skip]
        return iter(self._labelled[:limit])

    def inputs(self, limit: Optional[int] = None, *, offset: int = 0):
        if self._inputs is None:
            self._inputs = [item for i, item in enumerate(self._entry.inputs(None)) if i not in self.skip]
        return iter(self._inputs[offset:][:limit])


def parse_fold(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``"K/N"`` -> (K, N) with 0 <= K < N; None stays None; anything else exits 2."""
    if text is None:
        return None
    try:
        fold, folds = (int(part) for part in text.split("/"))
        if folds < 2 or not 0 <= fold < folds:
            raise ValueError
    except ValueError:
        print(f"error: --fold {text!r}: expected K/N with N >= 2 and 0 <= K < N (e.g. 0/4)", file=sys.stderr)
        sys.exit(2)
    return fold, folds


def in_memory(calibration):
    """The same calibration samples, read once and kept in memory (for passes run repeatedly)."""
    from onnxslim_cv.calibration import CalibrationData

    items = list(calibration)
    return CalibrationData(
        calibration.specs,
        lambda: [(f"{calibration.description} item {i}", item) for i, item in enumerate(items)],
        description=calibration.description,
        total=sum(next(iter(item.values())).shape[0] for item in items),
    )


class CachedEntry:
    """A zoo entry whose evaluation inputs are decoded once and kept in memory.

    ``tools/evaluate.py`` reads (and JPEG-decodes) the samples again on every call; a benchmark
    that evaluates many variants of one model on the same samples passes this instead.
    Everything else is the wrapped :class:`zoo.SharedModel`'s.
    """

    def __init__(self, entry: zoo.SharedModel):
        self._entry = entry
        self._labelled: Dict[Any, list] = {}
        self._inputs: Dict[Any, list] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._entry, name)

    def labelled(self, limit: Optional[int] = None):
        if limit not in self._labelled:
            self._labelled[limit] = list(self._entry.labelled(limit))
        return iter(self._labelled[limit])

    def inputs(self, limit: Optional[int] = None, *, offset: int = 0):
        if (limit, offset) not in self._inputs:
            self._inputs[(limit, offset)] = list(self._entry.inputs(limit, offset=offset))
        return iter(self._inputs[(limit, offset)])


def quiet(*loggers: str) -> None:
    """Silence onnxruntime's and our warnings (and ``loggers``): stderr carries progress only."""
    import logging
    import warnings

    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    warnings.filterwarnings("ignore")
    for name in ("onnxruntime", "onnxslim_cv", *loggers):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def stdout_to_stderr():
    """Anything a pass or a competitor prints goes to stderr, so stdout carries only the tables."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def error_text(exc: BaseException) -> str:
    """``Type: first line`` of an exception, for table cells."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Quality columns shared by the pass benchmarks
# --------------------------------------------------------------------------------------------


def prepare_fp32(entry: zoo.SharedModel, path: Path):
    """The shared model at its fixed input shape through ``fold``, saved to ``path``; the Model."""
    from onnxslim_cv.model_io import load_model, save_model
    from onnxslim_cv.pipeline import PassContext, make_passes, run_passes

    model = load_model(entry.model_path(), input_shapes=entry.input_shapes if entry.dynamic else None)
    with stdout_to_stderr():
        folded, _ = run_passes(model, make_passes(["fold"]), context=PassContext(progress=False), measure=False)
    save_model(folded, path)
    return folded


def named_fp32(fp32_path: Path, folder: Path) -> Path:
    """The fp32 file with the node names a pass gives unnamed nodes (``name_nodes``: what lowrank
    does after its idle fold, and what prune keeps), so a profile finds the same nodes in both files."""
    from onnxslim_cv.graph_utils import name_nodes
    from onnxslim_cv.model_io import load_model, save_model

    model = load_model(fp32_path)
    name_nodes(model.graph)
    path = folder / f"{fp32_path.stem}.named.onnx"
    save_model(model, path)
    return path


def run_pass(model, name: str, options: Dict[str, Any], calibration, *, seed: int, measure: bool):
    """One pass on ``model`` with ``options`` (its prints to stderr): the result and its report."""
    from onnxslim_cv.pipeline import PassContext, make_passes, run_passes

    with stdout_to_stderr():
        passes = make_passes([name], {name: dict(options)})
        context = PassContext(calibration=calibration, progress=False, seed=seed)
        result, reports = run_passes(model, passes, context=context, measure=measure)
    return result, reports[-1]


def quality_of(classifier: bool, quality: Dict[str, Any]) -> Tuple[Optional[float], str, str]:
    """(value, text, metric name): top-1 for classifiers, the agreement with fp32 otherwise."""
    primary = quality["primary"] if classifier else quality.get("agreement_primary")
    if not primary:
        return None, "n/a", "?"
    return primary["value"], primary["text"], primary["name"]


def drop(row: Dict[str, Any], cell: Dict[str, Any]) -> Tuple[Optional[float], str]:
    """(drop, text) against fp32: top-1 points for classifiers, (1 - agreement) points for the
    F1/IoU agreements, and the task PSNR in dB for super-resolution."""
    if cell.get("status") != "ok":
        return None, ""
    if cell.get("quality_value") is None:
        return None, "n/a"
    if row["classifier"]:
        value = row["fp32"]["quality_value"] - cell["quality_value"]
        return value, f"{100 * value:.2f} pt" if abs(value) >= 0.00005 else "0.00 pt"
    primary = cell["quality"]["primary"]
    if primary["name"] == "PSNR":
        value = row["fp32"]["quality"]["primary"]["value"] - primary["value"]
        return value, f"{value + 0.0:.2f} dB" if abs(value) >= 0.005 else "0.00 dB"
    value = 1.0 - cell["quality_value"]
    return value, f"{100 * value:.2f} pt"


def bench_each(entries: Sequence[zoo.SharedModel], bench_model, runs, args, *, prefix: str) -> List[Dict[str, Any]]:
    """``bench_model(entry, folder, runs, args)`` per model in one scratch folder (``--keep``
    keeps it); a model whose fp32 preparation or evaluation fails becomes an error row."""
    import traceback

    rows: List[Dict[str, Any]] = []
    with temp_folder(prefix=prefix, keep=args.keep) as folder:
        for entry in entries:
            progress(f"{entry.key}: preparing fp32, evaluating and timing it ...")
            try:
                rows.append(bench_model(entry, folder, runs, args))
            except Exception as exc:  # say so, go on with the next model
                progress(f"{entry.key}: failed: {error_text(exc)}\n{traceback.format_exc()}")
                rows.append({"key": entry.key, "error": error_text(exc), "traceback": traceback.format_exc()})
    return rows


def publish(text: str, results: Dict[str, Any], args, *, shown: Optional[str] = None) -> None:
    """Print the tables (``shown``, default ``text``), write ``text`` to ``--markdown`` and the
    results to ``--json`` when asked (tools without ``--json`` pass no results)."""
    print(text if shown is None else shown)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
        progress(f"wrote {args.markdown}")
    write_json(getattr(args, "json", None), results)

