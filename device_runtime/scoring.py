"""Scoring ``cartosplit run``'s answers: accuracy and the task's metric against the given labels, with
bootstrap intervals, and the comparison with all-cloud. Pure numpy, like the rest of the device runtime
(no scikit-learn, scipy or torch).

The metric is the task's as GLUE reports it: MCC for CoLA, F1 for MRPC (of label 1, GLUE's positive
class), accuracy otherwise; own data (no task) gets accuracy, and F1 of label 1 too when there are two
labels. Intervals are percentile bootstraps over the inputs, seeded, so a rerun prints the same numbers;
the difference with all-cloud is a *paired* bootstrap (the same resampled inputs for both), far tighter
than two separate intervals would suggest.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from cartosplit.device_runtime.metrics import metric_from_counts, set_metric

# the metric of export/data.py TASKS, by task; not imported from there: a device install has no export package
TASK_METRICS = {"cola": "mcc", "mrpc": "f1"}
_CHUNK_ELEMENTS = 4_000_000  # resampled indices held at once: ~32 MB, whatever the number of inputs


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """The share of predictions equal to their label (any number of classes)."""
    return set_metric("accuracy", np.asarray(predictions), np.asarray(labels))


def mcc(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation of binary 0/1 labels; 0 where it is undefined (one class only), as scikit-learn."""
    return set_metric("mcc", np.asarray(predictions), np.asarray(labels))


def f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of label 1 (binary 0/1 labels); 0 where there is no positive at all, as scikit-learn."""
    return set_metric("f1", np.asarray(predictions), np.asarray(labels))


def metrics_for(task: str | None, n_labels: int) -> tuple[str, ...]:
    """Accuracy first, then the task's metric (see the module's docstring)."""
    if task is None:
        return ("accuracy", "f1") if n_labels == 2 else ("accuracy",)
    metric = TASK_METRICS.get(re.sub(r"[\s_\-]", "", task).lower())
    return ("accuracy", metric) if metric else ("accuracy",)


@dataclass(frozen=True)
class Bootstrap:
    """Percentile bootstrap settings."""

    resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95


def _resampled(n: int, boot: Bootstrap) -> Iterator[np.ndarray]:
    """Resampled input indices, (resamples in this chunk, n), from one seeded generator."""
    rng = np.random.default_rng(boot.seed)
    per_chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, boot.resamples, per_chunk):
        yield rng.integers(0, n, size=(min(per_chunk, boot.resamples - start), n))


def _metric_per_row(name: str, predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``name`` of each row of (resamples, n) predictions and labels, vectorised."""
    if name == "accuracy":
        return (predictions == labels).mean(axis=1)
    p, y = predictions == 1, labels == 1
    tp, fp, fn = (p & y).sum(axis=1), (p & ~y).sum(axis=1), (~p & y).sum(axis=1)
    return metric_from_counts(name, tp, fp, fn, labels.shape[1] - tp - fp - fn)


def _bounds(values: np.ndarray, boot: Bootstrap) -> list[float]:
    tail = (1 - boot.confidence) / 2
    return [float(v) for v in np.quantile(values, [tail, 1 - tail])]


def interval(name: str, predictions: Sequence[int], labels: Sequence[int], boot: Bootstrap = Bootstrap()) -> dict:
    """``{"value": metric, "ci": [low, high]}`` over the inputs, the interval a percentile bootstrap's."""
    p, y = np.asarray(predictions), np.asarray(labels)
    value = set_metric(name, p, y)
    resampled = np.concatenate([_metric_per_row(name, p[idx], y[idx]) for idx in _resampled(len(y), boot)])
    return {"value": value, "ci": _bounds(resampled, boot)}


def paired_difference(
    name: str, kit: Sequence[int], other: Sequence[int], labels: Sequence[int], boot: Bootstrap = Bootstrap()
) -> dict:
    """``{"value": metric(kit) - metric(other), "ci": [low, high]}``, both scored on the same resampled inputs."""
    a, b, y = np.asarray(kit), np.asarray(other), np.asarray(labels)
    value = set_metric(name, a, y) - set_metric(name, b, y)
    chunks = [
        _metric_per_row(name, a[idx], y[idx]) - _metric_per_row(name, b[idx], y[idx])
        for idx in _resampled(len(y), boot)
    ]
    return {"value": value, "ci": _bounds(np.concatenate(chunks), boot)}


# --- one run's summary ------------------------------------------------------------------------------------


@dataclass
class ScoreBook:
    """What ``cartosplit run`` answered, one entry per answered input: the given label (-1: none), the
    kit's answer, the tier that gave it, and all-cloud's answer (-1: not compared)."""

    labels: list[int] = field(default_factory=list)
    kit: list[int] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    all_cloud: list[int] = field(default_factory=list)
    all_cloud_failed: int = 0

    def add(self, label: int | None, kit: int, tier: str, all_cloud: int | None = None) -> None:
        self.labels.append(-1 if label is None else label)
        self.kit.append(kit)
        self.tiers.append(tier)
        self.all_cloud.append(-1 if all_cloud is None else all_cloud)

    @property
    def labelled(self) -> int:
        return sum(label >= 0 for label in self.labels)


def summarise(book: ScoreBook, task: str | None, label_names: Sequence[str], boot: Bootstrap = Bootstrap()) -> dict:
    """The run's summary (``--summary FILE`` writes it as JSON): the kit's metrics on the labelled inputs,
    the share each tier answered, and, with all-cloud answers, the comparison."""
    y, kit, cloud = (np.asarray(v, dtype=np.int64) for v in (book.labels, book.kit, book.all_cloud))
    tiers = np.asarray(book.tiers, dtype=object)
    labelled = y >= 0
    names = metrics_for(task, len(label_names))
    summary: dict = {"answered": len(y), "labelled": int(labelled.sum()), "task": task, "metrics": list(names)}
    if len(names) > 1:
        summary["positive_label"] = label_names[1]  # MCC and F1 take label 1 as the positive class
    summary["bootstrap"] = asdict(boot)
    scored = labelled if labelled.any() else np.ones(len(y), dtype=bool)  # no labels: shares of all answers
    summary["tiers"] = _tier_shares(tiers[scored], kit[scored], y[scored] if labelled.any() else None)
    if labelled.any():
        summary["kit"] = {name: interval(name, kit[labelled], y[labelled], boot) for name in names}
    compared = cloud >= 0
    if compared.any() or book.all_cloud_failed:
        summary["all_cloud"] = _comparison(kit, cloud, y, names, boot, book.all_cloud_failed)
    return summary


def _tier_shares(tiers: np.ndarray, kit: np.ndarray, labels: np.ndarray | None) -> dict:
    """Per tier that answered: its share of the inputs (and its accuracy on them, when labelled)."""
    out = {}
    for tier in sorted(set(tiers.tolist())):
        mine = tiers == tier
        out[tier] = {"share": float(mine.mean()), "answered": int(mine.sum())}
        if labels is not None:
            out[tier]["accuracy"] = accuracy(kit[mine], labels[mine])
    return out


def _comparison(
    kit: np.ndarray, cloud: np.ndarray, y: np.ndarray, names: tuple[str, ...], boot: Bootstrap, failed: int
) -> dict:
    """Agreement of the kit's answers with all-cloud's, and on the labelled ones: all-cloud's metrics and the
    paired difference kit - all-cloud (negative: the kit is worse)."""
    compared = cloud >= 0
    out: dict = {"compared": int(compared.sum()), "failed": failed}
    if not compared.any():
        return out
    out["agreement"] = interval("accuracy", kit[compared], cloud[compared], boot)
    both = compared & (y >= 0)
    out["labelled"] = int(both.sum())
    if both.any():
        out["metrics"] = {name: interval(name, cloud[both], y[both], boot) for name in names}
        out["difference"] = {name: paired_difference(name, kit[both], cloud[both], y[both], boot) for name in names}
    return out


def describe(summary: dict) -> list[str]:
    """The summary as lines for stderr."""
    boot = summary["bootstrap"]
    ci = f"{100 * boot['confidence']:.0f} % bootstrap intervals, {boot['resamples']} resamples"
    shares = ", ".join(f"{tier} {100 * t['share']:.1f} %" for tier, t in summary["tiers"].items())
    lines = []
    if "kit" in summary:
        lines.append(f"{summary['labelled']} labelled inputs: {_values(summary['kit'])} ({ci}); answered by {shares}")
    else:
        lines.append(f"{summary['answered']} inputs, none labelled: answered by {shares}")
    cloud = summary.get("all_cloud")
    if cloud is not None:
        failed = f" ({cloud['failed']} all-cloud calls failed)" if cloud["failed"] else ""
        if "agreement" not in cloud:
            lines.append(f"all-cloud: no input compared{failed}")
            return lines
        agreement = _values({"agreement": cloud["agreement"]})
        line = f"all-cloud on {cloud['compared']} inputs{failed}: {agreement}"
        if "metrics" in cloud:
            line += f"; on the {cloud['labelled']} labelled: all-cloud {_values(cloud['metrics'])}"
            line += f"; kit - all-cloud {_values(cloud['difference'], signed=True)}"
        lines.append(line)
    return lines


def _values(metrics: dict, signed: bool = False) -> str:
    form = "{:+.4f}" if signed else "{:.4f}"
    return ", ".join(
        f"{name} {form.format(m['value'])} [{form.format(m['ci'][0])}, {form.format(m['ci'][1])}]"
        for name, m in metrics.items()
    )


__all__ = [
    "TASK_METRICS",
    "Bootstrap",
    "ScoreBook",
    "accuracy",
    "describe",
    "f1",
    "interval",
    "mcc",
    "metrics_for",
    "paired_difference",
    "summarise",
]
