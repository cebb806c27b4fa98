"""Keeping the accuracy promise on live traffic: audit sampling, the live bound, and threshold adaptation.

Torch-free and network-free: ``DeviceRuntime`` feeds it answers and audit replies, ``cartosplit bench drift``
replays a stream through the very same object.

**Audits.** Each answer is audited with probability ``rate``, decided before the answer is known and from the
monitor's past only (a predictable rate keeps the bound valid: ``audit_bound``'s docstring). What an audit
costs depends on the route the answer took:
- device or edge answer: the hidden state at the device depth goes to the edge again, marked as an audit;
  the edge always forwards it and the reply carries the edge exit's and the cloud's probabilities. Cost: the
  edge and cloud compute and both hops (``audit_cost``), counted apart from the answer's cost;
- cloud answer (via the edge or direct): it *is* the reference, so the disagreement is 0 and nothing is sent.

**The bound.** ``audit_bound.TierAudit`` sequences: one over every audited answer ("all": the disagreement
rate of the whole policy with the full model, which bounds its accuracy drop against all-cloud) and one per
early tier ("device", "edge": that tier's disagreement rate on the answers it gives, for diagnosis). The
alarm is the "all" sequence's: it tests what the promise says, disagreement <= epsilon, at level alpha.
A per-tier rate may exceed epsilon while the mix holds it, so per-tier sequences only report.

**Two jobs, two kinds of sequence.** Certifying needs many audits; noticing a change needs the recent ones.
- The bound reported (``upper_bound``, "holds") is the cumulative sequence of each kind above, over every
  audit under the policy now in force: P(the rate ever exceeds it) <= alpha.
- The alarm is a separate detector ("detector"): the "all" test restarted every ``epoch_audits`` audits,
  epoch i (1, 2, ...) at level alpha / (i (i + 1)). These levels sum to alpha, so under a policy whose rate
  stays <= epsilon P(any false alarm, over all its epochs) <= alpha. A cumulative test would be slow after a
  long quiet stretch: the new rate must outweigh the whole agreeing past before the mixture moves; the
  detector's past is at most one epoch, at a threshold that grows only like 2 log i.

**Adaptation** along a path fixed by the shipped policy (``tightening_path``), safest first: index 0
never exits early, the last index is the shipped policy; the router's margins stay (sending a sample on
costs no accuracy), the exits' confidence thresholds rise toward 1 as the index falls.
- Alarm: the policy moves to index 0 at once (every answer from the full model: no drop by construction),
  and a new sequence starts.
- At index 0 every answer comes from the cloud with the edge exit's probabilities (the edge forwards
  everything), so every answer is an audit that costs nothing: the rate is 1 and each one adds a row
  (router, device, edge and final probabilities) to the recalibration log.
- Recalibration: once the log holds ``recalibrate_after`` rows (then twice, four times as many...), the
  label-free procedure of the accuracy promise runs on it: Learn-then-Test along the path with the
  disagreement with the final exit as the loss (``ltt_last_certified``, the same test as
  ``cartosplit.export.risk_control``). Attempt m spends delta / 2^(m+1), so all attempts together keep
  P(the recalibrated policy's disagreement > epsilon) <= delta. A certified index > 0 becomes the policy
  (a new sequence); otherwise the log grows. Thresholds never loosen without that evidence, and never past
  the shipped policy.
- The log holds only rows collected after the alarm, i.e. drawn from the traffic that raised it.

The audit rate: ``rate`` (fixed), or with ``adaptive`` the rule of ``audit_bound.AuditRateRule`` around it
(higher while the bound is loose, lower once it holds, the highest after an alarm until the next policy);
1 at index 0, where audits are free.
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from cartosplit.device_runtime.audit_bound import AuditConfig, AuditRateRule, TierAudit, audit_rate
from cartosplit.device_runtime.audit_state import AuditLog, AuditState
from cartosplit.device_runtime.costs import TIER_CLOUD_VIA_EDGE, TIER_DEVICE, TIER_EDGE
from cartosplit.device_runtime.policy import ExitSignals, Policy, answers, route

ALL = "all"
DETECTOR = "detector"
EARLY_TIERS = {TIER_DEVICE: "device", TIER_EDGE: "edge"}
SEQUENCES = (ALL, *EARLY_TIERS.values())
MIN_GAP = 1e-4
# The detector's mixture prior has mean 4 epsilon: it looks for rates well above the promise (measured on
# Bernoulli streams at epsilon 0.5 % and a rate of 3.2 %, the median alarm comes after ~130 audits instead of
# ~210 with the certificate's prior, mean epsilon: tests/test_audit_monitor.py measures both)
DETECTOR_PRIOR_FACTOR = 4.0  # the path's tightest exit threshold is 1 - MIN_GAP (then "never", at index 0)


@dataclass(frozen=True)
class AuditSettings:
    """How a device audits: ``rate`` (0 switches audits off), the promise (disagreement <= ``epsilon`` at
    level ``alpha`` online; recalibration at ``delta``), the adaptation and the background queue's size."""

    rate: float = 0.02
    epsilon: float = 0.005
    alpha: float = 0.05
    delta: float = 0.1
    adaptive: bool = False
    recalibrate_after: int = 1000
    epoch_audits: int = 400
    path_steps: int = 40
    queue_size: int = 256
    max_log: int = 16_000  # rows kept for recalibration (~0.5 MB of state for two labels)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"audit rate must be a probability in [0, 1] (0.02 = 2 %), got {self.rate}")
        if self.adaptive and self.rate == 0.0:
            raise ValueError("an adaptive audit rate needs a base rate > 0")
        for name in ("epsilon", "alpha", "delta"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        for name in ("recalibrate_after", "epoch_audits", "path_steps", "queue_size", "max_log"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_log < self.recalibrate_after:
            raise ValueError(f"max_log ({self.max_log}) must hold recalibrate_after ({self.recalibrate_after}) rows")

    @classmethod
    def from_points(cls, rate: float, epsilon_pt: float, alpha: float, adaptive: bool) -> AuditSettings | None:
        """Settings from a user's figures (the promise in points: 0.5 = half a point); None when ``rate`` is 0."""
        if rate == 0.0:
            return None
        return cls(rate=rate, epsilon=epsilon_pt / 100.0, alpha=alpha, adaptive=adaptive)

    @property
    def enabled(self) -> bool:
        return self.rate > 0.0

    def bound(self) -> AuditConfig:
        """The certificate's sequences: level alpha, prior mean epsilon (tight where the promise is decided)."""
        return AuditConfig(epsilon=self.epsilon, alpha=self.alpha)

    def detector(self, epoch: int) -> AuditConfig:
        """Epoch ``epoch`` of the detector: level alpha / (epoch (epoch + 1)), which sums to alpha over all
        epochs, and a prior aimed at rates above epsilon (``DETECTOR_PRIOR_FACTOR``)."""
        mean = min(DETECTOR_PRIOR_FACTOR * self.epsilon, 0.5)
        return AuditConfig(epsilon=self.epsilon, alpha=self.alpha / (epoch * (epoch + 1)), prior_mean=mean)

    @property
    def rule(self) -> AuditRateRule:
        return AuditRateRule(p_base=self.rate, p_min=min(self.rate, 0.01) / 2, p_max=max(self.rate, 0.5))


def tightening_path(anchor: Policy, steps: int = 40, min_gap: float = MIN_GAP) -> list[Policy]:
    """Policies from the safest (index 0: no early exit) to ``anchor`` (the last), fixed by the anchor alone.

    Each exit's gap 1 - alpha shrinks geometrically from the anchor's to ``min_gap`` (softmax confidences
    crowd near 1, so equal steps in alpha would waste the path); an exit the anchor never uses stays unused.
    The router margins are the anchor's at every index."""
    if steps < 1:
        raise ValueError(f"a path needs at least 1 step, got {steps}")
    path = [Policy(math.inf, math.inf, anchor.hard_margin, anchor.medium_margin)]
    for i in range(1, steps + 1):
        share = (steps - i) / max(steps - 1, 1)  # 1 at index 1 (tightest), 0 at the anchor
        alphas = []
        for alpha in (anchor.alpha_device, anchor.alpha_edge):
            gap = 1.0 - alpha
            if math.isinf(alpha) or gap <= min_gap:
                alphas.append(alpha)
            else:
                alphas.append(1.0 - gap * (min_gap / gap) ** share)
        policy = Policy(alphas[0], alphas[1], anchor.hard_margin, anchor.medium_margin)
        if policy != path[-1]:
            path.append(policy)
    return path


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), summed in log space (k is small where it matters: a few % of n)."""
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1, dtype=np.float64)
    log_pmf = (
        math.lgamma(n + 1)
        - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in i])
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
    )
    top = log_pmf.max()
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


def clopper_pearson_upper(k: int, n: int, delta: float) -> float:
    """The one-sided upper (1 - delta) Clopper-Pearson bound: the p with P(Bin(n, p) <= k) = delta (bisection)."""
    if n == 0 or k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if binomial_cdf(k, n, mid) > delta else (lo, mid)
        if hi - lo < 1e-12:
            break
    return hi


def ltt_last_certified(losses: np.ndarray, epsilon: float, delta: float) -> tuple[int, np.ndarray]:
    """Fixed-sequence Learn-then-Test along a path (losses [M, N], safest first; index 0 is safe by
    construction): the last index whose running maximum of Clopper-Pearson bounds is <= epsilon, and the
    bounds. Numpy only: the same test as ``risk_control.ltt_bounds`` + ``last_within``, on the device."""
    losses = np.asarray(losses)
    n = losses.shape[1]
    bounds = np.array([clopper_pearson_upper(int(k), n, delta) for k in losses.sum(axis=1)])
    bounds[0] = 0.0
    bounds = np.maximum.accumulate(bounds)
    ok = bounds <= epsilon + 1e-12
    index = len(ok) - 1 if ok.all() else max(int(np.argmin(ok)) - 1, 0)
    return index, bounds


def path_losses(path: list[Policy], signals: ExitSignals) -> np.ndarray:
    """[M, N] disagreement of each path policy's answer with the final exit's."""
    final = signals.probs_final.argmax(axis=1)
    return np.stack([answers(route(p, signals), signals) != final for p in path])


@dataclass
class AuditCounters:
    """What audits did and cost: ``cost`` in the bundle's cost-profile units, ``bytes`` sent by the device."""

    answers: int = 0
    sampled: int = 0
    recorded: int = 0
    sent: int = 0
    free: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    cost: float = 0.0
    bytes: int = 0

    def to_dict(self) -> dict:
        return {
            "answers": self.answers,
            "sampled": self.sampled,
            "recorded": self.recorded,
            "sent": self.sent,
            "free": self.free,
            "dropped": dict(self.dropped),
            "cost": self.cost,
            "bytes": self.bytes,
        }


class AuditMonitor:
    """The live bound and the policy it keeps, for one bundle. Thread-safe: answers are sampled on the
    request path, replies recorded by the audit worker.

    ``tier_costs``: the bundle's cost per route (``CostProfile.tier_costs``); an audit of a device or edge
    answer costs the edge and cloud part of the ``cloud_via_edge`` route on top of the answer."""

    def __init__(
        self,
        anchor: Policy,
        settings: AuditSettings,
        tier_costs: np.ndarray,
        anchor_id: str,
        state: AuditState | None = None,
    ) -> None:
        self.settings = settings
        self.anchor_id = anchor_id
        self.path = tightening_path(anchor, settings.path_steps)
        costs = np.asarray(tier_costs, dtype=np.float64)
        self.audit_cost = float(costs[TIER_CLOUD_VIA_EDGE] - costs[TIER_DEVICE])
        self._rng = random.Random(settings.seed)
        self._lock = threading.Lock()
        self.counters = AuditCounters()
        self.events: list[dict] = []
        self.changed = True  # something to save
        if state is not None and state.anchor_id == anchor_id and state.path_index is not None:
            self._restore(state)
        else:
            self._adopt(len(self.path) - 1, reason="start", log=AuditLog(), attempt=0, generation=0)

    # -- the policy and its sequences ----------------------------------------------------------------------

    def _policy_id(self, index: int, generation: int) -> str:
        return f"{self.anchor_id[:16]}:path{index}:gen{generation}"

    def _new_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        policy_id = self._policy_id(self.index, self.generation)
        self.detector = TierAudit(DETECTOR, policy_id, self.settings.detector(epoch))

    def _adopt(self, index: int, reason: str, log: AuditLog, attempt: int, generation: int, now=None) -> None:
        self.index, self.generation, self.log, self.attempt = index, generation, log, attempt
        self.last_epoch = None
        policy_id = self._policy_id(index, generation)
        self.sequences = {name: TierAudit(name, policy_id, self.settings.bound()) for name in SEQUENCES}
        self._new_epoch(1)
        self.events.append(
            {
                "event": reason,
                "at_answer": self.counters.answers,
                "time": time.time() if now is None else now,
                "path_index": index,
                "thresholds": self.policy.to_dict(),
            }
        )
        self.changed = True

    def _restore(self, state: AuditState) -> None:
        self.index = min(state.path_index, len(self.path) - 1)
        self.generation, self.attempt, self.log = state.generation, state.attempt, state.log
        self.epoch, self.last_epoch = state.epoch, None
        policy_id = self._policy_id(self.index, self.generation)
        self.sequences = {}
        for name in SEQUENCES:
            saved = state.tiers.get(name)
            ok = saved is not None and saved.policy_id == policy_id and saved.config == self.settings.bound()
            self.sequences[name] = saved if ok else TierAudit(name, policy_id, self.settings.bound())
        self._new_epoch(self.epoch)
        saved = state.tiers.get(DETECTOR)
        if saved is not None and saved.policy_id == self.detector.policy_id and saved.config == self.detector.config:
            self.detector = saved
        self.counters = AuditCounters(**state.counters) if state.counters else AuditCounters()
        self.events = [{"event": "resumed", "at_answer": self.counters.answers, "path_index": self.index}]

    @property
    def policy(self) -> Policy:
        return self.path[self.index]

    @property
    def safe(self) -> bool:
        """At index 0: every answer is the full model's."""
        return self.index == 0

    def rate(self) -> float:
        """The probability of auditing the next answer (from the past only)."""
        if not self.settings.enabled:
            return 0.0
        if self.safe:
            return 1.0
        if not self.settings.adaptive:
            return self.settings.rate
        overall = self.sequences[ALL]
        return audit_rate(overall.upper_bound(), self.settings.epsilon, self.detector.alarm, self.settings.rule)

    # -- the request path ----------------------------------------------------------------------------------

    def sample(self) -> bool:
        """Count an answer and decide, before it is known, whether to audit it."""
        rate = self.rate()
        with self._lock:
            self.counters.answers += 1
            chosen = rate > 0.0 and self._rng.random() < rate
            self.counters.sampled += chosen
        return chosen

    def drop(self, reason: str) -> None:
        """A sampled audit that could not be done (queue full, tier down, timeout, fallback answer)."""
        with self._lock:
            self.counters.dropped[reason] = self.counters.dropped.get(reason, 0) + 1
            self.changed = True

    # -- the audit worker ------------------------------------------------------------------------------------

    def record(
        self,
        tier: int,
        answer: int,
        final_probs: np.ndarray,
        row: np.ndarray | None = None,
        sent_bytes: int = 0,
        now: float | None = None,
    ) -> bool:
        """One audit's outcome: the route code that answered (``costs.TIER_*``), its label and the full model's
        probabilities; ``row`` the sample's signals (``AuditLog.row``) for the recalibration log. Returns
        whether the answer disagreed. Free for cloud answers (``sent_bytes`` 0)."""
        disagreed = tier in EARLY_TIERS and int(answer) != int(np.argmax(final_probs))
        with self._lock:
            c = self.counters
            c.recorded += 1
            if tier in EARLY_TIERS:
                c.sent += 1
                c.cost += self.audit_cost
                c.bytes += int(sent_bytes)
            else:
                c.free += 1
            self.sequences[ALL].update(disagreed, now)
            if tier in EARLY_TIERS:
                self.sequences[EARLY_TIERS[tier]].update(disagreed, now)
            self.changed = True
            detector = self.detector
            detector.update(disagreed, now)
            if detector.alarm and not self.safe:
                self._adopt(0, "alarm", AuditLog(), attempt=0, generation=self.generation + 1, now=now)
                self.events[-1].update(epoch=self.epoch, epoch_audits=detector.n, epoch_disagreements=detector.k)
            elif detector.n >= self.settings.epoch_audits and not detector.alarm:
                self.last_epoch = {"epoch": self.epoch, "audits": detector.n, "disagreements": detector.k}
                self._new_epoch(self.epoch + 1)
            elif self.safe and row is not None and len(self.log) < self.settings.max_log:
                self.log.append(row)
                self._maybe_recalibrate(now)
        return disagreed

    def _maybe_recalibrate(self, now: float | None) -> None:
        needed = self.settings.recalibrate_after * 2**self.attempt
        if len(self.log) < needed:  # called at the safe end only
            return
        delta = self.settings.delta / 2 ** (self.attempt + 1)
        signals = self.log.signals()
        index, bounds = ltt_last_certified(path_losses(self.path, signals), self.settings.epsilon, delta)
        if index > 0:
            self._adopt(index, "recalibrated", AuditLog(), attempt=0, generation=self.generation + 1, now=now)
            self.events[-1].update(rows=len(signals), delta=delta, bound=float(bounds[index]))
        else:
            self.attempt += 1
            self.events.append({"event": "recalibration_refused", "rows": len(signals), "delta": delta})

    # -- reporting and state --------------------------------------------------------------------------------

    def summary(self) -> dict:
        """The live bound per sequence and what audits cost: for /healthz, metrics, logs and run summaries."""
        with self._lock:
            sequences = {}
            for name, seq in self.sequences.items():
                sequences[name] = {
                    "audits": seq.n,
                    "disagreements": seq.k,
                    "rate": seq.k / seq.n if seq.n else None,
                    "upper_bound": seq.upper_bound(),
                    "holds": seq.holds(),
                    "alarm": seq.alarm,
                }
            return {
                "enabled": self.settings.enabled,
                "epsilon": self.settings.epsilon,
                "alpha": self.settings.alpha,
                "statement": (
                    f"P(the disagreement rate with the full model ever exceeds upper_bound) <= "
                    f"{self.settings.alpha:g} over all epochs of a policy (epoch i at alpha / (i (i + 1))), per "
                    f"sequence; the alarm tests disagreement <= {100 * self.settings.epsilon:g} pt over all answers"
                ),
                "audit_rate": self.rate(),
                "path_index": self.index,
                "path_length": len(self.path),
                "detector": {
                    "epoch": self.epoch,
                    "alpha": self.detector.config.alpha,
                    "audits": self.detector.n,
                    "disagreements": self.detector.k,
                    "alarm": self.detector.alarm,
                    "last_epoch": self.last_epoch,
                },
                "policy": self.policy.to_dict(),
                "recalibration_rows": len(self.log),
                "sequences": sequences,
                "counters": self.counters.to_dict(),
                "events": self.events[-10:],
            }

    def state(self) -> AuditState:
        with self._lock:
            thresholds = {k: float(v) for k, v in vars(self.policy).items()}
            return AuditState(
                policy_id=self._policy_id(self.index, self.generation),
                thresholds=thresholds,
                tiers={
                    name: TierAudit.from_dict(seq.to_dict())
                    for name, seq in {**self.sequences, DETECTOR: self.detector}.items()
                },
                audit_rates={name: self.rate() if name == ALL else 0.0 for name in (*self.sequences, DETECTOR)},
                anchor_id=self.anchor_id,
                path_index=self.index,
                generation=self.generation,
                attempt=self.attempt,
                epoch=self.epoch,
                log=self.log.copy(),
                counters=self.counters.to_dict(),
            )
