"""The audit monitor's persisted state: round trip, every kind of bad file, .prev, and kill -9 mid-write."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cartosplit.device_runtime.audit_bound import AuditConfig, AuditRateRule, TierAudit
from cartosplit.device_runtime.audit_state import (
    VERSION,
    AuditState,
    decode,
    encode,
    fresh,
    load,
    prev_path,
    read_state,
    resume,
    save,
)
from cartosplit.device_runtime.audit_state import tmp_path as tmp_file  # the name tmp_path is pytest's fixture

CONFIG = AuditConfig(epsilon=0.02, alpha=0.05)
THRESHOLDS = {"alpha_device": 0.9, "alpha_edge": 0.8, "hard_margin": math.inf, "medium_margin": 0.35}


def audited_state(policy_id: str = "policy-1", audits: int = 400) -> AuditState:
    state = fresh(policy_id, THRESHOLDS, ["device", "edge"], CONFIG)
    rng = random.Random(audits)
    for t in range(audits):
        for name, rate in (("device", 0.01), ("edge", 0.05)):
            state.tiers[name].update(rng.random() < rate, now=1_700_000_000.0 + t)
    return state


def rewrap(body: dict) -> bytes:
    """A file around ``body`` with a correct checksum (to reach the checks behind it)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return json.dumps({"body": body, "sha256": hashlib.sha256(canonical.encode()).hexdigest()}).encode()


def test_round_trip_keeps_everything(tmp_path):
    state = audited_state()
    assert state.tiers["edge"].alarm  # 5 % against epsilon 2 %: the saved alarm must come back too
    path = tmp_path / "audit.json"
    written = save(state, path, now=1234.5)
    loaded = load(path)
    assert (loaded.source, loaded.problems, loaded.reason) == ("main", (), None)
    assert loaded.state == written
    assert loaded.state.written_at == 1234.5 and loaded.state.version == VERSION
    assert loaded.state.thresholds["hard_margin"] == math.inf  # written as null, read back as "never"
    assert loaded.state.tiers["device"].upper_bound() == state.tiers["device"].upper_bound()
    assert not tmp_path.joinpath("audit.json.tmp").exists()


def test_second_save_keeps_the_first_as_prev(tmp_path):
    path = tmp_path / "audit.json"
    first = save(audited_state(audits=100), path, now=1.0)
    second = save(audited_state(audits=200), path, now=2.0)
    assert read_state(prev_path(path))[0] == first
    assert read_state(path)[0] == second


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flipped(data: bytes) -> bytes:
    at = data.index(b'"n": ') + 5  # a digit of a count: the JSON stays valid, the content changes
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _wrong_checksum(data: bytes) -> bytes:
    envelope = json.loads(data)
    envelope["sha256"] = "0" * 64
    return json.dumps(envelope).encode()


def _wrong_version(data: bytes) -> bytes:
    body = json.loads(data)["body"]
    body["version"] = VERSION + 1
    return rewrap(body)


def _wrong_schema(data: bytes) -> bytes:
    body = json.loads(data)["body"]
    body["schema"] = "someone.else"
    return rewrap(body)


def _bad_field(data: bytes) -> bytes:
    body = json.loads(data)["body"]
    body["tiers"]["device"]["k"] = body["tiers"]["device"]["n"] + 1
    body["audit_rates"]["edge"] = "high"
    return rewrap(body)


CORRUPTIONS = {
    "truncated": (_truncated, "not valid JSON"),
    "flipped byte": (_flipped, "fails its checksum"),
    "wrong checksum": (_wrong_checksum, "fails its checksum"),
    "not JSON": (lambda data: b"\x00\xffnot json at all", "not UTF-8"),
    "not JSON text": (lambda data: b"{oops", "not valid JSON"),
    "empty": (lambda data: b"", "not valid JSON"),
    "another envelope": (lambda data: b'{"body": {}}', 'exactly "body" and "sha256"'),
    "wrong schema version": (_wrong_version, f"schema version {VERSION + 1}; this cartosplit reads version {VERSION}"),
    "wrong schema": (_wrong_schema, "has schema 'someone.else'"),
    "invalid fields": (_bad_field, "audit_state.audit_rates must be an object of numbers"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_bad_main_file_is_refused_with_a_reason_and_prev_is_used(tmp_path, kind):
    corrupt, reason = CORRUPTIONS[kind]
    path = tmp_path / "audit.json"
    good = save(audited_state(audits=100), path, now=1.0)
    save(audited_state(audits=200), path, now=2.0)
    path.write_bytes(corrupt(path.read_bytes()))
    state, why = read_state(path)
    assert state is None
    assert reason in why and str(path) in why
    loaded = load(path)
    assert loaded.source == "prev" and loaded.state == good  # lost only the last update
    assert reason in loaded.reason


def test_invalid_counts_behind_a_good_checksum_are_named(tmp_path):
    body = json.loads(encode(audited_state()))["body"]
    body["tiers"]["device"]["k"] = body["tiers"]["device"]["n"] + 1
    state, why = decode(rewrap(body))
    assert state is None and "0 <= k <= n" in why


def test_no_file_at_all_starts_fresh_with_the_reason(tmp_path):
    loaded = load(tmp_path / "audit.json")
    assert loaded.state is None and loaded.source is None
    assert "does not exist" in loaded.reason and ".prev" in loaded.reason
    state, note = resume(loaded, "p", THRESHOLDS, ["device"], CONFIG)
    assert state.tiers["device"].n == 0 and note.startswith("starting fresh")
    assert state.audit_rates["device"] == AuditRateRule().p_max  # nothing known yet: audit the most


def test_a_corrupt_main_file_does_not_evict_the_good_prev(tmp_path):
    path = tmp_path / "audit.json"
    first = save(audited_state(audits=100), path, now=1.0)
    save(audited_state(audits=200), path, now=2.0)
    path.write_bytes(b"torn")
    third = save(audited_state(audits=300), path, now=3.0)
    assert read_state(prev_path(path))[0] == first  # the torn main did not become .prev
    assert read_state(path)[0] == third
    save(audited_state(audits=400), path, now=4.0)
    assert read_state(prev_path(path))[0] == third  # a good main does


def test_a_stale_tmp_file_is_overwritten(tmp_path):
    path = tmp_path / "audit.json"
    stale = tmp_file(path)
    assert stale == tmp_path / "audit.json.tmp"
    stale.write_bytes(b"left by a writer killed mid-write")
    written = save(audited_state(), path, now=5.0)
    assert load(path).state == written and not stale.exists()


@given(position=st.integers(0, 10**6), mask=st.integers(1, 255))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_single_byte_flip_is_caught_or_harmless(position, mask):
    """Never an exception, never a different state: a flip in insignificant whitespace may still load."""
    state = audited_state(audits=50)
    data = bytearray(encode(state))
    data[position % len(data)] ^= mask
    loaded, why = decode(bytes(data))
    assert loaded == state or (loaded is None and why)


def test_resume_keeps_matching_state_and_restarts_on_a_new_policy(tmp_path):
    path = tmp_path / "audit.json"
    saved = save(audited_state("policy-1"), path, now=1.0)
    state, note = resume(load(path), "policy-1", dict(THRESHOLDS), ["device", "edge"], CONFIG)
    assert state == saved and note is None
    state, note = resume(load(path), "policy-2", THRESHOLDS, ["device", "edge"], CONFIG)
    assert state.policy_id == "policy-2" and state.tiers["edge"].n == 0 and "new policy" in note
    moved = THRESHOLDS | {"alpha_device": 0.95}
    state, note = resume(load(path), "policy-1", moved, ["device", "edge"], CONFIG)
    assert state.tiers["device"].n == 0 and "starting fresh" in note
    state, note = resume(load(path), "policy-1", THRESHOLDS, ["device", "edge"], AuditConfig(epsilon=0.005))
    assert state.tiers["device"].n == 0 and "another promise" in note
    save(audited_state("policy-1", audits=500), path, now=2.0)
    path.write_bytes(b"torn")
    state, note = resume(load(path), "policy-1", THRESHOLDS, ["device", "edge"], CONFIG)
    assert state == saved and note.startswith("resumed from prev") and "not valid JSON" in note


def test_state_refuses_inconsistent_content():
    tier = TierAudit("device", "other-policy", CONFIG)
    with pytest.raises(ValueError, match="expected tier 'device' under policy 'p'"):
        AuditState("p", {}, {"device": tier}, {"device": 0.1})
    with pytest.raises(ValueError, match="must be a probability"):
        AuditState("p", {}, {}, {"device": 1.5})
    with pytest.raises(ValueError, match="the same tiers"):
        AuditState("p", {}, {"device": TierAudit("device", "p", CONFIG)}, {"edge": 0.1})
    with pytest.raises(ValueError, match="thresholds"):
        AuditState("p", {"alpha_edge": math.nan}, {}, {})


# --- kill -9 mid-write ------------------------------------------------------------------------------------

WRITER = """
import sys
from cartosplit.device_runtime.audit_bound import AuditConfig, TierAudit
from cartosplit.device_runtime.audit_state import AuditState, save

path, i = sys.argv[1], int(sys.argv[2])
config = AuditConfig(epsilon=0.02)
while True:
    i += 1
    policy = f"loop-{i}"
    tier = TierAudit("device", policy, config, n=i, k=i // 7)
    thresholds = {f"t{j}": j / 7 for j in range(i % 2000)}  # the file grows to ~50 KB, then starts again
    save(AuditState(policy, thresholds, {"device": tier}, {"device": 0.05}), path)
"""


def consistent(state: AuditState) -> bool:
    """The writer's invariant: every field comes from the same loop iteration."""
    n = state.tiers["device"].n
    return (
        state.policy_id == f"loop-{n}"
        and state.tiers["device"].k == n // 7
        and len(state.thresholds) == n % 2000
        and all(state.thresholds[f"t{j}"] == j / 7 for j in range(n % 2000))
    )


def wait_for_progress(path: Path, beyond: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, _ = read_state(path)
        if state is not None and state.tiers["device"].n > beyond:
            return
        assert proc.poll() is None, f"the writer died on its own: {proc.stderr.read().decode()}"
        time.sleep(0.005)
    raise AssertionError(f"the writer made no progress past {beyond} within {timeout} s")


def test_kill_9_mid_write_never_leaves_a_torn_state(tmp_path):
    path = tmp_path / "audit.json"
    rng = random.Random(0)
    sources, offset = [], 0
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(offset)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_for_progress(path, offset, proc)
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
        loaded = load(path)
        assert loaded.state is not None, loaded.reason
        assert consistent(loaded.state)
        n = loaded.state.tiers["device"].n
        assert n > offset  # this writer's own progress survived, from the file or .prev
        sources.append((loaded.source, tmp_file(path).exists()))
        offset = n + rng.randint(0, 3000)  # the next writer starts elsewhere in the size cycle
    mid_write = sum(1 for _, tmp in sources if tmp)
    print(f"\n20 kills: loaded from {[s for s, _ in sources]}; killed with a .tmp on disk {mid_write} times")
