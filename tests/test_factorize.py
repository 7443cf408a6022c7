"""Low-rank factorizations of one layer (:mod:`onnxslim_cv.factorize`): numpy only."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_cv.factorize import (
    FORMS,
    Candidate,
    LayerFactorizer,
    LayerShape,
    best_within,
    cheapest_within,
    pareto,
    rank_grid,
)

GEMM = LayerShape("Gemm", cout=12, cin=20)
POINTWISE = LayerShape("Conv", cout=12, cin=10, in_hw=(5, 5), out_hw=(5, 5))
CONV3 = LayerShape("Conv", cout=10, cin=6, kernel=(3, 3), in_hw=(8, 8), out_hw=(8, 8))
CONV53 = LayerShape("Conv", cout=8, cin=5, kernel=(5, 3), strides=(2, 1), in_hw=(9, 7), out_hw=(5, 7))
SHAPES = {"gemm": GEMM, "pointwise": POINTWISE, "conv3x3": CONV3, "conv5x3": CONV53}


def _weight(shape: LayerShape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((shape.cout, shape.columns))


def _spd(dim: int, seed: int = 1, spread: float = 3.0) -> np.ndarray:
    """A random symmetric positive definite metric with eigenvalues over 10^-spread .. 10^spread."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (q * np.logspace(spread, -spread, dim)) @ q.T


def _metric_error(weight: np.ndarray, composed: np.ndarray, metric: np.ndarray) -> float:
    diff = weight - composed
    return float(np.trace(diff @ metric @ diff.T) / np.trace(weight @ metric @ weight.T))


# ---------------------------------------------------------------------------------- rank_grid


def test_rank_grid_takes_multiples_below_full():
    assert rank_grid(64, 4) == list(range(4, 64, 4))
    assert rank_grid(10, 4) == [4, 8]
    assert rank_grid(16, 8) == [8]
    assert rank_grid(33, 1) == list(range(1, 33))  # 32 ranks: exactly the cap


def test_rank_grid_small_layers_take_every_rank():
    assert rank_grid(4, 4) == [1, 2, 3]
    assert rank_grid(3, 8) == [1, 2]
    assert rank_grid(1, 4) == []
    assert rank_grid(5, 4) == [4]  # wider than round_to: multiples only


def test_rank_grid_caps_the_count_and_keeps_the_ends():
    grid = rank_grid(2048, 4)
    assert len(grid) == 32
    assert grid == sorted(set(grid))
    assert all(r % 4 == 0 and 0 < r < 2048 for r in grid)
    assert grid[0] == 4 and grid[-1] == 2044
    assert len(rank_grid(2048, 4, limit=5)) == 5


# ---------------------------------------------------------------------------------- shapes, costs


def test_layer_shape_costs():
    assert CONV3.macs == 10 * 6 * 9 * 64 and CONV3.params == 10 * 6 * 9
    assert GEMM.macs == 12 * 20 and GEMM.forms() == ("svd",) and POINTWISE.forms() == ("svd",)
    assert CONV3.forms() == FORMS
    assert LayerShape("Conv", 4, 4, kernel=(3, 1)).forms() == ("svd", "tucker2")
    # svd: a k x k conv into r channels, then a 1x1 back
    assert CONV3.candidate_cost("svd", (4,)) == (4 * 54 * 64 + 10 * 4 * 64, 4 * 54 + 10 * 4)
    # spatial: the 5x1 conv runs at (out_h, in_w) = (5, 7), the 1x3 at (5, 7)
    assert CONV53.candidate_cost("spatial", (3,)) == (3 * 5 * 5 * 5 * 7 + 8 * 3 * 3 * 35, 3 * 5 * 5 + 8 * 3 * 3)
    # tucker2: the 1x1 runs at the input size; r2 == cout leaves out the last 1x1
    assert CONV53.candidate_cost("tucker2", (2, 8)) == (2 * 5 * 63 + 8 * 2 * 15 * 35, 2 * 5 + 8 * 2 * 15)
    assert CONV53.candidate_cost("tucker2", (2, 4)) == (2 * 5 * 63 + 4 * 2 * 15 * 35 + 8 * 4 * 35, 2 * 5 + 4 * 2 * 15 + 8 * 4)
    with pytest.raises(ValueError):
        CONV3.candidate_cost("cp", (2,))


def test_latency_model_prefers_the_layer_when_factoring_a_small_one_adds_a_node():
    tiny = LayerShape("Conv", cout=4, cin=4, kernel=(3, 3), in_hw=(4, 4), out_hw=(4, 4))
    assert tiny.candidate_latency("svd", (2,)) > tiny.latency()
    big = LayerShape("Conv", cout=128, cin=128, kernel=(3, 3), in_hw=(28, 28), out_hw=(28, 28))
    assert big.candidate_latency("svd", (16,)) < big.latency()


# ---------------------------------------------------------------------------------- candidates vs factors


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("metric_kind", ["weight", "data"])
def test_candidate_error_is_the_error_of_its_factors(name, metric_kind):
    shape = SHAPES[name]
    weight = _weight(shape)
    metric = None if metric_kind == "weight" else _spd(shape.columns, spread=1.5)
    factorizer = LayerFactorizer(shape, weight, metric)
    candidates = factorizer.candidates(round_to=1)
    forms = {c.form for c in candidates}
    assert forms == set(shape.forms())
    tucker = [c for c in candidates if c.form == "tucker2"]
    if tucker:  # both the two-layer (r2 == Cout) and the three-layer Tucker-2
        assert any(c.ranks[1] == shape.cout for c in tucker) and any(c.ranks[1] < shape.cout for c in tucker)
    for candidate in candidates:
        factors = factorizer.factors(candidate)
        composed = factors.composed()
        assert composed.shape == weight.shape
        actual = factorizer.relative_error(composed)
        assert candidate.error == pytest.approx(actual, rel=1e-6, abs=1e-9), candidate.label()
        if metric is not None:
            assert actual == pytest.approx(_metric_error(weight, composed, metric), rel=1e-6, abs=1e-9)
        assert 0.0 <= candidate.error <= 1.0
        assert (candidate.macs, candidate.params) == shape.candidate_cost(candidate.form, candidate.ranks)
        assert candidate.latency == pytest.approx(shape.candidate_latency(candidate.form, candidate.ranks))


@pytest.mark.parametrize("metric_kind", ["weight", "data"])
def test_errors_fall_as_the_rank_grows(metric_kind):
    weight = _weight(CONV3)
    metric = None if metric_kind == "weight" else _spd(CONV3.columns)
    candidates = LayerFactorizer(CONV3, weight, metric).candidates(round_to=1)
    for form in ("svd", "spatial"):
        errors = [c.error for c in sorted((c for c in candidates if c.form == form), key=lambda c: c.ranks)]
        assert len(errors) > 3 and all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))
    # a Tucker-2 with r2 == Cout at r1 == Cin is the layer itself: never a candidate
    assert all(c.ranks != (CONV3.cin, CONV3.cout) for c in candidates)


def _conv_patch_features(form, leading, shape, patch):
    """What the factor layers before the last compute from one input patch ``[Cin, kh, kw]``."""
    kh, kw = shape.kernel
    if form == "svd":
        (first,) = leading
        return first.reshape(first.shape[0], -1) @ patch.reshape(-1)
    if form == "spatial":
        (first,) = leading  # [r, Cin, kh, 1]: one vertical filter per output column
        return np.einsum("rcy,cyx->rx", first[..., 0], patch).reshape(-1)
    first = leading[0][:, :, 0, 0]  # [r1, Cin] 1x1
    mixed = np.einsum("qc,cyx->qyx", first, patch)
    if len(leading) == 1:
        return mixed.reshape(-1)
    return leading[1].reshape(leading[1].shape[0], -1) @ mixed.reshape(-1)


@pytest.mark.parametrize("shape", [CONV3, CONV53], ids=["3x3", "5x3"])
@pytest.mark.parametrize("metric_kind", ["weight", "data"])
def test_factor_weights_have_onnx_shapes_and_compute_the_features(shape, metric_kind):
    cin, cout = shape.cin, shape.cout
    kh, kw = shape.kernel
    metric = None if metric_kind == "weight" else _spd(shape.columns, spread=1.0)
    factorizer = LayerFactorizer(shape, _weight(shape, seed=3), metric)
    patch = np.random.default_rng(9).standard_normal((cin, kh, kw))
    chosen = {
        ("svd", (3,)): [(3, cin, kh, kw)],
        ("spatial", (4,)): [(4, cin, kh, 1)],
        ("tucker2", (2, cout)): [(2, cin, 1, 1)],
        ("tucker2", (3, 5)): [(3, cin, 1, 1), (5, 3, kh, kw)],
    }
    for (form, ranks), shapes in chosen.items():
        candidate = Candidate(form, ranks, 0, 0, 0.0)
        factors = factorizer.factors(candidate)
        assert [w.shape for w in factors.leading] == shapes, form
        width = factors.features.shape[0]
        assert factors.last.shape == (cout, width) and factors.features.shape == (width, shape.columns)
        if form == "spatial":
            assert width == ranks[0] * kw
            assert factors.last.reshape(cout, ranks[0], 1, kw).shape == (cout, ranks[0], 1, kw)
        if form == "tucker2" and ranks[1] == cout:
            assert factors.last.reshape(cout, ranks[0], kh, kw).shape == (cout, ranks[0], kh, kw)
        # the leading ONNX layers, applied to a patch, compute exactly ``features @ patch``
        np.testing.assert_allclose(_conv_patch_features(form, factors.leading, shape, patch),
                                   factors.features @ patch.reshape(-1), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError):
        factorizer.factors(Candidate("cp", (2,), 0, 0, 0.0))


def test_gemm_svd_factor_shapes():
    factorizer = LayerFactorizer(GEMM, _weight(GEMM))
    factors = factorizer.factors(Candidate("svd", (5,), 0, 0, 0.0))
    assert [w.shape for w in factors.leading] == [(5, 20, 1, 1)]
    assert factors.last.shape == (12, 5) and factors.features.shape == (5, 20)


# ---------------------------------------------------------------------------------- exact structure


@pytest.mark.parametrize("metric_kind", ["weight", "data"])
def test_exact_low_rank_weight_is_reproduced_at_its_rank(metric_kind):
    rng = np.random.default_rng(4)
    rank = 3
    weight = rng.standard_normal((CONV3.cout, rank)) @ rng.standard_normal((rank, CONV3.columns))
    metric = None if metric_kind == "weight" else _spd(CONV3.columns, spread=1.0)
    factorizer = LayerFactorizer(CONV3, weight, metric)
    svd = {c.ranks[0]: c for c in factorizer.candidates(round_to=1) if c.form == "svd"}
    assert svd[rank].error < 1e-10
    assert svd[rank - 1].error > 1e-3
    composed = factorizer.factors(svd[rank]).composed()
    np.testing.assert_allclose(composed, weight, rtol=1e-7, atol=1e-8 * np.abs(weight).max())


def test_separable_kernel_has_no_spatial_error_at_its_rank():
    shape = LayerShape("Conv", cout=8, cin=6, kernel=(3, 3), in_hw=(8, 8), out_hw=(8, 8))
    rng = np.random.default_rng(5)
    rank = 2  # W[o, c, y, x] = sum_k a_k[c, y] b_k[o, x]
    a = rng.standard_normal((rank, 6, 3))
    b = rng.standard_normal((rank, 8, 3))
    weight = np.einsum("kcy,kox->ocyx", a, b).reshape(8, -1)
    for metric in (None, _spd(shape.columns, spread=1.0)):
        factorizer = LayerFactorizer(shape, weight, metric)
        candidates = factorizer.candidates(round_to=1)
        spatial = {c.ranks[0]: c for c in candidates if c.form == "spatial"}
        svd = {c.ranks[0]: c for c in candidates if c.form == "svd"}
        assert spatial[rank].error < 1e-9
        assert spatial[1].error > 1e-3
        assert svd[rank].error > 0.05  # the channel SVD does not see this structure
        np.testing.assert_allclose(factorizer.factors(spatial[rank]).composed(), weight, atol=1e-7)


def test_low_tucker_rank_weight_has_no_tucker2_error_at_its_ranks():
    rng = np.random.default_rng(6)
    core = rng.standard_normal((4, 3, 3, 3))  # [r2, r1, kh, kw]
    weight = np.einsum("oa,aqyx,qc->ocyx", rng.standard_normal((CONV3.cout, 4)), core,
                       rng.standard_normal((3, CONV3.cin))).reshape(CONV3.cout, -1)
    for metric in (None, _spd(CONV3.columns, spread=1.0)):
        factorizer = LayerFactorizer(CONV3, weight, metric)
        tucker = {c.ranks: c for c in factorizer.candidates(round_to=1) if c.form == "tucker2"}
        assert tucker[(3, 4)].error < 1e-9
        assert tucker[(3, CONV3.cout)].error < 1e-9
        assert tucker[(2, 4)].error > 1e-3 and tucker[(3, 3)].error > 1e-3
        np.testing.assert_allclose(factorizer.factors(tucker[(3, 4)]).composed(), weight, atol=1e-7)


# ---------------------------------------------------------------------------------- data-aware


@pytest.mark.parametrize("shape", [GEMM, CONV3], ids=["gemm", "conv3x3"])
def test_whitened_svd_beats_weight_svd_in_the_output_metric(shape):
    weight = _weight(shape, seed=7)
    metric = _spd(shape.columns, seed=8, spread=3.0)
    data = LayerFactorizer(shape, weight, metric)
    plain = LayerFactorizer(shape, weight, None)
    gains = []
    for rank in (1, 2, 4, 6):
        candidate = Candidate("svd", (rank,), 0, 0, 0.0)
        data_error = data.relative_error(data.factors(candidate).composed())
        plain_error = data.relative_error(plain.factors(candidate).composed())  # evaluated in M
        assert data_error <= plain_error + 1e-12, rank
        # and in the weight metric it is the other way round (each is optimal in its own metric)
        assert plain.relative_error(plain.factors(candidate).composed()) <= plain.relative_error(
            data.factors(candidate).composed()) + 1e-12
        gains.append(plain_error - data_error)
    assert max(gains) > 0.05  # strongly anisotropic inputs: a real difference, not a tie


def test_identity_metric_is_the_weight_metric():
    weight = _weight(CONV3, seed=2)
    plain = LayerFactorizer(CONV3, weight, None).candidates(round_to=2)
    identity = LayerFactorizer(CONV3, weight, np.eye(CONV3.columns)).candidates(round_to=2)
    assert [c.label() for c in plain] == [c.label() for c in identity]
    np.testing.assert_allclose([c.error for c in plain], [c.error for c in identity], atol=1e-6)


@pytest.mark.parametrize("metric_kind", ["weight", "data"])
def test_last_factor_is_the_least_squares_optimum_given_the_leading_ones(metric_kind):
    weight = _weight(CONV3, seed=11)
    metric = None if metric_kind == "weight" else _spd(CONV3.columns, seed=12, spread=2.0)
    factorizer = LayerFactorizer(CONV3, weight, metric)
    rng = np.random.default_rng(13)
    for candidate in (Candidate("svd", (4,), 0, 0, 0.0), Candidate("spatial", (5,), 0, 0, 0.0),
                      Candidate("tucker2", (3, 6), 0, 0, 0.0), Candidate("tucker2", (3, CONV3.cout), 0, 0, 0.0)):
        factors = factorizer.factors(candidate)
        best = factorizer.relative_error(factors.composed())
        for _ in range(3):
            nudged = factors.last + 1e-2 * rng.standard_normal(factors.last.shape) * np.abs(factors.last).mean()
            assert factorizer.relative_error(nudged @ factors.features) > best, candidate.label()


def test_relative_error_of_the_weight_itself_is_zero_and_of_nothing_is_one():
    weight = _weight(CONV3)
    for metric in (None, _spd(CONV3.columns)):
        factorizer = LayerFactorizer(CONV3, weight, metric)
        assert factorizer.relative_error(weight) == pytest.approx(0.0, abs=1e-12)
        assert factorizer.relative_error(np.zeros_like(weight)) == pytest.approx(1.0)


def test_forms_argument_restricts_the_candidates():
    factorizer = LayerFactorizer(CONV3, _weight(CONV3), forms=("spatial",))
    assert {c.form for c in factorizer.candidates(round_to=1)} == {"spatial"}
    # without svd, Tucker-2 at r1 == Cin is a candidate of its own (it is then not a duplicate)
    tucker_only = LayerFactorizer(CONV3, _weight(CONV3), forms=("tucker2",)).candidates(round_to=1)
    assert any(c.ranks[0] == CONV3.cin for c in tucker_only)
    with_svd = LayerFactorizer(CONV3, _weight(CONV3)).candidates(round_to=1)
    assert not any(c.form == "tucker2" and c.ranks[0] == CONV3.cin for c in with_svd)


# ---------------------------------------------------------------------------------- choosing


def _c(name, macs, error):
    return Candidate("svd", (name,), macs, 0, error)


def test_pareto_keeps_only_undominated_candidates_by_ascending_macs():
    a, b, c, d, e, f = _c(1, 10, 0.5), _c(2, 20, 0.3), _c(3, 20, 0.4), _c(4, 30, 0.35), _c(5, 40, 0.1), _c(6, 10, 0.6)
    front = pareto([e, d, c, b, a, f])
    assert front == [a, b, e]
    same_error = pareto([_c(7, 50, 0.1), _c(8, 40, 0.1)])
    assert [x.ranks for x in same_error] == [(8,)]  # equal error: the cheaper one
    assert pareto([]) == []


def test_best_within_and_cheapest_within():
    a, b, e = _c(1, 10, 0.5), _c(2, 20, 0.3), _c(5, 40, 0.1)
    front = [a, b, e]
    assert best_within(front, 25) is b
    assert best_within(front, 40) is e  # the budget is inclusive
    assert best_within(front, 1000) is e
    assert best_within(front, 9) is None
    assert best_within([], 100) is None
    assert cheapest_within(front, 0.3) is b  # inclusive
    assert cheapest_within(front, 0.31) is b
    assert cheapest_within(front, 1.0) is a
    assert cheapest_within(front, 0.05) is None
    # not on a front: best_within still takes the lowest error, ties by fewer MACs
    assert best_within([_c(1, 30, 0.2), _c(2, 20, 0.2), _c(3, 10, 0.4)], 30).ranks == (2,)
