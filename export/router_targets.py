"""What the router learns to predict, and whether it earned its place: pure numpy, unit-tested without a model.

Group sources (``GROUP_SOURCES``):
- ``train``: cartography of the trained samples' own dynamics (the paper's reading; in-sample);
- ``heldout``: cartography of the calibration split's dynamics, recorded every epoch but never trained
  on, so the groups describe how the model treats samples it has not seen;
- ``outcome``: no cartography, a direct target: the cheapest exit of the final model that is right on a
  held-out sample (easy = device, medium = edge, hard = only the final exit). A comparison: it shows
  whether the cartography labels add anything over the outcome they are meant to predict.

Groupings (``GROUPINGS``) for the two cartography sources: ``fixed`` (confidence >= 0.75 and
variability <= 0.2 by default: ``cartosplit.export.cartography.GroupingRule``) or ``adaptive`` (by rank, no tier
empty: ``cartosplit.export.cartography.AdaptiveGrouping``).

The verdict (``judge_router``): a router that is no better than always predicting the majority group,
or whose path does not beat the cascade's by >= 1 % of all-cloud's cost on held-out path samples under
the run's cost profile (without a profile: whose P(hard) ranks "no early exit is right" no better than
the device exit's confidence), is refused and the policy is the cascade; calibration says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import rankdata

from cartosplit.device_runtime.policy import EASY, HARD, MEDIUM
from cartosplit.export.cartography import (
    AdaptiveGrouping,
    Cartography,
    GroupingRule,
    assign_groups,
    assign_groups_adaptive,
    compute_cartography,
)

GROUP_SOURCES = ("train", "heldout", "outcome")
MIN_PATH_GAIN = 0.01  # a deployed router must spare >= 1 % of all-cloud's cost over the cascade (held out)
GROUPINGS = ("fixed", "adaptive")


def check_variant(source: str, grouping: str) -> None:
    if source not in GROUP_SOURCES:
        raise ValueError(f"router groups must be one of {GROUP_SOURCES}, got {source!r}")
    if grouping not in GROUPINGS:
        raise ValueError(f"router grouping must be one of {GROUPINGS}, got {grouping!r}")


def group_samples(carto: Cartography, grouping: str, fixed_rule: GroupingRule | None = None) -> np.ndarray:
    """Easy / medium / hard per sample of a cartography, by the fixed rule or by rank."""
    if grouping == "adaptive":
        return assign_groups_adaptive(carto, AdaptiveGrouping())
    if grouping == "fixed":
        return assign_groups(carto, fixed_rule or GroupingRule())
    raise ValueError(f"router grouping must be one of {GROUPINGS}, got {grouping!r}")


def heldout_cartography(gold_prob: np.ndarray, correct: np.ndarray) -> Cartography:
    """Cartography of the calibration split's per-epoch dynamics ([epochs, N, exits]); refuses a run that
    did not record them (trained before held-out dynamics, or resumed from such a checkpoint)."""
    if np.isnan(np.asarray(gold_prob, dtype=np.float64)).any():
        raise ValueError("this run's held-out dynamics are incomplete (trained before they were recorded?)")
    return compute_cartography(gold_prob, correct)


def outcome_groups(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The cheapest right exit per sample ([3, N] predicted labels at device, edge, final): easy when the
    device exit is right, medium when only a later exit and the edge's is, hard when only the final
    exit is. A sample no exit gets right is easy: wherever it goes it is lost, so the device costs least."""
    right = np.asarray(predictions) == np.asarray(labels)[None, :]
    groups = np.full(right.shape[1], EASY, dtype=np.int64)
    groups[~right[0] & right[1]] = MEDIUM
    groups[~right[0] & ~right[1] & right[2]] = HARD
    return groups


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the ``positive`` samples (Mann-Whitney U with mid-ranks
    for ties); NaN when either class is empty."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class RouterVerdict:
    """Whether the router is kept, and the held-out evidence it was judged on."""

    kept: bool
    reason: str
    samples: int
    router_accuracy: float  # its group predictions against the groups of held-out samples
    majority_accuracy: float  # always the most frequent group: the first bar
    router_auroc: float  # P(hard) ranking "no early exit is right"
    confidence_auroc: float  # 1 - the device exit's confidence ranking the same: the second bar
    path_gain: float | None = None  # (cascade's - router's path score) / all-cloud cost, on the path samples
    forced: bool = False  # kept although it lost (--keep-router)

    def to_dict(self) -> dict:
        return asdict(self)


def judge_router(
    hard_prob: np.ndarray,
    device_confidence: np.ndarray,
    no_early_exit_right: np.ndarray,
    router_accuracy: float,
    majority_accuracy: float,
    keep_anyway: bool = False,
    path_gain: float | None = None,
    min_path_gain: float = MIN_PATH_GAIN,
) -> RouterVerdict:
    """Keep the router only if it beats the majority group and, given ``path_gain`` (what its path spares
    over the cascade's under the run's cost profile, on held-out path samples, as a share of all-cloud's
    cost), spares at least ``min_path_gain``; without ``path_gain``, only if its P(hard) ranks the samples
    no early exit gets right better than the device exit's confidence does.

    The AUROC is reported either way, but it does not decide once the profile is known: the cascade pays
    the device slice to read its confidence, so a router with a weaker signal still pays where device
    compute is dear (benchmarks/results/router.md: gains on a Pi or a phone over LTE), and one with a
    better signal that spares nothing changes nothing worth deploying. A router that loses is never
    deployed silently."""
    target = np.asarray(no_early_exit_right, dtype=bool)
    r_auc = auroc(hard_prob, target)
    c_auc = auroc(1.0 - np.asarray(device_confidence), target)
    failures = []
    if not router_accuracy > majority_accuracy:
        failures.append(
            f"its group accuracy {router_accuracy:.3f} is no better than the majority's {majority_accuracy:.3f}"
        )
    weaker = not (r_auc > c_auc)  # NaN (one class empty) counts as weaker: nothing shows it ranks anything
    if path_gain is None:  # no cost profile to weigh it by: the signal alone decides
        if weaker:
            failures.append(
                f"its P(hard) ranks 'no early exit is right' with AUROC {r_auc:.3f}, "
                f"no better than the device exit's confidence ({c_auc:.3f})"
            )
    elif path_gain < min_path_gain:
        failures.append(
            f"its path spares only {100 * path_gain:.1f} % of all-cloud's cost over the cascade's on held-out path "
            f"samples (AUROC {r_auc:.3f} vs the device confidence's {c_auc:.3f})"
        )
    kept = not failures or keep_anyway
    if not failures:
        why = f"AUROC {r_auc:.3f} {'<=' if weaker else '>'} the device confidence's {c_auc:.3f}"
        if path_gain is not None:
            why += f"; its path beats the cascade's by {100 * path_gain:.1f} % of all-cloud's cost (held out)"
        reason = f"kept: group accuracy {router_accuracy:.3f} > majority {majority_accuracy:.3f}; {why}"
    else:
        reason = ("kept because --keep-router was given, although " if keep_anyway else "refused: ") + "; ".join(
            failures
        )
    return RouterVerdict(
        kept,
        reason,
        len(target),
        float(router_accuracy),
        float(majority_accuracy),
        r_auc,
        c_auc,
        None if path_gain is None else float(path_gain),
        keep_anyway and bool(failures),
    )


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """A seeded fold id per sample, folds as equal as possible."""
    if n < folds:
        raise ValueError(f"{folds}-fold cross-fitting needs at least {folds} samples, got {n}")
    return np.random.default_rng(seed).permutation(np.arange(n) % folds)


def out_of_fold(
    fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray], n: int, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Predictions for each of ``n`` samples from a model fitted without it: ``fit_predict(fit_index,
    predict_index)`` returns [len(predict_index), ...]. Used where the router is fitted on the same held-out
    samples that shape the policy path, so the path sees the router as unseen traffic will."""
    ids = fold_ids(n, folds, seed)
    out = None
    for fold in range(folds):
        held = np.flatnonzero(ids == fold)
        pred = np.asarray(fit_predict(np.flatnonzero(ids != fold), held))
        if out is None:
            out = np.zeros((n, *pred.shape[1:]), dtype=pred.dtype)
        out[held] = pred
    assert out is not None
    return out


__all__ = [
    "GROUPINGS",
    "GROUP_SOURCES",
    "RouterVerdict",
    "auroc",
    "check_variant",
    "fold_ids",
    "group_samples",
    "heldout_cartography",
    "judge_router",
    "out_of_fold",
    "outcome_groups",
]
