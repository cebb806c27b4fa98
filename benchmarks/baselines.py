"""Baselines the tradeoff benchmark compares cartosplit with: pure numpy over exit probabilities.

Every baseline walks the same three exits (device d, edge e, final L) under the same cost profile, and
every threshold is chosen on the calibration split with the same objective as cartosplit's own
(``cartosplit.device_runtime.policy.Objective``); the dev set is only evaluated.

- confidence exit: one max-softmax threshold shared by the device and edge exits (plain early exit);
- entropy exit (DeeBERT): one entropy threshold shared by both exits; for two classes the entropy is a
  monotone function of the max-softmax, so it then makes the same decisions as the confidence exit;
- patience (PABEE): an exit answers once ``patience`` consecutive exits agree; with three exits only
  patience 1 is not all-cloud: every sample goes to the edge, which answers when it agrees with the
  device exit, else the cloud answers;
- DIMEE-style thresholds: a threshold per tier (alpha_device, alpha_edge), no router (the kit's
  cascade: ``search_policy(use_router=False)``);
- random routing: tiers drawn at random with the shares another policy produced (same offload rate).
"""

from __future__ import annotations

import math

import numpy as np

from cartosplit.device_runtime.costs import TIER_CLOUD_VIA_EDGE, TIER_DEVICE, TIER_EDGE, TIER_NAMES
from cartosplit.device_runtime.metrics import set_metric
from cartosplit.device_runtime.policy import ExitSignals, Objective, Outcome, answers, evaluate_tiers


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of a probability matrix."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1)


def exit_scores(signals: ExitSignals, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample exit score at the device and edge exits; higher = surer. ``kind``: confidence or entropy."""
    if kind == "confidence":
        return signals.probs_device.max(axis=1), signals.probs_edge.max(axis=1)
    if kind == "entropy":
        return -entropy(signals.probs_device), -entropy(signals.probs_edge)
    raise ValueError(f"exit score must be 'confidence' or 'entropy', got {kind!r}")


def shared_threshold_tiers(score_device: np.ndarray, score_edge: np.ndarray, threshold: float) -> np.ndarray:
    """Early exit with one threshold: the first exit whose score reaches it answers, else the cloud."""
    tiers = np.full(len(score_device), TIER_CLOUD_VIA_EDGE, dtype=np.int64)
    tiers[score_edge >= threshold] = TIER_EDGE
    tiers[score_device >= threshold] = TIER_DEVICE
    return tiers


def patience_tiers(signals: ExitSignals, patience: int = 1) -> np.ndarray:
    """PABEE over the three exits: answer at the first exit where ``patience`` consecutive exits agree."""
    if patience < 0:
        raise ValueError(f"patience must be >= 0, got {patience}")
    preds = signals.predictions()
    n = preds.shape[1]
    if patience == 0:
        return np.full(n, TIER_DEVICE, dtype=np.int64)
    tiers = np.full(n, TIER_CLOUD_VIA_EDGE, dtype=np.int64)
    if patience == 1:
        tiers[preds[0] == preds[1]] = TIER_EDGE
    return tiers


def choose(
    candidates: list[tuple[object, Outcome]],
    reference: float,
    objective: Objective,
    values: list[float] | None = None,
):
    """The candidate the objective prefers (max-drop: cheapest within the drop, ties to the metric; reward).

    ``values`` are the candidates' metric values when the objective's metric is not accuracy (the
    outcomes carry accuracy only); ``reference`` is all-cloud's value of the same metric."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    values = [o.accuracy for _, o in candidates] if values is None else values

    def key(i: int) -> tuple[float, float]:
        outcome, value = candidates[i][1], values[i]
        if objective.kind == "reward":
            return (value - objective.beta * outcome.mean_cost, value)
        feasible = value >= reference - objective.max_drop / 100.0 - 1e-12
        return (-outcome.mean_cost if feasible else -math.inf, value)

    return candidates[max(range(len(candidates)), key=key)]


def search_shared_threshold(
    signals: ExitSignals,
    labels: np.ndarray,
    tier_costs: np.ndarray,
    objective: Objective,
    kind: str = "confidence",
    grid_size: int = 50,
) -> tuple[float, Outcome]:
    """The shared threshold the objective prefers on these (calibration) samples, and its outcome."""
    labels = np.asarray(labels)
    score_d, score_e = exit_scores(signals, kind)
    grid = np.unique(
        np.concatenate([np.quantile(np.concatenate([score_d, score_e]), np.linspace(0, 1, grid_size)), [math.inf]])
    )
    reference = set_metric(objective.metric, signals.predictions()[2], labels)
    candidates, values = [], []
    for threshold in grid:
        tiers = shared_threshold_tiers(score_d, score_e, threshold)
        given = answers(tiers, signals)
        candidates.append((float(threshold), evaluate_tiers(tiers, given, labels, tier_costs)))
        values.append(set_metric(objective.metric, given, labels))
    return choose(candidates, reference, objective, values)


def random_tiers(shares: dict[str, float], n: int, draws: int = 50, seed: int = 0) -> list[np.ndarray]:
    """Tier assignments drawn at random in ``shares``' proportions (exact counts, shuffled), one per draw."""
    fractions = np.array([shares.get(name, 0.0) for name in TIER_NAMES], dtype=np.float64)
    if fractions.sum() <= 0 or (fractions < 0).any():
        raise ValueError(f"shares must be non-negative and name at least one tier with a positive share: {shares}")
    counts = np.floor(fractions / fractions.sum() * n).astype(int)
    counts[np.argmax(fractions)] += n - counts.sum()  # rounding leftovers go to the largest share
    base = np.repeat(np.arange(len(TIER_NAMES)), counts)
    rng = np.random.default_rng(seed)
    return [rng.permutation(base) for _ in range(draws)]


def matthews_corr(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation for binary labels (GLUE's CoLA metric); 0 when a margin is empty."""
    return set_metric("mcc", predictions, labels)
