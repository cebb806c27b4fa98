"""The tradeoff benchmark's baselines: pure maths on exit probabilities, no model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cartosplit.benchmarks.baselines import (
    choose,
    entropy,
    exit_scores,
    matthews_corr,
    patience_tiers,
    random_tiers,
    search_shared_threshold,
    shared_threshold_tiers,
)
from cartosplit.device_runtime.costs import (
    TIER_CLOUD_DIRECT,
    TIER_CLOUD_VIA_EDGE,
    TIER_DEVICE,
    TIER_EDGE,
    TIER_NAMES,
    CostProfile,
    SplitPoints,
)
from cartosplit.device_runtime.policy import ExitSignals, Objective, Outcome, oracle_tiers

COSTS = CostProfile().tier_costs(SplitPoints(1, 2, 4, 6))


def probs(*p1: float) -> np.ndarray:
    """Binary probabilities from P(label 1)."""
    p = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p, p], axis=1)


def test_entropy_of_uniform_and_certain_rows() -> None:
    assert entropy(np.array([[0.5, 0.5]]))[0] == pytest.approx(math.log(2))
    assert entropy(np.array([[1.0, 0.0]]))[0] == pytest.approx(0.0, abs=1e-9)


def test_entropy_and_confidence_rank_binary_samples_alike() -> None:
    rng = np.random.default_rng(0)
    signals = ExitSignals(probs(*rng.random(50)), probs(*rng.random(50)), probs(*rng.random(50)))
    conf, _ = exit_scores(signals, "confidence")
    neg_entropy, _ = exit_scores(signals, "entropy")
    assert (np.argsort(conf, kind="stable") == np.argsort(neg_entropy, kind="stable")).all()
    with pytest.raises(ValueError, match="confidence"):
        exit_scores(signals, "margin")


def test_shared_threshold_takes_the_first_sure_exit() -> None:
    tiers = shared_threshold_tiers(np.array([0.9, 0.6, 0.6]), np.array([0.1, 0.95, 0.5]), 0.8)
    assert tiers.tolist() == [TIER_DEVICE, TIER_EDGE, TIER_CLOUD_VIA_EDGE]


def test_patience_one_answers_at_the_edge_when_device_and_edge_agree() -> None:
    signals = ExitSignals(probs(0.9, 0.9, 0.1), probs(0.8, 0.2, 0.3), probs(0.7, 0.7, 0.7))
    assert patience_tiers(signals, 1).tolist() == [TIER_EDGE, TIER_CLOUD_VIA_EDGE, TIER_EDGE]
    assert (patience_tiers(signals, 0) == TIER_DEVICE).all()
    assert (patience_tiers(signals, 2) == TIER_CLOUD_VIA_EDGE).all()
    with pytest.raises(ValueError):
        patience_tiers(signals, -1)


def test_oracle_picks_the_cheapest_right_exit() -> None:
    signals = ExitSignals(probs(0.9, 0.2, 0.2, 0.2), probs(0.9, 0.9, 0.2, 0.2), probs(0.9, 0.9, 0.9, 0.2))
    tiers, answer = oracle_tiers(signals, np.array([1, 1, 1, 1]))
    assert tiers.tolist() == [TIER_DEVICE, TIER_EDGE, TIER_CLOUD_DIRECT, TIER_DEVICE]  # none right: device
    assert answer.tolist() == [1, 1, 1, 0]


def test_random_tiers_keep_exact_shares() -> None:
    shares = {"device": 0.5, "edge": 0.3, "cloud_via_edge": 0.1, "cloud_direct": 0.1}
    draws = random_tiers(shares, 101, draws=5)
    assert len(draws) == 5
    for tiers in draws:
        counts = np.bincount(tiers, minlength=len(TIER_NAMES))
        assert counts.sum() == 101
        assert counts.tolist() == [51, 30, 10, 10]  # the rounding leftover goes to the largest share
    assert not all((draws[0] == d).all() for d in draws[1:])  # they are shuffled
    with pytest.raises(ValueError):
        random_tiers({"device": 0.0}, 10)


def test_choose_prefers_cheapest_feasible_then_reward() -> None:
    cheap_bad = ("a", Outcome(0.80, 0.1, {}, 10))
    mid = ("b", Outcome(0.895, 0.3, {}, 10))
    dear_good = ("c", Outcome(0.90, 0.6, {}, 10))
    assert choose([cheap_bad, mid, dear_good], 0.90, Objective("max-drop", 0.5))[0] == "b"
    assert choose([cheap_bad, mid, dear_good], 0.90, Objective("max-drop", 0.0))[0] == "c"
    assert choose([cheap_bad, mid, dear_good], 0.90, Objective("reward", beta=1.0))[0] == "a"
    with pytest.raises(ValueError):
        choose([], 0.9, Objective())


def test_search_shared_threshold_meets_the_drop_on_its_own_data() -> None:
    rng = np.random.default_rng(1)
    n = 400
    labels = rng.integers(0, 2, n)

    # exits that are right more often the deeper they are, and surer when right
    def exit_probs(skill: float) -> np.ndarray:
        right = rng.random(n) < skill
        sure = 0.5 + 0.5 * rng.random(n) * np.where(right, 1.0, 0.6)
        p1 = np.where(right == (labels == 1), sure, 1 - sure)
        return probs(*p1)

    signals = ExitSignals(exit_probs(0.75), exit_probs(0.85), exit_probs(0.9))
    threshold, outcome = search_shared_threshold(signals, labels, COSTS, Objective("max-drop", 0.5))
    reference = float((signals.predictions()[2] == labels).mean())
    assert outcome.accuracy >= reference - 0.005
    assert outcome.mean_cost <= COSTS[TIER_CLOUD_VIA_EDGE]
    assert math.isinf(threshold) or 0.5 <= threshold <= 1.0


def test_matthews_corr_matches_known_values() -> None:
    assert matthews_corr(np.array([1, 0, 1, 0]), np.array([1, 0, 1, 0])) == pytest.approx(1.0)
    assert matthews_corr(np.array([0, 1, 0, 1]), np.array([1, 0, 1, 0])) == pytest.approx(-1.0)
    assert matthews_corr(np.array([1, 1, 1, 1]), np.array([1, 0, 1, 0])) == 0.0  # one column empty
    preds, labels = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    tp, tn, fp, fn = 2, 1, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews_corr(preds, labels) == pytest.approx(expected)
