"""Command line: ``onnxslim-cv IN OUT --passes ...`` and the inspect / verify / bench / demo commands.

Exit codes: 0 ok, 1 a verification gate failed, 2 bad input, usage or any other error.
Errors print one line (``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import __version__
from .errors import GateFailed, OnnxSlimCVError, UserError

PROG = "onnxslim-cv"
SUBCOMMANDS = ("inspect", "verify", "bench", "demo", "apply-masks", "analyze", "compress")
DEFAULT_VERIFY_SAMPLES = 128

log = logging.getLogger("onnxslim_cv")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors become one-line UserErrors (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


def _float_arg(flag: str, low: Optional[float] = None, high: Optional[float] = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects a number, got '{text}'")
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{flag} {text}: must be within [{low}, {high}]")
        return value

    return parse


def _int_arg(flag: str, low: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects an integer, got '{text}'")
        if value < low:
            raise argparse.ArgumentTypeError(f"{flag} {text}: must be >= {low}")
        return value

    return parse


# ---------------------------------------------------------------------- shared argument groups
def _add_general(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("general")
    group.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    group.add_argument("--quiet", "-q", action="store_true", help="print only errors and the final verdict")
    group.add_argument("--no-progress", action="store_true", help="no progress bars (they are off anyway when stderr is not a terminal)")
    group.add_argument("--seed", type=int, default=0, help="seed for random inputs and sampling (default: 0)")


def _add_input_shape(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME:DIMS",
        help="fix dynamic input dims, e.g. x:1x3x640x640 (repeat per input; NAME may be left out for one-input models)",
    )


def _add_data(parser: argparse.ArgumentParser, *, purpose: str) -> None:
    from .calibration import add_data_arguments

    group = parser.add_argument_group(
        "calibration / validation data",
        f"Real inputs for {purpose}. Image folders are preprocessed as: decode -> RGB (or gray for 1-channel "
        "inputs) -> resize -> [BGR swap] -> x*scale -> (x-mean)/std -> layout.",
    )
    add_data_arguments(group)
    group.add_argument(
        "--random-inputs",
        type=_int_arg("--random-inputs"),
        metavar="N",
        help="use N random inputs instead of real data (weak: random data says little about accuracy; a warning is printed)",
    )


def _add_thresholds(parser: argparse.ArgumentParser, group_title: str) -> argparse._ArgumentGroup:
    from .verify import DEFAULT_MIN_COSINE

    group = parser.add_argument_group(group_title)
    group.add_argument(
        "--min-cosine",
        type=_float_arg("--min-cosine", -1.0, 1.0),
        default=DEFAULT_MIN_COSINE,
        metavar="C",
        help=f"fail when any output's mean per-sample cosine similarity is below C (default: {DEFAULT_MIN_COSINE})",
    )
    group.add_argument(
        "--min-top1-agreement",
        type=_float_arg("--min-top1-agreement", 0.0, 1.0),
        metavar="F",
        help="fail when the candidate's top-1 class agrees with the reference's on fewer than F of the samples (e.g. 0.99)",
    )
    group.add_argument(
        "--max-latency-ratio",
        type=_float_arg("--max-latency-ratio", 0.0),
        metavar="R",
        help="fail when candidate/reference onnxruntime latency (1 thread, interleaved) exceeds R (e.g. 1.0)",
    )
    group.add_argument(
        "--verify-size",
        type=_int_arg("--verify-size"),
        default=DEFAULT_VERIFY_SAMPLES,
        metavar="N",
        help=f"samples used by verification (default: {DEFAULT_VERIFY_SAMPLES})",
    )
    return group


# ---------------------------------------------------------------------- parsers
def _compress_parser() -> argparse.ArgumentParser:
    from .pipeline import available_passes

    passes = available_passes()
    pass_lines = "\n".join(f"  {name:10s} {cls.summary}" for name, cls in passes.items())
    parser = _Parser(
        prog=PROG,
        formatter_class=_HelpFormatter,
        usage=(
            f"{PROG} IN OUT [--passes fold,...] [--calib DATA] [options]\n"
            f"       {PROG} inspect MODEL [--groups] [--json]\n"
            f"       {PROG} verify REF CAND [--calib DATA | --random-inputs N] [thresholds] [--json]\n"
            f"       {PROG} bench A [B] [--threads N]\n"
            f"       {PROG} demo OUTDIR\n"
            f"       {PROG} apply-masks MODEL MASKS OUT\n"
            f"       {PROG} analyze MODEL --calib DATA [--groups] [--target-sparsity S | --target-macs F]"
        ),
        description=(
            "Compress an ONNX computer-vision model with graph-level passes, then verify the result against the\n"
            "original in onnxruntime before writing it.\n\n"
            f"passes (run in the order given to --passes):\n{pass_lines}\n\n"
            "commands (see '{0} COMMAND --help'):\n"
            "  inspect      params, MACs per layer, op histogram, opset/IR, sparsity, size\n"
            "  verify       compare a candidate with a reference model: the pre-deployment CI gate\n"
            "  bench        onnxruntime latency of one model, or of two interleaved with their ratio\n"
            "  analyze      per-layer sensitivity to sparsity (or per-group to channel pruning), and budgets from it\n"
            "  apply-masks  zero a model's weights with masks exported by --export-masks (lottery-ticket rewind)\n"
            "  demo         run every pass on the built-in digits classifier and show accuracy before/after"
        ).format(PROG),
        epilog=(
            "examples:\n"
            f"  {PROG} model.onnx slim.onnx --passes fold --random-inputs 8\n"
            f"  {PROG} model.onnx slim.onnx --passes fold --calib images/ --input-size 224 --mean 123.7,116.3,103.5 --std 58.4,57.1,57.4\n"
            f"  {PROG} model.onnx slim.onnx --passes fold --calib samples.npz --min-cosine 0.999 --report-json report.json\n\n"
            "exit codes: 0 ok, 1 a verification gate failed (nothing written unless --keep-failed),\n"
            "            2 bad input or usage (one-line error; --debug shows the traceback)"
        ),
    )
    parser.add_argument("input", metavar="IN", help="the model to compress (.onnx; external data next to it is read)")
    parser.add_argument("output", metavar="OUT", help="where to write the compressed model (written only if verification passes)")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--passes",
        default="fold",
        metavar="LIST",
        help=f"comma-separated passes to run in order (default: fold; available: {', '.join(passes)})",
    )
    _add_input_shape(parser)
    shared = _shared_aliases(passes)
    for name, cls in passes.items():
        if not cls.options:
            continue
        group = parser.add_argument_group(f"pass '{name}'", cls.summary)
        for option in cls.options:
            kwargs: Dict[str, Any] = {"dest": _option_dest(name, option.name), "default": None}
            default = "on" if option.is_switch and option.default else option.default
            kwargs["help"] = f"{option.help} (default: {default})"
            if option.is_switch:
                kwargs["action"] = "store_true"
            else:
                kwargs["metavar"] = option.metavar or option.name.upper()
                if option.choices:
                    kwargs["choices"] = list(option.choices)
            aliases = [alias for alias in option.aliases if alias not in shared]
            group.add_argument(option.cli_flag(name), *aliases, **kwargs)
    if shared:
        group = parser.add_argument_group("shared flags", "given to whichever pass in --passes has the option")
        for alias, owners in sorted(shared.items()):
            flags = " / ".join(option.cli_flag(owner) for owner, option in owners)
            group.add_argument(alias, dest=_shared_dest(alias), default=None, metavar=owners[0][1].metavar,
                               help=f"short for {flags}, whichever of these passes is in --passes")
    _add_data(parser, purpose="calibrating passes and for verification")
    parser.add_argument(
        "--val",
        metavar="PATH",
        help="held-out inputs (same formats and preprocessing as --calib) for accuracy targets such as "
        "--max-drop; default: the calibration data",
    )
    group = _add_thresholds(parser, "verification (runs after compressing unless --no-verify)")
    group.add_argument("--no-verify", action="store_true", help="skip verification (not recommended)")
    group.add_argument("--keep-failed", action="store_true", help="write OUT even when a gate fails (still exits 1)")
    out = parser.add_argument_group("output")
    out.add_argument("--force", action="store_true", help="allow OUT to be the same file as IN (replaces it)")
    out.add_argument("--report-json", metavar="PATH", help="write the full report (passes, stats, verification) as JSON")
    out.add_argument(
        "--external-data",
        action="store_true",
        help="store weights in OUT.data next to OUT (automatic for models over ~1.8 GB)",
    )
    _add_general(parser)
    return parser


def _option_dest(pass_name: str, option_name: str) -> str:
    return f"pass__{pass_name}__{option_name}"


def _shared_dest(alias: str) -> str:
    return "shared__" + alias.lstrip("-").replace("-", "_")


def _shared_aliases(passes) -> Dict[str, List[Tuple[str, Any]]]:
    """Short flags (``--target-macs``) that several passes declare: alias -> [(pass, option)]."""
    owners: Dict[str, List[Tuple[str, Any]]] = {}
    for name, cls in passes.items():
        for option in cls.options:
            for alias in option.aliases:
                owners.setdefault(alias, []).append((name, option))
    return {alias: found for alias, found in owners.items() if len(found) > 1}


def _inspect_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} inspect",
        formatter_class=_HelpFormatter,
        description=(
            "Show a model's params, MACs (per layer and in total), op histogram, opset/IR, weight sparsity and size.\n"
            "With --groups, also the channel groups of its dependency graph as the prune pass builds it: which channels it\n"
            "removes together, and why the frozen ones cannot be pruned."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} inspect model.onnx --input-shape x:1x3x640x640\n"
            f"  {PROG} inspect model.onnx --groups --no-layers"
        ),
    )
    parser.add_argument("model", metavar="MODEL")
    _add_input_shape(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--no-layers", action="store_true", help="leave out the per-layer table")
    parser.add_argument(
        "--groups",
        action="store_true",
        help="also show the channel dependency groups (what structured pruning can remove together, and why others are frozen)",
    )
    _add_general(parser)
    return parser


def _verify_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} verify",
        formatter_class=_HelpFormatter,
        description=(
            "Run REF and CAND in onnxruntime on the same inputs and compare every output: max abs error,\n"
            "cosine similarity (mean and worst sample), SNR in dB, top-1/top-5 agreement for classifier outputs.\n"
            "Use it as the pre-deployment CI gate: exit 0 pass, 1 a threshold failed, 2 bad input."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} verify model.onnx slim.onnx --calib val.npz --min-cosine 0.999 --min-top1-agreement 0.99\n"
            f"  {PROG} verify model.onnx slim.onnx --random-inputs 16 --max-latency-ratio 1.0 --json"
        ),
    )
    parser.add_argument("reference", metavar="REF")
    parser.add_argument("candidate", metavar="CAND")
    _add_input_shape(parser)
    _add_data(parser, purpose="verification")
    _add_thresholds(parser, "gate thresholds")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_general(parser)
    return parser


def _bench_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} bench",
        formatter_class=_HelpFormatter,
        description=(
            "onnxruntime CPU latency (median, p90). With two models, runs alternate A and B in one process and\n"
            "report the ratio B/A, so machine noise hits both alike."
        ),
        epilog=f"example:\n  {PROG} bench model.onnx slim.onnx --threads 1",
    )
    parser.add_argument("models", metavar="MODEL", nargs="+", help="one model, or two (A B) to compare")
    parser.add_argument("--threads", type=_int_arg("--threads"), default=1, help="intra-op threads (default: 1)")
    parser.add_argument("--runs", type=_int_arg("--runs"), help="timed runs per model (default: as many as fit in --seconds)")
    parser.add_argument("--seconds", type=_float_arg("--seconds", 0.1), default=5.0, help="time budget when --runs is not given (default: 5)")
    parser.add_argument("--warmup", type=_int_arg("--warmup", 0), default=5, help="untimed runs first (default: 5)")
    _add_input_shape(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    _add_general(parser)
    return parser


def _demo_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} demo",
        formatter_class=_HelpFormatter,
        description=(
            "Run every available pass on the built-in model, a small CNN trained by this project on scikit-learn's\n"
            "8x8 digits, calibrated on its training images, and report accuracy on its held-out test set before\n"
            "and after. Writes the original, the compressed model and report.json into OUTDIR."
        ),
    )
    parser.add_argument("outdir", metavar="OUTDIR")
    _add_general(parser)
    return parser


def _apply_masks_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} apply-masks",
        formatter_class=_HelpFormatter,
        description=(
            "Zero MODEL's weights where MASKS (an .npz written by --export-masks) says so, and write OUT.\n"
            "Use it to carry a sparsity pattern to another model of the same architecture: the initial weights\n"
            "for a lottery-ticket rewind (Frankle & Carbin, ICLR 2019), or the fine-tuned model so it keeps its\n"
            "zeros. Every mask must name a weight of MODEL and have its shape; MODEL itself is never modified."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} model.onnx slim.onnx --passes sparsify --export-masks masks.npz --calib val.npz\n"
            f"  {PROG} apply-masks init.onnx masks.npz ticket.onnx\n"
            f"  {PROG} apply-masks finetuned.onnx masks.npz finetuned_sparse.onnx --force"
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="the model whose weights to mask (.onnx)")
    parser.add_argument("masks", metavar="MASKS", help="masks .npz: boolean arrays keyed by weight (initializer) name")
    parser.add_argument("output", metavar="OUT", help="where to write the masked model")
    _add_input_shape(parser)
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _add_general(parser)
    return parser


def _levels_arg(flag: str, *, allow_zero: bool):
    def parse(text: str) -> List[float]:
        from .sensitivity import check_levels

        try:
            values = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects comma-separated numbers such as 0.3,0.5, got '{text}'")
        try:
            return check_levels(values, flag, allow_zero=allow_zero)[1:]
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc))

    return parse


def _analyze_parser() -> argparse.ArgumentParser:
    from .sensitivity import DEFAULT_RATIOS, DEFAULT_SAMPLES, DEFAULT_SPARSITIES, METRICS

    parser = _Parser(
        prog=f"{PROG} analyze",
        formatter_class=_HelpFormatter,
        description=(
            "Sensitivity analysis: for every layer the sparsify pass would touch, the loss at the model outputs\n"
            "(cosine, SNR, top-1 agreement; higher is worse, 0 = unchanged) when only that layer is magnitude-pruned\n"
            "to each sparsity; with --groups, for every prunable channel group the loss when only it loses a ratio\n"
            "of its channels (removed and bias-compensated as the prune pass does). With a target, per-layer levels\n"
            "that meet it with equal loss everywhere (AIMET-style greedy equal-degradation search)."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} analyze model.onnx --calib images/ --input-size 224 --target-sparsity 0.5 --recipe-out recipe.json\n"
            f"  {PROG} model.onnx slim.onnx --passes sparsify --sparsify-recipe recipe.json --calib images/ --input-size 224\n"
            f"  {PROG} analyze model.onnx --calib val.npz --groups --target-macs 0.6 --recipe-out prune.json --plot sens.png\n"
            f"  {PROG} model.onnx slim.onnx --passes fold,prune --prune-recipe prune.json --calib val.npz"
        ),
    )
    parser.add_argument("model", metavar="MODEL")
    _add_input_shape(parser)
    _add_data(parser, purpose="the sensitivity measurements")
    group = parser.add_argument_group("analysis")
    group.add_argument(
        "--sparsities",
        type=_levels_arg("--sparsities", allow_zero=True),
        default=list(DEFAULT_SPARSITIES),
        metavar="LIST",
        help=f"weight sparsities measured per layer, each in [0, 1) (default: {','.join(map(str, DEFAULT_SPARSITIES))})",
    )
    group.add_argument("--groups", action="store_true", help="analyse channel groups (structured pruning) instead of layers")
    group.add_argument(
        "--ratios",
        type=_levels_arg("--ratios", allow_zero=False),
        default=list(DEFAULT_RATIOS),
        metavar="LIST",
        help=f"with --groups: removed channel ratios measured per group, each in (0, 1) (default: {','.join(map(str, DEFAULT_RATIOS))})",
    )
    group.add_argument("--round-to", type=_int_arg("--round-to"), default=1, metavar="N",
                       help="with --groups: keep channel counts at multiples of N, as --prune-round-to (default: 1)")
    group.add_argument("--metric", choices=METRICS, default="cosine", help="loss the table shows and the allocation equalises (default: cosine)")
    group.add_argument("--samples", type=_int_arg("--samples"), default=DEFAULT_SAMPLES, metavar="N",
                       help=f"calibration samples used (default: {DEFAULT_SAMPLES})")
    group.add_argument("--include-depthwise", action="store_true", help="also analyse depthwise convs")
    group.add_argument("--include-first", action="store_true", help="also analyse the first layer(s)")
    group.add_argument("--include-last", action="store_true", help="also analyse the last layer(s)")
    budget = parser.add_argument_group("allocation")
    budget.add_argument("--target-sparsity", type=_float_arg("--target-sparsity", 0.0, 1.0), metavar="S",
                        help="choose per-layer sparsities whose parameter-weighted mean is S")
    budget.add_argument("--target-macs", type=_float_arg("--target-macs", 0.0, 1.0), metavar="F",
                        help="with --groups: choose per-group ratios keeping F of the model's MACs")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write the curves and the allocation as JSON")
    out.add_argument("--recipe-out", metavar="PATH",
                     help="write the allocation as a recipe: --sparsify-recipe for layers, --prune-recipe for --groups")
    out.add_argument("--plot", metavar="PNG", help="plot the curves and the allocation (needs onnxslim-cv[plot])")
    _add_general(parser)
    return parser


# ---------------------------------------------------------------------- commands
def _setup_logging(args) -> None:
    level = logging.ERROR if getattr(args, "quiet", False) else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _progress(args) -> Optional[bool]:
    return False if (getattr(args, "no_progress", False) or getattr(args, "quiet", False)) else None


def _print(args, text: str = "") -> None:
    if not getattr(args, "quiet", False):
        print(text)


def _load(path: str, args, what: str = "model"):
    from .model_io import load_model, parse_input_shapes

    model = load_model(path, what=what)
    if getattr(args, "input_shape", None):
        model.set_input_shapes(parse_input_shapes(args.input_shape, [spec.name for spec in model.input_specs()]))
    return model


def _data(args, specs, *, purpose: str):
    """Real data from --calib, random data only with --random-inputs, else None."""
    from .calibration import data_from_args, random_data

    data = data_from_args(args, specs)
    if data is not None and getattr(args, "random_inputs", None):
        raise UserError("give either --calib or --random-inputs, not both")
    if data is None and getattr(args, "random_inputs", None):
        log.warning(
            f"using {args.random_inputs} random inputs for {purpose}: this checks the graph, not accuracy; "
            "pass --calib with real samples"
        )
        data = random_data(specs, args.random_inputs, seed=args.seed)
    if data is not None:
        _peek(data)
    return data


def _validation(args, specs):
    """The --val data, read with the same preprocessing flags as --calib."""
    from .calibration import data_from_args

    data = data_from_args(args, specs, flag="val")
    if data is not None:
        _peek(data)
    return data


def _peek(data) -> None:
    """Read the first item now, so bad data fails before minutes of work."""
    for _ in data:
        return
    raise UserError(f"{data.description}: no samples")


def _thresholds(args):
    from .verify import Thresholds

    return Thresholds(
        min_cosine=args.min_cosine,
        min_top1_agreement=args.min_top1_agreement,
        max_latency_ratio=args.max_latency_ratio,
    )


def _pass_options(args, selected: List[str]) -> Dict[str, Dict[str, Any]]:
    from .pipeline import available_passes

    options: Dict[str, Dict[str, Any]] = {}
    for name, cls in available_passes().items():
        for option in cls.options:
            value = getattr(args, _option_dest(name, option.name), None)
            if value is None or (option.is_switch and value is False):
                continue
            if name not in selected:
                raise UserError(f"{option.cli_flag(name)} belongs to pass '{name}', which is not in --passes")
            options.setdefault(name, {})[option.name] = value
    for alias, owners in _shared_aliases(available_passes()).items():
        value = getattr(args, _shared_dest(alias), None)
        if value is None:
            continue
        chosen = [(name, option) for name, option in owners if name in selected]
        flags = ", ".join(option.cli_flag(name) for name, option in owners)
        if not chosen:
            raise UserError(f"{alias} belongs to passes {', '.join(n for n, _ in owners)}, none of which is in --passes")
        if len(chosen) > 1:
            raise UserError(f"{alias} is ambiguous with --passes {args.passes}: use one of {flags}")
        name, option = chosen[0]
        if option.name in options.get(name, {}):
            raise UserError(f"{alias} and {option.cli_flag(name)} are the same option; give one")
        options.setdefault(name, {})[option.name] = value
    return options


def cmd_compress(args) -> int:
    from .model_io import StagedModel, check_output_path, file_size
    from .pipeline import PassContext, make_passes, parse_pass_list, run_passes
    from .report import environment, format_passes, format_verification, human_bytes, write_json
    from .verify import verify

    started = time.perf_counter()
    selected = parse_pass_list(args.passes)
    options = _pass_options(args, selected)
    passes = make_passes(selected, options)
    if not Path(args.input).exists():
        raise UserError(f"model '{args.input}' does not exist")
    check_output_path(args.output, input_path=args.input, force=args.force)
    if args.report_json:
        check_output_path(args.report_json, input_path=args.input)
    thresholds = _thresholds(args)
    thresholds.validate()
    model = _load(args.input, args)
    data = _data(args, model.input_specs(), purpose="calibration and verification")
    needs = [p.name for p in passes if p.requires_calibration]
    if needs and data is None:
        raise UserError(f"pass {', '.join(needs)} needs calibration data: add --calib PATH")

    validation = _validation(args, model.input_specs())
    context = PassContext(calibration=data, validation=validation, seed=args.seed, progress=_progress(args))
    result, reports = run_passes(model, passes, context=context)
    _print(args, f"{args.input} -> {args.output}")
    _print(args, format_passes(reports))

    report: Dict[str, Any] = {
        "environment": environment(),
        "input": {"path": args.input, "size_bytes": file_size(args.input)},
        "passes": [r.to_dict() for r in reports],
        "verification": None,
    }
    exit_code = 0
    with StagedModel(result, args.output, external_data=True if args.external_data else None) as staged:
        if args.no_verify:
            log.warning("verification skipped (--no-verify)")
            report["verification_skipped"] = "--no-verify"
        elif data is None:
            log.warning(
                "verification skipped: no inputs; pass --calib DATA (real samples) or --random-inputs N to verify the result"
            )
            report["verification_skipped"] = "no data"
        else:
            verification = verify(
                args.input,
                str(staged.path),
                data.limited(args.verify_size),
                thresholds=thresholds,
                progress=_progress(args),
            )
            report["verification"] = verification.to_dict()
            _print(args, format_verification(verification))
            if not verification.passed:
                exit_code = 1
        written = exit_code == 0 or args.keep_failed
        if written:
            staged.commit()
            size = file_size(args.output)
            report["output"] = {"path": args.output, "size_bytes": size, "written": True}
            note = " (gate failed, kept because of --keep-failed)" if exit_code else ""
            _print(args, f"wrote {args.output} ({human_bytes(size)}){note}")
        else:
            report["output"] = {"path": args.output, "written": False}
            print(f"{PROG}: verification gate failed; {args.output} not written (use --keep-failed to write it anyway)", file=sys.stderr)
    report["seconds"] = round(time.perf_counter() - started, 3)
    report["exit_code"] = exit_code
    if args.report_json:
        write_json(report, args.report_json)
    return exit_code


def cmd_inspect(args) -> int:
    from .model_io import file_size
    from .report import format_groups, format_inspect, to_json
    from .stats import model_stats
    from .storage import deflate_size

    model = _load(args.model, args)
    stats = model_stats(model, size_bytes=file_size(args.model))
    deflated = deflate_size(args.model)  # zip/gzip download size: what weight zeros save
    groups = None
    if args.groups:
        from .depgraph import build_dependency_graph
        from .report import dependency_graph_dict

        # works on the in-memory model only (shape inference, node names); the file is never written
        groups = dependency_graph_dict(build_dependency_graph(_as_prune_sees_it(model)))
    if args.json:
        data = stats.to_dict(layers=not args.no_layers)
        data["path"] = args.model
        data["deflate_bytes"] = deflated
        if groups is not None:
            data.update(groups)
        print(to_json(data))
    else:
        text = format_inspect(args.model, stats, layers=not args.no_layers, deflate_bytes=deflated)
        if groups is not None:
            text += "\n\n" + _indent_text(format_groups(groups))
        print(text)
    return 0


def _as_prune_sees_it(model):
    """``model`` with its constant subgraphs evaluated, as ``prune`` does before building its
    dependency graph (channel counts read through ``Shape`` would otherwise show as frozen)."""
    from .passes.fold import fold_computed_constants
    from .pipeline import PassReport

    fold_computed_constants(model, PassReport("fold"))
    return model


def _indent_text(text: str, prefix: str = "  ") -> str:
    return "\n".join(prefix + line if line else line for line in text.splitlines())


def cmd_verify(args) -> int:
    from .report import format_verification, to_json
    from .verify import verify

    thresholds = _thresholds(args)
    thresholds.validate()
    reference = _load(args.reference, args, what="reference")
    _load(args.candidate, args, what="candidate")
    data = _data(args, reference.input_specs(), purpose="verification")
    if data is None:
        raise UserError("verify needs inputs: --calib PATH (real samples) or --random-inputs N")
    report = verify(
        args.reference, args.candidate, data.limited(args.verify_size), thresholds=thresholds, progress=_progress(args)
    )
    if args.json:
        print(to_json(report.to_dict()))
    else:
        print(format_verification(report))
    return 0 if report.passed else 1


def cmd_bench(args) -> int:
    from .bench import benchmark
    from .model_io import parse_input_shapes
    from .report import format_bench, to_json

    if len(args.models) > 2:
        raise UserError(f"bench takes one or two models, got {len(args.models)}")
    models = [_load(path, args, what=label) for path, label in zip(args.models, ("model A", "model B"))]
    shapes = parse_input_shapes(args.input_shape, [s.name for s in models[0].input_specs()]) if args.input_shape else None
    report = benchmark(
        args.models,
        threads=args.threads,
        warmup=args.warmup,
        runs=args.runs,
        seconds=args.seconds,
        input_shapes=shapes,
        labels=args.models,
    )
    print(to_json(report.to_dict()) if args.json else format_bench(report.to_dict()))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.outdir, progress=_progress(args), quiet=args.quiet)


def cmd_apply_masks(args) -> int:
    from .masks import apply_masks, load_masks
    from .model_io import StagedModel, check_output_path, file_size
    from .report import human_bytes
    from .storage import deflate_size

    check_output_path(args.output, input_path=args.model, force=args.force)
    if Path(args.output).exists() and not args.force:
        raise UserError(f"output '{args.output}' already exists; pass --force to replace it")
    model = _load(args.model, args)
    masks = load_masks(args.masks)
    sparsity = apply_masks(model, masks)
    before, deflated_before = file_size(args.model), deflate_size(args.model)  # OUT may replace MODEL (--force)
    with StagedModel(model, args.output) as staged:
        staged.commit()
    values = sum(int(mask.size) for mask in masks.values())
    zeros = sum(sparsity[name] * masks[name].size for name in masks)
    after = file_size(args.output)
    _print(
        args,
        f"applied {len(masks)} masks from {args.masks} to {args.model}: {100 * zeros / max(values, 1):.2f}% of the "
        f"{values:,} masked weight values are zero; wrote {args.output} ({human_bytes(before)} -> {human_bytes(after)} "
        f"on disk, {human_bytes(deflated_before)} -> {human_bytes(deflate_size(args.output))} deflated: "
        "zeros shrink downloads, not dense inference time)",
    )
    return 0


def cmd_analyze(args) -> int:
    from . import sensitivity
    from .model_io import check_output_path
    from .report import to_json, write_json

    if args.target_sparsity is not None and args.groups:
        raise UserError("--target-sparsity is for layers; with --groups give --target-macs F")
    if args.target_macs is not None and not args.groups:
        raise UserError("--target-macs is for channel groups: add --groups (for layers give --target-sparsity S)")
    if args.target_sparsity is not None and not 0.0 <= args.target_sparsity < 1.0:
        raise UserError(f"--target-sparsity {args.target_sparsity}: must be in [0, 1)")
    if args.target_macs is not None and not 0.0 < args.target_macs <= 1.0:
        raise UserError(f"--target-macs {args.target_macs}: the kept fraction of the MACs, in (0, 1]")
    target = args.target_macs if args.groups else args.target_sparsity
    if args.recipe_out and target is None:
        raise UserError("--recipe-out needs a target: --target-sparsity S (layers) or --groups --target-macs F")
    for path in (args.json, args.recipe_out, args.plot):
        if path:
            check_output_path(path, input_path=args.model)
    if args.plot:
        sensitivity.require_matplotlib()
    model = _load(args.model, args)
    data = _data(args, model.input_specs(), purpose="sensitivity analysis")
    if data is None:
        raise UserError("analyze needs inputs: --calib PATH (real samples) or --random-inputs N")
    started = time.perf_counter()
    if args.groups:
        curves = sensitivity.analyze_groups(
            _as_prune_sees_it(model), data, ratios=args.ratios, samples=args.samples, progress=_progress(args), round_to=args.round_to
        )
        if not curves:
            raise UserError(f"{args.model}: no prunable channel group (see '{PROG} inspect --groups')")
    else:
        curves = sensitivity.analyze_layers(
            model,
            data,
            sparsities=args.sparsities,
            samples=args.samples,
            progress=_progress(args),
            include_depthwise=args.include_depthwise,
            include_first=args.include_first,
            include_last=args.include_last,
        )
        if not curves:
            raise UserError(f"{args.model}: no layer to sparsify (try --include-first / --include-last / --include-depthwise)")
    if any(args.metric not in c.loss for c in curves):
        raise UserError(f"--metric {args.metric}: not measurable on this model (top1 needs a classifier-shaped output)")
    allocation = None
    if target is not None:
        achieved = None
        if args.groups:
            _, dg, scores, limits, _ = sensitivity.group_setup(model, data.limited(1), round_to=args.round_to, moments=False)
            achieved = sensitivity.GroupBudget(dg, scores, limits).kept_fn(curves)
        allocation = sensitivity.allocate(
            curves, target=target, metric=args.metric, cost="macs" if args.groups else "params", achieved=achieved, strict=False
        )
        if not allocation.reached:
            log.warning(f"target {target:g} is unreachable with the measured levels; the allocation uses the largest ones")
    seconds = time.perf_counter() - started
    _print(args, f"{args.model}: {len(curves)} {'channel groups' if args.groups else 'layers'} analysed in {seconds:.1f} s")
    _print(args, sensitivity.format_table(curves, args.metric, allocation))
    if args.json:
        write_json(
            {
                "model": args.model,
                "kind": "group" if args.groups else "layer",
                "metric": args.metric,
                "data": data.description,
                "seconds": round(seconds, 3),
                "curves": [c.to_dict() for c in curves],
                "allocation": allocation.to_dict() if allocation is not None else None,
            },
            args.json,
        )
    if args.recipe_out:
        recipe, missing = sensitivity.recipe(curves, allocation, round_to=args.round_to)
        if missing:
            log.warning(f"{len(missing)} groups have no name of their own to match in a recipe and are left out: {', '.join(missing[:5])}")
        write_json(recipe, args.recipe_out)
        _print(args, f"wrote {args.recipe_out}")
    if args.plot:
        sensitivity.plot(curves, args.plot, metric=args.metric, allocation=allocation)
        _print(args, f"wrote {args.plot}")
    return 0


_COMMANDS = {
    "inspect": (_inspect_parser, cmd_inspect),
    "verify": (_verify_parser, cmd_verify),
    "bench": (_bench_parser, cmd_bench),
    "demo": (_demo_parser, cmd_demo),
    "apply-masks": (_apply_masks_parser, cmd_apply_masks),
    "analyze": (_analyze_parser, cmd_analyze),
}


def _dispatch(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv and argv[0] in _COMMANDS:
        make_parser, command = _COMMANDS[argv[0]]
        args = make_parser().parse_args(argv[1:])
    else:
        if argv and argv[0] == "compress":
            argv = argv[1:]
        if not argv:
            _compress_parser().print_usage(sys.stderr)
            raise UserError(f"missing IN and OUT (see '{PROG} --help')")
        command = cmd_compress
        args = _compress_parser().parse_args(argv)
    _setup_logging(args)
    return command(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return _dispatch(argv)
    except GateFailed as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except OnnxSlimCVError as exc:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    except Exception as exc:  # an internal error: still one line unless --debug
        if debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"{PROG}: error: {type(exc).__name__}: {first} (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
