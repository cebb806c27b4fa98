"""The DIMEC-DC routing policy and its evaluation: pure numpy, shared by calibration and the runtime.

Per sample (see docs/method.md):
1. the router, after ``r`` layers, gives group probabilities (easy, medium, hard);
2. if P(hard) >= ``hard_margin`` the sample leaves the device at depth r for the cloud;
3. otherwise the device slice finishes; if P(medium) >= ``medium_margin`` the device exit is skipped,
   else the device answers when its exit confidence >= ``alpha_device``;
4. the edge answers when its exit confidence >= ``alpha_edge``, else it forwards to the cloud.

Infinite margins switch the router off and leave the plain max-softmax cascade, so a policy searched
over a grid that includes them can never do worse than the cascade on the data it was searched on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from cartosplit.device_runtime.costs import (
    TIER_CLOUD_DIRECT,
    TIER_CLOUD_VIA_EDGE,
    TIER_DEVICE,
    TIER_EDGE,
    TIER_NAMES,
)
from cartosplit.device_runtime.metrics import check_metric, metric_from_counts

GROUP_NAMES = ("easy", "medium", "hard")
EASY, MEDIUM, HARD = 0, 1, 2


def _json_float(value: float) -> float | None:
    """JSON has no infinity: an infinite threshold ("never") is written as null."""
    return None if math.isinf(value) else float(value)


def _from_json_float(value: float | None) -> float:
    return math.inf if value is None else float(value)


@dataclass(frozen=True)
class Policy:
    """Thresholds of the policy; ``math.inf`` means "never" (a margin) or "never exit here" (an alpha)."""

    alpha_device: float = math.inf
    alpha_edge: float = math.inf
    hard_margin: float = math.inf
    medium_margin: float = math.inf

    @property
    def uses_router(self) -> bool:
        return not (math.isinf(self.hard_margin) and math.isinf(self.medium_margin))

    def to_dict(self) -> dict:
        return {k: _json_float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict) -> Policy:
        return cls(**{k: _from_json_float(raw.get(k)) for k in asdict(cls())})


@dataclass
class ExitSignals:
    """What the model says about a batch of samples: softmax probabilities at each exit and the router's."""

    probs_device: np.ndarray  # [N, K]
    probs_edge: np.ndarray  # [N, K]
    probs_final: np.ndarray  # [N, K]
    router_probs: np.ndarray | None = None  # [N, 3] over GROUP_NAMES; None = no router

    def __post_init__(self) -> None:
        n = len(self.probs_device)
        for name in ("probs_edge", "probs_final"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, probs_device has {n}")
        if self.router_probs is not None and self.router_probs.shape != (n, 3):
            raise ValueError(f"router_probs must have shape ({n}, 3), got {self.router_probs.shape}")

    def __len__(self) -> int:
        return len(self.probs_device)

    def predictions(self) -> np.ndarray:
        """Predicted label at each exit, shape [3, N] (device, edge, final)."""
        return np.stack([p.argmax(axis=1) for p in (self.probs_device, self.probs_edge, self.probs_final)])

    def subset(self, index: np.ndarray) -> ExitSignals:
        router = None if self.router_probs is None else self.router_probs[index]
        return ExitSignals(self.probs_device[index], self.probs_edge[index], self.probs_final[index], router)


def leaves_for_cloud(policy: Policy, router_probs: np.ndarray) -> np.ndarray:
    """Step 2 alone, P(hard) >= ``hard_margin``: known after the router, before the rest of the device slice runs
    (which a sample that leaves never needs). Over the last axis: [N, 3] gives [N], [3] one bool."""
    return np.asarray(router_probs)[..., HARD] >= policy.hard_margin


def device_decision(policy: Policy, router_probs: np.ndarray | None, probs_device: np.ndarray) -> np.ndarray:
    """What the device does with each sample (steps 1-3): TIER_CLOUD_DIRECT (leaves at depth r), TIER_DEVICE
    (answers at its exit) or TIER_EDGE (offloads; the edge then answers or forwards, step 4).

    Over the last axis, so the runtime's single sample ([3], [K]: one code) and calibration's batches ([N, 3],
    [N, K]: [N] codes) go through the same comparisons. ``router_probs`` None: no router, which a policy with a
    finite margin cannot do without.
    """
    confident = np.max(probs_device, axis=-1) >= policy.alpha_device
    if router_probs is None:
        if policy.uses_router:
            raise ValueError("the policy uses the router but no router probabilities were given")
        direct = skip_device = np.zeros(np.shape(confident), dtype=bool)
    else:
        direct = leaves_for_cloud(policy, router_probs)
        skip_device = np.asarray(router_probs)[..., MEDIUM] >= policy.medium_margin
    at_device = ~direct & ~skip_device & confident
    return np.where(direct, TIER_CLOUD_DIRECT, np.where(at_device, TIER_DEVICE, TIER_EDGE))


def route(policy: Policy, signals: ExitSignals) -> np.ndarray:
    """Tier code (costs.TIER_*) that answers each sample under ``policy``."""
    decision = device_decision(policy, signals.router_probs, signals.probs_device)
    offloaded = decision == TIER_EDGE
    at_edge = offloaded & (signals.probs_edge.max(axis=1) >= policy.alpha_edge)
    return np.where(offloaded & ~at_edge, TIER_CLOUD_VIA_EDGE, decision).astype(np.int64)


def answers(tiers: np.ndarray, signals: ExitSignals) -> np.ndarray:
    """The label each sample gets from the exit of the tier that answers it."""
    preds = signals.predictions()
    exit_of_tier = np.array([0, 1, 2, 2])  # both cloud routes end at the final exit
    return preds[exit_of_tier[tiers], np.arange(len(tiers))]


def oracle_tiers(signals: ExitSignals, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest tier whose exit is right, and its answer; a sample no exit gets right stays on the device."""
    preds = signals.predictions()
    right = preds == np.asarray(labels)[None, :]
    tiers = np.where(
        right[0], TIER_DEVICE, np.where(right[1], TIER_EDGE, np.where(right[2], TIER_CLOUD_DIRECT, TIER_DEVICE))
    )
    answer = np.where(right[0] | ~(right[1] | right[2]), preds[0], np.where(right[1], preds[1], preds[2]))
    return tiers.astype(np.int64), answer


@dataclass
class Outcome:
    """Accuracy, cost and tier shares of a set of routing decisions."""

    accuracy: float
    mean_cost: float
    shares: dict[str, float]
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_tiers(tiers: np.ndarray, predictions: np.ndarray, labels: np.ndarray, tier_costs: np.ndarray) -> Outcome:
    n = len(labels)
    if n == 0:
        raise ValueError("cannot evaluate on zero samples")
    counts = np.bincount(tiers, minlength=len(TIER_NAMES))
    return Outcome(
        accuracy=float((predictions == labels).mean()),
        mean_cost=float(tier_costs[tiers].mean()),
        shares={name: float(c / n) for name, c in zip(TIER_NAMES, counts, strict=True)},
        n=n,
    )


def evaluate_policy(policy: Policy, signals: ExitSignals, labels: np.ndarray, tier_costs: np.ndarray) -> Outcome:
    tiers = route(policy, signals)
    return evaluate_tiers(tiers, answers(tiers, signals), labels, tier_costs)


@dataclass(frozen=True)
class Objective:
    """What calibration optimises.

    ``max_drop`` (points of ``metric``): lowest mean cost whose metric is at least the all-cloud
    metric minus ``max_drop`` points. ``reward``: highest metric − beta · mean cost. ``metric`` is
    computed over the set (``cartosplit.device_runtime.metrics``): accuracy, or MCC / F1 for the GLUE tasks
    judged by them.
    """

    kind: str = "max-drop"
    max_drop: float = 0.5
    beta: float = 1.0
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        if self.kind not in ("max-drop", "reward"):
            raise ValueError(f"objective must be 'max-drop' or 'reward', got {self.kind!r}")
        if self.max_drop < 0 or self.beta < 0:
            raise ValueError("max_drop and beta must be non-negative")
        check_metric(self.metric)


def _threshold_grid(values: np.ndarray, size: int) -> np.ndarray:
    """Candidate thresholds: quantiles of the observed scores, plus "always" (0) and "never" (inf)."""
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, size)) if len(values) else np.array([])
    return np.unique(np.concatenate([[0.0], quantiles, [math.inf]]))


@dataclass
class SearchResult:
    policy: Policy
    outcome: Outcome
    reference_accuracy: float  # all-cloud accuracy on the same samples (1.0 when searched on a loss)


def search_policy(
    signals: ExitSignals,
    labels: np.ndarray,
    tier_costs: np.ndarray,
    objective: Objective,
    use_router: bool = True,
    grid_size: int = 25,
    margin_grid_size: int = 12,
    correct: np.ndarray | None = None,
) -> SearchResult:
    """Grid-search the thresholds on held-out (calibration) samples.

    Alphas range over quantiles of each exit's confidence; margins over quantiles of the router's
    probabilities plus infinity, so the cascade (``use_router=False``) is always among the candidates.
    Vectorised over both alphas for each pair of margins.

    ``correct`` ([3, N] bool, per exit) replaces ``predictions == labels``: with
    ``correct = 1 - loss`` of a per-sample loss that is 0 at the final exit, "accuracy ≥ 1 − max_drop"
    reads "mean loss ≤ max_drop", which is how ``cartosplit.export.risk_control`` searches on a risk (e.g. the
    disagreement with the final exit, which needs no label). Only the accuracy metric applies then.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0:
        raise ValueError("calibration needs at least one sample")
    if correct is not None and objective.metric != "accuracy":
        raise ValueError("a search on a per-sample loss (correct=...) optimises accuracy, not a set metric")
    conf_d, conf_e = signals.probs_device.max(axis=1), signals.probs_edge.max(axis=1)
    preds = signals.predictions()
    if correct is None:
        correct = preds == labels[None, :]  # [3, N]
    alphas_d, alphas_e = _threshold_grid(conf_d, grid_size), _threshold_grid(conf_e, grid_size)
    if use_router:
        if signals.router_probs is None:
            raise ValueError("use_router=True needs router probabilities")
        hard_margins = _threshold_grid(signals.router_probs[:, HARD], margin_grid_size)[1:]  # 0 = all hard
        medium_margins = _threshold_grid(signals.router_probs[:, MEDIUM], margin_grid_size)[1:]
    else:
        hard_margins = medium_margins = np.array([math.inf])

    # per exit, the indicators whose routed counts give the metric: hits, or tp / fp / fn
    if objective.metric == "accuracy":
        indicators = [correct]
    else:
        positive, gold = preds == 1, (labels == 1)[None, :]
        indicators = [positive & gold, positive & ~gold, ~positive & gold]

    def metric_of(counts: list) -> np.ndarray:
        if objective.metric == "accuracy":
            return counts[0] / n
        tp, fp, fn = counts
        return metric_from_counts(objective.metric, tp, fp, fn, n - tp - fp - fn)

    # the all-cloud reference: every sample answered by the final exit
    reference = float(metric_of([ind[2].sum() for ind in indicators]))
    c_dev, c_edge, c_cloud_edge, c_cloud_direct = tier_costs
    exits_d = conf_d[None, :] >= alphas_d[:, None]  # [A, N]
    exits_e = conf_e[None, :] >= alphas_e[:, None]  # [B, N]
    exits_e_f, stays_e_f = exits_e.astype(np.float64), (~exits_e).astype(np.float64)
    # per indicator, [N, B]: what a climbing sample adds, answered at the edge or going on to the cloud
    edge_and_cloud_hits = [(exits_e_f * ind[1] + stays_e_f * ind[2]).T for ind in indicators]
    best_key, best = None, None
    for hard_margin in hard_margins:
        direct = signals.router_probs[:, HARD] >= hard_margin if use_router else np.zeros(n, dtype=bool)
        for medium_margin in medium_margins:
            skip = (
                ~direct & (signals.router_probs[:, MEDIUM] >= medium_margin) if use_router else np.zeros(n, dtype=bool)
            )
            at_dev = exits_d & ~direct & ~skip  # [A, N]
            climbing = (~direct[None, :] & ~at_dev).astype(np.float64)  # reaches the edge, [A, N]
            # counts over samples as matrix products [A, N] @ [N, B]: no [A, B, N] array is built
            n_dev = at_dev.sum(axis=1)[:, None]
            n_edge = climbing @ exits_e_f.T
            n_via = climbing @ stays_e_f.T
            n_direct = direct.sum()
            counts = [
                (at_dev & ind[0]).sum(axis=1)[:, None] + climbing @ edge_hits + (direct & ind[2]).sum()
                for ind, edge_hits in zip(indicators, edge_and_cloud_hits, strict=True)
            ]
            value = metric_of(counts)
            cost = (n_dev * c_dev + n_edge * c_edge + n_via * c_cloud_edge + n_direct * c_cloud_direct) / n
            if objective.kind == "reward":
                score = value - objective.beta * cost
            else:
                feasible = value >= reference - objective.max_drop / 100.0 - 1e-12
                score = np.where(feasible, -cost + 1e-9 * value, -np.inf)  # ties go to the better metric
            i, j = np.unravel_index(np.argmax(score), score.shape)
            key = score[i, j]
            if best_key is None or key > best_key:
                best_key = key
                best = Policy(float(alphas_d[i]), float(alphas_e[j]), float(hard_margin), float(medium_margin))
    assert best is not None  # the all-cloud corner (both alphas inf) is always feasible
    reference_accuracy = float(correct[2].mean())
    return SearchResult(best, evaluate_policy(best, signals, labels, tier_costs), reference_accuracy)
