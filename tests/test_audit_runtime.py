"""Audits on a live three-process deployment: answers never wait for them, a frozen or killed cloud only
drops them, and the monitor's state survives a restart of the runtime."""

import math
import os
import signal
import time

import pytest

from cartosplit.device_runtime import audit_state
from cartosplit.device_runtime.audit import ALL, AuditSettings
from cartosplit.device_runtime.policy import Policy
from cartosplit.device_runtime.runtime import DeviceRuntime
from cartosplit.serving.process import start_servers

DEVICE_ANSWERS = Policy(alpha_device=0.0, alpha_edge=math.inf)  # every input answered on the device: each audit is sent
TEXTS = ["the film was good", "a dull plot", "nice actors", "quite boring", "superb", "sad film"]


def _wait_for(condition, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture()
def tiers(bundle):
    servers = start_servers(bundle)
    yield servers["edge"], servers["cloud"]
    for server in servers.values():
        if server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


def test_answers_never_wait_for_audits_with_the_cloud_frozen_then_killed(bundle, tiers):
    edge, cloud = tiers
    timeout_s = 3.0
    settings = AuditSettings(rate=1.0, queue_size=4, seed=0)
    runtime = DeviceRuntime(
        bundle, edge=edge.address, cloud=cloud.address, timeout_s=timeout_s, audit=settings, policy=DEVICE_ANSWERS
    )
    try:
        first = runtime.predict(TEXTS[:3])  # fits the queue of 4
        assert {p.route for p in first} == {"device"}
        assert _wait_for(lambda: runtime.monitor.counters.recorded == 3), runtime.audit_summary()["counters"]
        assert runtime.audit_summary()["sequences"][ALL]["audits"] == 3

        os.kill(cloud.process.pid, signal.SIGSTOP)  # frozen: the audit call hangs until its deadline
        started = time.monotonic()
        frozen = runtime.predict(TEXTS * 5)
        took = time.monotonic() - started
        # one audit waiting on the frozen cloud holds the worker for timeout_s; 30 answers came back sooner
        # than a single audit could have, so none waited for one
        assert took < timeout_s
        assert all(p.route == "device" and not p.degraded for p in frozen)
        assert runtime.monitor.counters.dropped.get("queue_full", 0) >= len(frozen) - 4 - 1

        os.kill(cloud.process.pid, signal.SIGKILL)
        cloud.process.wait(10)
        killed = runtime.predict(TEXTS)
        assert all(p.route == "device" and not p.degraded for p in killed)
    finally:
        started = time.monotonic()
        runtime.close()
        closing = time.monotonic() - started
    assert closing < timeout_s + 1.0  # the worker gives up within its grace
    counters = runtime.monitor.counters
    assert counters.recorded == 3  # nothing recorded without the cloud's answer
    assert counters.sampled == counters.recorded + sum(counters.dropped.values()) + runtime._auditor.pending


def test_monitor_state_survives_a_restart(bundle, tiers, tmp_path):
    edge, cloud = tiers
    state = tmp_path / "audit.json"
    settings = AuditSettings(rate=1.0, seed=1)
    common = {"edge": edge.address, "cloud": cloud.address, "audit": settings, "audit_state": state}
    with DeviceRuntime(bundle, policy=DEVICE_ANSWERS, **common) as runtime:
        runtime.predict(TEXTS)
        assert _wait_for(lambda: runtime.monitor.counters.recorded == len(TEXTS))
    loaded = audit_state.load(state)
    assert loaded.state is not None and loaded.state.tiers[ALL].n == len(TEXTS)
    with DeviceRuntime(bundle, policy=DEVICE_ANSWERS, **common) as again:
        assert again.monitor.sequences[ALL].n == len(TEXTS)
        assert again.monitor.counters.recorded == len(TEXTS)
        again.predict(TEXTS[:2])
        assert _wait_for(lambda: again.monitor.counters.recorded == len(TEXTS) + 2)
    # other thresholds: the saved sequences are not theirs, so the monitor starts fresh and says why
    with DeviceRuntime(bundle, policy=Policy(alpha_device=0.5, alpha_edge=math.inf), **common) as other:
        assert other.monitor.sequences[ALL].n == 0 and "starting fresh" in other.audit_resume_note


def test_audits_off_leave_no_monitor(bundle, tiers):
    edge, cloud = tiers
    with DeviceRuntime(bundle, edge=edge.address, cloud=cloud.address, audit=AuditSettings(rate=0.0)) as runtime:
        runtime.predict(TEXTS[:2])
        assert runtime.monitor is None and runtime.audit_summary() is None
