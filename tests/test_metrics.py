"""Set metrics (device_runtime/metrics.py), the metric-aware search, and the promise summaries of
`bench tradeoff` (benchmarks/promise.py): hand-computed cases, no model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cartosplit.benchmarks.promise import PROTOCOLS, Candidate, half_splits, promise_kept, run_protocols
from cartosplit.device_runtime.costs import CostProfile, SplitPoints
from cartosplit.device_runtime.metrics import confusion_counts, metric_from_counts, set_metric
from cartosplit.device_runtime.policy import ExitSignals, Objective, answers, route, search_policy


def test_mcc_and_f1_by_hand():
    #            tp tp tp fp fn fn tn tn tn tn
    pred = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    gold = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    assert confusion_counts(pred, gold) == (3, 1, 2, 4)
    assert set_metric("accuracy", pred, gold) == pytest.approx(0.7)
    assert set_metric("f1", pred, gold) == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))  # 6/9
    mcc = (3 * 4 - 1 * 2) / math.sqrt(4 * 5 * 5 * 6)
    assert set_metric("mcc", pred, gold) == pytest.approx(mcc)
    assert set_metric("mcc", np.ones(4, int), np.array([1, 0, 1, 0])) == 0.0  # an empty margin: 0
    assert set_metric("mcc", gold, gold) == pytest.approx(1.0) and set_metric("mcc", 1 - gold, gold) == -1.0
    vector = metric_from_counts("f1", np.array([3, 0]), np.array([1, 0]), np.array([2, 0]), np.array([4, 9]))
    assert vector.tolist() == pytest.approx([6 / 9, 0.0])
    with pytest.raises(ValueError, match="metric"):
        set_metric("auc", pred, gold)
    with pytest.raises(ValueError, match="binary"):
        set_metric("mcc", np.array([0, 2]), np.array([0, 1]))


def _signals(n: int, seed: int) -> tuple[ExitSignals, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)  # imbalanced, as CoLA: accuracy and MCC disagree

    def probs(skill):
        logit = skill * (2 * labels - 1) + rng.normal(0, 1.5, n)
        p1 = 1 / (1 + np.exp(-logit))
        return np.stack([1 - p1, p1], axis=1)

    return ExitSignals(probs(0.8), probs(1.4), probs(2.2), rng.dirichlet([1, 1, 1], n)), labels


def test_search_keeps_the_drop_in_the_metric_it_is_given():
    signals, labels = _signals(600, seed=1)
    costs = CostProfile().tier_costs(SplitPoints(1, 2, 4, 6))
    final = signals.predictions()[2]
    for metric in ("mcc", "f1", "accuracy"):
        found = search_policy(signals, labels, costs, Objective("max-drop", 1.0, metric=metric), grid_size=10)
        tiers = route(found.policy, signals)
        drop = set_metric(metric, final, labels) - set_metric(metric, answers(tiers, signals), labels)
        assert drop <= 0.01 + 1e-9  # on the samples searched, the metric's own drop is within 1 pt
    with pytest.raises(ValueError, match="accuracy"):
        search_policy(signals, labels, costs, Objective(metric="mcc"), correct=np.ones((3, 600), bool))


def test_half_splits_cover_dev_both_ways():
    pairs = half_splits(11, splits=3, seed=0)
    assert len(pairs) == 6
    for a, b in pairs:
        assert sorted(np.concatenate([a, b]).tolist()) == list(range(11))
    assert (pairs[0][0] == pairs[1][1]).all()


def test_run_protocols_reports_the_promise_keys():
    calib, calib_labels = _signals(900, seed=2)
    dev, dev_labels = _signals(800, seed=3)
    split = SplitPoints(1, 2, 4, 6)
    costs = CostProfile().tier_costs(split)
    cands = [
        Candidate("cartosplit", {"calib": calib, "dev": dev}, costs, "policy", use_router=True),
        Candidate("confidence_exit", {"calib": calib, "dev": dev}, costs, "confidence"),
    ]
    out = run_protocols(
        cands, {"calib": calib_labels, "dev": dev_labels}, CostProfile().all_cloud_cost(split), "mcc",
        (2.0,), 0.1, splits=3, fits_a=2, log=lambda *_: None,
    )  # fmt: skip
    for kind in ("ltt", "crc", "none"):
        for protocol in PROTOCOLS:
            row = out["cartosplit"][2.0][kind][protocol]
            assert {"violation_rate", "mean_drop_pt", "mean_cut", "n_fits", "epsilon_pt", "delta"} <= set(row)
            assert row["n_fits"] == (2 if protocol == "train_split" else 6)
            assert (row["delta"] == 0.1) == (kind == "ltt") and row["epsilon_pt"] == 2.0
            assert 0 <= row["violation_rate"] <= 1 and row["metric"] == "mcc"
            assert ("smallest_certifiable_epsilon_pt" in row) == (kind != "none")
            assert promise_kept(row, kind) in (True, False)


def test_promise_report_renders_tables_headline_and_plot(tmp_path):
    from cartosplit.benchmarks.promise import (
        best_under_guarantee,
        headline,
        headline_markdown,
        plot_promise,
        promise_markdown,
    )

    calib, calib_labels = _signals(600, seed=4)
    dev, dev_labels = _signals(500, seed=5)
    split = SplitPoints(1, 2, 4, 6)
    costs = CostProfile().tier_costs(split)
    signals = {"calib": calib, "dev": dev}
    cands = [Candidate(name, signals, costs, kind) for name, kind in
             (("cartosplit", "policy"), ("dimee_thresholds", "policy"), ("confidence_exit", "confidence"))]  # fmt: skip
    out = run_protocols(
        cands, {"calib": calib_labels, "dev": dev_labels}, CostProfile().all_cloud_cost(split), "accuracy",
        (0.5, 2.0), 0.1, splits=2, fits_a=2, log=lambda *_: None,
    )  # fmt: skip
    baselines = ["dimee_thresholds", "confidence_exit"]
    task = {
        "metric": "accuracy",
        "promise": {k: dict(out["cartosplit"][0.5][k]) for k in ("ltt", "crc", "none")},
        "promise_best_baseline": {
            k: {p: best_under_guarantee(out, baselines, 0.5, k, p) for p in PROTOCOLS} for k in ("ltt", "crc", "none")
        },
        "promise_methods": {m: {f"{e:g}": v for e, v in rows.items()} for m, rows in out.items()},
    }
    lines = promise_markdown("toy", task)
    assert any(line.startswith("| cartosplit | ltt | (b) cross-fit") for line in lines)
    head = headline({"toy": task})
    assert head["ltt"]["cross_fit"]["tasks"] == ["toy"]
    assert headline_markdown(head)[1].startswith("## Headline")
    plot_promise("toy", task, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
