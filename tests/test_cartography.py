import numpy as np
import pytest

from cartosplit.device_runtime.policy import EASY, HARD, MEDIUM
from cartosplit.export.cartography import (
    Cartography,
    GroupingRule,
    assign_groups,
    compute_cartography,
    plot_data_map,
    summarize_groups,
)


def test_statistics_match_hand_computed_values():
    # 2 epochs, 2 samples, 3 exits
    gold = np.array(
        [
            [[0.2, 0.6, 0.9], [1.0, 0.5, 0.5]],
            [[0.4, 0.8, 0.9], [0.0, 0.5, 0.7]],
        ]
    )
    correct = gold > 0.5
    carto = compute_cartography(gold, correct)
    np.testing.assert_allclose(carto.confidence, [[0.3, 0.7, 0.9], [0.5, 0.5, 0.6]])
    np.testing.assert_allclose(carto.variability, [[0.1, 0.1, 0.0], [0.5, 0.0, 0.1]])
    np.testing.assert_allclose(carto.correctness, [[0.0, 1.0, 1.0], [0.5, 0.0, 0.5]])


def test_grouping_rule_picks_the_earliest_exit_that_learned_the_sample():
    confidence = np.array([[0.9, 0.95, 0.99], [0.5, 0.9, 0.99], [0.9, 0.9, 0.9], [0.3, 0.4, 0.9]])
    variability = np.array([[0.05, 0.05, 0.0], [0.1, 0.1, 0.0], [0.3, 0.1, 0.0], [0.0, 0.0, 0.0]])
    carto = Cartography(confidence, variability, np.zeros_like(confidence))
    groups = assign_groups(carto, GroupingRule(min_confidence=0.75, max_variability=0.2))
    # sample 2 is confident at the device exit but unstable there -> medium, not easy
    assert groups.tolist() == [EASY, MEDIUM, MEDIUM, HARD]
    summary = summarize_groups(groups, GroupingRule())
    assert summary.counts == {"easy": 1, "medium": 2, "hard": 1}
    assert summary.shares["medium"] == 0.5


def test_stricter_rule_never_makes_more_samples_easy():
    rng = np.random.default_rng(0)
    carto = compute_cartography(rng.random((4, 300, 3)), rng.random((4, 300, 3)) > 0.5)
    loose = assign_groups(carto, GroupingRule(0.5, 0.3))
    strict = assign_groups(carto, GroupingRule(0.7, 0.1))
    assert (strict == EASY).sum() <= (loose == EASY).sum()
    assert (strict == HARD).sum() >= (loose == HARD).sum()


@pytest.mark.parametrize(
    ("gold", "match"),
    [
        (np.zeros((2, 3)), "epochs, samples, exits"),
        (np.full((1, 2, 3), np.nan), "NaN"),
        (np.zeros((0, 2, 3)), "at least one epoch"),
    ],
)
def test_bad_dynamics_are_refused(gold, match):
    with pytest.raises(ValueError, match=match):
        compute_cartography(gold, np.zeros_like(gold, dtype=bool))


def test_grouping_rule_validates_its_range():
    with pytest.raises(ValueError, match="max_variability"):
        GroupingRule(0.7, 0.9)


def test_data_map_is_written(tmp_path):
    rng = np.random.default_rng(1)
    carto = compute_cartography(rng.random((3, 50, 3)), rng.random((3, 50, 3)) > 0.5)
    path = plot_data_map(carto, assign_groups(carto, GroupingRule()), tmp_path / "map.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
