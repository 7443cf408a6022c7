"""``lowrank``: replace Conv / Gemm / MatMul layers by products of smaller ones.

Each eligible layer gets candidate factorizations (:mod:`onnxslim_cv.factorize`): two-factor
SVD for Gemm / MatMul / 1x1 convs (and channel SVD for k x k convs), spatial SVD (k x 1 then
1 x k) and Tucker-2 (1x1, k x k core, 1x1) for k x k convs, each at a grid of ranks. A layer is
only factored by a candidate that has fewer MACs than the layer itself; among the candidates
the pass takes, per layer, the one with the lowest error within the MACs budget (equivalently
the fewest MACs at equal error):

- ``--rank-ratio R``: keep at most R of each factored layer's MACs;
- ``--energy E``: keep at least E of each layer's energy (``1 -`` relative error: the
  singular-value energy for plain SVD, the output energy when data-aware);
- ``--target-macs F``: keep F of the whole model's MACs, per-layer budgets chosen
  (:func:`onnxslim_cv.sensitivity.allocate`) from curves of either each layer's relative
  error (``--lowrank-allocation error``, equal error per layer) or the loss measured at the
  model outputs with only that layer factored (the analysis of ``onnxslim-cv analyze``):
  ``sensitivity`` gives every layer the same loss, ``marginal`` the least summed loss, so a
  big layer with a moderate loss gives more than a small one with a flat curve. ``auto`` (the
  default with ``--calib``) factors by all three and keeps the model whose outputs are
  closest to the original's on the calibration samples.

With ``--calib`` (``--lowrank-method data``) everything is data-aware: candidates are ranked
by their output error in the metric of the layer's input moment (whitened SVD), and the
layers are then factored stage by stage on the model factored so far, the target being the
original layer's output, with the last factor and the bias refit by least squares on those
calibration activations (as ``prune`` and ``sparsify`` reconstruct).

Ranks are multiples of ``--lowrank-round-to``; ``auto`` (the default) is onnxruntime's conv
channel block on this CPU (8 on AVX2, 16 on AVX-512): a factor of 12 channels computes 16, and
one of 4 is read in plain NCHW after a layout switch, so other ranks run slower than their
MACs say. When ``--target-macs`` cannot be met at the block, the step halves in the narrowest
layers first, only as far as the target needs (as ``prune --prune-round-to auto`` does).

Emitted as plain Conv / Gemm / MatMul nodes (a MatMul whose refit added a bias gets an Add).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_cv import factorize, obs
from onnxslim_cv.errors import UserError
from onnxslim_cv.factorize import Candidate, LayerFactorizer, LayerShape
from onnxslim_cv.graph_utils import name_nodes, new_constant
from onnxslim_cv.ir import Model
from onnxslim_cv.pipeline import Pass, PassContext, PassOption, PassReport, auto_or_positive_int, positive_int, regex, register_pass
from onnxslim_cv.pipeline import progress_bar as _bar
from onnxslim_cv.reconstruct import _add_bias_after, conv_geometry
from onnxslim_cv.runtime import native_block_size
from onnxslim_cv.sparsity import SparseLayer, sparsifiable_layers

METHODS = ("auto", "weight", "data")
ALLOCATIONS = ("auto", "error", "sensitivity", "marginal")
MEASURED_RULES = {"sensitivity": "equal", "marginal": "marginal"}  # allocation -> sensitivity.allocate rule
AUTO_CANDIDATES = ("marginal", "sensitivity", "error")  # compared by ``auto`` (ties: the first)
LEVELS = tuple(round(0.1 * k, 2) for k in range(1, 10))
"""Fractions of a layer's MACs removed at which allocation curves are measured; a level between
two of them takes the lower one's factorization (the curves interpolate linearly, so the loss
they promise is never below the real one)."""
SENSITIVITY_SAMPLES = 64
_ALLOCATION_TEXT = {
    "marginal": "least summed output loss (cosine, {samples})",
    "sensitivity": "equal output loss (cosine, {samples})",
    "error": "equal relative layer error",
}
MAX_METRIC_COLUMNS = 4608
"""Layers with wider inputs (a Gemm on 25088 features) are factored in the weight metric: their
input moment would not fit in memory."""


def unit_fraction(value) -> float:
    """PassOption parser: a number in (0, 1]."""
    number = float(value)
    if not 0.0 < number <= 1.0:
        raise ValueError("must be in (0, 1]")
    return number


def _fraction(value) -> float:
    """PassOption parser: a number in [0, 1)."""
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise ValueError("must be in [0, 1)")
    return number


def _forms(value) -> Tuple[str, ...]:
    names = [part.strip() for part in str(value).split(",") if part.strip()] if not isinstance(value, (list, tuple)) else list(value)
    if not names or names == ["auto"]:
        return factorize.FORMS
    unknown = [name for name in names if name not in factorize.FORMS]
    if unknown:
        raise ValueError(f"unknown form {unknown[0]!r}; choose from auto, {', '.join(factorize.FORMS)}")
    return tuple(names)


@dataclass
class LowRankLayer:
    """A layer that may be factored: its weight layout, geometry and candidates."""

    layer: SparseLayer
    shape: LayerShape
    pads: Tuple[int, int, int, int] = (0, 0, 0, 0)  # explicit begin/end pads (conv)
    dilations: Tuple[int, int] = (1, 1)
    factorizer: Optional[LayerFactorizer] = None
    front: Optional[List[Candidate]] = None
    chosen: Optional[Candidate] = None
    error: float = float("nan")  # relative output error after the refit (data) or weight error
    error_factored: float = float("nan")  # the same before the refit of the last factor
    note: Optional[str] = None
    step: int = 1  # ranks are multiples of this (--lowrank-round-to)
    metric_note: Optional[str] = None  # why the layer is factored in the weight metric

    @property
    def node(self) -> str:
        return self.layer.node


@dataclass
class RankPlan:
    """One allocation's choice for every allocated layer (None: left alone) and its report entry."""

    choices: Dict[str, Optional[Candidate]]
    details: Dict[str, Any]

    def key(self) -> Tuple:
        return tuple(sorted((node, None if c is None else (c.form, tuple(c.ranks))) for node, c in self.choices.items()))


def _apply_plan(layers: Sequence[LowRankLayer], plan: RankPlan) -> None:
    for item in layers:
        if item.node in plan.choices:
            item.chosen = plan.choices[item.node]
            item.error = item.error_factored = float("nan")


def natural_weight(layer: SparseLayer, weight: np.ndarray) -> np.ndarray:
    """``[Cout, D]`` with conv columns in the weight's own ``(c, y, x)`` order."""
    w = np.asarray(weight)
    if layer.op == "Conv":
        return w.reshape(w.shape[0], -1)
    if layer.op == "Gemm":
        return w if layer.trans_b else w.T
    return w.T


def onnx_weight(layer: SparseLayer, matrix: np.ndarray) -> np.ndarray:
    """Inverse of :func:`natural_weight`."""
    if layer.op == "Conv":
        return matrix.reshape(layer.shape)
    if layer.op == "Gemm":
        return matrix if layer.trans_b else matrix.T
    return matrix.T


def natural_order(layer: SparseLayer) -> np.ndarray:
    """Index into :func:`sparsity.as_matrix` columns of each natural column ``(c, y, x)``."""
    if layer.op != "Conv":
        return np.arange(layer.reduction)
    cin, kh, kw = layer.shape[1:]
    c, y, x = np.meshgrid(np.arange(cin), np.arange(kh), np.arange(kw), indexing="ij")
    return ((y * kw + x) * cin + c).reshape(-1)


def lowrank_layers(model: Model, *, include_last: bool = False) -> Tuple[List[LowRankLayer], Dict[str, str]]:
    """The layers the pass may factor (graph order) and why each other weight layer is not."""
    model.infer_shapes(reset=False)
    found, skipped = sparsifiable_layers(model, include_depthwise=True, include_first=True, include_last=include_last)
    for name, reason in list(skipped.items()):
        if reason.startswith("last layer"):
            skipped[name] = "last layer (include with --lowrank-include-last)"
    nodes = {n.name: n for n in model.graph.nodes}
    result: List[LowRankLayer] = []
    for layer in found:
        node = nodes[layer.node]
        reason, item = _describe(node, layer)
        if reason:
            skipped[layer.node] = reason
        else:
            result.append(item)
    return result, skipped


def _describe(node: gs.Node, layer: SparseLayer) -> Tuple[Optional[str], Optional[LowRankLayer]]:
    out_shape = node.outputs[0].shape
    in_shape = node.inputs[0].shape
    if layer.op == "ConvTranspose":
        return "ConvTranspose is not factored", None
    if layer.op == "Conv":
        if layer.depthwise:
            return "depthwise conv (nothing to factor)", None
        if layer.groups > 1:
            return "grouped conv", None
        if len(layer.shape) != 4:
            return f"{len(layer.shape) - 2}-D conv (2-D convs are factored)", None
        if not _known(in_shape, 4) or not _known(out_shape, 4):
            return "unknown input or output size", None
        kernel = (int(layer.shape[2]), int(layer.shape[3]))
        strides, dilations, begins, out_hw = conv_geometry(node, (int(in_shape[2]), int(in_shape[3])), kernel)
        ends = [
            max(0, (out_hw[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - int(in_shape[2 + i]) - begins[i])
            for i in range(2)
        ]
        shape = LayerShape("Conv", int(layer.shape[0]), int(layer.shape[1]), kernel, (int(strides[0]), int(strides[1])),
                           (int(in_shape[2]), int(in_shape[3])), (int(out_shape[2]), int(out_shape[3])))
        return None, LowRankLayer(layer, shape, (begins[0], begins[1], ends[0], ends[1]), (int(dilations[0]), int(dilations[1])))
    if layer.op == "Gemm":
        if node.attrs.get("transA", 0):
            return "Gemm with transA", None
        if float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0:
            return "Gemm with alpha / beta", None
        if len(node.inputs) > 2 and not isinstance(node.inputs[2], gs.Constant):
            return "Gemm bias is not a constant", None
    if not _known(out_shape, None):
        return "unknown output size", None
    weight = layer.shape
    cout, cin = (weight[0], weight[1]) if layer.op == "Gemm" and layer.trans_b else (weight[1], weight[0])
    positions = int(np.prod([int(d) for d in out_shape[1:-1]])) if len(out_shape) > 2 else 1
    return None, LowRankLayer(layer, LayerShape(layer.op, int(cout), int(cin), positions=positions))


def _known(shape, rank: Optional[int]) -> bool:
    if shape is None or (rank is not None and len(shape) != rank):
        return False
    return all(isinstance(d, (int, np.integer)) and d > 0 for d in list(shape)[1:])


@register_pass
class LowRankPass(Pass):
    name = "lowrank"
    summary = "factor Conv/Gemm/MatMul layers into smaller ones (SVD, spatial SVD, Tucker-2), whitened and refit on --calib data"
    uses_calibration = True
    options = (
        PassOption("rank_ratio", None, "keep at most R of each factored layer's MACs, in (0, 1]", unit_fraction, metavar="R", aliases=("--rank-ratio",)),
        PassOption("energy", None, "keep at least E of each layer's energy (1 - relative error; output energy with --calib), in (0, 1]", unit_fraction, metavar="E", aliases=("--energy",)),
        PassOption("target_macs", None, "keep F of the whole model's MACs, per-layer ranks from --lowrank-allocation, in (0, 1]", unit_fraction, metavar="F", aliases=("--target-macs",)),
        PassOption("forms", "auto", "factorizations to consider: auto (all) or a comma list of svd, spatial, tucker2", _forms, metavar="LIST"),
        PassOption("method", "auto", "data: whitened by the input moment and refit on --calib activations; weight: plain weight SVD; auto = data with --calib", str, choices=METHODS),
        PassOption(
            "allocation",
            "auto",
            "--target-macs budgets from the output loss with one layer factored (needs --calib): marginal (least summed loss), "
            "sensitivity (equal loss per layer); or error (equal relative layer error, no data); auto = with --calib, factor by all three "
            "and keep the model closest to the original on the calibration samples, else error",
            str,
            choices=ALLOCATIONS,
        ),
        PassOption(
            "round_to",
            "auto",
            "ranks are multiples of this (layers narrower than it take any rank); auto = the CPU's conv channel block, "
            "16 on AVX-512, else 8 (other ranks pad up to it or switch layout in onnxruntime), finer only in the "
            "layers a --target-macs cannot be met without (the report says how many)",
            auto_or_positive_int,
            metavar="N",
        ),
        PassOption("min_saving", 0.1, "factor a layer only if that removes at least this fraction of its MACs and of its estimated onnxruntime time (a smaller gain is lost to the extra layer)", _fraction, metavar="S"),
        PassOption("include_last", False, "also factor the last layers (classifier / box heads, no weight layer after them): output-level losses under-weight them", is_switch=True),
        PassOption("exclude", None, "leave layers whose node or weight name matches this regex alone", regex, metavar="REGEX"),
        PassOption("samples", 128, "calibration samples for statistics and refit (64 of them for sensitivity)", positive_int, metavar="N"),
    )
    demo_options = {"rank_ratio": 0.6}

    def validate(self) -> None:
        given = [name for name in ("rank_ratio", "energy", "target_macs") if self.config[name] is not None]
        if not given:
            raise UserError("lowrank: give --rank-ratio R, --energy E or --lowrank-target-macs F")
        if len(given) > 1:
            flags = {"rank_ratio": "--rank-ratio", "energy": "--energy", "target_macs": "--target-macs"}
            raise UserError(f"lowrank: {' and '.join(flags[g] for g in given)} are alternatives; give one")
        if self.config["allocation"] != "auto" and self.config["target_macs"] is None:
            raise UserError("lowrank: --lowrank-allocation applies to --target-macs only")

    # ------------------------------------------------------------------------------------------
    def run(self, model: Model, context: PassContext) -> PassReport:
        from onnxslim_cv.passes.fold import fold_first
        from onnxslim_cv.stats import model_stats

        config = self.config
        report = PassReport(self.name, options=dict(config))
        method = config["method"]
        if method == "auto":
            method = "data" if context.calibration is not None else "weight"
        if method == "data" and context.calibration is None:
            raise UserError("lowrank: --lowrank-method data needs calibration data (--calib)")
        allocation = config["allocation"]
        if allocation == "auto":
            # with data and a model-wide target, factor by every rule and keep the closest outputs
            allocation = "error" if context.calibration is None else "auto" if method == "data" else "marginal"
        if allocation in MEASURED_RULES and context.calibration is None and config["target_macs"] is not None:
            raise UserError(f"lowrank: --lowrank-allocation {allocation} needs calibration data (--calib)")

        fold_first(model, context, report, "the factors are of the deployed weights")
        renamed = name_nodes(model.graph)
        if renamed:
            report.notes.append(f"named {renamed} unnamed nodes")
        layers, skipped = lowrank_layers(model, include_last=self.config["include_last"])
        if config["exclude"]:
            pattern = re.compile(config["exclude"])
            for item in list(layers):
                if pattern.search(item.node) or pattern.search(item.layer.weight):
                    skipped[item.node] = f"excluded by --lowrank-exclude {config['exclude']}"
                    layers.remove(item)
        report.details["skipped"] = dict(skipped)
        report.details["layers"] = []
        if not layers:
            report.warn("lowrank: nothing to factor (" + ("; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3]) or "no Conv / Gemm / MatMul with a constant weight") + "); the model is unchanged")
            return report

        data = context.calibration.limited(config["samples"]) if method == "data" else None
        self._candidates(model, layers, data, context, report)
        model_macs = _per_sample_macs(model_stats(model), layers)  # layer shapes count one sample
        if config["round_to"] == "auto":
            self._refine_steps(layers, model_macs, report)
        plans = self._choose(model, layers, model_macs, allocation, context, report)
        if len({plan.key() for plan in plans.values()}) > 1:
            self._factor_best(model, layers, plans, data, context, report)
        else:
            for name, plan in list(plans.items())[:1]:
                _apply_plan(layers, plan)
                if len(plans) > 1:  # auto, with nothing to compare
                    self._report_plan(report, plan, {"chosen": name, "candidates": {}})
                    report.notes.append("allocation auto: every rule chose the same ranks")
                else:
                    self._report_plan(report, plan)
            chosen = [item for item in layers if item.chosen is not None]
            if chosen and method == "data":
                self._factor_on_data(model, chosen, data, context)
            elif chosen:
                for item in chosen:
                    self._factor_plain(model, item)
        for item in layers:
            if item.chosen is None and item.note:
                skipped[item.node] = item.note
        self._fill_report(report, layers, skipped, method, model_macs)
        return report

    # ------------------------------------------------------------------------------------------
    def _candidates(self, model: Model, layers: List[LowRankLayer], data, context: PassContext, report: PassReport) -> None:
        tensors = model.tensors()
        metrics: Dict[str, np.ndarray] = {}
        if data is not None:
            measured = [item for item in layers if item.shape.columns <= MAX_METRIC_COLUMNS]
            for item in layers:
                if item.shape.columns > MAX_METRIC_COLUMNS:
                    item.metric_note = f"{item.shape.columns} input columns: factored in the weight metric"
            fits = [obs.LayerFit(item.layer) for item in measured]
            with _bar(context, len(fits), "lowrank: input statistics", "layer") as bar:
                obs.collect_statistics(model, fits, data, seed=context.seed, progress=bar)
            for item, fit in zip(measured, fits):
                if fit.gram is not None:
                    gram, _ = _natural_statistics(item.layer, fit)
                    metrics[item.node] = obs._dampened(gram[:-1, :-1], obs.DAMP) / max(fit.rows, 1)
        forms = _forms(self.config["forms"])
        step = native_block_size() if self.config["round_to"] == "auto" else self.config["round_to"]
        for item in layers:
            weight = natural_weight(item.layer, np.asarray(tensors[item.layer.weight].values, dtype=np.float64))
            item.factorizer = LayerFactorizer(item.shape, weight, metrics.get(item.node), forms)
            self._set_front(item, step)

    def _set_front(self, item: LowRankLayer, step: int, front: Optional[Tuple[List[Candidate], Optional[str]]] = None) -> None:
        item.step = step
        item.front, item.note = front if front is not None else self._front_at(item, step)

    def _front_at(self, item: LowRankLayer, step: int) -> Tuple[List[Candidate], Optional[str]]:
        """The layer's candidates at ranks in multiples of ``step`` that pass the gates (a Pareto
        front), and why the layer is left alone when none does."""
        everything = item.factorizer.candidates(step)
        keep = 1.0 - self.config["min_saving"]
        cheaper = [c for c in everything if c.macs <= keep * item.shape.macs]
        # the extra layers cost time MACs do not show (a node, im2col, another activation
        # written and read): on small layers a factorization with half the MACs can run
        # slower, so the estimated time must drop by the same fraction
        faster = [c for c in cheaper if c.latency <= keep * item.shape.latency()]
        front = factorize.pareto(faster)
        if front:
            return front, item.metric_note
        saving = self.config["min_saving"]
        return front, (f"no factorization removes {saving:.0%} of its MACs" if not cheaper
                       else f"no factorization with fewer MACs would run {saving:.0%} faster in onnxruntime (extra layers on a small one)" if saving
                       else "no factorization with fewer MACs would run faster than the layer in onnxruntime (extra layers on a small one)")

    def _smallest_macs(self, item: LowRankLayer, front: Optional[List[Candidate]] = None) -> float:
        """MACs of the layer at the deepest allocation level (its own MACs when it is left alone),
        as ``_allocate`` counts what a target can reach."""
        choice = self._at_level(item, 1.0, front)
        return item.shape.macs if choice is None else choice.macs

    def _refine_steps(self, layers: Sequence[LowRankLayer], model_macs: int, report: PassReport) -> None:
        """``--lowrank-round-to auto``: the conv block, made finer only in the layers a MACs target needs.

        While the target is out of reach with every layer at its cheapest candidate, halve the
        step of the layers with the fewest rank steps in their narrower side (a 16-channel layer
        has one rank at 8, a 64-channel one seven) among those whose cheapest candidate would
        get cheaper; their ranks then pad up to the block (or switch layout) at run time.
        """
        block = native_block_size()
        note = f"ranks in multiples of {block} (this CPU's conv block)"
        target = self.config["target_macs"]
        if target is not None and model_macs > 0:
            def kept() -> float:
                return 1.0 - sum(item.shape.macs - self._smallest_macs(item) for item in layers) / model_macs

            trials: Dict[Tuple[str, int], Tuple[List[Candidate], Optional[str]]] = {}  # (layer, step) -> front
            while kept() > target + 1e-9:
                helping = {}
                for item in layers:
                    if item.step > 1 and item.factorizer is not None:
                        key = (item.node, item.step // 2)
                        if key not in trials:
                            trials[key] = self._front_at(item, item.step // 2)
                        trial = trials[key]
                        if self._smallest_macs(item, trial[0]) < self._smallest_macs(item):
                            helping[item.node] = (item, trial)
                if not helping:
                    break  # _allocate reports the target as unreachable
                fewest = min(min(item.shape.cin, item.shape.cout) / item.step for item, _ in helping.values())
                for item, trial in helping.values():
                    if min(item.shape.cin, item.shape.cout) / item.step <= fewest * (1 + 1e-9):
                        self._set_front(item, item.step // 2, trial)
            finer = [item for item in layers if item.factorizer is not None and item.step < block]
            if finer:
                steps = ", ".join(str(step) for step in sorted({item.step for item in finer}))
                note += (f", finer (multiples of {steps}) in {len(finer)} layer(s) because --target-macs {target:g} is "
                         f"unreachable at {block}: their ranks pad up to {block} at run time")
        report.notes.append(note)

    def _limit(self, item: LowRankLayer, macs: float, front: Optional[List[Candidate]] = None) -> Optional[Candidate]:
        """The best candidate within ``macs`` that saves at least --lowrank-min-saving."""
        front = item.front if front is None else front
        cap = min(macs, (1.0 - self.config["min_saving"]) * item.shape.macs)
        return factorize.best_within(front, cap) if front else None

    def _at_level(self, item: LowRankLayer, level: float, front: Optional[List[Candidate]] = None) -> Optional[Candidate]:
        """Allocation's choice when ``level`` of the layer's MACs is to go (the cheapest if none is that cheap)."""
        front = item.front if front is None else front
        index = int(np.searchsorted(LEVELS, level + 1e-9, side="right")) - 1
        if index < 0 or not front:
            return None
        choice = self._limit(item, (1.0 - LEVELS[index]) * item.shape.macs, front)
        if choice is None and front[0].macs <= (1.0 - self.config["min_saving"]) * item.shape.macs:
            choice = front[0]
        return choice

    def _choose(self, model: Model, layers: List[LowRankLayer], model_macs: int, allocation: str,
                context: PassContext, report: PassReport) -> Dict[str, "RankPlan"]:
        """Sets ``item.chosen`` for the per-layer budgets; for ``--target-macs`` returns each
        allocation's plan (layer -> candidate) instead: one, or several for ``auto`` to compare."""
        config = self.config
        usable = [item for item in layers if item.front]
        if config["rank_ratio"] is not None:
            for item in usable:
                item.chosen = self._limit(item, config["rank_ratio"] * item.shape.macs)
                if item.chosen is None:
                    item.note = f"no factorization keeps at most {config['rank_ratio']:g} of its MACs while saving {config['min_saving']:.0%}"
            return {}
        if config["energy"] is not None:
            for item in usable:
                choice = factorize.cheapest_within(item.front, 1.0 - config["energy"])
                if choice is not None and choice.macs > (1.0 - config["min_saving"]) * item.shape.macs:
                    choice = None
                item.chosen = choice
                if choice is None:
                    item.note = f"keeping {config['energy']:g} of its energy saves less than {config['min_saving']:.0%} of its MACs"
            return {}
        return self._allocate(model, usable, model_macs, allocation, context, report)

    def _allocate(self, model: Model, usable: List[LowRankLayer], model_macs: int, allocation: str,
                  context: PassContext, report: PassReport) -> Dict[str, "RankPlan"]:
        from onnxslim_cv import sensitivity

        target = self.config["target_macs"]
        if not usable or model_macs <= 0:
            return {}
        levels = [0.0] + list(LEVELS)
        names = list(AUTO_CANDIDATES) if allocation == "auto" else [allocation]
        curves_of: Dict[str, list] = {}
        samples = SENSITIVITY_SAMPLES
        if any(name in MEASURED_RULES for name in names):
            samples, per_sample = sensitivity.affordable_samples(model, [item.layer for item in usable], len(LEVELS),
                                                                 SENSITIVITY_SAMPLES, context.calibration)
            note = sensitivity.budget_note(samples, SENSITIVITY_SAMPLES, per_sample,
                                           f"every layer's suffix x {len(LEVELS)} levels", context.calibration)
            if note:
                report.notes.append(note)
            by_weight = {item.layer.weight: item for item in usable}

            def weights_at(layer, weight, wanted):
                item = by_weight[layer.weight]
                result = []
                for level in wanted:
                    choice = self._at_level(item, level)
                    if choice is None:
                        result.append(np.asarray(weight))
                    else:
                        composed = item.factorizer.factors(choice).composed()
                        result.append(onnx_weight(layer, composed).astype(np.asarray(weight).dtype))
                return result

            with _bar(context, len(usable), "lowrank: sensitivity", "layer") as bar:
                measured = sensitivity.analyze_layers(model, context.calibration, sparsities=levels, samples=samples,
                                                      layers=[item.layer for item in usable], progress=bar, weights_at=weights_at)
            curves_of.update({name: measured for name in names if name in MEASURED_RULES})
        if "error" in names:
            curves_of["error"] = []
            for item in usable:
                loss = []
                for level in levels:
                    choice = self._at_level(item, level)
                    loss.append(0.0 if choice is None else float(choice.error))
                curves_of["error"].append(sensitivity.SensitivityCurve(item.node, "layer", list(levels), {"cosine": loss},
                                                                       item.layer.params, item.shape.macs, [item.layer.weight], item.layer.op))
        items = {item.node: item for item in usable}

        def removed(chosen_levels: Dict[str, float]) -> float:
            saved = 0
            for name, level in chosen_levels.items():
                choice = self._at_level(items[name], level)
                if choice is not None:
                    saved += items[name].shape.macs - choice.macs
            return saved / model_macs

        most = removed({item.node: 1.0 for item in usable})
        if 1.0 - most > target + 1e-9:
            raise UserError(
                f"lowrank: --target-macs {target:g} is unreachable: factoring every eligible layer at its smallest rank "
                f"keeps {1.0 - most:.3f} of the model's MACs ({len(usable)} layers eligible)"
            )
        measured_on = (sensitivity.samples_text(context.calibration, samples)
                       if context.calibration is not None else None)
        plans = {}
        for name in names:
            result = sensitivity.allocate(curves_of[name], target=max(0.0, 1.0 - target), metric="cosine", cost="macs",
                                          max_level=max(LEVELS), achieved=removed, rule=MEASURED_RULES.get(name, "equal"))
            plans[name] = RankPlan(
                {item.node: self._at_level(item, float(result.get(item.node, 0.0))) for item in usable},
                {
                    "by": name,
                    "rule": result.rule,
                    "levels": {node: round(float(level), 4) for node, level in result.items()},
                    "target_macs": target,
                    "kept_macs": round(1.0 - result.achieved, 4),
                    "curves": [curve.to_dict() for curve in curves_of[name]],
                    "curve_samples": measured_on if name in MEASURED_RULES else None,
                },
            )
        return plans

    def _report_plan(self, report: PassReport, plan: "RankPlan", extra: Optional[Dict[str, Any]] = None) -> None:
        details = dict(plan.details, **(extra or {}))
        report.details["allocation"] = details
        report.notes.append(
            f"--target-macs {details['target_macs']:g}: per-layer budgets by {_ALLOCATION_TEXT[details['by']].format(samples=details['curve_samples'])}; "
            f"model keeps {details['kept_macs']:.3f} of its MACs"
        )

    def _factor_best(self, model: Model, layers: List[LowRankLayer], plans: Dict[str, "RankPlan"], data,
                     context: PassContext, report: PassReport) -> None:
        """``auto``: factor by every allocation's plan and keep the model closest to the original.

        Which rule spends a MACs budget best depends on the model (measured at 0.75 / 0.5 of the
        MACs: least summed loss on the PP-OCR detector and SqueezeNet, equal loss on ResNet-20 at
        0.5), and the curves add up single-layer losses that do not add up exactly; the output
        cosine loss on the calibration samples of the finished model decides, as ``prune``'s
        ``auto`` does. Plans that pick the same ranks are factored once.
        """
        from onnxslim_cv import sensitivity

        reference = sensitivity.ReferenceOutputs(model, data)
        rows: Dict[str, Dict[str, Any]] = {}
        first_with: Dict[Tuple, str] = {}
        best = None  # (loss, name, factored model, per-layer results)
        for name, plan in plans.items():
            first = first_with.setdefault(plan.key(), name)
            if first != name:
                rows[name] = dict(rows[first], same_as=first)
                continue
            _apply_plan(layers, plan)
            work = model.copy()
            chosen = [item for item in layers if item.chosen is not None]
            self._factor_on_data(work, chosen, data, context)
            rows[name] = {"cosine": reference.loss(work)["cosine"], "macs_kept": plan.details["kept_macs"]}
            if best is None or rows[name]["cosine"] < best[0]:  # ties: the first
                best = (rows[name]["cosine"], name, work, {item.node: (item.error, item.error_factored, item.note) for item in chosen})
        _, best, work, state = best
        model.graph = work.graph
        _apply_plan(layers, plans[best])
        for item in layers:
            if item.node in state:
                item.error, item.error_factored, item.note = state[item.node]
        self._report_plan(report, plans[best], {"chosen": best, "samples": data.count(), "candidates": rows})
        report.notes.append(
            f"allocation auto chose {best}; output cosine loss on the calibration samples: "
            + ", ".join(f"{name} {row['cosine']:.3e}" for name, row in rows.items())
        )

    # ------------------------------------------------------------------------------------------
    def _factor_plain(self, model: Model, item: LowRankLayer) -> None:
        factors = item.factorizer.factors(item.chosen)
        node = next(n for n in model.graph.nodes if n.name == item.node)
        item.error = item.error_factored = item.factorizer.relative_error(factors.composed())
        write_factors(model, node, item, factors.leading, factors.last, None)

    def _factor_on_data(self, model: Model, chosen: List[LowRankLayer], data, context: PassContext) -> None:
        by_node = {item.node: item for item in chosen}
        plain = [item for item in chosen if item.factorizer.metric is None]
        for item in plain:
            self._factor_plain(model, item)
        refit = [item for item in chosen if item.factorizer.metric is not None]
        if not refit:
            return
        original = model.copy()

        def finish(fit: obs.LayerFit, work: Model, original_node: gs.Node) -> None:
            item = by_node[fit.layer.node]
            node = next(n for n in work.graph.nodes if n.name == item.node)
            if fit.gram is None:
                item.note = "no calibration rows: factored in the weight metric"
                self._factor_plain(work, item)
                return
            leading, last, bias = refit_factors(item, fit, np.asarray(node.inputs[1].values), _bias_of(node, item))
            write_factors(work, node, item, leading, last, bias)

        fits = [obs.LayerFit(item.layer) for item in refit]
        with _bar(context, len(fits), "lowrank: factor and refit", "layer") as bar:
            obs.reconstruct_layers(original, model, fits, data, seed=context.seed, finish=finish, progress=bar)

    # ------------------------------------------------------------------------------------------
    def _fill_report(self, report: PassReport, layers: List[LowRankLayer], skipped: Dict[str, str], method: str,
                     model_macs: int) -> None:
        rows = []
        before = after = 0
        for item in layers:
            if item.chosen is None:
                continue
            before += item.shape.macs
            after += item.chosen.macs
            rows.append({
                "node": item.node,
                "op": item.layer.op,
                "form": item.chosen.form,
                "ranks": list(item.chosen.ranks),
                "rank_step": item.step,
                "full_ranks": [item.shape.cin, item.shape.cout] if item.chosen.form == "tucker2" else [min(item.shape.cout, item.shape.columns)],
                "macs_before": int(item.shape.macs),
                "macs_after": int(item.chosen.macs),
                "params_before": int(item.shape.params),
                "params_after": int(item.chosen.params),
                "error_estimate": round(float(item.chosen.error), 6),
                "error_factored": None if np.isnan(item.error_factored) else round(float(item.error_factored), 6),
                "error": None if np.isnan(item.error) else round(float(item.error), 6),
                "note": item.note,
            })
        report.details["layers"] = rows
        report.details["skipped"] = skipped
        report.details["method"] = method
        report.count("layers factored", len(rows))
        if not rows:
            report.warn("lowrank: no layer was factored (" + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3]) + "); the model is unchanged")
            return
        forms: Dict[str, int] = {}
        for row in rows:
            forms[row["form"]] = forms.get(row["form"], 0) + 1
        report.notes.append(
            f"{len(rows)} layers factored ({', '.join(f'{k} {v}' for k, v in sorted(forms.items()))}), {len(skipped)} left alone; "
            f"their MACs {before:,} -> {after:,} ({after / max(before, 1):.2f}x)"
        )
        errors = [row["error"] for row in rows if row["error"] is not None]
        if errors:
            what = "relative output error on calibration data" if method == "data" else "relative weight error"
            report.notes.append(f"{what}: mean {np.mean(errors):.4f}, worst {np.max(errors):.4f}")


def _per_sample_macs(stats, layers: List[LowRankLayer]) -> int:
    """The model's MACs for one sample: ``stats`` counts a static batch, :class:`LayerShape` does not."""
    total = int(stats.macs or 0)
    counted = {layer.name: layer.macs for layer in stats.layers}
    for item in layers:
        macs = counted.get(item.node)
        if macs and item.shape.macs and macs % item.shape.macs == 0:
            return total // (macs // item.shape.macs)
    return total


def _bias_of(node: gs.Node, item: LowRankLayer) -> Optional[np.ndarray]:
    if item.layer.op in ("Conv", "Gemm") and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        bias = np.asarray(node.inputs[2].values).reshape(-1)
        return np.broadcast_to(bias, (item.shape.cout,)).copy() if bias.size in (1, item.shape.cout) else None
    return None


def _natural_statistics(layer: SparseLayer, fit: obs.LayerFit) -> Tuple[np.ndarray, np.ndarray]:
    """The layer's ``X^T X`` and ``X^T Y`` (bias column last) with columns in natural order."""
    order = np.append(natural_order(layer), layer.reduction)
    gram = fit.gram[0][np.ix_(order, order)]
    cross = fit.cross[0][order]
    return gram, cross


def refit_factors(item: LowRankLayer, fit: obs.LayerFit, weight: np.ndarray, bias: Optional[np.ndarray],
                  damp: float = obs.DAMP) -> Tuple[List[np.ndarray], np.ndarray, np.ndarray]:
    """Factor the layer on the statistics of the model factored so far; refit the last factor.

    The target is the least-squares optimum of the whole layer on these inputs against the
    original output (so the factors also correct earlier layers' error); it is factored in the
    metric of these inputs, then the last factor and the bias are refit to the original output
    given the leading factors. Records the relative output errors on ``item``.
    """
    gram, cross = _natural_statistics(item.layer, fit)
    dim = gram.shape[0] - 1
    rows = max(fit.rows, 1)
    w = natural_weight(item.layer, np.asarray(weight, dtype=np.float64))
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    # the statistics' target is the original output without its bias: the bias column is a change
    prior = np.concatenate([w, np.zeros((w.shape[0], 1))], axis=1)
    h = obs._dampened(gram, damp + gram.shape[0] / rows)
    target = np.linalg.solve(h, cross + (h - gram) @ prior.T).T  # [Cout, D+1]
    metric = obs._dampened(gram[:dim, :dim], damp) / rows
    factorizer = LayerFactorizer(item.shape, target[:, :dim], metric)
    factors = factorizer.factors(item.chosen)
    phi = factors.features
    width = phi.shape[0]
    lift = np.zeros((width + 1, dim + 1))
    lift[:width, :dim] = phi
    lift[width, dim] = 1.0
    gz = lift @ gram @ lift.T
    cz = lift @ cross
    start = np.concatenate([factors.last, target[:, dim:]], axis=1)
    hz = obs._dampened(gz, damp + gz.shape[0] / rows)
    refit = np.linalg.solve(hz, cz + (hz - gz) @ start.T).T
    energy = float(fit.energy[0]) or 1.0

    def error(params: np.ndarray) -> float:
        p = params.T
        residual = fit.energy[0] + float(np.sum(p * (gram @ p))) - 2.0 * float(np.sum(p * cross))
        return max(residual, 0.0) / energy

    item.error_factored = error(np.concatenate([factors.composed(), target[:, dim:]], axis=1))
    item.error = error(np.concatenate([refit[:, :width] @ phi, refit[:, width:]], axis=1))
    return factors.leading, refit[:, :width], b + refit[:, width]


def write_factors(model: Model, node: gs.Node, item: LowRankLayer, leading: Sequence[np.ndarray], last: np.ndarray,
                  bias: Optional[np.ndarray]) -> None:
    """Replace ``node`` by its factor layers (input and output tensors keep their names)."""
    graph = model.graph
    stored = node.inputs[1].values
    dtype = np.asarray(stored).dtype
    bits = obs.stored_precision_bits(stored)

    def constant(suffix: str, values: np.ndarray) -> gs.Constant:
        values = np.asarray(values, dtype=dtype)
        if dtype == np.float32:
            values = obs.round_to_precision(values, bits)
        return new_constant(graph, f"{item.layer.weight}/{suffix}", values)

    if bias is None:
        bias_tensor = node.inputs[2] if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) else None
    else:
        bias_tensor = new_constant(graph, f"{item.layer.weight}/bias", np.asarray(bias, dtype=dtype))
    source, output = node.inputs[0], node.outputs[0]
    specs = _layer_specs(item, leading, last)
    current = source
    new_nodes = []
    for index, (op, weight, attrs) in enumerate(specs, start=1):
        is_last = index == len(specs)
        out = output if is_last else gs.Variable(f"{output.name}/factor{index}", dtype=output.dtype)
        inputs = [current, constant(f"factor{index}", weight)]
        if is_last and op == "Gemm" and bias_tensor is None:
            bias_tensor = new_constant(graph, f"{item.layer.weight}/bias", np.zeros(item.shape.cout, dtype=dtype))
        if is_last and bias_tensor is not None and op in ("Conv", "Gemm"):
            inputs.append(bias_tensor)
        # the last node keeps the layer's name: reports, --lowrank-exclude and later stages find it
        name = node.name if is_last else f"{node.name}/factor{index}"
        new_nodes.append(gs.Node(op, name=name, attrs=attrs, inputs=inputs, outputs=[out]))
        current = out
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.remove(node)
    graph.nodes.extend(new_nodes)
    if item.layer.op == "MatMul" and bias is not None and np.any(bias != 0):
        _add_bias_after(graph, new_nodes[-1], np.asarray(bias, dtype=dtype))
    graph.cleanup(remove_unused_graph_inputs=False).toposort()


def _layer_specs(item: LowRankLayer, leading: Sequence[np.ndarray], last: np.ndarray) -> List[Tuple[str, np.ndarray, Dict[str, Any]]]:
    """(op, ONNX weight, attributes) of each factor layer, in order."""
    shape = item.shape
    form = item.chosen.form
    cout = shape.cout
    if item.layer.op == "Gemm":
        (first,) = leading
        # the first factor has no bias: a MatMul (Gemm needs its C input before opset 11)
        return [("MatMul", first.reshape(first.shape[0], -1).T, {}), ("Gemm", last, {"transB": 1})]
    if item.layer.op == "MatMul":
        (first,) = leading
        return [("MatMul", first.reshape(first.shape[0], -1).T, {}), ("MatMul", last.T, {})]
    kh, kw = shape.kernel
    sh, sw = shape.strides
    dh, dw = item.dilations
    top, left, bottom, right = item.pads
    full = {"kernel_shape": [kh, kw], "strides": [sh, sw], "pads": [top, left, bottom, right], "dilations": [dh, dw]}
    pointwise = {"kernel_shape": [1, 1]}
    if form == "svd":
        (first,) = leading
        return [("Conv", first, full), ("Conv", last.reshape(cout, -1, 1, 1), pointwise)]
    if form == "spatial":
        (first,) = leading
        vertical = {"kernel_shape": [kh, 1], "strides": [sh, 1], "pads": [top, 0, bottom, 0], "dilations": [dh, 1]}
        horizontal = {"kernel_shape": [1, kw], "strides": [1, sw], "pads": [0, left, 0, right], "dilations": [1, dw]}
        return [("Conv", first, vertical), ("Conv", last.reshape(cout, -1, 1, kw), horizontal)]
    if form == "tucker2":
        r1, r2 = item.chosen.ranks
        if len(leading) == 1:  # r2 == Cout: the core is the last layer
            return [("Conv", leading[0], pointwise), ("Conv", last.reshape(cout, r1, kh, kw), full)]
        return [("Conv", leading[0], pointwise), ("Conv", leading[1], full), ("Conv", last.reshape(cout, -1, 1, 1), pointwise)]
    raise ValueError(f"unknown form {form!r}")
