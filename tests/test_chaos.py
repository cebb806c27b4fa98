"""The short CI version of the chaos benchmark (benchmarks/chaos.py), and its pure parts.

Real server subprocesses (the CLI) on loopback, the tiny bundle, 4 clients for ~16 s while the edge and the
cloud are frozen, killed and restarted; the 10-minute run and its figures are benchmarks/results/chaos.md.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cartosplit.benchmarks.chaos import (
    PHASES,
    ChaosPlan,
    Disruption,
    caught_by_a_fault,
    fault_schedule,
    label_phases,
    markdown,
    parse_status,
    phase_segments,
    run_chaos,
)
from cartosplit.benchmarks.report import write_report

# words the tiny bundle's tokenizer knows (tests/conftest.py), so inputs are not all [UNK]
SENTENCES = ["the movie was very good", "a boring film", "this plot is awful", "the actors are superb", "it is dull"]
REQUIRED_KEYS = {"answers", "lost", "duplicates", "degraded_share", "seconds", "clients"}
# seed 1 with these gaps and holds: edge freeze at ~1 s, cloud kill, cloud restart, ... (test below)
SHORT = {
    "seed": 1,
    "min_gap_s": 1.0,
    "max_gap_s": 2.0,
    "kill_pause_s": (0.3, 1.0),
    "freeze_s": (1.0, 2.0),
    "timeout_s": 1.0,
    "retry_after_s": 1.0,
    "recover_s": 1.0,
    "warmup_s": 2.0,
    "progress_s": 1e9,
    "force_offload": True,  # the tiny bundle answers nearly all on the device: no fault would be felt
}


@pytest.fixture(scope="module")
def chaos_report(bundle: Path, tmp_path_factory) -> tuple[dict, Path]:
    report = run_chaos(bundle, clients=4, seconds=16, texts=SENTENCES, log=lambda *_: None, **SHORT)
    out = tmp_path_factory.mktemp("chaos") / "chaos"
    written = write_report(report, out, "cartosplit bench chaos (test)", markdown)
    return written, out


def test_the_seeded_schedule_kills_and_freezes_first() -> None:
    first = list(itertools.islice(fault_schedule(ChaosPlan(**SHORT)), 3))
    assert [(f.tier, f.action) for f in first] == [("edge", "freeze"), ("cloud", "kill"), ("cloud", "restart")]
    again = list(itertools.islice(fault_schedule(ChaosPlan(**SHORT)), 3))
    assert first == again and all(1.0 <= f.gap_s <= 2.0 for f in first)


def test_no_input_is_lost_or_answered_twice_while_tiers_die(chaos_report) -> None:
    report, _ = chaos_report
    actions = {e["action"] for e in report["events"]}
    assert {"kill", "freeze"} <= actions, report["events"]
    assert all("back_s" in e for e in report["events"]), "a tier was not brought back"
    assert report["lost"] == 0 and report["exceptions"] == 0, report["exception_samples"]
    assert report["duplicates"] == 0
    assert report["answers"] == report["submitted"] > 0
    assert report["missing_labels"] == 0  # every answer carries one of the bundle's labels
    assert report["passed"], report["gates"]


def test_every_answer_has_a_phase_and_faults_show_in_them(chaos_report) -> None:
    report, _ = chaos_report
    phases = report["phases"]
    assert set(phases) <= set(PHASES) and "steady" in phases
    assert sum(p["answers"] for p in phases.values()) == report["answers"]
    assert {"edge_frozen", "cloud_down"} <= set(phases), sorted(phases)
    # the edge frozen: the device's call to it runs out of time, or the edge is skipped
    frozen = report["status_codes_device_by_phase"]["edge_frozen"]
    assert any(code in frozen for code in ("edge DEADLINE_EXCEEDED", "edge SKIPPED")), frozen


def test_servers_come_back_on_their_ports_and_their_counters_are_kept(chaos_report) -> None:
    report, _ = chaos_report
    for event in report["events"]:
        if event["action"] != "freeze":
            assert event["pid_after"] != event["pid_before"]
    cloud = report["incarnations"]["cloud"]
    assert len(cloud) >= 3 and [row["end"] for row in cloud][:2] == ["killed", "restarted"]
    assert cloud[0]["metrics"].startswith("lost")  # SIGKILL: nothing to scrape
    assert "requests" in cloud[1]["metrics"]  # scraped before the planned stop
    # the last incarnation answered the final check, and was scraped before its stop at the end
    assert report["server_requests"]["cloud"]["requests_by_code"].get("OK", 0) > 0
    assert report["final"]["edge"]["ok"] and report["final"]["cloud"]["ok"]


def test_the_result_files_have_the_keys_other_tools_read(chaos_report) -> None:
    _, out = chaos_report
    stored = json.loads(out.with_suffix(".json").read_text())
    assert set(stored) >= REQUIRED_KEYS
    assert stored["clients"] == 4 and 15 <= stored["seconds"] < 25
    assert 0.0 <= stored["degraded_share"] <= 1.0
    text = out.with_suffix(".md").read_text()
    assert "## Bounds" in text and "counters are lost" in text and "| edge_frozen |" in text


def test_status_entries_of_the_runtime_are_parsed() -> None:
    tiers = {"127.0.0.1:5001": "edge", "127.0.0.1:5002": "cloud"}
    assert parse_status("127.0.0.1:5001: DEADLINE_EXCEEDED", tiers) == ("edge", "DEADLINE_EXCEEDED")
    assert parse_status("127.0.0.1:5002: UNAVAILABLE", tiers) == ("cloud", "UNAVAILABLE")
    assert parse_status("127.0.0.1:5002 skipped: failed less than 5 s ago", tiers) == ("cloud", "SKIPPED")


def test_phases_follow_the_disruptions() -> None:
    disruptions = [Disruption("edge", "frozen", 2.0, 4.0), Disruption("cloud", "down", 4.5, 7.0)]
    segments = phase_segments(disruptions, recover_s=3.0)
    times = [0.0, 2.0, 3.9, 4.0, 4.4, 4.5, 6.9, 7.0, 9.9, 10.0]
    assert label_phases(times, segments) == [
        "steady",
        "edge_frozen",
        "edge_frozen",
        "recovering",  # cut short by the next fault at 4.5
        "recovering",
        "cloud_down",
        "cloud_down",
        "recovering",
        "recovering",
        "steady",
    ]
    # a tier that never came back is down until the end
    assert label_phases([100.0], phase_segments([Disruption("edge", "down", 1.0)], 3.0)) == ["edge_down"]


@given(
    st.lists(st.tuples(st.floats(0.1, 20), st.floats(0, 10), st.sampled_from(["edge", "cloud"])), max_size=8),
    st.lists(st.floats(-5, 200), max_size=30),
)
def test_a_time_in_a_disruption_gets_its_label_and_every_time_one(spans, times) -> None:
    disruptions, start = [], 0.0
    for gap, length, tier in spans:  # sequential, as the chaos loop makes them
        start += gap
        disruptions.append(Disruption(tier, "down", start, start + length))
        start += length
    labels = label_phases(times, phase_segments(disruptions, 3.0))
    assert len(labels) == len(times) and set(labels) <= set(PHASES)
    for t, label in zip(times, labels, strict=True):
        inside = [d for d in disruptions if d.start_s <= t < d.end_s]
        assert label == (f"{inside[0].tier}_down" if inside else label)
        if not inside:
            assert label in ("steady", "recovering")


def test_inputs_in_flight_when_a_fault_begins_are_caught() -> None:
    t_s = np.array([0.0, 0.5, 2.1, 3.0, 9.0])
    latency_ms = np.array([100.0, 2000.0, 50.0, np.nan, 10.0])  # nan: never answered
    caught = caught_by_a_fault(t_s, latency_ms, fault_starts=[2.0, 5.0])
    assert caught.tolist() == [False, True, False, True, False]
