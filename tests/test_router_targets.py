"""The router's targets and verdict: adaptive groups, outcome groups, AUROC, refusal, cross-fitting (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cartosplit.device_runtime.policy import EASY, HARD, MEDIUM
from cartosplit.export.cartography import AdaptiveGrouping, Cartography, assign_groups_adaptive
from cartosplit.export.router_targets import (
    auroc,
    check_variant,
    group_samples,
    heldout_cartography,
    judge_router,
    out_of_fold,
    outcome_groups,
)


def _carto(confidence: np.ndarray, variability: np.ndarray | None = None) -> Cartography:
    variability = np.zeros_like(confidence) if variability is None else variability
    return Cartography(confidence, variability, np.zeros_like(confidence))


@settings(max_examples=60, deadline=None)
@given(st.integers(3, 200), st.integers(0, 10_000))
def test_adaptive_groups_never_leave_a_tier_empty(n, seed):
    rng = np.random.default_rng(seed)
    # even when every sample is perfectly learned by every exit (the fixed rule: 100 % easy)
    conf = np.ones((n, 3)) if seed % 2 else rng.random((n, 3))
    groups = assign_groups_adaptive(_carto(conf), AdaptiveGrouping())
    assert set(np.unique(groups)) == {EASY, MEDIUM, HARD}


def test_adaptive_groups_rank_by_device_then_edge_learnedness():
    conf = np.array([[0.9, 0.1, 0], [0.2, 0.95, 0], [0.1, 0.2, 0], [0.8, 0.9, 0], [0.45, 0.3, 0], [0.05, 0.9, 0]])
    groups = assign_groups_adaptive(_carto(conf), AdaptiveGrouping(easy_share=1 / 3, medium_share=1 / 3))
    # the two best at the device exit are easy; of the rest, the two best at the edge are medium
    assert groups.tolist() == [EASY, MEDIUM, HARD, EASY, HARD, MEDIUM]
    # variability lowers learnedness: a confident but unstable sample drops out of easy
    var = np.zeros_like(conf)
    var[0, 0] = 0.5
    shaky = assign_groups_adaptive(_carto(conf, var), AdaptiveGrouping(1 / 3, 1 / 3))
    assert shaky[0] != EASY


def test_group_shares_are_validated():
    with pytest.raises(ValueError, match="sum below 1"):
        AdaptiveGrouping(0.6, 0.5)
    with pytest.raises(ValueError, match="at least 3"):
        assign_groups_adaptive(_carto(np.ones((2, 3))), AdaptiveGrouping())
    with pytest.raises(ValueError, match="router groups"):
        check_variant("kfold", "fixed")
    with pytest.raises(ValueError, match="grouping"):
        group_samples(_carto(np.ones((3, 3))), "quantile")


def test_outcome_groups_are_the_cheapest_right_exit():
    labels = np.array([1, 1, 1, 1, 0])
    preds = np.array(
        [
            [1, 0, 0, 0, 1],  # device
            [0, 1, 0, 0, 1],  # edge
            [0, 0, 1, 0, 1],  # final
        ]
    )
    # right at the device; only at the edge; only at the final exit; nowhere (-> device); nowhere
    assert outcome_groups(preds, labels).tolist() == [EASY, MEDIUM, HARD, EASY, EASY]


def test_heldout_cartography_refuses_unrecorded_dynamics():
    gold = np.full((2, 4, 3), np.nan)
    with pytest.raises(ValueError, match="held-out dynamics"):
        heldout_cartography(gold, np.zeros((2, 4, 3), dtype=bool))
    gold = np.random.default_rng(0).random((2, 4, 3))
    carto = heldout_cartography(gold, gold > 0.5)
    assert np.allclose(carto.confidence, gold.mean(0))


def test_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 60).astype(float)  # ties on purpose: they count one half
    positive = rng.random(60) < 0.4
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auroc(scores, positive) == pytest.approx(pairs)
    assert auroc(np.arange(4.0), np.array([False, False, True, True])) == 1.0
    assert np.isnan(auroc(np.arange(3.0), np.zeros(3, dtype=bool)))


def test_a_router_is_kept_only_when_it_beats_both_bars():
    rng = np.random.default_rng(2)
    target = rng.random(400) < 0.3
    informative = np.where(target, 0.7, 0.3) + 0.1 * rng.random(400)
    weak_confidence = rng.random(400)  # the device confidence says nothing here
    kept = judge_router(informative, weak_confidence, target, router_accuracy=0.6, majority_accuracy=0.5)
    assert kept.kept and kept.router_auroc > kept.confidence_auroc and kept.reason.startswith("kept")

    # the device confidence knows more than the router: refused, and the reason says so
    sharp_confidence = np.where(target, 0.2, 0.9)
    lost = judge_router(weak_confidence, sharp_confidence, target, 0.6, 0.5)
    assert not lost.kept and "no better than the device exit's confidence" in lost.reason
    # no better than the majority group: refused, even with a good AUROC
    majority = judge_router(informative, weak_confidence, target, 0.5, 0.5)
    assert not majority.kept and "majority" in majority.reason
    # forced: kept, and marked as forced
    forced = judge_router(weak_confidence, sharp_confidence, target, 0.6, 0.5, keep_anyway=True)
    assert forced.kept and forced.forced and "--keep-router" in forced.reason


def test_out_of_fold_never_predicts_a_sample_from_a_fit_that_saw_it():
    seen_by: dict[int, set] = {}

    def fit_predict(fit, held):
        assert not set(fit) & set(held)
        for i in held:
            seen_by[int(i)] = set(map(int, fit))
        return np.stack([held, held * 2], axis=1).astype(float)

    out = out_of_fold(fit_predict, 23, folds=5, seed=3)
    assert out.shape == (23, 2) and np.array_equal(out[:, 0], np.arange(23))
    assert all(i not in fit for i, fit in seen_by.items()) and len(seen_by) == 23
    with pytest.raises(ValueError, match="at least 5"):
        out_of_fold(fit_predict, 4, folds=5)


def test_with_a_cost_profile_a_router_is_kept_only_where_its_path_spares_enough():
    rng = np.random.default_rng(4)
    target = rng.random(400) < 0.3
    weak = rng.random(400)
    sharp_confidence = np.where(target, 0.2, 0.9)
    # a weaker signal than the device confidence, but read before the device spends compute: it pays
    spares = judge_router(weak, sharp_confidence, target, 0.6, 0.5, path_gain=0.08)
    assert spares.kept and "beats the cascade's by 8.0 %" in spares.reason and spares.path_gain == 0.08
    barely = judge_router(weak, sharp_confidence, target, 0.6, 0.5, path_gain=0.005)
    assert not barely.kept and "spares only 0.5 %" in barely.reason
    # a better signal that spares nothing is refused too: deploying it would change nothing worth having
    informative = np.where(target, 0.7, 0.3)
    assert not judge_router(informative, weak, target, 0.6, 0.5, path_gain=0.0).kept
    # what it spares never excuses a router that is no better than the majority group
    assert not judge_router(weak, sharp_confidence, target, 0.5, 0.5, path_gain=0.5).kept
