"""tools/evaluate.py: the per-task scoring, on stand-in entries and runners (no shared models)."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import load_tool


class _Entry:
    def __init__(self, labels):
        self.labels = labels

    def labelled(self, limit):
        for index, label in enumerate(self.labels[:limit]):
            yield {"index": index}, label


class _Run:
    """Scores whose argmax is ``predicted[i]``; the reference predicts the label every time."""

    def __init__(self, predicted, labels):
        self.predicted, self.labels, self.reference = predicted, labels, object()

    def __call__(self, feed):
        def scores(winner):
            values = np.zeros((1, 10), np.float32)
            values[0, winner] = 1.0
            return [values]

        index = feed["index"]
        return scores(self.predicted[index]), scores(self.labels[index])


def test_classification_records_which_images_were_right_in_order():
    evaluate = load_tool("evaluate")
    labels = [3, 1, 4, 1, 5]
    result = evaluate._classification(_Entry(labels), _Run([3, 0, 4, 2, 5], labels), 5)
    assert result["top1_hits"] == "10101"
    assert result["metrics"]["correct"] == 3 and result["samples"] == 5
    assert result["agreement"]["top1_agreement"] == 0.6  # the reference is always right here
    # one-hot "probabilities": where they agree nothing moved, where they differ the KL is log(1/eps)-sized
    assert 0 < result["agreement"]["kl_mean"]


def test_kl_divergence_reads_logits_and_probabilities_alike():
    evaluate = load_tool("evaluate")
    logits = np.array([2.0, 0.5, -1.0, 0.0])
    probabilities = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(evaluate.as_probabilities(logits), probabilities)
    np.testing.assert_array_equal(evaluate.as_probabilities(probabilities), probabilities)  # a Softmax output kept
    assert evaluate.kl_divergence(logits, logits) == 0.0
    assert evaluate.kl_divergence(probabilities, logits) < 1e-12
    flatter = logits / 2
    p, q = probabilities, np.exp(flatter) / np.exp(flatter).sum()
    expected = float(np.sum(p * np.log(p / q)))
    assert evaluate.kl_divergence(logits, flatter) == pytest.approx(expected, rel=1e-9)
    assert evaluate.kl_divergence(flatter, logits) != pytest.approx(expected, rel=1e-3)  # not symmetric
