"""The pass framework: a small ``Pass`` interface, a registry by name, and the pipeline.

A pass is one module under ``passes/`` with one class: it declares its options (which become
CLI flags and keyword arguments alike), takes the IR and returns a :class:`PassReport`. The
pipeline hands every pass its own copy of the model and measures params / MACs / size and
time around it, so a pass only says what it changed.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

from .errors import UserError
from .ir import Model
from .stats import ModelStats, model_stats

log = logging.getLogger("onnxslim_cv")


def positive_int(value) -> int:
    """PassOption parser: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise ValueError("must be >= 1")
    return number


def auto_or_positive_int(value) -> Any:
    """PassOption parser: ``auto`` or an integer >= 1 (the channel / rank steps)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    number = int(value)
    if number < 1:
        raise ValueError("must be 'auto' or a positive integer")
    return number


def non_negative_int(value) -> int:
    """PassOption parser: an integer >= 0."""
    number = int(value)
    if number < 0:
        raise ValueError("must be >= 0")
    return number


def regex(value) -> str:
    """PassOption parser: a valid regular expression (checked now, not mid-pass)."""
    import re

    try:
        re.compile(str(value))
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})")
    return str(value)


def read_json_object(path: str, flag: str) -> dict:
    """A recipe file's JSON object; a one-line UserError naming ``flag`` otherwise."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot read ({exc.strerror or exc})")
    except json.JSONDecodeError as exc:
        raise UserError(f"{flag} {path}: not valid JSON ({exc.msg} at line {exc.lineno})")
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class PassOption:
    """One option of a pass: a keyword argument in the library, a flag on the command line.

    ``parse`` turns a CLI string (or a Python value) into the option's value and raises
    ValueError with a readable reason when the value is bad.
    """

    name: str
    default: Any
    help: str
    parse: Callable[[Any], Any] = str
    flag: Optional[str] = None
    choices: Optional[Sequence[str]] = None
    metavar: Optional[str] = None
    is_switch: bool = False  # a boolean flag that takes no value
    aliases: Tuple[str, ...] = ()  # extra CLI spellings (e.g. --target-macs for --prune-target-macs)

    def cli_flag(self, pass_name: str) -> str:
        return self.flag or f"--{pass_name}-{self.name.replace('_', '-')}"


@dataclass
class PassContext:
    """What a pass may use besides the model: data, randomness, progress display."""

    calibration: Optional[Any] = None  # onnxslim_cv.calibration.CalibrationData
    validation: Optional[Any] = None  # --val data, for accuracy targets (None: use calibration)
    seed: int = 0
    progress: Optional[bool] = None  # None: show bars when stderr is a terminal


@dataclass
class PassReport:
    """What one pass did. Passes fill ``changes`` (counts by kind), ``notes`` and ``details``."""

    name: str
    options: Dict[str, Any] = field(default_factory=dict)
    changes: Dict[str, int] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    details: Dict[str, Any] = field(default_factory=dict)
    before: Optional[ModelStats] = None
    after: Optional[ModelStats] = None
    seconds: float = 0.0

    def count(self, kind: str, n: int = 1) -> None:
        self.changes[kind] = self.changes.get(kind, 0) + n

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "options": self.options,
            "changes": self.changes,
            "notes": self.notes,
            "warnings": self.warnings,
            "details": self.details,
            "before": self.before.to_dict(layers=False) if self.before else None,
            "after": self.after.to_dict(layers=False) if self.after else None,
            "seconds": round(self.seconds, 4),
        }


class Pass:
    """Base class of every compression pass.

    Subclasses set ``name``, ``summary`` and ``options`` and implement :meth:`run`, which may
    modify the model it is given (the pipeline passes a copy) and returns a PassReport.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[Tuple[PassOption, ...]] = ()
    uses_calibration: ClassVar[bool] = False
    requires_calibration: ClassVar[bool] = False
    demo_options: ClassVar[Optional[Dict[str, Any]]] = {}
    """Options ``onnxslim-cv demo`` runs this pass with; None leaves it out of the demo."""

    def __init__(self, **options: Any):
        known = {option.name: option for option in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise UserError(
                f"pass '{self.name}' has no option {', '.join(unknown)}; its options are: "
                f"{', '.join(known) or 'none'}"
            )
        self.config: Dict[str, Any] = {}
        for option in self.options:
            value = options.get(option.name, option.default)
            if option.name in options and value is not None and not option.is_switch:
                try:
                    value = option.parse(value)
                except (ValueError, TypeError) as exc:
                    raise UserError(f"{option.cli_flag(self.name)} {value!r}: {exc}")
            if option.choices and value is not None and value not in option.choices:
                raise UserError(
                    f"{option.cli_flag(self.name)} {value!r}: choose one of {', '.join(option.choices)}"
                )
            self.config[option.name] = value
        self.validate()

    def validate(self) -> None:
        """Check option combinations; raise UserError with the reason."""

    def run(self, model: Model, context: PassContext) -> PassReport:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, model: Model, context: Optional[PassContext] = None) -> Tuple[Model, PassReport]:
        """Library form: model in, (new model, report) out; the input model is left alone."""
        result, reports = run_passes(model, [self], context=context)
        return result, reports[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"


_REGISTRY: Dict[str, Type[Pass]] = {}


def register_pass(cls: Type[Pass]) -> Type[Pass]:
    """Class decorator: make a pass available by name to the CLI and :func:`get_pass`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"two passes are named '{cls.name}'")
    flags = {option.cli_flag(other.name) for other in _REGISTRY.values() if other is not cls for option in other.options}
    for option in cls.options:
        if option.cli_flag(cls.name) in flags:
            raise TypeError(f"{cls.__name__}: flag {option.cli_flag(cls.name)} is already used by another pass")
    _REGISTRY[cls.name] = cls
    return cls


def available_passes() -> Dict[str, Type[Pass]]:
    """Every registered pass by name, in the order their modules register them."""
    importlib.import_module("onnxslim_cv.passes")
    return dict(_REGISTRY)


def get_pass(name: str) -> Type[Pass]:
    passes = available_passes()
    if name not in passes:
        raise UserError(f"unknown pass '{name}'; known passes: {', '.join(passes)}")
    return passes[name]


def parse_pass_list(text: str) -> List[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UserError("--passes is empty; give a comma-separated list such as fold")
    for name in names:
        get_pass(name)
    return names


def make_passes(specs: Iterable[Union[str, Pass]], options: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Pass]:
    """Instantiate passes from names (with per-pass option dicts) or pass objects."""
    options = options or {}
    result = []
    for spec in specs:
        result.append(spec if isinstance(spec, Pass) else get_pass(spec)(**options.get(spec, {})))
    return result


def run_passes(
    model: Model,
    passes: Sequence[Union[str, Pass]],
    *,
    context: Optional[PassContext] = None,
    measure: bool = True,
) -> Tuple[Model, List[PassReport]]:
    """Run passes in order on a copy of ``model``; the caller's model is not modified."""
    context = context or PassContext()
    instances = make_passes(passes)
    for instance in instances:
        if instance.requires_calibration and context.calibration is None:
            raise UserError(f"pass '{instance.name}' needs calibration data: pass --calib PATH")
    current = model
    reports: List[PassReport] = []
    stats_before = model_stats(current) if measure else None
    for instance in instances:
        work = current.copy()
        started = time.perf_counter()
        report = instance.run(work, context)
        elapsed = time.perf_counter() - started
        report.name = report.name or instance.name
        report.options = dict(instance.config)
        report.seconds = elapsed
        if measure:
            work.infer_shapes(reset=True)
            report.before = stats_before
            report.after = model_stats(work)
            stats_before = report.after
        reports.append(report)
        current = work
    return current, reports


class progress_bar:
    """A tqdm bar honouring ``PassContext.progress`` (None: shown only on a terminal)."""

    def __init__(self, context: PassContext, total, desc: str, unit: str):
        from tqdm import tqdm

        disable = None if context.progress is None else not context.progress
        self._bar = tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False)

    def __enter__(self):
        return self._bar

    def __exit__(self, *exc):
        self._bar.close()
        return False
