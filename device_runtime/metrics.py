"""Set metrics of a classification, from predictions or vectorised from confusion counts: pure numpy.

GLUE reports CoLA by Matthews correlation and MRPC by F1 (and accuracy): metrics computed over the
whole set, not means of a per-sample loss. The policy search and the reports use these so that a
threshold tuned "within 0.5 pt" means 0.5 pt of the metric the task is judged by.
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "mcc", "f1")


def check_metric(name: str) -> str:
    if name not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {name!r}")
    return name


def metric_from_counts(name: str, tp, fp, fn, tn) -> np.ndarray:
    """``name`` from confusion counts of the positive class (label 1); arrays broadcast.

    MCC and F1 are 0 where their denominator is (an empty margin), as scikit-learn returns.
    """
    check_metric(name)
    tp, fp, fn, tn = (np.asarray(c, dtype=np.float64) for c in (tp, fp, fn, tn))
    if name == "accuracy":
        return (tp + tn) / (tp + fp + fn + tn)
    with np.errstate(invalid="ignore", divide="ignore"):
        if name == "f1":
            value = 2 * tp / (2 * tp + fp + fn)
        else:
            value = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return np.where(np.isfinite(value), value, 0.0)


def confusion_counts(predictions: np.ndarray, labels: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) with label 1 as the positive class."""
    p, y = np.asarray(predictions) == 1, np.asarray(labels) == 1
    return int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum()), int((~p & ~y).sum())


def set_metric(name: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """The metric over the whole set. Accuracy works for any number of classes; MCC and F1 need two."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("a metric needs at least one sample")
    if check_metric(name) == "accuracy":
        return float((predictions == labels).mean())
    if max(int(predictions.max()), int(labels.max())) > 1:
        raise ValueError(f"{name} is defined here for binary labels (0/1) only")
    return float(metric_from_counts(name, *confusion_counts(predictions, labels)))
