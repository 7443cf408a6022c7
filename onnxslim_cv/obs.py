"""Calibrated reconstruction of sparse layers from their Hessian (OBS / SparseGPT style).

Zeroing weights by magnitude alone ignores what the layer's inputs look like; a layer's output
error for a weight change ``dW`` is ``dW H dW^T`` with ``H = X^T X`` (the layer Hessian of the
squared output error, Hassibi & Stork, "Optimal Brain Surgeon", 1993). Given ``H`` the kept
weights can absorb much of what the zeroed ones did.

For each layer this module accumulates, streaming over calibration batches:

- ``G = X'^T X'`` over the layer's inputs ``X'`` in the *sparsified* model (layers are done in
  dependency order, so later layers also correct the error of earlier ones), with a constant
  column so the bias is refit too;
- ``C = X'^T Y`` with ``Y = X W^T`` the *original* layer's output on the original model's
  inputs ``X``; for a conv added to a shortcut, ``Y`` also gets the shortcut's drift
  ``S - S'`` (original minus current), so the layer restores the residual sum the next block
  reads rather than only its own output.

The dense least-squares optimum ``W* = (G + lam)^-1 (C + lam W)`` is the reference; then the
mask is chosen and the kept weights refit against ``W*`` in the metric ``G``:

1. the mask: the caller's (magnitude, N:M, or user masks), or chosen by OBS saliency
   ``w^2 / [H^-1]_jj``. For a sparsity target on a layer small enough (:data:`EXACT_OBS_BUDGET`)
   each row is pruned greedily one weight at a time with ``H^-1`` updated after every removal
   (ExactOBS: Frantar, Singh & Alistarh, "Optimal Brain Compression", NeurIPS 2022), and
   rows take more or fewer zeros by their removal costs; for N:M the same greedy closes a
   group of M once it has lost M - N; otherwise column block by column block with the
   SparseGPT sweep (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be
   Accurately Pruned in One-Shot", ICML 2023), which updates the not-yet-visited columns
   after each pruned one;
2. the kept weights: the exact masked least-squares solution of every row, ``w_S =
   H_SS^-1 (H w*)_S``, solved batched when it fits in memory, else the sweep's weights.

A 2-D conv read only through a Relu (``relu_steps``, sequential mode) is then refit again, once
per step, to a target that only asks for what survives the Relu: where the original
pre-activation is negative, the current one need only stay at or below zero
(:func:`_relu_majorizer_target`, a majorize-minimize step on the error after the Relu). Each
step reads the stage's tapped activations again, from memory up to :data:`STAGE_CACHE_BYTES`
(else from one more pass over the calibration data), and reuses the layer's Hessian factor.

Memory: two ``D x D``-sized matrices per layer (``D`` = input channels x kernel area),
whatever the number of samples, plus one stage's activations for its Relu steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx_graphsurgeon as gs

from . import activations, runtime
from .graph_utils import replace_constant_values, sole_consumer
from .ir import Model
from .reconstruct import _add_bias_after, _set_bias, _stages, conv_patches, output_positions, stage_levels
from .sparsity import SparseLayer, as_matrix, from_matrix, group_rows, nm_mask_matrix

BLOCK = 128  # SparseGPT column block (mask chosen per block, lazy updates between blocks)
DAMP = 1e-3
"""Ridge towards the original weights, as a fraction of the mean Hessian diagonal (plus
``D / rows``). SparseGPT uses 1e-2 with far more rows than columns; with 32k rows for a few
hundred columns 1e-3 kept 0.4-1.9 points more top-1 on ResNet-20 and SqueezeNet at 50%."""
EXACT_BUDGET = 1 << 27  # float64 elements allowed for the batched per-row exact solve (~1 GB)
EXACT_OBS_BUDGET = 4e10
"""Multiply-adds (rows x D x steps^2 / 2) allowed for the row-wise greedy; larger layers use the
SparseGPT sweep. SqueezeNet's largest layer (256 rows x 577, 462 steps) takes 1.6e10, about 6 s here.
On SqueezeNet's layers at 50% the greedy's output error is 0.2-0.8x the sweep's."""
EXACT_OBS_SPAN = 1.6
"""Each row's greedy runs to this multiple of the layer's sparsity, so a row may take up to that
many zeros when its removals are cheaper than other rows' (a fixed count per row gave 1.5x the
error on SqueezeNet's 16-input convs)."""
V_BYTES = 1 << 28  # memory for the greedy's low-rank downdates of H^-1 (rows are done in chunks)


@dataclass
class LayerFit:
    """One layer's statistics and the result of its refit."""

    layer: SparseLayer
    sparsity: float = 0.0  # wanted fraction of zeros (ignored when ``nm`` or ``mask`` is set)
    nm: Optional[Tuple[int, int]] = None
    mask: Optional[np.ndarray] = None  # fixed keep-mask in the weight's shape
    keep_zeros: Optional[np.ndarray] = None  # keep-mask whose False entries must stay zero
    exact_obs: bool = True  # the mask (sparsity target or N:M) by ExactOBS where affordable (else the SparseGPT sweep)
    gram_only: bool = False  # statistics of the original inputs alone: no target, cross term or energy
    gram: Optional[np.ndarray] = None  # [G, D+b, D+b]
    cross: Optional[np.ndarray] = None  # [G, D+b, rows_per_group]
    energy: Optional[np.ndarray] = None  # [G] target energy
    rows: int = 0
    error_magnitude: float = float("nan")  # relative output error, plain magnitude mask, no refit
    error: float = float("nan")  # relative output error after the refit
    skipped: Optional[str] = None
    relu_refits: int = 0  # refits to the output after the layer's Relu (``error`` then measures that bound)
    result_mask: Optional[np.ndarray] = field(default=None, repr=False)
    _pending: list = field(default_factory=list, repr=False)
    _pending_drift: list = field(default_factory=list, repr=False)
    _pending_rows: int = 0
    _relu_point: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default=None, repr=False)
    _traces: dict = field(default_factory=dict, repr=False)  # ExactOBS traces by (group, ridge, weights)
    _solved: dict = field(default_factory=dict, repr=False)  # solve()'s cache from a layer's first solve to its Relu steps


def refittable(layer: SparseLayer) -> Optional[str]:
    """None if the layer can be refit here, else why not (it is then magnitude-pruned)."""
    if layer.op in ("Conv", "ConvTranspose") and len(layer.shape) != 4:
        return f"{len(layer.shape) - 2}-D {layer.op}: magnitude only (the refit handles 2-D convs)"
    return None


def has_bias_column(layer: SparseLayer) -> bool:
    # a ConvTranspose row is one output tap, not one output channel: its bias is not per row
    return layer.op != "ConvTranspose"


def _conv_positions(layer: SparseLayer, total: int, batch: int, rng, positions_per_sample: int) -> np.ndarray:
    """The flat output positions a conv's rows are sampled at (the same ``rng`` state, the same positions)."""
    kernel = layer.shape[2:]
    budget = max(1, min(positions_per_sample, (1 << 22) // max(1, layer.shape[1] * kernel[0] * kernel[1] * batch)))
    return np.sort(rng.choice(total, size=min(total, budget), replace=False))


def layer_rows(layer: SparseLayer, node: gs.Node, x: np.ndarray, rng, positions_per_sample: int) -> List[np.ndarray]:
    """Design rows ``[n, D]`` of each group, in the column order of :func:`sparsity.as_matrix`."""
    x = np.asarray(x, dtype=np.float32)
    if layer.op == "Conv":
        kernel = tuple(layer.shape[2:])
        if len(kernel) != 2:
            raise ValueError("only 2-D convs are refit")
        total = output_positions(node, x.shape, kernel)
        cin_g = layer.shape[1]
        positions = _conv_positions(layer, total, x.shape[0], rng, positions_per_sample)
        result = []
        for g in range(layer.groups):
            patches = conv_patches(x[:, g * cin_g:(g + 1) * cin_g], node, kernel, positions)
            patches = patches.reshape(-1, cin_g, kernel[0] * kernel[1]).transpose(0, 2, 1).reshape(patches.shape[0], -1)
            result.append(patches)
        return result
    if layer.op == "ConvTranspose":
        cin_g = layer.shape[0] // layer.groups
        pixels = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
        if pixels.shape[0] > positions_per_sample * x.shape[0]:
            pixels = pixels[np.sort(rng.choice(pixels.shape[0], positions_per_sample * x.shape[0], replace=False))]
        return [pixels[:, g * cin_g:(g + 1) * cin_g] for g in range(layer.groups)]
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > 4096:
        rows = rows[np.sort(rng.choice(rows.shape[0], 4096, replace=False))]
    return [rows]


FLUSH_ROWS = 8192  # rows gathered before one BLAS call (batch-1 exports give 256 rows per run)


def accumulate(fit: LayerFit, node: gs.Node, x_orig: np.ndarray, x_new: np.ndarray, seed: int, positions_per_sample: int,
               drift: Optional[np.ndarray] = None) -> None:
    """Add one batch to the layer's ``G`` and ``C`` (the same positions in both models).

    ``drift``: the original minus the current value of the residual partner (``[N, Cout, H, W]``),
    added to the target so that the layer also absorbs the shortcut's error."""
    rows_new = layer_rows(fit.layer, node, x_new, np.random.default_rng(seed), positions_per_sample)
    rows_orig = rows_new if fit.gram_only else layer_rows(fit.layer, node, x_orig, np.random.default_rng(seed), positions_per_sample)
    if drift is not None:  # a 2-D conv's output positions, sampled as its rows were
        total = output_positions(node, np.asarray(x_new).shape, tuple(fit.layer.shape[2:]))
        positions = _conv_positions(fit.layer, total, x_new.shape[0], np.random.default_rng(seed), positions_per_sample)
        flat = np.asarray(drift, dtype=np.float32).reshape(drift.shape[0], drift.shape[1], -1)[:, :, positions]
        fit._pending_drift.append(flat.transpose(0, 2, 1).reshape(-1, drift.shape[1]))
    fit._pending.append((rows_orig, rows_new))
    fit._pending_rows += rows_new[0].shape[0]
    fit.rows += rows_new[0].shape[0]
    if fit._pending_rows >= FLUSH_ROWS:
        flush(fit, node)


def flush(fit: LayerFit, node: gs.Node) -> None:
    """Fold the gathered rows into ``G`` and ``C`` (large matrix products are far faster)."""
    if not fit._pending:
        return
    matrix = as_matrix(fit.layer, np.asarray(node.inputs[1].values)).astype(np.float32)
    bias = has_bias_column(fit.layer)
    groups = group_rows(fit.layer)
    for g, row_index in enumerate(groups):
        design = np.concatenate([pair[1][g] for pair in fit._pending])
        if bias:
            design = np.concatenate([design, np.ones((design.shape[0], 1), design.dtype)], axis=1)
        if fit.gram_only:  # channel_obs reads the covariance only
            if fit.gram is None:
                fit.gram = np.zeros((len(groups), design.shape[1], design.shape[1]))
            fit.gram[g] += design.T @ design
            continue
        original = np.concatenate([pair[0][g] for pair in fit._pending])
        target = original @ matrix[row_index].T
        if fit._pending_drift:
            target = target + np.concatenate(fit._pending_drift)[:, row_index]
        if fit._relu_point is not None:
            target = _relu_majorizer_target(fit._relu_point, row_index, target, design, bias)
        if fit.gram is None:
            fit.gram = np.zeros((len(groups), design.shape[1], design.shape[1]))
            fit.cross = np.zeros((len(groups), design.shape[1], target.shape[1]))
            fit.energy = np.zeros(len(groups))
        if fit._relu_point is None:  # a Relu step sees the same rows again: its Hessian is kept
            fit.gram[g] += design.T @ design
        fit.cross[g] += design.T @ target
        fit.energy[g] += float(np.square(target, dtype=np.float64).sum())
    fit._pending = []
    fit._pending_drift = []
    fit._pending_rows = 0


def _relu_majorizer_target(point, row_index, target, design, bias_column: bool) -> np.ndarray:
    """The fit's target for a layer read only through a ReLU, from the current weights.

    ``z`` is the original pre-activation, ``u`` the current one (the last solve's weights on the
    current inputs). The target is ``t = z`` where ``z >= 0`` and ``t = min(u, 0)`` where
    ``z < 0``: then ``(relu(u') - relu(z))^2 <= (u' - t)^2`` for every ``u'``, with equality at
    ``u' = u`` except where ``z >= 0 > u`` (there the bound is kept loose so that the fit still
    pulls those values up). Refitting to ``t`` is a majorize-minimize step on the error after the
    ReLU: the kept weights stop spending effort on matching negative values the ReLU zeroes.
    """
    original_bias, current, current_bias = point
    b = original_bias[row_index]
    columns = design[:, :-1] if bias_column else design
    u = columns @ current[row_index].T + current_bias[row_index]
    return np.where(target + b >= 0, target, np.minimum(u, 0.0) - b)


def _dampened(gram: np.ndarray, damp: float) -> np.ndarray:
    h = gram.copy()
    diag = np.diagonal(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    mean = float(diag[~dead].mean()) if (~dead).any() else 1.0
    h[np.diag_indices_from(h)] += damp * mean
    return h


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """``U`` upper triangular with ``H^-1 = U^T U`` (the SparseGPT sweep's view of ``H^-1``)."""
    inverse = np.linalg.inv(h)
    inverse = (inverse + inverse.T) / 2
    return np.linalg.cholesky(inverse).T


def sparsegpt_sweep(
    w: np.ndarray,
    h: np.ndarray,
    *,
    sparsity: float = 0.0,
    nm: Optional[Tuple[int, int]] = None,
    mask: Optional[np.ndarray] = None,
    forced_zero: Optional[np.ndarray] = None,
    prunable: Optional[np.ndarray] = None,
    block: int = BLOCK,
    u: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Prune rows of ``w`` ``[rows, D]`` in the metric ``h`` ``[D, D]``; returns (weights, keep-mask).

    ``mask`` fixes the keep-mask; otherwise it is chosen by OBS saliency ``w^2 / [U]_jj^2``
    per column block (``sparsity`` of each block's prunable entries) or per N:M group.
    ``forced_zero`` entries are zeroed whatever their saliency (and count towards the
    sparsity); ``prunable`` (bool ``[D]``) marks columns that may be zeroed at all (not the
    bias column). ``u``: :func:`_upper_cholesky_of_inverse` of ``h`` when the caller has it.
    """
    w = np.array(w, dtype=np.float64)
    rows, dim = w.shape
    prunable = np.ones(dim, dtype=bool) if prunable is None else prunable
    forced = np.zeros_like(w, dtype=bool) if forced_zero is None else forced_zero.astype(bool)
    u = _upper_cholesky_of_inverse(h) if u is None else u
    diag = np.diag(u)
    keep = np.ones_like(w, dtype=bool) if mask is None else mask.astype(bool).copy()
    for start in range(0, dim, block):
        stop = min(start + block, dim)
        w1 = w[:, start:stop].copy()
        u1 = u[start:stop, start:stop]
        errors = np.zeros_like(w1)
        if mask is None and nm is None and sparsity > 0:
            columns = start + np.flatnonzero(prunable[start:stop])
            saliency = np.square(w[:, columns]) / np.square(diag[columns])[None, :]
            saliency[forced[:, columns]] = -1.0
            zeros = int(round(sparsity * saliency.size))
            if zeros:
                order = np.argsort(saliency.reshape(-1), kind="stable")[:zeros]
                block_keep = np.ones(saliency.size, dtype=bool)
                block_keep[order] = False
                keep[:, columns] = block_keep.reshape(saliency.shape)
        if mask is None and nm is not None:
            for column in range(-(-start // nm[1]) * nm[1], stop, nm[1]):  # groups starting in this block
                if column + nm[1] > dim or not prunable[column:column + nm[1]].all():
                    continue
                span = w[:, column:column + nm[1]]  # the weights as earlier blocks' updates left them
                scores = np.square(span) / np.square(diag[column:column + nm[1]])[None, :]
                scores[forced[:, column:column + nm[1]]] = -1.0
                keep[:, column:column + nm[1]] = nm_mask_matrix(span, nm[0], nm[1], scores=scores)
        keep[:, start:stop] &= ~forced[:, start:stop]
        for i in range(stop - start):
            column = start + i
            value = w1[:, i]
            pruned = np.where(keep[:, column], value, 0.0)
            error = (value - pruned) / u1[i, i]
            w1[:, i:] -= np.outer(error, u1[i, i:])
            w1[:, i] = pruned
            errors[:, i] = error
        w[:, start:stop] = w1
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return w, keep


def exact_obs_traces(w_star: np.ndarray, h: np.ndarray, prunable: np.ndarray, steps: int,
                     forced: Optional[np.ndarray] = None,
                     nm: Optional[Tuple[int, int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Each row's greedy OBS removal order and the cost of each removal, ``steps`` deep.

    Removing weight ``j`` with the rest refit optimally costs ``w_j^2 / [H^-1]_jj`` in the
    metric ``H``; after it ``H^-1`` loses row and column ``j`` (a rank-1 downdate) and the other
    weights move by ``-w_j / [H^-1]_jj  H^-1[:, j]`` (Hassibi & Stork 1993; applied row by row
    as in Frantar, Singh & Alistarh, "Optimal Brain Compression", NeurIPS 2022). The downdates
    are kept as vectors ``v`` with ``H^-1 = H0^-1 - sum v v^T`` rather than applied to a
    ``D x D`` matrix per row: a step costs ``O(D t)``, not ``O(D^2)``. ``forced`` entries go
    first (cost -inf). With ``nm = (N, M)`` a group of M columns (``[kM, kM + M)``, as
    :func:`~onnxslim_cv.sparsity.nm_mask_matrix`) stops taking removals once it has lost M - N,
    the N:M form of the greedy in the same paper; columns outside complete prunable groups are
    never removed. Returns (orders ``[rows, steps]``, costs ``[rows, steps]``).
    """
    rows, dim = w_star.shape
    dtype = np.float32
    hinv = np.linalg.inv(h)
    hinv = ((hinv + hinv.T) / 2).astype(dtype)
    diag = np.diag(hinv).copy()
    floor = float(diag.max()) * 1e-7
    orders = np.zeros((rows, steps), dtype=np.int64)
    costs = np.zeros((rows, steps))
    chunk = int(max(1, min(rows, V_BYTES // max(1, 4 * steps * dim))))
    if nm is not None:
        keep_n, m = nm
        complete = _complete_groups(prunable, m)
        prunable = prunable & np.concatenate([np.repeat(complete, m), np.zeros(dim - complete.size * m, dtype=bool)])
        span = np.arange(m)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        n = stop - start
        index = np.arange(n)
        w = w_star[start:stop].astype(dtype)
        d = np.broadcast_to(diag, (n, dim)).copy()
        out = np.broadcast_to(~prunable, (n, dim)).copy()  # removed, or never removable
        must = np.zeros((n, dim), dtype=bool) if forced is None else forced[start:stop] & prunable[None, :]
        downdates = np.zeros((n, steps, dim), dtype=dtype)
        removed = np.zeros((n, max(1, dim // m)), dtype=np.int64) if nm is not None else None
        for t in range(steps):
            saliency = w * w / d
            saliency[must] = -np.inf
            saliency[out] = np.inf
            j = saliency.argmin(axis=1)
            orders[start:stop, t] = j
            costs[start:stop, t] = saliency[index, j]
            column = hinv[j] - np.matmul(downdates[index, :t, j][:, None, :], downdates[:, :t, :])[:, 0, :]
            pivot = np.maximum(d[index, j], floor)
            w -= (w[index, j] / pivot)[:, None] * column
            w[index, j] = 0
            v = column / np.sqrt(pivot)[:, None]
            downdates[:, t, :] = v
            d = np.maximum(d - v * v, floor)
            out[index, j] = True
            must[index, j] = False
            if removed is not None:  # a group that has lost M - N weights is closed
                group = j // m
                removed[index, group] += 1
                closed = np.flatnonzero(removed[index, group] >= m - keep_n)
                out[closed[:, None], group[closed][:, None] * m + span[None, :]] = True
    return orders, costs


def keep_from_traces(orders: np.ndarray, costs: np.ndarray, shape: Tuple[int, int], zeros: int) -> np.ndarray:
    """The keep-mask removing ``zeros`` weights in all: the cheapest removals over all rows.

    Within a row removals are taken in greedy order (a prefix of ``orders``): costs are made
    non-decreasing along each row first (a running maximum) so a global threshold picks prefixes.
    """
    rows, steps = orders.shape
    ordered = np.maximum.accumulate(costs, axis=1)
    zeros = int(min(max(zeros, int(np.isneginf(costs).sum())), ordered.size))
    chosen = np.argsort(ordered.reshape(-1), kind="stable")[:zeros]
    counts = np.bincount(chosen // steps, minlength=rows)
    keep = np.ones(shape, dtype=bool)
    for r in np.flatnonzero(counts):
        keep[r, orders[r, :counts[r]]] = False
    return keep


def _exact_obs_keep(fit: LayerFit, key: tuple, w_star: np.ndarray, h: np.ndarray, prunable: np.ndarray,
                    forced: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """ExactOBS keep-mask of one group at ``fit.sparsity``, or None when the layer is too large.

    Traces are cached on the fit (``key``: group, ridge and weights), so the sensitivity curves'
    several sparsities of one layer cost one greedy run."""
    rows, dim = w_star.shape
    candidates = int(prunable.sum())
    steps = min(candidates, int(math.ceil(min(1.0, EXACT_OBS_SPAN * fit.sparsity) * candidates)))
    if forced is not None:
        steps = max(steps, int((forced & prunable[None, :]).sum(axis=1).max()))
    if steps == 0 or rows * dim * steps * steps / 2 > EXACT_OBS_BUDGET:
        return None
    cached = fit._traces.get(key)
    if cached is None or cached[0].shape[1] < steps:
        fit._traces[key] = exact_obs_traces(w_star, h, prunable, steps, forced)
        cached = fit._traces[key]
    orders, costs = cached
    return keep_from_traces(orders, costs, w_star.shape, int(round(fit.sparsity * rows * candidates)))


def _complete_groups(prunable: np.ndarray, m: int) -> np.ndarray:
    """Which groups ``[kM, kM + M)`` of the columns lie whole inside the matrix and are all prunable."""
    whole = prunable[:(prunable.size // m) * m]
    return whole.reshape(-1, m).all(axis=1)


def _exact_obs_nm_keep(w_star: np.ndarray, h: np.ndarray, prunable: np.ndarray,
                       nm: Tuple[int, int]) -> Optional[np.ndarray]:
    """ExactOBS N:M keep-mask of one group, or None when the layer is too large for the greedy."""
    rows, dim = w_star.shape
    keep_n, m = nm
    steps = int(_complete_groups(prunable, m).sum()) * (m - keep_n)
    if steps == 0 or rows * dim * steps * steps / 2 > EXACT_OBS_BUDGET:
        return None
    orders, _ = exact_obs_traces(w_star, h, prunable, steps, nm=nm)
    keep = np.ones(w_star.shape, dtype=bool)
    keep[np.arange(rows)[:, None], orders] = False
    return keep


def exact_refit(w_star: np.ndarray, h: np.ndarray, keep: np.ndarray) -> Optional[np.ndarray]:
    """Row-wise optimum of ``(w - w*) H (w - w*)^T`` with ``w`` zero outside ``keep``.

    Rows with the same number of kept columns are solved together (``np.linalg.solve`` on a
    stack); None when the stacks would not fit in :data:`EXACT_BUDGET`.
    """
    rows, dim = w_star.shape
    counts = keep.sum(axis=1)
    if float(np.square(counts.astype(np.float64)).sum()) > EXACT_BUDGET:
        return None
    target = w_star @ h  # (H w*)_j per row, H symmetric
    result = np.zeros_like(w_star)
    for count in np.unique(counts):
        if count == 0:
            continue
        members = np.flatnonzero(counts == count)
        columns = np.stack([np.flatnonzero(keep[r]) for r in members])  # [R, S]
        system = h[columns[:, :, None], columns[:, None, :]]  # [R, S, S]
        rhs = np.take_along_axis(target[members], columns, axis=1)[..., None]
        try:
            solution = np.linalg.solve(system, rhs)[..., 0]
        except np.linalg.LinAlgError:
            return None
        result[members[:, None], columns] = solution
    return result


def _output_error(fit: LayerFit, g: int, params: np.ndarray) -> Tuple[float, float]:
    """(residual energy, target energy) of group ``g`` for output parameters ``params`` ``[rows, D+b]``."""
    gram, cross = fit.gram[g], fit.cross[g]
    p = params.T  # [D+b, rows]
    residual = fit.energy[g] + float(np.sum(p * (gram @ p))) - 2.0 * float(np.sum(p * cross))
    return max(residual, 0.0), float(fit.energy[g])


def _dense_optimum(fit: LayerFit, g: int, prior_aug: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Group ``g``'s dense least-squares optimum ``w_star`` ``[rows, D+b]`` in the dampened Hessian ``h``.

    ``h`` is the Hessian dampened by ``damp + D / rows``: with few rows for many inputs (a
    classifier after pooling sees one row per sample) a plain fit would match the calibration
    set and nothing else, so the ridge towards the original weights grows with D / rows."""
    ridge = h - fit.gram[g]  # the dampening doubles as a ridge towards the original weights
    return np.linalg.solve(h, fit.cross[g] + ridge @ prior_aug.T).T


def _magnitude_keep(prior: np.ndarray, fit: LayerFit, fixed: Optional[np.ndarray], cache: Optional[dict] = None) -> np.ndarray:
    """The plain-magnitude keep-mask of these rows (what pruning without data would do);
    ``cache`` keeps the magnitude order for the next sparsity of the same rows."""
    if fixed is not None:
        return fixed.copy()
    if fit.nm is not None:
        return nm_mask_matrix(prior, *fit.nm)
    keep = np.ones(prior.size, dtype=bool)
    zeros = int(round(fit.sparsity * prior.size))
    if zeros:
        order = None if cache is None else cache.get("magnitude order")
        if order is None:
            order = np.argsort(np.abs(prior).reshape(-1), kind="stable")
            if cache is not None:
                cache["magnitude order"] = order
        keep[order[:zeros]] = False
    return keep.reshape(prior.shape)


def solve(fit: LayerFit, weight: np.ndarray, bias: Optional[np.ndarray], *, damp: float = DAMP,
          refit: bool = True, cache: Optional[dict] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The layer's new (weight, bias) from its statistics; records mask and errors on ``fit``.

    ``refit=False`` applies the plain magnitude (or given) mask and leaves the kept weights
    alone, so reports can say what the reconstruction added. The returned bias is None when
    the layer had none and the refit did not add one. ``cache``: a dict kept between calls on
    the same layer (several sparsities, or the Relu steps' new targets), holding what does not
    depend on the sparsity: the dampened Hessian, the sweep's factor of ``H^-1`` and the dense
    optimum of the last target, each ``O(D^3)`` to compute.
    """
    layer = fit.layer
    dtype = np.asarray(weight).dtype
    matrix = as_matrix(layer, np.asarray(weight, dtype=np.float64))
    fixed_all = as_matrix(layer, fit.mask) if fit.mask is not None else None
    frozen_all = as_matrix(layer, fit.keep_zeros) if fit.keep_zeros is not None else None
    use_bias = has_bias_column(layer)
    dim = matrix.shape[1]
    new_matrix = np.zeros_like(matrix)
    bias_delta = np.zeros(matrix.shape[0])
    result_mask = np.ones_like(matrix, dtype=bool)
    totals = np.zeros(3)  # magnitude residual, refit residual, target energy
    for g, rows in enumerate(group_rows(layer)):
        prior = matrix[rows]
        fixed = None if fixed_all is None else fixed_all[rows]
        frozen = None if frozen_all is None else frozen_all[rows]
        widen = (lambda m: np.concatenate([m, np.ones((len(rows), 1), bool)], axis=1)) if use_bias else (lambda m: m)
        prior_aug = np.concatenate([prior, np.zeros((len(rows), 1))], axis=1) if use_bias else prior
        key = (g, float(damp), hash(prior.tobytes()), fit.rows)
        dense = None if cache is None else cache.setdefault(key, {})
        magnitude = _magnitude_keep(prior, fit, fixed, dense)
        if frozen is not None:
            magnitude &= frozen
        residual, energy = _output_error(fit, g, np.where(widen(magnitude), prior_aug, 0.0))
        totals[0] += residual
        totals[2] += energy
        if not refit:
            keep = widen(magnitude)
            solution = np.where(keep, prior_aug, 0.0)
        else:
            dense = {} if dense is None else dense
            if "h" not in dense:
                dense["h"] = _dampened(fit.gram[g], damp + fit.gram[g].shape[0] / max(fit.rows, 1))
            h = dense["h"]
            target = hash(fit.cross[g].tobytes())  # a Relu step changes the target, not the Hessian
            if dense.get("target") != target:
                dense["target"], dense["w_star"] = target, _dense_optimum(fit, g, prior_aug, h)
            w_star = dense["w_star"]
            solution = None
            prunable = np.ones(w_star.shape[1], dtype=bool)
            if use_bias:
                prunable[dim] = False
            forced = None if frozen is None else ~widen(frozen)
            keep = None
            if fit.exact_obs and fixed is None and fit.nm is None and fit.sparsity > 0:
                keep = _exact_obs_keep(fit, key, w_star, h, prunable, forced)
            elif fit.exact_obs and fixed is None and fit.nm is not None and forced is None:
                keep = _exact_obs_nm_keep(w_star, h, prunable, fit.nm)
            if keep is None:
                if "u" not in dense:
                    dense["u"] = _upper_cholesky_of_inverse(h)
                solution, keep = sparsegpt_sweep(
                    w_star, h, u=dense["u"],
                    sparsity=fit.sparsity * dim / max(1, prunable.sum()) if fixed is None else 0.0,
                    nm=fit.nm if fixed is None else None,
                    mask=None if fixed is None else widen(fixed & (frozen if frozen is not None else True)),
                    forced_zero=forced,
                    prunable=prunable,
                )
            exact = exact_refit(w_star, h, keep)
            if exact is None and solution is None:
                solution, _ = sparsegpt_sweep(w_star, h, mask=keep, prunable=prunable, u=dense.get("u"))
            solution = np.where(keep, exact if exact is not None else solution, 0.0)
        residual, _ = _output_error(fit, g, solution)
        totals[1] += residual
        new_matrix[rows] = solution[:, :dim]
        if use_bias:
            bias_delta[rows] = solution[:, dim]
        result_mask[rows] = keep[:, :dim]
    fit.error_magnitude = float(totals[0] / max(totals[2], 1e-30))
    fit.error = float(totals[1] / max(totals[2], 1e-30))
    fit.result_mask = from_matrix(layer, result_mask)
    new_weight = from_matrix(layer, new_matrix).astype(dtype)
    if not (use_bias and refit):
        return new_weight, bias
    base = np.zeros(matrix.shape[0]) if bias is None else np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (matrix.shape[0],))
    return new_weight, (base + bias_delta).astype(dtype)


def reconstruct_layers(
    original: Model,
    sparse: Model,
    fits: Sequence[LayerFit],
    data,
    *,
    batch_size: int = 16,
    positions_per_sample: int = 256,
    seed: int = 0,
    damp: float = DAMP,
    sequential: bool = True,
    residual: bool = True,
    relu_steps: int = 0,
    finish: Union[bool, Callable[[LayerFit, Model, gs.Node], None]] = True,
    progress=None,
) -> List[LayerFit]:
    """Sparsify every layer of ``sparse`` in place, in dependency order, from calibration data.

    ``sequential``: each stage's inputs come from the model sparsified so far (one pass over
    the data per stage); otherwise every layer's statistics come from one pass of the original
    model (faster, no error correction across layers). ``relu_steps`` (sequential, ``finish=True``): refits of each 2-D conv read
    only through a Relu to the error after it (:func:`_relu_majorizer_target`), each on the
    stage's taps again (kept in memory when they fit in :data:`STAGE_CACHE_BYTES`). ``residual`` (sequential only): a conv
    whose output is added to a shortcut is fit to the original *sum*, i.e. its target also
    carries the shortcut's drift (original minus current value), which plain layer-wise targets
    leave to accumulate along a residual spine. ``finish``: True solves and writes each
    layer (:func:`solve`), False only gathers statistics, a callable ``finish(fit, sparse,
    original_node)`` does its own rewrite once the layer's statistics are complete (the
    lowrank pass replaces the node; later stages find their layers by node name and tap the
    same tensors, so a rewrite must keep the layer's input and output tensor names).
    """
    orig_nodes = {n.name: n for n in original.graph.nodes}
    by_name = {f.layer.node: f for f in fits}
    names = [f.layer.node for f in fits]
    stages = _stages(sparse, names) if sequential else [names]
    inputs_of = {name: orig_nodes[name].inputs[0].name for name in names}
    partner_of = _residual_partners(original, fits, names) if sequential and residual else {}
    relu_fed = _relu_fed(original, fits) if relu_steps else set()
    all_inputs = sorted(set(inputs_of.values()) | set(partner_of.values()))
    original_proto = original.to_proto()
    dynamic = activations.batch_can_grow(runtime.with_outputs(original_proto, all_inputs))
    for stage in stages:
        tensors = sorted({inputs_of[n] for n in stage} | {partner_of[n] for n in stage if n in partner_of})
        # each stage's sessions compute only what leads to its taps (onnxruntime would run the whole model)
        reference_session = activations.tap_session(original_proto, tensors, dynamic_batch=dynamic, only=True)
        size = activations.session_batch_size(reference_session, min(batch_size, activations.batch_size_for(original, tensors, preferred=batch_size)))
        current_session = activations.tap_session(sparse, tensors, dynamic_batch=dynamic, only=True) if sequential else None

        def taps(size=size, tensors=tensors, reference_session=reference_session, current_session=current_session):
            for feed in (data.batches(size) if hasattr(data, "batches") else iter(data)):
                reference = dict(zip(tensors, runtime.run(reference_session, feed, tensors)))
                current = dict(zip(tensors, runtime.run(current_session, feed, tensors))) if current_session else reference
                yield reference, current

        def gather(names, batches):
            for index, (reference, current) in enumerate(batches):
                for name in names:
                    partner = partner_of.get(name)
                    drift = reference[partner] - current[partner] if partner else None
                    accumulate(by_name[name], orig_nodes[name], reference[inputs_of[name]], current[inputs_of[name]],
                               seed * 100003 + index, positions_per_sample, drift)

        again = [n for n in stage if n in relu_fed] if finish is True and sequential and relu_steps else []
        # the Relu steps read the same taps again (the stage's inputs do not change): kept when small enough
        kept = _TapCache(STAGE_CACHE_BYTES if again else 0)
        gather(stage, kept.record(activations.prefetch(taps())))
        for name in stage:
            if callable(finish):
                flush(by_name[name], orig_nodes[name])
                finish(by_name[name], sparse, orig_nodes[name])
            elif finish:  # a layer with Relu steps keeps its Hessian factor for them
                _finish(by_name[name], sparse, damp, orig_nodes[name], keep_factors=name in again)
            else:
                flush(by_name[name], orig_nodes[name])
        again = [n for n in again if not by_name[n].skipped]
        for _ in range(relu_steps if again else 0):  # majorize-minimize the error after the ReLU
            for name in again:
                _start_relu_step(by_name[name], sparse, orig_nodes[name])
            gather(again, kept.batches if kept.batches is not None else activations.prefetch(taps()))
            for name in again:
                _finish_relu_step(by_name[name], sparse, damp, orig_nodes[name])
        for name in stage:
            by_name[name]._solved.clear()  # D x D matrices: one stage's at a time
        if progress is not None:
            progress.update(len(stage))
    return list(fits)


STAGE_CACHE_BYTES = 1 << 30
"""Tapped activations of one stage (both models, every batch) kept for its Relu steps; a stage
over this is tapped again for each step (ResNet-50's first stages at 128 samples are 0.8 GB)."""


class _TapCache:
    """Records the (reference, current) batches passing through, up to ``budget`` bytes in all;
    ``batches`` is the list once complete, None when they did not fit (or nothing was asked)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.batches: Optional[list] = None

    def record(self, batches):
        kept, used = ([] if self.budget > 0 else None), 0
        for pair in batches:
            if kept is not None:
                used += sum(np.asarray(v).nbytes for side in pair for v in side.values())
                kept = kept if used <= self.budget else None
                if kept is not None:
                    kept.append(pair)
            yield pair
        self.batches = kept


def _relu_fed(model: Model, fits: Sequence[LayerFit]) -> set:
    """Refit 2-D convs whose output is read by a single Relu and nothing else."""
    wanted = {f.layer.node for f in fits if f.layer.op == "Conv" and len(f.layer.shape) == 4}
    result = set()
    for node in model.graph.nodes:
        if node.name in wanted:
            reader = sole_consumer(model.graph, node.outputs[0])
            if reader is not None and reader.op == "Relu":
                result.add(node.name)
    return result


def _constant_bias(node: gs.Node) -> Optional[np.ndarray]:
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        return np.asarray(node.inputs[2].values)
    return None


def _layer_bias(node: gs.Node, rows: int) -> np.ndarray:
    bias = _constant_bias(node)
    return np.zeros(rows) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)


def _start_relu_step(fit: LayerFit, sparse: Model, original_node: gs.Node) -> None:
    node = next(n for n in sparse.graph.nodes if n.name == fit.layer.node)
    current = as_matrix(fit.layer, np.asarray(node.inputs[1].values, dtype=np.float64))
    fit._relu_point = (_layer_bias(original_node, current.shape[0]), current, _layer_bias(node, current.shape[0]))
    fit.cross = np.zeros_like(fit.cross)  # the target changes; the rows, hence the Hessian, do not
    fit.energy = np.zeros_like(fit.energy)
    fit.rows = 0
    fit._traces = {}


def _finish_relu_step(fit: LayerFit, sparse: Model, damp: float, original_node: gs.Node) -> None:
    flush(fit, original_node)
    fit._relu_point = None
    fit.relu_refits += 1
    node = next(n for n in sparse.graph.nodes if n.name == fit.layer.node)
    # solved again from the original weights: only the target changed
    new_weight, new_bias = solve(fit, np.asarray(original_node.inputs[1].values), _constant_bias(original_node), damp=damp,
                                 cache=fit._solved)
    write_layer(sparse, node, fit.layer, new_weight, new_bias)


def _residual_partners(model: Model, fits: Sequence[LayerFit], names: Sequence[str]) -> Dict[str, str]:
    """Refit 2-D convs whose output only feeds an Add: layer name -> the Add's other input.

    Only when every refit layer upstream of that other input (a shortcut, or a projection conv
    on it) is done in an earlier stage, so its current value is final when this layer is fit.
    """
    wanted = set(names)
    level, node_level = stage_levels(model, names)
    by_name = {f.layer.node: f for f in fits}
    result = {}
    for node in model.graph.nodes:
        if node.name not in wanted:
            continue
        fit = by_name[node.name]
        if fit.layer.op != "Conv" or fit.layer.groups != 1 or len(fit.layer.shape) != 4:
            continue
        out = node.outputs[0]
        if len(out.outputs) != 1 or out.outputs[0].op != "Add" or len(out.outputs[0].inputs) != 2:
            continue
        add = out.outputs[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        if out in model.graph.outputs or other is out:
            continue
        if not isinstance(other, gs.Variable) or other.shape is None or out.shape is None or list(other.shape) != list(out.shape):
            continue
        if level.get(other.name, 0) > node_level[node.name]:
            continue
        result[node.name] = other.name
    return result


def collect_statistics(model: Model, fits: Sequence[LayerFit], data, *, seed: int = 0, progress=None) -> None:
    """Every layer's statistics from one pass of the original model (no solve)."""
    reconstruct_layers(model, model, fits, data, seed=seed, sequential=False, finish=False, progress=progress)


def refit_weights(fit: LayerFit, weight: np.ndarray, levels: Sequence[float], *, damp: float = DAMP) -> List[np.ndarray]:
    """The layer's weight sparsified and refit alone at each sparsity (its bias change left out)."""
    result, cache = {}, {}
    for level in sorted(levels, reverse=True):  # deepest first: the ExactOBS traces then serve every level
        trial = dataclasses.replace(fit, sparsity=float(level), result_mask=None)
        result[level], _ = solve(trial, weight, None, damp=damp, cache=cache)
    return [result[level] for level in levels]


def _finish(fit: LayerFit, sparse: Model, damp: float, original_node: gs.Node, *, keep_factors: bool = False) -> None:
    flush(fit, original_node)
    node = next(n for n in sparse.graph.nodes if n.name == fit.layer.node)
    if fit.gram is None:
        fit.skipped = "no calibration rows"
        return
    new_weight, new_bias = solve(fit, np.asarray(node.inputs[1].values), _constant_bias(node), damp=damp,
                                 cache=fit._solved if keep_factors else None)
    write_layer(sparse, node, fit.layer, new_weight, new_bias)


def stored_precision_bits(values: np.ndarray) -> int:
    """Low mantissa bits that are zero in every float32 of ``values`` (0 for other dtypes).

    Some exports store weights rounded (every SqueezeNet weight has its low 8 bits zero), which
    is why they compress well; a refit at full precision would undo that.
    """
    values = np.asarray(values)
    if values.dtype != np.float32 or values.size == 0:
        return 0
    bits = values.view(np.uint32) & np.uint32(0x7FFFFF)
    combined = int(np.bitwise_or.reduce(bits.reshape(-1)))
    if combined == 0:
        return 0
    return (combined & -combined).bit_length() - 1


def round_to_precision(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (float32) rounded to nearest with the low ``bits`` mantissa bits cleared."""
    if bits <= 0:
        return values
    raw = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    half = np.uint32(1 << (bits - 1))
    rounded = (raw + half) & np.uint32((0xFFFFFFFF << bits) & 0xFFFFFFFF)
    return rounded.view(np.float32)


def write_layer(model: Model, node: gs.Node, layer: SparseLayer, weight: np.ndarray, bias: Optional[np.ndarray]) -> None:
    """Replace the node's weight (and bias) constants, kept at the precision they were stored in."""
    graph = model.graph
    weight = round_to_precision(weight, stored_precision_bits(node.inputs[1].values)) if weight.dtype == np.float32 else weight
    replace_constant_values(graph, node, 1, weight)
    if bias is None:
        return
    bias = np.asarray(bias, dtype=weight.dtype)
    if layer.op in ("Conv", "ConvTranspose", "Gemm"):
        if layer.op == "Gemm" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
            current = node.inputs[2].values
            if current.size != bias.size:
                bias = bias.reshape(-1)
        _set_bias(graph, node, 2, bias)
    elif np.any(bias != 0):
        _add_bias_after(graph, node, bias)
