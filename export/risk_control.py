"""Thresholds with a stated guarantee: Learn-then-Test and conformal risk control along a policy path.

Pure numpy/scipy over per-sample routing decisions; no model. docs/method.md states the guarantees.

The risk of a policy is the mean of a per-sample loss that is 0 when the final exit answers:
- ``reference="label"``: 1[the policy's answer is wrong and the final exit's is right]. Its mean
  bounds the accuracy drop against all-cloud from above (a sample the policy gets right and the final
  exit wrong counts 0, not −1).
- ``reference="final"``: 1[the answer differs from the final exit's]. No label needed; it bounds the
  accuracy drop too, since a drop needs a changed answer.

A *path* is a sequence of policies ordered from the safest (index 0: every sample answered by the
final exit, risk 0 by construction) to the cheapest, fixed before the calibration samples are seen
(here: built on other data). Along it:
- **LTT** (Angelopoulos et al. 2021, fixed-sequence testing): index j is certified when every index
  up to j has a binomial p-value P(Bin(n, ε) ≤ k_i) ≤ δ for H0 "risk > ε" (k_i losses in n). The
  kit keeps the last certified index: P(risk ≤ ε) ≥ 1 − δ over the draw of the calibration set.
  Equivalently, the running maximum of the Clopper–Pearson upper (1 − δ) bounds is ≤ ε.
- **CRC** (Angelopoulos et al. 2022): with the loss monotonised along the path (a sample's loss at j
  is its worst loss at any safer index, so it never falls as the path gets cheaper), the last index
  with (n · mean + 1) / (n + 1) ≤ ε; then E[risk] ≤ ε over calibration set and test sample.
Both need the calibration and deployment samples to be exchangeable (the same distribution).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from cartosplit.device_runtime.policy import ExitSignals, Objective, Policy, route, search_policy

GUARANTEES = ("ltt", "crc", "none")
# The risk of the path's anchor on the path data (2 pt): s = 0.5 sits there, the 50 steps above it
# resolve the risks from 0 to 2 pt that bounds are asked for, the 50 below reach all-device.
ANCHOR_RISK = 0.02
REFERENCES = ("label", "final")


@dataclass(frozen=True)
class Guarantee:
    """What calibration promises: ``kind`` ltt (P(risk ≤ epsilon) ≥ 1 − delta), crc (E[risk] ≤ epsilon)
    or none (the plain search); ``epsilon`` is a fraction (0.5 pt = 0.005)."""

    kind: str = "ltt"
    epsilon: float = 0.005
    delta: float = 0.1
    reference: str = "label"

    def __post_init__(self) -> None:
        if self.kind not in GUARANTEES:
            raise ValueError(f"guarantee must be one of {GUARANTEES}, got {self.kind!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1) (a fraction: 0.5 pt = 0.005), got {self.epsilon}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    def describe(self) -> str:
        risk = (
            "risk = P(answer wrong and final exit right)"
            if self.reference == "label"
            else ("risk = P(answer differs from the final exit's)")
        )
        pt = f"{100 * self.epsilon:g} pt"
        if self.kind == "ltt":
            return f"LTT: P(risk <= {pt}) >= {1 - self.delta:g} over the calibration draw, {risk}"
        if self.kind == "crc":
            return f"CRC: E[risk] <= {pt}, {risk}"
        return plain_search_statement(100 * self.epsilon)


def plain_search_statement(max_drop_pt: float) -> str:
    """What ``--guarantee none`` promises: nothing (any ``max_drop``, also 100 pt, which no Guarantee holds)."""
    return f"none: plain search within {max_drop_pt:g} pt on the calibration samples (no guarantee)"


def exit_losses(signals: ExitSignals, labels: np.ndarray | None, reference: str) -> np.ndarray:
    """The loss each exit's answer would take, [3, N] (device, edge, final; the final row is all 0)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    preds = signals.predictions()
    if reference == "final":
        return preds != preds[2][None, :]
    if labels is None:
        raise ValueError("the 'label' reference needs labels; unlabelled samples use reference='final'")
    labels = np.asarray(labels)
    return (preds != labels[None, :]) & (preds[2] == labels)[None, :]


def sample_losses(tiers: np.ndarray, signals: ExitSignals, labels: np.ndarray | None, reference: str) -> np.ndarray:
    """0/1 loss per path index and sample, [M, N], for the tier assignments ``tiers`` [M, N]."""
    per_exit = exit_losses(signals, labels, reference)
    exit_of_tier = np.array([0, 1, 2, 2])  # both cloud routes end at the final exit
    tiers = np.atleast_2d(tiers)
    return per_exit[exit_of_tier[tiers], np.arange(tiers.shape[1])[None, :]]


def ltt_bounds(losses: np.ndarray, delta: float) -> np.ndarray:
    """Per path index, the smallest epsilon whose fixed-sequence test certifies it (running max of the
    Clopper–Pearson upper 1 − delta bounds over the indices tested before it; index 0 is safe: 0)."""
    losses = np.asarray(losses)
    n = losses.shape[1]
    k = losses.sum(axis=1)
    upper = np.where(k >= n, 1.0, stats.beta.ppf(1.0 - delta, k + 1, np.maximum(n - k, 1)))
    upper[0] = 0.0  # every sample answered by the final exit: risk 0 by construction, not by test
    return np.maximum.accumulate(upper)


def binomial_p_values(losses: np.ndarray, epsilon: float) -> np.ndarray:
    """p-value of H0 "risk > epsilon" per index: P(Bin(n, epsilon) <= k) (exact for a 0/1 loss)."""
    losses = np.asarray(losses)
    return stats.binom.cdf(losses.sum(axis=1), losses.shape[1], epsilon)


def crc_bounds(losses: np.ndarray, bound: float = 1.0) -> np.ndarray:
    """Per path index, the CRC bound (n · mean monotonised loss + B) / (n + 1); non-decreasing."""
    monotone = np.maximum.accumulate(np.asarray(losses, dtype=np.float64), axis=0)
    n = monotone.shape[1]
    return (monotone.sum(axis=1) + bound) / (n + 1)


def last_within(bounds: np.ndarray, epsilon: float) -> int:
    """The last index of the prefix whose bounds are all <= epsilon; 0 (the safe end) if none is."""
    ok = np.asarray(bounds) <= epsilon + 1e-12
    if ok.all():
        return len(ok) - 1
    first_fail = int(np.argmin(ok))
    return max(first_fail - 1, 0)


@dataclass
class Certification:
    """The outcome of calibrating along a path: which index, what it holds, what could be certified."""

    guarantee: Guarantee
    index: int  # 0 = nothing cheaper than the safe end could be certified
    certified: bool  # a policy cheaper than all-cloud holds the guarantee
    n: int
    bound: float  # the certified bound at ``index`` (LTT: CP upper bound; CRC: the CRC bound)
    empirical_risk: float
    mean_cost: float  # on the calibration samples
    smallest_certifiable_epsilon: float | None  # the least epsilon that certifies any saving
    smallest_certifiable_cost: float | None  # its mean cost on the calibration samples

    def to_dict(self) -> dict:
        out = asdict(self)
        out["guarantee"] = asdict(self.guarantee)
        return out


def certify(losses: np.ndarray, costs: np.ndarray, guarantee: Guarantee, all_cloud_cost: float) -> Certification:
    """Pick the cheapest index the guarantee certifies. ``losses`` [M, N] and ``costs`` [M] (mean cost
    per index on the calibration samples) follow the path, safest first. A certified index must also
    cost less than all-cloud: otherwise the honest answer is all-cloud, and ``certified`` is False."""
    losses = np.asarray(losses)
    costs = np.asarray(costs, dtype=np.float64)
    if guarantee.kind == "none":
        raise ValueError("certify() needs guarantee ltt or crc; 'none' is the plain search")
    if losses.ndim != 2 or losses.shape[0] != len(costs) or losses.shape[1] == 0:
        raise ValueError(f"losses must be [M, N>0] with M = len(costs); got {losses.shape} and {len(costs)}")
    bounds = ltt_bounds(losses, guarantee.delta) if guarantee.kind == "ltt" else crc_bounds(losses)
    cheaper = costs < all_cloud_cost - 1e-12
    index = last_within(bounds, guarantee.epsilon)
    smallest = int(np.argmin(np.where(cheaper, bounds, np.inf))) if cheaper.any() else None
    return Certification(
        guarantee=guarantee,
        index=index,
        certified=bool(index > 0 and cheaper[index]),
        n=int(losses.shape[1]),
        bound=float(bounds[index]),
        empirical_risk=float(losses[index].mean()),
        mean_cost=float(costs[index]),
        smallest_certifiable_epsilon=None if smallest is None else float(bounds[smallest]),
        smallest_certifiable_cost=None if smallest is None else float(costs[smallest]),
    )


def _quantile_level(scores: np.ndarray, alpha: float) -> float:
    """Share of ``scores`` below ``alpha``: where a threshold sits in the score distribution (inf: 1)."""
    return 1.0 if math.isinf(alpha) else float((scores < alpha).mean())


def _alpha_at(scores: np.ndarray, level: float) -> float:
    return math.inf if level >= 1.0 else float(np.quantile(scores, max(level, 0.0)))


def interpolated_path(anchor: Policy, signals: ExitSignals, steps: int = 100) -> list[Policy]:
    """A one-scalar path through ``anchor``, safest first: s = 1 never exits early, s = 0.5 is the
    anchor, s = 0 exits everything the router does not send on. Each alpha moves linearly in the
    quantile space of its exit's confidence on ``signals`` (the path data, not the calibration set);
    the router margins stay the anchor's (sending a sample to the cloud costs no accuracy). As s falls
    every alpha falls, so samples only move to earlier exits: the risk grows nearly monotonically,
    which is what fixed-sequence testing needs to go far."""
    if steps < 2:
        raise ValueError(f"a path needs at least 2 steps, got {steps}")
    scores = (signals.probs_device.max(axis=1), signals.probs_edge.max(axis=1))
    levels = [_quantile_level(s, a) for s, a in zip(scores, (anchor.alpha_device, anchor.alpha_edge), strict=True)]
    path: list[Policy] = []
    for s in np.linspace(1.0, 0.0, steps + 1):
        alphas = []
        for score, level in zip(scores, levels, strict=True):
            q = level + (1.0 - level) * (2 * s - 1) if s >= 0.5 else level * 2 * s
            alphas.append(_alpha_at(score, q) if s < 1.0 else math.inf)
        policy = Policy(alphas[0], alphas[1], anchor.hard_margin, anchor.medium_margin)
        if not path or policy != path[-1]:
            path.append(policy)
    return path


def anchor_policy(
    signals: ExitSignals,
    labels: np.ndarray | None,
    tier_costs: np.ndarray,
    guarantee: Guarantee,
    use_router: bool,
    risk: float = ANCHOR_RISK,
    **grid: int,
) -> Policy:
    """The cheapest policy whose mean loss on ``signals`` (path data) is within ``risk``: the
    shape of the path. Searched on the guarantee's own loss, so a label-free guarantee needs no label.

    The anchor does not depend on epsilon: along one fixed path a larger epsilon certifies a longer
    prefix, so it never costs more (an anchor per epsilon gave a 1 pt bound a dearer policy than a
    0.5 pt one on CoLA)."""
    correct = ~exit_losses(signals, labels, guarantee.reference)
    reference_labels = signals.predictions()[2] if labels is None else np.asarray(labels)
    objective = Objective("max-drop", 100.0 * risk)
    return search_policy(signals, reference_labels, tier_costs, objective, use_router, correct=correct, **grid).policy


@dataclass
class PathCalibration:
    """A certified (or refused) policy with the path it came from."""

    policy: Policy | None  # None: refused, deploy all-cloud
    certification: Certification
    path: list[Policy]


def path_score(losses: np.ndarray, costs: np.ndarray, top_risk: float = ANCHOR_RISK) -> float:
    """How well a path serves bounds from 0 to ``top_risk``, on path data: the mean over 21 risk levels
    of the cheapest step reached before the running maximum of the risk passes the level (as
    fixed-sequence testing walks it). Lower is better; it does not depend on any one epsilon."""
    risk = np.maximum.accumulate(np.asarray(losses).mean(axis=1))
    costs = np.asarray(costs, dtype=np.float64)
    best = [np.min(np.where(risk <= level + 1e-12, costs, np.inf)) for level in np.linspace(0, top_risk, 21)]
    return float(np.mean(best))


def candidate_paths(
    signals: ExitSignals,
    labels: np.ndarray | None,
    tier_costs: np.ndarray,
    guarantee: Guarantee,
    use_router: bool,
    steps: int = 100,
    **grid: int,
) -> list[list[Policy]]:
    """Paths to choose from on the path data: interpolations through anchors at 0.5, 1, 2 and 4 pt of
    risk, and one shared threshold for both exits (the confidence early exit, with the 2 pt anchor's
    router margins); with the router, the cascade's paths as well."""
    paths = []
    for risk in (0.005, 0.01, ANCHOR_RISK, 0.04):
        anchor = anchor_policy(signals, labels, tier_costs, guarantee, use_router, risk=risk, **grid)
        paths.append(interpolated_path(anchor, signals, steps))
        if risk == ANCHOR_RISK:
            margins = (anchor.hard_margin, anchor.medium_margin)
    scores = np.concatenate([signals.probs_device.max(axis=1), signals.probs_edge.max(axis=1)])
    paths.append([Policy(float(t), float(t), *margins) for t in threshold_path(scores, steps)])
    if use_router:
        # the cascade's own paths too: a router whose paths do not beat them on the path data is left
        # out of the policy (infinite margins) instead of making it dearer than the cascade
        paths += candidate_paths(signals, labels, tier_costs, guarantee, False, steps, **grid)
    return paths


def choose_path(
    signals: ExitSignals,
    labels: np.ndarray | None,
    tier_costs: np.ndarray,
    guarantee: Guarantee,
    use_router: bool,
    steps: int = 100,
    **grid: int,
) -> list[Policy]:
    """The candidate path with the best ``path_score`` on the path data (never the certifying samples:
    choosing among paths there keeps the fixed-sequence test valid)."""
    best, best_score = None, math.inf
    for path in candidate_paths(signals, labels, tier_costs, guarantee, use_router, steps, **grid):
        score = score_path(path, signals, labels, tier_costs, guarantee)
        if score < best_score:
            best, best_score = path, score
    assert best is not None
    return best


def calibrate_along_path(
    path_signals: ExitSignals,
    path_labels: np.ndarray | None,
    calib_signals: ExitSignals,
    calib_labels: np.ndarray | None,
    tier_costs: np.ndarray,
    all_cloud_cost: float,
    guarantee: Guarantee,
    use_router: bool,
    steps: int = 100,
    **grid: int,
) -> PathCalibration:
    """Choose the path on ``path_*`` (never the calibration samples), then certify along it on
    ``calib_*``. The two sets may come from different distributions; only the calibration set must be
    exchangeable with deployment traffic for the guarantee to hold."""
    path = choose_path(path_signals, path_labels, tier_costs, guarantee, use_router, steps, **grid)
    tiers = np.stack([route(p, calib_signals) for p in path])
    losses = sample_losses(tiers, calib_signals, calib_labels, guarantee.reference)
    cert = certify(losses, tier_costs[tiers].mean(axis=1), guarantee, all_cloud_cost)
    return PathCalibration(path[cert.index] if cert.certified else None, cert, path)


def score_path(
    path: list[Policy],
    signals: ExitSignals,
    labels: np.ndarray | None,
    tier_costs: np.ndarray,
    guarantee: Guarantee,
    cap: float = math.inf,
) -> float:
    """``path_score`` of a path on some samples (lower is better); step costs above ``cap`` count as ``cap``
    (a policy dearer than all-cloud is never deployed: all-cloud is)."""
    tiers = np.stack([route(p, signals) for p in path])
    costs = np.minimum(tier_costs[tiers].mean(axis=1), cap)
    return path_score(sample_losses(tiers, signals, labels, guarantee.reference), costs)


def held_out_path_score(
    signals: ExitSignals,
    labels: np.ndarray | None,
    tier_costs: np.ndarray,
    all_cloud_cost: float,
    guarantee: Guarantee,
    use_router: bool,
    seed: int = 0,
    **grid: int,
) -> float:
    """The path score a method earns on samples its path was not chosen on: the path samples are halved
    (seeded), the path chosen on each half and scored on the other, the two scores averaged, over the
    all-cloud cost. Choosing among more candidate paths (the router's) flatters the in-sample score;
    this does not, so comparing it between the router and the cascade is fair."""
    order = np.random.default_rng(seed).permutation(len(signals))
    halves = (np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :]))
    scores = []
    for fit, held in (halves, halves[::-1]):
        fit_labels = None if labels is None else np.asarray(labels)[fit]
        held_labels = None if labels is None else np.asarray(labels)[held]
        path = choose_path(signals.subset(fit), fit_labels, tier_costs, guarantee, use_router, **grid)
        scores.append(score_path(path, signals.subset(held), held_labels, tier_costs, guarantee, all_cloud_cost))
    return float(np.mean(scores)) / all_cloud_cost


def threshold_path(scores: np.ndarray, steps: int = 100) -> np.ndarray:
    """Shared exit thresholds from "never" (inf) down to 0 along quantiles of ``scores``: safest first."""
    levels = np.linspace(1.0, 0.0, steps + 1)
    inner = np.quantile(scores, levels[1:]) if len(scores) else np.zeros(0)
    return np.concatenate([[math.inf], inner])


__all__ = [
    "GUARANTEES",
    "REFERENCES",
    "Certification",
    "Guarantee",
    "PathCalibration",
    "anchor_policy",
    "binomial_p_values",
    "calibrate_along_path",
    "candidate_paths",
    "certify",
    "choose_path",
    "crc_bounds",
    "exit_losses",
    "held_out_path_score",
    "interpolated_path",
    "last_within",
    "ltt_bounds",
    "path_score",
    "plain_search_statement",
    "sample_losses",
    "score_path",
    "threshold_path",
]
