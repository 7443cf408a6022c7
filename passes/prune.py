"""``prune``: structured channel pruning on the dependency graph, with training-free recovery.

Whole channels are removed (the only sparsity standard runtimes turn into speed), each removal
propagated to every coupled tensor by :mod:`onnxslim_cv.depgraph`. The pass

1. scores every removable unit by ``--prune-criterion`` (aggregated over all its members);
2. decides how many units each group keeps: the same fraction everywhere (``--prune-ratio``)
   or, to meet ``--prune-target-macs``, by ``--prune-allocation``: a global ranking, or ratios
   from each group's measured loss curve (equal loss, or least summed loss); ``auto`` (the
   default with calibration data) tries all three and keeps the model closest to the original
   on the calibration samples. Counts are rounded *up* to a
   multiple of ``--prune-round-to`` (onnxruntime's blocked conv kernels work in blocks of 16
   channels on AVX-512 and 8 on AVX2; 24 channels cost as much as 32) so latency follows MACs;
3. removes them physically; and, with calibration data,
4. recovers: bias compensation, or least-squares reconstruction of every layer whose inputs
   lost channels (He et al. 2017; Luo et al., ThiNet 2017), see :mod:`onnxslim_cv.reconstruct`.

Criteria:
- ``l1``: sum of |w| of the unit's own filters (Li et al., "Pruning Filters for Efficient
  ConvNets", ICLR 2017);
- ``l2``: L2 norm over all the unit's weights, producers' filters and consumers' input slices
  (group norm, as in DepGraph, Fang et al. 2023);
- ``bn``: |gamma| of the BatchNormalization after the unit's convs, read before folding
  (Liu et al., "Network Slimming", ICCV 2017);
- ``activation``: mean |activation| on calibration data, times the consumers' weight norms;
- ``reconstruction``: the output error removing the unit causes in each consumer after bias
  compensation, ``||W[:, c]||^2 Var(x_c)``, relative to the consumer's output energy. Being
  relative, it compares units across layers, so it also drives ``--prune-target-macs``
  allocation whenever calibration data are given;
- ``obs`` (the default with 64 or more calibration samples; ``reconstruction`` with fewer): the same scores, handed out within each group in
  the order a greedy Optimal Brain Surgeon removal gives, which counts what the least-squares
  refit will move onto correlated kept channels (:mod:`onnxslim_cv.channel_obs`). Groups lose
  as many units as under ``reconstruction``; which ones changes.
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from onnxslim_cv import activations, calibration, channel_obs
from onnxslim_cv.depgraph import ChannelGroup, DependencyGraph, build_dependency_graph, prune_channels
from onnxslim_cv.errors import UserError
from onnxslim_cv.ir import Model
from onnxslim_cv.pipeline import (Pass, PassContext, PassOption, PassReport, auto_or_positive_int, positive_int, read_json_object,
                                  regex, register_pass)
from onnxslim_cv.pipeline import progress_bar as _bar
from onnxslim_cv.reconstruct import Consumer, SliceCache, bias_compensation, refit_or_compensate
from onnxslim_cv.runtime import native_block_size

CRITERIA = ("auto", "l1", "l2", "bn", "activation", "reconstruction", "obs")
RECOVERY = ("auto", "none", "bias", "lsq")
ALLOCATIONS = ("auto", "ranking", "sensitivity", "marginal")
MEASURED_ALLOCATIONS = {"sensitivity": "equal", "marginal": "marginal"}  # allocation -> sensitivity.allocate rule
DATA_CRITERIA = ("activation", "reconstruction", "obs")
MACS_EXPONENT = 0.0
OBS_MIN_SAMPLES = 64
"""``auto`` uses the ``obs`` criterion from this many calibration samples, ``reconstruction``
below: a consumer's input covariance from a few images is poorly estimated and the greedy
follows correlations that do not hold elsewhere. Measured by tools/bench_prune.py: with 250-256
samples obs gained 1-3 points on SqueezeNet and ResNet-20; with the detectors' 10-20 it lost
PP-OCR det 0.93 -> 0.63 IoU at 0.84 of the MACs and was mixed elsewhere."""
MIRROR_BELOW = 64
"""``--prune-calib-mirror auto`` adds left-right mirrors below this many calibration samples
(:func:`onnxslim_cv.calibration.mirrored`); above, the refits have rows enough."""
MIRRORS = ("auto",) + calibration.MIRRORS


def _fraction(low_open: bool, high_open: bool, what: str):
    def parse(value) -> float:
        number = float(value)
        low_ok = number > 0 if low_open else number >= 0
        high_ok = number < 1 if high_open else number <= 1
        if not (low_ok and high_ok) or math.isnan(number):
            lo = "(0" if low_open else "[0"
            hi = "1)" if high_open else "1]"
            raise ValueError(f"{what} must be in {lo}, {hi}")
        return number

    return parse


@register_pass
class PrunePass(Pass):
    name = "prune"
    summary = "remove whole channels (structured pruning across residuals, concats, depthwise, SE, Gemm heads), then refit on calibration data"
    uses_calibration = True
    options = (
        PassOption("ratio", None, "fraction of the channels removed in every prunable group, in [0, 1)", _fraction(False, True, "ratio"), metavar="R"),
        PassOption(
            "target_macs",
            None,
            "keep this fraction of the model's MACs, in (0, 1]: groups ranked globally",
            _fraction(True, False, "target MACs"),
            metavar="F",
            aliases=("--target-macs",),
        ),
        PassOption("criterion", "auto", "channel importance; obs = reconstruction's per-channel error, channels chosen in greedy OBS order (correlation-aware); auto = obs with 64+ calibration samples, reconstruction with fewer, l2 without", str, choices=CRITERIA),
        PassOption(
            "round_to",
            "auto",
            "keep channel counts at multiples of this (rounded up); auto = the CPU's conv block, 16 on AVX-512, else 8, "
            "finer only in the groups a --prune-target-macs cannot be met without (the report says how many); 1 = off",
            auto_or_positive_int,
            metavar="N",
            aliases=("--round-to",),
        ),
        PassOption("min_channels", 1, "never keep fewer channels than this in a group", positive_int, metavar="N", aliases=("--min-channels",)),
        PassOption("max_ratio", 0.8, "with a MACs target: most any one group may lose", _fraction(True, True, "max ratio"), metavar="R"),
        PassOption("exclude", None, "never prune groups with a node or tensor name matching this regex", regex, metavar="REGEX"),
        PassOption("recipe", None, "JSON file: pass options plus per-group ratios {\"groups\": {REGEX: ratio}}", str, metavar="FILE"),
        PassOption(
            "recovery",
            "auto",
            "after removal: lsq (least-squares refit), bias (mean compensation), none; auto = lsq with calibration data",
            str,
            choices=RECOVERY,
        ),
        PassOption("samples", 256, "calibration samples used for importance and recovery", positive_int, metavar="N"),
        PassOption(
            "calib_mirror",
            "auto",
            "also fit on mirrored calibration images: hflip (left-right, 2x the samples), flips (and upside down, 4x), "
            f"crops (left-right and random zoomed-in crops, up to {calibration.CROPS_TARGET} samples), "
            f"none; auto = hflip under {MIRROR_BELOW} samples, where refits from few images overfit (image inputs only)",
            str,
            choices=MIRRORS,
        ),
        PassOption(
            "allocation",
            "auto",
            "how --prune-target-macs is shared among groups: ranking (one global importance ranking, no data needed); "
            "sensitivity (measure each group's output loss at several ratios on calibration data, recovered as "
            "--prune-recovery does, and give every group the same loss); marginal (from the same curves, the least "
            "summed loss); auto = with --calib, prune all three ways and keep the one with the lowest output loss on "
            "calibration samples (minutes on large models: pick one to save time), else ranking",
            str,
            choices=ALLOCATIONS,
        ),
    )
    demo_options = {"ratio": 0.25, "round_to": 1}

    def validate(self) -> None:
        recipe = self.config.get("recipe")
        self.group_ratios: Dict[str, float] = {}
        if recipe:
            self._load_recipe(recipe)
        if self.config["ratio"] is None and self.config["target_macs"] is None:
            raise UserError("prune needs a budget: give --prune-target-macs F (keep F of the MACs, e.g. 0.7; with --calib "
                            "the pass shares it among channel groups by measured loss) or --prune-ratio R (remove R of "
                            "every group's channels), or either in --prune-recipe; 'onnxslim-cv analyze MODEL --calib DATA "
                            "--groups --target-macs F' shows what each group costs first")
        if self.config["ratio"] is not None and self.config["target_macs"] is not None:
            raise UserError("prune: --prune-ratio and --prune-target-macs are alternatives; give one")
        allocation = self.config["allocation"]
        if allocation in MEASURED_ALLOCATIONS and self.config["target_macs"] is None:
            raise UserError(f"prune: --prune-allocation {allocation} allocates a MACs budget: give --prune-target-macs F")

    def _load_recipe(self, path: str) -> None:
        data = read_json_object(path, "--prune-recipe")
        known = {o.name: o for o in self.options}
        for key, value in data.items():
            if key == "groups":
                if not isinstance(value, dict):
                    raise UserError(f"--prune-recipe {path}: 'groups' must map regexes to ratios")
                for pattern, ratio in value.items():
                    try:
                        regex(pattern)
                        self.group_ratios[pattern] = _fraction(False, True, "ratio")(ratio)
                    except (TypeError, ValueError) as exc:
                        raise UserError(f"--prune-recipe {path}: groups[{pattern!r}]: {exc}")
                continue
            option = known.get(key)
            if option is None or key == "recipe":
                raise UserError(f"--prune-recipe {path}: unknown key '{key}' (options: {', '.join(k for k in known if k != 'recipe')}, groups)")
            if self.config[key] != option.default:
                continue  # the command line wins
            try:
                parsed = option.parse(value) if value is not None else None
            except (TypeError, ValueError) as exc:
                raise UserError(f"--prune-recipe {path}: {key}: {exc}")
            if option.choices and parsed not in option.choices:
                raise UserError(f"--prune-recipe {path}: {key}: choose one of {', '.join(option.choices)}")
            self.config[key] = parsed

    # ------------------------------------------------------------------------------------------
    def run(self, model: Model, context: PassContext) -> PassReport:
        from onnxslim_cv.passes.fold import fold_first

        report = PassReport(self.name, options=dict(self.config))
        config = self.config
        data = context.calibration.limited(config["samples"]) if context.calibration is not None else None
        images = data.count() if data is not None else None  # before mirroring: what the criterion choice reads
        if data is not None:
            data = _mirrored(data, images, config["calib_mirror"], report, seed=context.seed)
        recovery = config["recovery"]
        if recovery == "auto":
            recovery = "lsq" if data is not None else "none"
        if recovery != "none" and data is None:
            raise UserError(f"prune: --prune-recovery {recovery} needs calibration data (--calib)")
        criterion = config["criterion"]
        if criterion == "auto":
            criterion = "l2" if data is None else "obs" if (images or OBS_MIN_SAMPLES) >= OBS_MIN_SAMPLES else "reconstruction"
        if criterion in DATA_CRITERIA and data is None:
            raise UserError(f"prune: --prune-criterion {criterion} needs calibration data (--calib)")
        allocation = config["allocation"]
        if allocation in MEASURED_ALLOCATIONS and data is None:
            raise UserError(f"prune: --prune-allocation {allocation} needs calibration data (--calib)")
        if allocation == "auto":
            allocation = "auto" if data is not None and config["target_macs"] is not None else "ranking"
        round_to = config["round_to"]
        auto_round = round_to == "auto"
        if auto_round:
            round_to = native_block_size()

        # channel counts that exports read at run time (Shape) become constants the dependency
        # graph can rewrite; weights and BatchNorm stay as they are (ratio 0 stays bit-identical)
        fold_first(model, context, report, "Identity, Dropout and constant subgraphs; weights untouched",
                   computed_constants_only=True)
        dg = build_dependency_graph(model)
        if config["target_macs"] is not None:
            _ensure_macs(model, dg, data)
        if config["exclude"]:
            dg.freeze_matching(config["exclude"], f"excluded by --prune-exclude {config['exclude']}")
        fixed_ratio: Dict[int, float] = {}
        for pattern, ratio in self.group_ratios.items():
            compiled = re.compile(pattern)
            for group in dg.groups:
                if any(compiled.search(n) for n in group.nodes + group.tensors + group.sources):
                    if ratio == 0 and not group.frozen:
                        group.frozen.append(f"ratio 0 in recipe ({pattern})")
                    fixed_ratio[group.id] = ratio
        summary = dg.summary()
        report.details["dependency_graph"] = summary
        prunable = dg.prunable_groups
        if not prunable:
            reasons = sorted({g.frozen[0] for g in dg.groups if g.frozen})
            report.notes.append("nothing prunable: every channel group is frozen (" + "; ".join(reasons[:5]) + ")")
            report.details["groups"] = [_group_row(g, set()) for g in dg.groups]
            return report

        moments = _consumer_moments(model, dg, data, context) if data is not None else None
        covariances = None
        if criterion == "obs":
            with _bar(context, None, "prune: consumer covariances", "stage") as bar:
                covariances = channel_obs.consumer_covariances(model, dg, data, seed=context.seed, progress=bar)
        scores = unit_scores(model, dg, criterion, moments, covariances)

        limits = _group_limits(dg, round_to, config["min_channels"])
        if auto_round:
            limits = _auto_rounding(dg, round_to, limits, config, fixed_ratio, report)
        means = {k: v.mean for k, v in moments.items()} if moments is not None else None
        chosen: Optional[_Pruned] = None  # the pruned, recovered model, when auto already made it
        if config["target_macs"] is not None:
            candidates = {"ranking": select_for_macs(dg, scores, limits, config["target_macs"], config["max_ratio"], fixed_ratio)}
            if allocation != "ranking":
                candidates.update(
                    _measured_allocations(model, dg, scores, limits, fixed_ratio, data, criterion, round_to, recovery,
                                          config, context, report, [allocation] if allocation != "auto" else list(MEASURED_ALLOCATIONS))
                )
            candidates = {name: _keep_every_tensor_alive(dg, removed, scores) for name, removed in candidates.items()}
            if allocation == "auto" and len({tuple(removed) for removed in candidates.values()}) == 1:
                allocation = next(iter(candidates))  # nothing to compare
            if allocation == "auto":
                allocation, chosen = _choose_allocation(model, dg, candidates, data, recovery, means, context, report)
            removed = candidates[allocation]
        else:
            removed = _keep_every_tensor_alive(dg, select_by_ratio(dg, scores, limits, config["ratio"], fixed_ratio), scores)
        macs_before = dg.macs()
        if not removed:
            report.notes.append("no channel removed (ratio too small for the rounding, or nothing prunable)")
            report.details["groups"] = [_group_row(g, set()) for g in dg.groups]
            return report

        removed_set = set(removed)
        if chosen is None:
            original = model.copy() if recovery != "none" else model
            with _bar(context, None, "prune: reconstruction", "stage") if recovery == "lsq" else nullcontext() as bar:
                chosen = _Pruned.of(original, model, dg, removed, recovery, data, means, seed=context.seed, progress=bar, in_place=True)
        else:
            model.graph = chosen.model.graph
        report.count("channels removed", sum(_positions(dg, g, removed_set) for g in dg.groups))
        report.count("groups pruned", sum(1 for g in dg.groups if removed_set.intersection(g.units)))
        report.count("constants sliced", chosen.counts["constants"])
        report.count("attributes rewritten", chosen.counts["fixups"])
        if recovery == "bias":
            report.count("biases compensated", chosen.compensated)
        elif recovery == "lsq":
            report.count("layers refit", sum(1 for c in chosen.refit if not c.skipped))
            if any(c.skipped for c in chosen.refit):
                report.count("biases compensated", chosen.compensated)
            report.details["reconstruction"] = [
                {
                    "layer": c.name,
                    "error_before": c.error_before,
                    "error_after": c.error_after,
                    **({"skipped": c.skipped} if c.skipped else {}),
                }
                for c in chosen.refit
            ]
        rows = [_group_row(g, removed_set) for g in dg.groups]
        report.details["groups"] = rows
        report.details["estimated_macs_ratio"] = dg.macs(removed) / macs_before if macs_before else None
        report.notes.append(
            f"{summary['prunable_groups']}/{summary['groups']} channel groups prunable "
            f"({summary['prunable_conv_channels']}/{summary['conv_channels']} conv channels); "
            f"{report.changes.get('groups pruned', 0)} pruned, criterion {criterion}, "
            + (f"allocation {allocation}, " if config["target_macs"] is not None else "")
            + f"recovery {recovery}"
        )
        return report


# ----------------------------------------------------------------------------------------------
# Importance
# ----------------------------------------------------------------------------------------------


def _per_position(values: np.ndarray, axis: int, kind: str) -> np.ndarray:
    moved = np.moveaxis(np.asarray(values, dtype=np.float64), axis, 0).reshape(values.shape[axis], -1)
    return np.abs(moved).sum(axis=1) if kind == "l1" else np.square(moved).sum(axis=1)


def _is_weight(member) -> bool:
    return member.node.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and member.index == 1


def unit_scores(model: Model, dg: DependencyGraph, criterion: str, moments=None, covariances=None) -> np.ndarray:
    """Importance per raw unit id (only roots are meaningful); higher = keep.

    ``covariances``: :func:`onnxslim_cv.channel_obs.consumer_covariances`, for ``obs``."""
    score = np.zeros(dg.num_ids)

    def add(ids, values):
        np.add.at(score, dg.find(ids), values)

    if criterion in ("l1", "l2"):
        for member in dg.members:
            if not _is_weight(member):
                continue
            if criterion == "l1" and member.role != "out":
                continue
            add(member.ids, _per_position(member.node.inputs[member.index].values, member.axis, criterion))
        if criterion == "l2":
            score = np.sqrt(score)
        return score
    if criterion == "bn":
        found = False
        record = model.annotations.get("batchnorm", {})
        for member in dg.members:
            if member.node.op == "BatchNormalization" and member.index == 1:
                add(member.ids, np.abs(np.asarray(member.node.inputs[1].values, dtype=np.float64)))
                found = True
            elif member.role == "out" and _is_weight(member) and member.node.name in record:
                gamma = np.abs(np.asarray(record[member.node.name]["gamma"], dtype=np.float64)).reshape(-1)
                if len(gamma) == len(member.ids):
                    add(member.ids, gamma)
                    found = True
        if not found:
            raise UserError("prune: --prune-criterion bn found no BatchNormalization scales (none in the model, and fold did not record any)")
        return score
    if moments is None:
        raise UserError(f"prune: --prune-criterion {criterion} needs calibration data (--calib)")
    if criterion == "activation":
        for member in dg.members:
            stats = _consumer_stats(member, moments)
            if stats is not None:
                add(member.ids, stats[0].mean_abs * np.sqrt(stats[1]))
        return score
    costs = {id(member): reconstruction_cost(member, moments) for member in dg.members}
    for member in dg.members:
        if costs[id(member)] is not None:
            add(member.ids, costs[id(member)])
    if criterion == "obs":
        if covariances is None:
            raise UserError("prune: --prune-criterion obs needs calibration data (--calib)")
        score = channel_obs.reorder_scores(dg, score, covariances, lambda member: costs[id(member)])
    return score


def _consumer_stats(member, moments):
    """(input channel moments, per-position squared weight norm) of a consumer's ``in`` member, or None."""
    if member.role != "in" or not _is_weight(member) or member.input_tensor not in moments:
        return None
    stats = moments[member.input_tensor]
    weight_sq = _per_position(member.node.inputs[1].values, member.axis, "l2")
    if len(stats.mean) != len(weight_sq):
        return None
    return stats, weight_sq


def reconstruction_cost(member, moments) -> Optional[np.ndarray]:
    """Per input position of a consumer: ``||W[:, c]||^2 Var(x_c)`` relative to its output energy."""
    found = _consumer_stats(member, moments)
    if found is None:
        return None
    stats, weight_sq = found
    energy = float((weight_sq * stats.mean_square).sum()) or 1.0
    return weight_sq * stats.variance / energy


def consumer_axes(dg: DependencyGraph) -> Dict[str, int]:
    """Channel axis of every tensor a prunable consumer reads (where its statistics are taken)."""
    axes = {}
    for member in dg.members:
        if member.role == "in" and member.input_tensor:
            layout = dg.layouts.get(member.input_tensor)
            if layout is not None:
                axes[member.input_tensor] = layout.axis
    return axes


def _consumer_moments(model: Model, dg: DependencyGraph, data, context: PassContext):
    axes = consumer_axes(dg)
    total = data.count()
    batches = None if total is None else -(-total // activations.DEFAULT_BATCH)
    with _bar(context, batches, "prune: activation statistics", "batch") as bar:
        return activations.channel_moments(model, axes, data, progress=bar)


def _mirrored(data, count: Optional[int], kind: str, report: PassReport, seed: int = 0):
    """The calibration data (``count`` samples) with mirrored copies, as ``--prune-calib-mirror`` asks
    (``crops`` drawn with ``seed``); noted in the report."""
    if kind == "auto":
        if count is not None and count >= MIRROR_BELOW:
            return data
        kind = "hflip"
    mirrored, why_not = calibration.mirrored(data, kind, seed=seed)
    if why_not is None:
        report.notes.append(f"calibration: {mirrored.description}, {mirrored.count() or 'all'} samples for the curves and refits")
    elif kind != "none":
        report.notes.append(f"calibration: no mirroring ({why_not})")
    return mirrored


# ----------------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------------


def _group_limits(dg: DependencyGraph, round_to: int, min_channels: int) -> Dict[int, Tuple[int, int, int]]:
    """Per prunable group: (units, unit step for the rounding, minimum units kept)."""
    limits = {}
    for group in dg.prunable_groups:
        n = len(group.units)
        per_unit = group.positions_per_unit
        step = max(1, round_to // math.gcd(round_to, per_unit)) if round_to > 1 else 1
        minimum = max(1, -(-min_channels // per_unit))
        limits[group.id] = (n, step, minimum)
    return limits


def _auto_rounding(dg, round_to, limits, config, fixed_ratio, report) -> Dict[int, Tuple[int, int, int]]:
    """``--round-to auto``: the CPU's conv block, made finer only in the groups a MACs target needs.

    Counts in multiples of the block keep onnxruntime's NCHWc kernels free of padding, but a
    16-channel group cannot lose any channel at 16 and a 32-channel one only half, so deep
    targets on thin networks (ResNet-20's 16/32/64 stages) would be refused. Rather than an
    error, halve the step of the groups where the rounding bites hardest (fewest steps per
    group) until the target can be met, and say so: those counts pad up to the block at run
    time. On ResNet-20 at 0.45 / 0.39 / 0.25 of the MACs this ran 3-7% faster than halving
    every group's step (two interleaved onnxruntime races, 1 thread).
    """
    note = f"channel counts rounded up to multiples of {round_to} (this CPU's conv block)"
    target = config["target_macs"]
    if target is None:
        report.notes.append(note)
        return limits
    total = dg.macs()
    native, limits = limits, dict(limits)
    goal = target * total * (1 + 1e-9)
    while total > 0 and smallest_macs(dg, limits, config["max_ratio"], fixed_ratio) > goal:
        coarse = {gid: n / step for gid, (n, step, _) in limits.items() if step > 1}
        if not coarse:
            break  # even channel by channel: select_for_macs reports the target as unreachable
        worst = min(coarse.values())
        for gid, steps in coarse.items():
            if steps <= worst * (1 + 1e-9):
                n, step, minimum = limits[gid]
                limits[gid] = (n, step // 2, minimum)
    count = sum(1 for gid, (_, step, _) in limits.items() if step < native[gid][1])
    if count:
        note += (f", finer in {count} group(s) because --prune-target-macs {target:g} is unreachable at "
                 f"{round_to}: their counts pad up to {round_to} at run time")
    report.notes.append(note)
    return limits


def smallest_macs(dg, limits, max_ratio, fixed_ratio) -> float:
    """MACs left when every prunable group loses as much as the rounding, minimum and cap allow."""
    removed: List[int] = []
    for group in dg.prunable_groups:
        n, step, minimum = limits[group.id]
        if group.id in fixed_ratio:
            wanted = int(math.floor(fixed_ratio[group.id] * n + 1e-9))
        else:
            wanted = int(math.floor(max_ratio * n + 1e-9))
        count = _allowed_removal(n, step, minimum, wanted)
        removed.extend(sorted(group.units)[:count])
    mask = np.zeros(dg.num_ids, dtype=bool)
    mask[removed] = True
    return dg.macs_function()(mask)


def _allowed_removal(n: int, step: int, minimum: int, wanted: int) -> int:
    """Remove at most ``wanted`` units so that the kept count is a multiple of ``step`` (or all)."""
    wanted = max(0, min(wanted, n - minimum))
    if wanted == 0:
        return 0
    kept = n - wanted
    kept = -(-kept // step) * step  # round the kept count up
    if kept >= n:
        return 0
    return n - kept


def _ordered_units(group: ChannelGroup, scores: np.ndarray) -> List[int]:
    return sorted(group.units, key=lambda u: (scores[u], u))


def select_by_ratio(dg, scores, limits, ratio, fixed_ratio) -> List[int]:
    removed: List[int] = []
    for group in dg.prunable_groups:
        n, step, minimum = limits[group.id]
        group_ratio = fixed_ratio.get(group.id, ratio)
        count = _allowed_removal(n, step, minimum, int(math.floor(group_ratio * n + 1e-9)))
        removed.extend(_ordered_units(group, scores)[:count])
    return removed


def select_for_macs(dg, scores, limits, target, max_ratio, fixed_ratio) -> List[int]:
    """Remove globally least important units until MACs fall to ``target`` of the original.

    Scores are normalised by their group's mean so that groups compare (raw output-error
    scores over-prune the residual spines, whose errors compound downstream: measured on
    ResNet-20, 51% against 68% top-1 at 0.7 of the MACs). The rounding makes the steps
    coarse, so a final pass gives back the most valuable blocks the target leaves room for.
    """
    total = dg.macs()
    if total <= 0:
        raise UserError("prune: --prune-target-macs needs MACs, but no layer's shapes are known (pass --input-shape)")
    goal = target * total
    unit_macs = dg.unit_macs()
    prunable_units = [u for g in dg.prunable_groups for u in g.units]
    mean_macs = float(np.mean(unit_macs[prunable_units])) if prunable_units else 1.0
    normalised: Dict[int, float] = {}
    fixed: List[int] = []
    candidates: List[Tuple[float, int, int]] = []  # (key, group id, unit)
    orders: Dict[int, List[int]] = {}
    for group in dg.prunable_groups:
        n, step, minimum = limits[group.id]
        order = _ordered_units(group, scores)
        orders[group.id] = order
        if group.id in fixed_ratio:
            count = _allowed_removal(n, step, minimum, int(math.floor(fixed_ratio[group.id] * n + 1e-9)))
            fixed.extend(order[:count])
            continue
        values = np.array([scores[u] for u in group.units], dtype=np.float64)
        values = values / (float(values.mean()) or 1.0)
        if MACS_EXPONENT:
            # damage per MAC saved (measured: on ResNet-20 this over-prunes residual spines)
            cost = np.array([unit_macs[u] for u in group.units], dtype=np.float64)
            values = values / np.maximum(cost / max(mean_macs, 1e-12), 1e-6) ** MACS_EXPONENT
        for unit, value in zip(group.units, values):
            candidates.append((float(value), group.id, unit))
            normalised[unit] = float(value)
    candidates.sort()
    evaluate = dg.macs_function()

    def removal(k: int) -> List[int]:
        wanted: Dict[int, int] = {}
        for _, gid, _ in candidates[:k]:
            wanted[gid] = wanted.get(gid, 0) + 1
        removed = list(fixed)
        for gid, count in wanted.items():
            n, step, minimum = limits[gid]
            cap = int(math.floor(max_ratio * n + 1e-9))
            removed.extend(orders[gid][: _allowed_removal(n, step, minimum, min(count, cap))])
        return removed

    def macs_of(removed: List[int]) -> float:
        mask = np.zeros(dg.num_ids, dtype=bool)
        mask[removed] = True
        return evaluate(mask)

    floor = smallest_macs(dg, limits, max_ratio, fixed_ratio)
    if floor > goal * (1 + 1e-9):
        reachable = floor / total
        raise UserError(
            f"prune: --prune-target-macs {target:g} is unreachable; with the frozen groups, "
            f"--prune-max-ratio and rounding the model keeps at least {reachable:.3f} of its MACs"
        )
    lo, hi = 0, len(candidates)
    while lo < hi:
        mid = (lo + hi) // 2
        if macs_of(removal(mid)) <= goal * (1 + 1e-9):
            hi = mid
        else:
            lo = mid + 1
    return _give_back(dg, removal(lo), orders, limits, normalised, macs_of, goal, set(fixed))


def _give_back(dg, removed, orders, limits, normalised, macs_of, goal, fixed) -> List[int]:
    """Re-add whole rounding steps of the best removed units while the target still holds."""
    removed = list(removed)
    while True:
        removed_set = set(removed)
        best = None
        for gid, order in orders.items():
            n, step, minimum = limits[gid]
            gone = [u for u in order if u in removed_set and u not in fixed]
            if not gone:
                continue
            back = gone[-step:] if len(gone) >= step else gone
            trial = [u for u in removed if u not in set(back)]
            macs = macs_of(trial)
            if macs > goal * (1 + 1e-9):
                continue
            value = sum(normalised.get(u, 0.0) for u in back) / max(macs - macs_of(removed), 1e-9)
            if best is None or value > best[0]:
                best = (value, trial)
        if best is None:
            return sorted(removed)
        removed = best[1]


SENSITIVITY_SAMPLES = 64
"""Calibration samples of the group curves and of ``auto``'s comparison (fewer than recovery's)."""


def _measured_allocations(model, dg, scores, limits, fixed_ratio, data, criterion, round_to, recovery, config, context,
                          report, allocations: Sequence[str]) -> Dict[str, List[int]]:
    """Removals for the allocations that need measured curves (``sensitivity``, ``marginal``).

    Each group's loss curve is measured alone, once for all of them
    (:func:`onnxslim_cv.sensitivity.analyze_groups`, same criterion, rounding and recovery: a
    group whose loss the refit can undo is cheap, one it cannot is not, which bias compensation
    alone does not show). :func:`onnxslim_cv.sensitivity.allocate` then picks per-group ratios
    meeting the MACs target, counted exactly with this pass's rounding, by its ``equal`` or
    ``marginal`` rule. The ratios go through the recipe path (``fixed_ratio``), so selection is
    unchanged. Under ``auto`` an allocation the curves cannot meet is left out, not an error.
    """
    from onnxslim_cv import sensitivity

    prunable = {g.id for g in dg.prunable_groups}
    ids = [gid for gid in sorted(prunable) if gid not in fixed_ratio]
    if not ids:
        return {}
    levels = sensitivity.DEFAULT_RATIOS
    # each point runs its group's sources and everything downstream: large models get fewer samples
    per_sample = len(levels) * sensitivity.group_suffix_macs(model, [dg.groups[gid] for gid in ids], data)
    samples = sensitivity.samples_within(per_sample, SENSITIVITY_SAMPLES)
    note = sensitivity.budget_note(samples, SENSITIVITY_SAMPLES, per_sample,
                                   f"{len(ids)} groups x {len(levels)} ratios x the part of the model each group changes", data)
    if note:
        report.notes.append(f"group {note}")
    with _bar(context, len(ids) * len(levels), "prune: sensitivity", "eval") as bar:
        curves = sensitivity.analyze_groups(
            model, data, ratios=levels, samples=samples, criterion=criterion, round_to=round_to, limits=limits,
            min_channels=config["min_channels"], groups=ids, progress=bar, recovery=recovery, scores=scores,
        )
    for curve in curves:
        group = dg.groups[curve.group]
        if curve.members != list(group.sources or group.nodes):
            raise RuntimeError(f"sensitivity curve {curve.name} does not match channel group {curve.group}")
    fixed = sensitivity.GroupBudget(dg, scores, limits).removed({g: r for g, r in fixed_ratio.items() if g in prunable})
    budget = sensitivity.GroupBudget(dg, scores, limits, fixed=fixed)
    details = report.details.setdefault("sensitivity", {"curves": [curve.to_dict() for curve in curves], "allocations": {}})
    removals: Dict[str, List[int]] = {}
    for name in allocations:
        rule = MEASURED_ALLOCATIONS[name]
        try:
            allocation = sensitivity.allocate(
                curves, target=config["target_macs"], metric="cosine", cost="macs", max_level=config["max_ratio"],
                achieved=budget.kept_fn(curves), rule=rule,
            )
        except UserError as exc:
            if len(allocations) == 1:
                raise UserError(f"prune: --prune-allocation {name}: {exc}")
            report.notes.append(f"allocation {name} left out: {exc}")
            continue
        details["allocations"][name] = allocation.to_dict()
        ratios = {**fixed_ratio, **{curve.group: float(allocation[curve.name]) for curve in curves}}
        removals[name] = select_for_macs(dg, scores, limits, config["target_macs"], config["max_ratio"], ratios)
        what = f"equal cosine loss {allocation.threshold:.2e} each" if rule == "equal" else "least summed cosine loss"
        report.notes.append(f"{name}: ratios of {len(curves)} groups from their sensitivity curves, {what}, "
                            f"{allocation.achieved:.3f} of the MACs kept")
    return removals


def _choose_allocation(model, dg, candidates: Dict[str, List[int]], data, recovery, means, context,
                       report) -> Tuple[str, "_Pruned"]:
    """``auto``: the candidate removal whose recovered model best matches the original's outputs.

    No allocation rule wins everywhere (measured at 0.7-0.84 of the MACs: one global ranking is
    best on SqueezeNet, equal loss on ResNet-20 at 0.7, least summed loss at 0.8; ranking collapses
    the PP-OCR detector's text head, which the curves protect), while the output cosine loss on
    the calibration samples ranked them as top-1 and IoU on held-out images did in each case.
    Each candidate is pruned and recovered exactly as the pass would (a refit on fewer samples
    overfits and misleads the comparison), so the winner is kept as it is.
    """
    from onnxslim_cv import sensitivity

    reference = sensitivity.ReferenceOutputs(model, data)
    macs_before = dg.macs()
    rows: Dict[str, Dict[str, Any]] = {}
    made: Dict[str, _Pruned] = {}
    seen: Dict[Tuple[int, ...], str] = {}
    values = SliceCache(max_bytes=0)  # no equations kept: the candidates share only the original's values
    with _bar(context, len(candidates), "prune: comparing allocations", "candidate") as bar:
        for name, removed in candidates.items():
            key = tuple(removed)
            if key in seen:
                rows[name] = dict(rows[seen[key]], same_as=seen[key])
            else:
                seen[key] = name
                made[name] = _Pruned.of(model, model.copy(), dg, removed, recovery, data, means, seed=context.seed, cache=values)
                rows[name] = {"cosine": reference.loss(made[name].model)["cosine"], "macs_kept": dg.macs(removed) / macs_before}
            bar.update(1)
    chosen = min(rows, key=lambda name: rows[name]["cosine"])  # ties: the first, ranking
    report.details["allocation"] = {"chosen": chosen, "samples": data.count(), "candidates": rows}
    report.notes.append(
        f"allocation auto chose {chosen}; output cosine loss on the calibration samples: "
        + ", ".join(f"{name} {row['cosine']:.3e}" for name, row in rows.items())
    )
    return chosen, made[rows[chosen].get("same_as", chosen)]


@dataclass
class _Pruned:
    """A model without some units, recovered, and what it took."""

    model: Model
    counts: Dict[str, int]
    refit: List[Consumer] = field(default_factory=list)
    compensated: int = 0

    @classmethod
    def of(cls, original: Model, model: Model, dg: DependencyGraph, removed: Sequence[int], recovery: str, data, means,
           *, seed: int = 0, progress=None, in_place: bool = False, cache: Optional[SliceCache] = None) -> "_Pruned":
        """Remove the ``removed`` units of ``dg`` from ``model``, then recover against ``original``.

        ``recovery``: none, bias (mean compensation, from ``means``) or lsq (refit on ``data``).
        ``in_place``: ``dg`` is ``model``'s graph; otherwise ``model`` is a copy of the graph
        ``dg`` was built on, whose graph is rebuilt (shapes not refreshed, so unit ids match).
        """
        if not in_place:
            copy_dg = build_dependency_graph(model, refresh_shapes=False)
            if copy_dg.num_ids != dg.num_ids or len(copy_dg.groups) != len(dg.groups):
                raise RuntimeError("dependency graph of the model copy differs from the original's")
            dg = copy_dg
        removed = list(removed)
        consumers = _consumers(dg, removed)
        result = cls(model, prune_channels(model, dg, removed))
        if recovery == "lsq":
            result.refit, result.compensated = refit_or_compensate(original, model, consumers, data, means, seed=seed, progress=progress,
                                                                     cache=cache)
        elif recovery == "bias":
            result.compensated = bias_compensation(original, model, consumers, means)
        return result


def pruned_copy(model: Model, dg: DependencyGraph, removed: Sequence[int], recovery: str, data, means,
                cache: Optional[SliceCache] = None) -> Model:
    """A recovered copy of ``model`` without the ``removed`` units of ``dg`` (its graph); ``model`` is untouched.

    ``cache``: shared by calls on the same ``model`` and ``data`` (see :class:`SliceCache`)."""
    return _Pruned.of(model, model.copy(), dg, removed, recovery, data, means, cache=cache).model


def _keep_every_tensor_alive(dg: DependencyGraph, removed: List[int], scores) -> List[int]:
    removed_set = set(int(u) for u in removed)
    if not removed_set:
        return []
    for layout in dg.layouts.values():
        roots = np.unique(dg.find(layout.ids))
        if all(int(r) in removed_set for r in roots):
            best = max(roots, key=lambda r: scores[r])
            removed_set.discard(int(best))
    return sorted(removed_set)


def _positions(dg: DependencyGraph, group: ChannelGroup, removed: set) -> int:
    if not removed.intersection(group.units):
        return 0
    first = dg.layouts[group.tensors[0]]
    roots = dg.find(first.ids)
    return int(np.isin(roots, list(removed.intersection(group.units))).sum())


def _group_row(group: ChannelGroup, removed: set) -> Dict[str, Any]:
    return {
        "id": group.id,
        "sources": group.sources,
        "consumers": group.consumers,
        "nodes": group.nodes,
        "channels": group.channels,
        "units": len(group.units),
        "kept_units": len(group.units) - len(removed.intersection(group.units)),
        "frozen": group.frozen,
        "notes": group.notes,
    }


# ----------------------------------------------------------------------------------------------
# Recovery
# ----------------------------------------------------------------------------------------------


def _consumers(dg: DependencyGraph, removed: List[int]) -> List[Consumer]:
    removed_arr = np.asarray(sorted(removed), dtype=np.int64)
    found: Dict[str, Consumer] = {}
    for member in dg.members:
        if member.role != "in" or not _is_weight(member):
            continue
        in_keep = dg.keep_mask(member.ids, removed_arr)
        if in_keep.all():
            continue
        out_member = next((m for m in dg.members if m.node is member.node and m.role == "out" and m.index == 1), None)
        if out_member is not None:
            out_keep = dg.keep_mask(out_member.ids, removed_arr)
        else:
            weight = member.node.inputs[1].values
            axis = {"Conv": 0, "ConvTranspose": 1, "Gemm": 0 if member.node.attrs.get("transB", 0) else 1, "MatMul": 1}[member.node.op]
            out_keep = np.ones(weight.shape[axis], dtype=bool)
        found[member.node.name] = Consumer(member.node.name, in_keep, out_keep)
    return list(found.values())


def _ensure_macs(model: Model, dg: DependencyGraph, data) -> None:
    """MACs need static shapes: take them from a calibration sample when the model is dynamic."""
    if all(layer.macs for layer in dg.weight_layers):
        return
    if data is None:
        if not any(layer.macs for layer in dg.weight_layers):
            raise UserError(
                "prune: --prune-target-macs needs layer shapes; the model has dynamic dims: pass --input-shape or --calib"
            )
        return
    sample = next(iter(data.batches(1)))
    probe = model.copy()
    shapes = {name: tuple(int(d) for d in np.shape(value)) for name, value in sample.items()}
    try:
        for tensor in probe.graph.inputs:
            if tensor.name in shapes:
                tensor.shape = list(shapes[tensor.name])
        probe.infer_shapes(reset=True)
    except Exception:
        return
    from onnxslim_cv.stats import layer_macs

    macs = {node.name: layer_macs(node) for node in probe.graph.nodes}
    if not all(macs.get(layer.node.name) for layer in dg.weight_layers):
        unknown = [t for n in probe.graph.nodes if n.op in ("Conv", "Gemm", "MatMul", "ConvTranspose") for t in (n.inputs[0], n.outputs[0])]
        probe.probe_shapes_with_runtime(unknown)
        macs = {node.name: layer_macs(node) for node in probe.graph.nodes}
    for layer in dg.weight_layers:
        layer.macs = macs.get(layer.node.name) or layer.macs
