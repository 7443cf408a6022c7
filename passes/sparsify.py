"""``sparsify``: unstructured magnitude and N:M weight pruning, with calibrated reconstruction.

Individual weights of Conv / ConvTranspose / Gemm / MatMul layers are zeroed:

- ``--sparsity S`` zeroes that fraction of each layer (``--sparsify-mode uniform``), or of all
  layers together under one magnitude threshold (``global``, optionally after dividing each
  layer by its RMS: ``--sparsify-normalize``), or per-layer fractions chosen from measured
  sensitivity curves with the greedy equal-degradation search (``sensitivity``, see
  :mod:`onnxslim_cv.sensitivity`);
- ``--nm N:M`` keeps N weights in every M consecutive input channels at each kernel position,
  the layout NVIDIA's sparse tensor cores accelerate (2:4).

With calibration data each layer is then reconstructed from its Hessian (:mod:`onnxslim_cv.obs`,
SparseGPT / OBS): the mask is chosen by saliency ``w^2/[H^-1]_jj`` and the kept weights and the
bias refit to the original layer's output, layer after layer so later layers also absorb
earlier errors; a conv read only through a Relu is refit once more per ``--sparsify-relu-steps``
to the output after the Relu. Without data: plain magnitude pruning (Han et al., "Learning both Weights and
Connections for Efficient Neural Networks", NeurIPS 2015).

Dense runtimes (onnxruntime's CPU kernels included) do **not** run unstructured zeros faster;
the gains are the compressed file size (reported, deflate) and runtimes or hardware with
sparse kernels (2:4 on Ampere+ GPUs through TensorRT).

Library hooks for iterative pruning and lottery-ticket rewinds: :func:`sparsify_iteratively`,
``--export-masks`` and ``onnxslim-cv apply-masks``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from onnxslim_cv import obs
from onnxslim_cv.sensitivity import MEASURE_BUDGET_MACS, MIN_MEASURE_SAMPLES
from onnxslim_cv.errors import UserError
from onnxslim_cv.graph_utils import name_nodes, replace_constant_values, strip_output_softmax
from onnxslim_cv.ir import Model
from onnxslim_cv.pipeline import Pass, PassContext, PassOption, PassReport, non_negative_int, positive_int, read_json_object, regex, register_pass
from onnxslim_cv.pipeline import progress_bar as _bar
from onnxslim_cv.sparsity import (
    SparseLayer,
    check_sparsity,
    global_sparsities,
    layer_weights,
    magnitude_mask,
    nm_eligible,
    nm_mask,
    parse_nm,
    sparsifiable_layers,
)

MODES = ("auto", "uniform", "global", "sensitivity", "hessian")
RECOVERY = ("auto", "none", "obs")
SENSITIVITY_SAMPLES = 64
MAX_LAYER_SPARSITY = 0.95


def _nm_option(value):
    return parse_nm(value)


def _masks_option(value):
    """A path to an .npz of masks, or a dict {initializer: keep-mask} (library use)."""
    if isinstance(value, dict):
        return {str(k): np.asarray(v).astype(bool) for k, v in value.items()}
    return str(value)


@register_pass
class SparsifyPass(Pass):
    name = "sparsify"
    summary = "zero individual weights (magnitude or N:M like 2:4), refit on calibration data (ExactOBS / SparseGPT); smaller files, not faster dense kernels"
    uses_calibration = True
    options = (
        PassOption("sparsity", None, "fraction of weights zeroed, in [0, 1)", check_sparsity, metavar="S", aliases=("--sparsity",)),
        PassOption("nm", None, "N:M pattern, N kept in every M consecutive input channels (e.g. 2:4)", _nm_option, metavar="N:M", aliases=("--nm",)),
        PassOption(
            "mode",
            "auto",
            "per-layer sparsity: uniform (S in each layer), global (one magnitude threshold), sensitivity (equal output loss from analyze's curves of magnitude-pruned layers), hessian (the same with each layer refit from its Hessian, as the pass then does); auto = hessian with --calib, else uniform",
            str,
            choices=MODES,
            aliases=("--sparsity-mode",),
        ),
        PassOption("normalize", False, "global mode: divide each layer's magnitudes by its RMS first", is_switch=True),
        PassOption("include_depthwise", False, "also sparsify depthwise convs", is_switch=True),
        PassOption("include_first", False, "also sparsify the first layer(s) (those reading the raw input)", is_switch=True),
        PassOption("include_last", False, "also sparsify the last layer(s) (classifier / box heads)", is_switch=True),
        PassOption("exclude", None, "leave layers whose node or weight name matches this regex dense", regex, metavar="REGEX"),
        PassOption(
            "recovery",
            "auto",
            "after masking: obs (SparseGPT mask choice + least-squares refit of kept weights and bias), none; auto = obs with --calib",
            str,
            choices=RECOVERY,
        ),
        PassOption(
            "mask_search",
            "exactobs",
            "with obs recovery, how the mask is chosen: exactobs (one weight at a time per row with the inverse Hessian updated; for a sparsity target rows share the zeros by cost, for N:M each group of M closes once it has lost M-N; layers beyond a compute budget fall back to sparsegpt), sparsegpt (column blocks, faster)",
            str,
            choices=("exactobs", "sparsegpt"),
        ),
        PassOption(
            "relu_steps",
            1,
            "with obs recovery: extra refits of each conv read only through a Relu, fitting the output after the Relu "
            "(values the Relu zeroes need not be matched); each step is one more solve, on the stage's activations kept in memory "
            "(or one more pass over the calibration data when they exceed 1 GB); 0 = off",
            non_negative_int,
            metavar="N",
        ),
        PassOption("samples", 128, f"calibration samples for reconstruction (and up to {SENSITIVITY_SAMPLES} of them for the "
                   f"sensitivity curves: fewer, at least {MIN_MEASURE_SAMPLES}, on models whose curves would cost over "
                   f"{MEASURE_BUDGET_MACS:.0e} multiply-adds)", positive_int, metavar="N"),
        PassOption("max_layer_sparsity", MAX_LAYER_SPARSITY, "global / sensitivity modes: most any one layer may lose", check_sparsity, metavar="S"),
        PassOption("masks", None, "start from these masks (.npz from --export-masks): their zeros stay zero (iterative pruning)", _masks_option, metavar="FILE"),
        PassOption("recipe", None, "JSON {\"layers\": {NODE: sparsity}} (e.g. from analyze --recipe-out): per-layer sparsities", str, metavar="FILE"),
        PassOption("export_masks", None, "write the keep-masks (.npz keyed by weight initializer name)", str, metavar="FILE", aliases=("--export-masks",)),
        PassOption(
            "storage",
            "dense",
            "sparse: store weights as ONNX sparse_initializer where that is smaller (below ~1/3 density); dense: plain",
            str,
            choices=("dense", "sparse"),
        ),
    )
    demo_options = {"sparsity": 0.5}

    def validate(self) -> None:
        config = self.config
        self.layer_sparsity: Dict[str, float] = {}
        if config["recipe"]:
            self._load_recipe(config["recipe"])
        if config["mode"] not in ("auto", "uniform") and config["sparsity"] is None:
            raise UserError(f"sparsify: --sparsity-mode {config['mode']} needs --sparsity S (the overall target)")
        given = [config["sparsity"] is not None, config["nm"] is not None, bool(self.layer_sparsity)]
        if not any(given):
            raise UserError("sparsify: give --sparsity S, --nm N:M or --sparsify-recipe FILE")
        if config["sparsity"] is not None and config["nm"] is not None:
            raise UserError("sparsify: --sparsity and --nm are alternatives (2:4 already means 50%); give one")
        if config["normalize"] and config["mode"] != "global":
            raise UserError("sparsify: --sparsify-normalize applies to --sparsity-mode global only")

    def _load_recipe(self, path: str) -> None:
        layers = read_json_object(path, "--sparsify-recipe").get("layers")
        if not isinstance(layers, dict) or not layers:
            raise UserError(f"--sparsify-recipe {path}: expected {{\"layers\": {{NODE: sparsity, ...}}}}")
        for name, value in layers.items():
            try:
                self.layer_sparsity[str(name)] = check_sparsity(value)
            except (TypeError, ValueError) as exc:
                raise UserError(f"--sparsify-recipe {path}: layers[{name!r}]: {exc}")

    # ------------------------------------------------------------------------------------------
    def run(self, model: Model, context: PassContext) -> PassReport:
        from onnxslim_cv import storage
        from onnxslim_cv.report import human_bytes
        from onnxslim_cv.passes.fold import fold_first

        report = PassReport(self.name, options=dict(self.config))
        config = self.config
        data = context.calibration.limited(config["samples"]) if context.calibration is not None else None
        recovery = config["recovery"]
        if recovery == "auto":
            recovery = "obs" if data is not None else "none"
        if recovery == "obs" and data is None:
            raise UserError("sparsify: --sparsify-recovery obs needs calibration data (--calib)")
        mode = config["mode"]
        if mode == "auto":
            # the measured allocation only pays with the refit it was measured with
            mode = "hessian" if recovery == "obs" and config["sparsity"] else "uniform"
        if mode in ("sensitivity", "hessian") and data is None:
            raise UserError(f"sparsify: --sparsity-mode {mode} needs calibration data (--calib)")

        fold_first(model, context, report, "masks then hold for the deployed weights")
        renamed = name_nodes(model.graph)  # masks, recipes and the refit address layers by node name
        if renamed:
            report.notes.append(f"named {renamed} unnamed nodes")
        report.details["deflate_bytes_before"] = storage.deflate_size(model)
        layers, skipped = sparsifiable_layers(
            model,
            include_depthwise=config["include_depthwise"],
            include_first=config["include_first"],
            include_last=config["include_last"],
        )
        if config["exclude"]:
            pattern = re.compile(config["exclude"])
            for layer in list(layers):
                if pattern.search(layer.node) or pattern.search(layer.weight):
                    skipped[layer.node] = f"excluded by --sparsify-exclude {config['exclude']}"
                    layers.remove(layer)
        nm = config["nm"]
        if nm is not None:
            for layer in list(layers):
                reason = nm_eligible(layer, nm[1])
                if reason:
                    skipped[layer.node] = f"no {nm[0]}:{nm[1]} pattern: {reason}"
                    layers.remove(layer)
        if self.layer_sparsity:
            known = {layer.node for layer in layers}
            unknown = sorted(set(self.layer_sparsity) - known)
            if unknown:
                reason = skipped.get(unknown[0], "not a sparsifiable layer of this model")
                raise UserError(f"sparsify recipe: layer {unknown[0]!r}: {reason}")
            layers = [layer for layer in layers if layer.node in self.layer_sparsity]
        if not layers:
            report.warn("sparsify: no layer to sparsify (" + "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3]) + ")")
            report.details["skipped"] = skipped
            return report

        start_masks = self._start_masks(model)
        targets = self._targets(model, layers, mode, context, report)
        fits = [
            obs.LayerFit(
                layer,
                sparsity=targets.get(layer.node, 0.0),
                nm=nm,
                keep_zeros=start_masks.get(layer.weight),
                exact_obs=config["mask_search"] == "exactobs",
            )
            for layer in layers
        ]
        if recovery == "obs":
            for fit in fits:
                fit.skipped = obs.refittable(fit.layer)
            refit = [fit for fit in fits if not fit.skipped]
            original = model.copy()
            with _bar(context, len(refit), "sparsify: reconstruct", "layer") as bar:
                obs.reconstruct_layers(original, model, refit, data, seed=context.seed, relu_steps=config["relu_steps"],
                                       progress=bar)
            for fit in fits:
                if fit.skipped:  # not refittable, or no rows: magnitude only
                    self._magnitude(model, fit)
        else:
            for fit in fits:
                self._magnitude(model, fit)

        masks = {fit.layer.weight: fit.result_mask for fit in fits if fit.result_mask is not None}
        if config["export_masks"]:
            from onnxslim_cv.masks import save_masks

            save_masks(masks, config["export_masks"])
            report.notes.append(f"masks of {len(masks)} weights written to {config['export_masks']}")
        if config["storage"] == "sparse":
            model.annotations["sparse_storage"] = True
        self._fill_report(report, model, fits, skipped, recovery, nm, masks)
        report.details["deflate_bytes_after"] = storage.deflate_size(model)
        report.notes.append(
            f"compressed (deflate) size {human_bytes(report.details['deflate_bytes_before'])} -> {human_bytes(report.details['deflate_bytes_after'])}"
        )
        report.notes.append("dense runtimes (onnxruntime CPU included) do not run unstructured zeros faster: the gain is file size, or sparse kernels elsewhere")
        return report

    # ------------------------------------------------------------------------------------------
    def _start_masks(self, model: Model) -> Dict[str, np.ndarray]:
        masks = self.config["masks"]
        if masks is None:
            return {}
        from onnxslim_cv.masks import check_masks, load_masks

        if not isinstance(masks, dict):
            masks = load_masks(masks)
        check_masks(model, masks)
        return masks

    def _targets(self, model: Model, layers: List[SparseLayer], mode: str, context: PassContext,
                 report: PassReport) -> Dict[str, float]:
        config = self.config
        if self.layer_sparsity:
            return {layer.node: self.layer_sparsity[layer.node] for layer in layers}
        if config["nm"] is not None:
            return {}
        sparsity = config["sparsity"]
        if mode == "uniform" or sparsity == 0:
            return {layer.node: sparsity for layer in layers}
        cap = config["max_layer_sparsity"]
        if mode == "global":
            result = global_sparsities(layers, layer_weights(model, layers), sparsity, normalize=config["normalize"])
            capped = {name: min(value, cap) for name, value in result.items()}
            if capped != result:
                report.notes.append(f"global threshold capped at {cap:.0%} per layer; overall sparsity is below the target")
            return capped
        from onnxslim_cv import sensitivity

        levels = sorted({round(x, 3) for x in (0.25, 0.5, 0.7, 0.8, 0.9, cap, sparsity)})
        levels = [level for level in levels if 0 < level <= cap]
        weights_at = None
        if mode == "hessian":
            fits = {layer.weight: obs.LayerFit(layer, exact_obs=config["mask_search"] == "exactobs")
                    for layer in layers if not obs.refittable(layer)}
            with _bar(context, len(layers), "sparsify: layer statistics", "layer") as bar:
                obs.collect_statistics(model, list(fits.values()), context.calibration.limited(config["samples"]),
                                       seed=context.seed, progress=bar)

            def refit_at(layer, weight, levels):
                if layer.weight not in fits:  # magnitude only, like the pass will do
                    return sensitivity.masked_weights(weight, levels)
                return obs.refit_weights(fits[layer.weight], weight, levels)

            weights_at = refit_at

        samples, per_sample = sensitivity.affordable_samples(model, layers, len(levels), SENSITIVITY_SAMPLES,
                                                             context.calibration)
        note = sensitivity.budget_note(samples, SENSITIVITY_SAMPLES, per_sample, f"every layer's suffix x {len(levels)} levels",
                                       context.calibration)
        if note:
            report.notes.append(f"--sparsity-mode {mode}: {note}; --sparsity-mode uniform skips the curves")
        data = context.calibration.limited(samples)
        measured = model.copy()  # a classifier's curves on its logits (see strip_output_softmax)
        on_logits = strip_output_softmax(measured)
        with _bar(context, len(layers), "sparsify: sensitivity", "layer") as bar:
            curves = sensitivity.analyze_layers(measured, data, sparsities=levels, layers=layers, progress=bar,
                                                weights_at=weights_at, samples=samples)
        allocation = sensitivity.allocate(curves, target=sparsity, metric="cosine", cost="params", max_level=cap)
        report.details["sensitivity"] = [curve.to_dict() for curve in curves]
        result = {layer.node: float(allocation.get(layer.node, 0.0)) for layer in layers}
        report.notes.append(
            f"--sparsity-mode {mode}: per-layer sparsity {min(result.values()):.0%}..{max(result.values()):.0%} "
            f"for {sparsity:.0%} overall, equal output loss per layer (cosine{' of the logits' if on_logits else ''}, "
            f"{sensitivity.samples_text(data, samples)})"
        )
        return result

    def _magnitude(self, model: Model, fit: obs.LayerFit) -> None:
        node = next(n for n in model.graph.nodes if n.name == fit.layer.node)
        weight = np.asarray(node.inputs[1].values)
        if fit.nm is not None:
            keep = nm_mask(fit.layer, weight, *fit.nm)
        else:
            keep = magnitude_mask(np.where(fit.keep_zeros, weight, 0.0) if fit.keep_zeros is not None else weight, fit.sparsity)
        if fit.keep_zeros is not None:
            keep &= fit.keep_zeros
        replace_constant_values(model.graph, node, 1, np.where(keep, weight, 0).astype(weight.dtype))
        fit.result_mask = keep

    def _fill_report(self, report, model, fits, skipped, recovery, nm, masks) -> None:
        rows = []
        zeros = total = 0
        for fit in fits:
            mask = fit.result_mask
            layer_zeros = int(mask.size - np.count_nonzero(mask)) if mask is not None else 0
            zeros += layer_zeros
            total += fit.layer.params
            rows.append({
                "node": fit.layer.node,
                "op": fit.layer.op,
                "weight": fit.layer.weight,
                "params": fit.layer.params,
                "target": None if nm else round(fit.sparsity, 4),
                "sparsity": round(layer_zeros / max(1, fit.layer.params), 4),
                "error_magnitude": None if np.isnan(fit.error_magnitude) else round(fit.error_magnitude, 6),
                "error": None if np.isnan(fit.error) else round(fit.error, 6),
                "relu_refits": fit.relu_refits,
                "note": fit.skipped,
            })
        all_weights = sum(int(np.asarray(t.values).size) for t in model.constants() if np.asarray(t.values).dtype.kind == "f" and np.asarray(t.values).ndim >= 2)
        report.details["layers"] = rows
        report.details["skipped"] = skipped
        report.details["sparsity_of_sparsified_layers"] = round(zeros / max(1, total), 4)
        report.details["sparsity_of_all_weights"] = round(zeros / max(1, all_weights), 4)
        report.count("layers sparsified", len(fits))
        report.count("weights zeroed", zeros)
        pattern = f"{nm[0]}:{nm[1]}" if nm else f"{zeros / max(1, total):.1%}"
        report.notes.append(
            f"{len(fits)} layers at {pattern} ({zeros:,} of {total:,} weights), {len(skipped)} left dense; "
            f"recovery: {'OBS refit on calibration data, masks by ' + self.config['mask_search'] if recovery == 'obs' else 'none (magnitude only)'}"
        )
        relu = [f for f in fits if f.relu_refits]
        if relu:
            report.notes.append(f"{len(relu)} layers read only through a Relu refit {relu[0].relu_refits} more time(s) "
                                "to the output after the Relu (their error below is that one)")
        refit = [f for f in fits if not np.isnan(f.error)]
        if refit:
            before = float(np.mean([f.error_magnitude for f in refit]))
            after = float(np.mean([f.error for f in refit]))
            report.notes.append(f"mean relative layer output error: {before:.4f} with magnitude masks -> {after:.4f} after reconstruction")


def sparsify_iteratively(
    model: Union[Model, Any],
    schedule: Sequence[float],
    callback: Optional[Callable[[int, Model, Dict[str, np.ndarray]], Optional[Model]]] = None,
    *,
    context: Optional[PassContext] = None,
    **options: Any,
) -> Tuple[Model, Dict[str, np.ndarray], List[PassReport]]:
    """Prune in steps (e.g. ``[0.3, 0.5, 0.7]``), calling ``callback`` between steps.

    ``callback(step, model, masks)`` is where a conversion script fine-tunes in its own
    framework (export, train with the masks applied, re-import): it returns the updated model
    (or None to continue with the given one). Each step keeps every earlier zero (the masks
    only shrink) and the masks are re-applied to whatever the callback returns, so a
    fine-tuning step that regrew pruned weights cannot undo them. Returns the final model, its
    masks (keyed by weight initializer name) and one report per step.
    """
    from onnxslim_cv.masks import apply_masks
    from onnxslim_cv.model_io import load_model

    current = load_model(model)
    masks: Dict[str, np.ndarray] = {}
    reports: List[PassReport] = []
    for step, sparsity in enumerate(schedule):
        step_options = dict(options, sparsity=sparsity)
        if masks:
            step_options["masks"] = masks
        current, report = SparsifyPass(**step_options)(current, context)
        masks = _masks_of(current, report)
        reports.append(report)
        if callback is not None:
            returned = callback(step, current, masks)
            if returned is not None:
                current = load_model(returned)
                apply_masks(current, masks)
    return current, masks, reports


def _masks_of(model: Model, report: PassReport) -> Dict[str, np.ndarray]:
    tensors = model.tensors()
    return {row["weight"]: np.asarray(tensors[row["weight"]].values) != 0 for row in report.details.get("layers", [])}
