"""Data cartography (Swayamdipta et al., EMNLP 2020) over a multi-exit model, and the three-tier grouping.

Pure numpy maths; the data-map plot is the only function that touches matplotlib.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cartosplit.device_runtime.policy import EASY, GROUP_NAMES, HARD, MEDIUM

EXIT_NAMES = ("device", "edge", "final")


@dataclass(frozen=True)
class GroupingRule:
    """A sample is *learned* by an exit when its confidence >= min_confidence and variability <= max_variability.

    easy = learned by the device exit; medium = not easy but learned by the edge exit; hard = the rest.
    """

    min_confidence: float = 0.75
    max_variability: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_confidence <= 1.0 or not 0.0 <= self.max_variability <= 0.5:
            raise ValueError(
                "min_confidence must lie in [0, 1] and max_variability in [0, 0.5] (the largest std "
                f"of a probability), got {self.min_confidence}, {self.max_variability}"
            )


@dataclass
class Cartography:
    """Per-sample statistics over epochs, each of shape [N, exits]."""

    confidence: np.ndarray
    variability: np.ndarray
    correctness: np.ndarray


def compute_cartography(gold_prob: np.ndarray, correct: np.ndarray) -> Cartography:
    """Confidence = mean gold-label probability over epochs, variability = its (population) std,
    correctness = fraction of epochs predicted right. Inputs have shape [epochs, N, exits]."""
    gold_prob = np.asarray(gold_prob, dtype=np.float64)
    correct = np.asarray(correct)
    if gold_prob.ndim != 3 or gold_prob.shape != correct.shape:
        raise ValueError(
            f"training dynamics must be [epochs, samples, exits] with matching shapes, got "
            f"{gold_prob.shape} and {correct.shape}"
        )
    if gold_prob.shape[0] < 1:
        raise ValueError("cartography needs at least one epoch of training dynamics")
    if np.isnan(gold_prob).any():
        raise ValueError("training dynamics contain NaN: an epoch was not fully recorded")
    return Cartography(
        confidence=gold_prob.mean(axis=0),
        variability=gold_prob.std(axis=0),
        correctness=correct.astype(np.float64).mean(axis=0),
    )


def assign_groups(carto: Cartography, rule: GroupingRule) -> np.ndarray:
    """Group index (policy.EASY / MEDIUM / HARD) per sample; exit 0 is the device exit, exit 1 the edge's."""
    learned = (carto.confidence >= rule.min_confidence) & (carto.variability <= rule.max_variability)
    groups = np.full(len(carto.confidence), HARD, dtype=np.int64)
    groups[learned[:, 1]] = MEDIUM
    groups[learned[:, 0]] = EASY
    return groups


@dataclass(frozen=True)
class AdaptiveGrouping:
    """Groups by rank, so no tier is empty by construction (the fixed rule left QNLI 0 % easy).

    Each exit's *learnedness* is confidence − variability. The ``easy_share`` of samples with the
    highest learnedness at the device exit are easy; of the rest, the ``medium_share`` (of all samples)
    with the highest learnedness at the edge exit are medium; the others are hard. The thresholds are
    thus quantiles of the task's own confidence distribution, not constants."""

    easy_share: float = 1 / 3
    medium_share: float = 1 / 3

    def __post_init__(self) -> None:
        if not (0 < self.easy_share < 1 and 0 < self.medium_share < 1 and self.easy_share + self.medium_share < 1):
            raise ValueError(
                f"adaptive group shares must be in (0, 1) and sum below 1, got {self.easy_share}, {self.medium_share}"
            )


def assign_groups_adaptive(carto: Cartography, rule: AdaptiveGrouping) -> np.ndarray:
    """Group index per sample by the ranks of learnedness (see ``AdaptiveGrouping``); ties broken by index."""
    n = len(carto.confidence)
    if n < 3:
        raise ValueError(f"adaptive grouping needs at least 3 samples, got {n}")
    learned = carto.confidence - carto.variability
    n_easy = min(n - 2, max(1, round(rule.easy_share * n)))
    n_medium = min(n - n_easy - 1, max(1, round(rule.medium_share * n)))
    groups = np.full(n, HARD, dtype=np.int64)
    easy = np.argsort(-learned[:, 0], kind="stable")[:n_easy]
    groups[easy] = EASY
    rest = np.flatnonzero(groups == HARD)
    medium = rest[np.argsort(-learned[rest, 1], kind="stable")[:n_medium]]
    groups[medium] = MEDIUM
    return groups


@dataclass
class GroupSummary:
    counts: dict[str, int]
    shares: dict[str, float]
    rule: dict

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_groups(groups: np.ndarray, rule: GroupingRule) -> GroupSummary:
    counts = np.bincount(groups, minlength=3)
    n = max(int(counts.sum()), 1)
    return GroupSummary(
        counts={g: int(c) for g, c in zip(GROUP_NAMES, counts, strict=True)},
        shares={g: float(c / n) for g, c in zip(GROUP_NAMES, counts, strict=True)},
        rule=asdict(rule),
    )


def plot_data_map(carto: Cartography, groups: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Confidence vs variability for each exit, coloured by group: the data map of the paper."""
    import matplotlib

    matplotlib.use("Agg")  # headless: workstations over ssh and CI have no display
    import matplotlib.pyplot as plt

    colours = {EASY: "#1b9e77", MEDIUM: "#d95f02", HARD: "#7570b3"}
    n_exits = carto.confidence.shape[1]
    fig, axes = plt.subplots(1, n_exits, figsize=(4.2 * n_exits, 4.2), sharey=True)
    axes = np.atleast_1d(axes)
    rng = np.random.default_rng(0)
    shown = rng.permutation(len(groups))[:5000]  # a readable cloud; the JSON keeps every sample
    for k, ax in enumerate(axes):
        for g in (HARD, MEDIUM, EASY):
            sel = shown[groups[shown] == g]
            ax.scatter(
                carto.variability[sel, k],
                carto.confidence[sel, k],
                s=6,
                alpha=0.5,
                c=colours[g],
                label=f"{GROUP_NAMES[g]} ({(groups == g).mean():.0%})",
            )
        ax.set_xlabel("variability (std of gold-label prob.)")
        ax.set_title(f"{EXIT_NAMES[k] if k < len(EXIT_NAMES) else k} exit")
        ax.set_xlim(0, 0.5)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("confidence (mean gold-label prob.)")
    axes[0].legend(loc="lower right", markerscale=3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
