"""The audit monitor (issue 18): path, label-free LTT on the device, alarm -> safe -> recalibrated, state, worker.

No model and no network: synthetic exit signals and a fake ``send``."""

from __future__ import annotations

import itertools
import math
import threading
import time

import numpy as np
import pytest
from scipy import stats

from cartosplit.device_runtime import audit_state
from cartosplit.device_runtime.audit import (
    ALL,
    AuditMonitor,
    AuditSettings,
    clopper_pearson_upper,
    ltt_last_certified,
    path_losses,
    tightening_path,
)
from cartosplit.device_runtime.audit_state import AuditLog
from cartosplit.device_runtime.audit_worker import AuditJob, AuditWorker
from cartosplit.device_runtime.costs import TIER_CLOUD_VIA_EDGE, TIER_DEVICE, TIER_EDGE
from cartosplit.device_runtime.policy import ExitSignals, Policy, answers, route
from cartosplit.export.risk_control import last_within, ltt_bounds

ANCHOR = Policy(alpha_device=0.9, alpha_edge=0.8, hard_margin=0.7, medium_margin=math.inf)
COSTS = np.array([0.4, 0.75, 1.09, 1.5])


def _signals(n: int, flip: float, seed: int) -> tuple[ExitSignals, np.ndarray]:
    """Two labels; the final exit is the reference; early exits disagree with it on ``flip`` of the samples
    they would answer confidently (the drift: confident and wrong)."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 2, n)

    def exit_probs(flip_share: float) -> np.ndarray:
        conf = rng.uniform(0.5, 1.0, n)
        label = np.where(rng.random(n) < flip_share, 1 - final, final)
        probs = np.zeros((n, 2))
        probs[np.arange(n), label] = conf
        probs[np.arange(n), 1 - label] = 1 - conf
        return probs

    probs_final = np.zeros((n, 2))
    probs_final[np.arange(n), final] = 0.99
    probs_final[np.arange(n), 1 - final] = 0.01
    router = rng.dirichlet([1.0, 1.0, 1.0], n)
    return ExitSignals(exit_probs(flip), exit_probs(flip), probs_final, router), final


def _replay(monitor: AuditMonitor, signals: ExitSignals) -> list[int]:
    """The stream through the monitor as the runtime does it: route by the policy now in force, audit a sample."""
    indices = []
    for i in range(len(signals)):
        one = signals.subset(np.array([i]))
        tier = int(route(monitor.policy, one)[0])
        answer = int(answers(np.array([tier]), one)[0])
        if monitor.sample():
            row = AuditLog.row(one.router_probs[0], one.probs_device[0], one.probs_edge[0], one.probs_final[0])
            monitor.record(tier, answer, one.probs_final[0], row, sent_bytes=100)
        indices.append(monitor.index)
    return indices


def test_path_runs_from_no_early_exit_to_the_anchor() -> None:
    path = tightening_path(ANCHOR, steps=20)
    assert path[0] == Policy(math.inf, math.inf, ANCHOR.hard_margin, ANCHOR.medium_margin)
    assert path[-1] == ANCHOR
    device = [p.alpha_device for p in path[1:]]
    assert all(a > b for a, b in itertools.pairwise(device))  # thresholds fall toward the anchor
    assert device[0] == pytest.approx(1 - 1e-4)
    # an exit the anchor never uses stays unused all along the path
    assert all(math.isinf(p.alpha_edge) for p in tightening_path(Policy(0.9, math.inf), 10))


def test_device_ltt_is_risk_controls_ltt() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        losses = rng.random((30, 800)) < np.linspace(0, 0.03, 30)[:, None]
        losses[0] = False
        index, bounds = ltt_last_certified(losses, epsilon=0.01, delta=0.1)
        expected = ltt_bounds(losses, 0.1)
        np.testing.assert_allclose(bounds, expected, atol=1e-9)
        assert index == last_within(expected, 0.01)
    for k, n in ((0, 50), (3, 1000), (40, 2000)):
        assert clopper_pearson_upper(k, n, 0.05) == pytest.approx(stats.beta.ppf(0.95, k + 1, n - k), abs=1e-9)


def test_stationary_stream_keeps_the_shipped_policy() -> None:
    """Disagreement well under epsilon: no alarm, the policy stays the anchor, audits cost what they say."""
    signals, _ = _signals(4000, flip=0.0, seed=1)
    monitor = AuditMonitor(ANCHOR, AuditSettings(rate=0.1, epsilon=0.05, seed=3), COSTS, "bundle")
    indices = _replay(monitor, signals)
    assert set(indices) == {len(monitor.path) - 1}
    summary = monitor.summary()
    seq = summary["sequences"][ALL]
    assert not seq["alarm"] and seq["audits"] == summary["counters"]["recorded"] > 300
    counters = summary["counters"]
    assert counters["cost"] == pytest.approx(counters["sent"] * (COSTS[TIER_CLOUD_VIA_EDGE] - COSTS[TIER_DEVICE]))
    assert counters["bytes"] == 100 * counters["sent"]


def test_drift_alarms_moves_safe_then_recalibrates_tighter() -> None:
    before, _ = _signals(2000, flip=0.0, seed=4)
    after, _ = _signals(8000, flip=0.3, seed=5)
    settings = AuditSettings(rate=0.2, epsilon=0.02, recalibrate_after=1500, seed=6)
    monitor = AuditMonitor(ANCHOR, settings, COSTS, "bundle")
    last = len(monitor.path) - 1
    assert set(_replay(monitor, before)) == {last}
    indices = np.array(_replay(monitor, after))
    events = [e["event"] for e in monitor.events]
    assert events[:3] == ["start", "alarm", "recalibrated"]
    first_safe = int(np.argmax(indices == 0))
    assert first_safe > 0 and indices[first_safe:].min() == 0
    # recalibrated: tighter than the anchor (it cannot hold epsilon here) but cheaper than no early exit
    assert 0 < indices[-1] < last
    # the recalibrated policy holds the promise on fresh drifted data (its LTT bound said so at delta)
    fresh, _ = _signals(20000, flip=0.3, seed=7)
    risk = path_losses([monitor.policy], fresh).mean()
    assert risk <= settings.epsilon


def test_state_round_trips_and_resumes(tmp_path) -> None:
    after, _ = _signals(3000, flip=0.3, seed=8)
    settings = AuditSettings(rate=0.2, epsilon=0.02, recalibrate_after=5000, seed=9)
    monitor = AuditMonitor(ANCHOR, settings, COSTS, "bundle")
    _replay(monitor, after)
    assert monitor.index == 0 and len(monitor.log) > 0  # alarmed, collecting
    path = tmp_path / "audit.json"
    audit_state.save(monitor.state(), path)
    loaded = audit_state.load(path)
    assert loaded.state is not None, loaded.reason
    resumed = AuditMonitor(ANCHOR, settings, COSTS, "bundle", loaded.state)
    assert resumed.index == 0 and resumed.log == monitor.log
    assert resumed.sequences[ALL].n == monitor.sequences[ALL].n
    assert resumed.counters.to_dict() == monitor.counters.to_dict()
    # another bundle (or promise) does not resume it
    assert AuditMonitor(ANCHOR, settings, COSTS, "other", loaded.state).index == len(monitor.path) - 1


def test_rate_is_one_and_free_at_the_safe_end() -> None:
    monitor = AuditMonitor(ANCHOR, AuditSettings(rate=0.01), COSTS, "bundle")
    assert monitor.rate() == 0.01
    monitor.index = 0
    assert monitor.rate() == 1.0
    assert AuditMonitor(ANCHOR, AuditSettings(rate=0.0), COSTS, "b").rate() == 0.0  # off


def test_adaptive_rate_is_high_while_loose_and_falls_once_it_holds() -> None:
    monitor = AuditMonitor(ANCHOR, AuditSettings(rate=0.02, adaptive=True, epsilon=0.02), COSTS, "bundle")
    start = monitor.rate()
    final = np.array([0.99, 0.01])
    for _ in range(3000):
        monitor.record(TIER_EDGE, 0, final)  # agreeing audits: the bound tightens
    assert start == 0.5 and monitor.rate() < 0.02


def test_settings_refuse_nonsense() -> None:
    for bad in ({"rate": 1.5}, {"epsilon": 0}, {"recalibrate_after": 0}, {"rate": 0.0, "adaptive": True}):
        with pytest.raises(ValueError):
            AuditSettings(**bad)


def test_worker_never_blocks_on_a_frozen_tier_and_drops_when_full() -> None:
    release = threading.Event()

    def frozen(job: AuditJob):
        release.wait(5)  # a frozen cloud: the call hangs until its timeout
        raise TimeoutError("deadline")

    monitor = AuditMonitor(ANCHOR, AuditSettings(rate=1.0), COSTS, "bundle")
    worker = AuditWorker(monitor, frozen, queue_size=4)
    job = AuditJob(TIER_DEVICE, 0, None, np.array([0.9, 0.1]), hidden=np.zeros((3, 4), np.float32))
    started = time.perf_counter()
    for _ in range(100):
        worker.submit(job)
    assert time.perf_counter() - started < 0.05  # 100 submits, none waited for the frozen call
    assert monitor.counters.dropped["queue_full"] >= 100 - 4 - 1
    release.set()
    worker.close(grace_s=2.0)
    assert not worker._thread.is_alive()
    assert monitor.counters.dropped.get("timeouterror", 0) >= 1
    assert monitor.sequences[ALL].n == 0  # nothing recorded without a reference


def test_worker_records_replies_and_saves_state(tmp_path) -> None:
    class Reply:
        probabilities = (0.2, 0.8)
        edge_probabilities = (0.3, 0.7)
        degraded = False

    monitor = AuditMonitor(ANCHOR, AuditSettings(rate=1.0), COSTS, "bundle")
    path = tmp_path / "state.json"
    worker = AuditWorker(monitor, lambda job: (Reply(), 123), state_path=path, queue_size=16)
    hidden = np.zeros((3, 4), np.float32)
    worker.submit(AuditJob(TIER_DEVICE, 0, np.array([0.5, 0.3, 0.2]), np.array([0.9, 0.1]), hidden=hidden))
    worker.submit(
        AuditJob(TIER_CLOUD_VIA_EDGE, 1, None, np.array([0.6, 0.4]), np.array([0.4, 0.6]), np.array([0.1, 0.9]))
    )
    worker.close()
    seq = monitor.sequences[ALL]
    assert (seq.n, seq.k) == (2, 1)  # the device said 0, the cloud 1; the cloud answer agrees with itself
    assert monitor.counters.bytes == 123 and monitor.counters.free == 1
    loaded = audit_state.load(path)
    assert loaded.state is not None and loaded.state.tiers[ALL].n == 2


def test_detector_false_alarms_over_all_epochs_stay_under_alpha() -> None:
    """Stationary at r = epsilon (the worst case of H0): 20 epochs of 400 audits, epoch i at alpha / (i (i+1)).
    The alarm rule of every epoch, vectorised (audit_bound.log_mixture_paths): P(any alarm) <= alpha."""
    from cartosplit.device_runtime.audit_bound import log_mixture_paths

    settings = AuditSettings(epsilon=0.02, alpha=0.1, epoch_audits=400)
    streams, epochs, size = 1000, 20, settings.epoch_audits
    rng = np.random.default_rng(11)
    alarmed = np.zeros(streams, dtype=bool)
    prior = settings.detector(1).prior
    for epoch in range(1, epochs + 1):
        d = (rng.random((streams, size)) < settings.epsilon).astype(np.int64)
        log_m = log_mixture_paths(d, settings.epsilon, *prior)
        k = np.cumsum(d, axis=1)
        n = np.arange(1, size + 1)[None, :]
        level = math.log(1 / settings.detector(epoch).alpha)
        alarmed |= ((log_m >= level) & (k > settings.epsilon * n)).any(axis=1)
    share = alarmed.mean()
    assert share <= settings.alpha + 3 * math.sqrt(settings.alpha * (1 - settings.alpha) / streams)


def test_detector_restarts_each_epoch_at_a_smaller_level() -> None:
    monitor = AuditMonitor(ANCHOR, AuditSettings(rate=1.0, epoch_audits=50), COSTS, "bundle")
    final = np.array([0.99, 0.01])
    for _ in range(120):
        monitor.record(TIER_EDGE, 0, final)
    detector = monitor.summary()["detector"]
    assert detector["epoch"] == 3 and detector["audits"] == 20
    assert detector["alpha"] == pytest.approx(0.05 / 12)
    assert monitor.sequences[ALL].n == 120  # the certificate keeps counting across epochs


def test_the_detectors_prior_alarms_sooner_above_epsilon() -> None:
    """At a rate 6x the promise, the detector's prior (mean 4 epsilon) alarms sooner than the certificate's
    (mean epsilon), at the same level; the figures are printed for docs/audit.md."""
    from cartosplit.device_runtime.audit_bound import log_mixture_paths

    settings = AuditSettings(epsilon=0.005, alpha=0.05)
    rng = np.random.default_rng(5)
    d = (rng.random((1000, 1500)) < 0.032).astype(np.int64)
    k, n = np.cumsum(d, axis=1), np.arange(1, 1501)[None, :]
    level = math.log(1 / settings.detector(1).alpha)
    medians = {}
    for name, prior in (("certificate", settings.bound().prior), ("detector", settings.detector(1).prior)):
        alarm = (log_mixture_paths(d, settings.epsilon, *prior) >= level) & (k > settings.epsilon * n)
        medians[name] = float(np.median(np.where(alarm.any(axis=1), alarm.argmax(axis=1) + 1, 10**6)))
    print(f"median audits to the alarm at 3.2 % vs epsilon 0.5 %: {medians}")
    assert medians["detector"] < medians["certificate"] < 10**6
