"""The online audit bound: anytime validity by Monte Carlo, power, shape, persistence, the audit-rate rule."""

from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import special, stats

from cartosplit.device_runtime.audit_bound import (
    AuditConfig,
    AuditRateRule,
    TierAudit,
    audit_rate,
    log_evidence,
    log_mixture,
    log_mixture_paths,
    lower_bound,
    rejects,
    tier_audit_rate,
    upper_bound,
)

ALPHA = 0.05
STREAMS = 2000
STEPS = 5000
CHUNK = 500  # streams per vectorised block: ~20 MB per [CHUNK, STEPS] float array


def mc_margin(streams: int, alpha: float = ALPHA) -> float:
    """Three Monte-Carlo standard errors of an estimated probability alpha."""
    return 3.0 * math.sqrt(alpha * (1.0 - alpha) / streams)


def first_true(events: np.ndarray) -> np.ndarray:
    """Per row, the 1-based step of the first True; 0 where there is none."""
    hit = events.any(axis=1)
    return np.where(hit, events.argmax(axis=1) + 1, 0)


def simulate(rate: float, config: AuditConfig, streams: int, steps: int, seed: int) -> dict[str, np.ndarray]:
    """Per stream: the step of the first alarm ("rate <= epsilon" rejected) and of the first upper-bound miss
    (rate > U_t), 0 where none, computed with the module's vectorised mixture."""
    a, b = config.prior
    level = math.log(1.0 / config.alpha)
    rng = np.random.default_rng(seed)
    alarm_at, miss_at = [], []
    for start in range(0, streams, CHUNK):
        d = rng.random((min(CHUNK, streams - start), steps)) < rate
        k = np.cumsum(d, axis=1)
        n = np.arange(1, steps + 1)[None, :]
        alarm = (k > config.epsilon * n) & (log_mixture_paths(d, config.epsilon, a, b) >= level)
        # rate > U_t  <=>  the rate is outside CS_t and above k/t (CS_t is an interval around k/t)
        miss = (k < rate * n) & (log_mixture_paths(d, rate, a, b) >= level)
        alarm_at.append(first_true(alarm))
        miss_at.append(first_true(miss))
    return {"alarm_at": np.concatenate(alarm_at), "miss_at": np.concatenate(miss_at)}


# --- (i) anytime validity -------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.02, 0.005])
def test_no_more_false_alarms_or_misses_than_alpha_at_rate_epsilon(epsilon):
    config = AuditConfig(epsilon=epsilon, alpha=ALPHA)
    out = simulate(epsilon, config, STREAMS, STEPS, seed=int(epsilon * 1e4))
    false_alarms = float(np.mean(out["alarm_at"] > 0))
    misses = float(np.mean(out["miss_at"] > 0))
    either = float(np.mean((out["alarm_at"] > 0) | (out["miss_at"] > 0)))
    print(
        f"\nr = eps = {epsilon}: false alarms {false_alarms:.4f}, U misses {misses:.4f}, either {either:.4f} "
        f"over {STREAMS} streams x {STEPS} audits (alpha {ALPHA})"
    )
    limit = ALPHA + mc_margin(STREAMS)
    assert false_alarms <= limit
    assert misses <= limit
    assert either <= limit  # one CS: both sides share alpha


def test_no_false_alarm_below_epsilon():
    config = AuditConfig(epsilon=0.02, alpha=ALPHA)
    out = simulate(0.01, config, 1000, STEPS, seed=3)
    false_alarms = float(np.mean(out["alarm_at"] > 0))
    print(f"\nr = eps/2 = 0.01: false alarms {false_alarms:.4f}")
    assert false_alarms <= ALPHA + mc_margin(1000)


def test_vectorised_events_match_the_tracker_and_the_bounds():
    """The Monte Carlo counts events with the closed form; the tracker and upper_bound must agree with it."""
    config = AuditConfig(epsilon=0.02, alpha=ALPHA)
    a, b = config.prior
    rng = np.random.default_rng(11)
    d = rng.random((12, 2000)) < 0.03
    level = math.log(1.0 / ALPHA)
    above = np.cumsum(d, axis=1) > 0.02 * np.arange(1, 2001)
    vector_alarm = first_true(above & (log_mixture_paths(d, 0.02, a, b) >= level))
    rate = 0.03
    for row, expected in zip(d, vector_alarm, strict=True):
        tier = TierAudit("device", "policy-a", config)
        for t, disagreed in enumerate(row, start=1):
            tier.update(bool(disagreed), now=float(t))
            if t % 97 == 0:  # the miss event "rate > U_t" as the closed form counts it
                closed = tier.k < rate * t and log_mixture(t, tier.k, rate, a, b) >= level
                assert closed == (rate > tier.upper_bound())
        assert (tier.alarm_at or 0) == expected
        if tier.alarm:
            assert tier.alarm_time == float(tier.alarm_at)
    assert (vector_alarm > 0).any()  # r = 1.5 eps over 2000 audits: some streams must alarm


# --- (ii) power -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("epsilon", "steps", "within"), [(0.02, 5000, 2500), (0.005, 20000, 7500)])
def test_alarms_quickly_at_twice_epsilon(epsilon, steps, within):
    config = AuditConfig(epsilon=epsilon, alpha=ALPHA)
    out = simulate(2 * epsilon, config, 1000, steps, seed=7)
    at = out["alarm_at"]
    delays = at[at > 0]
    share = float(np.mean((at > 0) & (at <= within)))
    print(
        f"\nr = 2 eps = {2 * epsilon}: alarmed {np.mean(at > 0):.3f} within {steps}; within {within}: {share:.3f}; "
        f"delay median {np.median(delays):.0f}, p90 {np.percentile(delays, 90):.0f} audits"
    )
    assert share >= 0.9


# --- (iii) shape of the bound -----------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.005, 0.02])
def test_upper_bound_shrinks_towards_the_rate(rate):
    a, b = AuditConfig(epsilon=0.005).prior
    ns = [100, 1_000, 10_000, 100_000, 1_000_000]
    bounds = [upper_bound(n, round(rate * n), ALPHA, a, b) for n in ns]
    assert all(0.0 <= u <= 1.0 for u in bounds)
    assert all(later < earlier for earlier, later in itertools.pairwise(bounds))
    assert bounds[-1] - rate < 0.1 * max(rate, 0.005)
    assert bounds[-1] >= rate


def test_bound_is_wider_than_the_fixed_n_clopper_pearson_one():
    """Anytime validity has a price; a bound tighter than the fixed-n exact one would be suspicious."""
    a, b = AuditConfig(epsilon=0.005).prior
    for n, k in [(1000, 5), (5000, 25), (50_000, 250)]:
        cp = stats.beta.ppf(1 - ALPHA, k + 1, n - k)
        u = upper_bound(n, k, ALPHA, a, b)
        assert cp < u < 1.6 * cp, (n, k, u, cp)


@given(n=st.integers(1, 10**6), frac=st.floats(0, 1), alpha=st.sampled_from([0.01, 0.05, 0.2]))
@settings(max_examples=200, deadline=None)
def test_upper_bound_is_monotone_in_k(n, frac, alpha):
    a, b = AuditConfig(epsilon=0.005).prior
    k = min(n - 1, int(frac * n))
    assert upper_bound(n, k, alpha, a, b) <= upper_bound(n, k + 1, alpha, a, b)
    assert lower_bound(n, k, alpha, a, b) <= lower_bound(n, k + 1, alpha, a, b)


@given(
    n=st.integers(1, 10**7),
    frac=st.floats(0, 1),
    alpha=st.floats(1e-6, 0.5),
    a=st.floats(0.1, 20),
    b=st.floats(0.1, 1e4),
)
@settings(max_examples=300, deadline=None)
def test_bounds_are_the_ends_of_the_cs(n, frac, alpha, a, b):
    """Each end is outside the CS (M >= 1/alpha) and a point just inside it is inside: the ends are tight."""
    k = int(frac * n)
    level = math.log(1 / alpha)
    u, low = upper_bound(n, k, alpha, a, b), lower_bound(n, k, alpha, a, b)
    assert 0.0 <= low <= k / n <= u <= 1.0
    for end, toward in ((u, low), (low, u)):
        if end in (0.0, 1.0):
            continue
        assert log_mixture(n, k, end, a, b) >= level
        assert log_mixture(n, k, end + 1e-6 * (toward - end), a, b) < level


# --- the mixture itself -----------------------------------------------------------------------------------


@given(n=st.integers(0, 10**6), frac=st.floats(0, 1), p=st.floats(1e-4, 1 - 1e-4), a=st.floats(0.1, 10))
@settings(max_examples=200, deadline=None)
def test_mixture_is_a_martingale_under_its_rate(n, frac, p, a):
    """E[M_{n+1}(p) | F_n] = M_n(p) under Bernoulli(p): the one-step identity, exactly."""
    b = 3.0 * a
    k = int(frac * n)
    now = log_mixture(n, k, p, a, b)
    up, down = log_mixture(n + 1, k + 1, p, a, b), log_mixture(n + 1, k, p, a, b)
    nxt = np.logaddexp(math.log(p) + up, math.log1p(-p) + down)
    assert nxt == pytest.approx(now, abs=1e-8)


def test_mixture_matches_scipy():
    a, b = AuditConfig(epsilon=0.02).prior
    for n, k, p in [(1, 0, 0.02), (100, 3, 0.01), (10_000, 250, 0.02), (10**6, 1, 0.3)]:
        expected = special.betaln(a + k, b + n - k) - special.betaln(a, b) - k * math.log(p) - (n - k) * math.log1p(-p)
        assert log_mixture(n, k, p, a, b) == pytest.approx(expected, rel=1e-10, abs=1e-8)
    d = np.random.default_rng(0).random((3, 400)) < 0.05
    k = np.cumsum(d, axis=1)
    n = np.arange(1, 401)
    expected = special.betaln(a + k, b + n - k) - special.betaln(a, b)
    expected -= k * math.log(0.02) + (n - k) * math.log1p(-0.02)
    np.testing.assert_allclose(log_mixture_paths(d, 0.02, a, b), expected, rtol=1e-10, atol=1e-8)


@given(n=st.integers(1, 10**6), frac=st.floats(0, 1), epsilon=st.sampled_from([0.005, 0.02, 0.1]))
@settings(max_examples=300, deadline=None)
def test_alarm_iff_epsilon_lies_below_the_cs(n, frac, epsilon):
    a, b = AuditConfig(epsilon=epsilon).prior
    k = int(frac * n)
    low = lower_bound(n, k, ALPHA, a, b)
    fired = rejects(n, k, epsilon, ALPHA, a, b)
    if abs(low - epsilon) > 1e-7 * epsilon:  # off the rounding boundary the two rules agree
        assert fired == (low > epsilon)
    assert fired == (log_evidence(n, k, epsilon, a, b) >= math.log(1 / ALPHA))


# --- (v) any sequence of updates ------------------------------------------------------------------------


@given(
    updates=st.lists(st.booleans(), max_size=300),
    epsilon=st.floats(1e-4, 0.5),
    alpha=st.floats(1e-4, 0.5),
    prior_a=st.floats(0.05, 50),
)
@settings(max_examples=150, deadline=None)
def test_any_sequence_of_updates_gives_a_finite_bound_in_0_1(updates, epsilon, alpha, prior_a):
    tier = TierAudit("edge", "p", AuditConfig(epsilon=epsilon, alpha=alpha, prior_a=prior_a))
    was_alarmed = False
    for disagreed in updates:
        tier.update(disagreed, now=0.0)
        assert not (was_alarmed and not tier.alarm)  # the alarm latches
        was_alarmed = tier.alarm
    u, low = tier.upper_bound(), tier.lower_bound()
    assert not math.isnan(u) and not math.isnan(low)
    assert 0.0 <= low <= u <= 1.0
    assert not math.isnan(tier.log_evidence())
    assert (tier.n, tier.k) == (len(updates), sum(updates))
    assert 0.0 < tier_audit_rate(tier) <= 1.0


# --- (iv) persistence and policy changes ------------------------------------------------------------------


def test_round_trip_through_json_keeps_the_bound_and_the_alarm():
    tier = TierAudit("device", "policy-7", AuditConfig(epsilon=0.02, alpha=0.01, prior_a=2.0))
    rng = np.random.default_rng(5)
    for t, disagreed in enumerate(rng.random(3000) < 0.05):
        tier.update(bool(disagreed), now=1000.0 + t)
    assert tier.alarm
    back = TierAudit.from_dict(json.loads(json.dumps(tier.to_dict(), allow_nan=False)))
    assert back == tier
    assert back.upper_bound() == tier.upper_bound()
    assert (back.alarm_at, back.alarm_time) == (tier.alarm_at, tier.alarm_time)


def test_from_dict_names_every_problem():
    raw = TierAudit("device", "p").to_dict()
    raw["n"] = "12"
    raw["config"]["alpha"] = 2.0
    raw["extra"] = 1
    with pytest.raises(ValueError) as info:
        TierAudit.from_dict(raw)
    message = str(info.value)
    assert "tier_audit.n must be an integer" in message
    assert "alpha must be in (0, 1)" in message
    assert 'unknown field "extra"' in message
    raw = TierAudit("device", "p").to_dict() | {"n": 3, "k": 4}
    with pytest.raises(ValueError, match="0 <= k <= n"):
        TierAudit.from_dict(raw)


def test_a_new_policy_starts_a_new_sequence():
    tier = TierAudit("device", "old", AuditConfig(epsilon=0.02))
    for _ in range(50):
        tier.update(True, now=0.0)
    assert tier.alarm
    assert tier.for_policy("old") is tier
    fresh = tier.for_policy("new")
    assert (fresh.n, fresh.k, fresh.alarm, fresh.policy_id, fresh.config) == (0, 0, False, "new", tier.config)
    assert fresh.upper_bound() == 1.0


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="epsilon must be in"):
        AuditConfig(epsilon=0.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        AuditConfig(alpha=1.0)
    with pytest.raises(ValueError, match="prior_a"):
        AuditConfig(prior_a=0.0)
    assert AuditConfig(epsilon=0.005).prior == pytest.approx((1.0, 199.0))


# --- (vi) the audit-rate rule ---------------------------------------------------------------------------


@given(upper=st.floats(0, 1), epsilon=st.floats(1e-4, 0.5), alarm=st.booleans())
def test_audit_rate_stays_within_its_limits(upper, epsilon, alarm):
    rule = AuditRateRule(p_base=0.05, p_min=0.01, p_max=0.4)
    p = audit_rate(upper, epsilon, alarm, rule)
    assert rule.p_min <= p <= rule.p_max
    if alarm:
        assert p == rule.p_max


@given(lo=st.floats(0, 1), hi=st.floats(0, 1), epsilon=st.floats(1e-4, 0.5))
def test_audit_rate_rises_with_looseness(lo, hi, epsilon):
    lo, hi = sorted((lo, hi))
    assert audit_rate(lo, epsilon, False) <= audit_rate(hi, epsilon, False)


def test_audit_rate_is_higher_when_loose_and_lower_when_holding():
    rule = AuditRateRule(p_base=0.05, p_min=0.01, p_max=0.5, gain=2.0)
    eps = 0.01
    assert audit_rate(1.0, eps, False, rule) == 0.5  # nothing seen yet: audit at p_max
    assert audit_rate(0.015, eps, False, rule) == pytest.approx(0.05 * 1.5**2)  # loose: above p_base
    assert audit_rate(0.01, eps, False, rule) == pytest.approx(0.05)
    assert audit_rate(0.008, eps, False, rule) == pytest.approx(0.05 * 0.8**2)  # holding: below p_base
    assert audit_rate(0.0, eps, False, rule) == 0.01
    # a tier's rate falls as its audits certify a rate well below epsilon
    tier = TierAudit("device", "p", AuditConfig(epsilon=eps))
    rates = []
    for t in range(1, 20001):
        tier.update(t % 500 == 0, now=0.0)  # r = 0.2 %
        if t in (10, 1000, 20000):
            rates.append(tier_audit_rate(tier, rule))
    assert rates[0] == 0.5 and rates[0] > rates[1] > rates[2]
    assert tier.holds() and rates[2] < rule.p_base


def test_audit_rate_refuses_bad_input():
    with pytest.raises(ValueError, match="upper must be a bound"):
        audit_rate(float("nan"), 0.01, False)
    with pytest.raises(ValueError, match="p_min <= p_base"):
        AuditRateRule(p_base=0.6, p_max=0.5)


# --- cost -------------------------------------------------------------------------------------------------


def test_update_and_bound_cost_microseconds():
    tier = TierAudit("device", "p", AuditConfig(epsilon=0.005))
    flags = (np.random.default_rng(2).random(50_000) < 0.004).tolist()
    start = time.perf_counter()
    for disagreed in flags:
        tier.update(disagreed, now=0.0)
    per_update = (time.perf_counter() - start) / len(flags) * 1e6
    start = time.perf_counter()
    for _ in range(2000):
        tier.upper_bound()
    per_bound = (time.perf_counter() - start) / 2000 * 1e6
    print(f"\nupdate {per_update:.2f} us, upper_bound {per_bound:.1f} us (n = {tier.n})")
    assert per_update < 100 and per_bound < 1000  # loose: a shared CI core; the figures are printed
