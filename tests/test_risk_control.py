"""Risk-controlled calibration (export/risk_control.py): validity over repeated draws, refusal,
monotonicity, the label-free risk. Synthetic exit scores only; no model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from cartosplit.device_runtime.costs import CostProfile, SplitPoints
from cartosplit.device_runtime.policy import ExitSignals, Objective, Policy, route, search_policy
from cartosplit.export.risk_control import (
    Guarantee,
    binomial_p_values,
    calibrate_along_path,
    certify,
    crc_bounds,
    interpolated_path,
    last_within,
    ltt_bounds,
    sample_losses,
)

SPLIT = SplitPoints(router_depth=1, device=2, edge=4, total=6)
COSTS = CostProfile().tier_costs(SPLIT)
ALL_CLOUD = CostProfile().all_cloud_cost(SPLIT)


def population(n: int, seed: int) -> tuple[ExitSignals, np.ndarray]:
    """Binary task; each exit's logit = skill · (2y − 1) + noise, the final exit the most skilled."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    difficulty = rng.normal(0, 1, n)  # shared by all exits: hard samples are hard everywhere

    def exit_probs(skill: float) -> np.ndarray:
        logit = skill * (2 * labels - 1) + 1.2 * difficulty * (2 * labels - 1) + rng.normal(0, 1.5, n)
        p1 = 1 / (1 + np.exp(-logit))
        return np.stack([1 - p1, p1], axis=1)

    return ExitSignals(exit_probs(1.4), exit_probs(2.0), exit_probs(2.4)), labels


@pytest.fixture(scope="module")
def setting():
    """A fixed path (built on its own draw) and the population loss of every path index."""
    path_signals, path_labels = population(3000, seed=1)
    correct = path_signals.predictions() == path_labels[None, :]
    correct = correct | ~correct[2][None, :]  # loss 1[wrong and final right] as "correct = 1 - loss"
    anchor = search_policy(
        path_signals, path_labels, COSTS, Objective("max-drop", 1.0), use_router=False, correct=correct
    ).policy
    path = interpolated_path(anchor, path_signals, steps=60)
    pop_signals, pop_labels = population(200_000, seed=2)
    pop_tiers = np.stack([route(p, pop_signals) for p in path])
    pop_losses = {ref: sample_losses(pop_tiers, pop_signals, pop_labels, ref) for ref in ("label", "final")}
    pop_costs = COSTS[pop_tiers]  # [M, N]
    return path, pop_losses, pop_costs


def draws(setting, n: int, count: int, guarantee: Guarantee, seed: int = 0):
    """Repeated calibration draws from the population: the population risk of each chosen index."""
    _, pop_losses, pop_costs = setting
    losses = pop_losses[guarantee.reference]
    risk = losses.mean(axis=1)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        idx = rng.choice(losses.shape[1], n, replace=False)
        cert = certify(losses[:, idx], pop_costs[:, idx].mean(axis=1), guarantee, ALL_CLOUD)
        out.append((risk[cert.index], cert))
    return out


@pytest.mark.parametrize(("reference", "epsilon"), [("label", 0.02), ("final", 0.05)])
def test_ltt_violation_rate_stays_below_delta(setting, reference, epsilon):
    g = Guarantee("ltt", epsilon=epsilon, delta=0.1, reference=reference)
    results = draws(setting, n=1000, count=300, guarantee=g)
    violations = np.mean([risk > g.epsilon for risk, _ in results])
    assert violations <= g.delta + 2 * math.sqrt(g.delta * (1 - g.delta) / 300)
    # not vacuous: most draws certify a policy cheaper than all-cloud (the path starts dearer than it)
    assert np.mean([c.certified for _, c in results]) > 0.6


def test_crc_mean_risk_stays_below_epsilon(setting):
    g = Guarantee("crc", epsilon=0.02)
    results = draws(setting, n=500, count=400, guarantee=g)
    risks = np.array([risk for risk, _ in results])
    assert risks.mean() <= g.epsilon + 2 * risks.std() / math.sqrt(len(risks))
    assert np.mean([c.certified for _, c in results]) > 0.6


def test_the_plain_search_breaks_the_promise_that_ltt_keeps(setting):
    """The winner's curse the guarantee fixes: the cheapest index within epsilon on the calibration
    sample itself exceeds epsilon on the population far more often than delta."""
    _, pop_losses, _ = setting
    losses = pop_losses["label"]
    risk = losses.mean(axis=1)
    rng = np.random.default_rng(3)
    eps, picked = 0.02, []
    for _ in range(200):
        idx = rng.choice(losses.shape[1], 1000, replace=False)
        empirical = losses[:, idx].mean(axis=1)
        picked.append(risk[np.flatnonzero(empirical <= eps).max()])
    assert np.mean(np.array(picked) > eps) > 0.3


def test_refuses_when_too_few_samples(setting):
    """0.5 % at delta 0.1 needs n >= 460 even with no loss: 300 samples certify nothing cheaper."""
    g = Guarantee("ltt", epsilon=0.005, delta=0.1)
    for _, cert in draws(setting, n=300, count=20, guarantee=g):
        assert not cert.certified and cert.index == 0
        assert cert.smallest_certifiable_epsilon > 0.005
    floor = 1 - 0.1 ** (1 / 300)  # (1 - eps)^300 = delta: the least epsilon even with no loss
    assert cert.smallest_certifiable_epsilon >= floor - 1e-9


def test_crc_refuses_below_one_over_n():
    losses = np.zeros((5, 100), dtype=bool)
    cert = certify(losses, np.linspace(1.0, 0.2, 5), Guarantee("crc", epsilon=0.005), all_cloud_cost=0.9)
    assert not cert.certified  # (0 + 1) / 101 > 0.005 whatever the losses
    assert cert.smallest_certifiable_epsilon == pytest.approx(1 / 101)


def test_larger_epsilon_never_costs_more(setting):
    _, pop_losses, pop_costs = setting
    idx = np.random.default_rng(4).choice(pop_costs.shape[1], 800, replace=False)
    losses, costs = pop_losses["label"][:, idx], pop_costs[:, idx].mean(axis=1)
    for kind in ("ltt", "crc"):
        spent = [certify(losses, costs, Guarantee(kind, epsilon=e), ALL_CLOUD).mean_cost for e in (0.01, 0.02, 0.04)]
        assert spent[0] >= spent[1] >= spent[2]


def test_bounds_match_the_binomial_test():
    """Index j passes LTT at epsilon exactly when every p-value up to it is <= delta."""
    rng = np.random.default_rng(5)
    losses = np.zeros((8, 400), dtype=bool)
    for j in range(1, 8):
        losses[j, rng.choice(400, 3 * j, replace=False)] = True
    bounds = ltt_bounds(losses, 0.1)
    for eps in (0.01, 0.02, 0.04, 0.08):
        p = binomial_p_values(losses, eps)
        passes = np.concatenate([[True], p[1:] <= 0.1])
        expected = int(np.argmin(passes)) - 1 if not passes.all() else 7
        assert last_within(bounds, eps) == max(expected, 0)
    k, n = int(losses[3].sum()), 400
    assert bounds[3] == pytest.approx(stats.beta.ppf(0.9, k + 1, n - k))


def test_crc_bound_uses_the_monotonised_loss():
    # sample 0 is lost at index 1 only; index 2 is cheaper but "right" again: monotonised it stays lost
    losses = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    assert crc_bounds(losses).tolist() == pytest.approx([1 / 5, 2 / 5, 2 / 5])


def test_label_free_loss_is_disagreement_and_bounds_the_drop(setting):
    signals, labels = population(2000, seed=6)
    tiers = np.stack([route(Policy(0.7, 0.8), signals)])
    free = sample_losses(tiers, signals, None, "final")[0]
    labelled = sample_losses(tiers, signals, labels, "label")[0]
    final = signals.predictions()[2]
    assert (labelled <= free).all()  # a loss against the label needs a changed answer
    answered = np.where(
        tiers[0] == 0, signals.predictions()[0], np.where(tiers[0] == 1, signals.predictions()[1], final)
    )
    drop = (final == labels).mean() - (answered == labels).mean()
    assert drop <= labelled.mean() <= free.mean()
    with pytest.raises(ValueError, match="needs labels"):
        sample_losses(tiers, signals, None, "label")


def test_interpolated_path_is_nested():
    """Along the path samples only move to earlier exits: safest first, all-final at index 0."""
    signals, _ = population(1500, seed=7)
    path = interpolated_path(Policy(0.8, 0.85), signals, steps=40)
    assert path[0].alpha_device == math.inf and path[0].alpha_edge == math.inf
    tiers = np.stack([route(p, signals) for p in path])
    assert (np.diff(tiers, axis=0) <= 0).all()  # tier codes 0 device < 1 edge < 2 cloud never rise
    assert (tiers[-1] == 0).all()


def test_guarantee_validates_its_numbers():
    with pytest.raises(ValueError, match="epsilon"):
        Guarantee("ltt", epsilon=0.5 * 100)
    with pytest.raises(ValueError, match="guarantee"):
        Guarantee("hoeffding")
    with pytest.raises(ValueError, match="reference"):
        Guarantee(reference="teacher")


def test_calibrating_along_the_path_never_costs_more_for_a_larger_epsilon():
    """The path's anchor does not depend on epsilon, so the certified prefix only grows with it."""
    path_signals, path_labels = population(1500, seed=8)
    cal_signals, cal_labels = population(3000, seed=9)
    for kind in ("ltt", "crc"):
        spent = []
        for eps in (0.005, 0.01, 0.02, 0.04):
            found = calibrate_along_path(
                path_signals, path_labels, cal_signals, cal_labels, COSTS, ALL_CLOUD,
                Guarantee(kind, epsilon=eps), use_router=False, grid_size=10,
            )  # fmt: skip
            spent.append(found.certification.mean_cost if found.policy is not None else ALL_CLOUD)
        assert all(a >= b - 1e-12 for a, b in itertools.pairwise(spent)), spent
        assert spent[-1] < ALL_CLOUD


def test_a_router_that_says_nothing_falls_back_to_the_cascade_s_path():
    """The router's candidates include the cascade's paths, so on the path data its chosen path never
    scores worse than the cascade's (a noise router may still win there by chance: that is what the
    held-out verdict and the certification are for)."""
    from cartosplit.export.risk_control import choose_path, path_score

    signals, labels = population(1500, seed=10)
    noise = np.random.default_rng(11).dirichlet(np.ones(3), len(labels))
    routed = ExitSignals(signals.probs_device, signals.probs_edge, signals.probs_final, noise)
    guarantee = Guarantee("crc", epsilon=0.01)

    def score(path):
        tiers = np.stack([route(p, routed) for p in path])
        return path_score(sample_losses(tiers, routed, labels, "label"), COSTS[tiers].mean(axis=1))

    with_router = choose_path(routed, labels, COSTS, guarantee, use_router=True, grid_size=10, margin_grid_size=6)
    cascade = choose_path(routed, labels, COSTS, guarantee, use_router=False, grid_size=10, margin_grid_size=6)
    assert score(with_router) <= score(cascade) + 1e-12
