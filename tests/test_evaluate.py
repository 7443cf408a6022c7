"""tools/evaluate.py: the per-task scoring, on stand-in entries and runners (no shared models)."""

from __future__ import annotations

import numpy as np

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
