"""``onnxslim_cv.activations``: per-channel moments merged batch by batch."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_cv.activations import ChannelMoments


def _batches():
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((n, 5, 3, 4)) * 3 + np.arange(5)[None, :, None, None]).astype(np.float32)
            for n in (1, 2, 1, 3)]


def test_moments_match_numpy_on_the_concatenated_batches():
    moments = ChannelMoments(1)
    for batch in _batches():
        moments.update(batch)
    x = np.moveaxis(np.concatenate(_batches()).astype(np.float64), 1, 0).reshape(5, -1)
    np.testing.assert_allclose(moments.mean, x.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(moments.mean_square, np.square(x).mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(moments.mean_abs, np.abs(x).mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(moments.variance, x.var(axis=1), rtol=1e-9)


def test_mean_only_gives_the_same_mean_and_refuses_the_rest():
    full, lean = ChannelMoments(1), ChannelMoments(1, mean_only=True)
    for batch in _batches():
        full.update(batch)
        lean.update(batch)
    np.testing.assert_array_equal(lean.mean, full.mean)
    assert lean.count == full.count == 7 * 3 * 4
    with pytest.raises(ValueError, match="mean_square"):
        lean.mean_square
    with pytest.raises(ValueError, match="mean_abs"):
        lean.mean_abs
