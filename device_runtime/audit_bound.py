"""Keeping the accuracy promise online: an anytime-valid bound on each tier's disagreement with the cloud.

Deployed, an input answered on the device or the edge is, with probability p (the audit rate), also sent to
the cloud. The cloud's (full model's) answer is the reference, so each audit yields a Bernoulli
"disagreement" D = 1[early answer != cloud answer] without any label. Per answering tier this module keeps
an upper confidence bound on the disagreement rate r = P(D = 1), a sequential test of "r <= epsilon", and
the rule that sets the audit rate.

Why the disagreement rate: the kit's promise (``cartosplit.export.risk_control``) is an accuracy drop
against all-cloud <= epsilon with probability >= 1 - delta. A drop needs a changed answer, so
``drop <= P(early answer != cloud answer)``: a bound on the disagreement rate bounds the drop. Per tier:
the overall disagreement is ``sum_j P(tier j answers) * r_j`` (the cloud tiers' r is 0), so every answering
tier's ``r_j <= epsilon`` gives the promise for the whole mix. Holding every tier at once at level alpha
needs alpha split over the tiers (Bonferroni: alpha / number of answering tiers).

The construction: the beta-binomial (Robbins) mixture martingale. For a Bernoulli stream with n audits
and k disagreements, and a prior Beta(a, b) over alternatives q fixed before the data,

    M_n(p) = integral of q^k (1 - q)^(n-k) dBeta(q; a, b) / (p^k (1 - p)^(n-k))
           = B(a + k, b + n - k) / B(a, b) / (p^k (1 - p)^(n-k))

is, under the true rate p, a nonnegative martingale with M_0 = 1 (a mixture of likelihood ratios), so by
Ville's inequality P(exists n: M_n(p) >= 1/alpha) <= alpha. The confidence sequence is
CS_n = {p : M_n(p) < 1/alpha}: log M_n(p) is convex in p and M_n(k/n) <= 1, so CS_n is an interval
(L_n, U_n) around k/n, whose ends are found numerically; P(exists n: p outside CS_n) <= alpha, so in particular
P(exists n: p > U_n) <= alpha. References: H. Robbins (1970), "Statistical methods related to the law of
the iterated logarithm", Ann. Math. Statist. 41; T. L. Lai (1976), "On confidence sequences", Ann. Statist.
4; S. R. Howard, A. Ramdas, J. McAuliffe, J. Sekhon (2021), "Time-uniform, nonparametric, nonasymptotic
confidence sequences", Ann. Statist. 49 (the beta-binomial mixture, their section 3).

Why this one and not the betting (hedged capital) CS of Waudby-Smith & Ramdas (2023, JRSS-B, "Estimating
means of bounded random variables by betting"): the data are exactly Bernoulli, where the mixture is a
likelihood-ratio martingale with sufficient statistic (n, k). An update is two integer additions plus a
closed-form alarm check (``math.lgamma``); the bound is found on demand by a few Newton steps on a convex
function; the persisted state is two exact integers, with no float drift. The betting CS keeps a capital
process per candidate mean on a grid (O(grid) per update, and a fine grid near 0 for rates of 0.5-5 %) to
be as tight. Tightness at small rates comes from the prior: the default Beta(1, (1 - eps) / eps) has mean
epsilon and puts its mass where the decision is made. Measured against Beta(1, 1): at n = 5000 audits and
r = epsilon = 0.5 % the bound is 0.87 % instead of 1.05 %, and r = 2 epsilon is detected after ~2,600
audits instead of ~4,400 (the fixed-n Clopper-Pearson bound, not anytime-valid, is 0.70 %). The prior is
fixed by epsilon before any data, as Ville's inequality needs.

The test of H0: r <= epsilon (one-sided, composite) is read off the same CS: the alarm fires at the first n
with k/n > epsilon and M_n(epsilon) >= 1/alpha, i.e. exactly when epsilon lies below the whole interval
CS_n (its lower end L_n >= epsilon, epsilon excluded). Its evidence is the e-process
E_n = M_n(min(epsilon, k/n)) = inf over p <= epsilon of M_n(p) (M_n decreases on (0, k/n]): under any
p <= epsilon, E_n <= M_n(p), a nonnegative martingale, so P(exists n: E_n >= 1/alpha) <= alpha by Ville.
Since one CS serves both, "the upper bound misses the rate, or a false alarm" has probability <= alpha
in all (not 2 alpha). The alarm latches: it is the stopping rule of a sequential test.

Auditing at a rate that moves keeps this valid: the audit decision for an input is made before the input's
disagreement is seen, from the tier's past only (a predictable p_t; which tier answers is routing, fixed by
the policy), so given the past each audited input's D is still Bernoulli(r) and the audited subsequence is
the same i.i.d. stream (optional sampling). What would break it: auditing chosen by the current input's
features (e.g. only low-confidence answers), which biases the audited rate.

A new policy starts a new sequence (``TierAudit.for_policy``): the thresholds decide which inputs each tier
answers, so the disagreement rate changes with them and audits under old thresholds are draws from another
Bernoulli. Each new sequence spends its own alpha.

Numpy and stdlib only (no scipy on the device install).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from cartosplit.device_runtime.json_checks import INT, NUMBER, OBJECT, STR, Problems, at, nullable

BRACKET_STEPS = 8  # bisection before Newton: the root is then within 1/256 of an outside point off the pole
MAX_BRACKET_STEPS = 1100  # enough halvings to reach the smallest subnormal float
NEWTON_STEPS = 60  # a cap; a bound converges in a handful


def _xlogy(x: float, y: float) -> float:
    """x * log(y) with 0 * log(0) = 0 (no disagreements: the p^k factor is 1 even at p = 0)."""
    return 0.0 if x == 0 else x * math.log(y)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _check_counts(n: int, k: int) -> None:
    if not (0 <= k <= n):
        raise ValueError(f"counts must satisfy 0 <= k <= n (k disagreements in n audits), got n={n}, k={k}")


def _log_mixture_at(n: int, k: int, p: float, log_post: float) -> float:
    """log M_n(p) given ``log_post`` = log B(a + k, b + n - k) - log B(a, b), the part free of p."""
    if (p <= 0.0 and k > 0) or (p >= 1.0 and k < n):
        return math.inf
    return log_post - _xlogy(k, p) - _xlogy(n - k, 1.0 - p)


def log_mixture(n: int, k: int, p: float, a: float, b: float) -> float:
    """log M_n(p): the beta-binomial mixture martingale at rate ``p`` after ``k`` disagreements in ``n`` audits.

    ``+inf`` where ``p`` is impossible given the data (p = 0 with k > 0, p = 1 with k < n)."""
    _check_counts(n, k)
    return _log_mixture_at(n, k, p, _log_beta(a + k, b + n - k) - _log_beta(a, b))


def _cs_end(n: int, k: int, alpha: float, a: float, b: float, end: float) -> float:
    """The end of CS_n towards ``end`` (1: upper, 0: lower), always a point known to be outside the CS, so
    that rounding only widens it.

    f(p) = log M_n(p) - log(1/alpha) is convex, negative at k/n and rising towards ``end``. A few bisection
    steps bracket the root away from the pole at ``end``; Newton steps from the outside point then move
    monotonically towards the root and stay outside (a convex f lies above its tangents), quadratically."""
    _check_counts(n, k)
    if n == 0:
        return end
    level = math.log(1.0 / alpha)
    log_post = _log_beta(a + k, b + n - k) - _log_beta(a, b)

    def f(p: float) -> float:
        return _log_mixture_at(n, k, p, log_post) - level

    if f(end) < 0.0:  # k = n (upper) or k = 0 (lower): the end itself is in the CS
        return end
    inside, outside = k / n, end
    for step in range(MAX_BRACKET_STEPS):
        if step >= BRACKET_STEPS and outside != end:  # off the pole too: f(end) is +inf there
            break
        mid = 0.5 * (inside + outside)
        inside, outside = (mid, outside) if f(mid) < 0.0 else (inside, mid)
    if outside == end:  # the root is within float rounding of the end: the end is the bound
        return end
    value = f(outside)
    for _ in range(NEWTON_STEPS):
        slope = (n - k) / (1.0 - outside) - k / outside  # f'(p); nonzero away from k/n
        step = outside - value / slope
        if not (min(inside, outside) < step < max(inside, outside)):
            break
        step_value = f(step)
        if step_value < 0.0:  # rounding put the step just inside: the root is between it and ``outside``
            inside = step
            break
        converged = abs(step - outside) <= 1e-13 * max(step, outside)
        outside, value = step, step_value
        if converged:
            return outside
    return _bisect(f, inside, outside)


def _bisect(f, inside: float, outside: float) -> float:
    """Halve [inside, outside] (f < 0 inside, >= 0 outside) to float precision; the outside end."""
    for _ in range(MAX_BRACKET_STEPS):
        mid = 0.5 * (inside + outside)
        if mid in (inside, outside) or abs(outside - inside) <= 1e-13 * abs(outside):
            break
        inside, outside = (mid, outside) if f(mid) < 0.0 else (inside, mid)
    return outside


def upper_bound(n: int, k: int, alpha: float, a: float, b: float) -> float:
    """U_n, the upper end of the anytime-valid CS: P(exists n: rate > U_n) <= alpha. 1 before any audit."""
    return _cs_end(n, k, alpha, a, b, 1.0)


def lower_bound(n: int, k: int, alpha: float, a: float, b: float) -> float:
    """L_n, the lower end of the same CS; 0 before any audit."""
    return _cs_end(n, k, alpha, a, b, 0.0)


def log_evidence(n: int, k: int, epsilon: float, a: float, b: float) -> float:
    """log E_n, the e-process against H0 "rate <= epsilon": log M_n(min(epsilon, k/n)) (0 before any audit)."""
    _check_counts(n, k)
    if n == 0:
        return 0.0
    return log_mixture(n, k, min(epsilon, k / n), a, b)


def rejects(n: int, k: int, epsilon: float, alpha: float, a: float, b: float) -> bool:
    """The alarm rule: k/n > epsilon and M_n(epsilon) >= 1/alpha, i.e. epsilon lies below the whole CS."""
    return n > 0 and k > epsilon * n and log_mixture(n, k, epsilon, a, b) >= math.log(1.0 / alpha)


def log_mixture_paths(disagreements: np.ndarray, p: float, a: float, b: float) -> np.ndarray:
    """log M_t(p) after every step of many streams at once: ``disagreements`` [streams, steps] of 0/1.

    The same maths as ``log_mixture`` (simulation, an offline replay of an audit log): lgamma is tabulated
    over the integers 0..steps, since a + k, b + n - k and a + b + n only move by whole steps."""
    d = np.asarray(disagreements)
    if d.ndim != 2:
        raise ValueError(f"disagreements must be [streams, steps], got shape {d.shape}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    steps = d.shape[1]
    k = np.cumsum(d, axis=1, dtype=np.int64)
    n = np.arange(1, steps + 1, dtype=np.int64)[None, :]
    counts = np.arange(steps + 1, dtype=np.float64)
    lg_a = np.array([math.lgamma(a + j) for j in counts])
    lg_b = np.array([math.lgamma(b + j) for j in counts])
    lg_ab = np.array([math.lgamma(a + b + j) for j in counts])
    log_beta_post = lg_a[k] + lg_b[n - k] - lg_ab[n]
    return log_beta_post - _log_beta(a, b) - k * math.log(p) - (n - k) * math.log1p(-p)


@dataclass(frozen=True)
class AuditConfig:
    """What a tier's sequence promises: disagreement rate <= ``epsilon`` (a fraction: 0.5 pt = 0.005) at
    level ``alpha``; the mixture prior is Beta(prior_a, prior_a * (1 - m) / m) with mean m = ``prior_mean``
    (None: epsilon), fixed before the data."""

    epsilon: float = 0.005
    alpha: float = 0.05
    prior_a: float = 1.0
    prior_mean: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1) (a fraction: 0.5 pt = 0.005), got {self.epsilon}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not (math.isfinite(self.prior_a) and self.prior_a > 0.0):
            raise ValueError(f"prior_a must be a positive number, got {self.prior_a}")
        if self.prior_mean is not None and not 0.0 < self.prior_mean < 1.0:
            raise ValueError(f"prior_mean must be in (0, 1) or None (= epsilon), got {self.prior_mean}")

    @property
    def prior(self) -> tuple[float, float]:
        """(a, b) of the Beta prior."""
        mean = self.epsilon if self.prior_mean is None else self.prior_mean
        return self.prior_a, self.prior_a * (1.0 - mean) / mean

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def read(cls, raw: object, path: str, problems: Problems) -> AuditConfig | None:
        if not problems.check(raw, path, OBJECT):
            return None
        before = len(problems.found)
        values = {
            "epsilon": problems.take(raw, path, "epsilon", NUMBER),
            "alpha": problems.take(raw, path, "alpha", NUMBER),
            "prior_a": problems.take(raw, path, "prior_a", NUMBER),
            "prior_mean": problems.take(raw, path, "prior_mean", nullable(NUMBER)),
        }
        problems.only(raw, path, values)
        if len(problems.found) > before:
            return None
        try:
            return cls(**values)
        except ValueError as exc:
            problems.add(f"{path}: {exc}")
            return None


@dataclass
class TierAudit:
    """One tier's audit sequence under one policy: ``n`` audits, ``k`` disagreements (the sufficient
    statistic: the bound is a closed form in them, so nothing else is kept), and the latched alarm.

    ``alarm_at`` is the audit count at which the test rejected "rate <= epsilon", ``alarm_time`` the unix
    time then; both None while the promise has not been refuted."""

    tier: str
    policy_id: str
    config: AuditConfig = field(default_factory=AuditConfig)
    n: int = 0
    k: int = 0
    alarm_at: int | None = None
    alarm_time: float | None = None

    def __post_init__(self) -> None:
        _check_counts(self.n, self.k)
        if self.alarm_at is not None and not 0 < self.alarm_at <= self.n:
            raise ValueError(f"alarm_at must be in 1..n={self.n} or None, got {self.alarm_at}")

    @property
    def alarm(self) -> bool:
        """True once the bound says the disagreement rate exceeds epsilon (stays until a new policy)."""
        return self.alarm_at is not None

    def update(self, disagreed: bool, now: float | None = None) -> bool:
        """Count one audit (``disagreed``: the early answer differed from the cloud's); returns ``alarm``."""
        self.n += 1
        self.k += bool(disagreed)
        if not self.alarm and rejects(self.n, self.k, self.config.epsilon, self.config.alpha, *self.config.prior):
            self.alarm_at = self.n
            self.alarm_time = time.time() if now is None else float(now)
        return self.alarm

    def upper_bound(self) -> float:
        """U_n: P(exists n: rate > U_n) <= alpha; 1 before the first audit."""
        return upper_bound(self.n, self.k, self.config.alpha, *self.config.prior)

    def lower_bound(self) -> float:
        return lower_bound(self.n, self.k, self.config.alpha, *self.config.prior)

    def log_evidence(self) -> float:
        """log E_n against "rate <= epsilon"; the alarm fires when it reaches log(1/alpha) with k/n > epsilon."""
        return log_evidence(self.n, self.k, self.config.epsilon, *self.config.prior)

    def holds(self) -> bool:
        """The promise is certified now: U_n <= epsilon."""
        return self.upper_bound() <= self.config.epsilon

    def for_policy(self, policy_id: str) -> TierAudit:
        """This sequence if ``policy_id`` is its policy, else a fresh one (new thresholds, new rate)."""
        if policy_id == self.policy_id:
            return self
        return TierAudit(tier=self.tier, policy_id=policy_id, config=self.config)

    def to_dict(self) -> dict:
        return {
            "tier": self.tier,
            "policy_id": self.policy_id,
            "config": self.config.to_dict(),
            "n": self.n,
            "k": self.k,
            "alarm_at": self.alarm_at,
            "alarm_time": self.alarm_time,
        }

    @classmethod
    def read(cls, raw: object, path: str, problems: Problems) -> TierAudit | None:
        """Every field checked and problems noted (named by ``path``); None if anything failed."""
        if not problems.check(raw, path, OBJECT):
            return None
        before = len(problems.found)
        values = {
            "tier": problems.take(raw, path, "tier", STR),
            "policy_id": problems.take(raw, path, "policy_id", STR),
            "config": problems.take(raw, path, "config", OBJECT),
            "n": problems.take(raw, path, "n", INT),
            "k": problems.take(raw, path, "k", INT),
            "alarm_at": problems.take(raw, path, "alarm_at", nullable(INT)),
            "alarm_time": problems.take(raw, path, "alarm_time", nullable(NUMBER)),
        }
        if values["config"] is not None:
            values["config"] = AuditConfig.read(values["config"], at(path, "config"), problems)
        problems.only(raw, path, values)
        if len(problems.found) > before:
            return None
        try:
            return cls(**values)
        except ValueError as exc:
            problems.add(f"{path}: {exc}")
            return None

    @classmethod
    def from_dict(cls, raw: dict) -> TierAudit:
        """The inverse of ``to_dict``; ValueError listing every problem."""
        problems = Problems()
        tier = cls.read(raw, "tier_audit", problems)
        if tier is None:
            raise ValueError("invalid tier audit: " + "; ".join(problems.found))
        return tier


@dataclass(frozen=True)
class AuditRateRule:
    """The audit rate p = clip(p_base * (U / epsilon) ** gain, p_min, p_max), p_max after an alarm.

    U / epsilon > 1 (the bound is loose, nothing certified yet): p rises above p_base, the more the looser,
    so the sequence tightens quickly (p_max at the start, where U = 1). U / epsilon <= 1 (the promise holds):
    p falls below p_base as the margin grows. After an alarm p = p_max until the caller acts (a new policy
    resets the sequence). ``p_min`` > 0 keeps every tier audited, or a later rise in disagreement would go
    unseen. Rates set this way from past data stay valid (see the module docstring: p is predictable)."""

    p_base: float = 0.05
    p_min: float = 0.01
    p_max: float = 0.5
    gain: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 < self.p_min <= self.p_base <= self.p_max <= 1.0:
            raise ValueError(
                f"audit rates must satisfy 0 < p_min <= p_base <= p_max <= 1, "
                f"got p_min={self.p_min}, p_base={self.p_base}, p_max={self.p_max}"
            )
        if not (math.isfinite(self.gain) and self.gain > 0.0):
            raise ValueError(f"gain must be a positive number, got {self.gain}")


def audit_rate(upper: float, epsilon: float, alarm: bool, rule: AuditRateRule | None = None) -> float:
    """The probability of auditing a tier's next answer, from its bound ``upper`` (U_n in [0, 1])."""
    rule = rule or AuditRateRule()
    if not 0.0 <= upper <= 1.0:  # also refuses NaN
        raise ValueError(f"upper must be a bound in [0, 1], got {upper}")
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if alarm:
        return rule.p_max
    # log-space: (U / epsilon) ** gain overflows nothing and U = 0 gives p_min
    if upper == 0.0:
        return rule.p_min
    log_p = math.log(rule.p_base) + rule.gain * (math.log(upper) - math.log(epsilon))
    return min(rule.p_max, max(rule.p_min, math.exp(min(log_p, 0.0))))


def tier_audit_rate(tier: TierAudit, rule: AuditRateRule | None = None) -> float:
    """``audit_rate`` for one tier's sequence."""
    return audit_rate(tier.upper_bound(), tier.config.epsilon, tier.alarm, rule)
