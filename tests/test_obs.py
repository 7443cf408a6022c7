"""Hessian-based reconstruction of sparse layers (:mod:`onnxslim_cv.obs`)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_cv import obs
from onnxslim_cv.obs import LayerFit, exact_obs_traces, exact_refit, keep_from_traces, refit_weights, solve, sparsegpt_sweep
from onnxslim_cv.sparsity import SparseLayer, as_matrix, holds_nm


def _correlated_inputs(rows=3000, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim)) * 0.5 + np.eye(dim)
    return rng.standard_normal((rows, dim)) @ mixing + 0.3


def _matmul_fit(x, weight, **options):
    """A MatMul layer ``y = x @ weight`` with its statistics filled from ``x`` directly."""
    layer = SparseLayer("m", "MatMul", "w", weight.shape)
    fit = LayerFit(layer, **options)
    design = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    target = x @ weight
    fit.gram = (design.T @ design)[None]
    fit.cross = (design.T @ target)[None]
    fit.energy = np.array([np.square(target).sum()])
    fit.rows = x.shape[0]
    return fit


def _actual_error(x, weight, new_weight, new_bias):
    target = x @ weight
    return float(np.square(x @ new_weight + new_bias - target).sum() / np.square(target).sum())


def test_refit_beats_magnitude_and_reports_the_true_output_error():
    x = _correlated_inputs()
    weight = np.random.default_rng(1).standard_normal((32, 16))
    fit = _matmul_fit(x, weight, sparsity=0.5)
    new_weight, new_bias = solve(fit, weight, None)
    assert (new_weight == 0).mean() == pytest.approx(0.5, abs=0.02)
    assert fit.error < 0.7 * fit.error_magnitude
    assert fit.error == pytest.approx(_actual_error(x, weight, new_weight, new_bias), rel=1e-3, abs=1e-3)
    magnitude_weight, _ = solve(fit, weight, None, refit=False)
    assert fit.error_magnitude == pytest.approx(_actual_error(x, weight, magnitude_weight, 0.0), rel=1e-3)


def test_exact_refit_is_the_row_wise_least_squares_optimum():
    rng = np.random.default_rng(2)
    x = _correlated_inputs(rows=500, dim=12)
    h = x.T @ x
    w_star = rng.standard_normal((3, 12))
    keep = rng.random((3, 12)) > 0.5
    result = exact_refit(w_star, h, keep)
    for row in range(3):
        columns = np.flatnonzero(keep[row])
        expected = np.linalg.lstsq(x[:, columns], x @ w_star[row], rcond=None)[0]
        np.testing.assert_allclose(result[row, columns], expected, rtol=1e-6, atol=1e-8)
        assert (result[row, ~keep[row]] == 0).all()


def test_exact_obs_costs_are_the_error_of_the_optimal_refit_without_the_removed_weights():
    rng = np.random.default_rng(7)
    x = _correlated_inputs(rows=800, dim=12)
    h = x.T @ x
    w_star = rng.standard_normal((4, 12))
    orders, costs = exact_obs_traces(w_star, h, np.ones(12, dtype=bool), steps=8)
    inverse = np.linalg.inv(h)
    for row in range(4):
        single = np.square(w_star[row]) / np.diag(inverse)
        assert orders[row, 0] == single.argmin()  # the cheapest single removal goes first
        assert len(set(orders[row])) == 8
        for count in (1, 4, 8):
            keep = np.ones((1, 12), dtype=bool)
            keep[0, orders[row, :count]] = False
            delta = exact_refit(w_star[row:row + 1], h, keep)[0] - w_star[row]
            assert float(delta @ h @ delta) == pytest.approx(costs[row, :count].sum(), rel=1e-3)


def test_rows_take_more_zeros_where_removals_are_cheaper():
    orders = np.tile(np.arange(6), (3, 1))
    costs = np.array([[1, 2, 3, 4, 5, 6], [3.5, 7, 8, 9, 10, 11], [0.5, 0.1, 20, 30, 40, 50]], dtype=float)
    keep = keep_from_traces(orders, costs, (3, 6), 7)
    assert (~keep).sum() == 7
    np.testing.assert_array_equal((~keep).sum(axis=1), [4, 1, 2])  # 0.1 comes after 0.5 in its row's order
    for row in range(3):  # each row loses a prefix of its order
        assert (~keep[row, :(~keep[row]).sum()]).all()
    forced = costs.copy()
    forced[1, :3] = -np.inf  # entries that must go count first, whatever the budget
    assert (~keep_from_traces(orders, forced, (3, 6), 2)[1, :3]).all()


def test_exact_obs_beats_the_sweep_and_larger_layers_fall_back_to_it(monkeypatch):
    x = _correlated_inputs()
    weight = np.random.default_rng(1).standard_normal((32, 16))
    exact = _matmul_fit(x, weight, sparsity=0.5)
    solve(exact, weight, None)
    assert exact._traces  # the greedy ran
    monkeypatch.setattr(obs, "EXACT_OBS_BUDGET", 0)
    swept = _matmul_fit(x, weight, sparsity=0.5)
    new_weight, _ = solve(swept, weight, None)
    assert not swept._traces
    assert (new_weight == 0).mean() == pytest.approx(0.5, abs=0.02)
    assert exact.error < 0.9 * swept.error, (exact.error, swept.error)
    monkeypatch.undo()
    monkeypatch.setattr(obs, "EXACT_BUDGET", 0)  # too large for the batched exact solve: the sweep refits the greedy's mask
    fallback = _matmul_fit(x, weight, sparsity=0.5)
    fallback_weight, _ = solve(fallback, weight, None)
    assert fallback._traces
    np.testing.assert_array_equal(fallback_weight != 0, fallback.result_mask)
    assert (fallback_weight == 0).mean() == pytest.approx(0.5, abs=0.02)
    assert fallback.error < swept.error


def test_curves_at_several_sparsities_share_one_greedy_run(monkeypatch):
    x = _correlated_inputs()
    weight = np.random.default_rng(8).standard_normal((32, 16))
    calls = []
    traces = obs.exact_obs_traces
    monkeypatch.setattr(obs, "exact_obs_traces", lambda *a, **k: calls.append(a[3]) or traces(*a, **k))
    weights = refit_weights(_matmul_fit(x, weight), weight, [0.25, 0.5, 0.9])
    assert len(calls) == 1
    assert [round(float((w == 0).mean()), 2) for w in weights] == [0.25, 0.5, 0.9]


@pytest.mark.parametrize("exact_obs", [True, False])
def test_curves_solve_the_dense_optimum_once_and_match_separate_solves(monkeypatch, exact_obs):
    x = _correlated_inputs()
    weight = np.random.default_rng(8).standard_normal((32, 16))
    levels = [0.25, 0.5, 0.9]
    separate = [solve(_matmul_fit(x, weight, sparsity=level, exact_obs=exact_obs), weight, None)[0] for level in levels]
    calls = []
    dense, inverse_factor = obs._dense_optimum, obs._upper_cholesky_of_inverse
    monkeypatch.setattr(obs, "_dense_optimum", lambda *a: calls.append("dense") or dense(*a))
    monkeypatch.setattr(obs, "_upper_cholesky_of_inverse", lambda h: calls.append("factor") or inverse_factor(h))
    shared = refit_weights(_matmul_fit(x, weight, exact_obs=exact_obs), weight, levels)
    assert calls == (["dense"] if exact_obs else ["dense", "factor"])
    for one, other in zip(separate, shared):
        np.testing.assert_array_equal(one, other)


def test_sweep_honours_nm_fixed_and_forced_masks():
    rng = np.random.default_rng(3)
    x = _correlated_inputs(dim=16)
    h = x.T @ x + np.eye(16)
    w = rng.standard_normal((8, 16))
    pruned, keep = sparsegpt_sweep(w, h, nm=(2, 4))
    assert (keep.reshape(8, 4, 4).sum(-1) == 2).all()
    assert (pruned[~keep] == 0).all()
    fixed = rng.random((8, 16)) > 0.3
    pruned, keep = sparsegpt_sweep(w, h, mask=fixed)
    np.testing.assert_array_equal(keep, fixed)
    forced = np.zeros((8, 16), bool)
    forced[:, 3] = True
    _, keep = sparsegpt_sweep(w, h, sparsity=0.25, forced_zero=forced)
    assert not keep[:, 3].any()
    assert (~keep).mean() == pytest.approx(0.25, abs=0.01)


def test_nm_refit_keeps_the_pattern_on_a_conv():
    layer = SparseLayer("c", "Conv", "w", (6, 8, 1, 1))
    rng = np.random.default_rng(4)
    x = _correlated_inputs(dim=8)
    weight = rng.standard_normal(layer.shape)
    fit = LayerFit(layer, nm=(2, 4))
    design = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    target = x @ as_matrix(layer, weight).T
    fit.gram, fit.cross, fit.energy = (design.T @ design)[None], (design.T @ target)[None], np.array([np.square(target).sum()])
    fit.rows = x.shape[0]
    new_weight, bias = solve(fit, weight, np.zeros(6))
    assert holds_nm(layer, new_weight, 2, 4)
    assert bias.shape == (6,)
    assert fit.error < fit.error_magnitude


def test_exact_obs_nm_holds_the_pattern_and_beats_the_sweep(monkeypatch):
    layer = SparseLayer("c", "Conv", "w", (12, 16, 1, 1))
    x = _correlated_inputs(dim=16, seed=5)
    weight = np.random.default_rng(6).standard_normal(layer.shape)

    def fit():
        f = LayerFit(layer, nm=(2, 4))
        design = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
        target = x @ as_matrix(layer, weight).T
        f.gram, f.cross, f.energy = (design.T @ design)[None], (design.T @ target)[None], np.array([np.square(target).sum()])
        f.rows = x.shape[0]
        return f

    calls = []
    traces = obs.exact_obs_traces
    monkeypatch.setattr(obs, "exact_obs_traces", lambda *a, **k: calls.append(k.get("nm")) or traces(*a, **k))
    exact = fit()
    exact_weight, _ = solve(exact, weight, np.zeros(12))
    assert calls == [(2, 4)]
    assert holds_nm(layer, exact_weight, 2, 4)
    assert (exact_weight == 0).mean() == 0.5  # exactly two of every four, the bias column untouched
    swept = fit()
    swept.exact_obs = False
    swept_weight, _ = solve(swept, weight, np.zeros(12))
    assert len(calls) == 1 and holds_nm(layer, swept_weight, 2, 4)
    assert exact.error < 0.95 * swept.error, (exact.error, swept.error)


def test_exact_obs_nm_closes_groups_and_skips_incomplete_ones():
    x = _correlated_inputs(dim=10, seed=7)
    h = x.T @ x
    w = np.random.default_rng(9).standard_normal((5, 10))
    prunable = np.ones(10, bool)
    prunable[9] = False  # like a bias column: the last group [8, 12) is incomplete and left alone
    orders, costs = exact_obs_traces(w, h, prunable, 4, nm=(2, 4))
    for row in orders:
        assert sorted(np.bincount(row // 4, minlength=3).tolist()) == [0, 2, 2]
        assert row.max() < 8
    assert np.isfinite(costs).all()


def test_few_rows_pull_the_refit_towards_the_original_weights():
    x = _correlated_inputs(rows=20)  # fewer rows than inputs: a plain fit would memorise them
    weight = np.random.default_rng(6).standard_normal((32, 16))
    fit = _matmul_fit(x, weight, sparsity=0.5)
    new_weight, new_bias = solve(fit, weight, None)
    magnitude_weight, _ = solve(fit, weight, None, refit=False)
    held_out = _correlated_inputs(rows=2000, seed=9)
    error_refit = _actual_error(held_out, weight, new_weight, new_bias)
    assert error_refit < 1.2 * _actual_error(held_out, weight, magnitude_weight, 0.0)


def test_frozen_zeros_stay_zero():
    x = _correlated_inputs()
    weight = np.random.default_rng(5).standard_normal((32, 16))
    frozen = np.ones_like(weight, dtype=bool)
    frozen[:4] = False  # the first four input channels were pruned in an earlier step
    fit = _matmul_fit(x, weight, sparsity=0.5, keep_zeros=frozen)
    new_weight, _ = solve(fit, weight, None)
    assert (new_weight[:4] == 0).all()
    assert (new_weight == 0).mean() == pytest.approx(0.5, abs=0.02)


def test_refit_weights_keep_the_precision_the_model_stored():
    from onnxslim_cv.obs import round_to_precision, stored_precision_bits

    weights = np.random.default_rng(7).standard_normal(512).astype(np.float32)
    rounded = round_to_precision(weights, 8)
    assert stored_precision_bits(weights) == 0
    assert stored_precision_bits(rounded) >= 8
    np.testing.assert_allclose(rounded, weights, rtol=2.0 ** -15)
    assert stored_precision_bits(round_to_precision(rounded * np.float32(1.37), stored_precision_bits(rounded))) >= 8


# ------------------------------------------------------------------------- residual-aware targets


def _folded_resnet(width=16):
    from onnxslim_cv.ir import Model
    from onnxslim_cv.pipeline import PassContext, make_passes, run_passes
    from onnxslim_cv.testing import models as test_models

    proto = test_models.build("resnet_basic_block", width=width)
    folded, _ = run_passes(Model.from_proto(proto), make_passes(["fold"], {}), context=PassContext(progress=False))
    return folded


def test_residual_partners_are_the_shortcuts_added_to_a_refit_conv():
    from onnxslim_cv.obs import _residual_partners
    from onnxslim_cv.sparsity import sparsifiable_layers

    model = _folded_resnet()
    layers, _ = sparsifiable_layers(model, include_first=True, include_last=True)
    names = [layer.node for layer in layers]
    partners = _residual_partners(model, [LayerFit(layer) for layer in layers], names)
    nodes = {node.name: node for node in model.graph.nodes}
    # the second conv of each of the two blocks; the stride-2 block's shortcut is a projection conv
    assert len(partners) == 2
    for name, partner in partners.items():
        (add,) = nodes[name].outputs[0].outputs
        assert add.op == "Add" and partner in [t.name for t in add.inputs] and partner != nodes[name].outputs[0].name
    projection = [n for n in names if n not in partners and any(t.name in partners.values() for t in nodes[n].outputs)]
    assert len(projection) == 1  # refit in an earlier stage than the conv it is added to, so it qualifies
    # a partner whose refit layer would share the stage is refused: make the projection the block's
    # second conv's stage-mate by refitting only those two
    second = next(n for n, p in partners.items() if p in [t.name for t in nodes[projection[0]].outputs])
    assert _residual_partners(model, [LayerFit(l) for l in layers if l.node in (second, projection[0])],
                              [second, projection[0]]) == {}


def test_residual_target_restores_the_block_sums_better_than_layer_targets():
    from onnxslim_cv.obs import reconstruct_layers
    from onnxslim_cv.sparsity import sparsifiable_layers
    from onnxslim_cv.testing.models import sample_inputs

    from .conftest import relative_output_error, sample_data

    original = _folded_resnet()
    proto = original.to_proto()
    calib = sample_data(proto, 64, seed=0)
    errors = {}
    for residual in (False, True):
        sparse = original.copy()
        layers, _ = sparsifiable_layers(sparse)
        fits = [LayerFit(layer, sparsity=0.5) for layer in layers]
        reconstruct_layers(original, sparse, fits, calib, seed=0, residual=residual)
        feeds = [sample_inputs(proto, seed=100 + k) for k in range(16)]  # held-out inputs
        errors[residual] = relative_output_error(proto, sparse.to_proto(), feeds)
    assert errors[True] < 0.9 * errors[False], errors  # measured: 0.76x


def test_relu_target_majorizes_the_error_after_the_relu():
    from onnxslim_cv.obs import _relu_majorizer_target

    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 6))
    design = np.concatenate([x, np.ones((500, 1))], axis=1)
    original_w, original_b = rng.standard_normal((4, 6)), rng.standard_normal(4)
    current_w, current_b = original_w + 0.3 * rng.standard_normal((4, 6)), original_b + 0.1
    rows = np.arange(4)
    target = x @ original_w.T  # what the fit matches: the original output without its bias
    pre = target + original_b
    assert (pre < 0).mean() > 0.3  # plenty of values the ReLU zeroes
    fit_target = _relu_majorizer_target((original_b, current_w, current_b), rows, target, design, True)
    t = fit_target + original_b  # in pre-activation units
    u = x @ current_w.T + current_b
    tight = ~((pre >= 0) & (u < 0))  # kept loose there, so that the fit still pulls those up
    assert tight.mean() > 0.5
    assert np.allclose(np.square(np.maximum(u, 0) - np.maximum(pre, 0))[tight], np.square(u - t)[tight])
    for _ in range(5):
        other = u + rng.standard_normal(u.shape) * 2
        assert np.all(np.square(np.maximum(other, 0) - np.maximum(pre, 0)) <= np.square(other - t) + 1e-12)
    assert np.array_equal(t[pre >= 0], pre[pre >= 0])  # the positive part is matched as before


def test_relu_steps_lower_the_error_after_the_relu_on_held_out_inputs():
    from onnxslim_cv.ir import Model
    from onnxslim_cv.obs import _relu_fed, reconstruct_layers
    from onnxslim_cv.pipeline import PassContext, make_passes, run_passes
    from onnxslim_cv.sparsity import sparsifiable_layers
    from onnxslim_cv.testing import models as test_models
    from onnxslim_cv.testing.models import sample_inputs

    from .conftest import relative_output_error, sample_data

    original, _ = run_passes(Model.from_proto(test_models.build("squeezenet_fire")), make_passes(["fold"], {}),
                             context=PassContext(progress=False))
    proto = original.to_proto()
    layers, _ = sparsifiable_layers(original, include_first=True, include_last=True)
    assert len(_relu_fed(original, [LayerFit(layer) for layer in layers])) == len(layers)  # every conv -> Relu
    calib = sample_data(proto, 48, seed=10)
    feeds = [sample_inputs(proto, seed=1000 + k) for k in range(16)]  # held-out inputs
    errors = {}
    for steps in (0, 1):
        sparse = original.copy()
        fits = [LayerFit(layer, sparsity=0.5) for layer in sparsifiable_layers(sparse, include_first=True, include_last=True)[0]]
        reconstruct_layers(original, sparse, fits, calib, seed=0, relu_steps=steps)
        for fit in fits:
            assert (np.asarray(fit.result_mask) == 0).mean() == pytest.approx(0.5, abs=0.02)
        errors[steps] = relative_output_error(proto, sparse.to_proto(), feeds)
    assert errors[1] < 0.9 * errors[0], errors


def test_relu_steps_reuse_the_stage_s_taps_and_hessians_and_match_tapping_again(monkeypatch):
    from onnxslim_cv import runtime
    from onnxslim_cv.ir import Model
    from onnxslim_cv.obs import reconstruct_layers
    from onnxslim_cv.pipeline import PassContext, make_passes, run_passes
    from onnxslim_cv.sparsity import sparsifiable_layers
    from onnxslim_cv.testing import models as test_models

    from .conftest import sample_data

    original, _ = run_passes(Model.from_proto(test_models.build("squeezenet_fire")), make_passes(["fold"], {}),
                             context=PassContext(progress=False))
    calib = sample_data(original.to_proto(), 24, seed=10)
    counted, dampened = runtime.run, obs._dampened
    results = {}
    for budget in (obs.STAGE_CACHE_BYTES, 0):  # kept in memory, or over budget and tapped again
        monkeypatch.setattr(obs, "STAGE_CACHE_BYTES", budget)
        runs, hessians = [], []
        monkeypatch.setattr(runtime, "run", lambda *a, **k: runs.append(1) or counted(*a, **k))
        monkeypatch.setattr(obs, "_dampened", lambda *a: hessians.append(1) or dampened(*a))
        sparse = original.copy()
        fits = [LayerFit(layer, sparsity=0.5) for layer in sparsifiable_layers(sparse, include_first=True, include_last=True)[0]]
        reconstruct_layers(original, sparse, fits, calib, seed=0, relu_steps=2)
        assert len(hessians) == len(fits)  # each layer's Hessian dampened once, its Relu steps reuse it
        results[budget] = (len(runs), {t.name: np.array(t.values) for t in sparse.constants()})
    (kept_runs, kept), (again_runs, again) = results.values()
    assert again_runs == 3 * kept_runs  # two more passes over every stage's data without the cache
    assert kept.keys() == again.keys()
    for name in kept:
        np.testing.assert_array_equal(kept[name], again[name])
