"""Weight layouts, masks and layer selection of :mod:`onnxslim_cv.sparsity`."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_cv.ir import Model
from onnxslim_cv.sparsity import (
    SparseLayer,
    as_matrix,
    from_matrix,
    global_sparsities,
    group_rows,
    holds_nm,
    magnitude_mask,
    nm_eligible,
    nm_mask,
    parse_nm,
    sparsifiable_layers,
)
from onnxslim_cv.testing import models as test_models

LAYOUTS = [
    SparseLayer("c", "Conv", "w", (8, 4, 3, 3)),
    SparseLayer("g", "Conv", "w", (8, 2, 3, 3), groups=2),
    SparseLayer("t", "ConvTranspose", "w", (8, 3, 2, 2), groups=2),
    SparseLayer("gt", "Gemm", "w", (5, 8), trans_b=True),
    SparseLayer("gn", "Gemm", "w", (8, 5)),
    SparseLayer("m", "MatMul", "w", (8, 5)),
]


@pytest.mark.parametrize("layer", LAYOUTS, ids=lambda layer: layer.node)
def test_matrix_layout_round_trips_and_has_the_reduction_as_columns(layer):
    weight = np.random.default_rng(0).standard_normal(layer.shape)
    matrix = as_matrix(layer, weight)
    assert matrix.shape[1] == layer.reduction
    assert sum(len(rows) for rows in group_rows(layer)) == matrix.shape[0]
    np.testing.assert_array_equal(from_matrix(layer, matrix), weight)


def test_conv_columns_run_along_input_channels():
    layer = SparseLayer("c", "Conv", "w", (1, 4, 1, 2))
    weight = np.arange(8.0).reshape(1, 4, 1, 2)  # w[0, c, 0, k] = 2c + k
    # columns: kernel position 0 for channels 0..3, then kernel position 1
    np.testing.assert_array_equal(as_matrix(layer, weight)[0], [0, 2, 4, 6, 1, 3, 5, 7])


def test_conv_transpose_matrix_maps_an_input_pixel_to_its_output_taps():
    layer = SparseLayer("t", "ConvTranspose", "w", (4, 3, 2, 2))
    weight = np.random.default_rng(1).standard_normal(layer.shape)
    pixel = np.random.default_rng(2).standard_normal(4)
    taps = np.einsum("c,cokl->okl", pixel, weight).reshape(-1)
    np.testing.assert_allclose(as_matrix(layer, weight) @ pixel, taps)


def test_magnitude_mask_zeroes_exactly_the_smallest():
    values = np.array([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0]])
    keep = magnitude_mask(values, 0.5)
    assert keep.sum() == 3
    np.testing.assert_array_equal(keep, [[False, True, False], [True, False, True]])
    assert magnitude_mask(values, 0.0).all()


def test_nm_mask_keeps_n_largest_of_every_m_input_channels():
    layer = SparseLayer("c", "Conv", "w", (16, 8, 3, 3))
    weight = np.random.default_rng(3).standard_normal(layer.shape)
    keep = nm_mask(layer, weight, 2, 4)
    assert keep.mean() == 0.5
    assert holds_nm(layer, weight * keep, 2, 4)
    assert not holds_nm(layer, weight, 2, 4)
    blocks = np.abs(as_matrix(layer, weight)).reshape(16, -1, 4)
    kept = as_matrix(layer, keep).reshape(16, -1, 4)
    # every kept weight is at least as large as every zeroed one of its block
    assert (np.where(kept, blocks, np.inf).min(-1) >= np.where(kept, -np.inf, blocks).max(-1)).all()


def test_nm_eligibility_needs_whole_groups_of_m_channels():
    assert nm_eligible(SparseLayer("c", "Conv", "w", (8, 6, 3, 3)), 4) is not None
    assert nm_eligible(SparseLayer("c", "Conv", "w", (8, 8, 3, 3)), 4) is None
    assert nm_eligible(SparseLayer("m", "MatMul", "w", (10, 3)), 4) is not None


@pytest.mark.parametrize("text", ["4:2", "2:2", "0:4", "2-4", "a:b", "2:4:8"])
def test_parse_nm_rejects_malformed_patterns(text):
    with pytest.raises(ValueError, match="N:M"):
        parse_nm(text)


def test_parse_nm_accepts_patterns():
    assert parse_nm("2:4") == (2, 4)
    assert parse_nm(" 4:8 ") == (4, 8)


def test_first_last_and_depthwise_layers_are_left_dense_by_default():
    model = Model.from_proto(test_models.build("mobilenetv2_block"))
    model.infer_shapes()
    layers, skipped = sparsifiable_layers(model)
    reasons = " ".join(skipped.values())
    assert "first layer" in reasons and "last layer" in reasons and "depthwise" in reasons
    assert layers and not any(layer.first or layer.last or layer.depthwise for layer in layers)
    everything, none_skipped = sparsifiable_layers(model, include_depthwise=True, include_first=True, include_last=True)
    assert len(everything) == len(layers) + len(skipped)
    assert not none_skipped


def test_global_threshold_reaches_the_overall_sparsity():
    rng = np.random.default_rng(0)
    layers = [SparseLayer("a", "MatMul", "wa", (100, 10)), SparseLayer("b", "MatMul", "wb", (50, 10))]
    weights = {"wa": rng.standard_normal((100, 10)), "wb": 0.1 * rng.standard_normal((50, 10))}
    plain = global_sparsities(layers, weights, 0.5)
    total = sum(plain[layer.node] * layer.params for layer in layers) / sum(layer.params for layer in layers)
    assert total == pytest.approx(0.5, abs=1e-3)
    assert plain["b"] > 0.9  # the small-scale layer is emptied by a shared threshold ...
    normalized = global_sparsities(layers, weights, 0.5, normalize=True)
    assert abs(normalized["a"] - normalized["b"]) < 0.1  # ... unless magnitudes are normalised
