"""Streaming calibration statistics: exact merging, bounded memory, and what each method picks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxslim_cv.calib_stats import (
    METHODS,
    CalibrationStats,
    TensorStats,
    collect_stats,
    min_values,
    needs_histogram,
)
from onnxslim_cv.ir import Model

def gaussian_with_outliers(size: int = 1_000_000, seed: int = 0) -> np.ndarray:
    """Unit gaussian bulk plus one huge outlier on each side."""
    values = np.random.default_rng(seed).standard_normal(size)
    values[0], values[1] = -80.0, 90.0
    return values


def stats_of(*batches: np.ndarray, **kwargs) -> TensorStats:
    stats = TensorStats(**kwargs)
    for batch in batches:
        stats.update(batch)
    return stats


def uint8_quantization_mse(values: np.ndarray, low: float, high: float) -> float:
    """Mean squared error of asymmetric uint8 fake quantization on [low, high] widened to 0."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0
    zero_point = np.round(-low / scale)
    quantized = np.clip(np.round(values / scale) + zero_point, 0, 255)
    return float(np.mean(((quantized - zero_point) * scale - values) ** 2))


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------


def test_streaming_matches_one_shot_on_concatenated_data():
    rng = np.random.default_rng(1)
    batches = [
        rng.normal(0.0, 0.1, size=(8, 3, 32, 32)).astype(np.float32),
        rng.normal(2.0, 30.0, size=(8, 3, 32, 32)).astype(np.float32),  # much wider: histogram grows
        rng.uniform(-1.0, 1.0, size=(4, 3, 32, 32)).astype(np.float32),
    ]
    everything = np.concatenate([b.reshape(-1) for b in batches])
    streamed = stats_of(*batches)
    one_shot = stats_of(everything)

    assert (streamed.min, streamed.max, streamed.count) == (one_shot.min, one_shot.max, one_shot.count)
    assert streamed.min == everything.min() and streamed.max == everything.max()
    assert streamed.count == everything.size
    assert streamed.counts.sum() == streamed.count

    bin_width = max(streamed.width, one_shot.width)
    for symmetric in (False, True):
        streamed_range = streamed.range("percentile", percentile=99.0, symmetric=symmetric)
        one_shot_range = one_shot.range("percentile", percentile=99.0, symmetric=symmetric)
        assert np.allclose(streamed_range, one_shot_range, rtol=0, atol=bin_width)
    assert np.allclose(
        streamed.range("percentile", percentile=99.0), np.percentile(everything, [1.0, 99.0]), rtol=0, atol=bin_width
    )


def test_growing_the_range_merges_old_bins_exactly():
    stats = stats_of(np.random.default_rng(2).normal(size=10_000).astype(np.float32))
    before, width_before = stats.counts.copy(), stats.width

    stats.update(np.array([1000.0], dtype=np.float32))

    factor = round(stats.width / width_before)
    assert factor > 1 and factor & (factor - 1) == 0, "the width grows by a power of two"
    bins = stats.bins
    positives = before[bins:].reshape(-1, factor).sum(axis=1)
    negatives = before[:bins][::-1].reshape(-1, factor).sum(axis=1)
    expected = np.zeros_like(before)
    expected[bins : bins + positives.size] = positives
    expected[bins - negatives.size : bins] = negatives[::-1]
    expected[bins + int(1000.0 / stats.width)] += 1
    np.testing.assert_array_equal(stats.counts, expected)


def test_zeros_before_the_first_nonzero_batch_and_non_float_inputs():
    stats = stats_of(np.zeros(10, dtype=np.int64), np.array([-4, 0, 4], dtype=np.int8), np.ones(5, np.float16))
    assert (stats.min, stats.max, stats.count) == (-4.0, 4.0, 18)
    assert stats.counts.sum() == 18
    assert stats.counts[stats.bins] == 11  # the zeros sit in bin [0, width) whatever width became
    assert stats.range("percentile", percentile=99.0) == pytest.approx((-4.0, 4.0), abs=stats.width)


def test_huge_float64_values_still_bin():
    stats = stats_of(np.array([-1e300, 0.0, 3e300]))
    assert stats.counts.sum() == 3 and stats.counts[-1] == 1 and stats.counts[0] == 0
    assert stats.range("percentile", percentile=99.0)[1] > 1e300


def test_memory_does_not_grow_with_updates():
    rng = np.random.default_rng(3)
    stats = TensorStats(bins=512)
    stats.update(rng.normal(size=100))
    size, nbytes = stats.counts.size, stats.counts.nbytes
    for step in range(200):
        stats.update(rng.normal(scale=1.0 + step, size=100))
    assert stats.counts.size == size == 2 * 512
    assert stats.counts.nbytes == nbytes
    assert stats.count == 201 * 100 == stats.counts.sum()


def test_minmax_without_histogram_keeps_only_extremes():
    stats = stats_of(np.arange(-3.0, 5.0), np.array([[7.5]]), histogram=False)
    assert stats.counts is None
    assert (stats.min, stats.max, stats.count) == (-3.0, 7.5, 9)
    assert stats.range("minmax") == (-3.0, 7.5)
    with pytest.raises(ValueError, match="needs a histogram"):
        stats.range("percentile")


def test_nonfinite_values_are_ignored():
    batch = np.array([1.0, np.nan, -2.0, np.inf, 3.0, -np.inf], dtype=np.float32)
    stats = stats_of(batch, np.full(4, np.nan, dtype=np.float32))
    assert (stats.min, stats.max, stats.count, stats.nonfinite) == (-2.0, 3.0, 3, 7)
    assert stats.counts.sum() == 3
    for method in METHODS:
        low, high = stats.range(method)
        assert -2.0 <= low < high <= 3.0


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


def test_percentile_matches_numpy_and_clips_outliers():
    values = np.random.default_rng(4).standard_normal(200_000)
    values[:5] = [50.0, -45.0, 48.0, 40.0, -50.0]
    stats = stats_of(values)

    low, high = stats.range("percentile", percentile=99.9)
    assert np.allclose((low, high), np.percentile(values, [0.1, 99.9]), rtol=0, atol=stats.width)
    assert high < 4.0 and low > -4.0

    _, threshold = stats.range("percentile", percentile=99.9, symmetric=True)
    assert threshold == pytest.approx(np.percentile(np.abs(values), 99.9), abs=stats.width)


@pytest.mark.parametrize("method", ["entropy", "mse"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rare_huge_outliers_are_clipped_but_the_bulk_is_kept(method, symmetric):
    stats = stats_of(gaussian_with_outliers())
    low, high = stats.range(method, symmetric=symmetric)
    largest_allowed = 0.25 * stats.max if method == "entropy" else 0.5 * stats.max
    assert 3.0 <= high <= largest_allowed
    assert -largest_allowed <= low <= -3.0


@pytest.mark.parametrize("method", ["entropy", "mse"])
def test_uniform_data_keeps_nearly_the_full_range(method):
    stats = stats_of(np.random.default_rng(5).uniform(-2.0, 5.0, size=200_000))
    low, high = stats.range(method)
    assert low == pytest.approx(-2.0, rel=0.02) and high == pytest.approx(5.0, rel=0.02)
    assert stats.range(method, symmetric=True)[1] == pytest.approx(5.0, rel=0.02)


def test_mse_range_quantizes_better_than_minmax_with_outliers():
    values = gaussian_with_outliers(size=300_000, seed=6)
    stats = stats_of(values.astype(np.float32))
    mse_error = uint8_quantization_mse(values, *stats.range("mse"))
    minmax_error = uint8_quantization_mse(values, *stats.range("minmax"))
    assert mse_error < 0.8 * minmax_error


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_ranges_and_relu_like_data(method):
    values = np.maximum(gaussian_with_outliers(size=100_000, seed=7), 0.0)
    stats = stats_of(values)

    low, high = stats.range(method, symmetric=True)
    assert low == -high and 0.0 < high <= stats.max

    low, high = stats.range(method, percentile=99.9)
    assert 0.0 <= low < high <= stats.max


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("constant", [0.0, 3.5, -2.0])
def test_constant_tensor_gets_a_non_empty_range(method, constant):
    stats = stats_of(np.full((2, 3), constant, dtype=np.float32))
    low, high = stats.range(method)
    assert low < high and low <= constant <= high
    low, high = stats.range(method, symmetric=True)
    assert low == -high and high > 0


def test_min_values_and_method_validation():
    assert min_values("minmax") == 1
    assert min_values("percentile", 99.9) == 1_000
    assert min_values("percentile") == 100_000
    assert min_values("entropy") == min_values("mse") == 2048
    assert [needs_histogram(m) for m in METHODS] == [False, True, True, True]

    stats = stats_of(np.arange(10.0))
    for call in (
        lambda: min_values("kl"),
        lambda: needs_histogram("kl"),
        lambda: stats.range("kl"),
        lambda: CalibrationStats(["a"]).ranges("kl"),
    ):
        with pytest.raises(ValueError, match="unknown calibration method 'kl'; choose one of: minmax, percentile"):
            call()
    with pytest.raises(ValueError, match="no finite values"):
        TensorStats().range("minmax")


# ---------------------------------------------------------------------------------------------
# Running a model
# ---------------------------------------------------------------------------------------------


def conv_relu_model(weight: np.ndarray, bias: np.ndarray) -> Model:
    """x[N,2,4,4] -> 1x1 Conv (3 channels) -> 'conv' -> Relu -> 'y'."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["conv"]), helper.make_node("Relu", ["conv"], ["y"])],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 4, 4])],
        initializer=[onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return Model.from_proto(proto)


class CountingProgress:
    def __init__(self):
        self.n = 0

    def update(self, steps: int) -> None:
        self.n += steps


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_collect_stats_over_a_conv_relu_model(method):
    rng = np.random.default_rng(8)
    weight = rng.normal(size=(3, 2, 1, 1)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    data = [{"x": rng.normal(scale=1.0 + i, size=(n, 2, 4, 4)).astype(np.float32)} for i, n in enumerate([2, 3, 1])]
    inputs = np.concatenate([feed["x"] for feed in data])
    conv = np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], inputs) + bias[None, :, None, None]
    progress = CountingProgress()

    stats = collect_stats(conv_relu_model(weight, bias), ["conv", "y"], data, method=method, progress=progress)

    assert progress.n == stats.batches == 3 and stats.samples == 6
    for name, expected in (("conv", conv), ("y", np.maximum(conv, 0.0))):
        tensor = stats.tensors[name]
        assert tensor.count == expected.size
        assert tensor.min == pytest.approx(expected.min(), rel=1e-5, abs=1e-6)
        assert tensor.max == pytest.approx(expected.max(), rel=1e-5, abs=1e-6)
        assert (tensor.counts is None) == (method == "minmax")
    ranges = stats.ranges(method)
    assert set(ranges) == {"conv", "y"} and all(low < high for low, high in ranges.values())


def test_collect_stats_keeps_the_first_samples_outputs_for_a_later_comparison(monkeypatch):
    from onnxslim_cv import calib_stats

    rng = np.random.default_rng(9)
    weight = rng.normal(size=(3, 2, 1, 1)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    data = [{"x": rng.normal(size=(n, 2, 4, 4)).astype(np.float32)} for n in (2, 3, 1)]
    inputs = np.concatenate([feed["x"] for feed in data])
    y = np.maximum(np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], inputs) + bias[None, :, None, None], 0.0)

    stats = collect_stats(conv_relu_model(weight, bias), ["conv"], data, method="percentile", keep_outputs=4)

    assert [feed["x"].shape[0] for feed, _ in stats.reference] == [2, 2]  # the second batch cut at 4 samples
    np.testing.assert_array_equal(np.concatenate([feed["x"] for feed, _ in stats.reference]), inputs[:4])
    kept = np.concatenate([outputs[0] for _, outputs in stats.reference])
    np.testing.assert_allclose(kept, y[:4], rtol=1e-5, atol=1e-6)
    assert stats.tensors["conv"].count == inputs.shape[0] * 3 * 16  # statistics still see every sample
    assert collect_stats(conv_relu_model(weight, bias), ["conv"], data).reference is None  # not asked for

    monkeypatch.setattr(calib_stats._KeptOutputs, "BUDGET_BYTES", 100)
    assert collect_stats(conv_relu_model(weight, bias), ["conv"], data, keep_outputs=4).reference is None


def _kl_bin_by_bin(counts, cut, levels, epsilon=1e-4):
    """Migacz's KL(P||Q) for one cut, written out bin by bin (the reference for the fast form)."""
    total = counts.sum()
    p = counts[:cut].astype(np.float64).copy()
    p[cut - 1] += total - counts[:cut].sum()
    q = np.zeros(cut)
    for bucket in range(levels):
        members = [j for j in range(cut) if (j * levels) // cut == bucket]
        filled = [j for j in members if counts[j] > 0]
        for j in filled:
            q[j] = counts[members].sum() / len(filled)
    p, q = p / total, q / max(counts[:cut].sum(), 1e-300)
    q[(p > 0) & (q <= 0)] = epsilon
    return float(sum(p[j] * np.log(p[j] / q[j]) for j in range(cut) if p[j] > 0))


@pytest.mark.parametrize("shape", ["decaying", "sparse", "noisy", "empty tail"])
def test_kl_divergences_match_the_bin_by_bin_sum(shape):
    from onnxslim_cv.calib_stats import _kl_divergences

    rng = np.random.default_rng(3)
    bins, levels = 300, 16
    positions = np.arange(bins)
    counts = {
        "decaying": np.floor(1e6 * np.exp(-positions / 40.0)),
        "sparse": np.where(rng.random(bins) < 0.4, rng.integers(1, 500, bins), 0).astype(float),
        "noisy": rng.integers(0, 1000, bins).astype(float),
        "empty tail": np.concatenate([np.floor(1e4 * np.exp(-positions[:200] / 30.0)), np.zeros(99), [2.0]]),
    }[shape]
    cuts = np.arange(levels, bins + 1)
    fast = _kl_divergences(counts, cuts, levels)
    reference = np.array([_kl_bin_by_bin(counts, int(cut), levels) for cut in cuts])
    np.testing.assert_allclose(fast, reference, rtol=1e-9, atol=1e-12)
    assert int(np.argmin(fast)) == int(np.argmin(reference))
